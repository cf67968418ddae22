"""compare.py and runs.py: runs grouped into configurations over their seeds, the table checked against
the runs' own logs, the 2-SE rule on numbers worked by hand, every bad input in one line, and (slow)
--recipes trained, interrupted, continued and compared with `compare.py DIR/*`."""

import csv
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys

import pytest

from conftest import ROOT, capture, main_of, one_line, png_size, run_cli

RULE = "rule: a difference counts when it is over twice its standard error"


def train(out, synth_data, *flags):
    code, _, err = capture(
        lambda: main_of(
            "train",
            ["--epochs", "2", "--data-dir", synth_data, "--out", out, "--progress", "off", *flags],
        )
    )
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def runs(synth_data, tmp_path_factory):
    """Two models x two seeds on the synthetic set, and one run on another dataset: {name: folder}."""
    root = tmp_path_factory.mktemp("compare")
    made = {
        f"{model}-{seed}": train(str(root / f"{model}-{seed}"), synth_data, "--model", model, "--seed", str(seed))
        for model in ("fast", "cnn-basic")
        for seed in (0, 1)
    }
    # the same flat IDX files read as Fashion-MNIST: another dataset as far as the runs' records go
    made["fashion"] = train(str(root / "fashion"), synth_data, "--model", "fast", "--dataset", "fashion-mnist")
    return made


def last_test_acc(folder):
    with open(os.path.join(folder, "log.csv")) as f:
        return float(list(csv.DictReader(f))[-1]["test_acc"])


