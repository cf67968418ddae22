"""Export a trained checkpoint for use outside this toolkit, and check the export against PyTorch.

    python export.py runs/mnist-cnn-20261122-101500/last.pt --format pt2     # torch.export, nothing to install
    python export.py last.pt --format onnx --out cnn.onnx                     # needs onnx and onnxscript
    python export.py last.pt --format ckpt --out weights/mnist.pt             # weights only, for shipping

Every export is checked on a batch of test images: the exported program's logits are compared with
the PyTorch model's, and the largest difference is printed. The batch dimension stays dynamic.
"""

import io
import os
import sys
import warnings

import torch

from checkpoint import build_model, load_checkpoint, save_checkpoint, slim_checkpoint
from cli import Parser, UserError, positive, run, write_atomic, write_bytes_atomic
from data import load_split, normalize

FORMATS = {"pt2": ".pt2", "onnx": ".onnx", "ckpt": ".pt"}
TOLERANCE = 1e-4  # largest logit difference accepted; float32 kernels differ in the last bits


def export_pt2(model, example, out):
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # torch's zip writer reports a full disk opaquely; a plain write names the file
    torch.export.save(program, buffer)
    write_bytes_atomic(buffer.getbuffer(), out)
    return torch.export.load(out).module()


def export_onnx(model, example, out):
    missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
    if missing:
        raise UserError(f"ONNX export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["images"],
            output_names=["logits"],
            verbose=False,
        )
    write_atomic(out, program.save)
    if not _importable("onnxruntime"):
        print(f"skipped checking {out}: running it needs onnxruntime (pip install onnxruntime)")
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.cpu().numpy()})[0])


def _importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def build_parser():
    p = Parser(prog="export.py", description="Export a checkpoint as torch.export (pt2), ONNX, or a slim checkpoint.")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint file or run folder (its last.pt)")
    p.add_argument(
        "--format",
        required=True,
        choices=list(FORMATS),
        help="pt2: torch.export program; onnx: ONNX "
        "model; ckpt: this toolkit's checkpoint without optimizer or RNG state",
    )
    p.add_argument("--out", help="file to write (default: the checkpoint's path with the format's extension)")
    p.add_argument(
        "--weights",
        choices=["auto", "raw", "ema"],
        default="auto",
        help="which weights of a run trained with --ema (default: auto, EMA when present)",
    )
    p.add_argument(
        "--check-images", type=positive(int), default=256, help="test images to compare the export on (default: 256)"
    )
    p.add_argument("--data-dir", help="folder holding the IDX files (default: search ./data and others)")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    model, which = build_model(ckpt, args.weights, args.checkpoint)
    model.eval()
    out = args.out or os.path.splitext(args.checkpoint.rstrip("/"))[0] + FORMATS[args.format]
    if os.path.abspath(out) == os.path.abspath(args.checkpoint):
        raise UserError(f"--out {out} is the checkpoint itself; choose another file", 2)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise UserError(f"--out {out}: the folder {folder} does not exist", 2)
    info = ckpt["data"]
    images, _ = load_split(info["dataset"], "test", args.data_dir)
    x = normalize(images[: args.check_images], info["mean"], info["std"])
    with torch.inference_mode():
        expected = model(x)

    if args.format == "ckpt":
        slim = slim_checkpoint(ckpt)
        slim["state_dict"] = model.state_dict()  # the chosen weights become the checkpoint's own
        slim.pop("ema_state_dict", None)
        save_checkpoint(slim, out)
        reloaded, _ = build_model(load_checkpoint(out), path=out)
        exported = reloaded.eval()
    elif args.format == "pt2":
        exported = export_pt2(model, x, out)
    else:
        exported = export_onnx(model, x, out)
    size = os.path.getsize(out) / 1e6
    print(f"wrote {out} ({size:.2f} MB): {ckpt['model']['name']}, {which} weights, {args.format}")
    if exported is None:
        return 0
    with torch.inference_mode():
        got = exported(x)
    diff = (got.float() - expected.float()).abs().max().item()
    same = (got.argmax(1) == expected.argmax(1)).float().mean().item() * 100
    print(f"check on {len(x)} test images: largest logit difference {diff:.2e}, same prediction for {same:.1f} %")
    if not diff <= TOLERANCE:
        raise UserError(
            f"the export's outputs differ from the model's by {diff:.2e} (more than {TOLERANCE:g}); "
            f"do not use {out}; rerun with --debug and report it"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
