"""forms.py: MNIST's 7s, 1s and 4s rewritten in European forms, and the extra training digits train.py
adds with --european and --fonts."""

import pytest
import torch

import forms
from cli import UserError
from conftest import capture, main_of
from data import load_split


@pytest.fixture(scope="module")
def mnist():
    return load_split("mnist", "train")


def test_european_forms_are_seeded_balanced_and_add_a_stroke(mnist):
    images, labels = forms.european_forms(*mnist, n=300, seed=3)
    again, _ = forms.european_forms(*mnist, n=300, seed=3)
    other, _ = forms.european_forms(*mnist, n=300, seed=4)
    assert images.shape == (300, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(images, again) and not torch.equal(images, other)
    assert torch.bincount(labels, minlength=10)[[1, 4, 7]].tolist() == [100, 100, 100]
    # each is an MNIST digit with ink added: more ink than the average digit of its class
    for digit in (1, 4, 7):
        plain = mnist[0][mnist[1] == digit].float().mean()
        assert images[labels == digit].float().mean() > plain


def test_a_crossed_seven_gains_ink_across_its_middle(mnist):
    images, labels = forms.european_forms(*mnist, n=90, seed=0)
    sevens = images[labels == 7].float()[:, 0]
    plain = mnist[0][mnist[1] == 7][:2000].float()[:, 0].mean(0)
    gained = (sevens.mean(0) - plain).clamp(min=0)
    rows = gained.sum(1)
    assert rows[10:20].sum() > 2 * (rows[:8].sum() + rows[22:].sum())  # the bar sits mid-height


def test_more_digits_appends_and_refuses_other_classes(mnist, monkeypatch):
    images, labels = mnist[0][:100], mnist[1][:100]
    x, y = forms.more_digits(images, labels, list("0123456789"), european=30)
    assert len(x) == 130 and torch.equal(x[:100], images)
    with pytest.raises(UserError, match="add digits 0-9; this dataset's classes are T-shirt"):
        forms.more_digits(images, labels, ["T-shirt/top", "Trouser"], european=3)
    import fontdigits

    monkeypatch.setattr(fontdigits, "find_fonts", lambda: [])
    with pytest.raises(UserError, match="needs handwriting fonts, and none are installed: sudo apt-get install"):
        forms.more_digits(images, labels, list("0123456789"), fonts=10)


def test_train_adds_them_to_the_training_set_only(synth_data, tmp_path):
    out = str(tmp_path / "run")
    code, printed, err = capture(
        lambda: main_of(
            "train",
            [
                "--model",
                "fast",
                "--epochs",
                "1",
                "--european",
                "60",
                "--subset",
                "600",
                "--out",
                out,
                "--progress",
                "off",
            ],
        )
    )
    assert code == 0, err
    assert "660 train, 0 val, 600 test images" in printed  # MNIST's first 600, plus 60
    code, _, err = capture(
        lambda: main_of(
            "train",
            [
                "--model",
                "fast",
                "--epochs",
                "1",
                "--european",
                "60",
                "--data-dir",
                synth_data,
                "--out",
                str(tmp_path / "bars"),
            ],
        )
    )
    assert code == 1 and "--european 60: only 0 of 60 digits could be rewritten" in err, err
