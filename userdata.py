"""Your own data as a training and test set: a Kaggle-style CSV, a folder of class folders, a folder of IDX
files with any classes, or a built-in set by name (data.DATASETS, EMNIST included).

    source = open_dataset("train.csv")      # or "symbols/", "my-idx/", "mnist", "emnist-letters"
    images, labels = source.train            # uint8 [N, 1, 28, 28] and int64 [N]; source.test likewise
    print(source.note)                       # where its test images came from
    name, info, images, labels = evaluation_set(ckpt)   # what evaluate.py and export.py score a checkpoint on
    pixels, labels = read_csv("test.csv")    # Kaggle's test.csv: pixels only, so labels is None

Without --test, a seeded, stratified seventh of the data (as MNIST's 60,000/10,000) is the test split;
`source.record` says which images, and a checkpoint keeps it, so evaluate.py scores the same ones.
Every reader is bounded like the IDX reader and names the file, line or column of a bad input.
"""

import os
import warnings
import zlib
from dataclasses import dataclass

import torch

from data import DATASETS, MAX_BYTES, DataError, DatasetInfo, load_split, read_pair, split_off_val

MAX_CSV_BYTES = 2 << 30  # Kaggle's train.csv is 73 MB, EMNIST ByClass written out as CSV about 1.2 GB
CHUNK_CELLS = 8 << 20  # cells parsed at a time: 64 MB of int64 however long the file, not 8 bytes a cell
TEST_SHARE, TEST_SEED = 1 / 7, 12345
MAX_CLASSES = 1000


@dataclass
class Source:
    """A dataset opened for training or evaluation."""

    info: DatasetInfo  # name (a built-in name, or the absolute path), classes, rule for outside images
    train: tuple  # (images uint8 [N, 1, 28, 28], labels int64 [N])
    test: tuple
    record: dict  # how to find the same test images again: saved in the checkpoint's data record
    note: str = ""  # said at the start of a run


def open_dataset(spec, data_dir=None, test=None, record=None, device="cpu", strict=True):
    """The dataset SPEC names: a built-in name, a .csv file, or a folder. TEST is a labelled test set
    of the same kind; RECORD a checkpoint's record of the test split (a share, or the --test file), to
    score the same images. When the data is not the data RECORD was made on, that is an error if
    STRICT, else a fresh split."""
    if spec in DATASETS:
        if test:
            raise DataError(f"--test is for your own data; {spec} has its own test split", 2)
        return Source(
            DATASETS[spec],
            load_split(spec, "train", data_dir, device),
            load_split(spec, "test", data_dir, device),
            {"kind": "builtin"},
        )
    if not os.path.exists(spec):
        raise DataError(
            f"unknown dataset {spec!r}: neither a built-in one ({', '.join(DATASETS)}) nor a file or "
            f"folder of that name",
            2,
        )
    if not test and record and record.get("kind") == "file":  # trained beside --test PATH: score that set again,
        test = record["path"]  # never a share of the images it trained on
        if not os.path.exists(test):
            raise DataError(
                f"{test}, the test set the model was trained beside, is not there; pass --test PATH where it is now", 2
            )
    images, labels, classes, rule, own_test = read_any(spec)
    info = DatasetInfo(os.path.abspath(spec), None, tuple(classes), rule=rule)
    if test or own_test:
        if test:
            test_images, test_labels, test_classes = read_any(test)[:3]
            test_labels = remap(test_labels, test_classes, classes, test)
        else:
            test_images, test_labels = own_test
        note = f"test set {test}" if test else f"the test files of {spec}"
        return Source(
            info,
            (images.to(device), labels.to(device)),
            (test_images.to(device), test_labels.to(device)),
            {"kind": "file", "path": os.path.abspath(test)} if test else {"kind": "own"},
            note,
        )
    fingerprint = {"count": len(labels), "labels_crc": zlib.crc32(labels.to(torch.uint8).numpy().tobytes())}
    same = bool(record) and record.get("kind") == "share" and {k: record.get(k) for k in fingerprint} == fingerprint
    if record and record.get("kind") == "share" and not same and strict:
        raise DataError(
            f"{spec} holds other data than the model was trained on ({len(labels):,} images, not "
            f"{record.get('count')}); pass --dataset with that data, or --test with a labelled test set",
            2,
        )
    if same:
        held = record["indices"].long()
        note = f"the test split it was trained beside: {len(held):,} of {len(labels):,} images"
    else:
        held = stratified_share(labels, TEST_SHARE, TEST_SEED)
        note = (
            f"test split: a stratified seventh of the data, {len(held):,} of {len(labels):,} images "
            f"(seed {TEST_SEED}; recorded in the checkpoint)"
        )
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held] = False
    return Source(
        info,
        (images[keep].to(device), labels[keep].to(device)),
        (images[held].to(device), labels[held].to(device)),
        {"kind": "share", "indices": held.to(torch.int32), **fingerprint},
        note,
    )


