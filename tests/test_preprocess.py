"""preprocess.py: reading images (the listed formats only, EXIF orientation, any bit depth, sizes,
scans and tiles checked before decoding, regular files only) and turning a drawing or photo into an
MNIST-style digit."""

import os
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

from cli import UserError
from conftest import ROOT, as_photo, capture, digit_png, main_of, one_line
from preprocess import FORMAT_NAMES, MAX_SCANS, read_gray, to_mnist


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


def progressive_jpeg(path, repeats=0, between=b"", side=None, comment=None):
    """A progressive JPEG of a one (libjpeg writes 10 scans for colour) with its first scan repeated
    REPEATS more times, BETWEEN after each copy (libjpeg warns about a repeated scan and decodes it
    again), declaring SIDExSIDE pixels if SIDE is given; COMMENT goes into a COM segment."""
    import io
    import re
    import struct

    out = io.BytesIO()
    Image.open(digit_png(path.with_suffix(".png"))).convert("RGB").save(
        out, "JPEG", progressive=True, **({"comment": comment} if comment else {})
    )
    raw = out.getvalue()
    at, sof = 2, None  # segment by segment, by their lengths, to the first scan's header (SOS, FF DA)
    while raw[at + 1] != 0xDA:
        sof = at if raw[at + 1] == 0xC2 else sof  # the progressive frame header
        at += 2 + int.from_bytes(raw[at + 2 : at + 4], "big")
    coded = at + 2 + int.from_bytes(raw[at + 2 : at + 4], "big")
    end = re.compile(rb"\xff[^\x00\xd0-\xd7]").search(raw, coded).start()  # the scan's coded data ends at a marker
    raw = bytearray(raw[:end] + (raw[at:end] + between) * repeats + raw[end:])
    if side:
        struct.pack_into(">HH", raw, sof + 5, side, side)  # SOF2: marker, length, precision, height, width
    path.write_bytes(raw)
    return str(path)


@pytest.mark.parametrize(
    "repeats,between,message",
    [
        (200, b"", f"of more than {MAX_SCANS} scans (a progressive one has about 10)"),
        (200, b"\xff\xd0\xff\xff\xff\xfe\x00\x04\xff\xda", f"of more than {MAX_SCANS} scans"),
        (1, b"\xff\xfe\x00\x02" * 10_001, "of more than 10,000 segments (a camera's has tens)"),
    ],
    ids=["scans back to back", "scans behind RST0, fill, COM", "empty comments"],
)
def test_a_jpeg_of_hundreds_of_scans_is_refused_before_decoding(tmp_path, monkeypatch, repeats, between, message):
    """libjpeg decodes every scan a file holds over the whole image it declares, only warning when one
    repeats another: 3,000 scans in a 290 KB file declaring 5000x5000 took 46 s. Counted from the
    markers, as libjpeg finds them (past restart markers, fill bytes and comments), before it reads any;
    the walk itself is bounded too."""
    from PIL import ImageFile

    path = progressive_jpeg(tmp_path / "scans.jpg", repeats=repeats, between=between, side=5000)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("the JPEG was decoded"))
    with pytest.raises(UserError) as refused:
        read_gray(path)
    assert str(refused.value).startswith(f"{path} is a JPEG {message}")
    assert str(refused.value).endswith("; save it again from an image editor")


def test_a_progressive_jpeg_is_read_and_scan_markers_in_a_comment_do_not_count(tmp_path):
    """Up to MAX_SCANS scans are decoded (here 10 and 90 repeats); the bytes of 300 scan markers inside a
    comment are skipped with it, as libjpeg skips them: only real scans count."""
    plain = read_gray(digit_png(tmp_path / "one.png"))
    for path in (
        progressive_jpeg(tmp_path / "many.jpg", repeats=MAX_SCANS - 10),
        progressive_jpeg(tmp_path / "comment.jpg", comment=b"\xff\xda\x00\x08\x01\x01\x00\x00\x00\x00" * 300),
    ):
        gray = read_gray(path)
        assert gray.shape == plain.shape and (gray - plain).abs().mean() < 0.02, path


def tiled_tiff(pixels, tile, stored=None, as_strips=False):
    """A deflate TIFF of 8-bit grey PIXELS (uint8 [H, W]) in tiles TILE (width, height), padded at the
    edges; STORED replaces each tile's compressed bytes (then no tile is made); AS_STRIPS files the
    tiles under StripOffsets and StripByteCounts instead of TileOffsets and TileByteCounts."""
    import struct
    import zlib

    h, w = pixels.shape
    tw, th = tile
    tiles = []
    for y in range(0, h, th):
        for x in range(0, w, tw):
            if stored is None:
                block = torch.zeros(th, tw, dtype=torch.uint8)
                part = pixels[y : y + th, x : x + tw]
                block[: part.shape[0], : part.shape[1]] = part
            tiles.append(stored if stored is not None else zlib.compress(block.numpy().tobytes()))
    n = len(tiles)
    at = 8 + 2 + 12 * 10 + 4  # after the header and an IFD of 10 entries: the offsets, the byte counts, the tiles
    offsets = [at + 8 * n + sum(map(len, tiles[:i])) for i in range(n)]
    counts = [len(t) for t in tiles]
    # one value is stored in its entry, more where the entry points
    offsets_value, counts_value = (offsets[0], counts[0]) if n == 1 else (at, at + 4 * n)
    entries = [
        (256, 4, 1, w),
        (257, 4, 1, h),
        (258, 3, 1, 8),
        (259, 3, 1, 8),  # Adobe deflate
        (262, 3, 1, 1),  # black is zero
        (277, 3, 1, 1),
        (322, 4, 1, tw),
        (323, 4, 1, th),
        (273 if as_strips else 324, 4, n, offsets_value),
        (279 if as_strips else 325, 4, n, counts_value),
    ]
    ifd = b"".join(struct.pack("<HHII", *e) if e[1] == 4 else struct.pack("<HHIHH", *e, 0) for e in sorted(entries))
    return (
        b"II*\0"
        + struct.pack("<IH", 8, len(entries))
        + ifd
        + b"\0\0\0\0"
        + struct.pack(f"<{2 * n}I", *offsets, *counts)
        + b"".join(tiles)
    )


