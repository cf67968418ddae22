"""What the commands share: one error style, argument files, device choice and safe writes.

Error style: a user error prints one line on stderr and exits 2 when the command line is wrong
(unknown name, bad number, missing path, absent device), 1 when the command was fine but the work
failed (corrupt file, diverged loss, full disk), 130 on Ctrl-C. `--debug` or MNIST_DEBUG=1 adds the
traceback. A closed output pipe (`| head`) ends a command quietly.
"""
import argparse
import ctypes
import errno
import os
import shlex
import sys
import traceback

import torch

from data import DataError
from models import ModelError

HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem the user can fix; `code` is the exit status (2: the arguments, 1: anything else)."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


class WriteError(UserError):
    """A file could not be written (full disk, read-only folder, quota); the previous version is intact."""


# What to do about the errors a write meets; the message names the file and the system's reason.
WRITE_HINTS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some of your quota or "
               "write elsewhere", errno.EROFS: "the file system is read-only: write elsewhere",
               errno.EACCES: "check the folder's permissions or write elsewhere", errno.EFBIG: "write elsewhere"}


def write_problem(path, e):
    """One sentence for an OSError met while writing PATH."""
    hint = WRITE_HINTS.get(e.errno, "check the disk and the folder")
    return f"cannot write {path}: {e.strerror or e}; {hint}"


class Parser(argparse.ArgumentParser):
    """argparse that reads argument files (`@recipes/fast.args`: flags, any number a line, `#` starts a
    comment; flags after the file override it) and reports a bad argument in one line, exit 2."""

    def __init__(self, **kwargs):
        super().__init__(fromfile_prefix_chars="@", **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def convert_arg_line_to_args(self, line):
        try:
            return shlex.split(line, comments=True)
        except ValueError as e:   # an unclosed quote
            self.error(f"cannot read the argument file line {line.strip()!r} ({e})")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._argument_file(a) if a.startswith("@") else a for a in args],
                                        namespace)

    def _argument_file(self, arg):
        """@PATH relative to the current folder or, failing that, to the toolkit's own folder, so that
        `@recipes/fast.args` works from anywhere."""
        path = arg[1:]
        if os.path.isfile(path):
            return arg
        if os.path.isfile(os.path.join(HERE, path)):
            return "@" + os.path.join(HERE, path)
        self.error(f"argument file {path} does not exist; the named recipes are in "
                   f"{os.path.join(HERE, 'recipes')}")


def recipe_flags(path):
    """The flags of an argument file, as one string in the file's order (comments dropped)."""
    with open(os.path.join(HERE, path)) as f:
        return " ".join(token for line in f for token in shlex.split(line, comments=True))


def run(main, argv=None):
    """Call main(argv) and turn every expected failure into one line on stderr and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    prog = os.path.basename(sys.argv[0]) if main.__module__ == "__main__" else f"{main.__module__}.py"
    try:
        return main(argv) or 0
    except SystemExit as e:   # argparse errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:   # output piped into `head`, and the reader went away
        return close_stdout()
    except Exception as e:
        error, (message, code) = e, describe_error(e)   # `e` itself is unbound when the except block ends
    except KeyboardInterrupt as e:
        error, message, code = e, "interrupted", 130
    if "--debug" in argv or os.environ.get("MNIST_DEBUG", "") not in ("", "0"):
        traceback.print_exception(error)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def close_stdout():
    """After the reader of stdout went away: point stdout at /dev/null, so that the interpreter's final
    flush has nowhere to fail, and end quietly (exit status 0)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):   # stdout is not a real file (a test's capture)
        pass
    return 0


def describe_error(e):
    """(one-line message, exit code) for an exception that reached the top of a script."""
    if isinstance(e, (UserError, DataError, ModelError)):
        return str(e), getattr(e, "code", 1)
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller --batch-size", 1
    if type(e).__name__ == "OutOfMemoryError":   # torch.cuda.OutOfMemoryError, without importing CUDA code here
        return "the GPU ran out of memory; try a smaller --batch-size, --amp bf16, or another --device", 1
    if isinstance(e, OSError) and e.errno in WRITE_HINTS and e.filename:
        return write_problem(e.filename, e), 1
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

def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the system at once.

    By default it maps every large block afresh and returns it when freed, so each step's activations
    and gradients fault their pages in again: 1.5 million page faults and a third of the first
    epoch's time in a 2-epoch CPU run, measured. Keeping blocks under 32 MB in the heap, and up to
    1 GB of freed heap, takes that to 130 thousand. Elsewhere than glibc this does nothing; returns
    whether it was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


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
# Writing files: whole or not at all
# ---------------------------------------------------------------------------------------------

def write_atomic(path, write):
    """write(tmp) fills a temporary file beside `path`, which then replaces `path` in one rename, so a
    crash or a full disk leaves the old file whole. A failed write removes the temporary file and
    raises WriteError naming `path`."""
    tmp = f"{path}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        kept = "; the previous version is kept" if os.path.exists(path) else ""
        raise WriteError(write_problem(path, e) + kept) from None
    finally:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:   # the folder itself went away or turned read-only: nothing more to do
            pass


def write_bytes_atomic(data, path):
    """Bytes to `path` through a temporary file, synced to disk before the rename."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, write)


def write_text_atomic(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)
