"""What every command shares: one error style, argument files, number types, stopping, and files
written whole or not at all.

    from cli import Parser, UserError, run
    parser = Parser(prog="mine.py")          # reads @recipes/NAME.args; a bad argument is one line, exit 2
    sys.exit(run(main))                      # every expected failure becomes one line and an exit code
    with stop_on_signals() as stop: ...      # Ctrl-C and SIGTERM ask a long command to stop at a safe point
    write_text_atomic("...", "runs/x/args.json")                 # the old file or the new one, never half

Error style: a user error prints one line on stderr and exits 2 when the command line is wrong
(unknown name, bad number, missing path, absent device), 1 when the command was fine but the work
failed (corrupt file, diverged loss, full disk), 130 on Ctrl-C. `--debug` or MNIST_DEBUG=1 adds the
traceback. A closed output pipe (`| head`) ends a command quietly. An exception class that sets
`user_error = True` (UserError and WriteError here, data.py's and models.py's own) carries a message
written for the user and its exit status in `code`, so this module needs none of theirs.

Files: the data goes to a temporary file with a name of its own in the target's folder, created
exclusively (never through a link someone planted there), then replaces the target in one rename, so
a crash, a full disk or a second process leaves either the old file or the new one, never half of
either. This module imports nothing of the toolkit's, so everything else may use it.
"""

import argparse
import csv
import errno
import io
import os
import re
import secrets
import shlex
import signal
import stat
import sys
import traceback
from contextlib import contextmanager

HERE = os.path.dirname(os.path.abspath(__file__))


class UserError(Exception):
    """A problem the user can fix; `code` is the exit status (2: the arguments, 1: anything else)."""

    user_error = True

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


MAX_ARGUMENT_FILE = 1 << 20  # bytes; a recipe is a few hundred, so more is not an argument file
MAX_NESTING = 8  # argument files naming argument files, deeper than any recipe goes


class Parser(argparse.ArgumentParser):
    """argparse that reads argument files (`@recipes/fast.args`: flags, any number a line, `#` starts a
    comment; flags after the file override it; a file may name others) and reports a bad argument in
    one line, exit 2. Argument files are read here, not by argparse: only regular files, bounded in
    size and nesting, so `@/dev/zero` or a file that names itself is one line, not a hang."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # read from the raw argv by run() (debug_asked), so that even a failure in parsing can show it
        self.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see --help)\n")

    def convert_arg_line_to_args(self, line):
        try:
            return shlex.split(line, comments=True)
        except ValueError as e:  # an unclosed quote
            self.error(f"cannot read the argument file line {line.strip()!r} ({e})")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._expand(args, ()), namespace)

    def _expand(self, args, chain):
        """ARGS with every @FILE replaced by its flags; CHAIN is the argument files being read."""
        out = []
        for arg in args:
            if not arg.startswith("@"):
                out.append(arg)
                continue
            path = self._argument_file(arg[1:])
            real = os.path.realpath(path)
            if real in chain:
                self.error(f"argument file {path} names itself, directly or through another; remove the loop")
            if len(chain) >= MAX_NESTING:
                self.error(f"argument file {path} is nested {MAX_NESTING} files deep; name fewer files in files")
            try:
                with open(real, "rb") as f:
                    raw = f.read(MAX_ARGUMENT_FILE + 1)
                text = raw.decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                self.error(f"cannot read the argument file {path} ({getattr(e, 'strerror', None) or e})")
            if len(raw) > MAX_ARGUMENT_FILE:
                self.error(f"argument file {path} is over {MAX_ARGUMENT_FILE >> 20} MB; it is not a list of flags")
            tokens = [t for line in text.splitlines() for t in self.convert_arg_line_to_args(line)]
            out += self._expand(tokens, (*chain, real))
        return out

    def _argument_file(self, path):
        """PATH relative to the current folder or, failing that, to the toolkit's own folder, so that
        `@recipes/fast.args` works from anywhere; only a regular file (not a FIFO or a device)."""
        for where in (path, os.path.join(HERE, path)):
            if os.path.exists(where):
                if not os.path.isfile(where):
                    self.error(f"argument file {path} is not a regular file; name a file of flags")
                return where
        self.error(f"argument file {path} does not exist; the named recipes are in {os.path.join(HERE, 'recipes')}")


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
    except SystemExit as e:  # argparse errors and --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:  # output piped into `head`, and the reader went away
        return close_stdout()
    except Exception as e:
        error, (message, code) = e, describe_error(e)  # `e` itself is unbound when the except block ends
    except KeyboardInterrupt as e:
        error, message, code = e, "interrupted", 130
    if debug_asked(argv):
        traceback.print_exception(error)
    print(f"{prog}: error: {printable(message)}", file=sys.stderr)  # names in it may come from hostile files
    return code


def debug_asked(argv):
    """Whether a failure should show its traceback: --debug on the command line, or MNIST_DEBUG=1."""
    return "--debug" in argv or os.environ.get("MNIST_DEBUG", "") not in ("", "0")


def close_stdout():
    """After the reader of stdout went away: point stdout at /dev/null, so that the interpreter's final
    flush has nowhere to fail, and end quietly (exit status 0)."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's capture)
        pass
    return 0


