"""plots.py: the grids of mistakes and correct predictions."""

import os

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
