"""The experiment tools: reproduce.py and top.py run their recipes through train.py, record every run
in their ledger, and rebuild their tables from it. (Every recipe file itself is trained a few steps in
test_train.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script
from reproduce import ROWS

REPRODUCE = os.path.join("experiments", "reproduce.py")


@pytest.mark.slow
def test_quick_mode_runs_the_commands_and_writes_the_table(tmp_path, capsys):
    rows = ["000", "004-tiny2"]  # a row with both commands, and one that shares the row above's notebook
    args = [*rows, "--quick", "--seeds", "1", "--results", str(tmp_path)]
    code, _, err = run_script("reproduce", args, capsys)
    assert code == 0, err
    recorded = json.load(open(tmp_path / "quick" / "reproduce.json"))
    assert set(recorded) == {"000/notebook", "000/ours", "004-tiny2/ours"}
    assert all(len(runs) == 1 and 0 <= runs[0]["acc"] <= 100 for runs in recorded.values())
    assert recorded["000/ours"][0]["recipe"] == "000-ours"
    table = open(tmp_path / "quick" / "reproduce.md").read()
    assert all(f"| {row.id} |" in table for row in ROWS) and "`python train.py @recipes/000-ours.args`" in table
    # a row with no notebook of its own shares the row above's, and lists no notebook command
    assert "| 004-tiny2 | `tiny2` | MNIST |" in table and "- 004-tiny2 notebook" not in table
    # A second call finds every run recorded and only rebuilds the table.
    code, out, _ = run_script("reproduce", args, capsys)
    assert code == 0 and "seed 0:" not in out


def test_unknown_row_is_refused(tmp_path, capsys):
    code, _, err = run_script("reproduce", ["007", "--results", str(tmp_path)], capsys)
    assert code == 2 and "unknown row '007'" in err
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_top_quick_mode_trains_evaluates_and_records(tmp_path, capsys):
    """top.py --quick trains a row for a few steps and tests it on 512 images, with and without TTA."""
    code, out, err = run_script("top", ["mnist", "--quick", "--seeds", "1", "--results", str(tmp_path)], capsys)
    assert code == 0, err
    recorded = json.load(open(tmp_path / "quick" / "top.json"))
    assert list(recorded) == ["mnist/run"]
    assert "mnist seed 0: " in out and recorded["mnist/run"][0]["epochs"] == 1
    report = json.load(open(tmp_path / "quick" / "top-runs" / "mnist-0" / "eval-1-tta" / "report.json"))
    assert report["test_images"] == 512


def test_top_table_summarizes_seeds_tta_and_ensembles(tmp_path, capsys):
    """top.py's table from recorded runs: mean ± std over seeds, and runs of an older command left out."""
    import top

    rid, flags = top.TOP[0].id, top.FLAGS[top.TOP[0].id]
    run = {"epochs": 15, "params": 288170, "flags": flags, "machine": "test", "threads": 1}
    recorded = {
        f"{rid}/run": [
            {**run, "seed": 0, "acc": 99.60, "tta_acc": 99.64, "wall_s": 600},
            {**run, "seed": 1, "acc": 99.70, "tta_acc": 99.72, "wall_s": 720},
            {**run, "seed": 2, "acc": 10.0, "tta_acc": 10.0, "wall_s": 1, "flags": "--old"},
        ],
        f"{rid}/ensemble": [{"seed": 0, "tta": False, "acc": 99.75, "models": 2, "flags": flags}],
    }
    (tmp_path / "top.json").write_text(json.dumps(recorded))
    code, out, err = run_script("top", ["--table", "--results", str(tmp_path)], capsys)
    assert code == 0, err
    line = next(row for row in out.splitlines() if row.startswith(f"| {rid} |"))
    assert "| 288,170 | 15 | 99.65 ± 0.07 % (2) | 99.68 ± 0.06 % (2) | 99.75 % (2) | not run | 11 min |" in line
    assert (tmp_path / "top.md").read_text() == out
    code, _, err = run_script("top", ["cifar", "--results", str(tmp_path)], capsys)
    assert code == 2 and "unknown row 'cifar'" in err


