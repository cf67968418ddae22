"""evaluate.py: the pictures --out writes, the shipped weights' recorded scores, and beyond one
checkpoint: test-time augmentation and ensembles, checked against an independent computation from the
models themselves."""

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

import plots
from checkpoint import build_model, load_checkpoint
from conftest import HAS_FASHION, ROOT, SHARED, main_of, png_size, run_script
from data import load_split, normalize, tta_views


@pytest.fixture(scope="module")
def two_runs(synth_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ens")
    runs = []
    for seed in (0, 1):
        out = str(tmp / f"run{seed}")
        assert (
            main_of(
                "train",
                [
                    "--model",
                    "fast",
                    "--epochs",
                    "2",
                    "--seed",
                    str(seed),
                    "--data-dir",
                    synth_data,
                    "--out",
                    out,
                    "--progress",
                    "off",
                ],
            )
            == 0
        )
        runs.append(os.path.join(out, "last.pt"))
    return synth_data, runs


def probs_of(path, images, shifts=((0, 0),)):
    """Softmax of one checkpoint's model, averaged over the images moved by each (dy, dx)."""
    ckpt = load_checkpoint(path)
    model = build_model(ckpt)[0].eval()
    out = []
    for dy, dx in shifts:
        h, w = images.shape[-2:]  # move by (dy, dx), zeros coming in at the edge
        moved = F.pad(images, (1, 1, 1, 1))[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w]
        with torch.no_grad():
            out.append(model(normalize(moved, ckpt["data"]["mean"], ckpt["data"]["std"])).softmax(1))
    return torch.stack(out).mean(0)


def accuracy(probs, labels):
    return 100.0 * (probs.argmax(1) == labels).sum().item() / len(labels)


def evaluate(args, tmp_path, capsys):
    """evaluate.py in fp32, the precision of the reference computation above."""
    out = str(tmp_path / "report")
    code, stdout, err = run_script("evaluate", [*args, "--amp", "off", "--out", out], capsys)
    assert code == 0, err
    return json.load(open(os.path.join(out, "report.json")))["results"], stdout


def test_tta_views_are_the_image_and_its_one_pixel_shifts():
    x = torch.randint(1, 255, (2, 1, 5, 5), dtype=torch.uint8)
    views = tta_views(x, flips=False)
    assert len(views) == 5 and torch.equal(views[0], x)
    down = torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :]], dim=-2)
    right = torch.cat([torch.zeros_like(x[..., :1]), x[..., :-1]], dim=-1)
    up = torch.cat([x[..., 1:, :], torch.zeros_like(x[..., :1, :])], dim=-2)
    left = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
    assert sorted(v.flatten().tolist() for v in views[1:]) == sorted(
        v.flatten().tolist() for v in (down, up, right, left)
    )
    mirrored = tta_views(x, flips=True)
    assert len(mirrored) == 6 and torch.equal(mirrored[-1], x.flip(-1))


def test_ensemble_averages_the_softmax_and_reports_each_model(two_runs, tmp_path, capsys):
    data, (a, b) = two_runs
    results, stdout = evaluate([a, b, "--data-dir", data], tmp_path, capsys)
    images, labels = load_split("mnist", "test", data)
    pa, pb = probs_of(a, images), probs_of(b, images)
    assert results[a]["accuracy"] == pytest.approx(accuracy(pa, labels))
    assert results[b]["accuracy"] == pytest.approx(accuracy(pb, labels))
    assert results["ensemble"]["accuracy"] == pytest.approx(accuracy((pa + pb) / 2, labels))
    mean_loss = F.nll_loss(((pa + pb) / 2).clamp_min(1e-12).log(), labels).item()  # of the mean softmax, not logits
    assert results["ensemble"]["loss"] == pytest.approx(mean_loss, rel=1e-4)
    wrong_a, wrong_b = pa.argmax(1) != labels, pb.argmax(1) != labels
    assert results["ensemble"]["missed_by_all"] == int((wrong_a & wrong_b).sum())
    assert results["ensemble"]["missed_by_any"] == int((wrong_a | wrong_b).sum())
    assert "ensemble of 2: test loss" in stdout and "missed by all 2 models" in stdout


