"""MNIST-style datasets held on the device as one uint8 tensor, batched without a DataLoader.

    python data.py --stats fashion-mnist --data-dir DIR   # counts, pixel statistics, class balance
    python data.py --show mnist --augment --out grid.png

    from data import load_split, Batches, predict_logits
    images, labels = load_split("mnist", "train", device="cuda")   # uint8 [60000, 1, 28, 28] on the GPU
    logits = predict_logits(model, images, 0.1307, 0.3081)           # float32 [60000, 10], in eval mode

Needs only torch to import, so it can be copied into another project alone: torchvision only to
download, and the command line uses cli.py and plots.py beside it. Your own CSV, folders: userdata.py.
"""

import gzip
import math
import os
import sys
import zlib
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class DataError(Exception):
    """Missing, corrupt or inconsistent dataset files; the message says what to do. `code` is the exit
    status: 2 when the command line named something that is not there, 1 for a bad file."""

    user_error = True  # cli.run prints the message as it is

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    folder: str  # torchvision's folder name: <root>/<folder>/raw/
    classes: tuple
    mean: float = None  # training-set pixel mean and std on the 0..1 scale
    std: float = None
    flips: bool = False  # whether a mirrored image is still the same class (clothing yes, characters no)
    prefix: str = ""  # of the file names: EMNIST's are emnist-<split>-train-images-idx3-ubyte and so on
    transposed: bool = False  # EMNIST stores each image transposed
    first_label: int = 0  # EMNIST letters number their classes from 1
    rule: str = "mnist"  # how images from elsewhere are brought to 28x28 (preprocess.py): as MNIST's digits, or "fit"


# mean/std: over all 60,000 x 784 training pixels scaled to 0..1 (population std), measured with
# `python data.py --stats NAME`; tests/test_data.py checks them against the real files.
# KMNIST is not available offline here, so its statistics are computed from its training file on load.
DATASETS = {
    "mnist": DatasetInfo("mnist", "MNIST", tuple("0123456789"), 0.1307, 0.3081),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        0.2860,
        0.3530,
        flips=True,
    ),
    "kmnist": DatasetInfo("kmnist", "KMNIST", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
}
# EMNIST (Cohen et al. 2017), in torchvision's layout EMNIST/raw/. Balanced and bymerge merge the 15
# lowercase letters that look like their capitals into them, leaving 47 classes.
_DIGITS, _UPPER, _LOWER = tuple("0123456789"), tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), tuple("abcdefghijklmnopqrstuvwxyz")
_MERGED = _DIGITS + _UPPER + tuple("abdefghnqrt")
for _split, _classes, _first in (
    ("letters", _LOWER, 1),
    ("balanced", _MERGED, 0),
    ("bymerge", _MERGED, 0),
    ("byclass", _DIGITS + _UPPER + _LOWER, 0),
    ("digits", _DIGITS, 0),
    ("mnist", _DIGITS, 0),
):
    DATASETS[f"emnist-{_split}"] = DatasetInfo(
        f"emnist-{_split}", "EMNIST", _classes, prefix=f"emnist-{_split}-", transposed=True, first_label=_first
    )
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEBIAN_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_MAGIC, LABEL_MAGIC = 0x0803, 0x0801  # IDX: unsigned bytes, 3 or 1 dimensions


def dataset_info(name):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}", code=2)
    return DATASETS[name]


# ---------------------------------------------------------------------------------------------
# Finding and reading the IDX files
# ---------------------------------------------------------------------------------------------


def search_dirs(info, data_dir=None):
    """Folders to look in, first hit wins: --data-dir, ./data, this file's data/, Debian's package."""
    roots = [data_dir] if data_dir else []
    roots += [os.path.abspath("data"), os.path.join(HERE, "data")]
    dirs = []
    for root in roots:
        dirs += [os.path.join(root, info.folder, "raw"), os.path.join(root, info.folder), root]
    if info.name in DEBIAN_DIRS:
        dirs.append(DEBIAN_DIRS[info.name])
    return list(dict.fromkeys(os.path.normpath(d) for d in dirs))


