"""The run ledger that reproduce.py and top.py share: run a recipe with train.py (through runs.py, the
runner and statistics compare.py uses), record it, summarise.

Every finished run is recorded in a JSON file (results/reproduce.json, results/top.json) as soon as it
ends, under its command's key ("004/ours"), with its seed, final accuracy, wall time, machine and the
recipe's flags. A run of a recipe whose flags have changed since stays in the file but out of the
tables. A run stopped part way (Ctrl-C, SIGTERM, a reboot) is resumed from its checkpoint by the same
command; its wall time is then unknown and shows as "not timed".
"""

import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the toolkit's modules, for the scripts in this folder

import torch  # noqa: E402

import runs  # noqa: E402
from cli import UserError, non_negative, positive, recipe_flags, write_text_atomic  # noqa: E402
from device import machine  # noqa: E402

RESULTS = os.path.join(ROOT, "results")
QUICK_IMAGES = 512  # --quick: train and test on this many images, for one epoch


def recipe_path(name):
    """recipes/NAME.args, relative to the toolkit's folder."""
    return f"recipes/{name}.args"


def commands(recipes):
    """{key: the flags of its recipe file}: what a recorded run must match to count."""
    return {key: recipe_flags(recipe_path(name)) for key, name in recipes.items()}


# ---------------------------------------------------------------------------------------------
# Running train.py
# ---------------------------------------------------------------------------------------------


def run_one(recipe, seed, out, opts, resume=True):
    """Train once, through compare.py's runner (runs.train_jobs); (final test accuracy, wall seconds to
    0.1 s, epochs run). A run folder left by a stopped run of the same command is resumed rather than
    started over, and its wall time is then None, because the stopped part was not timed; one left by
    another command (train.py refuses to resume it) is started over."""
    extra = ["--device", opts.device] + (["--data-dir", opts.data_dir] if opts.data_dir else [])
    if opts.quick:  # argparse keeps the last value, so these override the recipe's own
        extra += ["--subset", str(QUICK_IMAGES), "--epochs", "1"]
    job = runs.Job(recipe, os.path.join(ROOT, recipe_path(recipe)), seed, out, fresh=not resume)
    outcomes = []
    code = runs.train_jobs([job], extra, 1, outcomes.append, opts.threads, restart_refused=True)
    if code:
        raise UserError(f"stopped part way; the same command continues the run in {out}", code)
    outcome = outcomes[-1]
    if outcome.code:
        raise UserError(
            f"this run failed: train.py {' '.join(runs.train_argv(job, outcome.action, extra))}\n  "
            f"{outcome.last_line or 'no output'}"
        )
    if outcome.action in ("resume", "keep"):
        print(f"continued the stopped run in {out}", flush=True)
    run = runs.read_run(out)
    # A run with --ema is its EMA weights: evaluate.py, predict.py and export.py use them by default.
    wall = round(outcome.seconds, 1) if outcome.action in ("start", "restart") else None
    return run.last("test"), wall, len(run.epochs)


def stamp(opts, out):
    """What every recorded run carries about where it ran, and the precision train.py chose there (its
    --amp auto depends on the machine, so two runs of one recipe may differ in it)."""
    with open(os.path.join(out, "args.json")) as f:
        amp = json.load(f).get("amp", "off")
    return {
        "machine": machine(opts.device),
        "torch": torch.__version__,
        "threads": opts.threads or torch.get_num_threads(),
        "amp": amp,
    }


# ---------------------------------------------------------------------------------------------
# The record
# ---------------------------------------------------------------------------------------------


