"""The run folder: args.json, log.csv (a row per epoch, written as it goes) and the epoch line."""
import csv
import io
import json
import os
import time

from cli import UserError
from files import WriteError, write_problem, write_text_atomic

RUN_FILES = ("last.pt", "best.pt", "log.csv", "steps.csv", "args.json")
STEP_COLUMNS = ["step", "epoch", "train_loss", "train_acc", "lr", "images_per_s"]
LOCK_FILE = ".lock"
_locks = {}   # run folder -> the open lock file; the lock lasts until released or the process ends


def lock_folder(out):
    """Hold an exclusive lock on OUT/.lock (which records our pid), so a second train.py cannot write
    into a folder whose run is still going. The kernel drops the lock when its process dies, so the
    file left by a killed run does not block. Where fcntl is missing (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        return
    path = os.path.join(out, LOCK_FILE)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror}); choose a writable folder") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise UserError(f"{out} is in use by a train.py that is still running (pid {pid}); wait for it to end "
                        f"or stop it, or choose another --out", 2) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[os.path.abspath(out)] = f


def release_folders():
    """Drop this process's folder locks (train.main ends; tests run it many times in one process)."""
    while _locks:
        _locks.popitem()[1].close()


def prepare_out(args):
    """Create the run folder. A folder holding another run is refused unless --overwrite."""
    out = args.out or os.path.join("runs", f"{args.dataset}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder; choose another --out", 2)
    existing = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if existing and not args.overwrite:
        raise UserError(f"--out {out} already holds a run ({', '.join(existing)}); pass --resume {out} to "
                        f"continue it, --overwrite to replace it, or choose another --out", 2)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to --out {out} ({e.strerror}); choose a writable folder") from None
    lock_folder(out)   # before anything of a running run could be removed
    try:
        probe = os.path.join(out, ".write-test")
        write_text_atomic("", probe)
        os.remove(probe)
        for f in existing:
            os.remove(os.path.join(out, f))
    except (OSError, WriteError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e).split(": ", 1)[-1]
        raise UserError(f"cannot write to --out {out} ({reason}); choose a writable folder") from None
    return out


def write_args(out, args):
    write_text_atomic(json.dumps(vars(args), indent=1) + "\n", os.path.join(out, "args.json"))


def log_columns(args):
    """CSV columns of a run: fixed by its flags, so every row of one log has the same fields."""
    splits = (["val"] if args.val else []) + ["test"]
    evals = [f"{s}_{m}" for s in splits for m in ("loss", "acc")]
    ema = [f"ema_{c}" for c in evals] if args.ema else []
    return ["epoch", "train_loss", "train_acc", *evals, *ema, "lr", "seconds", "images_per_s"]


def _csv(rows, columns, header):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def rewrite_log(out, rows, columns):
    write_text_atomic(_csv(rows, columns, header=True), os.path.join(out, "log.csv"))


def append_row(out, row, columns, name="log.csv"):
    """One more row at the end of a CSV log; if the write fails, the file is cut back to what it was."""
    path = os.path.join(out, name)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:
        with open(path, "a") as f:
            f.write(_csv([row], columns, header=False))
    except OSError as e:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise WriteError(write_problem(path, e)) from None
        f.flush()


def start_steps(out):
    """An empty steps.csv: the header only."""
    write_text_atomic(",".join(STEP_COLUMNS) + "\n", os.path.join(out, "steps.csv"))


def append_steps(out, row):
    append_row(out, row, STEP_COLUMNS, name="steps.csv")


def trim_steps(out, last_step):
    """Keep the rows of steps.csv up to the global step a resumed checkpoint holds, so that the file
    never shows steps that were not saved (as log.csv is rebuilt from the checkpoint)."""
    path = os.path.join(out, "steps.csv")
    try:
        rows = [r for r in read_log(path) if int(r["step"]) <= last_step]
    except (OSError, ValueError, KeyError, TypeError):   # missing or damaged: its rows cannot be trusted
        rows = []
    write_text_atomic(_csv(rows, STEP_COLUMNS, header=True), path)


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def epoch_line(row, args):
    """One line per epoch: train, val and test loss/accuracy, lr, time and speed."""
    parts = [f"epoch {row['epoch']:>3}/{args.epochs}"]
    if "train_loss" in row:
        parts.append(f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f} %")
    else:
        parts.append("untrained")
    for prefix in ("", "ema_"):
        for split in ("val", "test"):
            if f"{prefix}{split}_loss" in row:
                name = f"{'EMA ' if prefix else ''}{split}"
                parts.append(f"{name} loss {row[f'{prefix}{split}_loss']:.4f} acc {row[f'{prefix}{split}_acc']:.2f} %")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}  {row['seconds']:.1f} s  {row['images_per_s']:,.0f} img/s")
    return "  ".join(parts)
