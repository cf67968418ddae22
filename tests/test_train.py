"""Training learns, its outputs describe themselves, and every recipe flag does what it says; a full
disk, a read-only folder, a scheduler's SIGTERM and a second run in a busy folder each end in one line,
with every good file left as it was."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from checkpoint import build_model, load_checkpoint
from cli import WriteError, read_log
from conftest import ROOT, capture, main_of, run_script

QUICK = ["--epochs", "2", "--batch-size", "50", "--progress", "off"]


@pytest.mark.slow
def test_a_short_real_run_learns(mnist_run):
    out, stdout = mnist_run
    rows = read_log(os.path.join(out, "log.csv"))
    assert len(rows) == 1 and float(rows[0]["test_acc"]) >= 95.0
    assert "10,000 test images" in stdout
    assert f"checkpoint {out}/last.pt" in stdout


@pytest.mark.slow
def test_evaluate_prints_the_same_accuracy(mnist_run, tmp_path, capsys):
    out, stdout = mnist_run
    trained = re.search(r"done: test accuracy ([\d.]+) %", stdout).group(1)
    code, printed, err = run_script("evaluate", [os.path.join(out, "last.pt"), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    assert f"accuracy {trained} %" in printed
    assert "precision" in printed and "true \\ predicted" in printed
    report = json.load(open(tmp_path / "rep" / "report.json"))
    assert f"{next(iter(report['results'].values()))['accuracy']:.2f}" == trained
    rows = open(tmp_path / "rep" / "confusion.csv").read().splitlines()
    assert len(rows) == 11 and sum(int(v) for r in rows[1:] for v in r.split(",")[1:]) == 10000


@pytest.mark.slow
def test_checkpoint_describes_itself(mnist_run):
    ckpt = torch.load(os.path.join(mnist_run[0], "last.pt"), weights_only=True)  # plain types only
    assert ckpt["model"] == {"name": "cnn", "kwargs": {"in_channels": 1, "num_classes": 10}}
    assert ckpt["data"]["dataset"] == "mnist" and ckpt["data"]["mean"] == 0.1307
    assert ckpt["data"]["classes"] == list("0123456789")
    assert ckpt["epoch"] == 1 and ckpt["args"]["model"] == "cnn" and "optimizer" in ckpt
    assert ckpt["history"][-1]["epoch"] == 1 and ckpt["history"][-1]["test_acc"] >= 95.0
    model, which = build_model(load_checkpoint(mnist_run[0]))
    assert which == "raw" and isinstance(model, torch.nn.Module)
    assert json.load(open(os.path.join(mnist_run[0], "args.json")))["model"] == "cnn"


@pytest.mark.slow
def test_bare_state_dict_evaluates_with_model_flag(mnist_run, tmp_path, capsys):
    ckpt = torch.load(os.path.join(mnist_run[0], "last.pt"), weights_only=True)
    torch.save(ckpt["state_dict"], tmp_path / "weights.pth")  # as the notebooks saved their models
    # a bare state_dict records no precision: ask for the one the run was scored in
    code, printed, err = run_script(
        "evaluate", [str(tmp_path / "weights.pth"), "--model", "cnn", "--amp", ckpt["args"]["amp"]], capsys
    )
    assert code == 0, err
    assert f"accuracy {ckpt['history'][-1]['test_acc']:.2f} %" in printed


def log_of(out):
    return read_log(os.path.join(out, "log.csv"))


def train_synth(capsys, synth, tmp_path, *flags):
    out = str(tmp_path / "run")
    code, stdout, err = run_script("train", ["--data-dir", synth, "--out", out, *QUICK, *flags], capsys)
    assert code == 0, err
    return out, stdout


@pytest.mark.parametrize(
    "flags",
    [
        ["--optimizer", "sgd", "--nesterov", "--weight-decay", "5e-4", "--scheduler", "step", "--step-size", "1"],
        ["--optimizer", "adamw", "--weight-decay", "0.01", "--scheduler", "onecycle"],
        ["--optimizer", "radam", "--weight-decay", "0.01", "--scheduler", "exp", "--gamma", "0.9"],
        ["--optimizer", "adadelta", "--scheduler", "none"],
        ["--optimizer", "adam", "--warmup", "0.5", "--clip-grad", "1.0", "--label-smoothing", "0.1"],
        ["--model", "convnet", "--dropout", "0.5", "--l1", "1e-4", "--l2", "1e-4", "--norm", "raw"],
        ["--model", "tiny", "--augment", "--erase", "0.5", "--ema", "0.9", "--norm", "mnist"],
        ["--model", "lenet5", "--amp", "bf16", "--channels-last", "off", "--drop-last"],
    ],
)
def test_recipes_run_and_learn(capsys, synth, tmp_path, flags):
    out, stdout = train_synth(capsys, synth, tmp_path, *flags)
    rows = log_of(out)
    assert len(rows) == 2
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) or float(rows[-1]["test_acc"]) > 50


def test_lr_schedules_have_their_shapes():
    def factors(steps, epochs=5, **flags):  # 10 steps an epoch
        args = train.build_parser().parse_args(["--epochs", str(epochs), *(f"--{k}={v}" for k, v in flags.items())])
        return [train.lr_factor(s, 10, args) for s in steps]

    assert factors([0, 25], scheduler="exp", gamma=0.9) == pytest.approx([1, 0.81])
    assert factors([0, 19, 20, 45], scheduler="step", gamma=0.9, **{"step-size": 2}) == pytest.approx([1, 1, 0.9, 0.81])
    assert factors([25], scheduler="cosine") == pytest.approx([0.5])
    f = factors(range(100), epochs=10, scheduler="onecycle")
    assert f[0] == pytest.approx(0.04) and max(f) == pytest.approx(1, abs=1e-3) and f[-1] < 1e-3
    assert factors([4, 30], scheduler="none", warmup=2) == pytest.approx([0.25, 1])


def test_l1_l2_penalties_match_their_formulas():
    model = torch.nn.Linear(3, 2)
    expected = 0.1 * sum(p.abs().sum() for p in model.parameters()) + 0.01 * sum(
        (p**2).sum() for p in model.parameters()
    )
    assert train.penalty(model, 0.1, 0.01).item() == pytest.approx(expected.item())


def test_eval_untrained_logs_epoch_zero(capsys, synth, tmp_path):
    out, stdout = train_synth(capsys, synth, tmp_path, "--eval-untrained")
    rows = log_of(out)
    assert rows[0]["epoch"] == "0" and rows[0]["train_loss"] == "" and float(rows[0]["test_acc"]) < 50
    assert float(rows[-1]["test_acc"]) > float(rows[0]["test_acc"])  # two epochs beat the untrained model
    assert "untrained" in stdout


def test_stop_on_training_loss(capsys, synth, tmp_path):
    out, stdout = train_synth(capsys, synth, tmp_path, "--epochs", "20", "--stop-loss", "1.5")
    assert "stopping after epoch" in stdout and "fell below --stop-loss 1.5" in stdout
    assert len(log_of(out)) < 20


def test_stop_on_validation_accuracy_and_best_checkpoint(capsys, synth, tmp_path):
    out, stdout = train_synth(capsys, synth, tmp_path, "--epochs", "20", "--val", "60", "--stop-val-acc", "60")
    assert "reached --stop-val-acc 60" in stdout
    best = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    rows = log_of(out)
    assert best["history"][-1]["val_acc"] == pytest.approx(max(float(r["val_acc"]) for r in rows), abs=1e-3)


def test_patience_counts_epochs_without_a_lower_validation_loss():
    args, history, reasons = train.build_parser().parse_args(["--patience", "2", "--val", "10"]), train.History(), []
    for epoch, loss in enumerate([1.0, 0.8, 0.9, 0.7, 0.75, 0.71], 1):
        reasons.append(
            train.stop_reason(
                {"epoch": epoch, "train_loss": 1, "val_loss": loss, "val_acc": 50}, args, history, ema=False
            )
        )
    assert reasons[:5] == [None] * 5
    assert reasons[5] == "validation loss has not improved for 2 epochs (best 0.7000 at epoch 4)"


def test_patience_stops_a_run_that_overfits(capsys, tmp_path):
    # Labels that have nothing to do with the images: the net memorizes and validation loss rises.
    from conftest import write_idx_set

    noise = write_idx_set(
        str(tmp_path / "noise"),
        n_train=300,
        n_test=50,
        images=torch.randint(0, 256, (300, 28, 28)),
        labels=torch.randint(0, 10, (300,)),
    )
    out, stdout = train_synth(capsys, noise, tmp_path, "--epochs", "40", "--val", "100", "--patience", "3")
    assert "has not improved for 3 epochs" in stdout and len(log_of(out)) < 40


def test_steps_csv_logs_every_n_steps_and_the_epoch_ends(capsys, synth, tmp_path):
    out, _ = train_synth(capsys, synth, tmp_path, "--log-every", "2")
    rows = read_log(os.path.join(out, "steps.csv"))
    per_epoch = 300 // 50  # 300 images in batches of 50 (QUICK): 6 steps
    expected = [s for s in range(1, 2 * per_epoch + 1) if s % 2 == 0 or s % per_epoch == 0]
    assert [int(r["step"]) for r in rows] == expected and {r["epoch"] for r in rows} == {"1", "2"}
    assert list(rows[0]) == ["step", "epoch", "train_loss", "train_acc", "lr", "images_per_s"]
    # the rows of an epoch, weighted by their images, average to its log.csv training loss
    epoch1 = [r for r in rows if r["epoch"] == "1"]
    images = [min(int(r["step"]), per_epoch) * 50 for r in epoch1]
    counts = [min(b, 300) - min(a, 300) for a, b in zip([0] + images[:-1], images)]
    mean = sum(float(r["train_loss"]) * n for r, n in zip(epoch1, counts)) / 300
    assert mean == pytest.approx(float(log_of(out)[0]["train_loss"]), rel=1e-4)


def test_tensorboard_writes_event_files_or_says_how_to_install(capsys, synth, tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        out, _ = train_synth(capsys, synth, tmp_path, "--tensorboard")
        assert [f for f in os.listdir(os.path.join(out, "tb")) if f.startswith("events.out.tfevents")]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    code, _, err = run_script("train", ["--data-dir", synth, "--out", str(tmp_path / "no"), "--tensorboard"], capsys)
    assert code == 2 and "--tensorboard needs the tensorboard package: pip install tensorboard" in err
    assert not os.path.exists(tmp_path / "no")


def test_ema_is_logged_and_saved(capsys, synth, tmp_path):
    out, stdout = train_synth(capsys, synth, tmp_path, "--ema", "0.5")
    assert "EMA test" in stdout and "ema_test_acc" in log_of(out)[0]
    ckpt = load_checkpoint(out)
    assert build_model(ckpt)[1] == "ema" and build_model(ckpt, "raw")[1] == "raw"
    assert not all(torch.equal(ckpt["state_dict"][k], ckpt["ema_state_dict"][k]) for k in ckpt["state_dict"])


def test_divergence_stops_with_advice_and_keeps_the_last_good_checkpoint(capsys, synth, tmp_path):
    out = str(tmp_path / "run")
    args = ["--data-dir", synth, "--out", out, "--progress", "off", "--optimizer", "sgd", "--scheduler", "none"]
    assert run_script("train", [*args, "--epochs", "1", "--lr", "0.01"], capsys)[0] == 0
    before = open(os.path.join(out, "last.pt"), "rb").read()
    code, _, err = run_script("train", ["--resume", out, "--epochs", "3", "--lr", "1e4"], capsys)
    assert code == 2 and "--lr" in err  # a changed lr is refused on resume, and the run left as it was...
    assert open(os.path.join(out, "last.pt"), "rb").read() == before
    code, _, err = run_script("train", [*args, "--epochs", "2", "--lr", "1e4", "--overwrite"], capsys)
    assert code == 1 and re.search(r"loss became (nan|inf|[\d.]+e\+\d+) at epoch 1, step \d+ of \d+", err)
    assert "Try a lower --lr (this run used 10000)" in err and "nothing was saved" in err
    assert not os.path.exists(os.path.join(out, "last.pt"))  # ...replaced only because --overwrite asked for it


def test_divergence_in_bf16_is_caught_though_the_loss_stays_finite(capsys, synth, tmp_path):
    """bf16 has fp32's range: a diverged run's loss can grow to 1e30 and never become inf."""
    argv = ["--data-dir", synth, "--out", str(tmp_path / "run"), "--progress", "off", "--epochs", "2"]
    code, _, err = run_script("train", [*argv, "--optimizer", "sgd", "--lr", "1e4", "--amp", "bf16"], capsys)
    assert code == 1 and re.search(r"loss became [\d.]+e\+\d+ at epoch 1, step \d+ of \d+: training diverged", err)


def test_divergence_after_a_good_epoch_keeps_it(capsys, synth, tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    calls = {"n": 0}
    real = train.F.cross_entropy

    def poisoned(*a, **k):  # finite for the first epoch (6 steps), then nan
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 6 else loss

    monkeypatch.setattr(train.F, "cross_entropy", poisoned)
    code, _, err = run_script("train", ["--data-dir", synth, "--out", out, *QUICK], capsys)
    assert code == 1 and "at epoch 2, step 1 of 6" in err and "still holds the last good state" in err
    assert load_checkpoint(out)["epoch"] == 1 and len(log_of(out)) == 1


# ---------------------------------------------------------------------------------------------
# Recipe files
# ---------------------------------------------------------------------------------------------

RECIPES = sorted(f for f in os.listdir(os.path.join(ROOT, "recipes")) if f.endswith(".args"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_file_parses_and_says_why(name):
    """Each recipe parses with train.py's own parser, and opens with a comment that says what it is for."""
    args = train.build_parser().parse_args([f"@recipes/{name}"])
    train.check_args(args)
    with open(os.path.join(ROOT, "recipes", name)) as f:
        assert f.readline().startswith("# "), f"{name} opens without a comment"
    assert args.model in train.list_models()
    assert args.amp == "auto", f"{name} names a precision; --amp auto picks the one the machine computes natively"


