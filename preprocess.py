"""Images from outside the datasets (photos, drawings, uploads, your class folders) as a model's input.

    gray = read_gray("my_digit.png")          # or read_gray(png_bytes, name="upload"); listed formats only
    x = to_mnist(gray)                        # uint8 [28, 28], white ink on black, centred by mass
    x = to_input(gray, ckpt["data"]["rule"])  # by the rule the checkpoint was trained with
    probs = classify(model, ckpt, x[None])    # [1, classes] softmax, normalized as the checkpoint was

predict.py, demo.py and userdata.py's class folders all go through these, so an image is read the
same way everywhere, and a file that would make a decoder wait, work or allocate without end (a pipe
named like an image, a JPEG of thousands of scans, a TIFF tile of a gigabyte) is refused first.
"""

import io
import math
import os
import re
import warnings
from functools import cache

import torch
import torch.nn.functional as F

from cli import UserError, open_input
from data import dilate, normalize

# The formats read, and no others: each is decoded by Pillow's own code or a library built into it,
# never by an external program (Pillow reads EPS by running Ghostscript, a PostScript interpreter).
# (A phone photo with a second picture inside opens as JPEG and reports itself as "MPO".)
FORMATS = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "BMP": (".bmp",),
    "GIF": (".gif",),
    "WEBP": (".webp",),
    "TIFF": (".tif", ".tiff"),
}
FORMAT_NAMES = "PNG, JPEG, BMP, GIF, WebP or TIFF"
IMAGE_TYPES = tuple(ext for exts in FORMATS.values() for ext in exts)  # file name endings, for folders
MIME_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/gif", "image/webp", "image/tiff")  # uploads
MIN_SIDE = 8  # smaller images hold too little of a drawing to be fitted into 20x20
MAX_PIXELS = 25_000_000  # 5000x5000: a phone photo fits; a small file declaring more is a decompression bomb
MAX_SIDE = 1024  # images are shrunk to this at once: the digit ends up 20 pixels high anyway
# libjpeg's progressive mode writes 10 scans for a colour image (6 for grey), and no encoder many more; but its
# decoder reads every scan a file holds, each over the whole image, warning only when one repeats another: a 290 KB
# file declaring 5000x5000 with 3,000 scans takes most of a minute. libtiff stops a JPEG inside a TIFF at 100 scans.
MAX_SCANS = 100
MAX_SEGMENTS = 10_000  # a JPEG's marker segments (restarts apart): a real one has tens; each costs the walk a step
# A TIFF tile need cover no more than its image (writers use 256 or 512 a side and pad to a multiple of 16), but
# libtiff allocates a whole tile however large it is declared, up to 2 GB: one past a megapixel and 4 times the
# image is refused. (A strip needs no bound: libtiff cuts one to the image's rows, and RowsPerStrip 2**32-1 is legal.)
MAX_TILE_PIXELS = 1 << 20
# A JPEG marker that a length follows, after any fill bytes (FF): not a stuffed 00, TEM (01), RSTn or a stray SOI
JPEG_MARKER = re.compile(rb"\xff+([^\x00\x01\xd0-\xd8\xff])")


