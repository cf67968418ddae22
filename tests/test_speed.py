"""The fast path computes what a plain loop computes, and bench.py runs. No timing is asserted here:
speed claims live in bench.py."""

import json
import os
import resource
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from models import get_model


def reference_batches(folder, batch_size, seed, mean, std):
    """The training batches of train.py's first epoch, built the notebooks' way: torchvision's
    per-sample ToTensor and Normalize on PIL images, stacked by a DataLoader."""
    from torchvision import transforms

    from bench import NotebookMNIST
    from data import Batches, load_split, split_off_val

    # train.py's training set is what split_off_val keeps (all of it when --val is 0, reordered).
    (images, labels), _ = split_off_val(*load_split("mnist", "train", folder), 0)
    # Batches with each image's index as its label yields the shuffled order, whatever the formula.
    order = torch.cat(
        [
            i
            for _, i in Batches(
                images, torch.arange(len(labels)), batch_size, mean, std, shuffle=True, seed=seed
            ).epoch(0)
        ]
    )
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((mean,), (std,))])
    dataset = torch.utils.data.Subset(NotebookMNIST(images, labels, tf), order.tolist())
    return list(torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False))


def test_fast_path_matches_plain_loop(synth, tmp_path, capsys):
    """Same seed, same batches: train.py (on-device data, channels_last, no per-step sync) and a plain
    DataLoader loop give the same batch losses and the same weights, within float tolerance."""
    out = str(tmp_path / "run")
    code, _, err = run_script(
        "train",
        [
            "--model",
            "fast",
            "--optimizer",
            "sgd",
            "--lr",
            "0.05",
            "--scheduler",
            "none",
            "--epochs",
            "1",
            "--batch-size",
            "64",
            "--seed",
            "3",
            "--channels-last",
            "on",
            "--data-dir",
            synth,
            "--out",
            out,
            "--amp",
            "off",
            "--progress",
            "off",
            "--device",
            "cpu",
        ],
        capsys,
    )  # as the reference
    assert code == 0, err
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    mean, std = ckpt["data"]["mean"], ckpt["data"]["std"]

    torch.manual_seed(3)  # train.py seeds the same way before building the model
    model = get_model("fast")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # train.py's default momentum
    losses, seen = [], 0
    for x, y in reference_batches(synth, 64, 3, mean, std):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item() * len(y))
        seen += len(y)
    assert seen == 300 and len(losses) == 5
    assert abs(sum(losses) / seen - ckpt["history"][-1]["train_loss"]) < 1e-5
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_on_device_batch_equals_torchvision_transform(synth):
    """One batch, compared tensor for tensor, in both memory formats."""
    from data import Batches, load_split, split_off_val

    (images, labels), _ = split_off_val(*load_split("mnist", "train", synth), 0)
    expected_x, expected_y = reference_batches(synth, 100, 0, 0.1307, 0.3081)[0]
    for channels_last in (False, True):
        x, y = next(
            Batches(images, labels, 100, 0.1307, 0.3081, shuffle=True, seed=0, channels_last=channels_last).epoch(0)
        )
        torch.testing.assert_close(x, expected_x, rtol=0, atol=1e-6)
        assert torch.equal(y, expected_y)


def test_amp_bf16_trains_and_saves_float32(synth, tmp_path, capsys):
    out = str(tmp_path / "amp")
    code, stdout, err = run_script(
        "train",
        [
            "--model",
            "fast",
            "--amp",
            "bf16",
            "--epochs",
            "2",
            "--lr",
            "1e-2",
            "--data-dir",
            synth,
            "--out",
            out,
            "--progress",
            "off",
        ],
        capsys,
    )
    assert code == 0, err
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert ckpt["history"][-1]["test_acc"] > 80  # the bars are easy; bf16 must still learn them


def test_compile_saves_the_plain_module(synth, tmp_path, capsys, monkeypatch):
    """torch.compile wraps the model; the checkpoint must still load into get_model's module. The
    wrapper is what matters here, so the compiler runs eagerly instead of generating C++ for a minute."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    out = str(tmp_path / "compiled")
    code, _, err = run_script(
        "train",
        [
            "--model",
            "fast",
            "--compile",
            "--epochs",
            "1",
            "--batch-size",
            "100",
            "--data-dir",
            synth,
            "--out",
            out,
            "--progress",
            "off",
        ],
        capsys,
    )
    assert code == 0, err
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in ckpt["state_dict"])
    get_model("fast").load_state_dict(ckpt["state_dict"])
    code, printed, _ = run_script("evaluate", [os.path.join(out, "last.pt"), "--data-dir", synth], capsys)
    assert code == 0 and f"{ckpt['history'][-1]['test_acc']:.2f} %" in printed, printed


@pytest.mark.slow
def test_bench_runs_and_writes_json(tmp_path, capsys):
    """A few steps of every section, so the benchmark cannot rot; its figures are not checked here."""
    report = str(tmp_path / "bench.json")
    from conftest import FASHION_ARGS

    argv = ["--steps", "2", "--repeats", "1", "--seeds", "1", "--quick", "--json", report, *FASHION_ARGS]
    code, out, err = run_script("bench", argv, capsys)
    assert code == 0, err
    figures = json.load(open(report))
    fashion = {"fashion-fast", "fashion-strong"} if FASHION_ARGS else set()
    assert figures["throughput_ratio"] > 0 and set(figures["recipes"]) == {"fast", "strong"} | fashion
    assert FASHION_ARGS or "skipped fashion-fast: Fashion-MNIST's files are not found" in out
    assert figures["recipes"]["fast"]["median_training_s"] < figures["recipes"]["fast"]["median_wall_s"]
    assert set(figures["startup_s"]) >= {"import torch", "read MNIST (train and test) onto the device"}
    assert "| ours / DataLoader (notebooks)" in out and "start-up: import torch" in out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    """After keep_freed_memory, blocks of a step's size are taken from the heap again: freeing and
    allocating them does not fault their pages in anew (1.5 million faults in a CPU run without)."""
    from device import keep_freed_memory

    def faults_of_steps():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(30):  # 8 MB and 4 MB tensors, written and freed as a training step does
            a = torch.ones(2 << 20)
            b = torch.ones(1 << 20) + a[: 1 << 20]
            del a, b
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert keep_freed_memory()
    faults_of_steps()  # the heap grows once
    assert faults_of_steps() < 1000  # 30 steps of 3,000 pages each