@pytest.mark.parametrize(
    "tile,as_strips",
    [((65536, 4096), False), ((4096, 4096), False), ((65536, 4096), True)],
    ids=["past the pixel bound", "far past the image", "beside StripOffsets"],
)
def test_a_tiff_declaring_tiles_far_larger_than_its_image_is_refused_before_decoding(
    tmp_path, monkeypatch, tile, as_strips
):
    """libtiff allocates a whole tile at a time, as large as it is declared: a 1 MB file of one 65536x16384
    tile had it allocate 1 GB for a 64x64 image. It takes an image for tiled by the tile size alone,
    even beside StripOffsets, where Pillow sees strips."""
    import zlib

    from PIL import TiffImagePlugin

    path = tmp_path / "tiles.tif"
    path.write_bytes(
        tiled_tiff(torch.zeros(64, 64, dtype=torch.uint8), tile, stored=zlib.compress(bytes(4096)), as_strips=as_strips)
    )
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "load", lambda self: pytest.fail("the TIFF was decoded"))
    with pytest.raises(UserError) as refused:
        read_gray(str(path))
    assert str(refused.value) == (
        f"{path} declares TIFF tiles of {tile[0]}x{tile[1]} pixels for a 64x64 image; "
        f"save it again without tiles or with smaller ones"
    )


@pytest.mark.parametrize("layout", ["16x16 tiles", "one 256x256 tile", "one strip of 2**32-1 rows"])
def test_a_tiled_or_striped_tiff_is_read(tmp_path, layout):
    """Tiles larger than a small image are common (256 a side), and RowsPerStrip 2**32-1 means one strip:
    neither is refused."""
    import io
    import struct

    pixels = torch.randint(0, 256, (40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if layout.endswith("rows"):
        out = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(out, "TIFF", compression="tiff_adobe_deflate")
        raw = bytearray(out.getvalue())
        ifd = struct.unpack_from("<I", raw, 4)[0]
        entry = next(
            ifd + 2 + 12 * i for i in range(raw[ifd]) if struct.unpack_from("<H", raw, ifd + 2 + 12 * i)[0] == 278
        )
        struct.pack_into("<HHII", raw, entry, 278, 4, 1, 2**32 - 1)
    else:
        raw = tiled_tiff(pixels, (16, 16) if layout.startswith("16") else (256, 256))
    (tmp_path / "image.tif").write_bytes(raw)
    assert torch.equal(read_gray(str(tmp_path / "image.tif")), pixels.float() / 255)


def without_waiting(call, fifo):
    """What CALL raises (None if nothing), run in a thread; should it still be waiting after 5 s (on
    opening FIFO), a writer comes and goes, so that the thread ends, and the test fails."""
    import threading

    raised = [None]

    def run():
        try:
            call()
        except Exception as e:
            raised[0] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the waiting open has its writer, then an end
        thread.join(5)
        pytest.fail(f"reading {fifo} waited for a writer")
    return raised[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX FIFOs and devices")
def test_a_pipe_or_a_device_named_like_an_image_is_refused_without_opening_it(tmp_path):
    """Opening a FIFO waits for a writer, and /dev/zero never ends: x.png in a folder given to predict.py
    or in a class folder (userdata.read_class_folders) is opened only if it is a regular file, as a link
    to one still is."""
    import userdata

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    error = without_waiting(lambda: read_gray(str(fifo)), fifo)
    assert isinstance(error, UserError), error
    assert str(error) == f"{fifo} is a named pipe, not a regular file; give a file saved on disk"
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(UserError, match="zero.png is a link to a device, not a regular file; give a file saved"):
        read_gray(str(tmp_path / "zero.png"))
    (tmp_path / "link.png").symlink_to(digit_png(tmp_path / "one.png"))
    assert read_gray(str(tmp_path / "link.png")).shape == (64, 64)

    for name in ("a", "b"):
        (tmp_path / "set" / name).mkdir(parents=True)
        digit_png(tmp_path / "set" / name / "one.png")
    piped = tmp_path / "set" / "b" / "x.png"
    os.mkfifo(piped)
    # userdata may look at the file itself before preprocess does: either way one line naming it, no wait
    error = without_waiting(lambda: userdata.read_class_folders(str(tmp_path / "set")), piped)
    assert getattr(error, "user_error", False) and "\n" not in str(error), error
    assert str(error).startswith(str(piped)) and "named pipe" in str(error), error
