"""Runs of train.py as data: read a run, group runs into configurations, summarise their seeds, tell
whether a difference is more than the seeds' noise, and train a recipe for a seed.

    run = read_run("runs/mnist-cnn-20261122-101500")        # args, log rows, model record, status
    configs = group([read_run(p) for p in paths])           # one Config per set of flags, seeds apart
    print(markdown(configs, verdicts(configs)))              # the table compare.py prints
    train_jobs([Job("recipes/fast.args", path, 0, "runs/cmp/fast-seed0")], [], 1, print)

A run's score is its last epoch's test accuracy (the EMA weights' with --ema, as evaluate.py scores
them), never its best epoch's: picking the best epoch would pick it on the test set. This module
imports only torch, the standard library and the toolkit's support modules, so compare.py and the
ledgers under experiments/ can share it.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch

from checkpoint import load_checkpoint, model_kwargs
from cli import HERE, StopRequest, UserError, csv_table, printable, read_log, write_text_atomic
from data import DATASETS
from models import count_params, get_model

RUN_KEYS = set("model dataset epochs batch_size optimizer seed".split())  # in every args.json of train.py's
# Flags that do not change what is trained: runs differing only in these (and the seed) are one configuration.
NOT_TRAINING = set(
    "out resume overwrite device debug progress log_every tensorboard data_dir eval_every compile".split()
)
DATA_KEYS = ("dataset", "test", "subset")  # which images a run trains and is scored on
OUTPUTS = ("compare.md", "compare.csv", "curves.png")  # compare.py --out's own files, beside runs in a folder
FAILED = "compare-failed.json"  # left in a run folder by train_jobs when its train.py failed
CHECKPOINT_SUFFIXES = (".pt", ".pth")


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What a run folder (or a checkpoint file) says about its run."""

    path: str  # as given
    args: dict  # train.py's resolved flags
    rows: list  # log.csv's rows as numbers, one per finished epoch (epoch 0: --eval-untrained)
    model: dict = None  # the checkpoint's {"name", "kwargs"}; None before the first save
    test_split: str = None  # a fingerprint of the checkpoint's record of its test split
    status: str = "done"  # done, running, failed, stopped at epoch k of N, no finished epoch yet

    @property
    def seed(self):
        return self.args.get("seed")

    @property
    def epochs(self):
        return [r for r in self.rows if r["epoch"] > 0]

    def last(self, split):
        """The last scored accuracy of SPLIT (test or val): the EMA weights' when the run kept them."""
        key = f"{'ema_' if self.args.get('ema') else ''}{split}_acc"
        scored = [r[key] for r in self.rows if key in r]
        return scored[-1] if scored else None

    def curve(self, key):
        """{epoch: value} of a log column (train_loss) or of the score ("score": test accuracy as last())."""
        if key == "score":
            key = f"{'ema_' if self.args.get('ema') else ''}test_acc"
        return {r["epoch"]: r[key] for r in self.rows if key in r}

    @property
    def seconds(self):
        return sum(r.get("seconds", 0.0) for r in self.rows)


def read_run(path):
    """A run folder (args.json, log.csv, last.pt when an epoch has ended) or a checkpoint file (its args
    and history), with its status. One-line UserErrors: exit 2 for a path that is no run, 1 for a
    damaged file."""
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; check the path", 2)
    if os.path.isdir(path):
        folder, args = path, read_args(path)
        ckpt = load_checkpoint(os.path.join(path, "last.pt")) if os.path.exists(os.path.join(path, "last.pt")) else None
        log = os.path.join(path, "log.csv")
        rows = read_rows(log) if os.path.exists(log) else [numbers(r, path) for r in (ckpt or {}).get("history", [])]
    elif path.endswith(CHECKPOINT_SUFFIXES):
        folder, ckpt = os.path.dirname(os.path.abspath(path)), load_checkpoint(path)
        args = ckpt.get("args")
        if not (isinstance(args, dict) and RUN_KEYS <= set(args)) or not isinstance(ckpt.get("history"), list):
            raise UserError(
                f"{path} holds no record of its training run (train.py's flags and log); it cannot be compared"
            )
        rows = [numbers(r, path) for r in ckpt["history"]]
    else:
        raise UserError(
            f"{path} is neither a run folder nor a checkpoint (.pt); pass run folders or checkpoints "
            f"(narrow a glob such as runs/* to runs/*/)",
            2,
        )
    run = Run(path, args, rows)
    if ckpt is not None:
        run.model = ckpt["model"]
        run.test_split = fingerprint(ckpt["data"].get("test"))
    run.status = status(run, folder, (ckpt or {}).get("stopping") or {})
    return run


