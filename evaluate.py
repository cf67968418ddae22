"""Evaluate a checkpoint on its test set: loss, accuracy, per-class metrics, confusion matrix.

    python evaluate.py runs/mnist-cnn-20261122-101500/last.pt
    python evaluate.py weights/fashion-mnist.pt --data-dir DIR --out report/   # tables and pictures
    python evaluate.py a.pt b.pt c.pt          # each model, then the ensemble (mean of softmax)

The checkpoint alone rebuilds the model: architecture, normalization and class names live in it.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch

from checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, build_model, checkpoint_path, load_checkpoint, load_file
from cli import (
    Parser,
    UserError,
    csv_table,
    make_folder,
    non_negative,
    positive,
    printable,
    read_log,
    run,
    write_text_atomic,
)
from data import dataset_info, normalization, predict_probs, score
from device import autocast_for, keep_freed_memory, native_bf16, pick_device, resolve_amp
from models import list_models
from plots import confused_pairs
from userdata import evaluation_set


def member_probs(member, images, batch_size=1000, flips=False):
    """Softmax probabilities of one member, averaged over the test-time views when it uses TTA. On a
    CPU the model runs in channels_last layout, as in training: its pooling and convolutions are
    several times faster there."""
    nhwc = images.device.type == "cpu"
    model = member.model.to(memory_format=torch.channels_last) if nhwc else member.model
    data = member.ckpt["data"]
    return predict_probs(model, images, data["mean"], data["std"], batch_size, member.tta, flips, nhwc, member.autocast)


@dataclass
class Member:
    """One checkpoint to score, and how: by default as train.py scored it, so that the figures match."""

    label: str  # the run folder's name, or the file's path
    model: torch.nn.Module
    ckpt: dict
    tta: bool  # test-time augmentation
    autocast: object  # the autocast context of its precision: off, bf16 or fp16


def tta_and_precision(ckpt, args, device):
    """(tta, amp) for a checkpoint. --tta and --amp as given; by default the TTA train.py scored it with,
    and its training precision where this device computes that natively, fp32 otherwise. An old run
    or a bare state_dict records neither: no TTA, fp32."""
    trained = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    tta = bool(trained.get("tta")) if args.tta is None else args.tta
    if args.amp != "auto":
        return tta, resolve_amp(args.amp, device)[0]
    amp = trained.get("amp", "off")
    if amp == "bf16" and not native_bf16(device)[0] or amp == "fp16" and device.type == "cpu":
        amp = "off"
    return tta, amp if amp in ("bf16", "fp16") else "off"


# Reports grow with the classes, not their square: up to FULL_MATRIX classes the whole matrix and
# table are printed; beyond, a 300-class alphabet's 90,000 cells would be unreadable (and a 5,000-class
# set's 150 MB of text), so the SHOWN most confused pairs and worst classes are printed instead.
FULL_MATRIX = 30
SHOWN = 20
# confusion.csv holds the whole matrix up to this many classes (a million cells, a few MB, within a
# spreadsheet's columns); beyond, its nonzero cells as (true, predicted, count) rows.
CSV_MATRIX = 1000
NAME_WIDTH = 30  # characters of a class name in a printed table


def confusion_cells(pred, labels, num_classes):
    """The nonzero cells of counts[true, predicted], as (true, predicted, count) in row order: at most
    one a test image, however many classes there are."""
    cells, counts = torch.unique(labels.long() * num_classes + pred, return_counts=True)
    return list(zip((cells // num_classes).tolist(), (cells % num_classes).tolist(), counts.tolist()))


def matrix(cells, num_classes):
    """The whole [C][C] matrix of counts, as lists, from its nonzero cells."""
    rows = [[0] * num_classes for _ in range(num_classes)]
    for t, p, n in cells:
        rows[t][p] = n
    return rows


def per_class(pred, labels, num_classes):
    """Rows of (precision %, recall %, support), one a class. Recall is the class's accuracy."""
    tp = torch.bincount(labels[pred == labels], minlength=num_classes).double()
    predicted = torch.bincount(pred, minlength=num_classes).double()
    support = torch.bincount(labels, minlength=num_classes).double()
    precision = torch.where(predicted > 0, 100 * tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, 100 * tp / support.clamp(min=1), torch.zeros_like(tp))
    return list(zip(precision.tolist(), recall.tolist(), support.long().tolist()))


