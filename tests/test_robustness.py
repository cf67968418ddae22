"""The robustness suite (robustness.py) and the augmentations that cover it (data.Augment's stroke, blur,
lowres and elastic): seeded, label-keeping, and changing images the way their names say."""

import os

import pytest
import torch

import robustness
from conftest import ROOT, run_script
from data import Augment, Batches, load_split


@pytest.fixture(scope="module")
def digits():
    images, labels = load_split("mnist", "test")
    return images[:400], labels[:400]


def ink(x):
    return x.float().mean().item()


def roughness(x):
    """Mean absolute difference between neighbouring pixels: detail that blur and low resolution remove."""
    x = x.float()
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()).item()


def centre(x):
    """Centre of ink mass (row, column) per image."""
    x = x.float()[:, 0]
    r = torch.arange(x.shape[-1], dtype=torch.float32)
    total = x.sum((1, 2))
    return torch.stack([(x.sum(2) * r).sum(1) / total, (x.sum(1) * r).sum(1) / total], 1)


@pytest.mark.parametrize("name", list(robustness.SHIFTS))
def test_every_shift_is_seeded_keeps_shape_and_grows_with_severity(digits, name):
    images = digits[0][:64] if name == "inverted" else digits[0]
    one, again, two = (
        robustness.apply(name, images, 1),
        robustness.apply(name, images, 1),
        robustness.apply(name, images, 2),
    )
    assert torch.equal(one, again) and one.dtype == torch.uint8 and one.shape == images.shape
    assert not torch.equal(one, images) or name == "inverted"  # inverted: read back by predict's preprocessing
    change = [(s.float() - images.float()).abs().mean().item() for s in (one, two)]
    if name != "inverted":
        assert change[1] > change[0], change


def test_each_shift_changes_the_images_as_named(digits):
    x = digits[0]
    assert ink(robustness.apply("thick", x, 1)) > 1.3 * ink(x) and ink(robustness.apply("thin", x, 1)) < 0.7 * ink(x)
    for name in ("blur", "lowres"):
        assert roughness(robustness.apply(name, x, 1)) < 0.8 * roughness(x)
        assert abs(ink(robustness.apply(name, x, 1)) / ink(x) - 1) < 0.05  # ink spread, not lost
    for name in ("rotate", "shear", "elastic"):
        assert abs(ink(robustness.apply(name, x, 1)) / ink(x) - 1) < 0.1
    moved = (centre(robustness.apply("offcentre", x, 1)) - centre(x)).norm(dim=1)
    assert 3.0 < moved.median().item() < 5.0  # 4 pixels
    assert ink(robustness.apply("small", x, 1)) < 0.6 * ink(x) < ink(x) < ink(robustness.apply("large", x, 1))
    background = x == 0
    assert robustness.apply("noise", x, 1)[background].float().mean() > 10  # the black paper is no longer black
    breaks = robustness.apply("breaks", x, 1)
    assert 0.5 * ink(x) < ink(breaks) < 0.95 * ink(x) and (breaks <= x).all()  # ink only taken away


@pytest.mark.slow
def test_a_good_model_still_reads_the_mild_shifts(capsys):
    """The labels stay right: the shipped model reads every severity-1 shift far above chance."""
    code, out, err = run_script(
        "evaluate", [os.path.join(ROOT, "weights", "mnist.pt"), "--subset", "300", "--shifts"], capsys
    )
    assert code == 0, err
    rows = {
        line.rsplit(None, 1)[0]: float(line.rsplit(None, 1)[1])
        for line in out.splitlines()
        if line[:1].isalpha() and line.rsplit(None, 1)[-1].replace(".", "").isdigit()
    }
    assert len([r for r in rows if r.endswith(" 1") and r not in robustness.FONT_ROWS]) == len(robustness.SHIFTS)
    assert all(acc > 70 for r, acc in rows.items() if r.endswith(" 1")), rows
    assert rows["clean"] > 98 and rows["clean"] > rows["mean over shifts"]
    import fontdigits

    if fontdigits.find_fonts():  # other writers' digits: read well, though worse than MNIST's own
        assert 85 < rows["fonts 1"] < rows["clean"] and rows["mean over fonts"] > 80, rows
    else:
        assert "the handwriting-font rows need the fonts: sudo apt-get install" in out


def test_the_font_rows_say_how_to_install_the_fonts_where_none_are(digits, monkeypatch):
    import fontdigits

    monkeypatch.setattr(fontdigits, "find_fonts", lambda: [])
    images, labels = digits[0][:4], digits[1][:4]
    rows, note = robustness.suite(images, labels, list("0123456789"))
    assert [r for r, _, _ in rows if r in robustness.FONT_ROWS] == [] and "apt-get install fonts-" in note
    rows, note = robustness.suite(images, labels, ["cat", "dog"])  # no digits: no font rows, nothing to say
    assert note is None


def test_unknown_shift_is_refused():
    with pytest.raises(ValueError, match="unknown shift 'sideways'"):
        robustness.apply("sideways", torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 1)


def test_new_augmentations_draw_only_when_on_and_resume_exactly():
    assert Augment().DRAWS == 10  # older recipes keep their random streams
    aug = Augment(0, 0, 0, stroke=(1.0, 1.0), blur=(0.5, 1.0), lowres=(0.5, 1.0), elastic=(0.5, 1.0), noise=(0.5, 1.0))
    assert aug.DRAWS == 10 + 2 + 2 + 2 + 33 + 3
    x, y = load_split("mnist", "test")
    x, y = x[:96], y[:96]
    b = Batches(x, y, 32, 0.1307, 0.3081, shuffle=True, seed=3, augment=aug)
    whole = [xb for xb, _ in b.epoch(1)]
    assert torch.equal(torch.cat(whole[1:]), torch.cat([xb for xb, _ in b.epoch(1, start=1)]))  # resume mid-epoch
    ranks = [
        [
            xb
            for xb, _ in Batches(
                x, y, 32, 0.1307, 0.3081, shuffle=True, seed=3, augment=aug, rank=r, world_size=2
            ).epoch(1)
        ]
        for r in range(2)
    ]
    for w, a, c in zip(whole, *ranks):  # two ranks augment their halves as one process would
        assert torch.equal(torch.cat([a, c]), w)
    plain = Batches(x, y, 32, 0.1307, 0.3081, shuffle=True, seed=3, augment=Augment(0, 0, 0))
    assert not torch.equal(whole[0], next(plain.epoch(1))[0])


def test_noise_augmentation_adds_grain_like_the_noise_shift():
    """Grain on the black paper, different per image, of about the noise shift's strength at S = 1."""
    x = load_split("mnist", "test")[0][:64].float() / 255
    out = Augment(0, 0, 0, noise=(1.0, 1.0))(x, torch.Generator().manual_seed(0))
    paper = x == 0
    grain = out[paper].mean().item()
    shifted = robustness.apply("noise", (x * 255).to(torch.uint8), 1).float()[paper].mean().item() / 255
    assert 0.3 * shifted < grain < 3 * shifted and not torch.equal(out[0] - x[0], out[1] - x[1])
    assert out.min() >= 0 and out.max() <= 1


def test_stroke_augmentation_thickens_or_thins():
    x = load_split("mnist", "test")[0][:200].float() / 255
    out = Augment(0, 0, 0, stroke=(1.0, 1.0))(x, torch.Generator().manual_seed(0))
    per_image = out.mean((1, 2, 3)) / x.mean((1, 2, 3))
    assert (per_image > 1.05).any() and (per_image < 0.95).any()
