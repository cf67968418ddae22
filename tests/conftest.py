"""Shared helpers: tiny synthetic IDX datasets, trained runs shared by the whole session, script
runners, disk snapshots, small images and damaged copies of files. Tests marked `slow` start real
processes or train for real; the quick tier is `python -m pytest -q -m "not slow"`."""

import gzip
import hashlib
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(1, os.path.join(ROOT, "experiments"))

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
HAS_FASHION = os.path.isdir(os.path.join(SHARED, "FashionMNIST", "raw"))
FASHION_ARGS = ["--data-dir", SHARED] if HAS_FASHION else []


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real processes or trains on real data (left out by -m 'not slow')")


def idx_bytes(tensor, magic):
    dims = b"".join(int(d).to_bytes(4, "big") for d in tensor.shape)
    return magic.to_bytes(4, "big") + dims + tensor.to(torch.uint8).numpy().tobytes()


def write_idx_set(folder, n_train=300, n_test=100, gz=False, seed=0, images=None, labels=None):
    """Write the four IDX files of a small learnable set: each class is a bright bar at its own row."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        y = torch.randint(0, 10, (n,), generator=g) if labels is None else labels
        x = torch.randint(0, 60, (n, 28, 28), generator=g) if images is None else images
        if images is None:
            for i, c in enumerate(y.tolist()):
                x[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 250
        for kind, t, magic in (("images-idx3", x, 0x803), ("labels-idx1", y, 0x801)):
            path = os.path.join(folder, f"{split}-{kind}-ubyte" + (".gz" if gz else ""))
            data = idx_bytes(t, magic)
            with gzip.open(path, "wb") if gz else open(path, "wb") as f:
                f.write(data)
    return folder


@pytest.fixture
def synth(tmp_path):
    """A folder with a small synthetic dataset in flat layout, for tests that change it."""
    return write_idx_set(str(tmp_path / "synth"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic dataset (300 train, 200 test images) shared by the session: do not change it."""
    return write_idx_set(str(tmp_path_factory.mktemp("data") / "synth"), n_train=300, n_test=200)


@pytest.fixture(scope="session")
def synth_run(synth_data, tmp_path_factory):
    """A `fast` model trained 3 epochs on the synthetic set with a validation split: (data, run folder)."""
    out = str(tmp_path_factory.mktemp("runs") / "synth")
    code = main_of(
        "train",
        [
            "--model",
            "fast",
            "--epochs",
            "3",
            "--val",
            "50",
            "--data-dir",
            synth_data,
            "--out",
            out,
            "--progress",
            "off",
        ],
    )
    assert code == 0
    return synth_data, out


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory):
    """A real MNIST run of a few hundred steps: 300 steps of 128 images, tested on all 10,000.
    (run folder, what it printed)."""
    out = str(tmp_path_factory.mktemp("runs") / "mnist")
    code, stdout, err = capture(
        lambda: main_of(
            "train", ["--model", "cnn", "--epochs", "1", "--subset", "38400", "--out", out, "--progress", "off"]
        )
    )
    assert code == 0, err
    return out, stdout


def main_of(module, argv):
    """Exit code of a script's main through cli.run, in this process."""
    import importlib

    from cli import run

    return run(importlib.import_module(module).main, list(argv))


def capture(call):
    """(result, stdout, stderr) of call(), without pytest's capsys (usable in session fixtures)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = call()
    return result, out.getvalue(), err.getvalue()


def run_script(module, argv, capsys):
    """Run a script's main through cli.run in this process: (exit code, stdout, stderr)."""
    code = main_of(module, argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    """Run a command line as a separate process: CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MNIST_DEBUG", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def snapshot(*folders):
    """Every file under the folders with its size and hash, to prove that nothing changed. (Files
    over 1 MB, the datasets, by size, inode and modification time: hashing them every case was most
    of the bad-input table's time, and a write or a replace changes one of the three.)"""
    state = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".pytest_cache", ".git")]
            state[dirpath] = "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                st = os.stat(path)
                if st.st_size > 1 << 20:
                    state[path] = (st.st_size, st.st_ino, st.st_mtime_ns)
                    continue
                with open(path, "rb") as f:
                    state[path] = (st.st_size, hashlib.md5(f.read()).hexdigest())
    return state


def one_line(call):
    """(exit code, the single line on stderr) of a script's main run in this process."""
    code, _, err = capture(call)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


def png_size(path):
    """(width, height) of a PNG file, checking that it is one."""
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def digit_png(path, size=64):
    """A PNG of a one: a dark vertical stroke on white."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).line([(size // 2, size // 8), (size // 2, size * 7 // 8)], fill=0, width=size // 10)
    image.save(path)
    return str(path)


def as_photo(image, size=200, canvas=(320, 260), at=(90, 20)):
    """An MNIST digit (uint8 [28, 28]) as a user's drawing: dark ink on white paper, enlarged and off-centre."""
    from PIL import Image

    big = Image.fromarray((255 - image).numpy(), mode="L").resize((size, size), Image.BILINEAR)
    paper = Image.new("L", canvas, 255)
    paper.paste(big, at)
    return paper


@pytest.fixture(scope="module")
def mnist_test():
    """The real MNIST test set as stored: (uint8 images, labels). test_hub.py has its own, scaled to [0, 1]."""
    from data import load_split

    return load_split("mnist", "test")


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
