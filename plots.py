"""Pictures: labelled image grids, the confusion matrix, loss and accuracy curves, right and wrong predictions.

    python evaluate.py runs/mnist-cnn-20261122-101500/last.pt --out report/   # writes all four PNGs
    python data.py --show fashion-mnist --augment --out grid.png             # training images, augmented

Image grids need only torchvision and Pillow (which torchvision installs). The two plots with axes
need matplotlib; without it they are skipped with one line saying so, and the grids are still drawn.
Every picture is written whole or not at all (files.write_atomic), so a failed write leaves no half a PNG.
"""

import os

import torch
import torch.nn.functional as F

from cli import printable, write_atomic

RED, GREEN = (190, 20, 20), (20, 110, 40)
# The confusion matrix is drawn whole, every cell labelled, up to this many classes; beyond, a picture of
# C x C cells grows with the square (100 classes took 3 GB and 20 s), so the most confused pairs are drawn.
MATRIX_CLASSES = 30
PAIRS = 20


def label_grid(images, captions, nrow=8, scale=4, colors=None):
    """A PIL image of uint8 images [N, 1, H, W], each enlarged `scale` times (nearest neighbour, so
    pixels stay sharp) with its caption below. Long captions wrap onto at most three lines; captions
    hold class names, so their control characters are shown as escapes (cli.printable)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    size = 4 * scale  # font pixels: 16 on 112-pixel tiles fits "T-shirt/top" on one line
    try:
        font = ImageFont.load_default(size=size)  # a scalable font since Pillow 10.1
    except TypeError:
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    tile_w = images.shape[-1] * scale
    lines = [_wrap(printable(c), draw, font, tile_w - 4)[:3] for c in captions]
    line_h = size + 3
    strip = max(len(ls) for ls in lines) * line_h + 6
    x = images.float().div(255).repeat_interleave(scale, -2).repeat_interleave(scale, -1).expand(-1, 3, -1, -1)
    x = F.pad(x, (0, 0, 0, strip), value=1.0)  # white caption strip under each image
    pad = 4
    grid = make_grid(x, nrow=nrow, padding=pad, pad_value=1.0)
    img = Image.fromarray(np.ascontiguousarray(grid.mul(255).round().byte().permute(1, 2, 0).numpy()))
    draw = ImageDraw.Draw(img)
    tile_h = x.shape[-2]
    for k, tile_lines in enumerate(lines):
        row, col = divmod(k, nrow)
        left, top = pad + col * (tile_w + pad), pad + row * (tile_h + pad) + tile_h - strip + 3
        for j, line in enumerate(tile_lines):
            offset = (tile_w - _width(line, draw, font)) / 2
            _text(draw, (left + offset, top + j * line_h), line, font, (colors or {}).get(k, (20, 20, 20)))
    return img


def sample_grid(images, labels, classes, augment=None, seed=0, n=32):
    """A labelled grid of random images of a split (uint8 [N, 1, H, W]); with `augment` (a data.Augment),
    each row of originals is followed by the same images as train.py would change them."""
    pick = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[: n // 2 if augment else n]
    images, captions = images[pick], [classes[k] for k in labels[pick].tolist()]
    if augment:
        changed = augment(images.float().div(255), torch.Generator().manual_seed(seed))
        changed = changed.mul(255).round().clamp(0, 255).byte()
        rows = [(images[i : i + 8], changed[i : i + 8], captions[i : i + 8]) for i in range(0, len(pick), 8)]
        images = torch.cat([t for a, b, _ in rows for t in (a, b)])
        captions = [c for _, _, cs in rows for c in (cs + ["augmented"] * len(cs))]
    return label_grid(images, captions)


def _wrap(text, draw, font, width):
    lines = []
    for word in text.split(" "):
        if lines and _width(lines[-1] + " " + word, draw, font) <= width:
            lines[-1] += " " + word
        else:
            while len(word) > 1 and _width(word, draw, font) > width:
                word = word[:-1]
            lines.append(word)
    return lines


# Pillow's built-in font has no arrow glyph (it draws a box), so "→" is drawn as a line and a head.
def _width(text, draw, font):
    parts = text.split("→")
    return sum(draw.textlength(p, font=font) for p in parts) + (len(parts) - 1) * font.size


def _text(draw, xy, text, font, fill):
    x, y = xy
    for k, part in enumerate(text.split("→")):
        if k:
            mid, s = y + font.size * 0.55, font.size
            draw.line([(x + s * 0.15, mid), (x + s * 0.85, mid)], fill=fill, width=max(1, s // 10))
            draw.polygon([(x + s * 0.9, mid), (x + s * 0.6, mid - s * 0.22), (x + s * 0.6, mid + s * 0.22)], fill=fill)
            x += s
        draw.text((x, y), part, fill=fill, font=font)
        x += draw.textlength(part, font=font)


def save_png(img, path):
    """Write a PIL image as PNG, whole or not at all."""
    write_atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def have_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never open a window, work without a display
        return True
    except ImportError:
        return False


def save_figure(fig, path):
    """Save a matplotlib figure through a temporary file, then close it."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plain(text, width=None):
    """TEXT for a matplotlib label: control characters escaped (cli.printable), cut to WIDTH
    characters, and its $ signs escaped, so that a name such as $x$ is not read as mathematics
    (or, unbalanced, fail the whole picture)."""
    return printable(text, width).replace("$", r"\$")


