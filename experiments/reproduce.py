"""Replay each notebook's recipe with train.py, then a better recipe with the same model and budget.

    python experiments/reproduce.py                       # every row, 3 seeds each; writes results/reproduce.md
    python experiments/reproduce.py 000 004 --seeds 1     # some rows only
    python experiments/reproduce.py --quick               # each command for a few steps: checks that all run

Every command is a recipe file, recipes/<row>-notebook.args or recipes/<row>-ours.args. Each finished
run is recorded in results/reproduce.json as soon as it ends (see ledger.py), so an interrupted
reproduction continues where it stopped, and the table is rebuilt from every run recorded so far.
Accuracy is the test accuracy after the last epoch (never the best epoch).
"""

import os
import sys
from dataclasses import dataclass

import ledger
from cli import Parser, positive, run


@dataclass(frozen=True)
class Row:
    id: str
    model: str  # as the table names it
    dataset: str
    recipe: str  # what the notebook did, in words
    reported: str  # the notebook's own figure, or None where the row above's serves
    target: float  # the mean over seeds our recipe must reach
    notebook: str  # recipe file of the replay, or None where the row above's serves
    ours: str  # recipe file of our recipe, or None where the row above's serves


ROWS = [
    Row(
        "000",
        "cnn",
        "MNIST",
        "RAdam 1.5e-3, decoupled wd, exp decay 0.9, batch 600, 5 epochs",
        "99.31",
        99.35,
        "000-notebook",
        "000-ours",
    ),
    Row(
        "001",
        "cnn3",
        "Fashion-MNIST",
        "SGD 1e-3, momentum 0.9, wd 0.04, batch 64, 1 epoch, MNIST's mean/std",
        "87.1",
        89.0,
        "001-notebook",
        "001-ours",
    ),
    Row(
        "002-E1",
        "convnet",
        "MNIST",
        "Adam 1e-3, batch 32, 10 epochs, raw 0-255 pixels",
        "98.58",
        99.3,
        "002-e1-notebook",
        "002-e1-ours",
    ),
    Row(
        "002-E2",
        "convnet p=0.5",
        "MNIST",
        "Adam 1e-3, L1 1e-3 + L2 1e-3, until train loss < 0.38",
        "98.50",
        99.3,
        "002-e2-notebook",
        "002-e2-ours",
    ),
    Row(
        "003",
        "lenet5",
        "MNIST",
        "SGD 0.01, momentum 0.9, batch 32, 10 epochs, without augmentation",
        "98.39",
        99.2,
        "003-notebook",
        "003-ours",
    ),
    Row("003-aug", "lenet5", "MNIST", "the same, with augmentation", "98.52", 99.2, "003-aug-notebook", None),
    Row(
        "004",
        "tiny",
        "MNIST",
        "SGD 0.01, momentum 0.9, batch 64, 20 epochs",
        "99.12 (best epoch)",
        99.40,
        "004-notebook",
        "004-ours",
    ),
    Row(
        "004-tiny2",
        "tiny2",
        "MNIST",
        "the notebook's next step: no hidden linear layer, wider first layers",
        None,
        99.40,
        None,
        "004-tiny2",
    ),
]
ROW_IDS = [row.id for row in ROWS]
RECIPES = {
    f"{row.id}/{kind}": name for row in ROWS for kind, name in (("notebook", row.notebook), ("ours", row.ours)) if name
}
COMMANDS = ledger.commands(RECIPES)


def cell(runs, machines):
    """'mean ± std' of accuracy and the median wall time per machine, from the runs recorded for one command."""
    if not runs:
        return "not run", ""
    return (ledger.mean_std([r["acc"] for r in runs]), ledger.wall_by_machine(runs, machines, lambda s: f"{s:.0f} s"))


def table(results):
    machines, head = ledger.table_head([r for runs in results.values() for r in runs])
    lines = [
        f"{head} Accuracy: final-epoch test accuracy, mean ± std over seeds (their number in brackets); "
        "time: median wall time of one whole `train.py` process.",
        "",
        "| row | model | dataset | recipe | notebook reported | notebook replayed | time | ours | time | target |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # A row without one of the two commands shares the row above's: one "ours" serves both 003 rows,
    # and 004-tiny2 has no notebook of its own.
    for row in ROWS:
        nb_acc, nb_time = cell(results.get(f"{row.id}/notebook", []), machines) if row.notebook else ("(as above)", "")
        ours_acc, ours_time = cell(results.get(f"{row.id}/ours", []), machines) if row.ours else ("(as above)", "")
        reported = f"{row.reported} %" if row.reported else "(as above)"
        lines.append(
            f"| {row.id} | `{row.model}` | {row.dataset} | {row.recipe} | {reported} "
            f"| {nb_acc} | {nb_time} | {ours_acc} | {ours_time} | ≥ {row.target:g} % |"
        )
    lines += ["", "Commands (`reproduce.py` adds `--seed S --out DIR`):", ""]
    lines += [
        f"- {key.replace('/', ' ')}: `python train.py @{ledger.recipe_path(name)}`" for key, name in RECIPES.items()
    ]
    return "\n".join(lines) + "\n"


def main(argv):
    p = Parser(prog="reproduce.py", description="Replay the notebooks' recipes and ours; write the table.")
    p.add_argument("rows", nargs="*", metavar="ROW", help=f"rows to run (default: all): {', '.join(ROW_IDS)}")
    p.add_argument("--which", choices=["notebook", "ours", "both"], default="both", help="(default: both)")
    p.add_argument("--seeds", type=positive(int), default=3, help="seeds per command (default: 3)")
    p.add_argument("--redo", action="store_true", help="run again seeds that are already recorded")
    ledger.add_common_flags(p, "reproduce.json, reproduce.md")
    opts = p.parse_args(argv)
    folder, path, results = ledger.open_results(opts, ROW_IDS, "reproduce.json", COMMANDS)
    for key, name in [] if opts.table else RECIPES.items():
        rid, kind = key.split("/")
        if (opts.rows and rid not in opts.rows) or opts.which not in (kind, "both"):
            continue
        done = {r["seed"] for r in results.get(key, [])}
        for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
            if seed in done and not opts.redo:
                continue
            out = os.path.join(folder, "runs", f"{rid}-{kind}-{seed}")
            acc, wall, epochs = ledger.run_one(name, seed, out, opts, resume=not opts.redo)
            print(
                f"{key} seed {seed}: {acc:.2f} % after {epochs} epochs"
                + (f", {wall:.0f} s" if wall is not None else ""),
                flush=True,
            )
            results = ledger.record(
                path,
                key,
                {
                    "seed": seed,
                    "acc": acc,
                    "wall_s": wall,
                    "epochs": epochs,
                    "flags": COMMANDS[key],
                    "recipe": name,
                    **ledger.stamp(opts, out),
                },
                COMMANDS,
            )
    ledger.publish(table(results), folder, "reproduce.md")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
