"""Classify your own images, or a CSV of pixel rows, with a trained checkpoint; the shipped MNIST one by default.

    python predict.py my_digit.png                     # top-3 digits with probabilities
    python predict.py drawings/ --save-preprocessed seen/ --out preds.csv   # a folder; what the model saw
    python predict.py test.csv --ckpt runs/train-strided-wide-crop20-<time> --out submission.csv   # Kaggle

A photo or drawing is first made to look like an MNIST image: grayscale, inverted when its
background is light, cropped to the ink, fitted into 20x20 keeping its aspect ratio, and placed
in 28x28 with its centre of mass in the middle, as MNIST's digits were prepared; strokes one pixel
wide (a fine pen) are widened to MNIST's. A model trained on your own class folders reads images
by the rule it was trained with instead: grey, aspect kept, padded, resized (preprocess.py).
"""

import os
import sys

import torch

from checkpoint import add_ckpt_flag, build_model, checkpoint_path, load_checkpoint
from cli import (
    Parser,
    UserError,
    csv_table,
    make_folder,
    output_path,
    positive,
    printable,
    run,
    write_atomic,
    write_text_atomic,
)
from device import pick_device
from preprocess import FORMAT_NAMES, IMAGE_TYPES, classify, read_gray, to_input
from userdata import read_csv


def gather_files(paths):
    """Image files named directly, plus the image files inside named folders (sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_TYPES))
            if not inside:
                raise UserError(f"{path} holds no {FORMAT_NAMES} images", 2)
            files += inside
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders of them", 2)
    return files


def preprocessed_names(files, folder):
    """FOLDER/<name>.png for each input, checked before anything is read or written: never one of the
    inputs themselves, and never one name for two inputs (a.png and a.jpg)."""
    # Compared without case: macOS and Windows file systems take A.png and a.png for one file.
    inputs = {os.path.realpath(f).casefold(): f for f in files}
    outputs, taken = [], {}
    for f in files:
        out = os.path.join(folder, os.path.splitext(os.path.basename(f))[0] + ".png")
        real = os.path.realpath(out).casefold()
        if real in inputs:
            raise UserError(
                f"--save-preprocessed {folder} would write over the input {inputs[real]}; "
                f"choose a folder that holds none of the images",
                2,
            )
        if real in taken:
            raise UserError(
                f"--save-preprocessed: {taken[real]} and {f} would both become {out}; rename one "
                f"of them or classify them in two runs",
                2,
            )
        if os.path.lexists(out) and not made_by_us(out):
            raise UserError(
                f"--save-preprocessed {folder} already holds {os.path.basename(out)}, which predict.py did not "
                f"write; choose another folder",
                2,
            )
        taken[real] = f
        outputs.append(out)
    return outputs


MARK = (b"Software", b"predict.py --save-preprocessed")  # a tEXt chunk in every PNG we write there


def made_by_us(path):
    """Whether PATH is a regular file that an earlier --save-preprocessed wrote (its PNG carries MARK right
    after its header), so that writing it again destroys nothing of the user's."""
    try:
        if not os.path.isfile(path) or os.path.islink(path):
            return False
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    return b"tEXt" + MARK[0] + b"\0" + MARK[1] in head


def build_parser():
    p = Parser(
        prog="predict.py",
        description=f"Classify {FORMAT_NAMES} images, or a CSV of pixel rows, with a trained checkpoint.",
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_FOLDER_OR_CSV",
        help="image files or folders of them; or one CSV of pixel rows, as Kaggle's test.csv",
    )
    add_ckpt_flag(p)
    p.add_argument("--top", type=positive(int), default=3, help="how many classes to print (default: 3)")
    p.add_argument(
        "--out",
        metavar="FILE.csv",
        help="also write the predictions: ImageId,Label for a CSV of pixels "
        "(a Kaggle submission), file,label,probability for images",
    )
    p.add_argument("--save-preprocessed", metavar="DIR", help="write each 28x28 input as DIR/<name>.png")
    p.add_argument(
        "--device",
        default="cpu",
        help="auto, cpu, cuda, cuda:N or mps (default: cpu; a few "
        "images are quicker there than the time to start a GPU)",
    )
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    ckpt = load_checkpoint(args.ckpt)
    model, _ = build_model(ckpt, path=args.ckpt)
    model.to(device).eval()
    table = len(args.images) == 1 and args.images[0].lower().endswith(".csv")
    if table and args.save_preprocessed:
        raise UserError("--save-preprocessed shows how images were prepared; a CSV's rows are used as they are", 2)
    if any(p.lower().endswith(".csv") for p in args.images) and not table:
        raise UserError("give one CSV file of pixel rows, or image files and folders, not both", 2)
    files = args.images if table else gather_files(args.images)
    # checked before any work, against the files themselves: DIR/a.png or the checkpoint under another name
    out = args.out and output_path(args.out, "--out", [checkpoint_path(args.ckpt), *files])
    if table:
        inputs, names = read_csv(args.images[0])[0][:, 0], None
    else:
        names = files
        outputs = preprocessed_names(names, args.save_preprocessed) if args.save_preprocessed else None
        rule = ckpt["data"].get("rule", "mnist")
        inputs = torch.stack([to_input(read_gray(f), rule, f) for f in names])  # [N, 28, 28] uint8
        if outputs:
            save_inputs(inputs, outputs, args.save_preprocessed)
    probs = torch.cat([classify(model, ckpt, chunk) for chunk in inputs.split(1000)])
    report(probs, names, ckpt["data"]["classes"], args.top, out)
    return 0


def save_inputs(inputs, outputs, folder):
    from PIL import Image, PngImagePlugin

    make_folder(folder, "--save-preprocessed")
    info = PngImagePlugin.PngInfo()
    info.add_text(*(m.decode() for m in MARK))
    for x, out in zip(inputs, outputs):
        image = Image.fromarray(x.numpy(), mode="L")
        write_atomic(out, lambda tmp, image=image: image.save(tmp, format="PNG", pnginfo=info))
    print(f"wrote the 28x28 inputs to {folder}")


def report(probs, names, classes, top, out):
    """The TOP classes of each input on stdout (a CSV's first rows only when OUT gets them all), and OUT:
    ImageId,Label rows numbered from 1 for a CSV of pixels, file,label,probability for images. Names
    come from the user's files: escaped on the terminal, quoted and kept from running as formulas in OUT."""
    top = min(top, len(classes))
    labels = [str(i) for i in range(1, len(probs) + 1)] if names is None else [printable(n) for n in names]
    shown = len(probs) if names is not None or len(probs) <= 20 or not out else 10
    width = max(len(n) for n in labels[:shown])
    for name, p in zip(labels[:shown], probs[:shown]):
        values, indices = p.topk(top)
        print(
            f"{name:<{width}}  "
            + "  ".join(f"{printable(classes[i])} {v:6.2%}" for v, i in zip(values.tolist(), indices.tolist()))
        )
    if shown < len(probs):
        print(f"... and {len(probs) - shown:,} more rows")
    if out:
        best, index = probs.max(1)
        if names is None:
            rows = [["ImageId", "Label"], *([i, classes[k]] for i, k in enumerate(index.tolist(), 1))]
        else:
            rows = [["file", "label", "probability"]]
            rows += [[n, classes[k], f"{p:.4f}"] for n, k, p in zip(names, index.tolist(), best.tolist())]
        write_text_atomic(csv_table(rows), out)
        print(f"wrote {len(probs):,} predictions to {printable(out)}")


if __name__ == "__main__":
    sys.exit(run(main))