def evaluation_set(ckpt, dataset=None, test=None, data_dir=None, val=0, device="cpu"):
    """(name, DatasetInfo, images, labels) to score a checkpoint on: every image of TEST (a labelled set);
    else the test split of the checkpoint's data (or DATASET), the one it was trained beside where recorded;
    with VAL N the training images train.py --val N held out."""
    recorded = ckpt["data"]
    if test:
        images, labels, names, rule, _ = read_any(test)
        labels = remap(labels, names, recorded["classes"], test)
        info = DatasetInfo(os.path.abspath(test), None, tuple(recorded["classes"]), rule=rule)
        return test, info, images.to(device), labels.to(device)
    name = dataset or recorded["dataset"]
    record = recorded.get("test") if name not in DATASETS else None
    if name not in DATASETS and dataset is None and not os.path.exists(name):
        raise DataError(
            f"{name}, the data this model was trained on, is not there; pass --dataset PATH where it "
            f"is now, or --test PATH to score another labelled set",
            2,
        )
    trained = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
    recorded_dir = trained.get("data_dir") if trained.get("dataset") == name else None
    # where training found the IDX files (EMNIST in a --data-dir): with no flags, the data is where it was
    data_dir = data_dir or (recorded_dir if isinstance(recorded_dir, str) and os.path.isdir(recorded_dir) else None)
    source = open_dataset(name, data_dir, None, record, device, strict=dataset is None)
    if source.note and name not in DATASETS:
        print(f"{name}: {source.note}")
    images, labels = source.test
    if val:
        train_images, train_labels = source.train
        if val >= len(train_labels):
            raise DataError(f"--val {val} is not below the {len(train_labels):,} training images", 2)
        images, labels = split_off_val(train_images, train_labels, val)[1]
    if name not in DATASETS and list(source.info.classes) != list(recorded["classes"]):
        labels = remap(labels.cpu(), list(source.info.classes), recorded["classes"], name).to(device)
    return name, source.info, images, labels


def read_any(path):
    """(images, labels, class names, rule, the folder's own test split or None) of a CSV file, a folder
    of IDX files or a folder of class folders."""
    if os.path.isfile(path):
        if not path.lower().endswith(".csv"):
            raise DataError(
                f"{path} is not a .csv file; give a CSV, a folder of class folders or a folder of IDX files", 2
            )
        pixels, labels, names = read_csv(path, need_labels=True)
        return (pixels, *numbered_classes(labels, names, path), "mnist", None)
    if idx_files(path):
        images, labels, names, own_test = read_idx_folder(path)
        return images, labels, names, "mnist", own_test
    return (*read_class_folders(path), "fit", None)