def format_per_class(rows, classes):
    """The per-class table: every class up to FULL_MATRIX of them, else the SHOWN with the lowest
    recall (classes with no test image last) and a line counting the rest."""
    order = list(range(len(classes)))
    if len(classes) > FULL_MATRIX:
        order = sorted(order, key=lambda k: (rows[k][2] == 0, rows[k][1], -rows[k][2], k))[:SHOWN]
    names = [printable(classes[k], NAME_WIDTH) for k in order]
    width = max(5, *(len(n) for n in names))
    lines = [f"  {'class':<{width}}  precision  recall (accuracy)  support"]
    for name, k in zip(names, order):
        p, r, n = rows[k]
        lines.append(f"  {name:<{width}}  {p:8.2f} %  {r:8.2f} %         {n:>7}")
    if len(order) < len(classes):
        lines.insert(0, f"the {len(order)} of {len(classes):,} classes with the lowest recall:")
        lines.append(f"  ... and {len(classes) - len(order):,} more classes (every one is in --out's report.json)")
    return "\n".join(lines)


def format_confusion(cm, classes):
    short_names = [printable(c)[:9] for c in classes]
    width = max(6, max(len(c) for c in short_names) + 1)
    corner = "true \\ predicted"
    lines = [f"{corner:<16}" + "".join(f"{c:>{width}}" for c in short_names)]
    for name, row in zip(short_names, cm):
        lines.append(f"{name:<16}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def format_pairs(pairs, classes):
    """The SHOWN most confused pairs, one a line: true -> predicted, count."""
    if not pairs:
        return "no confusions: every image is classified right"
    shown = [(printable(classes[t], NAME_WIDTH), printable(classes[p], NAME_WIDTH), n) for t, p, n in pairs[:SHOWN]]
    wt, wp = max(4, *(len(t) for t, _, _ in shown)), max(9, *(len(p) for _, p, _ in shown))
    lines = [
        f"most confused pairs, {len(shown)} of {len(pairs):,}:",
        f"  {'true':<{wt}} -> {'predicted':<{wp}}  images",
    ]
    lines += [f"  {t:<{wt}} -> {p:<{wp}}  {n:>6}" for t, p, n in shown]
    return "\n".join(lines)


def report(name, logits, labels, classes):
    """Print loss, accuracy, the per-class table and the confusion matrix (past FULL_MATRIX classes,
    the worst classes and the most confused pairs); return them as a dict, every class's row in it and
    every nonzero cell of the matrix, but nothing that grows with the square of the classes."""
    loss, acc = score(logits, labels)
    pred, labels = logits.argmax(1).cpu(), labels.cpu()
    cells, rows = confusion_cells(pred, labels, len(classes)), per_class(pred, labels, len(classes))
    pairs = confused_pairs(cells)
    print(
        f"{printable(name)}: test loss {loss:.4f}, accuracy {acc:.2f} % ({int((pred == labels).sum())}/{len(labels)})"
    )
    print("\n" + format_per_class(rows, classes))
    if len(classes) <= FULL_MATRIX:
        print("\n" + format_confusion(matrix(cells, len(classes)), classes) + "\n")
    else:
        print("\n" + format_pairs(pairs, classes) + "\n")
    result = {
        "loss": loss,
        "accuracy": acc,
        "per_class": {c: {"precision": p, "recall": r, "support": n} for c, (p, r, n) in zip(classes, rows)},
        "most_confused": [{"true": classes[t], "predicted": classes[p], "images": n} for t, p, n in pairs[:SHOWN]],
    }
    if len(classes) <= FULL_MATRIX:
        result["confusion"] = matrix(cells, len(classes))
    else:  # [true, predicted, count], indices into the report's classes
        result["confusion_cells"] = [list(c) for c in cells]
    return result


def cells_of(result):
    """The nonzero cells (true, predicted, count) of a result of report()."""
    if "confusion_cells" in result:
        return [tuple(c) for c in result["confusion_cells"]]
    return [(t, p, n) for t, row in enumerate(result["confusion"]) for p, n in enumerate(row) if n]


def wrap_state_dict(path, args):
    """A bare state_dict (what the notebooks saved) as a checkpoint of --model on --dataset."""
    state = load_file(checkpoint_path(path))
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise UserError(f"{path} is not a bare state_dict; drop --model, checkpoints name their own model", 2)
    name = args.dataset or "mnist"
    mean, std = normalization(name, args.data_dir)
    classes = dataset_info(name).classes
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "state_dict": state,
        "model": {"name": args.model, "kwargs": {"in_channels": 1, "num_classes": len(classes)}},
        "data": {"dataset": name, "mean": mean, "std": std, "classes": list(classes)},
    }


