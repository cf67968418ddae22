"""Checkpoints that describe themselves: made, saved, checked and opened the same way by every command.

    ckpt = load_checkpoint("runs/x/last.pt")          # checked: format, schema, the model's size
    model, which = build_model(ckpt)                   # rebuilt from the record alone
    ckpt = make_checkpoint(model, args, data, history) # what train.py saves (it adds its resume state)

A checkpoint holds plain types only (tensors, numbers, strings, lists, dicts), so
`torch.load(path, weights_only=True)` opens it and no pickled code can run. It names its model and
options, dataset, normalization and classes, so `build_model(load_checkpoint(path))` needs nothing else.
What only continuing a run needs (optimizer state and the like) is added and read back in train.py.
"""

import io
import os
import pickle
import warnings
import zipfile

import torch
from torch import nn

from cli import UserError, open_input, write_bytes_atomic
from models import OPTIONS, ModelError, count_params, get_model, list_models, option_problem

CHECKPOINT_FORMAT = "mnist-toolkit-checkpoint"
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "mnist.pt")  # predict, demo


MAX_PARAMS = 100_000_000  # 400 MB in fp32: 35 times the largest model of any recipe (2.8 M)
# weights, EMA weights and two Adam moments of a MAX_PARAMS model in fp32, with room for the rest
MAX_BYTES = 2 << 30
MAX_PARTS = 1_000_000  # lists, dicts and values in a record's flags and history: a long run has thousands
MAX_TEXT = 4096  # characters in one saved string: a path, a class name
CHECKPOINT_VERSION = 1  # bump when the layout changes, and teach load_checkpoint the old one


def add_ckpt_flag(parser):
    """--ckpt, for the commands that read images with a trained model (predict.py, demo.py)."""
    parser.add_argument(
        "--ckpt",
        default=DEFAULT_WEIGHTS,
        help="checkpoint or run folder (default: weights/mnist.pt, shipped with the toolkit)",
    )


def save_checkpoint(ckpt, path):
    """torch.save into memory, then to disk through a temporary file: torch's own file writer reports a
    full disk as an opaque RuntimeError, a plain write as an OSError that names the file."""
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    write_bytes_atomic(buffer.getbuffer(), path)


def checkpoint_path(path):
    """A run folder means its last.pt."""
    if path == DEFAULT_WEIGHTS and not os.path.exists(path):
        raise UserError(
            f"the shipped weights {DEFAULT_WEIGHTS} are missing; pass --ckpt with a checkpoint from train.py", 2
        )
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
        if not os.path.exists(path):
            raise UserError(f"{os.path.dirname(path)} holds no last.pt; pass a checkpoint file or a run folder", 2)
    elif not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path", 2)
    return path


def load_checkpoint(path):
    """Open a checkpoint with weights_only=True (no pickled code can run) and check its format."""
    path = checkpoint_path(path)
    return check_checkpoint(load_file(path), path)


