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


def shared(depth):
    value = [1]
    for _ in range(depth):
        value = [value] * 10
    return value


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
        (lambda c: c["data"].update(input_shape=5), r"input_shape is not three whole numbers"),
        (lambda c: c["data"].update(input_shape={"c": 1}), r"input_shape is not three whole numbers"),
        (
            lambda c: (c["data"].update(input_shape=[3, 28, 28]), c["model"]["kwargs"].update(in_channels=3)),
            r"input_shape \[3, 28, 28\] is not \[1, 28, 28\], the only shape",
        ),
        (lambda c: c["data"].update(mean=float("nan")), r"finite mean"),
        (lambda c: c["data"].update(std=float("inf")), r"finite mean, std above 0"),
        (lambda c: c["data"].update(mean=10**400), r"finite mean"),  # too big for a float: no OverflowError
        (lambda c: c["model"]["kwargs"].update(num_classes=10**400), r"num_classes=1\d{39} must be from 1 to 100000"),
        # a list that holds one list ten times, eight deep: 300 bytes in the file, 10^8 parts if walked or printed
        (lambda c: c["model"]["kwargs"].update(width=shared(8)), r"model arguments are not names with plain values"),
        (lambda c: c["data"].update(input_shape=shared(8)), r"input_shape is not three whole numbers"),
        (lambda c: c["args"].update(seed=shared(8)), r"its args is not a plain record of bounded size"),
        (lambda c: c["history"].append({"epoch": shared(8)}), r"its history is not a plain record"),
        (lambda c: c["data"]["classes"].__setitem__(0, "x" * 100_000), r"names longer than any path or class name"),
        (
            lambda c: c["data"].update(
                test={"kind": "share", "indices": torch.tensor([70_000]), "count": 9, "labels_crc": 1}
            ),
            r"record of the test split holds no valid image numbers",
        ),
        (lambda c: c["state_dict"]["features.0.0.weight"].view(-1)[7].fill_(float("nan")), r"NaN or infinite weights"),
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


def test_a_checkpoint_file_is_bounded_before_torch_load(tmp_path):
    import zipfile

    stored = altered(tmp_path, lambda c: None)
    deflated = str(tmp_path / "deflated.pt")  # torch.load would inflate a record to whatever it claims
    with zipfile.ZipFile(stored) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    os.symlink("/dev/zero", tmp_path / "zero.pt")
    for path, code, message in (
        (deflated, 1, r"record .* is compressed, which torch.save never does"),
        (str(tmp_path / "zero.pt"), 2, r"is not a regular file"),
    ):
        got, line = one_line(lambda path=path: main_of("evaluate", [path, "--subset", "10"]))
        assert got == code and re.search(message, line), line


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.new_zeros(1).expand(t.shape), r"elements overlap in memory"),  # 4 bytes posing as a tensor
        (lambda t: t.new_zeros(3, 5), r"has exp_avg of shape \[3, 5\] for a parameter of"),
    ],
)
def test_resumed_optimizer_state_is_checked_against_the_model_before_a_folder_is_made(
    synth_run, tmp_path, change, message
):
    folder, run = synth_run
    ckpt = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    state = ckpt["optimizer"]["state"][0]
    state["exp_avg"] = change(state["exp_avg"])
    torch.save(ckpt, tmp_path / "odd.pt")
    out = tmp_path / "continued"
    argv = ["--resume", str(tmp_path / "odd.pt"), "--epochs", "5", "--out", str(out), "--data-dir", folder]
    code, line = one_line(lambda: main_of("train", argv))
    assert code == 1 and "cannot be resumed" in line and re.search(message, line), line
    assert not out.exists()
