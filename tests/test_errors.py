"""Bad input is normal input: each case gives one clear line on stderr, the right exit code
(2: the command line is wrong, 1: a file or the run is), no traceback, and no change on disk."""

import os
import types

import pytest
import torch

from cli import run
from conftest import ROOT, idx_bytes, run_cli, snapshot, write_idx_set

HAS_CUDA, HAS_MPS = torch.cuda.is_available(), torch.backends.mps.is_available()


class Evil:
    """Unpickling this would create a marker file; weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_malicious_checkpoint(path, marker):
    """A checkpoint as torch.save writes it, shaped like ours, with a payload that makes `marker`."""
    torch.save({"format": "mnist-toolkit-checkpoint", "version": 1, "payload": Evil(marker)}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every bad file the table needs, plus one good run to point at."""
    tmp = tmp_path_factory.mktemp("bad")
    f = types.SimpleNamespace(tmp=str(tmp))
    f.synth = write_idx_set(str(tmp / "synth"), n_train=200, n_test=50)
    f.run = str(tmp / "run")
    code = run(
        __import__("train").main,
        [
            "--model",
            "convnet",
            "--dropout",
            "0.1",
            "--epochs",
            "1",
            "--data-dir",
            f.synth,
            "--out",
            f.run,
            "--progress",
            "off",
        ],
    )
    assert code == 0
    f.ckpt = os.path.join(f.run, "last.pt")
    ckpt = torch.load(f.ckpt, weights_only=True)

    def variant(name, make):
        folder = write_idx_set(str(tmp / name), n_train=30, n_test=10)
        make(folder)
        return folder

    def rewrite(folder, name, data):
        with open(os.path.join(folder, name), "wb") as fh:
            fh.write(data)

    raw = open(os.path.join(f.synth, "train-images-idx3-ubyte"), "rb").read()
    f.truncated = variant("truncated", lambda d: rewrite(d, "train-images-idx3-ubyte", raw[:5000]))
    f.magic = variant(
        "magic",
        lambda d: [rewrite(d, f"{split}-images-idx3-ubyte", b"\0\0\x08\x02" + raw[4:]) for split in ("train", "t10k")],
    )
    f.counts = variant(
        "counts", lambda d: rewrite(d, "train-labels-idx1-ubyte", idx_bytes(torch.zeros(29, dtype=torch.uint8), 0x801))
    )
    f.labels = variant(
        "labels",
        lambda d: rewrite(d, "train-labels-idx1-ubyte", idx_bytes(torch.full((30,), 10, dtype=torch.uint8), 0x801)),
    )
    f.empty = str(tmp / "empty.pt")
    open(f.empty, "wb").close()
    f.cut = str(tmp / "cut.pt")
    rewrite(str(tmp), "cut.pt", open(f.ckpt, "rb").read()[:3000])
    f.text = str(tmp / "notes.pt")
    rewrite(str(tmp), "notes.pt", b"these are my notes, not a checkpoint\n")
    f.newer = str(tmp / "newer.pt")
    torch.save({**ckpt, "version": 99}, f.newer)
    f.older = str(tmp / "older.pt")
    torch.save({**ckpt, "version": 0}, f.older)
    f.foreign = str(tmp / "foreign.pt")
    torch.save({**ckpt, "model": {"name": "resnet9000", "kwargs": {}}}, f.foreign)
    f.other = str(tmp / "other.pt")
    torch.save({"weights": [1, 2, 3]}, f.other)
    f.bare = str(tmp / "bare.pt")
    torch.save(ckpt["state_dict"], f.bare)
    f.marker = str(tmp / "PWNED")
    f.evil = str(tmp / "evil.pt")
    write_malicious_checkpoint(f.evil, f.marker)
    f.file = str(tmp / "a-file")
    rewrite(str(tmp), "a-file", b"x")
    from PIL import Image

    f.blank = str(tmp / "blank.png")
    Image.new("L", (64, 64), 255).save(f.blank)
    f.dot = str(tmp / "dot.png")
    Image.new("L", (1, 1), 0).save(f.dot)
    f.fake_png = str(tmp / "photo.png")
    rewrite(str(tmp), "photo.png", b"this is text with a .png name")
    f.no_images = str(tmp / "no-images")
    os.makedirs(f.no_images)
    f.copy = str(tmp / "copy.pt")  # a run's last.pt copied out of its folder
    rewrite(str(tmp), "copy.pt", open(f.ckpt, "rb").read())
    f.slim = os.path.join(ROOT, "weights", "mnist.pt")  # shipped weights: no optimizer state
    return f


