"""Digit forms that MNIST's American writers rarely used, drawn onto its own digits: a 7 crossed through
its stem, a 1 with a flag (and often a foot), a 4 closed at the top. Added to a training set, they
teach a model the European forms it otherwise reads as 3, 8 and 6.

    images, labels = european_forms(train_images, train_labels, n=6000, seed=0)   # uint8 [n, 1, 28, 28]
    images, labels = more_digits(images, labels, classes, fonts=20000, european=6000)   # what train.py adds

Each new image is an MNIST 7, 1 or 4 with one stroke drawn in, as wide as the digit's own strokes;
where a digit's shape gives no place for the stroke (a blob, a broken 4), another is taken.
"""

import math

import torch

FORMS = {7: "crossed", 1: "flagged", 4: "closed"}
DIGITS = tuple("0123456789")


def more_digits(images, labels, classes, fonts=0, european=0, seed=0):
    """The training set with N_FONTS digits rendered from handwriting fonts (the training families:
    fontdigits.split_fonts) and N_EUROPEAN of its own 7s, 1s and 4s in European forms appended."""
    from cli import UserError

    if tuple(classes) != DIGITS:
        raise UserError(
            f"--fonts and --european add digits 0-9; this dataset's classes are {', '.join(classes[:5])}"
            f"{', ...' if len(classes) > 5 else ''}",
            2,
        )
    parts = [(images, labels)]
    if european:
        try:
            parts.append(european_forms(images, labels, european, seed))
        except ValueError as e:
            raise UserError(f"--european {european}: {e}") from None
    if fonts:
        import fontdigits

        training, _ = fontdigits.split_fonts(fontdigits.find_fonts())
        if not training:
            raise UserError(f"--fonts needs handwriting fonts, and none are installed: {fontdigits.install_hint()}")
        x, y = fontdigits.training_digits(training, fonts, seed)
        parts.append((x.to(images.device), y.to(labels.device)))
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def european_forms(images, labels, n, seed=0):
    """N new images (uint8 [n, 1, 28, 28]) and their labels: MNIST 7s, 1s and 4s in equal numbers,
    drawn at random (seeded) from IMAGES and rewritten in their European forms."""
    gen = torch.Generator().manual_seed(seed)
    made, made_labels = [], []
    pools = {k: (labels == k).nonzero().squeeze(1).cpu() for k in FORMS}
    tries = 0
    while len(made) < n and tries < 4 * n + 100:
        tries += 1
        digit = list(FORMS)[len(made) % len(FORMS)]
        pool = pools[digit]
        picture = images[pool[torch.randint(len(pool), (1,), generator=gen)].item(), 0].cpu().float() / 255
        drawn = DRAW[digit](picture, gen)
        if drawn is not None:
            made.append(drawn)
            made_labels.append(digit)
    if len(made) < n:
        raise ValueError(f"only {len(made)} of {n} digits could be rewritten; the images are not MNIST-like")
    out = torch.stack(made).mul(255).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    return out.to(images.device), torch.tensor(made_labels, device=labels.device)


def ink_box(x, level=0.4):
    """(top, bottom, left, right) rows and columns of the ink, or None for an empty image."""
    mask = x > level
    rows, cols = mask.any(1).nonzero().squeeze(1), mask.any(0).nonzero().squeeze(1)
    if len(rows) < 8 or len(cols) < 2:
        return None
    return rows[0].item(), rows[-1].item(), cols[0].item(), cols[-1].item()


def pen_radius(x):
    """Half the width of the digit's strokes: its ink area over its skeleton's length, roughly the ink
    pixels per ink row, halved."""
    mask = x > 0.4
    return max(0.8, min(2.2, mask.sum().item() / max(1, mask.any(1).sum().item()) / 2.6))