def test_runs_from_two_machines_are_timed_apart_and_ensembled_where_their_checkpoints_are(tmp_path, capsys):
    """Seeds run on a GPU machine and on a CPU count together for accuracy, but each machine gets its
    own time; an ensemble whose checkpoints stayed on the other machine is skipped with a note."""
    import top

    rid, flags = top.TOP[0].id, top.FLAGS[top.TOP[0].id]
    run = {"epochs": 15, "params": 288170, "flags": flags, "threads": 1, "acc": 99.7, "tta_acc": 99.7}
    recorded = {
        f"{rid}/run": [
            {**run, "seed": 0, "machine": "cpu box", "wall_s": 600},
            {**run, "seed": 1, "machine": "cpu box", "wall_s": 720},
            {**run, "seed": 2, "machine": "H100 (CUDA)", "wall_s": 150},
        ]
    }
    (tmp_path / "top.json").write_text(json.dumps(recorded))
    code, out, err = run_script("top", [rid, "--seeds", "3", "--results", str(tmp_path)], capsys)
    assert code == 0, err
    assert f"{rid}: no ensemble here, 3 of its checkpoints are missing" in out
    assert "Machines: [1] H100 (CUDA); [2] cpu box;" in out
    line = next(row for row in out.splitlines() if row.startswith(f"| {rid} |"))
    assert "| 99.70 ± 0.00 % (3) |" in line and "| not run | not run | 2.5 min [1], 11 min [2] |" in line
    assert f"{rid}/ensemble" not in json.load(open(tmp_path / "top.json"))


@pytest.mark.slow
def test_a_mix_ensembles_the_first_seeds_of_each_row_once_all_have_run(tmp_path, monkeypatch, capsys):
    """top.py's cross-row ensemble takes the first N seeds of each member row, and waits for them.
    (--quick: evaluated on the first 512 test images.)"""
    import shutil

    import top

    mix = top.MIXES[0]
    (first, n_first), (second, n_second) = members = (top.TOP_IDS[0], 1), (top.TOP_IDS[1], 2)  # 3 models: quicker
    monkeypatch.setattr(top, "MIXES", [top.Mix(mix.id, mix.dataset, mix.target, members)])
    monkeypatch.setitem(top.COMMANDS, f"{mix.id}/ensemble", top.mix_command(members))
    mid, folder = mix.id, tmp_path / "quick"
    recorded = {}
    for rid, seeds in ((first, n_first + 1), (second, n_second - 1)):  # one more, then one fewer than needed
        recorded[f"{rid}/run"] = [
            {"seed": s, "acc": 99.0, "tta_acc": 99.0, "wall_s": 60, "epochs": 1, "params": 1, "flags": top.FLAGS[rid]}
            for s in range(seeds)
        ]
        for s in range(n_first if rid == first else seeds):  # the extra seed has no checkpoint at all
            os.makedirs(folder / "top-runs" / f"{rid}-{s}")
            shutil.copy(os.path.join(ROOT, "weights", "mnist.pt"), folder / "top-runs" / f"{rid}-{s}" / "last.pt")
    (folder / "top.json").write_text(json.dumps(recorded))
    args = [mid, "--results", str(tmp_path), "--quick"]  # MNIST: the copy in ./data
    code, out, err = run_script("top", args, capsys)
    assert code == 0 and f"needs {n_second} runs of {second}, {n_second - 1} recorded" in out, err
    assert f"{mid}/ensemble" not in json.load(open(folder / "top.json"))

    recorded[f"{second}/run"].append({**recorded[f"{second}/run"][0], "seed": n_second - 1})
    os.makedirs(folder / "top-runs" / f"{second}-{n_second - 1}")
    shutil.copy(os.path.join(ROOT, "weights", "mnist.pt"), folder / "top-runs" / f"{second}-{n_second - 1}" / "last.pt")
    (folder / "top.json").write_text(json.dumps(recorded))
    code, out, err = run_script("top", args, capsys)
    assert code == 0, err
    ens = {r["tta"]: r for r in json.load(open(folder / "top.json"))[f"{mid}/ensemble"]}
    single = json.load(open(folder / "top-runs" / mid / "report.json"))["results"]
    alone = next(v for k, v in single.items() if k != "ensemble")["accuracy"]
    assert ens[False]["models"] == n_first + n_second and ens[False]["acc"] == alone  # copies of one model
    assert ens[True]["acc"] > 95.0
    assert sorted(os.path.basename(os.path.dirname(p)) for p in single if p != "ensemble") == sorted(
        [f"{first}-{s}" for s in range(n_first)] + [f"{second}-{s}" for s in range(n_second)]
    )
    line = next(row for row in open(folder / "top.md").read().splitlines() if row.startswith(f"| {mid} |"))
    assert f"| {n_first + n_second} | {alone:.2f} % |" in line