def stratified_share(labels, share, seed):
    """Indices of about SHARE of each class's examples, drawn with a fixed seed: the same data always
    gives the same split, whatever --seed trains with."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for k in labels.unique().tolist():
        members = (labels == k).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=gen)]
        picked.append(members[: round(len(members) * share)])
    return torch.cat(picked).sort().values


def remap(labels, names, classes, path):
    """LABELS (indices into NAMES) as indices into CLASSES, the training set's; a class it lacks is refused."""
    missing = sorted(set(names) - set(classes))
    if missing:
        raise DataError(
            f"{path} has class {missing[0]!r}, which the training data does not have "
            f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})"
        )
    table = torch.tensor([classes.index(n) for n in names], dtype=torch.long)
    return table[labels]


# ---------------------------------------------------------------------------------------------
# CSV: a label column and N*N pixel columns (Kaggle's digit recognizer), or pixels only
# ---------------------------------------------------------------------------------------------


def read_csv(path, need_labels=False):
    """(pixels uint8 [N, 1, 28, 28], labels int64 [N] or None, class names or None) of a CSV file. The
    label column is the one a header names "label", or the first column without a header; a file whose
    header has no label column holds pixels only (Kaggle's test.csv). Images of other than 28x28
    pixels (N*N columns) are resized to 28x28. Names come from a classes.txt beside the file."""
    import numpy as np

    size = os.path.getsize(path)
    if size > MAX_CSV_BYTES:
        raise DataError(f"{path} is {size:,} bytes, far more than any MNIST-style set as CSV; give another file")
    with open(path, "rb") as f:
        raw = f.read()
    header, body, first_line = split_header(raw, path)
    del raw  # the text is held once from here on
    columns = header if header is not None else [str(i) for i in range(body[: body.find(b"\n")].count(b",") + 1)]
    label = next((i for i, name in enumerate(columns) if name.lower() == "label"), None)
    if header is None and (need_labels or not square(len(columns))):
        label = 0
    if need_labels and label is None:
        raise DataError(
            f"{path} has no label column (its header starts {', '.join(columns[:3])}, ...); name it "
            f"'label', or drop the header and put the label first"
        )
    width = len(columns) - (label is not None)
    if not square(width):
        raise DataError(
            f"{path} has {width} pixel columns, which is not a square number; an N x N image needs "
            f"N*N of them (784 for 28x28)"
        )
    ends = line_ends(body, len(columns), first_line, path, np)
    pixels = torch.empty(len(ends), width, dtype=torch.uint8)
    labels = torch.empty(len(ends), dtype=torch.int64) if label is not None else None
    step = max(1, CHUNK_CELLS // len(columns))
    for lo in range(0, len(ends), step):
        hi = min(len(ends), lo + step)
        text = body[0 if lo == 0 else int(ends[lo - 1]) + 1 : int(ends[hi - 1])]
        table = parse_cells(text, hi - lo, columns, first_line + lo, path, np)
        if labels is not None:
            labels[lo:hi] = table[:, label]
        part = torch.cat([table[:, :label], table[:, label + 1 :]], 1) if label is not None else table
        check_range(part, labels[lo:hi] if labels is not None else None, columns, label, first_line + lo, path)
        pixels[lo:hi] = part
    return to_images(pixels, int(width**0.5)), labels, class_names(path)


def split_header(raw, path):
    """(header names or None, the data lines ending in a newline, the file line number of the first one)."""
    if b"\r" in raw:  # Windows line ends
        raw = raw.replace(b"\r\n", b"\n")
    if not raw or raw.isspace():
        raise DataError(f"{path} is empty; give a CSV with one image a line")
    last = len(raw)
    while raw[last - 1] == 10:  # blank lines at the end carry nothing
        last -= 1
    end = raw.find(b"\n", 0, last)
    end = last if end < 0 else end
    first = raw[:end].decode("utf-8", "replace")
    start, line = (end + 1, 2) if any(c.isalpha() for c in first) else (0, 1)
    body = raw[start : last + 1] if last < len(raw) else raw[start:] + b"\n"  # each line ends in one newline
    return ([name.strip().strip('"') for name in first.split(",")] if line == 2 else None), body, line


def square(n):
    return n > 0 and round(n**0.5) ** 2 == n


def line_ends(body, width, first_line, path, np):
    """Where each data line ends (the offsets of its newlines), once each is known to hold WIDTH cells
    (one line names a ragged one)."""
    data = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)
    if len(ends) == 0:
        return ends
    starts = np.concatenate([[0], ends[:-1] + 1])
    per_line = np.add.reduceat(data == 44, starts, dtype=np.int32) + 1  # commas in each line, plus one
    ragged = np.flatnonzero(per_line != width)
    if len(ragged):
        line = int(ragged[0])
        raise DataError(
            f"{path} line {first_line + line} has {int(per_line[line])} cells, not {width} like the "
            f"{'header' if first_line == 2 else 'first line'}; fix or remove that line"
        )
    if len(ends) * width > MAX_BYTES:
        raise DataError(f"{path} holds {len(ends):,} rows, more than any MNIST-style set; give a smaller file")
    return ends