T, E, D, M, P, X = "train", "evaluate", "data", "models", "predict", "export"
TRAIN = ["--epochs", "1", "--progress", "off"]
CASES = [
    # (id, script, argv(f), exit code, message pattern)
    ("unknown model", T, lambda f: ["--model", "resnet9000"], 2, r"invalid choice: 'resnet9000'"),
    ("unknown dataset", T, lambda f: ["--dataset", "cifar"], 2, r"unknown dataset .cifar.: neither a built-in one"),
    ("unknown optimizer", T, lambda f: ["--optimizer", "lbfgs"], 2, r"--optimizer: invalid choice"),
    ("unknown scheduler", T, lambda f: ["--scheduler", "plateau"], 2, r"--scheduler: invalid choice"),
    ("unknown device", T, lambda f: ["--device", "tpu"], 2, r"unknown device 'tpu'"),
    ("absent cuda", T, lambda f: ["--device", "cuda"], 2, r"asked for a CUDA GPU, but none is available"),
    ("absent mps", T, lambda f: ["--device", "mps"], 2, r"asked for Apple's GPU, but MPS is not available"),
    ("zero epochs", T, lambda f: ["--epochs", "0"], 2, r"--epochs: must be greater than 0, got '0'"),
    ("negative epochs", T, lambda f: ["--epochs", "-2"], 2, r"--epochs: must be greater than 0"),
    ("text epochs", T, lambda f: ["--epochs", "five"], 2, r"--epochs: expected a positive int, got 'five'"),
    ("zero batch", T, lambda f: ["--batch-size", "0"], 2, r"--batch-size: must be greater than 0"),
    ("fractional batch", T, lambda f: ["--batch-size", "1.5"], 2, r"--batch-size: expected a positive int"),
    ("zero lr", T, lambda f: ["--lr", "0"], 2, r"--lr: must be greater than 0"),
    ("negative lr", T, lambda f: ["--lr", "-0.1"], 2, r"--lr: must be greater than 0"),
    ("nan lr", T, lambda f: ["--lr", "nan"], 2, r"--lr: must be greater than 0"),
    ("text lr", T, lambda f: ["--lr", "fast"], 2, r"--lr: expected a positive float"),
    ("negative val", T, lambda f: ["--val", "-5"], 2, r"--val: must be 0 or more"),
    ("text val", T, lambda f: ["--val", "some"], 2, r"--val: expected a number"),
    (
        "val too large",
        T,
        lambda f: ["--data-dir", f.synth, "--val", "200", *TRAIN],
        2,
        r"--val 200 leaves nothing to train on: the training set has 200 images",
    ),
    (
        "missing data dir",
        T,
        lambda f: ["--data-dir", f.tmp + "/nowhere", *TRAIN],
        2,
        r"--data-dir .*nowhere does not exist",
    ),
    ("truncated idx", T, lambda f: ["--data-dir", f.truncated, *TRAIN], 1, r"is truncated: its header promises 200"),
    ("wrong magic", T, lambda f: ["--data-dir", f.magic, *TRAIN], 1, r"not an IDX image file \(magic number 00000802"),
    ("count mismatch", T, lambda f: ["--data-dir", f.counts, *TRAIN], 1, r"30 images but .* 29 labels"),
    (
        "label out of range",
        T,
        lambda f: ["--data-dir", f.labels, *TRAIN],
        1,
        r"label 10, but mnist has only 10 classes",
    ),
    (
        "unwritable out",
        T,
        lambda f: ["--data-dir", f.synth, "--out", f.file + "/run", *TRAIN],
        1,
        r"cannot write to --out .*a-file/run",
    ),
    ("out is a file", T, lambda f: ["--data-dir", f.synth, "--out", f.file, *TRAIN], 2, r"is a file, not a folder"),
    (
        "out holds a run",
        T,
        lambda f: ["--data-dir", f.synth, "--out", f.run, *TRAIN],
        2,
        r"already holds a run \(last.pt.*pass --resume .* --overwrite",
    ),
    ("resume missing", T, lambda f: ["--resume", f.tmp + "/gone.pt"], 2, r"checkpoint .*gone.pt does not exist"),
    ("resume folder without ckpt", T, lambda f: ["--resume", f.synth], 2, r"holds no last.pt"),
    ("resume empty", T, lambda f: ["--resume", f.empty], 1, r"is empty \(0 bytes\)"),
    ("resume truncated", T, lambda f: ["--resume", f.cut], 1, r"truncated, damaged or another kind of file"),
    ("resume text file", T, lambda f: ["--resume", f.text], 1, r"truncated, damaged or another kind of file"),
    ("resume newer format", T, lambda f: ["--resume", f.newer], 1, r"checkpoint format 99, newer than this toolkit"),
    ("resume older format", T, lambda f: ["--resume", f.older], 1, r"format 0, which predates"),
    ("resume unknown model", T, lambda f: ["--resume", f.foreign], 1, r"model 'resnet9000', which this toolkit"),
    ("resume malicious", T, lambda f: ["--resume", f.evil], 1, r"refusing to load .*pickled Python objects"),
    (
        "resume changed model",
        T,
        lambda f: ["--resume", f.run, "--model", "tiny"],
        2,
        r"trained with --model convnet, not tiny",
    ),
    (
        "resume changed dropout",
        T,
        lambda f: ["--resume", f.run, "--dropout", "0.5"],
        2,
        r"trained with --dropout 0.1, not 0.5",
    ),
    (
        "resume a copy in place",
        T,
        lambda f: ["--resume", f.copy],
        2,
        r"copy.pt is not the last.pt of its own run folder .* continue it in a new folder with --out NEW",
    ),
    ("resume into a run", T, lambda f: ["--resume", f.copy, "--out", f.run], 2, r"already holds a run"),
    (
        "resume shipped weights",
        T,
        lambda f: ["--resume", f.slim, "--out", f.tmp + "/x"],
        2,
        r"holds weights without the training state a resume needs",
    ),
    ("dropout on cnn", T, lambda f: ["--model", "cnn", "--dropout", "0.5"], 2, r"model 'cnn' has no dropout"),
    (
        "dropout of 1",
        T,
        lambda f: ["--model", "convnet", "--dropout", "1"],
        2,
        r"--dropout: must be from 0 to 1 \(excluded\)",
    ),
    ("nesterov with adam", T, lambda f: ["--nesterov"], 2, r"--nesterov needs --optimizer sgd"),
    ("patience without val", T, lambda f: ["--patience", "3"], 2, r"--patience watches the validation set"),
    ("smoothing of 1", T, lambda f: ["--label-smoothing", "1"], 2, r"--label-smoothing must be below 1"),
    ("negative l1", T, lambda f: ["--l1", "-0.001"], 2, r"--l1: must be 0 or more"),
    ("text l2", T, lambda f: ["--l2", "lots"], 2, r"--l2: expected a number"),
    ("ema of 1", T, lambda f: ["--ema", "1"], 2, r"--ema must be below 1"),
    ("erase above 1", T, lambda f: ["--erase", "1.5"], 2, r"--erase must be below 1"),
    ("scale of 1", T, lambda f: ["--augment", "--scale", "1"], 2, r"--scale must be below 1"),
    ("momentum of 1", T, lambda f: ["--optimizer", "sgd", "--momentum", "1"], 2, r"--momentum must be below 1"),
    ("translate too far", T, lambda f: ["--augment", "--translate", "2"], 2, r"--translate is a fraction"),
    ("negative rotation", T, lambda f: ["--rotate", "-5"], 2, r"--rotate: must be 0 or more"),
    ("zero stop loss", T, lambda f: ["--stop-loss", "0"], 2, r"--stop-loss: must be greater than 0"),
    ("val accuracy over 100", T, lambda f: ["--val", "100", "--stop-val-acc", "101"], 2, r"a percentage, at most 100"),
    ("zero patience", T, lambda f: ["--val", "100", "--patience", "0"], 2, r"--patience: must be greater than 0"),
    ("negative warmup", T, lambda f: ["--warmup", "-1"], 2, r"--warmup: must be 0 or more"),
    ("negative clip", T, lambda f: ["--clip-grad", "-1"], 2, r"--clip-grad: must be 0 or more"),
    ("zero gamma", T, lambda f: ["--scheduler", "exp", "--gamma", "0"], 2, r"--gamma: must be greater than 0"),
    ("unknown flag", T, lambda f: ["--epoch", "3", "--lrr", "1"], 2, r"unrecognized arguments: --lrr"),
    ("eval missing", E, lambda f: [f.tmp + "/gone.pt"], 2, r"checkpoint .*gone.pt does not exist"),
    ("eval empty", E, lambda f: [f.empty], 1, r"is empty"),
    ("eval truncated", E, lambda f: [f.cut], 1, r"truncated, damaged or another kind of file"),
    ("eval not a checkpoint", E, lambda f: [f.other], 1, r"not a checkpoint of this toolkit"),
    ("eval newer format", E, lambda f: [f.newer], 1, r"newer than this toolkit reads"),
    ("eval unknown model", E, lambda f: [f.foreign], 1, r"'resnet9000', which this toolkit does not have"),
    ("eval malicious", E, lambda f: [f.evil], 1, r"refusing to load"),
    ("eval bare weights", E, lambda f: [f.bare], 1, r"bare weights .* accepts it with --model NAME"),
    ("eval bare weights wrong model", E, lambda f: [f.bare, "--model", "cnn"], 1, r"weights do not fit model 'cnn'"),
    ("eval unknown dataset", E, lambda f: [f.ckpt, "--dataset", "svhn"], 2, r"unknown dataset 'svhn'"),
    ("eval absent cuda", E, lambda f: [f.ckpt, "--device", "cuda:3"], 2, r"CUDA|device"),
    ("eval zero batch", E, lambda f: [f.ckpt, "--batch-size", "0"], 2, r"--batch-size: must be greater than 0"),
    ("eval negative subset", E, lambda f: [f.ckpt, "--subset", "-5"], 2, r"--subset: must be 0 or more"),
    ("eval bad data", E, lambda f: [f.ckpt, "--data-dir", f.magic], 1, r"magic number"),
    ("data unknown dataset", D, lambda f: ["--stats", "cifar"], 2, r"invalid choice: 'cifar'"),
    ("data missing dir", D, lambda f: ["--stats", "mnist", "--data-dir", f.tmp + "/nowhere"], 2, r"does not exist"),
    ("data truncated", D, lambda f: ["--stats", "mnist", "--data-dir", f.truncated], 1, r"is truncated"),
    ("data nothing asked", D, lambda f: [], 2, r"give --stats NAME or --show NAME"),
    ("models unknown", M, lambda f: ["--summary", "resnet9000"], 2, r"unknown model 'resnet9000'"),
    ("width on cnn", T, lambda f: ["--model", "cnn", "--width", "64"], 2, r"--width: model 'cnn' has no width option"),
    ("predict missing image", P, lambda f: [f.tmp + "/gone.png", "--ckpt", f.ckpt], 2, r"gone.png does not exist"),
    ("predict blank image", P, lambda f: [f.blank, "--ckpt", f.ckpt], 1, r"blank.png looks blank"),
    ("predict 1x1 image", P, lambda f: [f.dot, "--ckpt", f.ckpt], 1, r"dot.png is only 1x1 pixels"),
    ("predict not an image", P, lambda f: [f.fake_png, "--ckpt", f.ckpt], 1, r"photo.png is not an image"),
    (
        "predict folder without images",
        P,
        lambda f: [f.no_images, "--ckpt", f.ckpt],
        2,
        r"holds no PNG, JPEG, BMP, GIF, WebP or TIFF images",
    ),
    (
        "predict bad checkpoint",
        P,
        lambda f: [f.blank, "--ckpt", f.text],
        1,
        r"truncated, damaged or another kind of file",
    ),
    ("predict malicious checkpoint", P, lambda f: [f.blank, "--ckpt", f.evil], 1, r"refusing to load"),
    ("predict zero top", P, lambda f: [f.blank, "--top", "0"], 2, r"--top: must be greater than 0"),
    ("export unknown format", X, lambda f: [f.ckpt, "--format", "tflite"], 2, r"--format: invalid choice"),
    ("export no format", X, lambda f: [f.ckpt], 2, r"required: --format"),
    ("export missing checkpoint", X, lambda f: [f.tmp + "/gone.pt", "--format", "pt2"], 2, r"does not exist"),
    ("export onto itself", X, lambda f: [f.ckpt, "--format", "ckpt", "--out", f.ckpt], 2, r"which this command reads"),
    (
        "export into a missing folder",
        X,
        lambda f: [f.ckpt, "--format", "pt2", "--out", f.tmp + "/no/m.pt2"],
        2,
        r"the folder .*no does not exist",
    ),
    ("export newer format", X, lambda f: [f.newer, "--format", "pt2"], 1, r"newer than this toolkit reads"),
]


