"""A run's folder: its lock, args.json, log.csv (a row per epoch), steps.csv, checkpoints and TensorBoard.

    out = prepare_out(args)                                   # a new folder; an old run only with --overwrite
    folder = RunFolder(out, args, data, progress, world)          # what the training loop writes through
    folder.append_epoch(row, step); folder.save(stepper, epoch, step, partial)

Rank 0 alone writes under torchrun; a write that fails there (a full disk) stops every rank at once.
"""
import argparse
import csv
import io
import json
import os
import time

import distributed
from checkpoint import checkpoint_path, load_checkpoint, make_record, rng_state, save_checkpoint
from cli import UserError
from files import WriteError, make_folder, remove_temporaries, write_problem, write_text_atomic

RUN_FILES = ("last.pt", "best.pt", "log.csv", "steps.csv", "args.json")
# Flags a resumed run may change; every other flag must match the checkpoint's.
RESUME_MAY_CHANGE = {"epochs", "device", "data_dir", "resume", "debug", "save_every", "compile", "progress",
                     "log_every", "tensorboard", "eval_every", "out", "overwrite"}
# An args.json of ours holds at least these flags; --overwrite replaces a folder only when it has one.
RUN_KEYS = {"model", "dataset", "epochs", "batch_size", "optimizer", "seed"}
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
    try:   # never through a symlink planted at the name: the pid would be written into its target
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644), "r+")
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
    remove_temporaries(out, RUN_FILES)   # a save cut off by a kill left its half-written file


def release_folders():
    """Drop this process's folder locks (train.main ends; tests run it many times in one process)."""
    while _locks:
        _locks.popitem()[1].close()


def prepare_out(args):
    """Create the run folder. A folder holding another run is refused unless --overwrite."""
    data = os.path.splitext(os.path.basename(args.dataset.rstrip("/\\")))[0] or "data"   # a name, or a path's last part
    out = args.out or os.path.join("runs", f"{data}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder; choose another --out", 2)
    existing = [f for f in RUN_FILES if os.path.lexists(os.path.join(out, f))]
    if existing and not args.overwrite:
        raise UserError(f"--out {out} already holds a run ({', '.join(existing)}); pass --resume {out} to "
                        f"continue it, --overwrite to replace it, or choose another --out", 2)
    if existing and read_run_args(out) is None:
        raise UserError(f"--out {out} holds {', '.join(existing)} but no args.json of a train.py run, so they are "
                        f"not a run of ours; --overwrite replaces only a run folder: choose another --out", 2)
    make_folder(out, "--out")
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


