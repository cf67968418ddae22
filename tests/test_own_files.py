"""The third hardening round, read as an attacker would: images only in the formats of one list, a
user's own files never written over, temporary files that follow no planted link, checkpoints and
IDX files bounded before anything is allocated, and images of any bit depth. Each case ends in one
line and a non-zero exit, or the right result, with every other file left as it was."""

import gzip
import json
import os
import re
import shutil
import time
import tracemalloc

import pytest
import torch

import cli
import data
from cli import UserError, read_log
from conftest import ROOT, capture, idx_bytes, main_of, snapshot, write_idx_set
from preprocess import FORMAT_NAMES, read_gray, to_mnist

FAST = ["--model", "fast", "--epochs", "1", "--progress", "off"]


def one_line(call):
    """(exit code, the single line on stderr) of a script's main run in this process."""
    code, _, err = capture(call)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


def digit_png(path, size=64):
    from PIL import Image, ImageDraw

    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).line([(size // 2, size // 8), (size // 2, size * 7 // 8)], fill=0, width=size // 10)
    image.save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# 1. Formats from one list
# ---------------------------------------------------------------------------------------------


def test_an_eps_file_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    """Pillow reads EPS by running Ghostscript; it must never be asked to."""
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", lambda: pytest.fail("Ghostscript was looked for"))
    eps = tmp_path / "x.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 14 2 moveto 14 26 lineto stroke\n")
    code, line = one_line(lambda: main_of("predict", [str(eps)]))
    assert code == 1 and f"is not an image this reads; give a {FORMAT_NAMES} file" in line


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_listed_format_is_read(tmp_path, fmt):
    from PIL import Image

    path = tmp_path / f"one.{fmt.lower()}"
    Image.open(digit_png(tmp_path / "one.png")).convert("L").save(path, fmt)
    assert to_mnist(read_gray(str(path))).max() == 255


def test_an_unlisted_format_pillow_knows_is_refused(tmp_path):
    from PIL import Image

    path = tmp_path / "one.ico"
    Image.open(digit_png(tmp_path / "one.png")).save(path, "ICO")
    with pytest.raises(UserError, match=f"give a {FORMAT_NAMES} file"):
        read_gray(str(path))


# ---------------------------------------------------------------------------------------------
# 3. A user's files stay theirs
# ---------------------------------------------------------------------------------------------


def test_save_preprocessed_never_writes_over_an_input(tmp_path):
    folder = tmp_path / "drawings"
    folder.mkdir()
    digit_png(folder / "a.png")
    before = snapshot(str(tmp_path))
    code, line = one_line(lambda: main_of("predict", [str(folder), "--save-preprocessed", str(folder)]))
    assert code == 2 and "would write over the input" in line and "a.png" in line
    assert snapshot(str(tmp_path)) == before


def test_save_preprocessed_refuses_two_inputs_with_one_name(tmp_path):
    from PIL import Image

    folder = tmp_path / "drawings"
    folder.mkdir()
    Image.open(digit_png(folder / "a.png")).convert("L").save(folder / "a.jpg")
    before = snapshot(str(tmp_path))
    code, line = one_line(lambda: main_of("predict", [str(folder), "--save-preprocessed", str(tmp_path / "seen")]))
    assert code == 2 and "a.jpg" in line and "a.png" in line and "would both become" in line
    assert snapshot(str(tmp_path)) == before


def test_save_preprocessed_refuses_names_that_differ_only_in_case(tmp_path):
    # one file on macOS's and Windows' file systems, where the second would overwrite the first
    from PIL import Image

    folder = tmp_path / "drawings"
    folder.mkdir()
    Image.open(digit_png(folder / "seven.png")).save(folder / "Seven.jpg")
    before = snapshot(str(tmp_path))
    code, line = one_line(lambda: main_of("predict", [str(folder), "--save-preprocessed", str(tmp_path / "seen")]))
    assert code == 2 and "seven.png" in line and "Seven.jpg" in line and "would both become" in line
    assert snapshot(str(tmp_path)) == before


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


def test_a_temporary_name_planted_as_a_link_is_not_followed(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    monkeypatch.setattr(cli.secrets, "token_hex", lambda n: "0123456789ab")
    target = tmp_path / "args.json"
    os.symlink(victim, tmp_path / ".args.json.0123456789ab.tmp")
    with pytest.raises(cli.WriteError, match="cannot write .*args.json"):
        cli.write_text_atomic("{}", str(target))
    assert victim.read_text() == "precious" and not target.exists()


def test_temporary_names_are_fresh_and_in_the_target_folder(tmp_path, monkeypatch):
    made = []
    real = cli.open_new
    monkeypatch.setattr(cli, "open_new", lambda path, mode="wb": made.append(path) or real(path, mode))
    for _ in range(20):
        cli.write_text_atomic("{}", str(tmp_path / "last.pt"))
    assert len(set(made)) == 20 and all(os.path.dirname(n) == str(tmp_path) for n in made)
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


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


def test_a_checkpoint_save_syncs_the_file_and_its_folder(tmp_path, monkeypatch):
    from checkpoint import save_checkpoint

    synced = []
    real = os.fsync
    monkeypatch.setattr(cli.os, "fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or real(fd))
    save_checkpoint({"x": torch.zeros(3)}, str(tmp_path / "last.pt"))
    assert any(p.endswith(".tmp") for p in synced) and str(tmp_path) in synced


def test_a_killed_save_leaves_nothing_behind_once_the_folder_is_used_again(synth_data, tmp_path):
    out = str(tmp_path / "run")
    assert main_of("train", [*FAST, "--data-dir", synth_data, "--out", out]) == 0
    stale = os.path.join(out, ".last.pt.a1b2c3d4e5f6.tmp")
    open(stale, "wb").write(b"half a checkpoint")
    mine = os.path.join(out, ".notes.a1b2c3d4e5f6.tmp")  # not one of a run's files: left alone
    open(mine, "w").write("mine")
    assert main_of("train", ["--resume", out, "--epochs", "2", "--data-dir", synth_data]) == 0
    assert not os.path.exists(stale) and os.path.exists(mine)


# ---------------------------------------------------------------------------------------------
# 4. Bounded before allocating
# ---------------------------------------------------------------------------------------------


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


def write_gz(folder, name, raw):
    with gzip.open(os.path.join(folder, name + ".gz"), "wb") as f:
        f.write(raw)


def gz_set(folder, seed, n=30):
    """A small IDX set as .gz files only."""
    plain = write_idx_set(str(folder) + "-plain", n_train=n, n_test=10, seed=seed)
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(plain):
        write_gz(folder, name, open(os.path.join(plain, name), "rb").read())
    return str(folder)


def test_the_extracted_copy_is_used_only_while_it_matches_its_gz(tmp_path):
    folder = gz_set(tmp_path / "set", seed=1)
    first = data.load_split("mnist", "train", folder)
    assert os.path.exists(os.path.join(folder, "train-images-idx3-ubyte"))  # kept extracted
    again = data.load_split("mnist", "train", folder)
    assert torch.equal(first[0], again[0])
    other = gz_set(tmp_path / "other", seed=2)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):  # the .gz replaced, the copy stale
        shutil.copy(os.path.join(other, name), os.path.join(folder, name))
    replaced = data.load_split("mnist", "train", folder)
    assert torch.equal(replaced[0], data.load_split("mnist", "train", other)[0])
    assert not torch.equal(replaced[0], first[0])


def test_the_extracted_copy_is_written_only_once_the_pair_is_checked(tmp_path):
    folder = gz_set(tmp_path / "set", seed=1)
    write_gz(folder, "train-labels-idx1-ubyte", idx_bytes(torch.zeros(29, dtype=torch.uint8), 0x801))
    with pytest.raises(data.DataError, match="30 images but .* 29 labels"):
        data.load_split("mnist", "train", folder)
    assert not [f for f in os.listdir(folder) if not f.endswith(".gz")]


def test_a_forged_gz_allocates_only_what_it_holds(tmp_path):
    """The header promises 700,000 images (549 MB) and the trailer is forged to agree; the file holds
    a few bytes. Reading stops at what really inflates, without allocating the promise."""
    path = str(tmp_path / "train-images-idx3-ubyte.gz")
    head = data.IMAGE_MAGIC.to_bytes(4, "big") + (700_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    with gzip.open(path, "wb") as f:
        f.write(head + b"\0" * 1000)
    promised = (len(head) + 700_000 * 784) % 2**32
    with open(path, "r+b") as f:  # forge the trailer's size to match the header's promise
        f.seek(-4, os.SEEK_END)
        f.write(promised.to_bytes(4, "little"))
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError, match="truncated|cannot be read"):
            data.read_idx(path, data.IMAGE_MAGIC)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


def test_idx_caps_fit_emnist_byclass_and_refuse_more_than_a_gigabyte(tmp_path):
    assert 697_932 * 784 < data.MAX_BYTES <= 1 << 30
    path = str(tmp_path / "train-images-idx3-ubyte")
    with open(path, "wb") as f:
        f.write(data.IMAGE_MAGIC.to_bytes(4, "big") + (1_400_000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2)
    with pytest.raises(data.DataError, match="claims 1,400,000 images .*more than any MNIST-style set holds"):
        data.read_idx(path, data.IMAGE_MAGIC)


# ---------------------------------------------------------------------------------------------
# 5. Images of any depth
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uint16 png", "int32 tiff", "float32 tiff"])
def test_deep_images_are_scaled_by_their_range(tmp_path, kind):
    """A faint scan: paper at 3000 and ink at 200 of 65535 (or the same as 32-bit integers or floats)
    clipped to 8 bits would be white on white; scaled by its own range it is a clear stroke."""
    import numpy as np
    from PIL import Image

    dtype, ext = {
        "uint16 png": (np.uint16, "png"),
        "int32 tiff": (np.int32, "tif"),
        "float32 tiff": (np.float32, "tif"),
    }[kind]
    pixels = np.full((64, 64), 3000, dtype)
    pixels[8:56, 28:36] = 200
    if dtype is np.float32:
        pixels = pixels / 65535
    path = str(tmp_path / f"faint.{ext}")
    Image.fromarray(pixels).save(path)
    gray = read_gray(path)
    assert gray.min() == 0 and gray.max() == 1
    digit = to_mnist(gray)
    assert digit.max() == 255 and (digit > 128).sum() > 20