def table_rows(text):
    """The table's rows as {column: cell}, in printed order."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_four_runs_make_two_configurations_sorted_by_accuracy(runs, tmp_path):
    four = [runs[k] for k in ("fast-0", "cnn-basic-1", "fast-1", "cnn-basic-0")]
    code, out, err = capture(lambda: main_of("compare", [*four, "--out", str(tmp_path / "report")]))
    assert code == 0, err
    rows = table_rows(out)
    assert len(rows) == 2
    means = {m: statistics.mean(last_test_acc(runs[f"{m}-{s}"]) for s in (0, 1)) for m in ("fast", "cnn-basic")}
    expected = sorted(means, key=means.get, reverse=True)
    assert [r["model"] for r in rows] == expected
    assert [r["differs"] for r in rows] == [f"`--model {m}`" for m in expected]
    for row in rows:
        assert "± " in row["test accuracy"] and row["test accuracy"].endswith("(2)")
        assert row["test accuracy"].startswith(f"{means[row['model']]:.2f} ± ")
    assert RULE in out
    verdict = next(line for line in out.splitlines() if line.startswith("- "))
    gap = means[expected[0]] - means[expected[1]]
    assert verdict.startswith(f"- `--model {expected[1]}`: {gap:.2f} points below `--model {expected[0]}`")

    report = tmp_path / "report"
    assert (report / "compare.md").read_text() in out  # the printed table, as it was printed
    with open(report / "compare.csv") as f:
        written = {r["model"]: r for r in csv.DictReader(f)}
    for model in ("fast", "cnn-basic"):
        accs = [last_test_acc(runs[f"{model}-{s}"]) for s in (0, 1)]
        assert float(written[model]["test_mean"]) == pytest.approx(statistics.mean(accs), abs=1e-3)
        assert float(written[model]["test_sd"]) == pytest.approx(statistics.stdev(accs), abs=1e-3)
        assert written[model]["n"] == "2" and written[model]["differs"] == f"--model {model}"
        assert int(written[model]["params"]) == {"fast": 52_266, "cnn-basic": 108_874}[model]
    import plots

    if plots.have_matplotlib():
        assert png_size(report / "curves.png")[0] > 500


def fake_run(model, seed, acc):
    """A run as runs.read_run would give it, from numbers: what the statistics see."""
    from runs import Run

    args = {"model": model, "dataset": "mnist", "epochs": 1, "batch_size": 128, "optimizer": "adam", "seed": seed}
    return Run(f"{model}-{seed}", args, [{"epoch": 1, "test_acc": acc}])


def test_the_two_standard_error_rule_on_numbers_worked_by_hand():
    from runs import Summary, compare, group, verdicts

    # a clear difference: 0.5 points, standard error sqrt(0.05²/3 * 2) = 0.0408
    diff, se, counts = compare(Summary(99.5, 0.05, 3), Summary(99.0, 0.05, 3))
    assert diff == pytest.approx(-0.5) and se == pytest.approx(0.040825, abs=1e-6) and counts is True
    # a noisy one: 0.2 points against a standard error of sqrt(0.5²/3 * 2) = 0.408
    diff, se, counts = compare(Summary(99.5, 0.5, 3), Summary(99.3, 0.5, 3))
    assert se == pytest.approx(0.408248, abs=1e-6) and counts is False
    # just over and just under twice the standard error (sd 0.1 over 4 seeds each: SE 0.0707)
    assert compare(Summary(99.0, 0.1, 4), Summary(98.85, 0.1, 4))[2] is True
    assert compare(Summary(99.0, 0.1, 4), Summary(98.87, 0.1, 4))[2] is False
    assert compare(Summary(99.5, 0.0, 1), Summary(90.0, 0.5, 5))[2] is None

    configs = group(
        [fake_run("a", 0, 99.5), fake_run("a", 1, 99.6), fake_run("b", 0, 98.0), fake_run("b", 1, 98.1)]
        + [fake_run("c", 0, 99.2), fake_run("c", 1, 99.8), fake_run("d", 0, 99.9)]
    )
    assert [c.label for c in configs] == ["--model d", "--model a", "--model c", "--model b"]
    lines = verdicts(configs)
    assert lines[0] == "`--model a`: 0.35 points below `--model d`; cannot tell: one seed"
    # against a one-seed best nothing can be told; with a best of two seeds:
    lines = verdicts(configs[1:])
    assert lines == [
        "`--model c`: 0.05 points below `--model a` (2 SE = 0.61): within the seeds' noise",
        "`--model b`: 1.50 points below `--model a` (2 SE = 0.14): larger than the seeds' noise",
    ]


def test_a_path_that_is_not_a_run_is_one_line(runs, tmp_path):
    compare = lambda *argv: one_line(lambda: main_of("compare", list(argv)))
    code, line = compare(runs["fast-0"], str(tmp_path / "gone"))
    assert code == 2 and f"{tmp_path / 'gone'} does not exist" in line
    (tmp_path / "empty").mkdir()
    code, line = compare(runs["fast-0"], str(tmp_path / "empty"))
    assert code == 2 and f"{tmp_path / 'empty'} is not a run folder" in line
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "args.json").write_text(json.dumps({"model": "fast", "epochs": 2}))
    code, line = compare(runs["fast-0"], str(tmp_path / "other"))
    assert code == 2 and "its args.json is not train.py's" in line
    notes = tmp_path / "notes.txt"  # what a glob such as runs/* also matches
    notes.write_text("to do\n")
    code, line = compare(runs["fast-0"], str(notes))
    assert code == 2 and f"{notes} is neither a run folder nor a checkpoint" in line
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(open(os.path.join(runs["fast-0"], "last.pt"), "rb").read()[:2000])
    code, line = compare(runs["fast-0"], str(damaged))
    assert code == 1 and str(damaged) in line and "damaged" in line
    code, line = compare()
    assert code == 2 and "name the runs to compare" in line


def test_runs_on_different_data_are_refused_unless_allowed(runs, capsys):
    code, line = one_line(lambda: main_of("compare", [runs["fast-0"], runs["fashion"]]))
    assert code == 2 and "different data (mnist; fashion-mnist)" in line and "--allow-mixed" in line
    code, out, err = capture(lambda: main_of("compare", [runs["fast-0"], runs["fashion"], "--allow-mixed"]))
    assert code == 0, err
    assert sorted(r["data"] for r in table_rows(out)) == ["fashion-mnist", "mnist"]


def test_a_running_run_and_one_without_an_epoch_are_marked(runs, tmp_path):
    import fcntl

    busy = shutil.copytree(runs["fast-1"], tmp_path / "busy")
    waiting = tmp_path / "waiting"  # started, and killed or still in its first epoch
    waiting.mkdir()
    args = json.load(open(os.path.join(runs["fast-0"], "args.json")))
    (waiting / "args.json").write_text(json.dumps({**args, "seed": 7}))
    with open(busy / ".lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live train.py holds it
        code, out, err = capture(lambda: main_of("compare", [runs["fast-0"], str(busy), str(waiting)]))
    assert code == 0, err
    (row,) = table_rows(out)
    assert row["status"] == "seed 1: running; seed 7: no finished epoch yet"
    assert row["test accuracy"].endswith("(2)")  # the waiting run has nothing to count yet
    assert (busy / ".lock").read_text() == open(os.path.join(runs["fast-1"], ".lock")).read()  # never changed
    code, out, err = capture(lambda: main_of("compare", [runs["fast-0"], str(busy), str(waiting)]))
    assert code == 0 and "running" not in out, err  # the lock released: a stopped run no longer shows running
    code, line = one_line(lambda: main_of("compare", [str(waiting)]))
    assert code == 1 and "no run has a finished epoch yet" in line


@pytest.mark.slow
def test_recipes_are_trained_interrupted_continued_and_compared(synth_data, tmp_path):
    (tmp_path / "plain.args").write_text("--model fast --epochs 2\n")
    (tmp_path / "aug.args").write_text("--model fast --epochs 2 --augment  # the same, augmented\n")
    out = str(tmp_path / "cmp")
    command = [
        os.path.join(ROOT, "compare.py"),
        "--recipes",
        str(tmp_path / "plain.args"),
        str(tmp_path / "aug.args"),
        "--seeds",
        "2",
        "--out",
        out,
        "--",
        "--data-dir",
        synth_data,
        "--subset",
        "300",
    ]
    proc = subprocess.Popen(
        [sys.executable, *command],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    first = proc.stdout.readline()
    assert first.startswith(f"{tmp_path / 'plain.args'} seed 0: ") and first.rstrip().endswith(f"-> {out}/plain-seed0")
    proc.send_signal(signal.SIGINT)
    printed, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        "compare.py: interrupted; the stopped runs keep their last finished epoch, and the same command continues them"
    ]
    assert "| " not in printed  # no table of half the runs

    again = run_cli(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    lines = again.stdout.splitlines()
    assert f"{tmp_path / 'plain.args'} seed 0: " in lines[0] and "already trained" in lines[0]
    assert sum(" seed " in line and " -> " in line for line in lines) == 4
    assert sorted(os.listdir(out)) == [
        "aug-seed0",
        "aug-seed1",
        "compare.csv",
        "compare.md",
        "curves.png",
        "plain-seed0",
        "plain-seed1",
    ]
    alone = run_cli(["compare.py", *sorted(glob.glob(os.path.join(out, "*")))])
    assert alone.returncode == 0, alone.stderr

    def without_time(text):
        return [{k: v for k, v in row.items() if k != "time (s)"} for row in table_rows(text)]

    assert without_time(again.stdout) == without_time(alone.stdout)
    assert [r["differs"] for r in table_rows(alone.stdout)] in (
        ["`--no-augment`", "`--augment`"],
        ["`--augment`", "`--no-augment`"],
    )
    verdicts = lambda text: [line for line in text.splitlines() if line.startswith(("- ", "rule:"))]
    assert verdicts(again.stdout) == verdicts(alone.stdout) and len(verdicts(alone.stdout)) == 2


@pytest.mark.slow
def test_a_failing_recipe_is_marked_failed_while_the_other_finishes(synth_data, tmp_path):
    (tmp_path / "good.args").write_text("--model fast --epochs 1\n")
    (tmp_path / "diverges.args").write_text("--model fast --epochs 1 --optimizer sgd --lr 1e6\n")
    out = str(tmp_path / "cmp")
    result = run_cli(
        [
            "compare.py",
            "--recipes",
            str(tmp_path / "good.args"),
            str(tmp_path / "diverges.args"),
            "--seeds",
            "1",
            "--jobs",
            "2",
            "--out",
            out,
            "--",
            "--data-dir",
            synth_data,
        ]
    )
    assert result.returncode == 1
    failed = next(line for line in result.stdout.splitlines() if "diverges.args seed 0" in line)
    assert "failed (exit 1): train.py: error: the loss became " in failed and "training diverged" in failed
    assert result.stderr.strip() == "compare.py: error: 1 of 2 runs failed (see their lines above)"
    rows = {r["differs"]: r for r in table_rows(result.stdout)}
    good, bad = rows["`--optimizer adam --lr 0.003`"], rows["`--optimizer sgd --lr 1e+06`"]
    assert good["status"] == "done" and good["test accuracy"].endswith("% (1)")
    assert bad["status"] == "failed" and bad["test accuracy"] == "failed"
    alone = run_cli(["compare.py", os.path.join(out, "good-seed0"), os.path.join(out, "diverges-seed0")])
    assert table_rows(alone.stdout)[1]["status"] == "failed", alone.stderr  # the folder says so too
