"""Finding, parsing and validating IDX files (damaged ones included), their extracted .gz copies and
size caps; batches, splits, normalization and augmentation; the grid data.py --show draws."""

import gzip
import os
import random
import shutil
import tracemalloc

import pytest
import torch

import data
from conftest import HAS_FASHION, SHARED, idx_bytes, mutations, png_size, write_idx_set
from data import IMAGE_MAGIC, LABEL_MAGIC, Augment, Batches, DataError, load_split, read_idx, split_off_val


def test_reads_flat_and_torchvision_layouts_gz_or_not(tmp_path):
    flat = write_idx_set(str(tmp_path / "flat"), n_train=50, n_test=20)
    nested = write_idx_set(str(tmp_path / "root" / "MNIST" / "raw"), n_train=40, n_test=10, gz=True)
    x, y = load_split("mnist", "train", flat)
    assert x.shape == (50, 1, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x, y = load_split("mnist", "test", str(tmp_path / "root"))
    assert x.shape == (10, 1, 28, 28)
    assert os.path.exists(os.path.join(nested, "t10k-images-idx3-ubyte.gz"))


def test_explicit_data_dir_comes_first(tmp_path):
    # The embedded MNIST is always findable; an explicit --data-dir must win over it.
    folder = write_idx_set(str(tmp_path / "d"), n_train=33, n_test=11)
    assert len(load_split("mnist", "train", folder)[1]) == 33


def corrupt(folder, name, data_bytes):
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data_bytes)


@pytest.mark.parametrize(
    "case,make,message",
    [
        ("truncated", lambda raw: raw[:-100], "is truncated"),
        ("trailing", lambda raw: raw + b"\0" * 7, "trailing bytes"),
        ("magic", lambda raw: b"\0\0\x08\x01" + raw[4:], "not an IDX image file"),
        ("tiny", lambda raw: raw[:3], "only 3 bytes"),
        ("size", lambda raw: raw[:8] + (32).to_bytes(4, "big") + raw[12:], "32x28 images"),
    ],
)
def test_corrupt_image_files_give_clear_errors(tmp_path, case, make, message):
    folder = write_idx_set(str(tmp_path / case), n_train=20, n_test=5)
    path = os.path.join(folder, "train-images-idx3-ubyte")
    raw = open(path, "rb").read()
    corrupt(folder, "train-images-idx3-ubyte", make(raw))
    with pytest.raises(DataError, match=message):
        load_split("mnist", "train", folder)


def test_count_mismatch_and_bad_labels(tmp_path):
    folder = write_idx_set(str(tmp_path / "a"), n_train=20, n_test=5)
    corrupt(folder, "train-labels-idx1-ubyte", idx_bytes(torch.zeros(19, dtype=torch.uint8), 0x801))
    with pytest.raises(DataError, match="20 images but .* 19 labels"):
        load_split("mnist", "train", folder)
    corrupt(folder, "train-labels-idx1-ubyte", idx_bytes(torch.full((20,), 12, dtype=torch.uint8), 0x801))
    with pytest.raises(DataError, match="label 12, but mnist has only 10 classes"):
        load_split("mnist", "train", folder)