def test_a_recipe_file_is_read_and_later_flags_override_it(capsys, synth_data, tmp_path):
    out = str(tmp_path / "run")
    code, stdout, err = run_script(
        "train",
        [
            "@recipes/fast.args",
            "--batch-size",
            "64",
            "--seed",
            "3",
            "--data-dir",
            synth_data,
            "--out",
            out,
            "--progress",
            "off",
        ],
        capsys,
    )
    assert code == 0, err
    saved = json.load(open(os.path.join(out, "args.json")))
    assert (
        saved["model"] == "strided-crop20" and saved["scheduler"] == "onecycle" and saved["lr"] == 4e-2
    )  # from the file
    assert saved["batch_size"] == 64 and saved["seed"] == 3  # overridden
    code, _, err = run_script("train", ["--resume", out, "@recipes/fast.args", "--batch-size", "64"], capsys)
    assert code == 0, err  # the same file again is no change of flags


def test_a_missing_recipe_file_gets_one_line(capsys):
    code, _, err = run_script("train", ["@recipes/nope.args"], capsys)
    assert code == 2 and err.count("\n") == 1 and "argument file recipes/nope.args does not exist" in err


RECIPE_MODEL = train.build_parser().parse_args(["@" + os.path.join(ROOT, "recipes", "strong.args")]).model


