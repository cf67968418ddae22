"""What the scripts share: one error style, device choice, and safe, self-describing checkpoints.

Error style: a user error prints one line on stderr and exits 2 when the command line is wrong
(unknown name, bad number, missing path, absent device), 1 when the command was fine but the work
failed (corrupt file, diverged loss, full disk), 130 on Ctrl-C. `--debug` or MNIST_DEBUG=1 adds the
traceback.
"""
import argparse
import os
import pickle
import sys
import traceback
import warnings

import torch

from data import DataError
from models import ModelError, get_model, list_models

CHECKPOINT_FORMAT = "mnist-toolkit-checkpoint"
CHECKPOINT_VERSION = 1   # bump when the layout changes, and teach load_checkpoint the old one


class UserError(Exception):
    """A problem the user can fix; `code` is the exit status (2: the arguments, 1: anything else)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line, without the usage block, and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run(main, argv=None):
    """Call main(argv) and turn every expected failure into one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    prog = os.path.basename(sys.argv[0]) if main.__module__ == "__main__" else f"{main.__module__}.py"
    try:
        return main(argv) or 0
    except SystemExit as e:   # argparse errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:   # output piped into `head`, and the reader went away
        sys.stderr = open(os.devnull, "w")
        return 0
    except Exception as e:
        error, (message, code) = e, _describe(e)   # `e` itself is unbound when the except block ends
    except KeyboardInterrupt as e:
        error, message, code = e, "interrupted", 130
    if "--debug" in argv or os.environ.get("MNIST_DEBUG", "") not in ("", "0"):
        traceback.print_exception(error)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _describe(e):
    """(one-line message, exit code) for an exception that reached the top of a script."""
    if isinstance(e, (UserError, DataError, ModelError)):
        return str(e), getattr(e, "code", 1)
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller --batch-size", 1
    if isinstance(e, OSError):
        return (f"{e.strerror} ({e.filename})" if e.filename and e.strerror else str(e)), 1
    return f"unexpected {type(e).__name__}: {e}; rerun with --debug for the traceback and report it", 1


def positive(kind):
    """argparse type for numbers that must be > 0, with a one-line message otherwise."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
        return value
    parse.__name__ = f"non-negative {kind.__name__}"
    return parse


# ---------------------------------------------------------------------------------------------
# Device
# ---------------------------------------------------------------------------------------------

def pick_device(name):
    """torch.device for auto|cpu|cuda|cuda:N|mps, or a UserError saying why it cannot be used."""
    if name == "auto":
        if torch.accelerator.is_available():
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps", 2) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} asked for a CUDA GPU, but none is available here; "
                            f"use --device cpu, or auto to take whatever is present", 2)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                            f"device(s), numbered from 0", 2)
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("--device mps asked for Apple's GPU, but MPS is not available here; "
                            "use --device cpu, or auto to take whatever is present", 2)
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps", 2)
    return device



def machine(device="cpu"):
    """What work on DEVICE (a --device name) is timed on, for reports: the GPU it uses, else the CPU."""
    dev = pick_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    if dev.type == "mps":
        return "Apple GPU (MPS)"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        cpu = platform.processor() or platform.machine() or "CPU"
    return f"{cpu}, {os.cpu_count()} cores"

# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def save_atomic(obj, path):
    """torch.save to a temporary file beside `path`, then rename: a crash leaves the old file whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(text, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def checkpoint_path(path):
    """A run folder means its last.pt."""
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
    """torch.load(weights_only=True), with every way a file can be wrong turned into one sentence."""
    if os.path.getsize(path) == 0:
        raise UserError(f"{path} is empty (0 bytes), probably cut off while being written; use another checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise UserError(f"refusing to load {path}: it contains pickled Python objects, which could run code "
                            f"when opened; only checkpoints of plain tensors and values are accepted") from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({str(e)[:80]})") from None
    except (RuntimeError, EOFError, KeyError, ValueError, IndexError, OSError) as e:
        raise UserError(f"{path} is not a readable PyTorch checkpoint: it is truncated or another kind of "
                        f"file ({type(e).__name__}); use another checkpoint") from None
    return ckpt


def check_checkpoint(ckpt, path):
    if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise UserError(f"{path} holds bare weights (a state_dict) with no record of the model, dataset or "
                        f"normalization, so it cannot be rebuilt; evaluate.py accepts it with --model NAME")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is a PyTorch file but not a checkpoint of this toolkit; train one with train.py")
    version = ckpt.get("version")
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise UserError(f"{path} has checkpoint format {version}, newer than this toolkit reads "
                        f"({CHECKPOINT_VERSION}); update the toolkit to open it")
    if version < 1:
        raise UserError(f"{path} has checkpoint format {version}, which predates the first released "
                        f"format (1) and cannot be converted")
    name = ckpt["model"]["name"]
    if name not in list_models():
        raise UserError(f"{path} was trained with model {name!r}, which this toolkit does not have "
                        f"(known: {', '.join(list_models())}); update models.py or use another checkpoint")
    return ckpt


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
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)[:120]]
        raise UserError(f"{path}: the weights do not fit model {spec['name']!r} ({first[0].strip()})") from None
    return model, "ema" if use_ema else "raw"


def rng_state(device):
    """The global RNG states dropout draws from; data order and augmentation are seeded per step."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    elif device.type == "mps" and "mps" in state:
        torch.mps.set_rng_state(state["mps"])


MODEL_OPTIONS = ("dropout", "width", "depth")   # train.py flags that become model keyword arguments


def model_kwargs(args, num_classes):
    """Keyword arguments for get_model: the data's shape, and the model options given on the command line.
    A saved run may predate an option; getattr treats it as not given."""
    kwargs = {"in_channels": 1, "num_classes": num_classes}
    kwargs.update({k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k, None) is not None})
    return kwargs


def make_checkpoint(model, optimizer, args, info, norm, history, epoch, step, partial, extra):
    """Everything to rebuild the model and to resume the run exactly, in plain types only, so that
    torch.load(weights_only=True) opens it. `epoch` epochs are complete, plus `step` steps of the
    next one (a Ctrl-C or --save-every save), whose running sums are in `partial`."""
    return {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "torch_version": str(torch.__version__),
        "model": {"name": args.model, "kwargs": model_kwargs(args, len(info.classes))},
        "state_dict": model.state_dict(),
        "data": {"dataset": info.name, "mean": norm[0], "std": norm[1], "classes": list(info.classes),
                 "input_shape": [1, 28, 28]},
        "epoch": epoch, "step": step, "partial_epoch": partial,
        "metrics": history[-1] if history else {}, "history": history,
        "args": dict(vars(args)),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"name": args.scheduler, "note": "the lr is a function of the global step"},
        **extra,
    }
