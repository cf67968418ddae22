"""A run killed at any point and resumed from its last finished epoch ends bitwise equal to one that
was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from cli import read_log
from conftest import ROOT, capture, main_of

pytestmark = pytest.mark.slow  # real processes, killed and resumed

# Dropout, augmentation with erasing, EMA and a validation split: every source of randomness.
RECIPE = [
    "--model",
    "convnet",
    "--dropout",
    "0.3",
    "--augment",
    "--erase",
    "0.3",
    "--ema",
    "0.9",
    "--epochs",
    "3",
    "--subset",
    "1000",
    "--batch-size",
    "50",
    "--val",
    "300",
    "--deterministic",
    "--seed",
    "7",
    "--progress",
    "off",
    "--log-every",
    "3",
]
TIMING = ("seconds", "images_per_s")


def metrics(log_path):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_log(log_path)]


def steps(folder):
    """steps.csv without its timing column."""
    return [
        {k: v for k, v in row.items() if k != "images_per_s"} for row in read_log(os.path.join(folder, "steps.csv"))
    ]


def same_weights(a, b):
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (a, b))
    keys = ("state_dict", "ema_state_dict")
    return all(torch.equal(a[k][n], b[k][n]) for k in keys for n in a[k]) and a["history"] == _untimed(b["history"], a)


def _untimed(history, other):
    """b's history with a's timings, so the comparison covers every metric at full precision."""
    return [{**row, **{k: o[k] for k in TIMING if k in o}} for row, o in zip(history, other["history"])]


@pytest.fixture(autouse=True)
def nondeterministic_afterwards():
    """--deterministic in this process (the runs below that need not be killed) must not outlive the test."""
    yield
    torch.use_deterministic_algorithms(False)


def train(*argv):
    """train.py in this process: (exit code, stdout, stderr). Only the runs that are killed need their own."""
    return capture(lambda: main_of("train", argv))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, and how long its training takes (a process adds its start-up to that)."""
    out = str(tmp_path_factory.mktemp("ref") / "run")
    t0 = time.perf_counter()
    code, _, err = train(*RECIPE, "--out", out)
    assert code == 0, err
    torch.use_deterministic_algorithms(False)
    return out, time.perf_counter() - t0


def start(out):
    return subprocess.Popen(
        [sys.executable, "train.py", *RECIPE, "--out", out],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for(proc, text):
    """Block until the run prints a line holding TEXT."""
    for line in proc.stdout:
        if text in line:
            return
    raise AssertionError(proc.stderr.read())


def test_ctrl_c_stops_inside_an_epoch_and_resume_is_exact(reference, tmp_path):
    out = str(tmp_path / "run")
    proc = start(out)
    # The handler is checked after every step, so Ctrl-C sent as epoch 1's line prints stops the run
    # inside a later epoch however fast the machine (a fixed sleep let a fast one finish first).
    wait_for(proc, "epoch   1/3")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"Continue with: python train.py --resume {out}" in err and "interrupted: stopped at epoch" in err
    saved = torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"]
    assert f"last.pt still holds the last good state (epoch {saved})" in err and saved in (1, 2)
    with open(os.path.join(out, ".last.pt.0123456789ab.tmp"), "wb") as f:  # what a kill in the middle of a save leaves
        f.write(open(os.path.join(out, "last.pt"), "rb").read()[:1000])
    code, printed, err = train("--resume", out)
    assert code == 0, err
    assert "resuming" in printed
    assert same_weights(reference[0], out)
    assert metrics(os.path.join(reference[0], "log.csv")) == metrics(os.path.join(out, "log.csv"))
    assert steps(reference[0]) == steps(out)  # stopped inside an epoch, resumed to the same rows
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("seed", [3])
def test_sigkill_anywhere_then_resume_is_exact(reference, tmp_path, seed):
    """Killed at a random moment, then resumed, killed again, and resumed to the end."""
    rng = random.Random(seed)
    out = str(tmp_path / "run")
    proc = start(out)
    wait_for(proc, "run folder")
    time.sleep(rng.uniform(0.2, max(0.5, reference[1] - 1.0)))
    proc.kill()
    proc.wait()
    for attempt in range(2):
        cmd = ["train.py", "--resume", out]
        if attempt == 0:  # a second kill, this time in the resumed run
            proc = subprocess.Popen(
                [sys.executable, *cmd], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            time.sleep(rng.uniform(2.5, 4.0))
            proc.kill()
            proc.wait()
            continue
        code, _, err = train(*cmd[1:])
        assert code == 0, err
    assert same_weights(reference[0], out)
    assert metrics(os.path.join(reference[0], "log.csv")) == metrics(os.path.join(out, "log.csv"))
    assert steps(reference[0]) == steps(out)
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_kill_before_the_first_save_starts_over(reference, tmp_path):
    out = str(tmp_path / "run")
    proc = start(out)
    wait_for(proc, "run folder")
    proc.kill()
    proc.wait()
    assert not os.path.exists(os.path.join(out, "last.pt"))
    code, _, err = train("--resume", out)
    assert code == 0, err
    assert same_weights(reference[0], out)


def test_deterministic_runs_give_identical_logs(reference, tmp_path):
    out = str(tmp_path / "again")
    assert train(*RECIPE, "--out", out)[0] == 0
    assert metrics(os.path.join(reference[0], "log.csv")) == metrics(os.path.join(out, "log.csv"))


def test_resuming_a_finished_run_says_so(reference):
    code, printed, _ = train("--resume", reference[0])
    assert code == 0 and "is complete" in printed
    assert train("--resume", reference[0], "--epochs", "3")[0] == 0