@pytest.mark.parametrize("case,script,argv,code,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, script, argv, code, pattern, files, tmp_path, monkeypatch, capsys):
    if "cuda" in case and HAS_CUDA or "mps" in case and HAS_MPS:
        pytest.skip("this machine has the device")
    monkeypatch.chdir(tmp_path)  # a default runs/ folder would appear here
    before = snapshot(files.tmp, str(tmp_path), os.path.join(ROOT, "data"))
    module = __import__(script)
    if script in (D, M):  # these two keep their own tiny error handling so they stay copyable
        try:
            got = module.main(argv(files))
        except SystemExit as e:
            got = e.code
    else:
        got = run(module.main, argv(files))
    err = capsys.readouterr().err
    assert got == code, err
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in err, err
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(files.tmp, str(tmp_path), os.path.join(ROOT, "data")) == before
    assert not os.path.exists(files.marker)


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert {c[1] for c in CASES} >= {T, E, D, M, P, X}


@pytest.mark.slow
def test_errors_from_a_real_process_have_no_traceback(files):
    """The same style end to end, through the script's own __main__."""
    result = run_cli(["train.py", "--resume", files.cut])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("train.py: error: ") and result.stderr.count("\n") == 1
    result = run_cli(["train.py", "--epochs", "0"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    debug = run_cli(["train.py", "--resume", files.cut, "--debug"])
    assert "Traceback" in debug.stderr and debug.returncode == 1


def test_the_malicious_pickle_really_runs_code_when_loaded_unsafely(tmp_path):
    """Control for the 'malicious' cases above: unpickled without weights_only, it makes the marker."""
    marker, path = str(tmp_path / "PWNED"), str(tmp_path / "evil.pt")
    write_malicious_checkpoint(path, marker)
    assert not os.path.exists(marker)
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)
