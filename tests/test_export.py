"""export.py: pt2 programs, slim checkpoints and ONNX files, each taking images on 0..1 as the hub entries
do, saying what they are, and checked against the model they came from (ONNX by onnxruntime)."""

import json
import os

import pytest
import torch

from checkpoint import CHECKPOINT_FORMAT, load_checkpoint, model_card, normalized_model
from conftest import ROOT, run_script
from conftest import main_of as run_main


def onnx_tools():
    """onnxruntime, after skipping where the ONNX exporter or runtime is not installed (test-only extras)."""
    pytest.importorskip("onnxscript", reason="ONNX export needs onnx and onnxscript: pip install onnx onnxscript")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install onnxruntime")


def check_card(card, ckpt):
    """An export's description against the checkpoint it came from."""
    last = ckpt["history"][-1]
    assert card["classes"] == ckpt["data"]["classes"] and card["model"] == ckpt["model"]["name"]
    assert card["model_options"] == ckpt["model"]["kwargs"] and card["weights"] == "raw"
    assert card["test_accuracy"] == round(last["test_acc"], 2) and card["epochs"] == ckpt["epoch"]
    assert card["checkpoint_format"] == f"{CHECKPOINT_FORMAT} {ckpt['version']}"
    assert card["input_shape"] == ["N", 1, 28, 28] and "on 0..1" in card["input"]
    assert f"subtracts {ckpt['data']['mean']:g}" in card["input"]


def test_export_pt2_takes_images_on_0_to_1_and_describes_itself(synth_run, tmp_path, capsys):
    folder, run = synth_run
    out = str(tmp_path / "model.pt2")
    code, printed, err = run_script("export", [run, "--format", "pt2", "--out", out, "--data-dir", folder], capsys)
    assert code == 0, err
    assert "test images given on 0..1" in printed and "same prediction for 100.0 %" in printed
    extra = {"metadata.json": ""}
    program = torch.export.load(out, extra_files=extra).module()
    ckpt = load_checkpoint(run)
    check_card(json.loads(extra["metadata.json"]), ckpt)
    hub_like, _ = normalized_model(ckpt)
    x = torch.rand(3, 1, 28, 28)  # the batch size stays free
    with torch.no_grad():
        assert torch.allclose(program(x), hub_like(x), atol=1e-5)
        assert not torch.allclose(program(x), hub_like.model(x), atol=1e-2)  # the normalization is inside
    assert os.path.getsize(out) < 2 * os.path.getsize(os.path.join(run, "last.pt"))  # no test images kept in it


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


def test_export_onnx_runs_in_onnxruntime_and_carries_its_metadata(synth_run, tmp_path, capsys):
    ort = onnx_tools()
    folder, run = synth_run
    out = str(tmp_path / "m.onnx")
    code, printed, err = run_script("export", [run, "--format", "onnx", "--out", out, "--data-dir", folder], capsys)
    assert code == 0, err
    assert "same prediction for 100.0 %" in printed and "reference evaluator" not in printed
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta()
    ckpt = load_checkpoint(run)
    card = model_card(ckpt, "raw")  # as the pt2 test checks it; strings stay strings, the rest is JSON
    props = meta.custom_metadata_map
    assert props == {k: v if isinstance(v, str) else json.dumps(v) for k, v in card.items()}
    assert json.loads(props["classes"]) == ckpt["data"]["classes"] and props["model"] == "fast"
    assert "metadata_props['classes']" in meta.description and "on 0..1" in meta.description
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(
            torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), normalized_model(ckpt)[0](x), atol=1e-5
        )


def test_export_onnx_is_checked_by_onnx_itself_without_onnxruntime(synth_run, tmp_path, capsys, monkeypatch):
    import export

    onnx_tools()
    folder, run = synth_run
    monkeypatch.setattr(export, "_importable", lambda name: name != "onnxruntime")
    out = str(tmp_path / "m.onnx")
    code, printed, err = run_script("export", [run, "--format", "onnx", "--out", out, "--data-dir", folder], capsys)
    assert code == 0, err
    assert "pip install onnxruntime" in printed and "reference evaluator" in printed
    assert "same prediction for 100.0 %" in printed


@pytest.mark.slow
def test_shipped_mnist_model_exported_scores_in_onnxruntime_as_in_pytorch(tmp_path, mnist_test):
    """What the README promises a client: the ONNX file on MNIST's test images given on 0..1, class names from
    its metadata; and the pt2 program gives what the hub entry gives."""
    ort = onnx_tools()
    from conftest import main_of

    shipped = os.path.join(ROOT, "weights", "mnist.pt")
    for fmt in ("onnx", "pt2"):
        assert main_of("export", [shipped, "--format", fmt, "--out", str(tmp_path / f"mnist.{fmt}")]) == 0
    images, labels = mnist_test
    x = images.float() / 255
    session = ort.InferenceSession(str(tmp_path / "mnist.onnx"), providers=["CPUExecutionProvider"])
    classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    assert classes == [str(d) for d in range(10)]
    predicted = session.run(None, {"images": x.numpy()})[0].argmax(1)
    accuracy = (torch.from_numpy(predicted) == labels).float().mean().item() * 100
    assert accuracy >= 99.4, accuracy
    hub, _ = normalized_model(load_checkpoint(shipped))  # what hubconf.cnn(pretrained=True) returns
    program = torch.export.load(str(tmp_path / "mnist.pt2")).module()
    with torch.no_grad():
        assert (program(x) - hub(x)).abs().max().item() <= 1e-5


def test_export_never_replaces_the_run_it_reads(synth_run, tmp_path):
    from conftest import one_line, snapshot

    folder, run = synth_run
    before = snapshot(run)
    for out in (os.path.join(run, "last.pt"), os.path.join(run, ".", "last.pt")):
        code, line = one_line(
            lambda out=out: run_main("export", [run, "--format", "ckpt", "--out", out, "--data-dir", folder])
        )
        assert code == 2 and "which this command reads" in line, line
    assert snapshot(run) == before
