"""Handwritten-looking digits drawn with the handwriting fonts of a Debian system, offline.

    python fontdigits.py --list                                   # the fonts found; which are held out
    python fontdigits.py --grid grid.png --held-out --severity 2  # what the hardest check scans look like
    training, held_out = split_fonts(find_fonts()); images, labels = check_set(held_out)

check_set() is an external check: digits of writers (fonts) that no model saw, drawn as scans or photos
of ink on paper and read through preprocess.to_mnist, as predict.py reads a photo; uint8 [N, 1, 28, 28]
for evaluate.py. training_digits() draws the other families, more mildly, to add to a training set.
"""

import math
import os
import sys
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from data import blur, low_resolution
from preprocess import to_mnist

# family: (Debian package, file names without their ending; .ttf and .otf both count). Left out:
# fonts-femkeklaver and fonts-cabinsketch, whose digits are hollow outlines or hatching that no pen
# draws; setofont-ex (no digits) and breipfont (Breip's glyphs again); YOzFont's ~130 other files,
# kana variants whose digits are these three. Each of the six Because We fonts is another writer's.
FONTS = {
    f"Because We {w}": ("fonts-bwht", (f"BecauseWe{w}-Regular",))
    for w in ("Build", "Connect", "Create", "Learn", "Mentor", "Organize")
}
FONTS.update(
    {
        "Breip": ("fonts-breip", ("Breip",)),
        "Delphine": ("fonts-sjfonts", ("Delphine",)),
        "Comfortaa": ("fonts-comfortaa", ("Comfortaa-Regular", "Comfortaa-Bold", "Comfortaa-Light")),
        "Comic Neue": (
            "fonts-comic-neue",
            ("ComicNeue-Regular", "ComicNeue-Bold", "ComicNeue-Light", "ComicNeue-Italic"),
        ),
        "Dancing Script": ("fonts-dancingscript", ("DancingScript-Regular", "DancingScript-Bold")),
        "DkgHandwriting": ("fonts-dkg-handwriting", ("dkg", "dkgBd", "dkgIt", "dkgBI")),
        "Humor Sans": ("fonts-humor-sans", ("Humor-Sans",)),
        "Kristi": ("fonts-kristi", ("Kristi",)),
        "Klee One": ("fonts-klee", ("KleeOne-Regular", "KleeOne-SemiBold")),
        "Lobster": ("fonts-lobster", ("lobster",)),
        "Purisa": ("fonts-tlwg-purisa", ("Purisa", "Purisa-Bold")),
        "Rufscript": ("fonts-rufscript", ("Rufscript010",)),
        "SetoFont": ("fonts-seto", ("setofont",)),
        "StayPuft": ("fonts-staypuft", ("StayPuft",)),
        "Steve": ("fonts-sjfonts", ("SteveHand",)),
        "YOzFont": ("fonts-yozvox-yozfont", ("YOzRN_", "YOzBN_", "YOzRNX")),
        "Yusei Magic": ("fonts-yusei-magic", ("YuseiMagic-Regular",)),
    }
)
FONT_PACKAGES = sorted({package for package, _ in FONTS.values()})
FONT_DIRS = (
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    "~/.local/share/fonts",
    "~/.fonts",
    "/Library/Fonts",
    "~/Library/Fonts",
    "C:/Windows/Fonts",
    "~/AppData/Local/Microsoft/Windows/Fonts",
)

# Never used for training: 8 of the 23 families, picked by looking at their digits so that the check
# covers every kind the training side has and some it lacks: fine pens (Breip, Delphine, Kristi),
# round and upright (Steve), felt and marker (Because We Learn, Humor Sans, DkgHandwriting's bold),
# narrow and slanted (Kristi, DkgHandwriting's italic), and the European forms: the crossed 7
# (DkgHandwriting, Delphine, Because We Learn), the 1 with a long flag (Delphine) or flag and foot
# (SetoFont, Because We Learn), the closed-top 4 (Delphine, Kristi, SetoFont). Training keeps a crossed
# 7 (Dancing Script, Because We Create) and flagged 1s (Comic Neue, YOzFont) so those forms are not new.
HELD_OUT = ("Because We Learn", "Breip", "Delphine", "DkgHandwriting", "Humor Sans", "Kristi", "SetoFont", "Steve")