def stroke(x, points, radius, gen):
    """X with an antialiased line through POINTS ((row, column) pairs) of the given radius, in ink as
    bright as the digit's own (max, so the stroke never darkens a crossing)."""
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    distance = torch.full((28, 28), 1e9)
    for (r0, c0), (r1, c1) in zip(points, points[1:]):
        dr, dc = r1 - r0, c1 - c0
        t = (((rows - r0) * dr + (cols - c0) * dc) / max(dr * dr + dc * dc, 1e-6)).clamp(0, 1)
        distance = torch.minimum(distance, ((rows - r0 - t * dr) ** 2 + (cols - c0 - t * dc) ** 2).sqrt())
    ink = (radius + 0.5 - distance).clamp(0, 1) * (0.85 + 0.15 * torch.rand(1, generator=gen).item())
    return torch.maximum(x, ink)


def stem_column(x, row):
    """The middle column of the ink in ROW, or None when the row has none."""
    cols = (x[row] > 0.4).nonzero().squeeze(1)
    return None if len(cols) == 0 else cols.float().mean().item()


def uniform(gen, lo, hi):
    return lo + (hi - lo) * torch.rand(1, generator=gen).item()


def cross_seven(x, gen):
    """A short bar across the 7's stem, a little below the middle of its height."""
    box = ink_box(x)
    if box is None:
        return None
    top, bottom, left, right = box
    row = round(top + uniform(gen, 0.48, 0.6) * (bottom - top))
    centre = stem_column(x, row)
    if centre is None:
        return None
    half = max(3.0, uniform(gen, 0.2, 0.32) * (right - left + 1))
    tilt = uniform(gen, -0.12, 0.12) * half
    return stroke(x, [(row + tilt, centre - half), (row - tilt, centre + half)], 0.85 * pen_radius(x), gen)


def flag_one(x, gen):
    """An up-stroke from the top of the 1, turned 40-65 degrees to the left of its stem (so that a slanted
    1 gets a flag, not a second stem), and at times a foot along its bottom."""
    box = ink_box(x)
    if box is None:
        return None
    top, bottom, _, _ = box
    height = bottom - top + 1
    crown, base = stem_column(x, top), stem_column(x, bottom)
    if crown is None or base is None or height < 12:
        return None
    dr, dc = bottom - top, base - crown
    norm = math.hypot(dr, dc)
    dr, dc = dr / norm, dc / norm
    turn = math.radians(uniform(gen, 40, 65))
    fr, fc = dr * math.cos(turn) + dc * math.sin(turn), dc * math.cos(turn) - dr * math.sin(turn)
    length = uniform(gen, 0.22, 0.36) * height
    x = stroke(x, [(top + 0.5, crown), (top + 0.5 + length * fr, crown + length * fc)], pen_radius(x), gen)
    if torch.rand(1, generator=gen).item() < 0.6:
        half = uniform(gen, 0.16, 0.28) * height
        x = stroke(x, [(bottom, base - half), (bottom, base + half)], pen_radius(x), gen)
    return x


def close_four(x, gen):
    """A stroke joining the tops of the 4's two upright strokes: the open top of a handwritten 4 closed,
    as many Europeans write it."""
    box = ink_box(x)
    if box is None:
        return None
    top, bottom, left, right = box
    mask = x > 0.4
    half = (left + right + 1) // 2
    tops = []
    for cols in (range(left, half), range(half, right + 1)):
        inked = mask[:, cols.start : cols.stop].any(1).nonzero().squeeze(1)
        if len(inked) == 0:
            return None
        row = inked[0].item()
        tops.append((row, mask[row, cols.start : cols.stop].nonzero().float().mean().item() + cols.start))
    (r0, c0), (r1, c1) = tops
    if c1 - c0 < 5 or max(r0, r1) > top + (bottom - top) // 2:
        return None
    gap = mask[min(r0, r1) : max(r0, r1) + 2, round(c0) + 1 : round(c1)]
    if gap.float().mean() > 0.5:  # closed already
        return None
    return stroke(x, [(r0, c0), (r1, c1)], pen_radius(x), gen)


DRAW = {7: cross_seven, 1: flag_one, 4: close_four}
