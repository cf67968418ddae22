"""Beyond the notebooks: the strongest recipes here, over seeds, with test-time augmentation and ensembles.

    python experiments/top.py                        # every row, 2 seeds each; writes results/top.md
    python experiments/top.py mnist --seeds 5        # five MNIST models, then their ensemble
    python experiments/top.py mnist-mix              # the ensemble across rows (MIXES), once its members ran
    python experiments/top.py --table                # rebuild the table from the runs recorded so far

Every row is a recipe file, recipes/top-<row>.args. Like reproduce.py, each finished run is recorded
in results/top.json as it ends, and a run stopped part way resumes from its last checkpoint. Every
accuracy is measured after the last epoch, never at the best test epoch: single models with and
without --tta, and the ensemble (mean softmax) of all seeds of a row (at most 5), all through evaluate.py.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import ledger
from cli import Parser, UserError, positive, run


@dataclass(frozen=True)
class TopRow:
    id: str
    dataset: str
    single: float  # the target of one model, mean over seeds
    ensemble: float  # the target of an ensemble of at most 5
    recipe: str  # recipes/<recipe>.args


@dataclass(frozen=True)
class Mix:
    """An ensemble across rows: the first N seeds of each member row. It was fixed before any of its
    models was evaluated together; choosing seeds or rows by the ensemble's test score would be peeking."""

    id: str
    dataset: str
    target: float
    members: tuple  # (row id, number of its seeds), ...


TOP = [
    TopRow("mnist", "MNIST", 99.70, 99.78, "top-mnist"),
    TopRow("mnist-resnet", "MNIST", 99.70, 99.78, "top-mnist-resnet"),
    TopRow("fashion", "Fashion-MNIST", 94.5, 95.3, "top-fashion"),
    TopRow("fashion-wide", "Fashion-MNIST", 94.5, 95.3, "top-fashion-wide"),
]
MIXES = [Mix("mnist-mix", "MNIST", 99.78, (("mnist", 3), ("mnist-resnet", 2)))]
FLAGS = ledger.commands({row.id: row.recipe for row in TOP})
TOP_IDS = [row.id for row in TOP] + [mix.id for mix in MIXES]


def mix_command(members):
    """What a mix's results are recorded under: they stand only while every member row keeps its command."""
    return " + ".join(f"{n} x {FLAGS[rid]}" for rid, n in members)


COMMANDS = {f"{rid}/{kind}": flags for rid, flags in FLAGS.items() for kind in ("run", "ensemble")}
COMMANDS.update({f"{mix.id}/ensemble": mix_command(mix.members) for mix in MIXES})