def test_recipe_files_are_found_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = train.build_parser().parse_args(["@recipes/strong.args"])
    assert args.model == RECIPE_MODEL and args.augment


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_a_few_steps(name, synth_data, tmp_path, capsys):
    """Every named recipe runs end to end (on 64 images, one epoch), so none can rot."""
    args = train.build_parser().parse_args([f"@recipes/{name}"])
    if args.fonts:
        import fontdigits

        if not fontdigits.find_fonts():
            pytest.skip(f"{name} adds digits from handwriting fonts, and none are installed")
    data = synth_data if args.dataset == "mnist" else None
    if data is None:
        from conftest import FASHION_ARGS

        if not FASHION_ARGS:
            pytest.skip("Fashion-MNIST is not available here")
        data = FASHION_ARGS[1]
    code, _, err = run_script(
        "train",
        [
            f"@recipes/{name}",
            "--subset",
            "64",
            "--epochs",
            "1",
            "--data-dir",
            data,
            "--out",
            str(tmp_path / "run"),
            "--progress",
            "off",
        ],
        capsys,
    )
    assert code == 0, err


FAST = ["--model", "fast", "--progress", "off"]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: room for one checkpoint of `fast` (0.6 MB with its optimizer state), not two."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; the injected-error tests cover this case")
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_training_with_the_last_good_checkpoint_and_a_resume_command(small_disk, synth_data):
    out = str(small_disk / "run")
    code, _, err = capture(lambda: main_of("train", [*FAST, "--epochs", "3", "--data-dir", synth_data, "--out", out]))
    assert code == 1 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"cannot write {out}/last.pt: No space left on device" in lines[0], err
    assert f"Continue with: python train.py --resume {out}" in lines[0]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    saved = torch.load(os.path.join(out, "last.pt"), weights_only=True)  # whole, from epoch 1
    assert saved["epoch"] == 1
    assert [r["epoch"] for r in read_log(os.path.join(out, "log.csv"))] == ["1"]
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    code, _, err = capture(lambda: main_of("train", ["--resume", out, "--data-dir", synth_data]))
    assert code == 0, err
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["epoch"] == 3


