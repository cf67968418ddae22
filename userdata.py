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
import re
import warnings
import zlib
from dataclasses import dataclass

import torch

from cli import open_input
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
        topped = len(held) > sum(round(n * TEST_SHARE) for n in torch.bincount(labels).tolist())
        note = (
            f"test split: a stratified seventh of the data{', at least one image of each class' * topped}, "
            f"{len(held):,} of {len(labels):,} images (seed {TEST_SEED}; recorded in the checkpoint)"
        )
    if not len(held) and same:  # recorded by a version that held out none of a few images a class
        raise DataError(
            f"the model was trained beside an empty test split of {spec}; pass --test with a labelled "
            f"test set, or train it again (a class of two images or more now keeps one for testing)",
            2,
        )
    if not len(held):  # one image a class: nothing to score a model on
        raise DataError(
            f"{spec} holds too few images for a test split ({len(labels):,}, one a class); add images, "
            f"at least two a class (one is held out to test), or pass --test with a labelled test set",
            2,
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
    if not os.path.exists(path):
        raise DataError(f"{path} is not there; check the path", 2)
    if not os.path.isdir(path):  # a file, or a FIFO or device: read_csv refuses those in one line
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
        # at least one of every class that has two: a seventh of 3 rounds to none, and a set of a few
        # images a class (how people start with their own) would have no test split at all
        picked.append(members[: max(round(len(members) * share), int(len(members) >= 2))])
    return torch.cat(picked).sort().values


def remap(labels, names, classes, path):
    """LABELS (indices into NAMES) as indices into CLASSES, the training set's; a class it lacks is refused."""
    missing = sorted(set(names) - set(classes))
    if missing:
        raise DataError(
            f"{path} has class {missing[0]!r}, which the training data does not have "
            f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''})"
        )
    index = {c: k for k, c in reversed(list(enumerate(classes)))}  # the first of a name, looked up, not searched
    table = torch.tensor([index[n] for n in names], dtype=torch.long)
    return table[labels]


# ---------------------------------------------------------------------------------------------
# Files: only regular ones, and no more of them than the bound
# ---------------------------------------------------------------------------------------------


def read_file(path, limit, what, code=1):
    """The bytes of PATH in a bytearray (for split_header to edit in place), when it is a regular file of
    at most LIMIT bytes (cli.open_input); else one line naming it (CODE when it is no file at all). A link
    to /dev/zero would be read until memory ran out, and a FIFO would wait for a writer forever."""
    f, size = open_input(path, code)
    with f:
        if size > limit:
            raise DataError(f"{path} is {size:,} bytes, far more than {what}; give another file")
        data = bytearray(size)  # the size it had when checked: a file that grows since is read no further
        del data[f.readinto(data) :]
    return data


# ---------------------------------------------------------------------------------------------
# CSV: a label column and N*N pixel columns (Kaggle's digit recognizer), or pixels only
# ---------------------------------------------------------------------------------------------


