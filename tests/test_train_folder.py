"""train.py's run folder: resuming a checkpoint kept elsewhere or a best.pt, --overwrite, lock and log
files planted as links, and the temporaries a killed save leaves behind."""

import json
import os
import shutil

import pytest
import torch

import cli
from cli import read_log
from conftest import capture, main_of, one_line, snapshot

FAST = ["--model", "fast", "--epochs", "1", "--progress", "off"]


@pytest.fixture(scope="module")
def run_elsewhere(tmp_path_factory, synth_data):
    """A finished run, and a copy of its last.pt in a folder of the user's with a log.csv of their own."""
    tmp = tmp_path_factory.mktemp("own")
    run = str(tmp / "run")
    assert main_of("train", [*FAST, "--data-dir", synth_data, "--out", run]) == 0
    mine = tmp / "mine"
    mine.mkdir()
    shutil.copy(os.path.join(run, "last.pt"), mine / "model.pt")
    (mine / "log.csv").write_text("my own notes, not a run's log\n")
    (mine / "args.json").write_text(json.dumps({"note": "not train.py's"}))
    return synth_data, run, str(mine)


def test_resume_of_a_checkpoint_outside_its_run_folder_needs_a_new_folder(run_elsewhere, tmp_path):
    synth, _, mine = run_elsewhere
    before = snapshot(mine)
    code, line = one_line(lambda: main_of("train", ["--resume", os.path.join(mine, "model.pt"), "--epochs", "2"]))
    assert code == 2 and "continue it in a new folder with --out NEW" in line
    new = str(tmp_path / "continued")
    code, printed, err = capture(
        lambda: main_of(
            "train", ["--resume", os.path.join(mine, "model.pt"), "--epochs", "2", "--out", new, "--data-dir", synth]
        )
    )
    assert code == 0, err
    assert f"resuming {new} at epoch 2" in printed
    assert snapshot(mine) == before  # the user's folder, log.csv included, is as it was
    ckpt = torch.load(os.path.join(new, "last.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["out"] == new
    assert [r["epoch"] for r in read_log(os.path.join(new, "log.csv"))] == ["1", "2"]
    code, printed, err = capture(lambda: main_of("train", ["--resume", new, "--epochs", "3", "--data-dir", synth]))
    assert code == 0 and f"resuming {new} at epoch 3" in printed, err  # the new folder is the run's own now


def test_resume_of_best_pt_does_not_continue_in_place(synth_data, tmp_path):
    out = str(tmp_path / "run")
    assert main_of("train", [*FAST, "--epochs", "2", "--val", "50", "--data-dir", synth_data, "--out", out]) == 0
    before = snapshot(out)
    code, line = one_line(lambda: main_of("train", ["--resume", os.path.join(out, "best.pt")]))
    assert code == 2 and "is not the last.pt of its own run folder" in line
    assert snapshot(out) == before


def test_overwrite_replaces_only_a_run_of_ours(run_elsewhere):
    synth, _, mine = run_elsewhere
    before = snapshot(mine)
    code, line = one_line(lambda: main_of("train", [*FAST, "--data-dir", synth, "--out", mine, "--overwrite"]))
    assert code == 2 and "not a run of ours" in line
    assert snapshot(mine) == before


def test_overwrite_replaces_a_run_of_ours(run_elsewhere, tmp_path):
    synth, run, _ = run_elsewhere
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    code, _, err = capture(
        lambda: main_of("train", [*FAST, "--seed", "5", "--data-dir", synth, "--out", out, "--overwrite"])
    )
    assert code == 0, err
    assert json.load(open(os.path.join(out, "args.json")))["seed"] == 5


def test_a_lock_file_planted_as_a_link_is_refused(synth_data, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim, out / ".lock")
    code, line = one_line(lambda: main_of("train", [*FAST, "--data-dir", synth_data, "--out", str(out)]))
    assert code == 1 and "cannot write to" in line
    assert victim.read_text() == "precious"


def test_a_log_planted_as_a_link_is_not_appended_to(tmp_path):
    import train

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / "log.csv")
    with pytest.raises(cli.WriteError):
        train.append_rows(str(tmp_path), "log.csv", [{"epoch": 1}], ["epoch"])
    assert victim.read_text() == "precious"


def test_a_killed_save_leaves_nothing_behind_once_the_folder_is_used_again(synth_data, tmp_path):
    out = str(tmp_path / "run")
    assert main_of("train", [*FAST, "--data-dir", synth_data, "--out", out]) == 0
    stale = os.path.join(out, ".last.pt.a1b2c3d4e5f6.tmp")
    open(stale, "wb").write(b"half a checkpoint")
    mine = os.path.join(out, ".notes.a1b2c3d4e5f6.tmp")  # not one of a run's files: left alone
    open(mine, "w").write("mine")
    assert main_of("train", ["--resume", out, "--epochs", "2", "--data-dir", synth_data]) == 0
    assert not os.path.exists(stale) and os.path.exists(mine)


def test_a_folder_of_the_users_keeps_its_write_test_and_lock_files(synth_data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".write-test").write_text("a file of mine")
    (mine / ".lock").write_text("held by my own tool\n")
    before = snapshot(str(mine))
    code, line = one_line(lambda: main_of("train", [*FAST, "--data-dir", synth_data, "--out", str(mine)]))
    assert code == 2 and ".lock file that train.py did not write" in line
    assert snapshot(str(mine)) == before
    (mine / ".lock").unlink()
    assert main_of("train", [*FAST, "--data-dir", synth_data, "--out", str(mine)]) == 0
    assert (mine / ".write-test").read_text() == "a file of mine"
    assert not [f for f in os.listdir(mine) if f.startswith(".write-test.")]  # its own probe is gone