def test_a_read_only_folder_gets_one_line_for_every_writer(small_disk, synth_run):
    data, run = synth_run
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    target = str(small_disk / "x")
    cases = [
        ("train", [*FAST, "--epochs", "1", "--data-dir", data, "--out", target], "cannot write to --out"),
        ("evaluate", [run, "--data-dir", data, "--out", target], "Read-only file system"),
        ("export", [run, "--format", "ckpt", "--out", target + ".pt", "--data-dir", data], "Read-only file system"),
    ]
    for script, argv, expected in cases:
        code, _, err = capture(lambda script=script, argv=argv: main_of(script, argv))
        assert code in (1, 2) and len(err.strip().splitlines()) == 1 and expected in err, (script, err)
    assert os.listdir(small_disk) == []


def test_a_failed_log_append_leaves_the_log_as_it_was(tmp_path, monkeypatch):
    """ENOSPC injected part way through the append: the half-written row is cut off again."""
    out = str(tmp_path)
    columns = ["epoch", "train_loss"]
    train.append_rows(out, "log.csv", [{"epoch": 1, "train_loss": 0.5}], columns)
    before = open(os.path.join(out, "log.csv")).read()

    real_fdopen = os.fdopen

    class HalfWrite:  # what append_rows opens its file descriptor with
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(train.os, "fdopen", HalfWrite)
    with pytest.raises(WriteError, match=r"cannot write .*log.csv: No space left on device; free some space"):
        train.append_rows(out, "log.csv", [{"epoch": 2, "train_loss": 0.4}], columns)
    monkeypatch.undo()
    assert open(os.path.join(out, "log.csv")).read() == before


