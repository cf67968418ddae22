"""A robustness suite: the MNIST-style test set changed the ways real handwriting differs from it, and
digits of other writers: handwriting fonts no training run uses, drawn as scans (fontdigits.py).

    shifted = apply("thick", images_u8, severity=2)     # uint8 [N, 1, 28, 28] in, the same out
    rows, note = suite(images, labels, classes)          # every row evaluate.py --shifts scores

Each shift is a pure function of the images, the severity and a fixed seed, batched on the images'
device, and keeps the labels. "inverted" goes through predict.py's preprocessing (preprocess.to_mnist),
as a photo of dark ink on light paper would, so it measures that path, not the raw model.
"""

import math

import torch
import torch.nn.functional as F

from data import blur, dilate, elastic, erode, low_resolution

SEVERITIES = (1, 2)
SHIFTS = {  # name: what severities 1 and 2 do
    "thin": "strokes eroded by a 2x2, then a 3x3 square",
    "thick": "strokes dilated by a 2x2, then a 3x3 square",
    "blur": "Gaussian blur, sigma 1 and 1.6 pixels",
    "lowres": "down to 12x12, then 8x8 pixels, and back",
    "rotate": "rotated 20 and 35 degrees, either way",
    "shear": "sheared 0.3 and 0.55 sideways, either way",
    "offcentre": "moved 4 and 7 pixels in a random direction (partly out of the frame)",
    "small": "shrunk to 65 and 45 % about the centre",
    "large": "grown to 125 and 150 % about the centre (edges cut off)",
    "elastic": "a smooth random warp of up to 2 and 4 pixels",
    "noise": "Gaussian noise of std 0.2 and 0.4 (0..1 scale)",
    "breaks": "ink erased in 3 and 6 random 4x4 patches on the strokes",
    "inverted": "dark ink on white (then on grey) paper, through predict.py's preprocessing",
}


FONT_ROWS = ("fonts 1", "fonts 2")  # digits of held-out handwriting fonts, as scans and photos (fontdigits.py)


def suite(images, labels, classes):
    """(row, images, labels) of every case the suite scores: clean, each shift at each severity, and
    for digit models the held-out fonts' check sets at both severities, or a note saying how to
    install the fonts where none are. The fonts' images have their own labels."""
    rows = [("clean", images, labels)] + [
        (f"{name} {s}", apply(name, images, s), labels) for name in SHIFTS for s in SEVERITIES
    ]
    note = None
    if list(classes) == list("0123456789"):
        import fontdigits

        held_out = fontdigits.split_fonts(fontdigits.find_fonts())[1]
        if held_out:
            for row in FONT_ROWS:
                x, y = fontdigits.check_set(held_out, severity=int(row[-1]))
                rows.append((row, x.to(images.device), y.to(labels.device)))
        else:
            note = f"the handwriting-font rows need the fonts: {fontdigits.install_hint()}"
    return rows, note


def apply(name, images, severity, seed=0):
    """The images (uint8 [N, 1, H, W]) under one shift; the same call gives the same result."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; the suite has: {', '.join(SHIFTS)}")
    gen = torch.Generator().manual_seed(seed * 1009 + list(SHIFTS).index(name) * 10 + severity)
    x = images.float() / 255
    x = _SHIFTS[name](x, severity - 1, gen)
    return x.clamp(0, 1).mul(255).round().to(torch.uint8)


def _uniform(gen, n, device, lo=-1.0, hi=1.0):
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)


def _sign(gen, n, device):
    return torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).to(device)


def _affine(x, a, b, c, d, tx=None, ty=None):
    """Sample x through the per-image affine map [[a, b, tx], [c, d, ty]] (output -> input, grid units)."""
    zero = torch.zeros_like(a)
    theta = torch.stack(
        [torch.stack([a, b, zero if tx is None else tx], 1), torch.stack([c, d, zero if ty is None else ty], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def _rotate(x, s, gen):
    angle = _sign(gen, len(x), x.device) * math.radians((20, 35)[s])
    return _affine(x, angle.cos(), -angle.sin(), angle.sin(), angle.cos())


def _shear(x, s, gen):
    k = _sign(gen, len(x), x.device) * (0.3, 0.55)[s]
    one = torch.ones_like(k)
    return _affine(x, one, k, torch.zeros_like(k), one)


def _offcentre(x, s, gen):
    direction = _uniform(gen, len(x), x.device, 0, 2 * math.pi)
    pixels = (4, 7)[s] * 2 / x.shape[-1]  # grid units span 2
    one = torch.ones_like(direction)
    return _affine(x, one, 0 * one, 0 * one, one, direction.cos() * pixels, direction.sin() * pixels)


def _scale(factor):
    def shift(x, s, gen):
        inv = torch.full((len(x),), 1 / factor[s], device=x.device)
        return _affine(x, inv, 0 * inv, 0 * inv, inv)

    return shift


def _elastic(x, s, gen):
    coarse = (torch.rand(len(x), 2, 4, 4, generator=gen) * 2 - 1).to(x.device)
    return elastic(x, coarse * (2, 4)[s])


def _noise(x, s, gen):
    return x + torch.randn(x.shape, generator=gen).to(x.device) * (0.2, 0.4)[s]


def _breaks(x, s, gen):
    """Zero 4x4 patches centred on random ink pixels (any pixel where there is no ink)."""
    n, _, h, w = x.shape
    ink = (x.view(n, h * w) > 0.3).float().cpu() + 1e-6
    centres = torch.multinomial(ink, (3, 6)[s], replacement=True, generator=gen)
    points = torch.zeros(n, h * w).scatter_(1, centres, 1.0).view(n, 1, h, w).to(x.device)
    return x * (1 - dilate(points, 4))


def _inverted(x, s, gen):
    """Dark ink on white paper (severity 2: on grey paper, at lower contrast), then predict.py's
    preprocessing, one image at a time as predict.py does it."""
    from preprocess import to_mnist

    paper, ink = ((1.0, 0.0), (0.75, 0.3))[s]
    photos = paper + (ink - paper) * x
    return torch.stack([to_mnist(p[0].cpu()).to(x.device) for p in photos]).unsqueeze(1).float() / 255


_SHIFTS = {
    "thin": lambda x, s, gen: erode(x, (2, 3)[s]),
    "thick": lambda x, s, gen: dilate(x, (2, 3)[s]),
    "blur": lambda x, s, gen: blur(x, (1.0, 1.6)[s]),
    "lowres": lambda x, s, gen: low_resolution(x, (12, 8)[s]),
    "rotate": _rotate,
    "shear": _shear,
    "offcentre": _offcentre,
    "small": _scale((0.65, 0.45)),
    "large": _scale((1.25, 1.5)),
    "elastic": _elastic,
    "noise": _noise,
    "breaks": _breaks,
    "inverted": _inverted,
}