def _find(folder, stem):
    """The file of STEM in FOLDER: its .gz when there is one (an extracted copy beside it is a cache
    that read_idx checks against it), else the plain file."""
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def find_split(info, split, data_dir=None, download=True):
    """Paths of the (images, labels) files of a split; downloads with torchvision as a last resort."""
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(
            f"--data-dir {data_dir} does not exist; pass the folder that holds "
            f"{info.folder}/raw/ or the IDX files themselves",
            code=2,
        )
    dirs = search_dirs(info, data_dir)
    names = [info.prefix + stem.replace("t10k", "test" if info.prefix else "t10k") for stem in FILES[split]]
    for folder in dirs:
        paths = [_find(folder, name) for name in names]
        if all(paths):
            return tuple(paths)
    root = data_dir or os.path.abspath("data")
    if download:
        problem = _download(info, root)
        if problem is None:
            return find_split(info, split, data_dir, download=False)
    else:
        problem = "download not attempted"
    raise DataError(
        f"cannot find {info.name} files {' and '.join(f + '[.gz]' for f in names)}; "
        f"looked in {', '.join(dirs)}; downloading into {root} failed ({problem}). "
        f"Copy the files into one of those folders or pass --data-dir"
        + (
            f" (on Debian or Ubuntu: apt-get install {DEBIAN_PACKAGES[info.name]})"
            if info.name in DEBIAN_PACKAGES
            else ""
        )
    )


def _download(info, root):
    """Let torchvision fetch the files into <root>/<folder>/raw/; returns None or why it failed.
    A failed attempt removes the folders it created, so nothing half-made is left behind."""
    created = [
        d
        for d in (root, os.path.join(root, info.folder), os.path.join(root, info.folder, "raw"))
        if not os.path.exists(d)
    ]
    try:
        import torchvision.datasets as tvd

        print(f"downloading {info.name} into {root} ...", file=sys.stderr)
        for train in (True, False):
            if info.folder == "EMNIST":  # one 0.5 GB archive holds every EMNIST split
                tvd.EMNIST(root, split=info.prefix.split("-")[1], train=train, download=True)
            else:
                {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST, "KMNIST": tvd.KMNIST}[info.folder](
                    root, train=train, download=True
                )
        return None
    except Exception as e:  # network errors come in many types; their text is what the user needs
        for d in reversed(created):
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return lines[-1][:200] if lines else type(e).__name__


# The largest MNIST-style set, EMNIST ByClass, holds 697,932 training images (547 MB); a header
# promising more than this many bytes is damaged or hostile.
MAX_BYTES = 1 << 30


def read_idx(path, magic):
    return _read_idx(path, magic)[0]  # the tensor alone