def read_gray(source, name=None):
    """An image file (a path, or its bytes) as a float tensor [H, W] on 0..1, at most MAX_SIDE a side.
    A path is opened only if it is a regular file; only FORMATS are decoded; the pixel count, a JPEG's
    scans and a TIFF's tiles are checked from the file before anything is decoded; a JPEG is decoded
    straight at a fraction of its size where that suffices. Transparent areas count as
    white paper; 16-bit, 32-bit and float images are scaled to 0..1 by their own range."""
    from PIL import Image, UnidentifiedImageError

    name = name or (source if isinstance(source, str) else "the image")
    quiet_pillow()
    try:
        gray = decode(source, name)
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image this reads; give a {FORMAT_NAMES} file") from None
    except Image.DecompressionBombError:
        raise UserError(f"{name} declares more pixels than this reads; give a smaller image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # what Pillow's decoders raise on broken data
        raise UserError(f"{name} cannot be read ({e}); check that the file is whole") from None
    h, w = gray.shape
    if min(w, h) < MIN_SIDE:
        raise UserError(f"{name} is only {w}x{h} pixels; give an image at least {MIN_SIDE}x{MIN_SIDE}")
    return gray


def decode(source, name):
    """read_gray's decoding, within its checks: a path only if it is a regular file, the pixel count
    from the header, a TIFF's tiles and a JPEG's scans first, then a JPEG drafted at a fraction of its
    size, any image shrunk to MAX_SIDE and turned upright."""
    from PIL import Image, ImageOps

    f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open_input(source)[0]
    with f, Image.open(f, formats=list(FORMATS)) as im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise UserError(
                f"{name} declares {w}x{h} pixels, more than the {MAX_PIXELS:,} this reads; give a smaller image"
            )
        if im.format == "TIFF":
            check_tiles(im, name)
        if im.format in ("JPEG", "MPO"):
            check_scans(f, name)
            im.draft("RGB" if im.mode not in ("L", "1") else "L", (MAX_SIDE, MAX_SIDE))
        im.load()
        im = ImageOps.exif_transpose(im)  # a phone stores a portrait photo sideways, plus a tag saying so
        im.thumbnail((MAX_SIDE, MAX_SIDE))
        return gray_values(im)


def check_tiles(im, name):
    """Refuse a TIFF (a Pillow image, opened, not decoded) whose tiles are declared far larger than its
    image: libtiff allocates a whole tile at a time. The tags count even beside StripOffsets, as
    libtiff takes the image for tiled then."""
    tile_w, tile_h = im.tag_v2.get(322), im.tag_v2.get(323)  # TileWidth, TileLength
    if not (isinstance(tile_w, int) and isinstance(tile_h, int)):
        return  # not tiled; a tile size of more than one number libtiff refuses itself
    w, h = im.size
    if tile_w * tile_h > min(MAX_PIXELS, max(MAX_TILE_PIXELS, 4 * w * h)):
        raise UserError(
            f"{name} declares TIFF tiles of {tile_w}x{tile_h} pixels for a {w}x{h} image; "
            f"save it again without tiles or with smaller ones"
        )


def check_scans(f, name):
    """Refuse a JPEG (file F, left where it was) whose first image has more than MAX_SCANS scans or
    MAX_SEGMENTS marker segments, before libjpeg reads any. The markers are walked as libjpeg walks
    them: each segment skipped by its length, the bytes after it (a scan's coded data, or junk that
    libjpeg warns about and passes) searched for the next marker, up to EOI or the end of the file."""
    start, scans, segments = f.tell(), 0, 0
    try:
        f.seek(2)  # past SOI
        while (marker := next_marker(f)) not in (None, 0xD9):
            scans += marker == 0xDA
            segments += 1
            if scans > MAX_SCANS:
                raise UserError(
                    f"{name} is a JPEG of more than {MAX_SCANS} scans (a progressive one has about 10); "
                    f"save it again from an image editor"
                )
            if segments > MAX_SEGMENTS:
                raise UserError(
                    f"{name} is a JPEG of more than {MAX_SEGMENTS:,} segments (a camera's has tens); "
                    f"save it again from an image editor"
                )
            length = int.from_bytes(f.read(2), "big")
            f.seek(max(length - 2, 0), 1)  # libjpeg skips nothing for a length under 2, and goes on
    finally:
        f.seek(start)


def next_marker(f):
    """The code of the next JPEG marker that a length follows in file F (None at its end), F left just
    after it. Read in growing pieces: markers are mostly near, a scan's coded data can be megabytes."""
    size, carry = 4096, b""
    while piece := f.read(size):
        piece = carry + piece
        if found := JPEG_MARKER.search(piece):
            f.seek(found.end() - len(piece), 1)
            return found[1][0]
        carry = b"\xff" if piece.endswith(b"\xff") else b""  # a marker split between two pieces
        size = min(2 * size, 1 << 20)
    return None


@cache  # once a process
def quiet_pillow():
    """Stop Pillow's warnings, its logger and the libtiff inside Pillow from printing about a damaged
    file (corrupt EXIF, a size past Pillow's own bomb limit, which MAX_PIXELS refuses first): their
    lines would surround the one line a bad image gets, and what is wrong reaches read_gray as an
    exception anyway. The warnings filter names Pillow's modules only, so other warnings still show,
    in every thread. libtiff writes from C, through handlers unset here on the copy Pillow loaded,
    found in /proc/self/maps (Linux; elsewhere its lines stay)."""
    import ctypes
    import logging

    import PIL.Image  # noqa: F401  (loads Pillow's C core, and libtiff with it)

    warnings.filterwarnings("ignore", module=r"PIL\.")
    logging.getLogger("PIL").addHandler(logging.NullHandler())  # else logging's last resort prints errors
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if os.path.basename(line.split()[-1]).startswith("libtiff")}
    except OSError:
        paths = set()
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # the copy already loaded: dlopen hands back the same library
            for setter in (
                "TIFFSetErrorHandler",
                "TIFFSetErrorHandlerExt",
                "TIFFSetWarningHandler",
                "TIFFSetWarningHandlerExt",
            ):
                getattr(lib, setter)(None)
        except (OSError, AttributeError):  # not libtiff after all, or one without those functions
            pass


def gray_values(im):
    """A Pillow image as grey levels, a float tensor [H, W] on 0..1. Images of more than 8 bits a pixel
    (16- and 32-bit integers, floats) are scaled by their own darkest and brightest pixel: clipped to
    8 bits instead, a faint 16-bit scan would read as blank."""
    from PIL import Image

    w, h = im.size
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        x = torch.frombuffer(bytearray(im.convert("F").tobytes()), dtype=torch.float32).view(h, w)
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = x.min(), x.max()
        return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return torch.frombuffer(bytearray(im.convert("L").tobytes()), dtype=torch.uint8).view(h, w).float() / 255


