"""export.py: pt2 programs, slim checkpoints and ONNX files, each checked against the model it came from."""

import os

import pytest
import torch

from conftest import run_script


def test_export_pt2_matches_the_model(synth_run, tmp_path, capsys):
    folder, run = synth_run
    out = str(tmp_path / "model.pt2")
    code, printed, err = run_script("export", [run, "--format", "pt2", "--out", out, "--data-dir", folder], capsys)
    assert code == 0, err
    assert "largest logit difference" in printed and "same prediction for 100.0 %" in printed
    program = torch.export.load(out).module()
    assert program(torch.zeros(3, 1, 28, 28)).shape == (3, 10)  # the batch size stays free


def test_export_ckpt_is_slim_and_evaluates_the_same(synth_run, tmp_path, capsys):
    folder, run = synth_run
    out = str(tmp_path / "slim.pt")
    code, _, err = run_script("export", [run, "--format", "ckpt", "--out", out, "--data-dir", folder], capsys)
    assert code == 0, err
    assert os.path.getsize(out) < os.path.getsize(os.path.join(run, "last.pt")) / 2
    full, slim = (torch.load(p, map_location="cpu", weights_only=True) for p in (os.path.join(run, "last.pt"), out))
    assert set(full) - set(slim) == {"optimizer", "stopping", "scaler"}  # the resume state
    assert (
        all(torch.equal(slim["state_dict"][k], v) for k, v in full["state_dict"].items())
        and slim["data"] == full["data"]
    )
    a, b = (run_script("evaluate", [p, "--data-dir", folder], capsys)[1] for p in (run, out))
    assert a.split("accuracy")[1].split("%")[0] == b.split("accuracy")[1].split("%")[0]


def test_export_onnx_without_its_packages_says_what_to_install(synth_run, tmp_path, capsys, monkeypatch):
    import export

    folder, run = synth_run
    monkeypatch.setattr(export, "_importable", lambda name: False)
    code, _, err = run_script(
        "export", [run, "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--data-dir", folder], capsys
    )
    assert code == 1 and "pip install onnx onnxscript" in err
    assert not os.path.exists(tmp_path / "m.onnx")


def test_export_onnx_when_installed(synth_run, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    folder, run = synth_run
    out = str(tmp_path / "m.onnx")
    code, printed, err = run_script("export", [run, "--format", "onnx", "--out", out, "--data-dir", folder], capsys)
    assert code == 0, err
    assert "same prediction for 100.0 %" in printed
