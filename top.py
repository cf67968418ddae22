"""Beyond the notebooks: the strongest recipes here, over seeds, with test-time augmentation and ensembles.

    python top.py                        # every row, 2 seeds each; writes results/top.md
    python top.py mnist --seeds 5        # five MNIST models, then their ensemble
    python top.py mnist-mix              # the ensemble across rows (MIXES), once its members have run
    python top.py --table                # rebuild the table from the runs recorded so far

Like reproduce.py, each finished run is recorded in results/top.json as it ends, and a run stopped
part way (Ctrl-C, a reboot) resumes from its last checkpoint, so a long run can be stopped and
continued. Every accuracy is measured after the last epoch, never at the best test epoch: single
models with and without --tta, and the ensemble (mean softmax) of all seeds of a row, all through
evaluate.py.
"""
import json
import os
import statistics
import subprocess
import sys

import torch

from common import Parser, UserError, machine, non_negative, positive, run, write_text_atomic
from models import count_params, get_model
from reproduce import ROOT, current_only, open_results, read_runs, record, run_one, table_head, wall_by_machine

TOP = [  # id, dataset, target for one model, target for an ensemble of <= 5, flags
    ("mnist", "MNIST", 99.70, 99.78,
     "--model vgg --width 32 --epochs 15 --augment --batch-size 128 --optimizer adam --lr 3e-3 "
     "--scheduler onecycle --label-smoothing 0.1"),
    # The Fashion-MNIST recipe without erasing (strokes are the digit), for a second architecture to mix into
    # the MNIST ensemble: five runs of one recipe are too alike to gain much from averaging.
    ("mnist-resnet", "MNIST", 99.70, 99.78,
     "--model resnet --width 32 --depth 2 --epochs 15 --augment --batch-size 128 --optimizer adamw --lr 3e-3 "
     "--weight-decay 0.05 --scheduler onecycle --label-smoothing 0.1"),
    ("fashion", "Fashion-MNIST", 94.5, 95.3,
     "--model resnet --width 32 --depth 2 --dataset fashion-mnist --epochs 30 --augment --erase 0.25 "
     "--batch-size 128 --optimizer adamw --lr 3e-3 --weight-decay 0.05 --scheduler onecycle --label-smoothing 0.1"),
    # The same at twice the width (4x the parameters), in bf16: a row for a GPU. Fixed before any run of
    # it, as the step in capacity that five seeds of "fashion" (94.4 % on average) cannot make up by averaging.
    ("fashion-wide", "Fashion-MNIST", 94.5, 95.3,
     "--model resnet --width 64 --depth 2 --dataset fashion-mnist --epochs 30 --augment --erase 0.25 "
     "--batch-size 128 --optimizer adamw --lr 3e-3 --weight-decay 0.05 --scheduler onecycle --label-smoothing 0.1 "
     "--amp bf16"),
]
# Ensembles across rows: the first N seeds of each row named. The mix was fixed before any of its
# models was evaluated together; choosing seeds or rows by the ensemble's test score would be peeking.
MIXES = [  # id, dataset, target, (row, number of its seeds) ...
    ("mnist-mix", "MNIST", 99.78, (("mnist", 3), ("mnist-resnet", 2))),
]
FLAGS = {rid: flags for rid, *_, flags in TOP}
TOP_IDS = [row[0] for row in TOP] + [mix[0] for mix in MIXES]
COMMANDS = {f"{rid}/{kind}": flags for rid, flags in FLAGS.items() for kind in ("run", "ensemble")}


def mix_command(members):
    """What a mix's results are recorded under: they stand only while every member row keeps its command."""
    return " + ".join(f"{n} x {FLAGS[rid]}" for rid, n in members)


COMMANDS.update({f"{mid}/ensemble": mix_command(members) for mid, _, _, members in MIXES})


