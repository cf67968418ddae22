"""fontdigits.py: the held-out split, seeded check sets shaped as evaluate.py scores them, training
digits, and its command line. Most tests need the handwriting fonts installed and skip without them."""

import os

import pytest
import torch

import fontdigits
from fontdigits import FONT_PACKAGES, HELD_OUT, FontError, check_set, find_fonts, install_hint, split_fonts

FONTS = find_fonts()
TRAINING, HELD = split_fonts(FONTS)
needs_fonts = pytest.mark.skipif(not FONTS, reason=f"no handwriting fonts installed ({install_hint()})")
needs_both = pytest.mark.skipif(
    not (TRAINING and HELD),
    reason="no handwriting fonts installed" if not FONTS else "fonts on only one side of the split installed",
)


def test_install_hint_names_every_package_on_one_line():
    hint = install_hint()
    assert "apt-get install" in hint and "\n" not in hint
    assert all(package in hint.split() for package in FONT_PACKAGES)


def test_without_fonts_list_prints_the_hint_and_drawing_refuses(monkeypatch, capsys):
    monkeypatch.setattr(fontdigits, "find_fonts", lambda: [])
    assert fontdigits.main(["--list"]) == 0
    assert install_hint() in capsys.readouterr().out
    with pytest.raises(FontError, match="apt-get install"):
        check_set([])
    with pytest.raises(FontError, match="apt-get install"):
        fontdigits.training_digits([], 10)
    assert fontdigits.main(["--grid", "never.png"]) == 1 and not os.path.exists("never.png")


def test_a_file_that_is_no_font_draws_no_digits(tmp_path):
    (tmp_path / "fake.ttf").write_bytes(b"not a font")
    assert not fontdigits.draws_digits(str(tmp_path / "fake.ttf"))
    assert find_fonts([str(tmp_path)]) == []


@pytest.mark.skipif(not os.path.exists("/usr/share/fonts/truetype/seto/setofont-ex.ttf"), reason="fonts-seto absent")
def test_a_font_without_digits_is_refused_by_rendering():
    assert not fontdigits.draws_digits("/usr/share/fonts/truetype/seto/setofont-ex.ttf")  # it draws nothing


@needs_fonts
def test_fonts_are_found_sorted_and_the_same_each_time():
    assert FONTS == sorted(FONTS) == find_fonts()
    assert len({f.path for f in FONTS}) == len(FONTS)
    assert {f.family for f in FONTS} <= set(fontdigits.FONTS)


@needs_fonts
def test_the_split_is_disjoint_and_keeps_families_whole():
    assert sorted(TRAINING + HELD) == FONTS
    assert not {f.family for f in TRAINING} & {f.family for f in HELD}
    assert {f.family for f in HELD} <= set(HELD_OUT)
    assert 0.25 <= len(HELD_OUT) / len(fontdigits.FONTS) <= 0.4  # about a third of the families


@needs_fonts
def test_check_set_is_seeded_shaped_and_balanced():
    fonts = (HELD or FONTS)[:2]
    images, labels = check_set(fonts, per_digit=3, seed=0)
    again, _ = check_set(fonts, per_digit=3, seed=0)
    other, _ = check_set(fonts, per_digit=3, seed=1)
    assert images.shape == (len(fonts) * 30, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and torch.bincount(labels, minlength=10).tolist() == [len(fonts) * 3] * 10
    assert torch.equal(images, again) and not torch.equal(images, other)


@needs_fonts
@pytest.mark.parametrize("severity", [1, 2])
def test_every_check_image_has_ink_centred_as_mnist(severity):
    images, _ = check_set(FONTS[::4], per_digit=2, seed=3, severity=severity)
    x = images[:, 0].float()
    assert (x.flatten(1).amax(1) > 200).all()
    mass = x.sum((1, 2))
    at = torch.arange(28) + 0.5
    cy, cx = (x.sum(2) * at).sum(1) / mass, (x.sum(1) * at).sum(1) / mass
    assert ((cy - 14).abs() < 1.5).all() and ((cx - 14).abs() < 1.5).all()


@needs_fonts
def test_scans_are_dark_on_light_and_severity_2_is_another_look():
    fonts = FONTS[:3]
    one, labels = fontdigits.render_scans(fonts, 2, seed=0, severity=1)
    two, _ = fontdigits.render_scans(fonts, 2, seed=0, severity=2)
    assert len(one) == len(labels) == 60 and one[0].dtype == torch.float32
    for scans in (one, two):
        assert all(s.min() >= 0 and s.max() <= 1 and s[0].median() > 0.5 > s.min() for s in scans)
    assert not torch.equal(check_set(fonts, 2, severity=1)[0], check_set(fonts, 2, severity=2)[0])


@needs_fonts
def test_training_digits_are_mnist_style_balanced_and_seeded():
    fonts = TRAINING or FONTS
    images, labels = fontdigits.training_digits(fonts, 2 * 10 * len(fonts), seed=0)
    assert images.shape == (20 * len(fonts), 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [2 * len(fonts)] * 10
    assert (images[:, 0, 0].float().mean() < 5) and (images.flatten(1).amax(1) > 200).all()  # white on black
    again, _ = fontdigits.training_digits(fonts, 50, seed=0)
    assert torch.equal(again, fontdigits.training_digits(fonts, 50, seed=0)[0])
    assert not torch.equal(again, fontdigits.training_digits(fonts, 50, seed=1)[0])


@needs_both
def test_command_line_lists_and_draws(tmp_path, capsys):
    assert fontdigits.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "held out" in out and "training" in out and HELD[0].path in out
    path = tmp_path / "grid.png"
    assert fontdigits.main(["--grid", str(path), "--held-out", "--severity", "2"]) == 0
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 10 * 48