class FontError(Exception):
    """No fonts to draw with; the message says how to install them."""

    user_error = True  # cli.run prints the message as it is, exit status 1


@dataclass(frozen=True, order=True)
class Font:
    family: str
    path: str


def install_hint():
    return f"sudo apt-get install {' '.join(FONT_PACKAGES)}   (Debian, Ubuntu)"


def find_fonts(dirs=None):
    """The installed fonts of FONTS that draw all ten digits, sorted by family and path. A file found
    in two folders counts once, from the first folder; the search is a sorted walk, so deterministic.
    DIRS defaults to FONT_DIRS, or to the folders in MNIST_FONT_DIRS (separated as in PATH; empty: none)
    where it is set: fonts kept elsewhere, or a check of how everything runs without them."""
    if dirs is None:
        listed = os.environ.get("MNIST_FONT_DIRS")
        dirs = FONT_DIRS if listed is None else [d for d in listed.split(os.pathsep) if d]
    wanted = {name.lower(): family for family, (_, names) in FONTS.items() for name in names}
    found = {}
    for top in dirs:
        for folder, subfolders, files in os.walk(os.path.expanduser(top)):
            subfolders.sort()
            for file in sorted(files):
                stem, ext = os.path.splitext(file)
                family = wanted.get(stem.lower())
                if family and ext.lower() in (".ttf", ".otf") and (family, stem.lower()) not in found:
                    found[family, stem.lower()] = Font(family, os.path.join(folder, file))
    return sorted(f for f in found.values() if draws_digits(f.path))


def draws_digits(path):
    """Whether the font at PATH draws 0-9 visibly: each with ink, and no two alike (a font without
    digits draws ten identical boxes, or nothing)."""
    try:
        masks = _glyphs(path)
    except OSError:  # not a font Pillow can open
        return False
    return all(m.sum() >= 40 for m in masks) and all(
        not torch.equal(masks[i], masks[j]) for i in range(10) for j in range(i)
    )


def split_fonts(fonts):
    """(training, held_out): whole families on either side, by HELD_OUT."""
    return [f for f in fonts if f.family not in HELD_OUT], [f for f in fonts if f.family in HELD_OUT]


# ---------------------------------------------------------------------------------------------
# Drawing: each font's glyphs once, as distance fields; then pen, hand, paper and scanner
# ---------------------------------------------------------------------------------------------

SOURCE = 128  # side of the square each glyph is drawn in
GLYPH = 80  # the glyph's height there: the margin leaves room for the widest pen
SIDE = 48  # side of a scan: a digit cropped from a page scanned at about 150 dpi


@cache
def _glyphs(path):
    """The ten digits of a font, bool [10, SOURCE, SOURCE], each scaled to GLYPH pixels high (or
    1.1 GLYPH wide) and centred: fonts' digits differ in size by 2x, a writer's do not."""
    from PIL import Image, ImageDraw, ImageFont

    masks = []
    for d in "0123456789":
        font = ImageFont.truetype(path, 100)
        left, top, right, bottom = font.getbbox(d)
        im = Image.new("L", (SOURCE, SOURCE), 0)
        if right > left and bottom > top:
            scale = min(GLYPH / (bottom - top), 1.1 * GLYPH / (right - left))
            font = font.font_variant(size=max(4, round(100 * scale)))
            left, top, right, bottom = font.getbbox(d)
            xy = ((SOURCE - (right - left)) / 2 - left, (SOURCE - (bottom - top)) / 2 - top)
            ImageDraw.Draw(im).text(xy, d, fill=255, font=font)
        masks.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(SOURCE, SOURCE) > 127)
    return torch.stack(masks)