def read_run_args(folder):
    """The flags in FOLDER/args.json when it is one that train.py wrote, else None."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and RUN_KEYS <= set(saved) else None


def find_resume(path):
    """(checkpoint or None, its folder, whether that is the run's own, saved arguments) for --resume PATH.
    A folder is the run's own when PATH is its last.pt with the run's args.json beside it; any other
    checkpoint (a best.pt, a copy elsewhere) continues only in a new folder (--out). A run killed
    before its first save has args.json but no last.pt: it starts over with those arguments."""
    args_file = os.path.join(path, "args.json")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "last.pt")) and os.path.exists(args_file):
        saved = read_run_args(path)
        if saved is None:
            raise UserError(f"{args_file} is not a train.py run's; start a new run instead", 2)
        return None, os.path.abspath(path), True, saved
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("args"), dict) or ckpt.get("optimizer") is None:
        raise UserError(f"{path} holds weights without the training state a resume needs (optimizer, "
                        f"random streams); train a new run, or evaluate it with evaluate.py", 2)
    file = os.path.abspath(checkpoint_path(path))
    folder = os.path.dirname(file)
    saved = read_run_args(folder)
    own = os.path.basename(file) == "last.pt" and saved is not None and all(
        saved.get(k) == v for k, v in ckpt["args"].items() if k not in RESUME_MAY_CHANGE)
    return ckpt, folder, own, ckpt["args"]


def resume_args(build_parser, argv, saved):
    """The saved run's arguments, with the flags typed now (ARGV, parsed by train.py's parser) that a
    resume may change; any other flag typed must match the saved one."""
    parser, quiet = build_parser(), build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    explicit = vars(quiet.parse_args(argv))
    for key, value in explicit.items():
        if key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume: the run was trained with {flag} {saved.get(key)}, not {value}; "
                            f"drop {flag} to continue it as it was, or start a new run", 2)
    args = parser.parse_args([])
    vars(args).update({k: v for k, v in saved.items() if k in vars(args)})
    vars(args).update({k: v for k, v in explicit.items() if k in RESUME_MAY_CHANGE})
    return args


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
    try:   # O_NOFOLLOW: a symlink planted at the name is refused, not appended to
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(path, flags, 0o644), "a") as f:
            f.write(_csv([row], columns, header=False))
    except OSError as e:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise WriteError(write_problem(path, e)) from None


def keep_steps(source, out, last_step):
    """OUT/steps.csv as SOURCE's rows up to the global step a resumed checkpoint holds, so that it never
    shows steps that were not saved (as log.csv is rebuilt from the checkpoint). SOURCE is OUT for a
    run resumed in place, the old folder (only read) for one continued in a new folder."""
    try:
        rows = [r for r in read_log(os.path.join(source, "steps.csv")) if int(r["step"]) <= last_step]
    except (OSError, ValueError, KeyError, TypeError):   # missing or damaged: its rows cannot be trusted
        rows = []
    write_text_atomic(_csv(rows, STEP_COLUMNS, header=True), os.path.join(out, "steps.csv"))


def read_log(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class RunFolder:
    """The folder as the training loop writes it. Under torchrun every rank calls the same methods at
    the same steps; rank 0 writes, and a failed write reaches every rank (distributed.on_rank0)."""

    def __init__(self, out, args, data, progress, world=None, tensorboard=False):
        self.out, self.args, self.data, self.world = out, args, data, world
        self.progress = progress   # checkpoint.Progress: the history and early-stopping state it saves
        self.columns = log_columns(args)
        self.rank0 = world is None or world.rank == 0
        self.tb = None
        if tensorboard and self.rank0:
            from torch.utils.tensorboard import SummaryWriter   # optional; train.py checks for it
            self.tb = SummaryWriter(os.path.join(out, "tb"))

    def _write(self, fn, *args):
        return fn(*args) if self.world is None else distributed.on_rank0(self.world, fn, *args)

    def append_epoch(self, row, step):
        """A row of log.csv, and the epoch's figures in TensorBoard at its last global step."""
        self._write(append_row, self.out, row, self.columns)
        if self.tb is not None:
            for key, value in row.items():
                if key.endswith(("_loss", "_acc")):
                    self.tb.add_scalar(f"epoch/{key}", value, step)
            self.tb.flush()

    def append_steps(self, row):
        self._write(append_row, self.out, row, STEP_COLUMNS, "steps.csv")
        if self.tb is not None:
            for key in ("train_loss", "train_acc", "lr", "images_per_s"):
                self.tb.add_scalar(f"step/{key}", row[key], row["step"])

    def save(self, stepper, epoch, step, partial=None, name="last.pt"):
        """The checkpoint after `epoch` epochs and `step` steps of the next one. Every rank gives its
        random streams; rank 0 writes."""
        rngs = distributed.gather(self.world, rng_state(stepper.device))
        self._write(lambda: save_checkpoint(make_record(stepper, self.args, self.data, self.progress, epoch, step,
                                                        partial, rngs), os.path.join(self.out, name)))

    def has(self, name):
        return os.path.exists(os.path.join(self.out, name))

    def close(self):
        if self.tb is not None:
            self.tb.close()


def epoch_line(row, epochs):
    """One line per epoch: train, val and test loss/accuracy, lr, time and speed."""
    parts = [f"epoch {row['epoch']:>3}/{epochs}"]
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