def evaluate(paths, opts, tta, out=None):
    """Test accuracy of one checkpoint, or of the ensemble of several, as evaluate.py reports it;
    evaluate.py's report goes to OUT (default: beside the first checkpoint)."""
    out = (out or os.path.join(os.path.dirname(paths[0]), f"eval-{len(paths)}")) + ("-tta" if tta else "")
    argv = [sys.executable, "evaluate.py", *paths, "--out", out, "--device", opts.device]
    argv += (["--tta"] if tta else []) + (["--data-dir", opts.data_dir] if opts.data_dir else [])
    argv += ["--subset", "512"] if opts.quick else []   # as train.py's test set in quick mode
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads)) if opts.threads else None
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise UserError(f"evaluating failed: {' '.join(argv[1:])}\n  {proc.stderr.strip()[-300:]}")
    results = json.load(open(os.path.join(out, "report.json")))["results"]
    return results["ensemble" if len(paths) > 1 else paths[0]]["accuracy"]


def runs_of(results, rid):
    return sorted(results.get(f"{rid}/run", []), key=lambda r: r["seed"])


def run_dir(folder, rid, seed):
    return os.path.join(folder, "top-runs", f"{rid}-{seed}")


def ensemble(path, key, paths, opts, out=None):
    """Evaluate the ensemble of PATHS without and with TTA; record both under KEY."""
    rid = key.split("/")[0]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:   # e.g. seeds trained on another machine, recorded in a copy of top.json
        print(f"{rid}: no ensemble here, {len(missing)} of its checkpoints are missing ({missing[0]}); "
              f"copy their run folders here, then run `python top.py {rid}` again", flush=True)
        return load(path)
    for tta in (False, True):
        acc = evaluate(paths, opts, tta, out)
        print(f"{rid} ensemble of {len(paths)}{' with TTA' if tta else ''}: {acc:.2f} %", flush=True)
        # "seed" is what record() replaces by: one entry without TTA (0) and one with (1)
        results = record(path, key, {"seed": int(tta), "tta": tta, "acc": acc, "models": len(paths),
                                     "flags": COMMANDS[key]}, COMMANDS)
    return results


def run_mix(results, path, folder, mix, opts):
    """Evaluate one ensemble across rows, or say which member row still lacks runs."""
    mid, _, _, members = mix
    paths = []
    for rid, n in members:
        runs = runs_of(results, rid)
        if len(runs) < n:
            print(f"{mid}: needs {n} runs of {rid}, {len(runs)} recorded; run `python top.py {rid} --seeds {n}` "
                  "first", flush=True)
            return results
        paths += [os.path.join(run_dir(folder, rid, r["seed"]), "last.pt") for r in runs[:n]]
    return ensemble(path, f"{mid}/ensemble", paths, opts, os.path.join(folder, "top-runs", mid))


def table(results):
    machines, head = table_head([r for rid, *_ in TOP for r in runs_of(results, rid)])
    lines = [f"{head} Test accuracy after the "
             "last epoch; mean ± std over seeds (their number in brackets).", "",
             "| row | model | params | epochs | one model | one model + TTA | ensemble | ensemble + TTA "
             "| time per run | target (one / ensemble) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for rid, dataset, single, ensemble, flags in TOP:
        runs = runs_of(results, rid)
        ens = {r["tta"]: r for r in results.get(f"{rid}/ensemble", [])}

        def stat(key):
            values = [r[key] for r in runs if key in r]
            if not values:
                return "not run"
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.2f} ± {std:.2f} % ({len(values)})"
        model = flags.split("--model ")[1].split(" --dataset")[0].split(" --epochs")[0]
        lines.append(
            f"| {rid} | `{model}` | {runs[0]['params']:,} | {runs[0]['epochs']} | {stat('acc')} | {stat('tta_acc')} | "
            + " | ".join(f"{ens[t]['acc']:.2f} % ({ens[t]['models']})" if t in ens else "not run" for t in (False, True))
            + f" | {wall_by_machine(runs, machines, minutes)} | ≥ {single:g} % / ≥ {ensemble:g} % |"
            if runs else f"| {rid} | `{model}` | | | not run | | | | | ≥ {single:g} % / ≥ {ensemble:g} % |")
    lines += ["", "Ensembles across rows (the first seeds of each; `python top.py ID` evaluates one):", "",
              "| ensemble | models | params | ensemble | ensemble + TTA | target |", "|---|---|---|---|---|---|"]
    for mid, _, target, members in MIXES:
        ens = {r["tta"]: r for r in results.get(f"{mid}/ensemble", [])}
        ran = all(runs_of(results, rid) for rid, _ in members)
        params = f"{sum(n * runs_of(results, rid)[0]['params'] for rid, n in members):,}" if ran else ""
        lines.append(f"| {mid} | {' + '.join(f'{n} × {rid}' for rid, n in members)} | {params} | "
                     + " | ".join(f"{ens[t]['acc']:.2f} %" if t in ens else "not run" for t in (False, True))
                     + f" | ≥ {target:g} % |")
    lines += ["", "Commands (`top.py` adds `--seed S --out DIR`; the ensemble is "
              "`python evaluate.py DIR_0/last.pt DIR_1/last.pt ...`, with `--tta` for the last column):", ""]
    lines += [f"- {rid}: `python train.py {flags}`" for rid, *_, flags in TOP]
    return "\n".join(lines) + "\n"


