"""Seeded fuzzing: damaged checkpoints and IDX files end in one of our clean errors or a correct
result, never another exception. In-process and small, so hundreds of cases take seconds."""

import gzip
import os
import random
import shutil

import pytest
import torch

from checkpoint import build_model, load_checkpoint
from cli import UserError
from conftest import capture, idx_bytes, main_of
from data import IMAGE_MAGIC, LABEL_MAGIC, DataError, read_idx


def mutations(raw, rng, n):
    """N damaged copies of RAW: flipped bytes, cut-off ends, overwritten runs, inserted garbage."""
    for _ in range(n):
        b = bytearray(raw)
        kind = rng.randrange(4)
        if kind == 0:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[: rng.randrange(len(b))]
        elif kind == 2:
            at = rng.randrange(len(b))
            b[at : at + rng.randint(1, 64)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            at = rng.randrange(len(b))
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
        yield bytes(b)


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


@pytest.mark.parametrize("magic,dims,gz", [(IMAGE_MAGIC, (20, 28, 28), False), (LABEL_MAGIC, (50,), True)])
def test_damaged_idx_files_give_a_clean_error_or_the_promised_shape(tmp_path, magic, dims, gz):
    raw = idx_bytes(torch.randint(0, 10, dims, dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), magic)
    head = 4 + 4 * len(dims)
    rng = random.Random(3 + gz)
    path = str(tmp_path / ("file.gz" if gz else "file"))
    refused = 0
    headers = [h + raw[head:] for h in mutations(raw[:head], rng, 150)]  # the header alone, then anywhere
    for whole in headers + list(mutations(raw, rng, 150)):
        with open(path, "wb") as f:
            f.write(gzip.compress(whole) if gz else whole)
        try:
            out = read_idx(path, magic)
            assert out.dtype == torch.uint8 and out.numel() == len(whole) - head
        except DataError:
            refused += 1
    assert refused > 200