def _distance(masks, band=16):
    """Euclidean distance from each pixel to the nearest True one of MASKS [B, S, S], exact up to BAND
    (and BAND beyond): squared distances minimised along rows, then columns (Felzenszwalb and
    Huttenlocher's separable form, brute force in the band). No pen here reaches 10 pixels out."""
    far = float(2 * band * band + 1)
    offsets = torch.arange(-band, band + 1, dtype=torch.float32) ** 2
    x = torch.where(masks, 0.0, far)
    for _ in range(2):  # rows, then (transposed) columns
        x = (F.pad(x, (band, band), value=far).unfold(-1, 2 * band + 1, 1) + offsets).amin(-1).transpose(-1, -2)
    return x.sqrt().clamp(max=band)


@cache
def _bank(path):
    """(signed distance to the strokes [10, 1, S, S], negative inside; the font's pen width in pixels,
    2 x area / outline, and its lean, sideways per unit up, from the ink's second moments, both medians
    over the digits; the digits' ink boxes [10, 4]). Thresholding the distance at another level than 0
    draws the same digit with a wider or narrower pen."""
    masks = _glyphs(path)
    sdf = (_distance(masks) - _distance(~masks, band=8)).unsqueeze(1)  # no pen thins a stroke by 8
    area = masks.float().sum((1, 2))
    outline = area - (-F.max_pool2d(-masks.float().unsqueeze(1), 3, 1, 1)).sum((1, 2, 3))  # ink beside paper
    width = (2 * area / outline.clamp(min=1)).median().item()
    w, at = masks.float() / area[:, None, None], torch.arange(SOURCE, dtype=torch.float32)
    dy, dx = at[:, None] - (w * at[:, None]).sum((1, 2), keepdim=True), at - (w * at).sum((1, 2), keepdim=True)
    lean = -((w * dx * dy).sum((1, 2)) / (w * dy * dy).sum((1, 2))).median().item()  # y grows downwards
    cols, rows = masks.any(1).float(), masks.any(2).float()  # argmax finds the first column or row with ink
    box = (
        torch.stack(
            [cols.argmax(1), rows.argmax(1), SOURCE - cols.flip(1).argmax(1), SOURCE - rows.flip(1).argmax(1)], 1
        ).float()
        * 2
        / SOURCE
        - 1
    )  # (x0, y0, x1, y1), -1..1
    return sdf, width, lean, box


@dataclass(frozen=True)
class Look:
    """Ranges the parameters of a drawing are drawn from, uniformly (pen: log-uniformly)."""

    height: tuple  # the digit's height, as a fraction of the canvas
    aspect: float  # its width scaled by exp(+-aspect)
    slant: float  # shear, either way (0.3: about 17 degrees)
    rotate: float  # degrees, either way
    warp: float  # a smooth random warp of up to this fraction of the height: the hand's wobble
    pen: tuple  # pen width over the font's own
    thinnest: float  # but at least this fraction of the height: finer lines blur away in a scan
    paper: tuple  # grey level of the paper
    ink: tuple  # grey level of the ink
    pressure: float  # ink lightened by up to this, smoothly: pen pressure, a drying ballpoint
    tint: float  # uneven light or yellowed paper: darker by up to this across the frame
    coarse: tuple  # scanned so coarsely that the digit is one of these many pixels high (0: not)
    blur: tuple  # Gaussian blur sigmas to pick from, in pixels of a 20-pixel digit (0: none)
    noise: tuple  # sensor noise, std


LOOKS = {  # 0: training_digits; 1 and 2: check sets
    0: Look((0.6, 0.8), 0.1, 0.2, 6, 0.03, (0.7, 1.5), 0.05, (1, 1), (0, 0), 0, 0, (0,), (0,), (0, 0)),
    1: Look(
        (0.45, 0.85), 0.15, 0.3, 10, 0.045, (0.55, 1.8), 0.04, (0.8, 1), (0, 0.3), 0.25, 0.03, (0,), (0,), (0, 0.015)
    ),
    2: Look(
        (0.35, 0.9),
        0.25,
        0.45,
        18,
        0.06,
        (0.45, 2.2),
        0.06,
        (0.7, 0.95),
        (0, 0.3),
        0.35,
        0.04,
        (0, 12, 15, 18),
        (0, 0.5, 0.8),
        (0.005, 0.02),
    ),
}
SEVERITIES = tuple(LOOKS)