def describe_error(e):
    """(one-line message, exit code) for an exception that reached the top of a script."""
    if getattr(type(e), "user_error", False):
        return str(e), getattr(e, "code", 1)
    if isinstance(e, MemoryError):
        return "out of memory; try a smaller --batch-size", 1
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing CUDA code here
        return "the GPU ran out of memory; try a smaller --batch-size, --amp bf16, or another --device", 1
    if isinstance(e, OSError) and e.errno in WRITE_HINTS and e.filename:
        return write_problem(e.filename, e), 1
    if isinstance(e, OSError):
        return (f"{e.strerror} ({e.filename})" if e.filename and e.strerror else str(e)), 1
    return f"unexpected {type(e).__name__}: {e}; rerun with --debug for the traceback and report it", 1


def checked(kind, problem, expected):
    """argparse type for a number of KIND that problem(value) accepts: it returns None, or why not
    ("must be 0 or more"); EXPECTED names what a text that is no number should have been."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        why = problem(value)
        if why:
            raise argparse.ArgumentTypeError(f"{why}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def positive(kind):
    """argparse type for numbers that must be > 0 (and finite), with a one-line message otherwise."""
    return checked(
        kind, lambda v: None if v > 0 and v != float("inf") else "must be greater than 0", f"a positive {kind.__name__}"
    )


def non_negative(kind):
    return checked(kind, lambda v: None if v >= 0 and v != float("inf") else "must be 0 or more", "a number")


def chance_and_strength(text):
    """argparse type for P or P:S, a probability and a strength, both in 0..1 (S defaults to 1)."""
    try:
        p, _, strength = text.partition(":")
        value = [float(p), float(strength) if strength else 1.0]  # a list: what args.json gives back
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P or P:S (probability and strength), got {text!r}") from None
    if not all(0 <= v <= 1 for v in value):
        raise argparse.ArgumentTypeError(f"P and S must be between 0 and 1, got {text!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Files written whole or not at all
# ---------------------------------------------------------------------------------------------

# What to do about the errors a write meets; the message names the file and the system's reason.
WRITE_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some of your quota or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EACCES: "check the folder's permissions or write elsewhere",
    errno.EFBIG: "write elsewhere",
}


class WriteError(Exception):
    """A file could not be written (full disk, read-only folder, quota); the previous version is intact."""

    user_error, code = True, 1  # cli.run prints the message as it is


def write_problem(path, e):
    """One sentence for an OSError met while writing PATH."""
    hint = WRITE_HINTS.get(e.errno, "check the disk and the folder")
    return f"cannot write {path}: {e.strerror or e}; {hint}"


TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")  # the temporary files write_atomic makes: .NAME.<random>.tmp


def remove_temporaries(folder, names):
    """Delete the temporary files a killed process left in FOLDER while writing one of NAMES (the
    caller holds the folder, so no write of its own is under way). Only our own names are touched."""
    for entry in os.listdir(folder):
        match = TEMPORARY.fullmatch(entry)
        if match and match.group(1) in names:
            try:
                os.remove(os.path.join(folder, entry))
            except OSError:
                pass


def open_new(path, mode="wb"):
    """Open a file that must not exist yet, for writing: O_EXCL refuses an existing name, and with
    O_NOFOLLOW a symlink planted at the name is refused instead of followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o644), mode)