def _read_idx(path, magic):
    """(uint8 tensor, what to keep extracted or None) of an IDX file, .gz or plain. The header is read
    and checked first, then exactly the bytes it promises plus one (to notice trailing data), so a
    damaged or hostile file (a .gz that inflates to gigabytes) is refused after reading at most what a
    real one holds; a .gz's bytes are gathered as they inflate, never allocated on the header's word.
    A .gz's extracted copy beside it is read instead while it matches the .gz's own trailer (size and
    CRC-32); else the .gz is read, and its contents are returned for load_split to keep once the
    image and label files are known to belong together."""
    if path.endswith(".gz"):
        cached = _cached(path)
        if cached is not None:
            return _parse_idx(path[:-3], cached, magic), None
    ndim = magic & 0xFF
    kind = "image" if ndim == 3 else "label"
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
            head = f.read(4 + 4 * ndim)
            dims, size = _check_header(path, head, magic)
            promise = f"its header promises {dims[0]:,} {kind}s ({len(head) + size:,} bytes)"
            stored = _stored_size(path)
            # Refuse at once what cannot be right, so a decompression bomb is not even inflated (one with
            # a forged trailer is still stopped after the promised bytes plus one).
            if path.endswith(".gz") and stored is not None and stored != (len(head) + size) % 2**32:
                raise DataError(
                    f"{path} cannot be read: {promise} but its gzip trailer records {stored:,}; "
                    f"it is probably truncated or not gzip, or holds more than it should: delete it "
                    f"and copy or download it again"
                )
            if not path.endswith(".gz") and stored != len(head) + size:
                how = "is truncated" if stored < len(head) + size else "has trailing bytes"
                raise DataError(
                    f"{path} {how}: {promise} but the file holds {stored:,} bytes; delete it "
                    f"and copy or download it again"
                )
            body = _read_body(f, size + 1, path.endswith(".gz"))  # one byte more than promised: must not come
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"{path} cannot be read ({e}); it is probably truncated or not gzip: "
            f"delete it and copy or download it again"
        ) from None
    if len(body) != size:
        how = "is truncated" if len(body) < size else "has trailing bytes"
        raise DataError(
            f"{path} {how}: {promise} but it holds "
            f"{'only ' + format(len(head) + len(body), ',') + ' bytes' if len(body) < size else 'more'}; "
            f"delete it and copy or download it again"
        )
    tensor = (
        torch.frombuffer(body, dtype=torch.uint8, count=size).view(dims)
        if size
        else torch.zeros(dims, dtype=torch.uint8)
    )
    return tensor, ((path[:-3], head, body) if path.endswith(".gz") else None)


def _check_header(path, head, magic):
    """(dims, body bytes) of an IDX header, or a DataError saying what is wrong with it."""
    ndim = magic & 0xFF
    kind = "image" if ndim == 3 else "label"
    if len(head) < 4 or int.from_bytes(head[:4], "big") != magic:
        found = head[:4].hex() if len(head) >= 4 else f"only {len(head)} bytes"
        raise DataError(
            f"{path} is not an IDX {kind} file (magic number {found}, expected {magic:08x}); "
            f"check that the right file is there"
        )
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header; delete it and copy or download it again")
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path} holds {dims[1]}x{dims[2]} images, but these datasets are 28x28")
    size = math.prod(dims)
    if size > MAX_BYTES:
        raise DataError(
            f"{path} claims {dims[0]:,} {kind}s ({size:,} bytes), more than any MNIST-style set "
            f"holds ({MAX_BYTES:,} bytes at most); the file is damaged or not one of them"
        )
    return dims, size


def _parse_idx(path, data, magic):
    """An IDX file already in memory (a checked cache) as a uint8 tensor."""
    ndim = magic & 0xFF
    dims, size = _check_header(path, data[: 4 + 4 * ndim], magic)
    if len(data) != 4 + 4 * ndim + size:
        raise DataError(f"{path} does not hold what its header promises; delete it")
    return (
        torch.frombuffer(data, dtype=torch.uint8, offset=4 + 4 * ndim, count=size).view(dims)
        if size
        else torch.zeros(dims, dtype=torch.uint8)
    )


def _cached(gz_path):
    """The bytes of the extracted copy beside a .gz, when its size and CRC-32 are the ones the .gz's
    trailer records (the .gz was not replaced since); else None. Checking is a small part of what
    inflating the .gz again would cost."""
    plain = gz_path[:-3]
    try:
        with open(gz_path, "rb") as raw:
            raw.seek(-8, os.SEEK_END)
            trailer = raw.read(8)
        size = os.path.getsize(plain)
        if len(trailer) < 8 or size != int.from_bytes(trailer[4:], "little") or size > MAX_BYTES + 16:
            return None
        data = bytearray(size)
        with open(plain, "rb", buffering=0) as f:
            if f.readinto(data) != size:
                return None
    except OSError:
        return None
    return data if zlib.crc32(data) == int.from_bytes(trailer[:4], "little") else None