def _pick(u, options):
    """One of OPTIONS for each uniform in U."""
    return torch.tensor(options, dtype=u.dtype)[(u * len(options)).long().clamp(max=len(options) - 1)]


def _span(u, lo, hi):
    return lo + (hi - lo) * u


def _placement(boxes, widths, leans, look, u):
    """Per digit, (output -> source affine theta [n, 2, 3], pen threshold in source pixels, output pixels
    per source pixel). BOXES [n, 4] are the glyphs' ink boxes (x0, y0, x1, y1) in the source's grid
    units, WIDTHS [n] and LEANS [n] the fonts' pens and slants. Half a font's own slant is kept: an
    italic font sheared further lies down. The digit is kept whole inside the frame: a scan of a
    cut-off digit is no test of reading it."""
    k = _span(u[:, 0], *look.height) * SOURCE / GLYPH  # grid units out per grid unit in
    aspect = torch.exp(_span(u[:, 1], -look.aspect, look.aspect))
    slant = _span(u[:, 2], -look.slant, look.slant) - leans / 2
    angle = _span(u[:, 3], -1, 1) * math.radians(look.rotate)
    cos, sin = angle.cos(), angle.sin()
    # forward map, source -> output: k * rotation @ shear @ diag(aspect, 1)
    m = torch.stack(
        [torch.stack([cos * aspect, -(cos * slant) - sin], 1), torch.stack([sin * aspect, cos - sin * slant], 1)], 1
    )
    px = k * SIDE / SOURCE
    pen = widths * torch.exp(_span(u[:, 4], *(math.log(p) for p in look.pen)))
    lower = torch.maximum(torch.maximum(torch.full_like(pen, look.thinnest * GLYPH), 0.55 * widths), 1.4 / px)
    pen = torch.minimum(pen, torch.full_like(pen, 0.2 * GLYPH)).maximum(lower)
    t = (pen - widths) / 2
    corners = torch.stack([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]], 2)
    moved = m @ corners  # [n, 2, 4], still to be scaled by k
    low, high = moved.amin(2), moved.amax(2)
    margin = 2 * (1.5 / SIDE) + (look.warp * 2 * GLYPH + t.clamp(min=0) * 2) / SOURCE * k
    k = torch.minimum(k, ((2 - 2 * margin) / (high - low).amax(1)))  # shrink what would not fit
    low, high = low * k[:, None], high * k[:, None]
    room = (1 - margin)[:, None]
    shift = _span(u[:, 5:7], -room - low, room - high)  # anywhere it fits
    inverse = torch.linalg.inv(m * k[:, None, None])
    theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], 2)
    return theta, t, k * SIDE / SOURCE


def _draw(fonts, which, digits, look, gen):
    """Scans [n, SIDE, SIDE] on 0..1, dark on light, of digit DIGITS[i] in font FONTS[WHICH[i]]."""
    n = len(digits)
    u = torch.rand(n, 16, generator=gen)
    warps = torch.rand(n, 2, 4, 4, generator=gen) * 2 - 1
    fields = torch.rand(n, 1, 3, 3, generator=gen)
    noise = torch.randn(n, 1, SIDE, SIDE, generator=gen)
    banks = [_bank(f.path) for f in fonts]
    boxes = torch.stack([b[3] for b in banks])[which, digits]
    widths, leans = torch.tensor([b[1:3] for b in banks])[which].unbind(1)
    theta, t, px = _placement(boxes, widths, leans, look, u)
    grid = F.affine_grid(theta, [n, 1, SIDE, SIDE], align_corners=False)
    warp = F.interpolate(warps, size=(SIDE, SIDE), mode="bicubic", align_corners=False)
    grid = grid + warp.permute(0, 2, 3, 1) * look.warp * 2 * GLYPH / SOURCE
    ink = torch.empty(n, 1, SIDE, SIDE)
    for w in range(len(fonts)):  # one font's glyphs at a time: no copy of the bank per digit
        mine = (which == w).nonzero().flatten()
        if len(mine):
            sdf = F.grid_sample(banks[w][0][digits[mine]], grid[mine], align_corners=False, padding_mode="border")
            ink[mine] = (0.5 + (t[mine, None, None, None] - sdf) * px[mine, None, None, None]).clamp(0, 1)
    ink = ink * (1 - look.pressure * F.interpolate(fields, size=(SIDE, SIDE), mode="bilinear", align_corners=False))
    return _on_paper(ink, px * GLYPH, look, u[:, 7:], noise)


