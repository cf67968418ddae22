"""Classify your own images (PNG or JPEG) with a trained checkpoint; the shipped MNIST one by default.

    python predict.py my_digit.png                     # top-3 digits with probabilities
    python predict.py drawings/ --save-preprocessed seen/   # a folder as one batch; see what the model saw
    python predict.py shoe.jpg --ckpt weights/fashion-mnist.pt

A photo or drawing is first made to look like an MNIST image: grayscale, inverted when its
background is light, cropped to the ink, fitted into 20x20 keeping its aspect ratio, and placed
in 28x28 with its centre of mass in the middle, as MNIST's digits were prepared.
"""
import os
import sys

import torch
import torch.nn.functional as F

from checkpoint import build_model, load_checkpoint
from common import Parser, UserError, pick_device, positive, run
from data import normalize
from plots import save_png

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CKPT = os.path.join(HERE, "weights", "mnist.pt")
IMAGE_TYPES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MIN_SIDE = 8   # smaller images hold too little of a drawing to be fitted into 20x20


def read_gray(path):
    """An image file as a float tensor [H, W] on 0..1. Transparent areas count as white paper."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
            gray = im.convert("L")
    except UnidentifiedImageError:
        raise UserError(f"{path} is not an image this can read; give a PNG or JPEG file") from None
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e}); check that the file is whole") from None
    w, h = gray.size
    if min(w, h) < MIN_SIDE:
        raise UserError(f"{path} is only {w}x{h} pixels; give an image at least {MIN_SIDE}x{MIN_SIDE}")
    return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).view(h, w).float() / 255


def to_mnist(gray, path="image"):
    """A float image [H, W] on 0..1 as MNIST would have it: uint8 [28, 28], white ink on black."""
    border = torch.cat([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    paper = border.median()
    if paper > 0.5:                          # dark ink on light paper: make the ink bright
        gray, paper = 1 - gray, 1 - paper
    ink = ((gray - paper) / (1 - paper).clamp(min=1e-3)).clamp(0, 1)   # the paper's own shade becomes 0
    mask = ink > 0.25 * ink.max()
    if ink.max() < 0.15 or not mask.any():
        raise UserError(f"{path} looks blank: no strokes stand out from the background")
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]      # crop to the ink
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
    canvas[top:top + size[0], left:left + size[1]] = patch
    return canvas.mul(255).round().to(torch.uint8)


def gather_files(paths):
    """Image files named directly, plus the image files inside named folders (sorted)."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            inside = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_TYPES))
            if not inside:
                raise UserError(f"{path} holds no PNG or JPEG images", 2)
            files += inside
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"{path} does not exist; give image files or folders of them", 2)
    return files


def build_parser():
    p = Parser(prog="predict.py", description="Classify PNG or JPEG images with a trained checkpoint.")
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
    inputs = torch.stack([to_mnist(read_gray(f), f) for f in files])   # [N, 28, 28] uint8
    if args.save_preprocessed:
        os.makedirs(args.save_preprocessed, exist_ok=True)
        from PIL import Image
        for f, x in zip(files, inputs):
            name = os.path.splitext(os.path.basename(f))[0] + ".png"
            save_png(Image.fromarray(x.numpy(), mode="L"), os.path.join(args.save_preprocessed, name))
    x = normalize(inputs.unsqueeze(1).to(device), ckpt["data"]["mean"], ckpt["data"]["std"])
    with torch.inference_mode():
        probs = model(x).float().softmax(1).cpu()
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