def minutes(seconds):
    return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"


def main(argv):
    p = Parser(prog="top.py", description="Train the strongest recipes over seeds; evaluate them with TTA and "
               "as ensembles; write the table.")
    p.add_argument("rows", nargs="*", metavar="ROW", help=f"rows to run (default: all): {', '.join(TOP_IDS)}")
    p.add_argument("--seeds", type=positive(int), default=2, help="seeds 0..N-1 per row (default: 2)")
    p.add_argument("--first-seed", type=non_negative(int), default=0, help="(default: 0)")
    p.add_argument("--results", default="results", help="folder for top.json, top.md and the runs (default: results)")
    p.add_argument("--device", default="auto", help="passed to train.py and evaluate.py (default: auto)")
    p.add_argument("--data-dir", help="passed to train.py and evaluate.py (default: their search)")
    p.add_argument("--threads", type=positive(int), help="CPU threads per run (OMP_NUM_THREADS) (default: torch's)")
    p.add_argument("--quick", action="store_true", help="each row on 512 images for 1 epoch, tested on 512, into "
                   "RESULTS/quick; checks that every command runs")
    p.add_argument("--table", action="store_true", help="only rebuild the table from the recorded runs")
    opts = p.parse_args(argv)
    folder, path, results = open_results(opts, TOP_IDS, "top.json", load)
    for rid, *_, flags in ([] if opts.table else TOP):
        if opts.rows and rid not in opts.rows:
            continue
        done = {r["seed"] for r in runs_of(results, rid)}
        for seed in range(opts.first_seed, opts.first_seed + opts.seeds):
            if seed in done:
                continue
            out = run_dir(folder, rid, seed)
            acc, wall, epochs = run_one(flags, seed, out, opts)
            ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
            tta = evaluate([os.path.join(out, "last.pt")], opts, tta=True)
            params = count_params(get_model(ckpt["model"]["name"], **ckpt["model"]["kwargs"]))
            print(f"{rid} seed {seed}: {acc:.2f} % ({tta:.2f} % with TTA) after {epochs} epoch{'s' * (epochs != 1)}"
                  + (f", {wall / 60:.1f} min" if wall is not None else ""), flush=True)
            results = record(path, f"{rid}/run", {"seed": seed, "acc": acc, "tta_acc": tta, "wall_s": wall,
                                                  "epochs": epochs, "params": params, "flags": flags,
                                                  "machine": machine(opts.device),
                                                  "threads": opts.threads or torch.get_num_threads()},
                             COMMANDS)
        runs = runs_of(results, rid)
        if len(runs) > 1:
            paths = [os.path.join(run_dir(folder, rid, r["seed"]), "last.pt") for r in runs[:5]]
            results = ensemble(path, f"{rid}/ensemble", paths, opts)
    for mix in ([] if opts.table else MIXES):
        if not opts.rows or mix[0] in opts.rows:
            results = run_mix(results, path, folder, mix, opts)
    md = table(results)
    write_text_atomic(md, os.path.join(folder, "top.md"))
    print(md, end="")
    return 0


def load(path):
    """top.json's runs of the current commands (see reproduce.current_only)."""
    return current_only(read_runs(path), COMMANDS)


if __name__ == "__main__":
    sys.exit(run(main))
