"""Full disks, read-only folders, a scheduler's SIGTERM and a second run in a busy folder: each ends in
one line, with every good file left as it was."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from cli import WriteError, read_log
from conftest import ROOT, capture, main_of

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


def png_declaring(width, height):
    """A 60-byte PNG whose header declares WIDTH x HEIGHT pixels: what a decompression bomb shows first."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "side,message",
    [
        (20000, "declares more pixels than this reads"),  # Pillow's own guard
        (6000, "declares 6000x6000 pixels, more than the 25,000,000 this reads"),
    ],
)
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(tmp_path, side, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(side, side))
    t0 = time.perf_counter()
    code, _, err = capture(lambda: main_of("predict", [str(path)]))
    assert code == 1 and message in err, err
    assert len(err.strip().splitlines()) == 1 and time.perf_counter() - t0 < 5


def tiff_claiming(samples, width=40, height=40):
    """An uncompressed 8-bit TIFF whose header claims SAMPLES values a pixel (one is right)."""
    import struct

    entries = [
        (256, 3, width),
        (257, 3, height),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, 0),
        (277, 3, samples),
        (278, 3, height),
        (279, 4, width * height),
    ]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = b"".join(
        struct.pack("<HHII", tag, kind, 1, data_at if tag == 273 else value)
        if kind == 4
        else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        for tag, kind, value in entries
    )
    return (
        b"II*\0"
        + struct.pack("<I", 8)
        + struct.pack("<H", len(entries))
        + ifd
        + b"\0\0\0\0"
        + b"\xff" * (width * height)
    )


def test_pillow_and_its_libtiff_print_nothing_around_the_one_line(tmp_path):
    """A size past Pillow's own bomb limit (a Python warning), a TIFF claiming 72 samples a pixel (a
    record of Pillow's logger) and an LZW TIFF with damaged codes (libtiff, writing from C): each is
    refused with a UserError and nothing else on stderr. In a fresh process: its stderr is the real one."""
    from PIL import Image, ImageDraw

    (tmp_path / "big.png").write_bytes(png_declaring(10000, 10000))
    (tmp_path / "samples.tif").write_bytes(tiff_claiming(72))
    image = Image.new("L", (40, 40), 255)
    ImageDraw.Draw(image).line([(20, 4), (20, 36)], fill=0, width=4)
    image.save(tmp_path / "lzw.tif", compression="tiff_lzw")
    raw = bytearray((tmp_path / "lzw.tif").read_bytes())
    raw[8:60] = bytes(b ^ 0x55 for b in raw[8:60])  # the strip's codes, just after the 8-byte header
    (tmp_path / "lzw.tif").write_bytes(raw)
    script = (
        "import sys; from cli import UserError; from preprocess import read_gray\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n        read_gray(path)\n    except UserError as e:\n        print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, *(str(tmp_path / f) for f in ("big.png", "samples.tif", "lzw.tif"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and "declares 10000x10000 pixels" in lines[0], lines
    assert "is not an image this reads" in lines[1] and "cannot be read (decoder error" in lines[2], lines