def test_broken_gzip(tmp_path):
    folder = str(tmp_path / "g")
    write_idx_set(folder, n_train=20, n_test=5, gz=True)
    path = os.path.join(folder, "train-images-idx3-ubyte.gz")
    raw = open(path, "rb").read()
    corrupt(folder, "train-images-idx3-ubyte.gz", raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot be read.*truncated or not gzip"):
        load_split("mnist", "train", folder)


def gzip_bomb(path, n_images, inflated_mb, forge_trailer=False):
    """An image file whose header promises N_IMAGES but which inflates to INFLATED_MB of zeros after it,
    as gzip members of 4 MB each (4 KB apiece on disk). FORGE_TRAILER makes its last 4 bytes agree with
    the header, so only reading can tell."""
    header = data.IMAGE_MAGIC.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n_images, 28, 28))
    zeros = gzip.compress(bytes(4 << 20), compresslevel=9)
    raw = gzip.compress(header) + zeros * (inflated_mb // 4)
    if forge_trailer:
        raw = raw[:-4] + (16 + n_images * 784).to_bytes(4, "little")
    with open(path, "wb") as f:
        f.write(raw)
    return len(raw)


@pytest.mark.parametrize("n_images,forge", [(60000, False), (100, True)])
def test_a_gzip_bomb_is_refused_at_once(tmp_path, n_images, forge):
    """2 GB of zeros in a 2 MB file: refused from its trailer without inflating it, or (trailer forged)
    after the promised bytes plus one; in well under a second and a few MB either way."""
    import time
    import tracemalloc

    path = str(tmp_path / "train-images-idx3-ubyte.gz")
    assert gzip_bomb(path, n_images, 2048, forge) < 3_000_000
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="gzip trailer records" if not forge else "has trailing bytes"):
        read_idx(path, data.IMAGE_MAGIC)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 1.0 and peak < 8_000_000, (seconds, peak)


def test_a_header_promising_too_much_is_refused_before_reading(tmp_path):
    path = str(tmp_path / "train-labels-idx1-ubyte")
    with open(path, "wb") as f:
        f.write(data.LABEL_MAGIC.to_bytes(4, "big") + (2**31).to_bytes(4, "big"))
    with pytest.raises(DataError, match="claims 2,147,483,648 labels .*more than any"):
        read_idx(path, data.LABEL_MAGIC)


def test_missing_files_name_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "_download", lambda info, root: "no network")
    with pytest.raises(DataError) as err:
        data.find_split(data.DATASETS["kmnist"], "train", str(tmp_path))
    text = str(err.value)
    assert "train-images-idx3-ubyte" in text and "no network" in text
    assert os.path.join(str(tmp_path), "KMNIST", "raw") in text and os.path.join(data.HERE, "data") in text
    with pytest.raises(DataError, match="does not exist"):
        data.find_split(data.DATASETS["mnist"], "train", str(tmp_path / "nope"))


@pytest.mark.slow
def test_failed_download_leaves_no_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = data._download(data.DATASETS["kmnist"], str(tmp_path / "dl"))  # offline: fails
    if problem is None:
        pytest.skip("this machine is online")
    assert not os.path.exists(tmp_path / "dl")


def test_batches_keep_the_last_batch_and_shuffle_reproducibly():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 28, 28).contiguous()
    y = torch.arange(10)
    b = Batches(x, y, 4, 0.0, 1 / 255, shuffle=True, seed=3)
    sizes = [len(yb) for _, yb in b.epoch(0)]
    assert sizes == [4, 4, 2]
    assert len(Batches(x, y, 4, 0.0, 1.0, drop_last=True)) == 2
    first = torch.cat([yb for _, yb in b.epoch(0)])
    assert sorted(first.tolist()) == list(range(10)) and first.tolist() != list(range(10))
    assert torch.equal(first, torch.cat([yb for _, yb in b.epoch(0)]))  # same seed, same order
    assert not torch.equal(first, torch.cat([yb for _, yb in b.epoch(1)]))  # a new order each epoch
    resumed = torch.cat([yb for _, yb in b.epoch(0, start=1)])
    assert torch.equal(resumed, first[4:])  # resume mid-epoch
    xb, yb = next(b.epoch(0))
    assert torch.equal(xb[:, 0, 0, 0], yb.float())  # normalization with std 1/255 gives raw pixels


def test_ranks_split_each_global_batch():
    x, y = torch.zeros(10, 1, 28, 28, dtype=torch.uint8), torch.arange(10)
    whole = [yb for _, yb in Batches(x, y, 4, 0, 1, shuffle=True, seed=1).epoch(2)]
    parts = [
        [yb for _, yb in Batches(x, y, 4, 0, 1, shuffle=True, seed=1, rank=r, world_size=2).epoch(2)] for r in range(2)
    ]
    for w, a, b in zip(whole, *parts):
        assert torch.equal(torch.cat([a, b]), w)