def _read_body(f, limit, growing):
    """Up to LIMIT bytes from f. From a .gz (`growing`) they are gathered in chunks as they inflate, so
    memory follows what the file really holds; from a plain file, whose size was checked, at once."""
    if not growing:
        body = bytearray(limit)
        del body[f.readinto(body) :]  # a buffered file fills the buffer unless it ends first
        return body
    chunks, got = [], 0
    while got < limit and (chunk := f.read(min(1 << 22, limit - got))):
        chunks.append(chunk)
        got += len(chunk)
    return bytearray(b"".join(chunks))


def _keep_extracted(path, head, body):
    """Write a checked .gz file's contents beside it, as torchvision's download does, so later runs
    read it without inflating it again. Only a cache: a read-only or full folder just goes without. A
    fresh name, created exclusively and never through a link, then renamed over the old copy."""
    tmp = f"{path}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(tmp, flags, 0o644), "wb") as f:
            f.write(head)
            f.write(body)
        os.replace(tmp, path)
    except OSError:
        try:
            os.remove(tmp)
        except OSError:
            pass


def _stored_size(path):
    """What the file says it holds without reading it: a plain file's length, or for a .gz its
    trailer's inflated size mod 2**32 (None when too short to have one)."""
    if not path.endswith(".gz"):
        return os.path.getsize(path)
    with open(path, "rb") as raw:
        raw.seek(0, os.SEEK_END)
        if raw.tell() < 18:  # gzip's header and trailer alone take 18 bytes
            return None
        raw.seek(-4, os.SEEK_END)
        return int.from_bytes(raw.read(4), "little")


def load_split(name, split, data_dir=None, device="cpu"):
    """(images uint8 [N, 1, 28, 28], labels int64 [N]) of one split, on `device`."""
    info = dataset_info(name)
    return read_pair(*find_split(info, split, data_dir), info, device)


def read_pair(image_path, label_path, info, device="cpu"):
    """An IDX image file and its label file, checked to belong together and to INFO's classes; images
    stored transposed are turned upright, labels counted from first_label start at 0."""
    (images, keep_images), (labels, keep_labels) = (
        _read_idx(image_path, IMAGE_MAGIC),
        _read_idx(label_path, LABEL_MAGIC),
    )
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} has {len(images):,} images but {label_path} has {len(labels):,} "
            f"labels; the two files come from different sets, so replace both"
        )
    labels = labels.long() - info.first_label
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(info.classes):
        bad = int(labels.max() if labels.max() >= len(info.classes) else labels.min()) + info.first_label
        raise DataError(
            f"{label_path} has label {bad}, but {info.name} has only {len(info.classes)} classes "
            f"({info.first_label}-{len(info.classes) - 1 + info.first_label}); the file is corrupt or foreign"
        )
    for keep in (keep_images, keep_labels):  # only now that the two files are known to belong together
        if keep:
            _keep_extracted(*keep)
    if info.transposed:
        images = images.transpose(1, 2).contiguous()
    return images.unsqueeze(1).to(device), labels.to(device)


def pixel_stats(images):
    """Mean and population std of uint8 images on the 0..1 scale."""
    x = images.double() / 255
    return x.mean().item(), x.std(unbiased=False).item()


def normalization(name, data_dir=None):
    """(mean, std) of a dataset's training pixels: recorded above, or measured when not recorded."""
    info = dataset_info(name)
    if info.mean is not None:
        return info.mean, info.std
    images, _ = load_split(name, "train", data_dir)
    return tuple(round(v, 4) for v in pixel_stats(images))


