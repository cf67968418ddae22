"""evaluate.py: the pictures --out writes, the shipped weights' recorded scores, and beyond one
checkpoint: test-time augmentation and ensembles, checked against an independent computation from the
models themselves; reports that grow with the classes, not their square, and class names as data."""

import csv
import json
import os
import re
import time

import pytest
import torch
import torch.nn.functional as F

import plots
from checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, build_model, load_checkpoint
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
        ("fashion-mnist.pt", "fashion-mnist", 93.0, None),
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


def labelled_set(tmp_path, names, per_class=2, seed=0):
    """An untrained model's checkpoint over the classes NAMES, and a CSV test set of PER_CLASS random
    images a class, its names in a classes.txt beside it: (checkpoint path, CSV path). Every other image
    is labelled as the model reads it, the rest by turns: some right, and many pairs confused."""
    from data import normalize
    from models import get_model

    torch.manual_seed(seed)
    kwargs = {"in_channels": 1, "num_classes": len(names)}
    model = get_model("fast", **kwargs).eval()
    n = len(names) * per_class
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 1, 28, 28, generator=g) ** (1 + 4 * torch.rand(n, 1, 1, 1, generator=g)) * 255).byte()
    with torch.no_grad():
        read = model(normalize(images, 0.5, 0.25)).argmax(1)
    labels = torch.where(torch.arange(n) % 2 == 0, read, torch.arange(n) // 2 % len(names))
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "classes.txt").write_text("".join(name + "\n" for name in names), encoding="utf-8")
    rows = (",".join(map(str, [k, *x])) + "\n" for k, x in zip(labels.tolist(), images.flatten(1).tolist()))
    (folder / "test.csv").write_text("".join(rows))
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": model.state_dict(),
        "model": {"name": "fast", "kwargs": kwargs},
        "data": {"dataset": str(folder), "mean": 0.5, "std": 0.25, "classes": list(names)},
    }
    torch.save(ckpt, tmp_path / "model.pt")
    return str(tmp_path / "model.pt"), str(folder / "test.csv")


def test_a_300_class_report_is_linear_in_the_classes(tmp_path, capsys):
    """A handwritten alphabet's 300 classes: the printed report names the worst classes and the most
    confused pairs instead of 90,000 cells, the pictures stay small, and it all takes seconds."""
    names = [f"letter-{k:03d}" for k in range(300)]
    ckpt, test = labelled_set(tmp_path, names)
    out = str(tmp_path / "report")
    started = time.perf_counter()
    code, stdout, err = run_script("evaluate", [ckpt, "--test", test, "--out", out], capsys)
    assert code == 0, err
    assert time.perf_counter() - started < 15
    assert len(stdout) < 8000 and len(stdout.splitlines()) < 60, stdout  # the whole matrix: 300 lines of 3,000
    assert "the 20 of 300 classes with the lowest recall:" in stdout and "... and 280 more classes" in stdout
    assert "most confused pairs, " in stdout and "true \\ predicted" not in stdout
    for name, (w, h) in {"confusion.png": (1200, 1200), "correct.png": (1000, 3000)}.items():
        width, height = png_size(os.path.join(out, name))
        assert width <= w and height <= h, (name, width, height)
    rows = list(csv.reader(open(os.path.join(out, "confusion.csv"), newline="")))  # the whole matrix, as data
    assert len(rows) == 301 and {len(r) for r in rows} == {301} and rows[0][1:] == names
    assert sum(int(v) for r in rows[1:] for v in r[1:]) == 600
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["classes"] == names and os.path.getsize(os.path.join(out, "report.json")) < 200_000
    result = report["results"][ckpt]
    assert len(result["per_class"]) == 300 and "confusion" not in result  # every class; no 300 x 300
    assert sum(n for _, _, n in result["confusion_cells"]) == 600
    assert result["most_confused"] == sorted(result["most_confused"], key=lambda c: -c["images"])


def test_past_a_thousand_classes_confusion_csv_lists_the_nonzero_cells(tmp_path, capsys, monkeypatch):
    import evaluate

    monkeypatch.setattr(evaluate, "CSV_MATRIX", 40)  # as for 5,000 classes, without making them
    ckpt, test = labelled_set(tmp_path, [f"c{k}" for k in range(50)])
    code, stdout, err = run_script("evaluate", [ckpt, "--test", test, "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    rows = list(csv.reader(open(tmp_path / "r" / "confusion.csv", newline="")))
    assert rows[0] == ["true", "predicted", "images"] and sum(int(r[2]) for r in rows[1:]) == 100
    assert len(rows) <= 101 and "confusion.csv lists the nonzero cells" in stdout


# Names from the user's files: a comma, a spreadsheet formula, terminal escapes (a colour, a window
# title with a bell), and TeX that matplotlib would try to typeset.
HOSTILE = ["a,b", '=HYPERLINK("http://evil.example","x")', "\x1b[31mred", "\x1b]0;pwned\x07", "$\\nope$", "plain"]


def test_class_names_are_data_in_the_report_the_csv_and_the_pictures(tmp_path, capsys):
    ckpt, test = labelled_set(tmp_path, HOSTILE, per_class=4)
    out = str(tmp_path / "report")
    code, stdout, err = run_script("evaluate", [ckpt, "--test", test, "--out", out], capsys)
    assert code == 0, err
    assert "\x1b" not in stdout + err and "\x07" not in stdout
    assert "\\x1b[31mred" in stdout and "true \\ predicted" in stdout  # escaped, in the table and the matrix
    rows = list(csv.reader(open(os.path.join(out, "confusion.csv"), newline="", encoding="utf-8")))
    assert rows[0] == [
        "true\\predicted",
        "a,b",
        '\'=HYPERLINK("http://evil.example","x")',
        "\\x1b[31mred",
        "\\x1b]0;pwned\\x07",
        "$\\nope$",
        "plain",
    ]
    assert [r[0] for r in rows[1:]] == rows[0][1:] and {len(r) for r in rows} == {7}
    assert sum(int(v) for r in rows[1:] for v in r[1:]) == 24
    assert png_size(os.path.join(out, "confusion.png"))  # $\nope$ did not stop matplotlib
    assert json.load(open(os.path.join(out, "report.json")))["classes"] == HOSTILE  # the names as they are


def test_printed_paths_are_escaped(tmp_path, capsys):
    folder = tmp_path / "run\x1b[2J"
    folder.mkdir()
    ckpt, test = labelled_set(folder, ["x", "y"])
    code, stdout, err = run_script("evaluate", [ckpt, "--test", test, "--out", str(folder / "r")], capsys)
    assert code == 0, err
    assert "\x1b" not in stdout and "run\\x1b[2J" in stdout.splitlines()[0]