def evaluate(paths, opts, tta, out=None):
    """Test accuracy of one checkpoint, or of the ensemble of several, as evaluate.py reports it;
    evaluate.py's report goes to OUT (default: beside the first checkpoint)."""
    out = (out or os.path.join(os.path.dirname(paths[0]), f"eval-{len(paths)}")) + ("-tta" if tta else "")
    argv = [sys.executable, "evaluate.py", *paths, "--out", out, "--device", opts.device]
    argv += (["--tta"] if tta else []) + (["--data-dir", opts.data_dir] if opts.data_dir else [])
    argv += ["--subset", str(ledger.QUICK_IMAGES)] if opts.quick else []  # as train.py's test set in quick mode
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads)) if opts.threads else None
    proc = subprocess.run(argv, cwd=ledger.ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise UserError(f"evaluating failed: {' '.join(argv[1:])}\n  {proc.stderr.strip()[-300:]}")
    with open(os.path.join(out, "report.json")) as f:
        results = json.load(f)["results"]
    return results["ensemble" if len(paths) > 1 else paths[0]]["accuracy"]


def runs_of(results, rid):
    return sorted(results.get(f"{rid}/run", []), key=lambda r: r["seed"])


def run_dir(folder, rid, seed):
    return os.path.join(folder, "top-runs", f"{rid}-{seed}")


def train_seeds(results, path, folder, row, opts):
    """Train the seeds of a row not yet recorded, each then evaluated with TTA; then the ensemble."""
    done = {r["seed"] for r in runs_of(results, row.id)}
    for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
        if seed in done:
            continue
        out = run_dir(folder, row.id, seed)
        acc, wall, epochs = ledger.run_one(row.recipe, seed, out, opts)
        ckpt = ledger.torch.load(os.path.join(out, "last.pt"), weights_only=True)
        tta = evaluate([os.path.join(out, "last.pt")], opts, tta=True)
        print(
            f"{row.id} seed {seed}: {acc:.2f} % ({tta:.2f} % with TTA) after {epochs} epoch{'s' * (epochs != 1)}"
            + (f", {wall / 60:.1f} min" if wall is not None else ""),
            flush=True,
        )
        results = ledger.record(
            path,
            f"{row.id}/run",
            {
                "seed": seed,
                "acc": acc,
                "tta_acc": tta,
                "wall_s": wall,
                "epochs": epochs,
                "params": params_of(ckpt),
                "flags": FLAGS[row.id],
                "recipe": row.recipe,
                **ledger.stamp(opts, out),
            },
            COMMANDS,
        )
    runs = runs_of(results, row.id)
    if len(runs) > 1:
        paths = [os.path.join(run_dir(folder, row.id, r["seed"]), "last.pt") for r in runs[:5]]
        results = ensemble(path, f"{row.id}/ensemble", paths, opts)
    return results


def params_of(ckpt):
    from models import count_params, get_model

    return count_params(get_model(ckpt["model"]["name"], **ckpt["model"]["kwargs"]))


def ensemble(path, key, paths, opts, out=None):
    """Evaluate the ensemble of PATHS without and with TTA; record both under KEY."""
    rid = key.split("/")[0]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:  # e.g. seeds trained on another machine, recorded in a copy of top.json
        print(
            f"{rid}: no ensemble here, {len(missing)} of its checkpoints are missing ({missing[0]}); "
            f"copy their run folders here, then run `python experiments/top.py {rid}` again",
            flush=True,
        )
        return ledger.current_only(ledger.read_runs(path), COMMANDS)
    for tta in (False, True):
        acc = evaluate(paths, opts, tta, out)
        print(f"{rid} ensemble of {len(paths)}{' with TTA' if tta else ''}: {acc:.2f} %", flush=True)
        # "seed" is what record() replaces by: one entry without TTA (0) and one with (1)
        results = ledger.record(
            path,
            key,
            {"seed": int(tta), "tta": tta, "acc": acc, "models": len(paths), "flags": COMMANDS[key]},
            COMMANDS,
        )
    return results


def run_mix(results, path, folder, mix, opts):
    """Evaluate one ensemble across rows, or say which member row still lacks runs."""
    paths = []
    for rid, n in mix.members:
        runs = runs_of(results, rid)
        if len(runs) < n:
            print(
                f"{mix.id}: needs {n} runs of {rid}, {len(runs)} recorded; run "
                f"`python experiments/top.py {rid} --seeds {n}` first",
                flush=True,
            )
            return results
        paths += [os.path.join(run_dir(folder, rid, r["seed"]), "last.pt") for r in runs[:n]]
    return ensemble(path, f"{mix.id}/ensemble", paths, opts, os.path.join(folder, "top-runs", mix.id))


def table(results):
    machines, head = ledger.table_head([r for row in TOP for r in runs_of(results, row.id)])
    lines = [
        f"{head} Test accuracy after the last epoch; mean ± std over seeds (their number in brackets).",
        "",
        "| row | model | params | epochs | one model | one model + TTA | ensemble | ensemble + TTA "
        "| time per run | target (one / ensemble) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in TOP:
        lines.append(table_row(row, results, machines))
    lines += [
        "",
        "Ensembles across rows (the first seeds of each; `python experiments/top.py ID` evaluates one):",
        "",
        "| ensemble | models | params | ensemble | ensemble + TTA | target |",
        "|---|---|---|---|---|---|",
    ]
    for mix in MIXES:
        ens = {r["tta"]: r for r in results.get(f"{mix.id}/ensemble", [])}
        ran = all(runs_of(results, rid) for rid, _ in mix.members)
        params = f"{sum(n * runs_of(results, rid)[0]['params'] for rid, n in mix.members):,}" if ran else ""
        lines.append(
            f"| {mix.id} | {' + '.join(f'{n} × {rid}' for rid, n in mix.members)} | {params} | "
            + " | ".join(f"{ens[t]['acc']:.2f} %" if t in ens else "not run" for t in (False, True))
            + f" | ≥ {mix.target:g} % |"
        )
    lines += [
        "",
        "Commands (`top.py` adds `--seed S --out DIR`; the ensemble is "
        "`python evaluate.py DIR_0/last.pt DIR_1/last.pt ...`, with `--tta` for the last column):",
        "",
    ]
    lines += [f"- {row.id}: `python train.py @{ledger.recipe_path(row.recipe)}`" for row in TOP]
    return "\n".join(lines) + "\n"


def table_row(row, results, machines):
    flags = FLAGS[row.id]
    model = flags.split("--model ")[1].split(" --dataset")[0].split(" --epochs")[0]
    runs = runs_of(results, row.id)
    target = f"≥ {row.single:g} % / ≥ {row.ensemble:g} %"
    if not runs:
        return f"| {row.id} | `{model}` | | | not run | | | | | {target} |"
    ens = {r["tta"]: r for r in results.get(f"{row.id}/ensemble", [])}

    def stat(key):
        values = [r[key] for r in runs if key in r]
        return ledger.mean_std(values) if values else "not run"

    return (
        f"| {row.id} | `{model}` | {runs[0]['params']:,} | {runs[0]['epochs']} | {stat('acc')} | {stat('tta_acc')} | "
        + " | ".join(f"{ens[t]['acc']:.2f} % ({ens[t]['models']})" if t in ens else "not run" for t in (False, True))
        + f" | {ledger.wall_by_machine(runs, machines, minutes)} | {target} |"
    )


def minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"


def main(argv):
    p = Parser(
        prog="top.py",
        description="Train the strongest recipes over seeds; evaluate them with TTA and as ensembles; write the table.",
    )
    p.add_argument("rows", nargs="*", metavar="ROW", help=f"rows to run (default: all): {', '.join(TOP_IDS)}")
    p.add_argument("--seeds", type=positive(int), default=2, help="seeds per row (default: 2)")
    ledger.add_common_flags(p, "top.json, top.md")
    opts = p.parse_args(argv)
    folder, path, results = ledger.open_results(opts, TOP_IDS, "top.json", COMMANDS)
    for row in [] if opts.table else TOP:
        if not opts.rows or row.id in opts.rows:
            results = train_seeds(results, path, folder, row, opts)
    for mix in [] if opts.table else MIXES:
        if not opts.rows or mix.id in opts.rows:
            results = run_mix(results, path, folder, mix, opts)
    ledger.publish(table(results), folder, "top.md")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
