"""Pictures of a run: the confusion matrix, loss and accuracy curves, grids of right and wrong predictions.

    python evaluate.py runs/mnist-cnn-20261122-101500/last.pt --out report/   # writes all four PNGs

Image grids need only torchvision and Pillow (which torchvision installs). The two plots with axes
need matplotlib; without it they are skipped with one line saying so, and the grids are still drawn.
"""
import os

import torch

from data import label_grid, save_png

RED, GREEN = (190, 20, 20), (20, 110, 40)


def have_matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")   # files only: never open a window, work without a display
        return True
    except ImportError:
        return False


def save_figure(fig, path):
    """Save a matplotlib figure through a temporary file, then close it."""
    import matplotlib.pyplot as plt
    tmp = f"{path}.tmp"
    try:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def confusion_png(cm, classes, path, title):
    """A heat map of counts[true, predicted], every cell labelled, class names on both axes."""
    import matplotlib.pyplot as plt
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.6 + 0.7 * n))
    # A log-like scale keeps the few mistakes visible next to the thousand-count diagonal.
    shown = cm.double().log1p()
    ax.imshow(shown, cmap="Blues")
    top = shown.max().item()
    for t in range(n):
        for p in range(n):
            v = int(cm[t, p])
            ax.text(p, t, str(v), ha="center", va="center", fontsize=8,
                    color="white" if shown[t, p] > 0.6 * top else ("black" if v else "#999999"))
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    save_figure(fig, path)


def curves_png(rows, path, title):
    """Loss and accuracy per epoch for train, val and test, from log.csv rows (dicts of strings or numbers)."""
    import matplotlib.pyplot as plt
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for split, style in (("train", "-o"), ("val", "-s"), ("test", "-^"), ("ema_test", ":^")):
        points = [(float(r["epoch"]), float(r[f"{split}_loss"]), float(r[f"{split}_acc"]))
                  for r in rows if r.get(f"{split}_loss") not in (None, "")]
        if points:
            epochs, losses, accs = zip(*points)
            label = split.replace("ema_", "EMA ")
            loss_ax.plot(epochs, losses, style, label=label, markersize=4)
            acc_ax.plot(epochs, accs, style, label=label, markersize=4)
    for ax, name in ((loss_ax, "loss (cross-entropy)"), (acc_ax, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
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
        captions = [f"{classes[t]} → {classes[p]} ({c:.2f})" for t, p, c in
                    zip(labels[wrong].tolist(), pred[wrong].tolist(), confidence[wrong].tolist())]
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
        save_png(label_grid(images[right].cpu(), captions, nrow=2 * per_class,
                            colors=dict.fromkeys(range(len(right)), GREEN)), path)
        written.append(path)
    return written
