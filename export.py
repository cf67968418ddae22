"""Export a trained checkpoint for other programs, and check the export as such a program would use it.

    python export.py weights/mnist.pt --format onnx                         # needs onnx and onnxscript
    python export.py runs/mnist-cnn-20261122-101500 --format pt2           # torch.export, nothing to install
    python export.py last.pt --format ckpt --out weights/mnist.pt          # this toolkit's checkpoint, slim

A pt2 or ONNX file takes what the torch.hub entries take (checkpoint.Normalized): float32 images on 0..1
shaped (N, 1, 28, 28), bright on a dark background as in the training data, with the training normalization
inside the graph; it returns logits, and the batch size stays free. Each file says what it is: the ONNX
file in its metadata_props and doc_string, the pt2 archive in an extra file, metadata.json, with the same
keys (model_card: classes, input, model and options, dataset, test accuracy, checkpoint format).

Every export is checked on test images given on 0..1: the file, run by onnxruntime (onnx's reference
evaluator where onnxruntime is not installed) or torch.export.load, against the model it came from.
"""

import io
import json
import os
import sys
import warnings

import torch

from checkpoint import checkpoint_path, load_checkpoint, model_card, normalized_model, save_checkpoint, slim_checkpoint
from cli import Parser, UserError, output_path, positive, run, write_atomic, write_bytes_atomic
from userdata import evaluation_set

FORMATS = {"pt2": ".pt2", "onnx": ".onnx", "ckpt": ".pt"}
METADATA = "metadata.json"  # the pt2 archive's description: torch.export.load(path, extra_files={METADATA: ""})
TOLERANCE = 1e-4  # largest logit difference accepted; float32 kernels differ in the last bits


def export_pt2(model, example, out, card):
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    buffer = io.BytesIO()  # torch's zip writer reports a full disk opaquely; a plain write names the file
    torch.export.save(program, buffer, extra_files={METADATA: json.dumps(card, indent=1)})
    write_bytes_atomic(buffer.getbuffer(), out)
    return torch.export.load(out).module()


def export_onnx(model, example, out, card):
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
    # metadata_props holds strings: the lists and dicts go in as JSON, so json.loads reads every value back
    program.model.metadata_props.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in card.items()})
    program.model.doc_string = (
        f"{card['model']} trained on {card['dataset']}, {card['test_accuracy']} % test accuracy. Input 'images': "
        f"{card['input']}. Output 'logits': {card['output']}; the class names are metadata_props['classes']."
    )
    write_atomic(out, program.save)
    if _importable("onnxruntime"):
        import onnxruntime

        runner = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    else:
        print("onnxruntime is not installed (pip install onnxruntime): checking with onnx's slower reference evaluator")
        from onnx.reference import ReferenceEvaluator

        runner = ReferenceEvaluator(out)
    return lambda x: torch.from_numpy(runner.run(None, {"images": x.numpy()})[0])


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
    p.add_argument("--dataset", help="the checkpoint's data, where it is now (default: where it was trained)")
    p.add_argument("--test", metavar="PATH", help="a labelled set to check the export on (default: the test split)")
    p.add_argument("--data-dir", help="folder holding the IDX files (default: search ./data and others)")
    return p


def main(argv):
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    model, which = normalized_model(ckpt, args.weights, args.checkpoint)
    # RUN/last.pt under any name is refused: replacing it would lose the run's resume state
    out = output_path(
        args.out or os.path.splitext(args.checkpoint.rstrip("/"))[0] + FORMATS[args.format],
        "--out",
        [checkpoint_path(args.checkpoint)],
    )
    if os.path.exists(out) and not os.path.isfile(out):
        raise UserError(f"--out {args.out}: export.py reads back the file it writes to check it; name a file", 2)
    # the checkpoint's own test images, given as a client gives them: on 0..1, not normalized
    _, _, images, labels = evaluation_set(ckpt, args.dataset, args.test, args.data_dir)
    x, labels = images[: args.check_images].float() / 255, labels[: args.check_images]
    with torch.inference_mode():
        expected = model(x)

    card = model_card(ckpt, which)
    example = x[:2].clone()  # a pt2 archive keeps its example's whole storage; one image would fix the batch size
    if args.format == "ckpt":
        slim = slim_checkpoint(ckpt)
        slim["state_dict"] = model.model.state_dict()  # the chosen weights become the checkpoint's own
        slim.pop("ema_state_dict", None)
        save_checkpoint(slim, out)
        exported = normalized_model(load_checkpoint(out), path=out)[0]
    elif args.format == "pt2":
        exported = export_pt2(model, example, out, card)
    else:
        exported = export_onnx(model, example, out, card)
    size = os.path.getsize(out) / 1e6
    print(f"wrote {out} ({size:.2f} MB): {card['model']}, {which} weights, {args.format}")
    with torch.inference_mode():
        got = exported(x)
    diff = (got.float() - expected.float()).abs().max().item()
    same = (got.argmax(1) == expected.argmax(1)).float().mean().item() * 100
    right = (got.argmax(1) == labels).float().mean().item() * 100
    print(
        f"check on {len(x)} test images given on 0..1: largest logit difference {diff:.2e}, same prediction "
        f"for {same:.1f} %, accuracy {right:.2f} %"
    )
    if not diff <= TOLERANCE:
        raise UserError(
            f"the export's outputs differ from the model's by {diff:.2e} (more than {TOLERANCE:g}); "
            f"do not use {out}; rerun with --debug and report it"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