def parse_cells(text, rows, columns, first_line, path, np):
    """ROWS lines of whole numbers as an int64 table [ROWS, len(COLUMNS)], by numpy's C parser (a Python
    one takes a minute over Kaggle's 33 million cells); a cell that is no number gets its line named."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's deprecation of fromstring's text mode, still its fastest
        try:
            cells = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
        except ValueError:
            cells = None
    if cells is None or cells.size != rows * len(columns):
        raise DataError(first_bad_cell(text, columns, first_line, path))
    return torch.from_numpy(cells).view(rows, len(columns))


def first_bad_cell(body, columns, first_line, path):
    """The sentence for the first cell that is not a whole number (the slow way, only when one is)."""
    for n, line in enumerate(body.split(b"\n")):
        for name, cell in zip(columns, line.split(b",")):
            text = cell.strip().strip(b'"')
            if not text.isdigit():
                shown = text.decode("utf-8", "replace")[:20]
                return (
                    f"{path} line {first_line + n}, column {name}: {shown!r} is not a whole number"
                    if shown
                    else f"{path} line {first_line + n}, column {name} is empty"
                )
    return f"{path} cannot be read as numbers; check that it is a CSV of whole numbers"


def check_range(pixels, labels, columns, label, first_line, path):
    """One line naming the first pixel outside 0..255 or label below 0 (or absurdly large), if any."""
    if (
        len(pixels)
        and 0 <= pixels.min()
        and pixels.max() <= 255
        and (labels is None or (labels.min() >= 0 and labels.max() < 1_000_000))
    ):
        return
    bad = ((pixels < 0) | (pixels > 255)).nonzero()
    if len(bad):
        row, col = bad[0].tolist()
        col += label is not None and col >= label
        raise DataError(
            f"{path} line {first_line + row}, column {columns[col]}: {int(pixels[bad[0][0], bad[0][1]])} "
            f"is outside the pixel range 0..255"
        )
    if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= 1_000_000):
        row = int(((labels < 0) | (labels >= 1_000_000)).nonzero()[0])
        raise DataError(f"{path} line {first_line + row}: label {int(labels[row])} is not a class number from 0")


def to_images(pixels, side):
    """Rows of SIDE*SIDE pixels as uint8 [N, 1, 28, 28]; other sizes resized (area-averaged or bilinear)."""
    images = pixels.view(-1, 1, side, side)
    if side == 28:
        return images
    mode = "area" if side > 28 else "bilinear"
    out = torch.nn.functional.interpolate(images.float(), size=(28, 28), mode=mode)
    return out.round().clamp(0, 255).to(torch.uint8)


def class_names(path):
    """The names in a classes.txt beside PATH (a file) or inside it (a folder), one a line, or None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    names_file = os.path.join(folder, "classes.txt")
    if not os.path.isfile(names_file) or os.path.getsize(names_file) > 1 << 20:
        return None
    with open(names_file, encoding="utf-8", errors="replace") as f:
        names = [line.strip() for line in f if line.strip()]
    return names or None