def confusion_png(cells, classes, path, title):
    """The confusion matrix, from its nonzero cells (true, predicted, count): up to MATRIX_CLASSES
    classes a heat map, every cell labelled, class names on both axes; beyond, the PAIRS most
    confused pairs (confused_pairs_png)."""
    import matplotlib.pyplot as plt

    n = len(classes)
    if n > MATRIX_CLASSES:
        return confused_pairs_png(cells, classes, path, title)
    cm = torch.zeros(n, n, dtype=torch.long)
    for t, p, v in cells:
        cm[t, p] = v
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.6 + 0.7 * n))
    # A log-like scale keeps the few mistakes visible next to the thousand-count diagonal.
    shown = cm.double().log1p()
    ax.imshow(shown.numpy(), cmap="Blues")  # a tensor here makes numpy warn (its __array__ takes no copy=)
    top = shown.max().item()
    for t in range(n):
        for p in range(n):
            v = int(cm[t, p])
            ax.text(
                p,
                t,
                str(v),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if shown[t, p] > 0.6 * top else ("black" if v else "#999999"),
            )
    names = [plain(c, 20) for c in classes]
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(plain(title, 120))
    save_figure(fig, path)


def confused_pairs(cells):
    """The off-diagonal cells (true, predicted, count) of a confusion matrix, the most images first (the
    picture below, and evaluate.py's printed report past 30 classes)."""
    return sorted(((t, p, v) for t, p, v in cells if t != p), key=lambda c: (-c[2], c[0], c[1]))