def split_off_val(images, labels, n_val):
    """Hold out n_val training images. The split depends on n_val alone, not on --seed, so every
    seed and every resumed run sees the same validation set."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(12345)).to(labels.device)
    val, train = order[:n_val], order[n_val:]
    return (images[train], labels[train]), (images[val], labels[val])


# ---------------------------------------------------------------------------------------------
# Batches: normalization and augmentation done on the device, a batch at a time
# ---------------------------------------------------------------------------------------------


def normalize(images_u8, mean, std, dtype=torch.float32):
    """uint8 pixels -> (x / 255 - mean) / std, as one multiply-add."""
    return images_u8.to(dtype).mul_(1.0 / (255.0 * std)).sub_(mean / std)


@dataclass(frozen=True)
class Augment:
    """Random affine (rotation degrees, translation as a fraction of the side, scale range),
    optional random erasing and horizontal flips (right for clothing, wrong for digits), and the
    changes that real handwriting brings and an affine does not: stroke width, blur, low resolution,
    elastic warps and scan noise, each given as (probability, strength) with strength in 0..1."""

    degrees: float = 10.0
    translate: float = 0.1
    scale: float = 0.1
    erase: float = 0.0  # probability of erasing one random rectangle per image
    flip: bool = False
    stroke: tuple = (0.0, 0.0)  # thicker or thinner strokes: a 2x2 dilation or erosion, blended in
    blur: tuple = (0.0, 0.0)  # a Gaussian blur (sigma 1), blended in
    lowres: tuple = (0.0, 0.0)  # down to 14, 12 or 10 pixels a side and back (strength: how far down)
    elastic: tuple = (0.0, 0.0)  # a smooth random warp of up to 3 pixels (times strength)
    noise: tuple = (0.0, 0.0)  # grain of std up to 0.4 (times strength), as a scanner or camera adds

    @property
    def DRAWS(self):
        """Uniforms drawn per image, in order: Batches skips other ranks' draws. Only the changes that
        are switched on draw, so adding them leaves the streams of older recipes as they were."""
        return (
            10
            + sum(2 for p, _ in (self.stroke, self.blur, self.lowres) if p)
            + (1 + 32 if self.elastic[0] else 0)
            + (3 if self.noise[0] else 0)
        )

    def __call__(self, x, gen):
        """Augment a float batch [B, 1, H, W] on 0..1. Random numbers come from the CPU generator
        `gen` (small per-image tensors), so a seed gives the same batches on every device."""
        b, dev = len(x), x.device
        u = torch.rand(b, self.DRAWS, generator=gen).to(dev, non_blocking=True) * 2 - 1  # uniform in [-1, 1)
        extra = iter(range(10, self.DRAWS))
        if self.stroke[0]:  # before the affine: a pen's width belongs to the digit as written
            on, amount = _chance(u, next(extra), self.stroke[0]), u[:, next(extra)]
            thick = torch.where((amount > 0).view(b, 1, 1, 1), dilate(x, 2), erode(x, 2))
            x = x + (on * amount.abs() * self.stroke[1]).view(b, 1, 1, 1) * (thick - x)
        if self.degrees or self.translate or self.scale:
            angle = u[:, 0] * math.radians(self.degrees)
            scale = 1 + u[:, 1] * self.scale
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            tx, ty = u[:, 2] * 2 * self.translate, u[:, 3] * 2 * self.translate  # grid units span 2
            theta = torch.stack([cos, -sin, tx, sin, cos, ty], 1).to(x.dtype)
            x = F.grid_sample(x, affine_grid(theta, *x.shape[-2:]), align_corners=False, padding_mode="zeros")
        if self.elastic[0]:
            on, field = _chance(u, next(extra), self.elastic[0]), u[:, [next(extra) for _ in range(32)]]
            x = elastic(x, field.view(b, 2, 4, 4) * (on * self.elastic[1]).view(b, 1, 1, 1) * 3.0)
        if self.blur[0]:
            on, amount = _chance(u, next(extra), self.blur[0]), u[:, next(extra)].abs()
            x = x + (on * amount * self.blur[1]).view(b, 1, 1, 1) * (blur(x, 1.0) - x)
        if self.lowres[0]:
            on, amount = _chance(u, next(extra), self.lowres[0]), u[:, next(extra)].abs() * self.lowres[1]
            sides = [(14, amount < 1 / 3), (12, (amount >= 1 / 3) & (amount < 2 / 3)), (10, amount >= 2 / 3)]
            for side, pick in sides:
                x = torch.where((pick & (on > 0)).view(b, 1, 1, 1), low_resolution(x, side), x)
        if self.noise[0]:  # hashed from each pixel and a per-image phase: one uniform draws a whole field
            on, amount, phase = _chance(u, next(extra), self.noise[0]), u[:, next(extra)].abs(), u[:, next(extra)]
            rows, cols = torch.meshgrid(
                *(torch.arange(n, device=dev, dtype=x.dtype) for n in x.shape[-2:]), indexing="ij"
            )
            grain = torch.sin(rows * 12.9898 + cols * 78.233 + phase.view(b, 1, 1, 1) * 437.585) * 43758.5453
            x = (x + (on * amount * self.noise[1] * 1.39).view(b, 1, 1, 1) * (grain - grain.floor() - 0.5)).clamp(0, 1)
        if self.flip:
            x = torch.where((u[:, 4] > 0).view(b, 1, 1, 1), x.flip(-1), x)
        if self.erase:
            x = _erase(x, u[:, 5:10], self.erase)
        return x


def affine_grid(theta, h, w):
    """F.affine_grid(theta.view(-1, 2, 3), [B, 1, h, w], align_corners=False) as one small matrix product,
    3 to 8 times quicker on a CPU than torch's, which multiplies a copy of the pixel grid per image."""
    xs, ys = ((torch.arange(n, device=theta.device, dtype=theta.dtype) * 2 + 1) / n - 1 for n in (w, h))
    pixels = torch.stack([xs.repeat(h), ys.repeat_interleave(w), torch.ones_like(xs).repeat(h)])  # [3, h*w]
    return (theta.reshape(-1, 3) @ pixels).view(-1, 2, h, w).permute(0, 2, 3, 1)  # [B, h, w, (x, y)]