def read_runs(path):
    """Every run recorded in a results file, by 'row/kind', as written."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a results file ({e}); move it away to start afresh") from None


def current_only(recorded, commands):
    """The runs of today's commands; a run of a command whose flags have changed since answers
    another question. It stays in the file, only out of the table."""
    return {key: [r for r in runs if r.get("flags") == commands.get(key)] for key, runs in recorded.items()}


def record(path, key, run, commands):
    """Add one run to the file, replacing a run of the same seed and flags, and return the current runs.
    The file is re-read just before and rewritten with every other run as it stands, so processes
    sharing it (even ones started with other commands) never drop each other's runs."""
    recorded = read_runs(path)
    same = (run["seed"], run.get("flags"))
    recorded[key] = [r for r in recorded.get(key, []) if (r["seed"], r.get("flags")) != same] + [run]
    write_text_atomic(json.dumps(recorded, indent=1) + "\n", path)
    return current_only(recorded, commands)


def open_results(opts, row_ids, name, commands):
    """Check the rows asked for, then (results folder, results file, the current runs recorded in it)."""
    unknown = [r for r in opts.rows if r not in row_ids]
    if unknown:
        raise UserError(f"unknown row {unknown[0]!r}; choose from: {', '.join(row_ids)}", 2)
    folder = os.path.join(opts.results, "quick") if opts.quick else opts.results
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    return folder, path, current_only(read_runs(path), commands)


def add_common_flags(p, what):
    """The flags reproduce.py and top.py share."""
    p.add_argument("--first-seed", type=non_negative(int), default=0, help="(default: 0)")
    p.add_argument("--results", default=RESULTS, help=f"folder for {what} and the runs' folders (default: results)")
    p.add_argument("--device", default="auto", help="passed to train.py (default: auto)")
    p.add_argument("--data-dir", help="passed to train.py (default: train.py's search)")
    p.add_argument(
        "--threads",
        type=positive(int),
        help="CPU threads per run (OMP_NUM_THREADS), recorded with each run; "
        "e.g. 1 to leave the other cores free (default: torch's own choice)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="each command on 512 images for 1 epoch, into RESULTS/quick; checks that every command runs",
    )
    p.add_argument("--table", action="store_true", help="only rebuild the table from the recorded runs")


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def publish(md, folder, name):
    """Print the table and write it to FOLDER/NAME and into FOLDER/README.md, the report, between the
    lines <!-- begin NAME --> and <!-- end NAME --> where it has them, so the report's tables are always
    the recorded runs' (a test rebuilds them and compares)."""
    print(md, end="")
    write_text_atomic(md, os.path.join(folder, name))
    report = os.path.join(folder, "README.md")
    if not os.path.exists(report):
        return
    with open(report) as f:
        text = f.read()
    begin, end = f"<!-- begin {name} -->\n", f"<!-- end {name} -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        write_text_atomic(head + begin + md + end + rest.split(end, 1)[1], report)


def table_head(runs):
    """(the machines the runs were timed on, in a fixed order; the table's opening words naming them
    and the CPU threads per run)."""
    machines = sorted({r.get("machine", "?") for r in runs if r.get("wall_s") is not None}) or [machine()]
    threads = sorted({r.get("threads", "?") for r in runs}, key=str)
    named = (
        f"Machine: {machines[0]}"
        if len(machines) == 1
        else "Machines: " + "; ".join(f"[{i}] {name}" for i, name in enumerate(machines, 1))
    )
    return machines, f"{named}; {'/'.join(map(str, threads))} CPU thread(s) per run."


def median_wall(runs):
    """Median wall time of the runs timed from start to end (None if none were)."""
    walls = [r["wall_s"] for r in runs if r.get("wall_s") is not None]
    return statistics.median(walls) if walls else None


def wall_by_machine(runs, machines, fmt):
    """Median wall time per machine, formatted by FMT; tagged [i] (the machine's place in MACHINES)
    where the table has runs from more than one, since a GPU's minutes are not a CPU's."""
    cells = []
    for i, name in enumerate(machines, 1):
        wall = median_wall([r for r in runs if r.get("machine", "?") == name])
        if wall is not None:
            cells.append(fmt(wall) + (f" [{i}]" if len(machines) > 1 else ""))
    return ", ".join(cells) or "not timed"


def mean_std(values):
    """'mean ± sd % (n)' of accuracies, as compare.py writes a cell."""
    return runs.percent(runs.summarize(values))
