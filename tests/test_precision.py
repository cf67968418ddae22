"""--amp auto: bf16 where the device computes it natively, fp32 everywhere else, recorded and kept on
resume; torch's own switches for older instruction sets (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA)
are honoured, so that a restricted run chooses as an AVX2-only CPU would."""

import json
import os

import pytest
import torch

import device
from conftest import run_cli, run_script

CPU = torch.device("cpu")


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU has the given capabilities (torch.cpu.get_capabilities keys) and ATen dispatch."""

    def pretend(caps, aten="AVX512", isa=None):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: aten)
        if isa is None:
            monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        else:
            monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)

    return pretend


@pytest.mark.parametrize(
    "caps, aten, isa, expected",
    [
        ({"amx_bf16": True, "avx512_bf16": True}, "AVX512", None, "bf16"),  # Sapphire Rapids and later
        ({"avx512_bf16": True}, "AVX512", "AVX512_CORE_BF16", "bf16"),  # Cooper Lake, Zen 4
        ({"avx512_f": True, "avx2": True}, "AVX512", None, "off"),  # Skylake-X: AVX-512, no bf16
        ({"avx2": True}, "AVX2", None, "off"),  # most laptops, Zen 1-3
        ({"amx_bf16": True}, "AVX512", "AVX2", "off"),  # oneDNN kept to AVX2
        ({"amx_bf16": True}, "AVX2", None, "off"),  # ATen kept to AVX2
        ({}, "DEFAULT", None, "off"),  # no vector units torch knows
    ],
)
def test_auto_takes_bf16_only_where_the_cpu_computes_it(cpu_with, caps, aten, isa, expected):
    cpu_with(caps, aten, isa)
    amp, note = device.resolve_amp("auto", CPU)
    assert amp == expected
    assert note.startswith("bf16 autocast" if expected == "bf16" else "fp32") and "--amp auto" in note


def test_off_is_fp32_and_an_explicit_precision_is_kept(cpu_with, capsys):
    cpu_with({"amx_bf16": True})
    assert device.resolve_amp("off", CPU) == ("off", "fp32")
    assert device.resolve_amp("bf16", CPU)[0] == "bf16"
    assert capsys.readouterr().err == ""  # native: nothing to warn about


def test_bf16_on_a_cpu_without_units_runs_after_one_warning(cpu_with, synth, tmp_path, capsys):
    cpu_with({"avx2": True}, aten="AVX2")
    out = str(tmp_path / "run")
    code, stdout, err = run_script(
        "train",
        ["--model", "fast", "--amp", "bf16", "--epochs", "1", "--data-dir", synth, "--out", out, "--progress", "off"],
        capsys,
    )
    assert code == 0, err
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "emulated" in warning[0] and "slower than fp32" in warning[0], err
    assert json.load(open(os.path.join(out, "args.json")))["amp"] == "bf16"


def test_the_choice_is_printed_recorded_and_kept_on_resume(cpu_with, synth, tmp_path, capsys):
    """Trained where bf16 is native, resumed where it is not: the run keeps bf16 (one warning), as its
    checkpoint says; a new run there takes fp32."""
    cpu_with({"amx_bf16": True})
    out = str(tmp_path / "run")
    code, stdout, err = run_script(
        "train", ["--model", "fast", "--epochs", "1", "--data-dir", synth, "--out", out, "--progress", "off"], capsys
    )
    assert code == 0, err
    assert "bf16 autocast (--amp auto: this CPU has AMX)" in stdout
    assert json.load(open(os.path.join(out, "args.json")))["amp"] == "bf16"
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["args"]["amp"] == "bf16"
    cpu_with({"avx2": True}, aten="AVX2")
    code, stdout, err = run_script("train", ["--resume", out, "--epochs", "2"], capsys)
    assert code == 0, err
    assert "resuming" in stdout and "bf16 autocast" in stdout and "emulated" in err
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["args"]["amp"] == "bf16"
    code, stdout, err = run_script(
        "train",
        ["--model", "fast", "--epochs", "1", "--data-dir", synth, "--out", str(tmp_path / "new"), "--progress", "off"],
        capsys,
    )
    assert code == 0 and "fp32 (--amp auto: this CPU has no bf16 units" in stdout, stdout + err


@pytest.mark.parametrize(
    "trained, caps, expected",
    [
        ("bf16", {"amx_bf16": True}, "bf16"),  # as trained: the figures match training's
        ("bf16", {}, "off"),  # bf16 would be emulated here: fp32
        ("off", {"amx_bf16": True}, "off"),  # an fp32 run is scored in fp32 anywhere
    ],
)
def test_evaluate_scores_in_the_training_precision_where_native(
    cpu_with, synth_run, tmp_path, capsys, monkeypatch, trained, caps, expected
):
    import evaluate

    ckpt = torch.load(os.path.join(synth_run[1], "last.pt"), weights_only=True)
    ckpt["args"]["amp"] = trained
    path = str(tmp_path / "ckpt.pt")
    torch.save(ckpt, path)
    used = []
    monkeypatch.setattr(evaluate, "autocast_for", lambda amp, dev: used.append(amp) or device.autocast_for(amp, dev))
    cpu_with(caps)
    code, stdout, err = run_script("evaluate", [path, "--data-dir", synth_run[0]], capsys)
    assert code == 0, err
    assert used == [expected] and (expected == "off") == ("bf16)" not in stdout.splitlines()[0])


@pytest.mark.slow
def test_under_the_avx2_switches_a_real_process_trains_in_fp32(synth, tmp_path):
    """The switches as a user sets them, read by torch itself at start-up (not pretended)."""
    out = str(tmp_path / "run")
    result = run_cli(
        ["train.py", "--model", "fast", "--epochs", "1", "--data-dir", synth, "--out", out, "--progress", "off"],
        env={"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    )
    assert result.returncode == 0, result.stderr
    assert "fp32 (--amp auto:" in result.stdout
    assert json.load(open(os.path.join(out, "args.json")))["amp"] == "off"