def _chance(u, column, p):
    """1.0 for the images whose uniform in COLUMN falls below probability P, else 0.0."""
    return ((u[:, column] + 1) / 2 < p).to(u.dtype)


# Image operations on float batches [B, 1, H, W] on 0..1; the augmentation above and the robustness
# suite of robustness.py share them.


def dilate(x, k):
    """Grey-scale dilation with a k x k square: white ink on black grows by about k - 1 pixels."""
    return F.max_pool2d(F.pad(x, ((k - 1) // 2, k // 2, (k - 1) // 2, k // 2)), k, stride=1)


def erode(x, k):
    """Grey-scale erosion with a k x k square: strokes get thinner, thin ones break."""
    return -dilate(-x, k)


def blur(x, sigma):
    """A Gaussian blur (separable, 2 sigma each side)."""
    r = max(1, math.ceil(2 * sigma))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def low_resolution(x, side):
    """Down to side x side pixels (area average) and back up (bilinear): a coarse scan or camera."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(side, side), mode="area")
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def elastic(x, coarse):
    """Warp by a smooth displacement field: COARSE [B, 2, h, w] in pixels, upsampled to the image."""
    b, _, h, w = x.shape
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    xs, ys = (torch.linspace(-1, 1, n, device=x.device, dtype=x.dtype) for n in (w, h))
    grid = torch.stack([xs + field[:, 0] * 2 / w, ys.view(h, 1) + field[:, 1] * 2 / h], -1)
    return F.grid_sample(x, grid, align_corners=True, padding_mode="zeros")


def _erase(x, u, p):
    """Zero one rectangle (2-33 % of the area, aspect 0.3-3.3) in a fraction p of the images.
    `u` holds five uniforms in [-1, 1) per image: erase?, area, aspect, top, left."""
    b, _, h, w = x.shape
    u01 = (u + 1) / 2
    area = (0.02 + u01[:, 1] * 0.31) * h * w
    aspect = torch.exp(math.log(0.3) + u01[:, 2] * math.log(3.3 / 0.3))
    eh, ew = (area * aspect).sqrt().clamp(1, h), (area / aspect).sqrt().clamp(1, w)
    top, left = u01[:, 3] * (h - eh), u01[:, 4] * (w - ew)
    rows, cols = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    box = (
        (rows >= top.view(b, 1, 1))
        & (rows < (top + eh).view(b, 1, 1))
        & (cols >= left.view(b, 1, 1))
        & (cols < (left + ew).view(b, 1, 1))
        & (u01[:, 0] < p).view(b, 1, 1)
    )
    return x.masked_fill(box.unsqueeze(1), 0.0)


class Batches:
    """Batches of (normalized images, labels) sliced from a split that lives on the device.

    `epoch(e, start=k)` yields the batches of epoch e from batch k on. The shuffle and the
    augmentation are seeded from (seed, epoch, batch), so any batch can be rebuilt exactly on
    resume, and every DDP rank draws the same permutation before taking its own slice.

    With world_size > 1, `batch_size` is the global batch: rank r takes its share of each batch
    (shares differ by at most one image), so the ranks together cover each image once per epoch,
    and each image gets the augmentation it would get in one process.
    """

    def __init__(
        self,
        images,
        labels,
        batch_size,
        mean,
        std,
        shuffle=False,
        seed=0,
        augment=None,
        drop_last=False,
        channels_last=False,
        rank=0,
        world_size=1,
    ):
        self.images, self.labels = images, labels
        self.batch_size, self.mean, self.std = batch_size, mean, std
        self.shuffle, self.seed, self.augment, self.drop_last = shuffle, seed, augment, drop_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.rank, self.world_size = rank, world_size

    def __len__(self):
        n = len(self.labels)
        # Every DDP rank must take the same number of steps, and each needs an image: a last batch
        # smaller than world_size is dropped (fewer than world_size images an epoch).
        if self.drop_last or 0 < n % self.batch_size < self.world_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def global_len(self, i):
        """Images in batch i over all ranks together."""
        return min((i + 1) * self.batch_size, len(self.labels)) - i * self.batch_size

    def epoch(self, epoch=0, start=0):
        n = len(self.labels)
        order = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=gen).to(self.labels.device)
        aug_gen = torch.Generator()
        for i in range(start, len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            span = hi - lo  # this rank's share of the global batch, after `before` images on lower ranks
            before, hi = span * self.rank // self.world_size, lo + span * (self.rank + 1) // self.world_size
            lo += before
            # index_select copies whole images; indexing with [order] gathers them pixel by pixel, 9x slower
            x, y = (
                t.index_select(0, order[lo:hi]) if order is not None else t[lo:hi] for t in (self.images, self.labels)
            )
            if self.augment is not None:
                aug_gen.manual_seed((self.seed * 100_003 + epoch) * 1_000_003 + i)
                if before:  # skip the lower ranks' draws (the CPU generator draws in sequence)
                    torch.rand(before, self.augment.DRAWS, generator=aug_gen)
                x = self.augment(x.float().div_(255), aug_gen)
                x = (x - self.mean) / self.std
            else:
                x = normalize(x, self.mean, self.std)
            yield x.contiguous(memory_format=self.memory_format), y


# ---------------------------------------------------------------------------------------------
# A model over a whole split: logits, softmax with test-time augmentation, loss and accuracy, the
# same for train.py's evaluation, evaluate.py and bench.py
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_logits(model, images, mean, std, batch_size=1000, channels_last=False, autocast=None):
    """Logits (float32) for uint8 images held on the model's device, in large batches."""
    was_training = model.training
    model.eval()
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    batches = Batches(images, labels, batch_size, mean, std, channels_last=channels_last)
    outs = []
    for x, _ in batches.epoch():
        with autocast or nullcontext():
            outs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, 0, device=images.device)


def tta_views(images, flips):
    """The test-time views of uint8 images [N, 1, H, W]: as they are, shifted one pixel each way
    (zeros come in at the edge), and, where mirror images keep their class, mirrored."""
    padded = F.pad(images, (1, 1, 1, 1))
    h, w = images.shape[-2:]
    views = [images] + [
        padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
    ]
    if flips:
        views.append(images.flip(-1))
    return views


def predict_probs(
    model, images, mean, std, batch_size=1000, tta=False, flips=False, channels_last=False, autocast=None
):
    """Softmax probabilities of uint8 images, averaged over the test-time views when `tta` is set."""
    views = tta_views(images, flips) if tta else [images]
    probs = [
        predict_logits(model, v.contiguous(), mean, std, batch_size, channels_last, autocast).softmax(1) for v in views
    ]
    return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)


def log_probs(model, images, mean, std, tta=False, flips=False, channels_last=False, autocast=None):
    """Log-probabilities: log-softmax of the logits, or with `tta` the log of the averaged softmax
    (what evaluate.py --tta scores)."""
    if tta:
        return (
            predict_probs(
                model, images, mean, std, tta=True, flips=flips, channels_last=channels_last, autocast=autocast
            )
            .clamp_min(1e-12)
            .log()
        )
    return predict_logits(model, images, mean, std, channels_last=channels_last, autocast=autocast).log_softmax(1)


def score(logits, labels):
    """(mean cross-entropy, accuracy in %) of logits (or log-probabilities) against labels."""
    loss = F.cross_entropy(logits, labels).item()
    acc = 100.0 * (logits.argmax(1) == labels).sum().item() / max(len(labels), 1)
    return loss, acc


# ---------------------------------------------------------------------------------------------
# Command line: statistics and a picture of the data
# ---------------------------------------------------------------------------------------------


def print_stats(name, data_dir=None):
    info = dataset_info(name)
    for split in ("train", "test"):
        images, labels = load_split(name, split, data_dir)
        mean, std = pixel_stats(images)
        print(
            f"[{name} {split}] {len(labels):,} images of {tuple(images.shape[1:])}, "
            f"pixels {int(images.min())}-{int(images.max())} "
            f"(0..1 scale: mean {mean:.4f}, std {std:.4f}, var {std * std:.4f})"
        )
        counts = torch.bincount(labels, minlength=len(info.classes)).tolist()
        width = max(len(c) for c in info.classes)
        for k, (cls, c) in enumerate(zip(info.classes, counts)):
            print(
                f"  {k}  {cls:<{width}}  {c:>6,}  {100 * c / len(labels):5.2f} %  {'#' * round(50 * c / max(counts))}"
            )


def main(argv=None):
    """`python data.py`: statistics or a picture of a dataset; errors and closed pipes as every command."""
    from cli import run  # the command line only; the library above needs torch alone

    return run(inspect_dataset, sys.argv[1:] if argv is None else argv)


def inspect_dataset(argv):
    from cli import Parser

    parser = Parser(prog="data.py", description="Inspect a dataset: statistics, or a grid of samples.")
    parser.add_argument(
        "--stats",
        metavar="NAME",
        choices=list(DATASETS),
        help=f"print counts, pixel statistics and class balance ({', '.join(DATASETS)})",
    )
    parser.add_argument(
        "--show", metavar="NAME", choices=list(DATASETS), help="write a labelled grid of training images"
    )
    parser.add_argument("--augment", action="store_true", help="with --show: also draw the images augmented")
    parser.add_argument("--out", default="samples.png", help="with --show: the PNG to write (default: samples.png)")
    parser.add_argument("--data-dir", help="folder holding the IDX files (default: search ./data and others)")
    parser.add_argument("--seed", type=int, default=0, help="with --show: which random images (default: 0)")
    args = parser.parse_args(argv)
    if not (args.stats or args.show):
        parser.error("give --stats NAME or --show NAME")
    if args.stats:
        print_stats(args.stats, args.data_dir)
    if args.show:
        from plots import sample_grid, save_png  # Pillow and torchvision, beside this file

        images, labels = load_split(args.show, "train", args.data_dir)
        info = dataset_info(args.show)  # flips only where the dataset allows them
        save_png(
            sample_grid(images, labels, info.classes, Augment(flip=info.flips) if args.augment else None, args.seed),
            args.out,
        )
        print(
            f"wrote {args.out}: {args.show} training images (seed {args.seed}"
            f"{'; each row of originals is followed by the same images augmented' if args.augment else ''})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
