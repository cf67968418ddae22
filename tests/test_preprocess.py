"""preprocess.py: reading images (the listed formats only, EXIF orientation, any bit depth, sizes
checked before decoding) and turning a drawing or photo into an MNIST-style digit."""

import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from cli import UserError
from conftest import ROOT, as_photo, capture, digit_png, main_of, one_line
from preprocess import FORMAT_NAMES, read_gray, to_mnist


def test_a_photo_is_turned_upright_as_its_exif_tag_says(tmp_path):
    """Phones save portrait photos sideways with an orientation tag (6: turn 90 degrees clockwise)."""
    from preprocess import read_gray

    wide = Image.new("L", (40, 20), 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    wide.save(tmp_path / "phone.jpg", exif=exif)
    assert read_gray(str(tmp_path / "phone.jpg")).shape == (40, 20)  # upright: 40 high, 20 wide


def test_preprocessing_recovers_an_mnist_like_digit(mnist_test):
    images, _ = mnist_test
    original = images[0, 0]
    recovered = to_mnist(torch.from_numpy(__import__("numpy").array(as_photo(original))).float() / 255)
    assert recovered.shape == (28, 28) and recovered.dtype == torch.uint8
    # Same place and shape as the original, up to the blur of enlarging and shrinking.
    diff = (recovered.float() - original.float()).abs().mean()
    assert diff < 25, diff


def test_a_blown_up_coarse_digit_is_read_at_its_own_resolution(mnist_test, monkeypatch):
    """An 8x8 digit enlarged by repeating pixels (16 to a side) is taken back to its 8x8 grid, so that
    the resize to MNIST's 20x20 draws it smooth instead of as a staircase of blocks; photos, drawings
    and small enlargements are left as they are."""
    import torch.nn.functional as F

    from preprocess import native_grid

    digit = mnist_test[0][0:1].float() / 255
    coarse = F.interpolate(digit, size=(8, 8), mode="area")[0, 0]
    blocky = 1 - coarse.repeat_interleave(16, 0).repeat_interleave(16, 1)  # dark on white, 128x128
    torch.testing.assert_close(native_grid(blocky), 1 - coarse)

    def kinks(x):  # second differences: a staircase's flat runs and jumps have many, a smooth ramp few
        x = x.float()
        return (x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]).abs().sum() + (x[2:] - 2 * x[1:-1] + x[:-2]).abs().sum()

    mended = to_mnist(blocky)
    import preprocess

    monkeypatch.setattr(preprocess, "native_grid", lambda gray: gray)
    assert kinks(mended) < 0.8 * kinks(to_mnist(blocky))  # 0.64-0.73 on the first five test digits
    photo = torch.rand(64, 64)
    assert native_grid(photo) is photo
    twice = 1 - digit[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1)  # blocks of 2: a fine scan
    assert native_grid(twice) is twice


def test_an_eps_file_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    """Pillow reads EPS by running Ghostscript; it must never be asked to."""
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: pytest.fail("Ghostscript was looked for"))
    eps = tmp_path / "x.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 14 2 moveto 14 26 lineto stroke\n")
    code, line = one_line(lambda: main_of("predict", [str(eps)]))
    assert code == 1 and f"is not an image this reads; give a {FORMAT_NAMES} file" in line


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_listed_format_is_read(tmp_path, fmt):
    from PIL import Image

    path = tmp_path / f"one.{fmt.lower()}"
    Image.open(digit_png(tmp_path / "one.png")).convert("L").save(path, fmt)
    assert to_mnist(read_gray(str(path))).max() == 255


def test_an_unlisted_format_pillow_knows_is_refused(tmp_path):
    from PIL import Image

    path = tmp_path / "one.ico"
    Image.open(digit_png(tmp_path / "one.png")).save(path, "ICO")
    with pytest.raises(UserError, match=f"give a {FORMAT_NAMES} file"):
        read_gray(str(path))


@pytest.mark.parametrize("kind", ["uint16 png", "int32 tiff", "float32 tiff"])
def test_deep_images_are_scaled_by_their_range(tmp_path, kind):
    """A faint scan: paper at 3000 and ink at 200 of 65535 (or the same as 32-bit integers or floats)
    clipped to 8 bits would be white on white; scaled by its own range it is a clear stroke."""
    import numpy as np
    from PIL import Image

    dtype, ext = {
        "uint16 png": (np.uint16, "png"),
        "int32 tiff": (np.int32, "tif"),
        "float32 tiff": (np.float32, "tif"),
    }[kind]
    pixels = np.full((64, 64), 3000, dtype)
    pixels[8:56, 28:36] = 200
    if dtype is np.float32:
        pixels = pixels / 65535
    path = str(tmp_path / f"faint.{ext}")
    Image.fromarray(pixels).save(path)
    gray = read_gray(path)
    assert gray.min() == 0 and gray.max() == 1
    digit = to_mnist(gray)
    assert digit.max() == 255 and (digit > 128).sum() > 20


def png_declaring(width, height):
    """A 60-byte PNG whose header declares WIDTH x HEIGHT pixels: what a decompression bomb shows first."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "side,message",
    [
        (20000, "declares more pixels than this reads"),  # Pillow's own guard
        (6000, "declares 6000x6000 pixels, more than the 25,000,000 this reads"),
    ],
)
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, side, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(side, side))
    t0 = time.perf_counter()
    code, _, err = capture(lambda: main_of("predict", [str(path)]))
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and time.perf_counter() - t0 < 5


def tiff_claiming(samples, width=40, height=40):
    """An uncompressed 8-bit TIFF whose header claims SAMPLES values a pixel (one is right)."""
    import struct

    entries = [
        (256, 3, width),
        (257, 3, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, samples),
        (278, 3, height),
        (279, 4, width * height),
    ]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = b"".join(
        struct.pack("<HHII", tag, kind, 1, data_at if tag == 273 else value)
        if kind == 4
        else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in entries
    )
    return (
        b"II*\0"
        + struct.pack("<I", 8)
        + struct.pack("<H", len(entries))
        + ifd
        + b"\0\0\0\0"
        + b"\xff" * (width * height)
    )


def test_pillow_and_its_libtiff_print_nothing_around_the_one_line(tmp_path):
    """A size past Pillow's own bomb limit (a Python warning), a TIFF claiming 72 samples a pixel (a
    record of Pillow's logger) and an LZW TIFF with damaged codes (libtiff, writing from C): each is
    refused with a UserError and nothing else on stderr. In a fresh process: its stderr is the real one."""
    from PIL import Image, ImageDraw

    (tmp_path / "big.png").write_bytes(png_declaring(10000, 10000))
    (tmp_path / "samples.tif").write_bytes(tiff_claiming(72))
    image = Image.new("L", (40, 40), 255)
    ImageDraw.Draw(image).line([(20, 4), (20, 36)], fill=0, width=4)
    image.save(tmp_path / "lzw.tif", compression="tiff_lzw")
    raw = bytearray((tmp_path / "lzw.tif").read_bytes())
    raw[8:60] = bytes(b ^ 0x55 for b in raw[8:60])  # the strip's codes, just after the 8-byte header
    (tmp_path / "lzw.tif").write_bytes(raw)
    script = (
        "import sys; from cli import UserError; from preprocess import read_gray\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n        read_gray(path)\n    except UserError as e:\n        print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *(str(tmp_path / f) for f in ("big.png", "samples.tif", "lzw.tif"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and "declares 10000x10000 pixels" in lines[0], lines
    assert "is not an image this reads" in lines[1] and "cannot be read (decoder error" in lines[2], lines
