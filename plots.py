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

from cli import write_atomic

RED, GREEN = (190, 20, 20), (20, 110, 40)


def label_grid(images, captions, nrow=8, scale=4, colors=None):
    """A PIL image of uint8 images [N, 1, H, W], each enlarged `scale` times (nearest neighbour, so
    pixels stay sharp) with its caption below. Long captions wrap onto more lines."""
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
    lines = [_wrap(c, draw, font, tile_w - 4) for c in captions]
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


def confusion_png(cm, classes, path, title):
    """A heat map of counts[true, predicted], every cell labelled, class names on both axes."""
    import matplotlib.pyplot as plt

    n = len(classes)
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
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
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
    fig.suptitle(title)
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
            ax.plot(epochs, [sum(v) / len(v) for v in values], "-o", color=color, markersize=3, label=label)
            ax.fill_between(epochs, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(axis)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def prediction_grids(images, labels, probs, classes, out, per_class=4, most=64):
    """mistakes.png: the misclassified images, most confident first, captioned "true → predicted (p)".
    correct.png: the `per_class` most confident right answers of every class. Returns the paths written."""
    confidence, pred = probs.max(1)
    written = []
    wrong = (pred != labels).nonzero().flatten()
    wrong = wrong[confidence[wrong].argsort(descending=True)][:most].cpu()
    if len(wrong):
        captions = [
            f"{classes[t]} → {classes[p]} ({c:.2f})"
            for t, p, c in zip(labels[wrong].tolist(), pred[wrong].tolist(), confidence[wrong].tolist())
        ]
        path = os.path.join(out, "mistakes.png")
        save_png(label_grid(images[wrong].cpu(), captions, colors=dict.fromkeys(range(len(wrong)), RED)), path)
        written.append(path)
    right = []
    for k in range(len(classes)):
        mine = ((pred == labels) & (labels == k)).nonzero().flatten()
        right.append(mine[confidence[mine].argsort(descending=True)][:per_class])
    right = torch.cat(right).cpu()
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
