"""train.py under torchrun: two CPU processes (gloo) compute what one process computes."""

import os
import re
import subprocess
import sys

import pytest
import torch

from cli import read_log
from conftest import ROOT, run_cli, write_idx_set

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in"),
]

# Plain SGD on a model with neither BatchNorm nor dropout: the only per-rank state is the batch,
# so two ranks averaging their shares' gradients must step like one process. In fp32 (bf16 would
# round the two differently) on the CPU (gloo, even beside a GPU).
SGD = [
    "--model",
    "cnn",
    "--optimizer",
    "sgd",
    "--lr",
    "0.05",
    "--momentum",
    "0",
    "--scheduler",
    "none",
    "--batch-size",
    "50",
    "--seed",
    "4",
    "--progress",
    "off",
    "--device",
    "cpu",
    "--amp",
    "off",
]
# torchrun gives each rank one thread; the single process gets one too, so that both run the same kernels.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# What still differs: each rank sums its convolution's weight gradient over its 25 images and the two
# sums are added by the all-reduce, where one process sums all 50 at once; float32 additions in another
# order. After 2 epochs (14 SGD steps) that leaves the weights up to 3.4e-6 apart, measured on one
# machine with its AVX-512 kernels (5e-8 with AVX2 kernels; 3.4e-6 also between 1 and 2 threads in one
# process). A real fault (a gradient not averaged, a share weighted wrong) moves them by 1e-3 or more.
ATOL = 2e-5


def torchrun(args, nproc=2):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **ONE_THREAD}
    env.pop("MNIST_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 310 training images: the last batch of 10 splits 5 + 5, and 103 test images split 51 + 52.
    return write_idx_set(str(tmp_path_factory.mktemp("ddp") / "synth"), n_train=310, n_test=103)


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    result = torchrun([*SGD, "--epochs", "2", "--data-dir", data, "--out", out])
    assert result.returncode == 0, result.stderr
    return out, result.stdout


def weights(out):
    return torch.load(os.path.join(out, "last.pt"), weights_only=True)


def test_outputs_are_written_once_and_load(ddp_run):
    out, stdout = ddp_run
    assert "x 2 processes (gloo)" in stdout
    assert stdout.count("done: test accuracy") == 1  # only rank 0 prints
    rows = read_log(os.path.join(out, "log.csv"))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    ckpt = weights(out)
    assert ckpt["epoch"] == 2 and not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["state_dict"])


def test_sharded_evaluation_equals_one_process(ddp_run, data):
    out, stdout = ddp_run
    trained = re.search(r"done: test accuracy ([\d.]+) %", stdout).group(1)
    result = run_cli(["evaluate.py", out, "--data-dir", data])
    assert result.returncode == 0, result.stderr
    assert f"accuracy {trained} %" in result.stdout


def test_two_processes_step_like_one_with_the_same_global_batch(ddp_run, data, tmp_path):
    single = str(tmp_path / "single")
    result = run_cli(["train.py", *SGD, "--epochs", "2", "--data-dir", data, "--out", single], env=ONE_THREAD)
    assert result.returncode == 0, result.stderr
    a, b = weights(ddp_run[0]), weights(single)
    for name, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][name], value, rtol=1e-4, atol=ATOL, msg=name)
    for x, y in zip(a["history"], b["history"]):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
        assert x["train_acc"] == y["train_acc"] and x["test_acc"] == y["test_acc"]


def test_resume_under_torchrun_continues_the_run(ddp_run, data, tmp_path):
    """Started as one process, resumed as two: the run goes on as if it had had two all along."""
    out = str(tmp_path / "run")
    first = run_cli(["train.py", *SGD, "--epochs", "1", "--data-dir", data, "--out", out], env=ONE_THREAD)
    assert first.returncode == 0, first.stderr
    resumed = torchrun(["--resume", out, "--epochs", "2"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a, b = weights(ddp_run[0]), weights(out)
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, rtol=1e-4, atol=ATOL, msg=name)
    assert [r["test_acc"] for r in read_log(os.path.join(out, "log.csv"))] == [
        r["test_acc"] for r in read_log(os.path.join(ddp_run[0], "log.csv"))
    ]


def test_an_error_stops_every_rank_with_one_message(data, tmp_path):
    out = str(tmp_path / "run")
    result = torchrun([*SGD, "--batch-size", "51", "--data-dir", data, "--out", out])
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(ours) == 1 and "must split evenly over the 2 processes" in ours[0], result.stderr
    assert not os.path.exists(out)