def read_csv(path, need_labels=False):
    """(pixels uint8 [N, 1, 28, 28], labels int64 [N] or None, class names or None) of a CSV file. The
    label column is the one a header names "label", or the first column without a header; a file whose
    header has no label column holds pixels only (Kaggle's test.csv). Images of other than 28x28
    pixels (N*N columns) are resized to 28x28. Names come from a classes.txt beside the file.
    No Python object is made per cell, however long a line: a cell costs 8 bytes while its chunk is parsed."""
    import numpy as np

    # handed over, not kept: split_header edits the bytes in place, so the text is held once
    header, body, first_line = split_header(read_file(path, MAX_CSV_BYTES, "any MNIST-style set as CSV", 2), path)
    n_columns = (header.count(b",") if header is not None else body.count(b",", 0, body.find(b"\n"))) + 1
    if n_columns > CHUNK_CELLS:  # a chunk holds whole rows: one row this wide would be parsed all at once
        raise DataError(
            f"{path} line 1 has {n_columns:,} cells, more than an image row of any size this reads "
            f"({CHUNK_CELLS:,}); check that the file holds one image a line"
        )
    label = label_column(header)
    if header is None and (need_labels or not square(n_columns)):
        label = 0
    if need_labels and label is None:
        raise DataError(
            f"{path} has no label column (its header starts "
            f"{', '.join(column_name(header, i) for i in range(min(3, n_columns)))}, ...); name it "
            f"'label', or drop the header and put the label first"
        )
    width = n_columns - (label is not None)
    if not square(width):
        raise DataError(
            f"{path} has {width} pixel columns, which is not a square number; an N x N image needs "
            f"N*N of them (784 for 28x28)"
        )
    ends = line_ends(body, n_columns, first_line, path, np)
    pixels = torch.empty(len(ends), width, dtype=torch.uint8)
    labels = torch.empty(len(ends), dtype=torch.int64) if label is not None else None
    step = max(1, CHUNK_CELLS // n_columns)
    for lo in range(0, len(ends), step):
        hi = min(len(ends), lo + step)
        text = bytes(memoryview(body)[0 if lo == 0 else int(ends[lo - 1]) + 1 : int(ends[hi - 1])])
        table = parse_cells(text, hi - lo, n_columns, header, first_line + lo, path, np)
        if labels is not None:
            labels[lo:hi] = table[:, label]
        part = torch.cat([table[:, :label], table[:, label + 1 :]], 1) if label is not None else table
        check_range(part, labels[lo:hi] if labels is not None else None, header, label, first_line + lo, path)
        pixels[lo:hi] = part
    return to_images(pixels, int(width**0.5)), labels, class_names(path)


def split_header(raw, path):
    """(the header line's bytes or None, the data lines each ending in one newline, the file line number
    of the first one). RAW, a bytearray, is edited in place into the data lines where it can be. Excel's
    byte-order mark is dropped; Windows' CRLF and old Macs' CR alone end lines as a newline does."""
    if raw[:3] == b"\xef\xbb\xbf":  # Excel's "CSV UTF-8" starts with one: it is no part of the first name
        del raw[:3]
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path} is UTF-16 text (Excel's Unicode Text); save it as CSV UTF-8 or CSV (comma delimited)")
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
        if b"\r" in raw:  # a CR alone ends a line too (old Macs), rather than the file being one line
            raw = raw.replace(b"\r", b"\n")
    if not raw or raw.isspace():
        raise DataError(f"{path} is empty; give a CSV with one image a line")
    last = len(raw)
    while raw[last - 1] == 10:  # blank lines at the end carry nothing
        last -= 1
    end = raw.find(b"\n", 0, last)
    end = last if end < 0 else end
    first = bytes(memoryview(raw)[:end])
    header = first if has_letter(first) else None  # a letter: names, not numbers
    del raw[last + 1 :]  # each line ends in one newline
    if len(raw) == last:
        raw.append(10)
    if header is None:
        return None, raw, 1
    del raw[: end + 1]
    if not raw:
        raise DataError(f"{path} holds no rows, only its header; add one image a line below it")
    return header, raw, 2


def has_letter(line):
    """Whether LINE (bytes) holds a letter, without decoding it unless it has bytes beyond ASCII."""
    if re.search(rb"[A-Za-z]", line):
        return True
    return bool(re.search(rb"[\x80-\xff]", line)) and any(c.isalpha() for c in line.decode("utf-8", "replace"))


LABEL = re.compile(rb'(?<![^,])\s*"*label"*\s*(?![^,])', re.IGNORECASE)  # a whole cell: label, "Label"


def label_column(header):
    """The index of the first column the header names label, or None: a search over the line's bytes,
    with no Python string per column (a header may name millions)."""
    found = header is not None and LABEL.search(header)
    return header.count(b",", 0, found.start()) if found else None


def column_name(header, i):
    """The name of column I, for a message: the header's cell I, found by the line's commas; its number
    where there is no header."""
    import numpy as np

    if header is None:
        return str(i)
    commas = np.flatnonzero(np.frombuffer(header, dtype=np.uint8) == 44)
    start = int(commas[i - 1]) + 1 if i else 0
    end = int(commas[i]) if i < len(commas) else len(header)
    return header[start : min(end, start + 200)].decode("utf-8", "replace").strip().strip('"')[:60]


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


def parse_cells(text, rows, n_columns, header, first_line, path, np):
    """ROWS lines of whole numbers as an int64 table [ROWS, N_COLUMNS], by numpy's C parser (a Python
    one takes a minute over Kaggle's 33 million cells); a cell that is no number gets its line named."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's deprecation of fromstring's text mode, still its fastest
        try:
            cells = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")
        except ValueError:
            cells = None
    if cells is None or cells.size != rows * n_columns:
        raise DataError(first_bad_cell(text, header, first_line, path))
    return torch.from_numpy(cells).view(rows, n_columns)


# The first cell that is not a whole number (spaces and quotes around it allowed): the start of a line or
# a cell not followed by digits and the end of the cell. One search in C: a line of millions of cells
# splits into no Python objects.
BAD_CELL = re.compile(rb'(?:^|(?<=[,\n]))(?![ \t\v\f]*"*[0-9]+"*[ \t\v\f]*(?:[,\n]|\Z))')


def first_bad_cell(text, header, first_line, path):
    """The sentence for the first cell that is not a whole number (searched for only when one is)."""
    found = BAD_CELL.search(text)
    if found is None:
        return f"{path} cannot be read as numbers; check that it is a CSV of whole numbers"
    at = found.start()
    line_start = text.rfind(b"\n", 0, at) + 1
    name = column_name(header, text.count(b",", line_start, at))
    cell = text[at : at + 64].split(b"\n", 1)[0].split(b",", 1)[0]
    shown = cell.strip().strip(b'"').decode("utf-8", "replace")[:20]
    line = first_line + text.count(b"\n", 0, at)
    return (
        f"{path} line {line}, column {name}: {shown!r} is not a whole number"
        if shown
        else f"{path} line {line}, column {name} is empty"
    )


def check_range(pixels, labels, header, label, first_line, path):
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
            f"{path} line {first_line + row}, column {column_name(header, col)}: "
            f"{int(pixels[bad[0][0], bad[0][1]])} is outside the pixel range 0..255"
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
    if not os.path.lexists(names_file):
        return None
    # utf-8-sig: Notepad and Excel may start it with a byte-order mark, no part of the first name
    text = read_file(names_file, 1 << 20, f"the names of {MAX_CLASSES} classes").decode("utf-8-sig", "replace")
    names = [line.strip() for line in text.splitlines() if line.strip()]
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
        if "idx" not in low or os.path.isdir(os.path.join(folder, name)):
            continue
        split = "train" if "train" in low else "test" if ("test" in low or "t10k" in low) else None
        kind = "images" if "images" in low else "labels" if "labels" in low else None
        if split and kind:  # data.py reads it by its size: a FIFO or a link to a device is refused here
            open_input(os.path.join(folder, name))[0].close()
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
