"""Compare training runs: one row per configuration, its seeds as mean ± sd, and whether each difference
from the best is more than the seeds' noise.

    python compare.py runs/*                                  # run folders or checkpoints, seeds grouped
    python compare.py runs/a-seed* runs/b-seed* --out report/  # also compare.md, compare.csv, curves.png
    python compare.py --recipes recipes/003-notebook.args recipes/003-aug-notebook.args --seeds 3 \\
        --out runs/cmp -- --epochs 2                          # train each recipe for seeds 0-2, then compare

A run's score is its last epoch's test accuracy (the EMA weights' with --ema), never its best epoch's.
Runs whose flags differ only in the seed (and in flags that do not change what is trained, such as
--device or --out) are one configuration. With --recipes, the same command again continues: finished
runs are kept, stopped ones resumed, missing ones started; Ctrl-C stops every train.py at its last
finished epoch.
"""

import os
import sys

import plots
from cli import HERE, Parser, UserError, make_folder, positive, run, write_text_atomic
from runs import (
    Job,
    absolute_paths,
    csv_text,
    gather,
    group,
    markdown,
    name,
    read_run,
    recipe_file,
    train_jobs,
    verdicts,
)

SEEDS, JOBS = 3, 1


def build_parser():
    p = Parser(
        prog="compare.py",
        description="Compare runs of train.py over their seeds, or train recipes for several seeds "
        "and compare them. Flags after -- go to every train.py.",
    )
    p.add_argument("runs", nargs="*", metavar="RUN", help="run folders or checkpoint files (.pt)")
    p.add_argument(
        "--recipes",
        nargs="+",
        metavar="RECIPE",
        help="train each recipe file (such as recipes/fast.args) for --seeds seeds into --out, "
        "continuing what an earlier call left, then compare them",
    )
    p.add_argument("--seeds", type=positive(int), metavar="N", help=f"with --recipes: seeds 0..N-1 (default: {SEEDS})")
    p.add_argument(
        "--jobs",
        type=positive(int),
        metavar="N",
        help=f"with --recipes: runs at a time, each with its share of the CPU cores (default: {JOBS})",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="write DIR/compare.md, compare.csv and curves.png; with --recipes also the runs, "
        "as DIR/<recipe>-seed<S> (default: print only)",
    )
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="compare runs scored on different data (datasets, test sets, --subset), with a data column",
    )
    return p


def main(argv):
    argv, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(argv)
    if args.recipes:
        return train_recipes(args, extra)
    if extra or args.seeds or args.jobs:
        raise UserError("--seeds, --jobs and flags after -- are for --recipes", 2)
    if not args.runs:
        raise UserError("name the runs to compare (run folders or checkpoints), or --recipes to train some", 2)
    show(group(gather(args.runs), args.allow_mixed), args.out)
    return 0


def show(configs, out):
    """Print the table and the verdicts; with OUT also write them, the CSV and the curves there."""
    text = markdown(configs, verdicts(configs))
    print(text, end="", flush=True)
    if not out:
        return
    make_folder(out, "--out")
    write_text_atomic(text, os.path.join(out, "compare.md"))
    write_text_atomic(csv_text(configs), os.path.join(out, "compare.csv"))
    written = ["compare.md", "compare.csv"]
    if plots.have_matplotlib():
        curves = [(name(c), [{k: r.curve(k) for k in ("score", "train_loss")} for r in c.runs]) for c in configs]
        panels = [("score", "test accuracy (%)"), ("train_loss", "training loss")]
        title = "mean over seeds, band: min to max"
        plots.seed_bands_png(curves, os.path.join(out, "curves.png"), panels, title)
        written.append("curves.png")
    else:
        print("skipped curves.png: it needs matplotlib (pip install matplotlib)")
    print(f"wrote {', '.join(written)} in {out}")


def train_recipes(args, extra):
    """Train every recipe for seeds 0..N-1 into --out, the runs already there continued or kept; then
    print the table of them all, as `compare.py DIR/*` would."""
    if args.runs:
        raise UserError(f"give runs or --recipes, not both ({args.runs[0]} and --recipes)", 2)
    if not args.out:
        raise UserError("--recipes needs --out DIR, the folder its runs go to", 2)
    for taken in ("--seed", "--out", "--resume", "--overwrite"):
        if any(t == taken or t.startswith(taken + "=") for t in extra):
            raise UserError(f"{taken} after -- is compare.py's to set; drop it (seeds: --seeds, folder: --out)", 2)
    recipes = {}
    for recipe in args.recipes:
        path = recipe_file(recipe)
        if path is None:
            raise UserError(
                f"recipe {recipe} does not exist; the named recipes are in {os.path.join(HERE, 'recipes')}", 2
            )
        name = os.path.splitext(os.path.basename(recipe))[0]
        if recipes.get(name, (recipe, path))[1] != path:
            raise UserError(
                f"two recipes are named {name} ({recipes[name][0]}, {recipe}); their runs would share folders", 2
            )
        recipes[name] = (recipe, path)
    jobs = [
        Job(recipe, path, seed, os.path.join(args.out, f"{name}-seed{seed}"))
        for seed in range(args.seeds or SEEDS)  # seed 0 of every recipe first: the earliest comparison
        for name, (recipe, path) in recipes.items()
    ]
    make_folder(args.out, "--out")
    outcomes = []

    def report(outcome):
        outcomes.append(outcome)
        print(progress_line(outcome), flush=True)

    code = train_jobs(jobs, absolute_paths(extra), args.jobs or JOBS, report)
    if code:
        why = "interrupted" if code == 130 else "terminated (SIGTERM)"
        print(
            f"compare.py: {why}; the stopped runs keep their last finished epoch, and the same command continues them",
            file=sys.stderr,
        )
        return code
    runs = gather([j.out for j in jobs if os.path.exists(os.path.join(j.out, "args.json"))])
    show(group(runs, args.allow_mixed), args.out)
    failed = [o for o in outcomes if o.code and o.code not in (130, 143)]
    if failed:
        raise UserError(f"{len(failed)} of {len(jobs)} runs failed (see their lines above)")
    return 0


def progress_line(outcome):
    """RECIPE seed S: accuracy in time -> folder; or why it failed, in train.py's last line."""
    job = outcome.job
    head = f"{job.recipe} seed {job.seed}"
    if outcome.code in (130, 143):
        return f"{head}: stopped (exit {outcome.code}); the same command continues it -> {job.out}"
    if outcome.code:
        return f"{head}: failed (exit {outcome.code}): {outcome.last_line or 'no output'}"
    try:
        score = read_run(job.out).last("test")
    except UserError as e:
        return f"{head}: finished, but {e}"
    how = "already trained" if outcome.action == "keep" else f"in {outcome.seconds:.0f} s"
    how += " (continued)" if outcome.action == "resume" else ""
    return f"{head}: {f'{score:.2f} %' if score is not None else 'not scored'} {how} -> {job.out}"


if __name__ == "__main__":
    sys.exit(run(main))