def to_mnist(gray, path="image"):
    """A float image [H, W] on 0..1 as MNIST would have it: uint8 [28, 28], white ink on black."""
    gray = native_grid(gray)
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    paper = border.median()
    if paper > 0.5:  # dark ink on light paper: make the ink bright
        gray, paper = 1 - gray, 1 - paper
    ink = ((gray - paper) / (1 - paper).clamp(min=1e-3)).clamp(0, 1)  # the paper's own shade becomes 0
    mask = ink > 0.25 * ink.max()
    if ink.max() < 0.15 or not mask.any():
        raise UserError(f"{path} looks blank: no strokes stand out from the background")
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    ink = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]  # crop to the ink
    h, w = ink.shape
    scale = 20 / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    patch = F.interpolate(ink[None, None], size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0]
    # MNIST strokes are saturated at their core; a thin pen shrunk many times over comes out faint.
    patch = (patch / patch.max()).clamp(0, 1)
    # Centre of mass in pixel-centre coordinates, then the shift that puts it at (14, 14).
    total = patch.sum()
    cy = (patch.sum(1) * (torch.arange(size[0]) + 0.5)).sum() / total
    cx = (patch.sum(0) * (torch.arange(size[1]) + 0.5)).sum() / total
    top = min(max(round(14 - cy.item()), 0), 28 - size[0])
    left = min(max(round(14 - cx.item()), 0), 28 - size[1])
    canvas = torch.zeros(28, 28)
    canvas[top : top + size[0], left : left + size[1]] = patch
    return widen_thin_strokes(canvas).mul(255).round().to(torch.uint8)


def native_grid(gray, step=0.08):
    """A blocky image (a coarse scan or an 8x8 or 16x16 digit blown up by repeating pixels) at the
    resolution it really has, one pixel a block; any other image as it is. Resized as it comes, a
    blown-up 8x8 digit stays a staircase of hard-edged blocks that no MNIST digit looks like; from its
    own few pixels, the resize to 20x20 draws it smooth, as a blurred MNIST digit. Blocks are found as
    the common divisor of the places where rows and columns change (by more than STEP, so that a
    compressed file's faint ripples do not count), if it is 3 pixels or more in both directions."""
    sizes = []
    for axis in (0, 1):
        changes = ((gray.diff(dim=axis).abs() > step).any(dim=1 - axis)).nonzero().squeeze(1) + 1
        if len(changes) < 3:
            return gray
        block = math.gcd(*changes.tolist())
        sizes.append((block, changes[0].item() % block))
    (bh, oh), (bw, ow) = sizes
    if min(bh, bw) < 3:
        return gray
    # the centre of each block, from the first whole one; a part block at an edge adds nothing
    return (
        gray[oh + bh // 2 :: bh, ow + bw // 2 :: bw].contiguous()
        if min(gray.shape) // max(bh, bw) >= MIN_SIDE // 2
        else gray
    )


def fit_square(gray):
    """The rule for images of a user's own class folders, the same in training and prediction: a float
    image [H, W] on 0..1 padded to a square with its own background (the median of its border), so
    its aspect is kept, then resized to uint8 [28, 28]. Unlike to_mnist, nothing is inverted,
    cropped or centred: the data's own look is what the model learns."""
    h, w = gray.shape
    side = max(h, w)
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    canvas = torch.full((side, side), float(border.median()))
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top : top + h, left : left + w] = gray
    small = F.interpolate(canvas[None, None], size=(28, 28), mode="bilinear", antialias=side > 28, align_corners=False)
    return small[0, 0].clamp(0, 1).mul(255).round().to(torch.uint8)


def to_input(gray, rule, path="image"):
    """A float image as the model's uint8 [28, 28] input, by the rule its checkpoint records."""
    return fit_square(gray) if rule == "fit" else to_mnist(gray, path)


def widen_thin_strokes(canvas):
    """MNIST's strokes are 2-3 pixels wide at this size; a fine pen's come out one pixel wide, which
    models read much worse. Strokes that thin (their ink nearly doubles when widened by a pixel)
    are widened once; wider ones are left alone."""
    ink = (canvas > 0.5).sum()
    wider = dilate(canvas[None, None], 2)[0, 0]
    return wider if ink > 0 and (wider > 0.5).sum() > 1.9 * ink else canvas


def classify(model, ckpt, inputs):
    """Softmax probabilities [N, classes] of uint8 images [N, 28, 28], on the model's device and
    normalized with the checkpoint's mean and std."""
    device = next(model.parameters()).device
    x = normalize(inputs.unsqueeze(1).to(device), ckpt["data"]["mean"], ckpt["data"]["std"])
    with torch.inference_mode():
        return model(x).float().softmax(1).cpu()