def load_file(path):
    """torch.load(weights_only=True), with every way a file can be wrong turned into one sentence, after
    the file's size and its zip records are checked: torch.load would inflate a compressed record of
    any size, or read a device without end, before anything else could be checked. The file is opened
    once (cli.open_input, as every input is), and the zip check and torch.load both read that one."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file; pass a checkpoint file or a run folder", 2)
    f, size = open_input(path, 2)
    with f:
        if size == 0:
            raise UserError(f"{path} is empty (0 bytes), probably cut off while being written; use another checkpoint")
        if size > MAX_BYTES:
            raise UserError(f"{path} is {size / 2**30:.1f} GB, more than any checkpoint of a model this toolkit builds")
        problem = zip_problem(f, size)
        if problem:
            raise UserError(
                f"{path} is not a readable PyTorch checkpoint: it is truncated, damaged or another kind of file "
                f"({problem}); use another checkpoint"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ckpt = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Weights only load failed" in str(e):
                raise UserError(
                    f"refusing to load {path}: it contains pickled Python objects, which could run code "
                    f"when opened; only checkpoints of plain tensors and values are accepted"
                ) from None
            raise UserError(f"{path} is not a PyTorch checkpoint ({str(e)[:80]})") from None
        except Exception as e:  # a damaged record makes torch's unpickler fail in any of a dozen ways
            raise UserError(
                f"{path} is not a readable PyTorch checkpoint: it is truncated, damaged or another kind "
                f"of file ({type(e).__name__}); use another checkpoint"
            ) from None
        return ckpt


def zip_problem(f, size):
    """What makes file F unlike the zip archive torch.save writes (every record stored, none compressed,
    together no larger than the file), or None; F is left at its start."""
    try:
        with zipfile.ZipFile(f) as archive:  # closing the archive leaves F open
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return "not the zip archive torch.save writes"
    finally:
        f.seek(0)
    compressed = [r.filename for r in records if r.compress_type != zipfile.ZIP_STORED]
    if compressed:
        return f"its record {compressed[0][:80]} is compressed, which torch.save never does"
    if sum(r.file_size for r in records) > size:
        return "its records claim more bytes than the file holds"
    return None


def check_checkpoint(ckpt, path):
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(
            f"{path} holds bare weights (a state_dict) with no record of the model, dataset or "
            f"normalization, so it cannot be rebuilt; evaluate.py accepts it with --model NAME"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this toolkit; train one with train.py")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version}, newer than this toolkit reads "
            f"({CHECKPOINT_VERSION}); update the toolkit to open it"
        )
    if version < 1:
        raise UserError(
            f"{path} has checkpoint format {version}, which predates the first released "
            f"format (1) and cannot be converted"
        )
    problem = schema_problem(ckpt)
    if problem:
        raise UserError(f"{path} is damaged: {problem}; use another checkpoint")
    name = ckpt["model"]["name"]
    if name not in list_models():
        raise UserError(
            f"{path} was trained with model {name!r}, which this toolkit does not have "
            f"(known: {', '.join(list_models())}); update models.py or use another checkpoint"
        )
    problem = size_problem(ckpt)
    if problem:
        raise UserError(f"{path}: {problem}; use another checkpoint")
    for key in ("state_dict", "ema_state_dict"):
        for name, tensor in (ckpt.get(key) or {}).items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserError(
                    f"{path} holds NaN or infinite weights ({key} {name[:80]}): the run diverged before this "
                    f"save; use an earlier checkpoint or train again with a lower --lr"
                )
    return ckpt


def schema_problem(ckpt):
    """What is wrong with the parts of a checkpoint every command reads, or None. Model options are
    bounded too: a damaged width could otherwise ask for terabytes."""
    model, data = ckpt.get("model"), ckpt.get("data")
    if not (isinstance(model, dict) and isinstance(model.get("name"), str) and isinstance(model.get("kwargs"), dict)):
        return "its model record is missing or malformed"
    for key, value in model["kwargs"].items():
        if not (isinstance(key, str) and len(key) < 100 and isinstance(value, SCALARS)):
            return "its model arguments are not names with plain values"
        problem = option_problem(key, value)
        if problem:
            return f"its model argument {key}={brief(value)} {problem}"
    for key in ("state_dict",) + (("ema_state_dict",) if ckpt.get("ema_state_dict") is not None else ()):
        weights = ckpt.get(key)
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            return f"its {key} is missing or holds something other than tensors"
    if not (
        isinstance(data, dict)
        and isinstance(data.get("dataset"), str)
        # finite and of a pixel's scale (0..1 or 0..255); compared, not made a float, which a huge int overflows
        and all(isinstance(data.get(k), (int, float)) and -1e6 < data[k] < 1e6 for k in ("mean", "std"))
        and data["std"] > 0
        and isinstance(data.get("classes"), list)
        and all(isinstance(c, str) for c in data["classes"])
    ):
        return "its data record (dataset, finite mean, std above 0, classes) is missing or malformed"
    if model["kwargs"].get("num_classes", 10) != len(data["classes"]):
        return (
            f"its model predicts {model['kwargs'].get('num_classes', 10)} classes but it names {len(data['classes'])}"
        )
    if not all(len(c) <= MAX_TEXT for c in data["classes"]) or len(data["dataset"]) > MAX_TEXT:
        return "its data record holds names longer than any path or class name"
    if test_record_problem(data.get("test")):
        return f"its record of the test split {test_record_problem(data.get('test'))}"
    shape = data.get("input_shape") or [1, 28, 28]  # older records lack it: they were all 1x28x28
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(d) is int for d in shape)):
        return "its data's input_shape is not three whole numbers"
    if shape != [1, 28, 28]:  # every reader of images and IDX files here gives one channel of 28x28
        return f"its data's input_shape {shape} is not [1, 28, 28], the only shape this toolkit reads"
    if model["kwargs"].get("in_channels", 1) != 1:
        return f"its model reads {model['kwargs'].get('in_channels', 1)} channels but its data has 1"
    # the flags and history are printed, compared and written out again (args.json, log.csv): each is a
    # plain record of bounded size, checked before any of that (train.py checks its resume state alike)
    for key, kind in (("args", dict), ("history", list)):
        value = ckpt.get(key)
        if value is not None and not (isinstance(value, kind) and plain(value, 2, [MAX_PARTS])):
            return f"its {key} is not a plain record of bounded size"
    if not all(isinstance(row, dict) for row in ckpt.get("history") or []):
        return "its history is malformed"
    if not isinstance(ckpt.get("epoch", 0), int):
        return "its epoch is not a whole number"
    return None


def test_record_problem(record):
    """What is wrong with a data record's "test" entry (userdata.Source.record: which images were held
    out to test), or None: evaluate.py scores the same images again by it."""
    if record is None:
        return None  # older checkpoints: the built-in sets' own test split
    if not (isinstance(record, dict) and record.get("kind") in ("builtin", "own", "file", "share")):
        return "is malformed"
    if record["kind"] == "file" and not (isinstance(record.get("path"), str) and len(record["path"]) <= MAX_TEXT):
        return "names no test file"
    indices = record.get("indices")
    if record["kind"] == "share" and not (
        torch.is_tensor(indices)
        and indices.dim() == 1
        and not indices.is_floating_point()
        and all(isinstance(record.get(k), int) for k in ("count", "labels_crc"))
        and (len(indices) == 0 or 0 <= int(indices.min()) <= int(indices.max()) < record["count"])
    ):
        return "holds no valid image numbers"
    return None


SCALARS = (bool, int, float, str, type(None))


def brief(value):
    """A saved scalar for a message, at most 40 characters (Python will not even print an int of 5,000 digits)."""
    if isinstance(value, int) and value.bit_length() > 4000:
        return "a number of over 1,000 digits"
    return repr(value[:40] if isinstance(value, str) else value)[:40]


def plain(value, depth, budget):
    """Whether VALUE holds only scalars (strings of at most MAX_TEXT characters), lists and string-keyed
    dicts, DEPTH levels deep at most, in BUDGET[0] parts at most (counted down as it goes). A pickle may
    refer to one list many times, so a small file can unfold into billions of parts: the count stops
    the walk at the bound instead."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if isinstance(value, str):
        return len(value) <= MAX_TEXT
    if isinstance(value, SCALARS):
        return True
    if depth == 0:
        return False
    if isinstance(value, (list, tuple)):
        return all(plain(v, depth - 1, budget) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(k, 0, budget) and plain(v, depth - 1, budget) for k, v in value.items())
    return False