def read_args(folder):
    """FOLDER/args.json when train.py wrote it (it holds at least RUN_KEYS), else a one-line UserError."""
    name = os.path.join(folder, "args.json")
    if not os.path.exists(name):
        inside = [e for e in sorted(os.listdir(folder)) if os.path.exists(os.path.join(folder, e, "args.json"))]
        hint = (
            f"; it holds runs, e.g. {os.path.join(folder, inside[0])}: pass {os.path.join(folder, '*')}"
            if inside
            else ""
        )
        raise UserError(f"{folder} is not a run folder: it has no args.json of train.py's{hint}", 2)
    try:
        with open(name) as f:
            args = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{name} cannot be read ({e}); it is damaged") from None
    if not (isinstance(args, dict) and RUN_KEYS <= set(args)):
        raise UserError(
            f"{folder} is not a run folder: its args.json is not train.py's (it lacks {sorted(RUN_KEYS)})", 2
        )
    return args


def read_rows(path):
    try:
        return [numbers(r, path) for r in read_log(path)]
    except (OSError, csv.Error) as e:
        raise UserError(f"{path} cannot be read ({e}); it is damaged") from None


def numbers(row, path):
    """A log row with numbers for values; empty cells (a figure not computed that epoch) left out."""
    out = {}
    for key, value in row.items():
        if value in ("", None) or key is None:
            continue
        try:
            out[key] = int(value) if key == "epoch" else float(value)
        except (TypeError, ValueError):
            raise UserError(f"{path} is damaged: its {key} column holds {value!r}, not a number") from None
    if "epoch" not in out:
        raise UserError(f"{path} is damaged: a row has no epoch")
    return out


def fingerprint(record):
    """A short, comparable digest of a checkpoint's test-split record (it may hold a tensor of indices)."""
    if record is None:
        return None

    def plain(v):
        if isinstance(v, torch.Tensor):
            return v.tolist()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return hashlib.sha256(json.dumps(plain(record), sort_keys=True).encode()).hexdigest()[:12]