def output_path(path, flag, reading=()):
    """Where the file the user named with FLAG is to be written, checked before any work: the target of a
    symlink (which stays a link), or the device or FIFO itself (write_atomic writes into those). Refused
    with one line: a folder, a missing folder, or a file that one of READING, the files the command
    reads (inputs, the checkpoint), resolves to under another name."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        raise UserError(f"{flag} {path} is a folder; name a file in it", 2)
    if not os.path.isdir(os.path.dirname(real)):
        raise UserError(f"{flag} {path}: the folder {os.path.dirname(real)} does not exist", 2)
    for source in reading:
        if same_file(real, source):
            raise UserError(f"{flag} {path} is {source}, which this command reads; choose another file", 2)
    return real


def same_file(a, b):
    """Whether paths A and B name one file: through links, and without case on file systems that ignore it."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not there yet
        return os.path.realpath(a) == os.path.realpath(b)


def write_into(path, data):
    """DATA into the device or FIFO at PATH, which a rename would replace (as root, /dev/null for the whole
    machine). A FIFO with no reader is an error, not a wait without end."""
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise WriteError(f"cannot write {path}: it is a FIFO that nothing reads; start its reader first") from None
        raise WriteError(write_problem(path, e)) from None
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)  # O_NONBLOCK was for the open; the writes wait for the reader
    try:
        with os.fdopen(fd, "w" if isinstance(data, str) else "wb") as f:
            data(path) if callable(data) else f.write(data)
    except OSError as e:
        raise WriteError(write_problem(path, e)) from None


def write_atomic(path, data, durable=False):
    """DATA (bytes or text) to PATH through a fresh temporary file beside it, .NAME.<random>.tmp, which
    then replaces PATH in one rename; DATA may also be a function that writes the temporary file's
    path itself (a library's save). With DURABLE the file and its folder are synced to disk before
    and after the rename (checkpoints: a power cut must not leave an empty last.pt). A failed write
    removes the temporary file and raises WriteError naming PATH; the previous version stays. A device
    or FIFO at PATH (`--out /dev/null`, `--out >(gzip)`) is written into instead."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return write_into(path, data)
    if stat.S_ISBLK(mode):
        raise WriteError(f"cannot write {path}: it is a disk device; name a file")
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            with open_new(tmp, "w" if isinstance(data, str) else "wb") as f:
                f.write(data)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable and hasattr(os, "O_DIRECTORY"):  # POSIX: the rename itself, on disk
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:  # a file system that cannot sync a folder: the file itself is synced
                pass
    except OSError as e:
        kept = "; the previous version is kept" if os.path.exists(path) else ""
        raise WriteError(write_problem(path, e) + kept) from None
    finally:
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
        except OSError:  # the folder itself went away or turned read-only: nothing more to do
            pass


def make_folder(path, flag):
    """Create the folder PATH (and its parents) that the command-line option FLAG names, or raise
    WriteError saying that FLAG cannot be written there."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot write to {flag} {path} ({e.strerror}); choose a writable folder") from None


def write_bytes_atomic(data, path, durable=True):
    """Bytes to PATH, whole or not at all, synced to disk with its folder unless told not to."""
    write_atomic(path, data, durable)


def write_text_atomic(text, path):
    write_atomic(path, text)


# ---------------------------------------------------------------------------------------------
# Inputs: regular files only
# ---------------------------------------------------------------------------------------------

KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_input(path, code=1):
    """(PATH opened to read bytes, its size) if it is a regular file, a link followed; else one line saying
    what it is instead, exit CODE. Looked at before it is opened, as a FIFO would wait for a writer forever
    and a device such as /dev/zero never ends, and again once it is (opened without waiting), in case it
    was swapped in between. Every command reads the user's images, CSV and text files through this."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        nonblocking = getattr(os, "O_NONBLOCK", 0)  # POSIX; Windows has no FIFOs to wait on
        fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if nonblocking:
                os.set_blocking(fd, True)
            return os.fdopen(fd, "rb"), st.st_size
        os.close(fd)
        mode = st.st_mode
    kind = next((name for test, name in KINDS if test(mode)), "a special file")
    link = "a link to " if os.path.islink(path) else ""
    raise UserError(f"{path} is {link}{kind}, not a regular file; give a file saved on disk", code)


# ---------------------------------------------------------------------------------------------
# Names are data: class and file names come from the user's files
# ---------------------------------------------------------------------------------------------


def printable(text, width=None):
    """TEXT safe for a terminal: control characters (ESC and the sequences it starts, CR, BEL...) and
    invisible format characters shown as escapes, and the undecodable bytes of a file name as \\xNN;
    with WIDTH, cut to that many characters ("..." last) for a table or a picture's label."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escaped(c) for c in text)
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def _escaped(c):
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by os.fsdecode's surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


FORMULA_START = ("=", "@", "\t", "\r")  # what always makes a spreadsheet read a cell as a formula
# After a leading + or -, what a formula needs to do harm: a call, a link to another program (DDE: cmd|'...'!A0),
# or a cell reference (-A1). A flag such as --model fast, or a number, has none of them.
SIGNED_FORMULA = re.compile(r"[(!|=@]|^[-+]+\$?[A-Za-z]{1,3}\$?[0-9]")


def csv_cell(value):
    """VALUE as a spreadsheet will show it, never run it: a text that would start a formula (=HYPERLINK(...),
    @SUM(...), -A1, +cmd|'/C calc'!A0) gets a leading apostrophe; a number or a flag such as -1 or --lr 0.1
    is left as it is."""
    if isinstance(value, str) and (
        value.startswith(FORMULA_START) or (value.startswith(("+", "-")) and SIGNED_FORMULA.search(value))
    ):
        return "'" + value
    return value


def csv_table(rows):
    """ROWS (lists of cells) as CSV text: cells quoted where they hold a comma, quote or line break, text
    kept from running as a formula, names that are not UTF-8 written with their bytes escaped."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for row in rows:
        writer.writerow([csv_cell(printable(c)) if isinstance(c, str) else c for c in row])
    return buf.getvalue()


def read_log(path):
    """The rows of a CSV log (train.py's log.csv and steps.csv) as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------
# Stopping a long command: signals and a closed output pipe
# ---------------------------------------------------------------------------------------------


class StopRequest:
    """Set by a signal (Ctrl-C, SIGTERM) or a closed output pipe: stop at the end of this step."""

    def __init__(self):
        self.why, self.code = None, None

    def ask(self, why, code):
        if self.why is None:
            self.why, self.code = why, code

    def __bool__(self):
        return self.why is not None


@contextmanager
def stop_on_signals():
    """Ctrl-C, or the SIGTERM with which schedulers (SLURM, Kubernetes) stop or preempt a job, asks the
    run to stop at the end of the step, where it says how to continue; a second signal quits at once,
    and the last save is whole anyway. Exit 130 after Ctrl-C, 143 after SIGTERM, as the shell reports a
    death by signal."""
    stop = StopRequest()

    def handler(signum, frame):
        if stop:
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        stop.ask("interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)", 128 + signum)
        print(f"\n{name}: stopping at the end of this step (send it again to quit now)", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def say(stop, text, end="\n"):
    """print for a run: when the reader of its output went away (`| head`), the run stops at the end
    of the step, as after Ctrl-C, instead of dying in the middle of it."""
    try:
        print(printable(text), end=end, flush=True)  # a dataset's path or notes may carry a file's name
    except BrokenPipeError:
        close_stdout()
        if stop is not None:
            stop.ask("the output pipe closed", 141)