def _on_paper(ink, height, look, u, noise):
    """INK [n, 1, S, S] on 0..1 as grey [n, S, S]: paper, ink, shading, then the scanner or camera.
    The coarse scan and the blur scale with the digit's HEIGHT [n] in pixels: what a scan loses
    depends on how many of its pixels the digit covers, not on the frame cropped around it."""
    paper = _span(u[:, 0], *look.paper)
    tone = torch.minimum(_span(u[:, 1], *look.ink), paper - 0.45)  # never fainter than 0.45 below the paper
    at = torch.linspace(-1, 1, SIDE)
    direction = u[:, 2, None, None] * 2 * math.pi
    ramp = direction.cos() * at + direction.sin() * at[:, None]  # [n, S, S], -1.4..1.4 in a random direction
    sheet = paper[:, None, None] - look.tint * u[:, 3, None, None] * (ramp + 1.5) / 2.5
    x = (sheet - (sheet - tone[:, None, None]) * ink[:, 0]).unsqueeze(1)
    coarse = (_pick(u[:, 4], look.coarse) * SIDE / height).round().clamp(max=SIDE)
    sigma = (_pick(u[:, 5], look.blur) * height / 20 * 4).round() / 4  # quarter pixels: few batches
    for side in set(coarse.tolist()) - {0, SIDE}:
        mine = coarse == side
        x[mine] = low_resolution(x[mine], int(side))
    for s in set(sigma.tolist()) - {0}:
        mine = sigma == s
        x[mine] = blur(x[mine], s)
    x = x + noise * _span(u[:, 6], *look.noise)[:, None, None, None]
    return x[:, 0].clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# What the rest of the toolkit uses
# ---------------------------------------------------------------------------------------------


def _need(fonts):
    if not fonts:
        raise FontError(f"no handwriting fonts to draw digits with; install them with: {install_hint()}")


def render_scans(fonts, per_digit, seed=0, severity=1):
    """PER_DIGIT scans of each digit in each font, font by font, 0-9 within each, as read_gray would give
    a photo: (list of float [SIDE, SIDE] on 0..1, dark ink on light paper; labels int64 [N]). Severity 1:
    pen width, slant, size, rotation, position and the hand's wobble vary, on paper of uneven shade;
    2: more so, plus coarse scans, blur, noise and shaded paper; 0: training_digits' milder level."""
    _need(fonts)
    if severity not in LOOKS:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    which = torch.arange(len(fonts)).repeat_interleave(10 * per_digit)
    digits = torch.arange(10).repeat_interleave(per_digit).repeat(len(fonts))
    gen = torch.Generator().manual_seed(seed * 1009 + severity)
    return list(_draw(fonts, which, digits, LOOKS[severity], gen).unbind(0)), digits


def check_set(fonts, per_digit=20, seed=0, severity=1):
    """The scans of render_scans through preprocess.to_mnist, as predict.py reads a photo: (uint8
    [N, 1, 28, 28], int64 [N]), for evaluate.py. Nothing is dropped: a scan to_mnist finds blank is an
    error here, and the drawing keeps every digit whole, dark and inside its frame so that none is."""
    scans, labels = render_scans(fonts, per_digit, seed, severity)
    images, blank = [], []
    for i, scan in enumerate(scans):
        try:
            images.append(to_mnist(scan))
        except Exception as e:
            if not getattr(e, "user_error", False):
                raise
            blank.append(i)
    if blank:
        raise RuntimeError(
            f"{len(blank)} of {len(scans)} scans came out blank (the first: a {int(labels[blank[0]])} "
            f"in {fonts[blank[0] // (10 * per_digit)].path}); drawn too faintly: report it"
        )
    return torch.stack(images).unsqueeze(1), labels


