"""Writing files whole or not at all: the one writer every command and module uses.

    write_text_atomic("...", "runs/x/args.json")
    write_bytes_atomic(buffer.getbuffer(), "runs/x/last.pt")           # synced to disk, with its folder
    write_atomic("model.onnx", lambda tmp: program.save(tmp))          # a library that writes a path itself

The data goes to a temporary file with a name of its own in the target's folder, created exclusively
(never through a link someone planted there), then replaces the target in one rename, so a crash, a
full disk or a second process leaves either the old file or the new one, never half of either. This
module imports nothing of the toolkit's, so everything else may use it.
"""
import errno
import os
import re
import secrets

# What to do about the errors a write meets; the message names the file and the system's reason.
WRITE_HINTS = {errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some of your quota or "
               "write elsewhere", errno.EROFS: "the file system is read-only: write elsewhere",
               errno.EACCES: "check the folder's permissions or write elsewhere", errno.EFBIG: "write elsewhere"}


class WriteError(Exception):
    """A file could not be written (full disk, read-only folder, quota); the previous version is intact."""
    user_error, code = True, 1   # cli.run prints the message as it is


def write_problem(path, e):
    """One sentence for an OSError met while writing PATH."""
    hint = WRITE_HINTS.get(e.errno, "check the disk and the folder")
    return f"cannot write {path}: {e.strerror or e}; {hint}"


def temporary_name(path):
    """A fresh name beside PATH: .NAME.<random>.tmp, in the folder the rename happens in."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")


TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")   # what temporary_name makes


def remove_temporaries(folder, names):
    """Delete the temporary files a killed process left in FOLDER while writing one of NAMES (the
    caller holds the folder, so no write of its own is under way). Only our own names are touched."""
    removed = []
    for entry in os.listdir(folder):
        match = TEMPORARY.fullmatch(entry)
        if match and match.group(1) in names:
            try:
                os.remove(os.path.join(folder, entry))
                removed.append(entry)
            except OSError:
                pass
    return removed


def open_new(path, mode="wb"):
    """Open a file that must not exist yet, for writing: O_EXCL refuses an existing name, and with
    O_NOFOLLOW a symlink planted at the name is refused instead of followed."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o644), mode)


def sync_folder(path):
    """Make a rename in PATH's folder durable (POSIX; elsewhere a no-op)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (OSError, AttributeError):
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, write, durable=False):
    """write(tmp) fills a temporary file beside `path`, which then replaces `path` in one rename. With
    `durable`, the file and its folder are synced to disk first (checkpoints: a power cut must not
    leave an empty last.pt). A failed write removes the temporary file and raises WriteError naming
    `path`; the previous version stays."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            sync_folder(path)
    except OSError as e:
        kept = "; the previous version is kept" if os.path.exists(path) else ""
        raise WriteError(write_problem(path, e) + kept) from None
    finally:
        try:
            if os.path.lexists(tmp):
                os.remove(tmp)
        except OSError:   # the folder itself went away or turned read-only: nothing more to do
            pass


def make_folder(path, flag):
    """Create the folder PATH (and its parents) that the command-line option FLAG names, or raise
    WriteError saying that FLAG cannot be written there."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot write to {flag} {path} ({e.strerror}); choose a writable folder") from None


def write_bytes_atomic(data, path, durable=True):
    """Bytes to `path` through a fresh temporary file; synced to disk with its folder unless told not to."""
    def write(tmp):
        with open_new(tmp) as f:
            f.write(data)
    write_atomic(path, write, durable)


def write_text_atomic(text, path):
    def write(tmp):
        with open_new(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)
