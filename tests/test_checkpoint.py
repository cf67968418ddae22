"""checkpoint.py: a checkpoint's record is sized and checked before its model is built, and a damaged
file ends in one clean error or a working model (seeded fuzzing, in process)."""

import os
import random
import re
import shutil
import time

import pytest
import torch

from checkpoint import build_model, load_checkpoint
from cli import UserError
from conftest import ROOT, capture, main_of, mutations, one_line


def altered(tmp_path, change):
    """A copy of the shipped mnist-top.pt (a vgg) with its record changed."""
    ckpt = torch.load(os.path.join(ROOT, "weights", "mnist-top.pt"), weights_only=True)
    change(ckpt)
    path = str(tmp_path / "altered.pt")
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["model"]["kwargs"].update(width=4096), r"width=4096 must be from 1 to 1024"),
        (lambda c: c["model"]["kwargs"].update(width=32.0), r"width=32.0 must be a whole number"),
        (
            lambda c: c["model"]["kwargs"].update(width=1024),
            r"would have 292,631,562 parameters, more than the 100,000,000",
        ),
        (lambda c: c["model"]["kwargs"].update(width=512), r"weights do not fit model 'vgg' \(features.0.0.weight is"),
        (lambda c: c["model"]["kwargs"].update(num_classes=12), r"predicts 12 classes but it names 10"),
        (lambda c: c["model"]["kwargs"].update(in_channels=3), r"reads 3 channels but its data has 1"),
        (lambda c: c["data"].update(input_shape=5), r"input_shape 5 is not \[1, 28, 28\]"),
        (lambda c: c["data"].update(input_shape={"c": 1}), r"input_shape \{'c': 1\} is not"),
        (
            lambda c: (c["data"].update(input_shape=[3, 28, 28]), c["model"]["kwargs"].update(in_channels=3)),
            r"input_shape \[3, 28, 28\] is not \[1, 28, 28\], the only shape",
        ),
        (lambda c: c["data"].update(mean=float("nan")), r"finite mean"),
        (lambda c: c["data"].update(std=float("inf")), r"finite mean, std above 0"),
        (lambda c: c["data"].update(mean=10**400), r"finite mean"),  # too big for a float: no OverflowError
        (lambda c: c["model"]["kwargs"].update(num_classes=10**400), r"num_classes=1\d{39} must be from 1 to 100000"),
    ],
)
def test_a_checkpoint_is_sized_and_checked_before_its_model_is_built(tmp_path, change, message):
    path = altered(tmp_path, change)
    t0 = time.perf_counter()
    code, line = one_line(lambda: main_of("evaluate", [path, "--subset", "10"]))
    assert code == 1 and re.search(message, line), line
    assert time.perf_counter() - t0 < 5


def pickle_span(path):
    """(start, end) of the pickled record inside a torch.save zip: the part that says what things are."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    with open(path, "rb") as f:  # the local header: 30 bytes, then the name and extra fields
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def test_damaged_checkpoints_give_a_clean_error_or_a_working_model(synth_run, tmp_path):
    _, run = synth_run
    raw = open(os.path.join(run, "last.pt"), "rb").read()
    rng, path = random.Random(1), str(tmp_path / "damaged.pt")
    lo, hi = pickle_span(os.path.join(run, "last.pt"))
    in_record = [
        raw[:lo] + case[: hi - lo] + raw[hi:] for case in mutations(raw[lo:hi], rng, 300) if len(case) >= hi - lo
    ]  # same length: the zip index stays valid, the record does not
    outcomes = {"refused": 0, "loaded": 0}
    for case in list(mutations(raw, rng, 300)) + in_record:
        with open(path, "wb") as f:
            f.write(case)
        try:
            model, _ = build_model(load_checkpoint(path), path=path)
            with torch.no_grad():
                assert model.eval()(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
            outcomes["loaded"] += 1
        except UserError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 0, outcomes  # both kinds were met


def test_damaged_checkpoints_are_resumed_or_refused_cleanly(synth_run, tmp_path):
    """train.py --resume reads more of a checkpoint (optimizer, RNG, history) than evaluation does."""
    data, run = synth_run
    raw = open(os.path.join(run, "last.pt"), "rb").read()
    rng, folder = random.Random(2), tmp_path / "run"
    shutil.copytree(run, folder)
    codes = []
    for case in mutations(raw, rng, 40):
        (folder / "last.pt").write_bytes(case)
        code, _, err = capture(lambda: main_of("train", ["--resume", str(folder), "--data-dir", data]))
        assert code in (0, 1, 2) and "unexpected" not in err and "Traceback" not in err, err
        codes.append(code)
    assert codes.count(0) and codes.count(1) > 10, codes