def build_parser():
    p = Parser(prog="evaluate.py", description="Evaluate one checkpoint, or the ensemble of several, on a test set.")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint files or run folders (their last.pt)")
    p.add_argument(
        "--dataset",
        metavar="NAME_OR_PATH",
        help="the dataset whose test split to score (default: the "
        "checkpoint's; for your own data moved elsewhere, its new path)",
    )
    p.add_argument(
        "--test",
        metavar="PATH",
        help="score every image of this labelled set of your own instead (a CSV, "
        "a folder of class folders or of IDX files), its classes matched to the checkpoint's by name",
    )
    p.add_argument(
        "--model",
        choices=list_models(),
        help="the architecture of a bare state_dict file (such as the "
        "notebooks saved), which records none; it is evaluated with --dataset's normalization",
    )
    p.add_argument("--data-dir", help="folder holding the IDX files (default: search ./data and others)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "off", "bf16", "fp16"],
        help="precision of the "
        "forward passes: auto takes each checkpoint's training precision where this device computes it "
        "natively, so the figures match training's, and fp32 elsewhere (default: auto)",
    )
    p.add_argument(
        "--weights",
        choices=["auto", "raw", "ema"],
        default="auto",
        help="which weights of a run trained with --ema (default: auto, EMA when present)",
    )
    p.add_argument("--batch-size", type=positive(int), default=1000, help="evaluation batch size (default: 1000)")
    p.add_argument(
        "--subset",
        type=non_negative(int),
        default=0,
        help="evaluate on the first N test images only, for a quick check (default: all)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="test-time augmentation: average the "
        "softmax over the image shifted one pixel each way (and mirrored, for datasets where that keeps "
        "the class) (default: as each checkpoint was scored in training, train.py --tta)",
    )
    p.add_argument(
        "--shifts",
        action="store_true",
        help="also score every model under the robustness suite "
        "(robustness.py: thin and thick strokes, blur, low resolution, rotation, shear, off-centre, "
        "small, large, elastic, noise, stroke breaks, inverted; two severities each)",
    )
    p.add_argument(
        "--val",
        type=positive(int),
        metavar="N",
        help="score the N training images train.py --val N "
        "holds out instead of the test set: for choosing a recipe without looking at the test set",
    )
    p.add_argument(
        "--out", help="folder for report.json, confusion.csv and the pictures (confusion, mistakes, correct, curves)"
    )
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    device = pick_device(args.device)
    ckpts = [
        (path, load_checkpoint(path) if args.model is None else wrap_state_dict(path, args))
        for path in args.checkpoints
    ]
    name, info, images, labels = evaluation_set(ckpts[0][1], args.dataset, args.test, args.data_dir, args.val, device)
    for path, ckpt in ckpts:
        if ckpt["model"]["kwargs"].get("num_classes", 10) != len(info.classes):
            raise UserError(
                f"{path} predicts {ckpt['model']['kwargs']['num_classes']} classes, but {name} has {len(info.classes)}",
                2,
            )
    if args.subset:
        images, labels = images[: args.subset], labels[: args.subset]
    results, probs, models = {}, [], []
    for path, ckpt in ckpts:
        model, which = build_model(ckpt, args.weights, path)
        model.to(device)
        tta, amp = tta_and_precision(ckpt, args, device)
        member = Member(
            os.path.basename(os.path.dirname(path)) if os.path.basename(path) == "last.pt" else path,
            model,
            ckpt,
            tta,
            autocast_for(amp, device),
        )
        models.append(member)
        p = member_probs(member, images, args.batch_size, info.flips)
        how = [f"{which} weights"] + (["TTA"] if tta else []) + ([amp] if amp != "off" else [])
        label = f"{path} ({ckpt['model']['name']}, {', '.join(how)})"
        results[path] = report(label, p.clamp_min(1e-12).log(), labels, info.classes)
        probs.append(p)
    mean_probs = torch.stack(probs).mean(0)  # the ensemble's prediction; one model's own when alone
    if len(ckpts) > 1:
        results["ensemble"] = report(
            f"ensemble of {len(ckpts)}", mean_probs.clamp_min(1e-12).log(), labels, info.classes
        )
        # Averaging can only fix images that some model gets right: the gap between these two is its room.
        wrong = torch.stack([p.argmax(1) != labels for p in probs])
        results["ensemble"].update(missed_by_all=int(wrong.all(0).sum()), missed_by_any=int(wrong.any(0).sum()))
        print(
            f"test images missed by all {len(ckpts)} models: {results['ensemble']['missed_by_all']}; "
            f"by at least one: {results['ensemble']['missed_by_any']}"
        )
    if args.shifts:
        results["shifts"] = shift_report(models, images, labels, args, info.flips, info.classes)
    if args.out:
        final = results["ensemble"] if len(ckpts) > 1 else results[ckpts[0][0]]
        write_outputs(args.out, name, results, final, images, labels, mean_probs, ckpts)
    return 0