def is_running(folder):
    """Whether a live train.py holds FOLDER/.lock. The lock file is opened read-only and only tried with a
    shared lock, released at once: it is never created or changed here."""
    try:
        import fcntl
    except ImportError:  # Windows: train.py takes no lock there either
        return False
    try:
        fd = os.open(os.path.join(folder, ".lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the shared lock if we got it


def status(run, folder, stopping):
    """done, running, failed, stopped at epoch k of N, or no finished epoch yet."""
    if is_running(folder):
        return "running"
    finished = len(run.epochs)
    failed = read_failure(folder)
    if failed is not None and finished <= failed.get("epochs", 0):  # not continued since it failed
        return "failed"
    if not finished:
        return "no finished epoch yet"
    if finished < run.args["epochs"] and not stopping.get("stopped"):
        return f"stopped at epoch {finished} of {run.args['epochs']}"
    return "done"


def read_failure(folder):
    try:
        with open(os.path.join(folder, FAILED)) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def parameters(run):
    """The model's parameter count, built on the meta device (no memory): from the checkpoint's model
    record, or from the flags before the first checkpoint. None when neither can say (your own data's
    classes are known only once the run has saved)."""
    spec = run.model
    if spec is None:
        info = DATASETS.get(run.args["dataset"])
        if info is None:
            return None
        spec = {"name": run.args["model"], "kwargs": model_kwargs(argparse.Namespace(**run.args), len(info.classes))}
    try:
        with torch.device("meta"):
            return count_params(get_model(spec["name"], **spec["kwargs"]))
    except Exception:  # a model this toolkit no longer has, or options it refuses: leave the cell empty
        return None


def gather(paths):
    """The runs at PATHS, each once (a folder and its last.pt are one run). compare.py's own outputs
    (compare.md, compare.csv, curves.png) in a folder of runs are passed over, so `compare.py DIR/*`
    works on a folder it wrote into."""
    runs, seen = [], set()
    for path in paths:
        if os.path.basename(path) in OUTPUTS and os.path.isfile(path):
            continue
        run = read_run(path)
        real = os.path.realpath(path)
        if os.path.basename(real) == "last.pt":
            real = os.path.dirname(real)
        if real not in seen:
            seen.add(real)
            runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------
# Configurations and their statistics
# ---------------------------------------------------------------------------------------------


@dataclass
class Summary:
    """Accuracies of several seeds: mean, sample standard deviation (0 for one seed), count."""

    mean: float
    sd: float
    n: int


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return Summary(statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def compare(best, other):
    """(difference of means, its standard error, whether it counts) of OTHER against BEST. The rule: a
    difference counts when it is over twice its standard error, sqrt(sd1²/n1 + sd2²/n2), about a 95 %
    interval that excludes zero. With one seed on either side there is no spread to compare with:
    whether it counts is None."""
    diff = other.mean - best.mean
    if best.n < 2 or other.n < 2:
        return diff, None, None
    se = math.sqrt(best.sd**2 / best.n + other.sd**2 / other.n)
    return diff, se, abs(diff) > 2 * se


RULE = "rule: a difference counts when it is over twice its standard error, sqrt(sd1²/n1 + sd2²/n2)"


@dataclass
class Config:
    """Runs whose flags differ only in the seed and in flags that do not change what is trained."""

    args: dict  # the first run's flags, without NOT_TRAINING and the seed
    runs: list = field(default_factory=list)
    label: str = ""  # the flags that set it apart from the other configurations
    data: str = ""  # which data, where runs on several data sets are compared (--allow-mixed)

    @property
    def test(self):
        return summarize([r.last("test") for r in self.runs])

    @property
    def val(self):
        return summarize([r.last("val") for r in self.runs])

    @property
    def status(self):
        if len({r.status for r in self.runs}) == 1:  # done, or every seed alike
            return self.runs[0].status
        odd = sorted((r for r in self.runs if r.status != "done"), key=lambda r: str(r.seed))
        return "; ".join(f"seed {r.seed}: {r.status}" for r in odd)


def training_args(args):
    return {k: v for k, v in args.items() if k not in NOT_TRAINING and k != "seed"}


def group(runs, allow_mixed=False):
    """The runs as configurations, best test accuracy first (those without a score last), each labelled
    by the flags whose values differ between them. Runs on different data are refused unless
    ALLOW_MIXED, and then each configuration's data is named."""
    if not runs:
        raise UserError("no runs to compare", 2)
    if not any(r.epochs for r in runs):
        raise UserError(f"no run has a finished epoch yet ({', '.join(r.path for r in runs[:3])}); wait for one", 1)
    data = {id(r): data_label(r) for r in runs}
    splits = sorted({r.test_split for r in runs if r.test_split is not None})
    if len(splits) > 1:  # the same flags, other test images (your own data changed on disk)
        data = {
            id(r): data[id(r)] + (f" (test split {splits.index(r.test_split) + 1})" if r.test_split else "")
            for r in runs
        }
    if len(set(data.values())) > 1 and not allow_mixed:
        first, other = runs[0], next(r for r in runs if data[id(r)] != data[id(runs[0])])
        raise UserError(
            f"{first.path} and {other.path} were scored on different data ({data[id(first)]}; {data[id(other)]}), "
            f"so their accuracies do not compare; pass --allow-mixed to list them anyway",
            2,
        )
    configs = {}
    for run in runs:
        key = json.dumps(training_args(run.args), sort_keys=True, default=str) + data[id(run)]
        configs.setdefault(key, Config(training_args(run.args), data=data[id(run)])).runs.append(run)
    configs = list(configs.values())
    if len({c.data for c in configs}) == 1:
        for c in configs:
            c.data = ""
    mixed = any(c.data for c in configs)  # then the data column names the data, and the label the rest
    keys = [
        k
        for k in dict.fromkeys(k for c in configs for k in c.args)
        if len({flag(k, c.args.get(k)) for c in configs}) > 1 and not (mixed and k in DATA_KEYS)
    ]
    for c in configs:
        c.label = " ".join(f for f in (flag(k, c.args.get(k)) for k in keys) if f)
    return sorted(configs, key=lambda c: (c.test is None, -(c.test.mean if c.test else 0), c.label, c.data))


def data_label(run):
    """The data a run was scored on, in words: the dataset (a path's last part), --test, --subset."""
    args = run.args
    name = os.path.basename(str(args["dataset"]).rstrip("/\\")) or str(args["dataset"])
    parts = [name] + ([f"--test {os.path.basename(str(args['test']))}"] if args.get("test") else [])
    return " ".join(parts + ([f"--subset {args['subset']}"] if args.get("subset") else []))


def flag(key, value):
    """A flag as typed: --augment / --no-augment for booleans, nothing for an absent value, P:S lists."""
    name = "--" + key.replace("_", "-")
    if value is None:
        return ""
    if isinstance(value, bool):
        return name if value else f"--no-{name[2:]}"
    if isinstance(value, list):
        return f"{name} {':'.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)}"
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


def verdicts(configs):
    """One line per configuration after the best, comparing it with the best by the rule in RULE."""
    best = configs[0]
    lines = []
    for c in configs[1:]:
        if best.test is None or c.test is None:
            continue
        diff, se, counts = compare(best.test, c.test)
        than = f"{abs(diff):.2f} points {'below' if diff <= 0 else 'above'} `{name(best)}`"
        if counts is None:
            lines.append(f"`{name(c)}`: {than}; cannot tell: one seed")
        else:
            noise = "larger than the seeds' noise" if counts else "within the seeds' noise"
            lines.append(f"`{name(c)}`: {than} (2 SE = {2 * se:.2f}): {noise}")
    return lines


def name(config):
    """A configuration named by its differing flags (and its data, where that differs)."""
    return " ".join(p for p in (config.label, config.data) if p) or config.args["model"]


# ---------------------------------------------------------------------------------------------
# The table, in Markdown and CSV
# ---------------------------------------------------------------------------------------------


def cells(config):
    """{column: text} of a configuration's row in the printed table."""
    test, val, done = config.test, config.val, [r for r in config.runs if r.epochs]
    params = parameters(config.runs[0])
    epochs = sorted({len(r.epochs) for r in done})
    row = {
        "differs": f"`{config.label}`" if config.label else "",
        "data": config.data,
        "model": config.args["model"],
        "params": f"{params:,}" if params is not None else "",
        "epochs": (f"{epochs[0]}-{epochs[-1]}" if len(epochs) > 1 else str(epochs[0])) if epochs else "0",
        "time (s)": f"{statistics.mean(r.seconds for r in done):.1f}" if done else "",
        "test accuracy": percent(test) if test else (config.status if config.status != "done" else "not scored"),
        "val accuracy": percent(val) if val else "",
        "status": config.status,
    }
    return row


def percent(s):
    return f"{s.mean:.2f} ± {s.sd:.2f} % ({s.n})" if s.n > 1 else f"{s.mean:.2f} % (1)"


def columns(configs):
    """The printed table's columns: differs only between several configurations, data only when mixed,
    val only when a run has it, status only when a run is not done."""
    cols = ["differs"] if len(configs) > 1 else []
    cols += ["data"] if any(c.data for c in configs) else []
    cols += ["model", "params", "epochs", "time (s)", "test accuracy"]
    cols += ["val accuracy"] if any(c.val for c in configs) else []
    return cols + (["status"] if any(c.status != "done" for c in configs) else [])


def markdown(configs, lines):
    """The table (Markdown, padded to read in a terminal too), then the rule and the verdict lines."""
    cols = columns(configs)
    rows = [[printable(row[k]).replace("|", "\\|") for k in cols] for row in map(cells, configs)]
    width = [max(len(k), *(len(r[i]) for r in rows)) for i, k in enumerate(cols)]
    text = "| " + " | ".join(k.ljust(w) for k, w in zip(cols, width)) + " |\n"
    text += "|" + "|".join("-" * (w + 2) for w in width) + "|\n"
    text += "".join("| " + " | ".join(v.ljust(w) for v, w in zip(r, width)) + " |\n" for r in rows)
    if lines:
        text += f"\n{RULE}\n" + "".join(f"- {line}\n" for line in lines)
    return text


CSV_COLUMNS = "differs data model params epochs seconds test_mean test_sd n val_mean val_sd status".split()


def csv_text(configs):
    """One row per configuration, numbers unrounded beyond 4 decimals, for a spreadsheet (cli.csv_table:
    labels and data names come from the user's flags and paths, so none may run as a formula)."""
    rows = [CSV_COLUMNS]
    for c in configs:
        test, val, done = c.test, c.val, [r for r in c.runs if r.epochs]
        rows.append(
            [
                c.label,
                c.data,
                c.args["model"],
                parameters(c.runs[0]) or "",
                max((len(r.epochs) for r in done), default=0),
                f"{statistics.mean(r.seconds for r in done):.2f}" if done else "",
                f"{test.mean:.4f}" if test else "",
                f"{test.sd:.4f}" if test else "",
                test.n if test else 0,
                f"{val.mean:.4f}" if val else "",
                f"{val.sd:.4f}" if val else "",
                c.status,
            ]
        )
    return csv_table(rows)


# ---------------------------------------------------------------------------------------------
# Training a recipe for a seed, several at a time
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One recipe trained with one seed into its own folder."""

    recipe: str  # as the user named it, for the progress lines
    path: str  # the recipe file, found
    seed: int
    out: str  # the run folder
    fresh: bool = False  # start over even where the folder holds a run (train.py --overwrite)


@dataclass
class Outcome:
    """How a job ended: kept (already trained), or its train.py's exit status and wall time."""

    job: Job
    action: str  # start, resume, restart (over a run that could not be resumed) or keep (already trained)
    code: int = 0
    seconds: float = None
    last_line: str = ""  # of its stderr, for a failure


def recipe_file(path):
    """A recipe as cli.Parser reads @PATH: as given, else relative to the toolkit's folder; None if neither."""
    for candidate in (path, os.path.join(HERE, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    return None


def plan(job):
    """start, restart (--overwrite, for a fresh job), or resume: every folder that holds a run goes back
    to train.py --resume, which checks that its flags are still the recipe's and says when it is complete."""
    if job.fresh:
        return "restart"
    held = any(os.path.exists(os.path.join(job.out, f)) for f in ("args.json", "last.pt"))
    return "resume" if held else "start"


PATH_FLAGS = ("--data-dir", "--dataset", "--test")


def absolute_paths(extra):
    """EXTRA flags with the paths they name made absolute: train.py runs in the toolkit's folder."""
    out, after_flag = [], False
    for token in extra:
        flag_name, eq, value = token.partition("=")
        if after_flag and os.path.exists(token):
            token = os.path.abspath(token)
        elif eq and flag_name in PATH_FLAGS and os.path.exists(value):
            token = f"{flag_name}={os.path.abspath(value)}"
        after_flag = token in PATH_FLAGS
        out.append(token)
    return out


def train_argv(job, action, extra):
    """train.py's arguments: a fresh run of the recipe, or --resume of its folder. The recipe and seed go
    with --resume too, so that train.py refuses, in one line, a run whose flags are no longer these."""
    where = ["--resume"] if action == "resume" else ["--out"]
    again = ["--overwrite"] if action == "restart" else []
    return [
        "@" + job.path,
        "--seed",
        str(job.seed),
        *where,
        os.path.abspath(job.out),
        *again,
        "--progress",
        "off",
        *extra,
    ]


def train_jobs(jobs, extra, parallel, report, threads=None, restart_refused=False):
    """Train each job, PARALLEL at a time, each its own train.py with THREADS CPU threads (default: the
    cores shared out); REPORT(outcome) as each ends. A run train.py refuses to resume (its flags are no
    longer the recipe's) fails, or with RESTART_REFUSED starts over. Ctrl-C and SIGTERM are passed on to
    the running train.py processes (in sessions of their own, so a terminal's Ctrl-C reaches them only
    through here), which keep their last finished epoch and exit; no new job starts. Returns 0, or
    130/143 when stopped by a signal."""
    env = dict(os.environ)
    if threads or parallel > 1:  # each process's threads on its share of the cores, not all fighting for all
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(threads or max(1, cores // parallel))
    stop, live, pending = StopRequest(), {}, [(job, plan(job)) for job in jobs]

    def forward(signum, frame):
        stop.ask("interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)", 128 + signum)
        for proc, *_ in live.values():  # a second signal, passed on too, makes train.py quit at once
            try:
                proc.send_signal(signum)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while (pending and not stop) or live:
            while pending and len(live) < parallel and not stop:
                job, action = pending.pop(0)
                try:
                    os.remove(os.path.join(job.out, FAILED))  # tried again: no longer failed
                except OSError:
                    pass
                err, said = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
                proc = subprocess.Popen(
                    [sys.executable, os.path.join(HERE, "train.py"), *train_argv(job, action, extra)],
                    cwd=HERE,
                    stdout=said,
                    stderr=err,
                    text=True,
                    env=env,
                    start_new_session=True,
                )
                live[proc.pid] = (proc, job, action, (err, said), time.perf_counter())
                if stop:  # the signal came while it started: it gets it too
                    proc.send_signal(signal.SIGINT if stop.code == 130 else signal.SIGTERM)
            time.sleep(0.1)
            for pid, (proc, job, action, (err, said), t0) in list(live.items()):
                if proc.poll() is None:
                    continue
                del live[pid]
                err.seek(0), said.seek(0)
                last_line, complete = (err.read().strip().splitlines() or [""])[-1], " is complete (" in said.read()
                err.close(), said.close()
                if proc.returncode == 2 and action == "resume" and restart_refused and not stop:
                    pending.insert(0, (job, "restart"))  # its flags are no longer the recipe's: start over
                    continue
                action = "keep" if complete and not proc.returncode else action
                outcome = Outcome(job, action, proc.returncode, time.perf_counter() - t0, last_line)
                if proc.returncode and not stop and proc.returncode not in (130, 143):
                    note_failure(outcome)
                if not (stop and proc.returncode):  # one stopped by our signal is no failure: it continues
                    report(outcome)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return stop.code or 0


def note_failure(outcome):
    """Mark the run folder failed (with the epochs it has), so that compare.py on the folder says so too;
    the mark is removed when the run is tried again."""
    out = outcome.job.out
    if not os.path.exists(os.path.join(out, "args.json")):  # refused before it made its folder: nothing to mark
        return
    try:
        epochs = len([r for r in read_rows(os.path.join(out, "log.csv")) if r["epoch"] > 0])
    except UserError:
        epochs = 0
    record = {"code": outcome.code, "epochs": epochs, "error": outcome.last_line}
    write_text_atomic(json.dumps(record) + "\n", os.path.join(out, FAILED))
