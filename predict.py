"""Classify your own images with a trained checkpoint; the shipped MNIST one by default.

    python predict.py my_digit.png                     # top-3 digits with probabilities
    python predict.py drawings/ --save-preprocessed seen/   # a folder as one batch; see what the model saw
    python predict.py shoe.jpg --ckpt weights/fashion-mnist.pt

A photo or drawing is first made to look like an MNIST image: grayscale, inverted when its
background is light, cropped to the ink, fitted into 20x20 keeping its aspect ratio, and placed
in 28x28 with its centre of mass in the middle, as MNIST's digits were prepared; strokes one pixel
wide (a fine pen) are widened to MNIST's (images.py).
"""
import os
import sys

import torch

from checkpoint import build_model, load_checkpoint
from cli import Parser, UserError, positive, run
from device import pick_device
from images import FORMAT_NAMES, IMAGE_TYPES, classify, read_gray, to_mnist
from plots import save_png

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "weights", "mnist.pt")


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
    inputs = {os.path.realpath(f): f for f in files}
    outputs, taken = [], {}
    for f in files:
        out = os.path.join(folder, os.path.splitext(os.path.basename(f))[0] + ".png")
        real = os.path.realpath(out)
        if real in inputs:
            raise UserError(f"--save-preprocessed {folder} would write over the input {inputs[real]}; "
                            f"choose a folder that holds none of the images", 2)
        if real in taken:
            raise UserError(f"--save-preprocessed: {taken[real]} and {f} would both become {out}; rename one "
                            f"of them or classify them in two runs", 2)
        taken[real] = f
        outputs.append(out)
    return outputs


def build_parser():
    p = Parser(prog="predict.py", description=f"Classify {FORMAT_NAMES} images with a trained checkpoint.")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders of them")
    p.add_argument("--ckpt", default=DEFAULT_CKPT, help="checkpoint or run folder (default: weights/mnist.pt, "
                   "shipped with the toolkit)")
    p.add_argument("--top", type=positive(int), default=3, help="how many classes to print (default: 3)")
    p.add_argument("--save-preprocessed", metavar="DIR", help="write each 28x28 input as DIR/<name>.png")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps (default: cpu; a few "
                   "images are quicker there than the time to start a GPU)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    if args.ckpt == DEFAULT_CKPT and not os.path.exists(DEFAULT_CKPT):
        raise UserError(f"the shipped weights {DEFAULT_CKPT} are missing; pass --ckpt with a checkpoint "
                        f"from train.py", 2)
    ckpt = load_checkpoint(args.ckpt)
    model, _ = build_model(ckpt, path=args.ckpt)
    model.to(device).eval()
    files = gather_files(args.images)
    outputs = preprocessed_names(files, args.save_preprocessed) if args.save_preprocessed else None
    inputs = torch.stack([to_mnist(read_gray(f), f) for f in files])   # [N, 28, 28] uint8
    if outputs:
        try:
            os.makedirs(args.save_preprocessed, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create --save-preprocessed {args.save_preprocessed} ({e.strerror}); "
                            f"choose a writable folder") from None
        from PIL import Image
        for x, out in zip(inputs, outputs):
            save_png(Image.fromarray(x.numpy(), mode="L"), out)
    probs = classify(model, ckpt, inputs)
    classes = ckpt["data"]["classes"]
    top = min(args.top, len(classes))
    width = max(len(f) for f in files)
    for f, p in zip(files, probs):
        values, indices = p.topk(top)
        print(f"{f:<{width}}  " + "  ".join(f"{classes[i]} {v:6.2%}" for v, i in zip(values.tolist(), indices.tolist())))
    if args.save_preprocessed:
        print(f"wrote the 28x28 inputs to {args.save_preprocessed}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
