"""Shared helpers: tiny synthetic IDX datasets, script runners, and disk snapshots."""
import gzip
import hashlib
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED = os.path.join(os.path.dirname(ROOT), "shared", "datasets")
HAS_FASHION = os.path.isdir(os.path.join(SHARED, "FashionMNIST", "raw"))


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
                x[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 250
        for kind, t, magic in (("images-idx3", x, 0x803), ("labels-idx1", y, 0x801)):
            path = os.path.join(folder, f"{split}-{kind}-ubyte" + (".gz" if gz else ""))
            data = idx_bytes(t, magic)
            with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
                f.write(data)
    return folder


@pytest.fixture
def synth(tmp_path):
    """A folder with a small synthetic dataset in flat layout."""
    return write_idx_set(str(tmp_path / "synth"))


def run_script(module, argv, capsys):
    """Run a script's main through common.run in this process: (exit code, stdout, stderr)."""
    import importlib

    from common import run
    mod = importlib.import_module(module)
    code = run(mod.main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_cli(args, cwd=ROOT, timeout=600, env=None):
    """Run a command line as a separate process: CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MNIST_DEBUG", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def snapshot(*folders):
    """Every file under the folders with its size and hash, to prove that nothing changed."""
    state = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".pytest_cache", ".git")]
            state[dirpath] = "dir"
            for name in filenames:
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    state[path] = (os.path.getsize(path), hashlib.md5(f.read()).hexdigest())
    return state