def test_an_injected_full_disk_during_a_checkpoint_keeps_the_previous_one(synth_run, tmp_path, monkeypatch):
    """Where no tmpfs can be mounted: os.fsync fails as a full disk would."""
    import shutil

    data, run = synth_run
    out = tmp_path / "run"
    shutil.copytree(run, out)
    before = (out / "last.pt").read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = capture(lambda: main_of("train", ["--resume", str(out), "--epochs", "4", "--data-dir", data]))
    monkeypatch.undo()
    assert code == 1 and "No space left on device" in err and "Continue with: python train.py --resume" in err, err
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("*.tmp"))


def start_training(out, data, epochs=200):
    proc = subprocess.Popen(
        [sys.executable, "train.py", *FAST, "--epochs", str(epochs), "--data-dir", data, "--out", out],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    next(line for line in proc.stdout if "run folder" in line)
    return proc


@pytest.mark.slow
def test_sigterm_saves_and_says_how_to_continue(synth_data, tmp_path):
    out = str(tmp_path / "run")
    proc = start_training(out, synth_data, epochs=3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM): stopped at epoch" in err and f"Continue with: python train.py --resume {out}" in err
    code, printed, err = capture(lambda: main_of("train", ["--resume", out, "--data-dir", synth_data]))
    assert code == 0 and "training it from the start" in printed, err  # stopped inside epoch 1: nothing saved


@pytest.mark.slow
def test_a_busy_run_folder_is_refused_until_its_run_is_gone(synth_data, tmp_path):
    out = str(tmp_path / "run")
    proc = start_training(out, synth_data)
    try:
        deadline = time.time() + 60
        while not os.path.exists(os.path.join(out, "last.pt")) and time.time() < deadline:
            time.sleep(0.05)
        for argv in (
            [*FAST, "--epochs", "1", "--data-dir", synth_data, "--out", out, "--overwrite"],
            ["--resume", out, "--data-dir", synth_data],
        ):
            code, _, err = capture(lambda argv=argv: main_of("train", argv))
            assert code == 2 and f"is in use by a train.py that is still running (pid {proc.pid})" in err, err
        assert os.path.exists(os.path.join(out, "last.pt"))  # the running run's files are untouched
    finally:
        proc.kill()
        proc.wait()
    # the lock died with its process; the .lock file left behind does not block
    code, _, err = capture(lambda: main_of("train", ["--resume", out, "--data-dir", synth_data, "--epochs", "2"]))
    assert code == 0, err


def test_a_crop_model_on_images_that_fill_the_frame_says_which_recipe_fits(tmp_path, capsys):
    from conftest import write_idx_set

    labels = torch.arange(200) % 10
    centred = torch.zeros(200, 28, 28, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        centred[i, 6 + k, 6:22] = 250  # inside the 20x20 box, as MNIST's digits
    full = centred.clone()
    full[:, :, :3] = 200  # and a sleeve or a sole at the rim
    argv = ["--epochs", "1", "--progress", "off", "--subset", "100"]
    notes = {}
    for name, images, model in (
        ("full", full, "strided-crop20"),
        ("centred", centred, "strided-crop20"),
        ("whole", full, "strided"),
    ):
        data = write_idx_set(str(tmp_path / name), images=images, labels=labels, n_train=200, n_test=200)
        out = str(tmp_path / f"run-{name}")
        code, printed, err = run_script("train", [*argv, "--model", model, "--data-dir", data, "--out", out], capsys)
        assert code == 0, err
        notes[name] = [line for line in printed.splitlines() if line.startswith("note: ")]
    assert notes["centred"] == [] and notes["whole"] == []
    (line,) = notes["full"]
    assert "strided-crop20 reads only the central 20x20 pixels" in line and "@recipes/fashion-fast.args" in line