def test_normalize_matches_the_formula():
    x = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    expected = (x.float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(data.normalize(x, 0.1307, 0.3081), expected, atol=1e-5)


def test_val_split_is_reproducible_and_disjoint():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    y = torch.arange(100)
    (_, tr1), (_, va1) = split_off_val(x, y, 10)
    (_, tr2), (_, va2) = split_off_val(x, y, 10)
    assert torch.equal(va1, va2) and len(va1) == 10 and len(tr1) == 90
    assert not set(va1.tolist()) & set(tr1.tolist())


def test_augment_is_seeded_and_keeps_shapes():
    x = torch.rand(16, 1, 28, 28)
    aug = Augment(degrees=15, translate=0.1, scale=0.1, erase=0.5, flip=True)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    c = aug(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1
    blank = Augment(0, 0, 0, erase=1.0)(torch.ones(8, 1, 28, 28), torch.Generator().manual_seed(0))
    erased = (blank == 0).float().mean((1, 2, 3))
    assert ((erased > 0.01) & (erased < 0.4)).all()  # every image lost one box of 2-33 %


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_affine_grid_is_torchs(dtype, tol):
    theta = torch.randn(5, 2, 3, dtype=dtype, generator=torch.Generator().manual_seed(0))
    for h, w in ((28, 28), (20, 32), (1, 3)):
        ours = data.affine_grid(theta.view(5, 6), h, w)
        torchs = torch.nn.functional.affine_grid(theta, [5, 1, h, w], align_corners=False)
        assert ours.shape == torchs.shape and (ours - torchs).abs().max() < tol


def test_real_mnist_matches_its_published_facts():
    x, y = load_split("mnist", "train")
    assert x.shape == (60000, 1, 28, 28)
    counts = torch.bincount(y).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    mean, std = data.pixel_stats(x)
    assert (round(mean, 4), round(std, 4)) == (data.DATASETS["mnist"].mean, data.DATASETS["mnist"].std)


@pytest.mark.skipif(not HAS_FASHION, reason="Fashion-MNIST not in ../shared/datasets")
def test_fashion_statistics_match_the_data():
    x, _ = load_split("fashion-mnist", "train", SHARED)
    mean, std = data.pixel_stats(x)
    info = data.DATASETS["fashion-mnist"]
    assert (round(mean, 4), round(std, 4)) == (info.mean, info.std)


def test_stats_cli(capsys, synth):
    assert data.main(["--stats", "mnist", "--data-dir", synth]) == 0
    out = capsys.readouterr().out
    assert "[mnist train] 300 images" in out and "mean" in out and "%" in out


def test_data_imports_without_torchvision_at_start():
    import subprocess
    import sys

    code = "import sys, data; print('torchvision' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=data.HERE, capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_gzip_and_plain_give_the_same_tensor(tmp_path):
    t = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    raw = idx_bytes(t, 0x803)
    (tmp_path / "a").write_bytes(raw)
    with gzip.open(tmp_path / "a.gz", "wb") as f:
        f.write(raw)
    assert torch.equal(read_idx(str(tmp_path / "a"), 0x803), t)
    assert torch.equal(read_idx(str(tmp_path / "a.gz"), 0x803), t)


def test_data_show_draws_a_grid(synth_data, tmp_path, capsys):
    for flags, rows in (([], 4), (["--augment"], 4)):
        out = str(tmp_path / f"grid{len(flags)}.png")
        assert data.main(["--show", "mnist", "--data-dir", synth_data, "--out", out, *flags]) == 0, capsys.readouterr()
        w, h = png_size(out)
        assert w == 8 * 112 + 9 * 4 and h > rows * 112


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
