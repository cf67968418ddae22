"""plots.py: the grids of mistakes and correct predictions, and pictures that stay bounded for many
classes and draw any class name."""

import os
import time

import pytest
import torch

import plots
from conftest import png_size


def test_mistakes_are_sorted_by_confidence_and_captioned(tmp_path):
    images = torch.randint(0, 255, (6, 1, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    probs = torch.full((6, 10), 0.01)
    probs[0, 7], probs[1, 1], probs[2, 9], probs[3, 3], probs[4, 0], probs[5, 5] = 0.6, 0.9, 0.95, 0.9, 0.3, 0.9
    written = plots.prediction_grids(images, labels, probs, [str(k) for k in range(10)], str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["mistakes.png", "correct.png"]
    w, h = png_size(written[0])
    assert w > 3 * 112 and h > 112  # three mistakes in one row of enlarged tiles, each with a caption


def test_many_classes_draw_the_most_confused_pairs_in_a_bounded_picture(tmp_path):
    """1,000 classes: not a million labelled cells (100 took 3 GB and 20 s), the 20 most confused pairs."""
    if not plots.have_matplotlib():
        pytest.skip("matplotlib is not installed")
    n = 1000
    cells = [(k, k, 5) for k in range(n)] + [(k, (k * 7 + 1) % n, 1 + k % 4) for k in range(n)]
    started = time.perf_counter()
    plots.confusion_png(cells, [f"class {k}" for k in range(n)], str(tmp_path / "confusion.png"), "many")
    assert time.perf_counter() - started < 5
    w, h = png_size(tmp_path / "confusion.png")
    assert w <= 1200 and h <= 1200 and os.path.getsize(tmp_path / "confusion.png") < 300_000


def test_the_grids_of_many_classes_are_bounded(tmp_path):
    """correct.png shows at most 32 classes (4 images each), however many have right answers."""
    n = 1000
    labels = torch.arange(2 * n) % n
    probs = torch.nn.functional.one_hot(labels, n).float()
    probs[::2] = torch.nn.functional.one_hot((labels[::2] + 1) % n, n).float() * 0.9  # half wrong
    images = torch.randint(0, 255, (2 * n, 1, 28, 28), dtype=torch.uint8)
    written = plots.prediction_grids(images, labels, probs, [f"c{k}" for k in range(n)], str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["mistakes.png", "correct.png"]
    for path in written:
        w, h = png_size(path)
        assert w < 1000 and h < 2500, (path, w, h)


# A folder name that is not UTF-8 (its byte kept as a lone surrogate), TeX, and terminal escapes: a
# matplotlib label of the first two failed the whole picture.
NAMES = ["bad\udcff", "$\\nope$", "\x1b[31mred", "a,b"]


def test_names_that_are_not_plain_text_are_drawn(tmp_path):
    if not plots.have_matplotlib():
        pytest.skip("matplotlib is not installed")
    cells = [(0, 0, 3), (1, 2, 1), (2, 1, 2), (3, 3, 1)]
    plots.confusion_png(cells, NAMES, str(tmp_path / "small.png"), "model on $HOME/\udcff")
    plots.confusion_png(cells, NAMES * 10, str(tmp_path / "pairs.png"), "many")
    assert png_size(tmp_path / "small.png") and png_size(tmp_path / "pairs.png")
    assert plots.plain("$\\nope$ \x1b\udcff") == "\\$\\nope\\$ \\x1b\\xff"
    images = torch.randint(0, 255, (4, 1, 28, 28), dtype=torch.uint8)
    probs = torch.eye(4)[[0, 2, 1, 3]]
    written = plots.prediction_grids(images, torch.arange(4), probs, NAMES, str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["mistakes.png", "correct.png"]