def training_digits(fonts, n, seed=0):
    """N digits to add to a training set, MNIST-style: (uint8 [n, 1, 28, 28], white on black, fitted
    into 20x20 and centred by mass as MNIST's are; int64 [n]), balanced over digits (to within one)
    and fonts (to within ten), in a seeded random order, drawn at LOOKS[0]'s milder variation."""
    _need(fonts)
    gen = torch.Generator().manual_seed(seed * 1009 + 7)
    slot = torch.randperm(n, generator=gen)  # slot j: digit j % 10 of font (j // 10) % len(fonts)
    which, digits = (slot // 10) % len(fonts), slot % 10
    images = []
    for start in range(0, n, 2048):  # bounds the memory of the sampling grids
        part = slice(start, start + 2048)
        scans = _draw(fonts, which[part], digits[part], LOOKS[0], gen)
        images += [to_mnist(s) for s in scans]
    return torch.stack(images).unsqueeze(1), digits


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def list_fonts():
    fonts = find_fonts()
    if not fonts:
        return print(f"no handwriting fonts found; install them with: {install_hint()}")
    held_out = split_fonts(fonts)[1]
    families = {f.family for f in fonts}
    print(
        f"{len(families)} families in {len(fonts)} files; held out from training: "
        f"{len({f.family for f in held_out})} families in {len(held_out)} files"
    )
    for f in fonts:
        print(f"  {f.family:<{max(map(len, families))}}  {'held out' if f in held_out else 'training'}  {f.path}")
    missing = sorted(set(FONTS) - set(families))
    if missing:
        print(f"not found: {', '.join(missing)} (all: {install_hint()})")


def draw_grid(out, held_out=False, severity=1, seed=0, mnist=False):
    """A row of 0-9 per font: the scans, or with MNIST what to_mnist makes of them."""
    from plots import label_grid, save_png  # Pillow and torchvision, beside this file

    fonts = split_fonts(find_fonts())[1 if held_out else 0]  # none: render_scans says what to install
    if mnist:
        images, labels = check_set(fonts, 1, seed, severity)
    else:
        scans, labels = render_scans(fonts, 1, seed, severity)
        images = torch.stack(scans).unsqueeze(1).mul(255).round().byte()
    captions = [f"{d} {fonts[i // 10].family}" if d == 0 else str(d) for i, d in enumerate(labels.tolist())]
    save_png(label_grid(images, captions, nrow=10, scale=4 if mnist else 2), out)
    print(
        f"wrote {out}: {len(fonts)} {'held-out' if held_out else 'training'} fonts, severity {severity}, "
        f"{'as the model sees them' if mnist else 'as scanned'}"
    )


def main(argv=None):
    from cli import run

    return run(_command, sys.argv[1:] if argv is None else argv)


def _command(argv):
    from cli import Parser

    parser = Parser(prog="fontdigits.py", description="Digits drawn with handwriting fonts: list them, or draw a grid.")
    parser.add_argument("--list", action="store_true", help="list the fonts found and which are held out")
    parser.add_argument("--grid", metavar="PNG", help="write a labelled grid: one row of 0-9 per font")
    parser.add_argument("--held-out", action="store_true", help="with --grid: the held-out fonts (default: training's)")
    parser.add_argument(
        "--severity",
        type=int,
        choices=SEVERITIES,
        default=1,
        help="with --grid: 0 as for training, 1 or 2 as the check sets (default: 1)",
    )
    parser.add_argument("--mnist", action="store_true", help="with --grid: draw what to_mnist makes of the scans")
    parser.add_argument("--seed", type=int, default=0, help="with --grid: which drawings (default: 0)")
    args = parser.parse_args(argv)
    if not (args.list or args.grid):
        parser.error("give --list or --grid PNG")
    if args.list:
        list_fonts()
    if args.grid:
        draw_grid(args.grid, args.held_out, args.severity, args.seed, args.mnist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