def numbered_classes(labels, names, path):
    """(labels as 0..K-1, class names): named by classes.txt when there is one, else by the label values."""
    if names is not None:
        if len(labels) and labels.max() >= len(names):
            raise DataError(f"{path} has label {int(labels.max())}, but its classes.txt names {len(names)} classes")
        return labels, names
    values = labels.unique()
    if len(values) < 2 or len(values) > MAX_CLASSES:
        raise DataError(
            f"{path} has {len(values)} distinct label{'s' * (len(values) != 1)}; a classifier needs "
            f"from 2 to {MAX_CLASSES}"
        )
    return torch.searchsorted(values, labels), [str(v) for v in values.tolist()]


# ---------------------------------------------------------------------------------------------
# Folders: IDX files with any classes, or one folder of images per class
# ---------------------------------------------------------------------------------------------


def idx_files(folder):
    """{(split, kind): path} of the IDX files in FOLDER: *train-images*, *train-labels*, *test- or
    t10k-images* and *labels*, .gz or not (EMNIST's names and MNIST's both match)."""
    found = {}
    for name in sorted(os.listdir(folder)):
        low = name.lower()
        if "idx" not in low or not os.path.isfile(os.path.join(folder, name)):
            continue
        split = "train" if "train" in low else "test" if ("test" in low or "t10k" in low) else None
        kind = "images" if "images" in low else "labels" if "labels" in low else None
        if split and kind and (split, kind) not in found or (split, kind) in found and low.endswith(".gz"):
            found[(split, kind)] = os.path.join(folder, name)
    return found


def read_idx_folder(folder):
    """(images, labels, class names, its test split or None) of a folder of IDX files: the training
    pair, and the test pair when there is one. Names come from its classes.txt, else the label numbers
    (counted over both splits, so that they share them)."""
    files = idx_files(folder)
    pairs = [s for s in ("train", "test") if (s, "images") in files and (s, "labels") in files]
    if not pairs:
        raise DataError(
            f"{folder} holds no pair of IDX image and label files (*train-images-idx3-ubyte and "
            f"*train-labels-idx1-ubyte, .gz or not)",
            2,
        )
    names = class_names(folder)
    info = DatasetInfo(folder, None, tuple(names or (str(k) for k in range(MAX_CLASSES))))
    splits = [read_pair(files[(s, "images")], files[(s, "labels")], info) for s in pairs]
    if names is None:
        joined, names = numbered_classes(torch.cat([labels for _, labels in splits]), None, folder)
        cut = len(splits[0][1])
        splits = [(splits[0][0], joined[:cut])] + ([(splits[1][0], joined[cut:])] if len(splits) > 1 else [])
    train = splits[0]
    return train[0], train[1], list(names), splits[1] if len(splits) > 1 else None


def read_class_folders(folder):
    """(images, labels, class names) of a folder with one sub-folder of images per class, names sorted.
    Each image is brought to 28x28 by preprocess.fit_square: grey, its aspect kept, padded, resized."""
    from preprocess import FORMAT_NAMES, IMAGE_TYPES, fit_square, read_gray

    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"{folder} holds {'only one class folder (' + classes[0] + ')' if classes else 'no class folders'}; "
            f"a classifier needs at least two, one sub-folder of images each",
            2,
        )
    images, labels = [], []
    for k, name in enumerate(classes):
        sub = os.path.join(folder, name)
        # hidden files are skipped as hidden folders are: macOS leaves a ._name.png beside each image it copies
        files = sorted(f for f in os.listdir(sub) if f.lower().endswith(IMAGE_TYPES) and not f.startswith("."))
        if not files:
            raise DataError(f"{sub} holds no {FORMAT_NAMES} images; add some or remove the folder", 2)
        if len(images) + len(files) > MAX_BYTES // 784:
            raise DataError(f"{folder} holds more images than any MNIST-style set; give a smaller one")
        for f in files:
            images.append(fit_square(read_gray(os.path.join(sub, f))))
            labels.append(k)
    return torch.stack(images).unsqueeze(1), torch.tensor(labels), classes