def size_problem(ckpt):
    """What is wrong with the size of a checkpoint's model, found on the meta device before a byte is
    allocated: more parameters than MAX_PARAMS, or weights whose shapes are not the model's. Each
    option is bounded alone (models.OPTIONS); together they could still ask for gigabytes."""
    spec = ckpt["model"]
    try:
        with torch.device("meta"):
            model = get_model(spec["name"], **spec["kwargs"])
    except (ModelError, TypeError, ValueError, RuntimeError) as e:
        return f"its model cannot be built ({str(e)[:120]})"
    n = count_params(model)
    if n > MAX_PARAMS:
        return f"its model would have {n:,} parameters, more than the {MAX_PARAMS:,} this loads"
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in ("state_dict", "ema_state_dict"):
        weights = ckpt.get(key)
        if weights is None:
            continue
        got = {k: tuple(v.shape) for k, v in weights.items()}
        wrong = sorted(set(got) ^ set(expected)) or [k for k in expected if got[k] != expected[k]]
        if wrong:
            first = wrong[0]
            how = (
                f"{first} is {got[first]}, the model's {expected[first]}"
                if first in got and first in expected
                else f"{first} is {'missing' if first in expected else 'not the model'}'s"
            )
            return f"the weights do not fit model {spec['name']!r} ({how})"
    return None