def test_processes_with_other_commands_keep_each_others_runs(tmp_path):
    """A reproduce.py started before a recipe changed must not drop the runs of the new recipe."""
    import reproduce
    from ledger import current_only, read_runs, record

    path = str(tmp_path / "reproduce.json")
    new, old = {"004/ours": "--new"}, {"004/ours": "--old", "000/ours": "--x"}
    record(path, "004/ours", {"seed": 0, "acc": 99.4, "flags": "--new"}, new)
    current = record(path, "000/ours", {"seed": 0, "acc": 99.5, "flags": "--x"}, old)
    assert current["004/ours"] == []  # the old process does not count the new run...
    kept = json.load(open(path))
    assert [r["flags"] for r in kept["004/ours"]] == ["--new"] and kept["000/ours"][0]["acc"] == 99.5  # ...nor drop it
    assert current_only(read_runs(path), reproduce.COMMANDS).get("000/ours") == []  # neither is today's command


@pytest.mark.slow
def test_a_run_stopped_by_another_command_is_started_over(tmp_path, capsys):
    """A run folder left by a different command (here another seed) is not resumed but started over,
    and timed. (One left by the same command is resumed: the SIGTERM test below.)"""
    folder = tmp_path / "quick" / "runs" / "000-ours-0"
    code, _, err = run_script(
        "train",
        [
            "@recipes/000-ours.args",
            "--seed",
            "3",
            "--out",
            str(folder),
            "--subset",
            "512",
            "--epochs",
            "1",
            "--progress",
            "off",
        ],
        capsys,
    )
    assert code == 0, err
    code, out, err = run_script(
        "reproduce", ["000", "--which", "ours", "--quick", "--seeds", "1", "--results", str(tmp_path)], capsys
    )
    assert code == 0, err
    assert "continued the stopped run" not in out
    run = json.load(open(tmp_path / "quick" / "reproduce.json"))["000/ours"][0]
    assert run["wall_s"] is not None and run["epochs"] == 1 and run["seed"] == 0


@pytest.mark.slow
def test_sigterm_stops_the_run_with_a_note_and_the_same_command_continues_it(tmp_path, capsys):
    """A scheduler's SIGTERM (Ctrl-C takes the same path) is passed on to train.py, which saves."""
    args = [sys.executable, REPRODUCE, "000", "--which", "ours", "--quick", "--seeds", "1", "--results", str(tmp_path)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = tmp_path / "quick" / "runs" / "000-ours-0" / "args.json"
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline:  # train.py has begun: stop it now
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "stopped part way; the same command continues the run" in err, err
    assert not (tmp_path / "quick" / "reproduce.json").exists()
    code, out, err = run_script("reproduce", args[2:], capsys)
    assert code == 0, err
    assert "continued the stopped run" in out
    run = json.load(open(tmp_path / "quick" / "reproduce.json"))["000/ours"][0]
    assert run["epochs"] == 1 and run["wall_s"] is None  # the stopped part was not timed
    assert "not timed" in (tmp_path / "quick" / "reproduce.md").read_text()