def test_an_ensemble_of_one_model_twice_is_that_model(two_runs, tmp_path, capsys):
    data, (a, _) = two_runs
    results, _ = evaluate([a, a, "--data-dir", data], tmp_path, capsys)
    assert results["ensemble"]["accuracy"] == results[a]["accuracy"]
    assert results["ensemble"]["loss"] == pytest.approx(results[a]["loss"], rel=1e-5)


def test_tta_averages_the_shifted_images(two_runs, tmp_path, capsys):
    data, (a, _) = two_runs
    results, stdout = evaluate([a, "--tta", "--data-dir", data], tmp_path, capsys)
    images, labels = load_split("mnist", "test", data)
    shifted = probs_of(a, images, ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)))
    assert results[a]["accuracy"] == pytest.approx(accuracy(shifted, labels))
    assert results[a]["loss"] == pytest.approx(F.nll_loss(shifted.clamp_min(1e-12).log(), labels).item(), rel=1e-4)
    assert "TTA" in stdout


def test_evaluate_out_writes_every_picture(synth_run, tmp_path, capsys):
    folder, run = synth_run
    report = str(tmp_path / "report")
    code, out, err = run_script(
        "evaluate", [os.path.join(run, "last.pt"), "--data-dir", folder, "--out", report], capsys
    )
    assert code == 0, err
    for name, (min_w, min_h) in {
        "confusion.png": (400, 400),
        "curves.png": (800, 300),
        "correct.png": (400, 200),
    }.items():
        w, h = png_size(os.path.join(report, name))
        assert min_w <= w <= 4000 and min_h <= h <= 4000, (name, w, h)
    assert "curves.png" in out and "skipped" not in out
    assert not [f for f in os.listdir(report) if f.endswith(".tmp")]


def test_without_matplotlib_the_plots_are_skipped_with_one_line(synth_run, tmp_path, capsys, monkeypatch):
    folder, run = synth_run
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    report = str(tmp_path / "report")
    code, out, err = run_script(
        "evaluate", [os.path.join(run, "last.pt"), "--data-dir", folder, "--out", report], capsys
    )
    assert code == 0, err
    assert "skipped confusion.png and curves.png: they need matplotlib" in out
    assert os.path.exists(os.path.join(report, "correct.png"))
    assert not os.path.exists(os.path.join(report, "confusion.png"))


# The two large models score a part of the test set only (a full pass takes them 10-25 s on 2 cores):
# there the check is that they load and are as accurate as the floor, not their exact figure.
@pytest.mark.parametrize(
    "file,dataset,floor,part",
    [
        ("mnist.pt", "mnist", 99.0, None),
        pytest.param("mnist-top.pt", "mnist", 99.7, 3000, marks=pytest.mark.slow),
        ("fashion-mnist.pt", "fashion-mnist", 90.0, None),
        pytest.param("fashion-mnist-top.pt", "fashion-mnist", 94.0, 1500, marks=pytest.mark.slow),
    ],
)
def test_shipped_weights_are_small_and_score_what_they_say(file, dataset, floor, part, capsys):
    """Each shipped file is a slim checkpoint under 5 MB whose recorded accuracy is what it scores now."""
    path = os.path.join(ROOT, "weights", file)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    from checkpoint import load_checkpoint

    assert os.path.getsize(path) < 5_000_000
    ckpt = load_checkpoint(path)
    assert ckpt["data"]["dataset"] == dataset and "optimizer" not in ckpt
    assert ckpt["history"][-1]["test_acc"] > floor
    if dataset == "fashion-mnist" and not HAS_FASHION:
        return
    args = [path] + (["--data-dir", SHARED] if dataset != "mnist" else []) + (["--subset", str(part)] if part else [])
    code, out, err = run_script("evaluate", args, capsys)
    assert code == 0, err
    if part:
        assert float(re.search(r"accuracy ([\d.]+) %", out).group(1)) > floor, out
    else:
        assert f"accuracy {ckpt['history'][-1]['test_acc']:.2f} %" in out, out