def build_model(ckpt, weights="auto", path="checkpoint"):
    """Rebuild the model a checkpoint describes and load its weights; `weights` is raw, ema or auto
    (EMA weights when the run kept them). Returns (model, which weights were loaded)."""
    spec = ckpt["model"]
    model = get_model(spec["name"], **spec["kwargs"])
    use_ema = weights == "ema" or (weights == "auto" and ckpt.get("ema_state_dict") is not None)
    if use_ema and ckpt.get("ema_state_dict") is None:
        raise UserError(f"{path} has no EMA weights; the run was trained without --ema", 2)
    state = ckpt["ema_state_dict"] if use_ema else ckpt["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)[:120]]
        raise UserError(f"{path}: the weights do not fit model {spec['name']!r} ({first[0].strip()})") from None
    return model, "ema" if use_ema else "raw"


class Normalized(nn.Module):
    """A trained model as it leaves the toolkit (torch.hub, torch.export, ONNX): it takes images on 0..1
    shaped as in training, (N, 1, 28, 28), applies its training normalization itself and returns logits;
    `classes` names the outputs. One convention, so a client cannot feed the wrong scale."""

    def __init__(self, model, mean, std, classes):
        super().__init__()
        self.model, self.mean, self.std, self.classes = model, float(mean), float(std), list(classes)

    def forward(self, x):
        return self.model((x - self.mean) / self.std)

    def extra_repr(self):
        return f"mean={self.mean}, std={self.std}, classes={len(self.classes)}"


def normalized_model(ckpt, weights="auto", path="checkpoint"):
    """build_model's model inside Normalized, in eval mode: (model, which weights were loaded)."""
    model, which = build_model(ckpt, weights, path)
    data = ckpt["data"]
    return Normalized(model, data["mean"], data["std"], data["classes"]).eval(), which


def model_card(ckpt, which):
    """What an exported file says about itself (JSON types): its classes, the input it takes, the model and
    options, the data and test accuracy of WHICH weights, and the checkpoint format it came from."""
    data, last = ckpt["data"], (ckpt.get("history") or [{}])[-1]
    builtin = data.get("test", {}).get("kind") == "builtin"
    dataset = data["dataset"] if builtin else os.path.basename(data["dataset"].rstrip("/\\"))
    looks = "bright on a dark background, as in " + dataset if builtin else "grey levels as in " + dataset
    accuracy = last.get("ema_test_acc" if which == "ema" else "test_acc")
    return {
        "classes": list(data["classes"]),
        "input": f"float32 images on 0..1 shaped (N, {', '.join(map(str, data['input_shape']))}), {looks}; "
        f"the model subtracts {data['mean']:g} and divides by {data['std']:g} itself",
        "input_shape": ["N", *data["input_shape"]],
        "output": f"logits (N, {len(data['classes'])}) in the order of classes; softmax gives probabilities",
        "model": ckpt["model"]["name"],
        "model_options": dict(ckpt["model"]["kwargs"]),
        "weights": which,
        "dataset": dataset,
        "test_accuracy": round(float(accuracy), 2) if isinstance(accuracy, (int, float)) else None,
        "epochs": ckpt.get("epoch"),
        "checkpoint_format": f"{CHECKPOINT_FORMAT} {ckpt.get('version', CHECKPOINT_VERSION)}",
    }


# ---------------------------------------------------------------------------------------------
# Making one
# ---------------------------------------------------------------------------------------------


def model_kwargs(args, num_classes):
    """Keyword arguments for get_model: the data's shape, and the model options given on the command line.
    A saved run may predate an option; getattr treats it as not given."""
    kwargs = {"in_channels": 1, "num_classes": num_classes}
    kwargs.update({k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None})
    return kwargs


def make_checkpoint(model, args, data, history, ema=None):
    """The record every reader of checkpoints opens: the model and its options, its weights (and the
    EMA weights), DATA (dataset, normalization, classes, input shape, the test split), train.py's
    flags and HISTORY, its rows of log.csv. `epoch` is the last epoch in it."""
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "torch_version": str(torch.__version__),
        "model": {"name": args.model, "kwargs": model_kwargs(args, len(data["classes"]))},
        "state_dict": model.state_dict(),
        "data": data,
        "args": dict(vars(args)),
        "epoch": history[-1]["epoch"] if history else 0,
        "history": list(history),
    }
    if ema is not None:
        ckpt["ema_state_dict"] = ema.module.state_dict()
    return ckpt


def slim_checkpoint(ckpt):
    """The checkpoint with only what make_checkpoint writes, without what continuing the run needs:
    a third of the size."""
    keep = "format version torch_version model state_dict ema_state_dict data args epoch history".split()
    return {k: ckpt[k] for k in keep if ckpt.get(k) is not None}