def shift_report(models, images, labels, args, flips, classes):
    """Accuracy of each model (and their ensemble) on the clean images, under every shift of the suite
    at both severities and on the held-out handwriting fonts; printed as a table and returned as
    {row: {column: accuracy}}."""
    from robustness import FONT_ROWS, suite

    columns = [m.label for m in models] + (["ensemble"] if len(models) > 1 else [])
    table = {}
    rows, note = suite(images, labels, classes)
    for row, x, y in rows:
        probs = [member_probs(m, x, args.batch_size, flips) for m in models]
        if len(models) > 1:
            probs.append(torch.stack(probs).mean(0))
        table[row] = {col: 100.0 * (p.argmax(1) == y).float().mean().item() for col, p in zip(columns, probs)}
    for name, group in (
        ("shifts", [r for r in table if r != "clean" and r not in FONT_ROWS]),
        ("fonts", [r for r in FONT_ROWS if r in table]),
    ):
        if group:
            table[f"mean over {name}"] = {col: sum(table[r][col] for r in group) / len(group) for col in columns}
    shown = [printable(c) for c in columns]  # run folders and file paths: names from the user's disk
    width = max(12, *(len(c) for c in shown))
    print(f"\naccuracy (%) under the shifts of robustness.py{', with TTA' if any(m.tta for m in models) else ''}:")
    print(f"{'shift':<18}" + "".join(f"{c:>{width + 2}}" for c in shown))
    for row, accs in table.items():
        print(f"{row:<18}" + "".join(f"{accs[c]:>{width + 2}.2f}" for c in columns))
    if note:
        print(note)
    return table


def write_outputs(out, name, results, final, images, labels, probs, ckpts):
    """report.json, confusion.csv and the pictures of plots.py, into the folder `out`."""
    import plots

    make_folder(out, "--out")
    classes = ckpts[0][1]["data"]["classes"]  # the checkpoint's: your own data's names are in no table
    write_text_atomic(
        json.dumps(
            {"dataset": name, "test_images": len(labels), "classes": classes, "results": results},
            indent=1,
        ),
        os.path.join(out, "report.json"),
    )
    cells = cells_of(final)
    # csv_table quotes a name with a comma and keeps one such as =HYPERLINK(...) from running as a formula.
    if len(classes) <= CSV_MATRIX:
        rows = [["true\\predicted", *classes], *([c, *row] for c, row in zip(classes, matrix(cells, len(classes))))]
    else:
        rows = [["true", "predicted", "images"], *([classes[t], classes[p], n] for t, p, n in cells)]
        print(f"confusion.csv lists the nonzero cells of the matrix, one a row: {len(classes):,} classes make too many")
    write_text_atomic(csv_table(rows), os.path.join(out, "confusion.csv"))
    written = ["report.json", "confusion.csv"]
    written += [os.path.basename(p) for p in plots.prediction_grids(images, labels, probs, classes, out)]
    if not plots.have_matplotlib():
        print("skipped confusion.png and curves.png: they need matplotlib (pip install matplotlib)")
    else:
        title = (
            f"{'ensemble of ' + str(len(ckpts)) if len(ckpts) > 1 else ckpts[0][1]['model']['name']} on {name}: "
            f"{final['accuracy']:.2f} %"
        )
        plots.confusion_png(cells, classes, os.path.join(out, "confusion.png"), title)
        written.append("confusion.png")
        if len(ckpts) > 1:
            print("skipped curves.png: it draws one run, and several checkpoints were given")
        elif run_history(*ckpts[0]):
            plots.curves_png(
                run_history(*ckpts[0]), os.path.join(out, "curves.png"), ckpts[0][0], run_steps(ckpts[0][0])
            )
            written.append("curves.png")
    print(f"wrote {', '.join(written)} in {printable(out)}")


def run_history(path, ckpt):
    """The epoch rows of the run: its log.csv when it sits beside the checkpoint, else the history
    the checkpoint carries (the same rows, up to the epoch it was saved at)."""
    log = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path(path))), "log.csv")
    if os.path.exists(log):
        try:
            return read_log(log)
        except (OSError, ValueError):
            pass
    return ckpt.get("history") or []


def run_steps(path):
    """The rows of the steps.csv beside a checkpoint, or none."""
    steps = os.path.join(os.path.dirname(os.path.abspath(checkpoint_path(path))), "steps.csv")
    try:
        return read_log(steps) if os.path.exists(steps) else []
    except (OSError, ValueError):
        return []


if __name__ == "__main__":
    sys.exit(run(main))