def confused_pairs_png(cells, classes, path, title):
    """A bar for each of the PAIRS most confused pairs (true → predicted, images): the same size
    whatever the number of classes."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    pairs = confused_pairs(cells)
    shown = pairs[:PAIRS]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * max(len(shown), 3)))
    if shown:
        ax.barh(range(len(shown)), [v for _, _, v in shown], color="#3b75af")
        ax.set_yticks(range(len(shown)), [f"{plain(classes[t], 25)} → {plain(classes[p], 25)}" for t, p, _ in shown])
        ax.invert_yaxis()  # the most confused on top
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("test images")
        ax.grid(axis="x", alpha=0.3)
        what = f"the {len(shown)} most confused pairs of {len(pairs):,}, {len(classes):,} classes (true → predicted)"
    else:
        ax.set_axis_off()
        what = f"no confusions: every image of the {len(classes):,} classes is classified right"
    ax.set_title(f"{plain(title, 120)}\n{what}", fontsize=10)
    save_figure(fig, path)


def curves_png(rows, path, title, steps=()):
    """Loss and accuracy per epoch for train, val and test, from log.csv rows (dicts of strings or
    numbers), over the training curve of steps.csv rows when given (at fractional epochs)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    if steps:
        # an epoch's last row sits at its last step, which gives the steps per epoch
        ends = {}
        for r in steps:
            ends[int(r["epoch"])] = max(ends.get(int(r["epoch"]), 0), int(r["step"]))
        first = min(ends)
        per_epoch = ends[first] / first
        x = [int(r["step"]) / per_epoch for r in steps]
        loss_ax.plot(x, [float(r["train_loss"]) for r in steps], "-", color="0.6", lw=1, label="train (steps)")
        acc_ax.plot(x, [float(r["train_acc"]) for r in steps], "-", color="0.6", lw=1, label="train (steps)")
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^"), ("ema_test", ":^")):
        points = [
            (float(r["epoch"]), float(r[f"{split}_loss"]), float(r[f"{split}_acc"]))
            for r in rows
            if r.get(f"{split}_loss") not in (None, "")
        ]
        if points:
            epochs, losses, accs = zip(*points)
            label = split.replace("ema_", "EMA ")
            loss_ax.plot(epochs, losses, style, label=label, markersize=4)
            acc_ax.plot(epochs, accs, style, label=label, markersize=4)
    for ax, name in ((loss_ax, "loss (cross-entropy)"), (acc_ax, "accuracy (%)")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(plain(title, 120))
    save_figure(fig, path)


def seed_bands_png(curves, path, panels, title):
    """One panel per (key, axis label) of PANELS, one colour per (label, runs) of CURVES: the mean over a
    configuration's seeds at each epoch as a line, the seeds' min-max as a band around it. Each run is
    {key: {epoch: value}}; an epoch counts the seeds that reached it, so a stopped seed leaves the band."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for (key, axis), ax in zip(panels, axes[0]):
        for k, (label, runs) in enumerate(curves):
            epochs = sorted({e for run in runs for e in run.get(key, {})})
            if not epochs:
                continue
            values = [[run[key][e] for run in runs if e in run.get(key, {})] for e in epochs]
            color = f"C{k % 10}"
            ax.plot(epochs, [sum(v) / len(v) for v in values], "-o", color=color, markersize=3, label=plain(label, 60))
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(axis)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(plain(title, 120))
    save_figure(fig, path)


def prediction_grids(images, labels, probs, classes, out, per_class=4, most=64, most_classes=32):
    """mistakes.png: the `most` misclassified images, most confident first, captioned "true → predicted
    (p)". correct.png: the `per_class` most confident right answers of every class with any, or of
    `most_classes` of them spread evenly when there are more: both pictures are bounded whatever the
    number of classes. Returns the paths written."""
    confidence, pred = probs.max(1)
    confidence, pred, labels = confidence.cpu(), pred.cpu(), labels.cpu()
    written = []
    wrong = (pred != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:most]
    if len(wrong):
        captions = [
            f"{classes[t]} → {classes[p]} ({c:.2f})"
            for t, p, c in zip(labels[wrong].tolist(), pred[wrong].tolist(), confidence[wrong].tolist())
        ]
        path = os.path.join(out, "mistakes.png")
        save_png(label_grid(images[wrong].cpu(), captions, colors=dict.fromkeys(range(len(wrong)), RED)), path)
        written.append(path)
    # The right answers grouped by class, most confident first within each (one sort, not a pass a class).
    right = (pred == labels).nonzero().flatten()
    right = right[confidence[right].argsort(descending=True, stable=True)]
    right = right[labels[right].argsort(stable=True)]
    group = labels[right]
    rank = torch.arange(len(right)) - torch.searchsorted(group, group)  # place within its class
    present = group.unique()
    chosen = torch.zeros(len(classes), dtype=torch.bool)
    chosen[present[torch.linspace(0, len(present) - 1, min(len(present), most_classes)).round().long()]] = True
    right = right[(rank < per_class) & chosen[group]]
    if len(right):
        captions = [f"{classes[p]} ({c:.2f})" for p, c in zip(pred[right].tolist(), confidence[right].tolist())]
        path = os.path.join(out, "correct.png")
        save_png(
            label_grid(
                images[right].cpu(), captions, nrow=2 * per_class, colors=dict.fromkeys(range(len(right)), GREEN)
            ),
            path,
        )
        written.append(path)
    return written
