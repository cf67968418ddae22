"""Your own data: a Kaggle-style CSV, a folder of class folders, IDX files with other classes and EMNIST
by name train, evaluate and predict with the data's own classes; every bad input is one line."""

import csv
import functools
import gzip
import os
import zlib

import pytest
import torch

import data
import userdata
from cli import UserError
from conftest import capture, idx_bytes, main_of, snapshot

FAST = ["--model", "strided-crop", "--epochs", "2", "--batch-size", "32", "--lr", "2e-2", "--progress", "off"]


def bars(n, classes, seed=0, side=28):
    """N learnable images: class k is a bright bar at its own row (uint8 [n, side, side]), and labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    images = torch.randint(0, 40, (n, side, side), generator=g)
    for i, k in enumerate(labels.tolist()):
        row = 2 + k * (side - 4) // classes
        images[i, row : row + max(2, side // 14), side // 7 : side - side // 7] = 250
    return images.to(torch.uint8), labels


def write_csv(path, images, labels=None, header=True, label_values=None):
    side = images.shape[-1]
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        if header:
            out.writerow((["label"] if labels is not None else []) + [f"pixel{i}" for i in range(side * side)])
        for i, row in enumerate(images.view(len(images), -1).tolist()):
            value = [] if labels is None else [label_values[labels[i]] if label_values else int(labels[i])]
            out.writerow(value + row)
    return str(path)


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory):
    """A Kaggle-style train.csv (label and pixel0..pixel783) and test.csv (pixels only)."""
    folder = tmp_path_factory.mktemp("kaggle")
    images, labels = bars(420, 10)
    train = write_csv(folder / "train.csv", images, labels)
    test_images, _ = bars(56, 10, seed=1)
    test = write_csv(folder / "test.csv", test_images)
    return train, test, str(folder)


@pytest.fixture(scope="module")
def kaggle_run(kaggle, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs") / "kaggle")
    code, printed, err = capture(lambda: main_of("train", [*FAST, "--dataset", kaggle[0], "--out", out]))
    assert code == 0, err
    return out, printed


def test_a_kaggle_csv_trains_with_a_stratified_seventh_as_its_test_split(kaggle_run):
    out, printed = kaggle_run
    assert "test split: a stratified seventh of the data, 60 of 420 images" in printed
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["data"]["classes"] == [str(k) for k in range(10)] and ckpt["data"]["test"]["kind"] == "share"
    held = ckpt["data"]["test"]["indices"]
    assert len(held) == 60 and torch.bincount(torch.arange(420)[held.long()] % 10).tolist() == [6] * 10  # stratified
    assert ckpt["history"][-1]["test_acc"] > 90  # the bars are easy
    assert 0 < ckpt["data"]["mean"] < 1  # measured on the user's training split


def test_evaluate_scores_the_same_test_images_with_no_flags(kaggle_run):
    out, _ = kaggle_run
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    code, printed, err = capture(lambda: main_of("evaluate", [out]))
    assert code == 0, err
    assert "the test split it was trained beside: 60 of 420 images" in printed
    assert f"accuracy {ckpt['history'][-1]['test_acc']:.2f} % (" in printed


def test_export_checks_on_the_same_test_images_and_names_the_file_not_its_folder(kaggle_run, tmp_path):
    import json

    out, _ = kaggle_run
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    pt2 = str(tmp_path / "kaggle.pt2")
    code, printed, err = capture(lambda: main_of("export", [out, "--format", "pt2", "--out", pt2]))
    assert code == 0, err
    assert "the test split it was trained beside: 60 of 420 images" in printed
    assert (
        "on 60 test images given on 0..1" in printed and f"accuracy {ckpt['history'][-1]['test_acc']:.2f} %" in printed
    )
    extra = {"metadata.json": ""}
    torch.export.load(pt2, extra_files=extra)
    card = json.loads(extra["metadata.json"])
    assert card["dataset"] == "train.csv" and "grey levels as in train.csv" in card["input"]


def test_export_of_a_model_whose_data_moved_says_where_to_point_it(kaggle, kaggle_run, tmp_path):
    out, _ = kaggle_run
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    ckpt["data"]["dataset"] = str(tmp_path / "moved" / "train.csv")
    torch.save(ckpt, tmp_path / "moved.pt")
    argv = [str(tmp_path / "moved.pt"), "--format", "ckpt", "--out", str(tmp_path / "slim.pt")]
    code, _, err = capture(lambda: main_of("export", argv))
    assert code == 2 and "pass --dataset PATH where it is now" in err and not os.path.exists(tmp_path / "slim.pt")
    code, printed, err = capture(lambda: main_of("export", [*argv, "--dataset", kaggle[0]]))
    assert code == 0 and "the test split it was trained beside: 60 of 420 images" in printed, err


def test_a_model_trained_beside_test_path_is_evaluated_on_that_file_again(kaggle, tmp_path):
    """--test PATH is recorded; evaluate.py with no flags scores that file, not a share of the training
    data (most of which the model learned from), and a missing one is named rather than replaced."""
    images, labels = bars(70, 10, seed=2)
    test = write_csv(tmp_path / "test-labelled.csv", images, labels)
    out = str(tmp_path / "run")
    code, _, err = capture(
        lambda: main_of("train", [*FAST, "--epochs", "1", "--dataset", kaggle[0], "--test", test, "--out", out])
    )
    assert code == 0, err
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    code, printed, err = capture(lambda: main_of("evaluate", [out]))
    assert code == 0 and f"test set {os.path.abspath(test)}" in printed, err
    assert f"accuracy {ckpt['history'][-1]['test_acc']:.2f} % (" in printed and "/70)" in printed
    os.remove(test)
    code, _, err = capture(lambda: main_of("evaluate", [out]))
    assert code == 2 and "the test set the model was trained beside, is not there; pass --test PATH" in err, err


def test_a_kaggle_submission_in_the_third_command(kaggle, kaggle_run, tmp_path):
    submission = str(tmp_path / "submission.csv")
    code, printed, err = capture(lambda: main_of("predict", [kaggle[1], "--ckpt", kaggle_run[0], "--out", submission]))
    assert code == 0, err
    rows = list(csv.reader(open(submission)))
    assert rows[0] == ["ImageId", "Label"] and len(rows) == 57
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 57))
    truth = [str(k) for k in (torch.arange(56) % 10).tolist()]
    assert sum(r[1] == t for r, t in zip(rows[1:], truth)) >= 50


def test_a_class_folder_set_trains_evaluates_and_predicts_with_its_folder_names(tmp_path):
    from PIL import Image

    images, labels = bars(140, 3, side=40)
    names = ["circle", "cross", "dot"]
    for i, (x, k) in enumerate(zip(images, labels.tolist())):
        os.makedirs(tmp_path / "symbols" / names[k], exist_ok=True)
        Image.fromarray(x.numpy()).convert("RGB").resize((40, 30)).save(tmp_path / "symbols" / names[k] / f"{i}.png")
    out = str(tmp_path / "run")
    code, printed, err = capture(
        lambda: main_of("train", [*FAST, "--epochs", "3", "--dataset", str(tmp_path / "symbols"), "--out", out])
    )
    assert code == 0, err
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ckpt["data"]["classes"] == names and ckpt["data"]["rule"] == "fit"
    report = str(tmp_path / "report")
    code, printed, err = capture(lambda: main_of("evaluate", [out, "--out", report]))
    assert code == 0 and "circle" in printed and "cross" in printed, err
    assert open(os.path.join(report, "confusion.csv")).readline() == "true\\predicted,circle,cross,dot\n"
    picture = str(tmp_path / "symbols" / "dot" / "2.png")
    code, printed, err = capture(lambda: main_of("predict", [picture, "--ckpt", out]))
    assert code == 0, err
    assert printed.split()[1] == "dot"
    import demo

    classifier = demo.Classifier(out)  # the page's /config lists the folder names; an upload reads by the same rule
    assert demo.page_config(classifier)["classes"] == names
    assert classifier.predict(open(picture, "rb").read())["top"][0]["label"] == "dot"
    from conftest import ROOT
    from preprocess import fit_square, read_gray

    model = torch.hub.load(ROOT, "strided_crop", source="local", weights=out)  # the run folder as its weights
    assert model.classes == names
    with torch.no_grad():  # the hub model takes 0..1 images, read by the rule the run was trained with
        assert names[model(fit_square(read_gray(picture))[None, None] / 255).argmax().item()] == "dot"


def emnist_folder(root, split, images, labels):
    """EMNIST's files for one split as torchvision lays them out: EMNIST/raw/emnist-<split>-*, images
    stored transposed, as EMNIST stores them."""
    raw = root / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stored = images.transpose(1, 2).contiguous()
    for part, n in (("train", slice(None)), ("test", slice(None))):
        for kind, t, magic in (("images-idx3", stored[n], 0x803), ("labels-idx1", labels[n], 0x801)):
            with gzip.open(raw / f"emnist-{split}-{part}-{kind}-ubyte.gz", "wb") as f:
                f.write(idx_bytes(t, magic))
    return str(root)


def test_emnist_letters_by_name_come_upright_with_their_letters(tmp_path):
    """A letter drawn as an L (a bar down the left, a bar along the bottom) must come out an L, not
    its transpose; EMNIST numbers letters from 1, the classes are a-z."""
    image = torch.zeros(28, 28, dtype=torch.uint8)
    image[4:24, 6:9] = 255  # the upright stroke, on the left
    image[21:24, 6:20] = 255  # the foot, at the bottom
    images, labels = image.expand(26, 28, 28).clone(), torch.arange(1, 27)
    root = emnist_folder(tmp_path, "letters", images, labels)
    x, y = data.load_split("emnist-letters", "train", root)
    assert torch.equal(x[0, 0], image) and y.tolist() == list(range(26))
    assert data.DATASETS["emnist-letters"].classes[11] == "l" and len(data.DATASETS["emnist-balanced"].classes) == 47
    out = str(tmp_path / "run")
    code, _, err = capture(
        lambda: main_of(
            "train", [*FAST, "--epochs", "1", "--dataset", "emnist-letters", "--data-dir", root, "--out", out]
        )
    )
    assert code == 0, err
    assert torch.load(os.path.join(out, "last.pt"), weights_only=True)["data"]["classes"][:3] == ["a", "b", "c"]
    code, printed, err = capture(lambda: main_of("evaluate", [out]))  # no --data-dir: where training found it
    assert code == 0 and "test loss" in printed, err


def test_an_idx_folder_with_other_classes_takes_names_from_classes_txt(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    images, labels = bars(90, 3)
    for part in ("train", "t10k"):
        for kind, t, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            (folder / f"{part}-{kind}-ubyte").write_bytes(idx_bytes(t, magic))
    (folder / "classes.txt").write_text("bolt\nnut\nwasher\n")
    source = userdata.open_dataset(str(folder))
    assert source.info.classes == ("bolt", "nut", "washer") and source.record == {"kind": "own"}
    assert len(source.test[1]) == 90  # its own test files, not a share


def test_a_csv_is_parsed_in_bounded_chunks_with_the_same_result(kaggle, monkeypatch):
    pixels, labels, names = userdata.read_csv(kaggle[0], need_labels=True)
    assert pixels.shape == (420, 1, 28, 28) and pixels.dtype == torch.uint8 and labels.tolist()[:3] == [0, 1, 2]
    monkeypatch.setattr(userdata, "CHUNK_CELLS", 785 * 50)  # 50 rows at a time: 9 chunks, the last one short
    small_pixels, small_labels, _ = userdata.read_csv(kaggle[0], need_labels=True)
    assert torch.equal(small_pixels, pixels) and torch.equal(small_labels, labels)


@pytest.mark.parametrize(
    "text, message",
    [
        ("0,1,x,3,4", r"line 6, column pixel1: 'x' is not a whole number"),
        ("1,1,2,300,4", r"line 6, column pixel2: 300 is outside the pixel range"),
        ("-1,1,2,3,4", r"line 6: label -1 is not a class number"),
    ],
)
def test_a_bad_cell_in_a_later_chunk_names_its_own_line(tmp_path, monkeypatch, text, message):
    path = tmp_path / "chunks.csv"
    path.write_text("\n".join(broken(good_lines(), 6, text)) + "\n")
    monkeypatch.setattr(userdata, "CHUNK_CELLS", 5 * 2)  # two rows at a time: line 6 is in the third chunk
    with pytest.raises(data.DataError, match=message):
        userdata.read_csv(str(path), need_labels=True)


def test_csv_without_a_header_and_other_sizes(tmp_path):
    images, labels = bars(20, 2, side=16)
    path = write_csv(tmp_path / "small.csv", images, labels, header=False)
    pixels, read_labels, _ = userdata.read_csv(path, need_labels=True)
    assert pixels.shape == (20, 1, 28, 28) and read_labels.tolist() == labels.tolist()


# ---------------------------------------------------------------------------------------------
# Bad input: one line each, naming the row or the file, and nothing written
# ---------------------------------------------------------------------------------------------


def good_lines():
    return ["label," + ",".join(f"pixel{i}" for i in range(4))] + [f"{k % 2},1,2,3,4" for k in range(6)]


def broken(lines, line, text):
    lines = list(lines)
    lines[line - 1] = text
    return lines


BAD_CSV = [
    ("ragged row", broken(good_lines(), 3, "1,2,3"), r"line 3 has 3 cells, not 5 like the header"),
    ("not a number", broken(good_lines(), 4, "1,2,x7,3,4"), r"line 4, column pixel1: 'x7' is not a whole number"),
    ("a fraction", broken(good_lines(), 2, "0,2.5,3,4,5"), r"line 2, column pixel0: '2.5' is not a whole number"),
    ("an empty cell", broken(good_lines(), 5, "0,,3,4,5"), r"line 5, column pixel0 is empty"),
    (
        "pixel too bright",
        broken(good_lines(), 6, "0,1,2,256,4"),
        r"line 6, column pixel2: 256 is outside the pixel range",
    ),
    ("negative pixel", broken(good_lines(), 7, "0,1,-3,2,4"), r"line 7, column pixel1: -3 is outside the pixel range"),
    ("no label column", ["a,b,c,d"] + ["1,2,3,4"] * 3, r"has no label column \(its header starts a, b, c"),
    ("not a square", ["label,p0,p1,p2"] + ["0,1,2,3", "1,1,2,3"], r"has 3 pixel columns, which is not a square number"),
    ("one class", ["label,p0,p1,p2,p3"] + ["0,1,2,3,4"] * 4, r"has 1 distinct label; a classifier needs from 2"),
    ("empty file", [""], r"is empty; give a CSV"),
]


@pytest.mark.parametrize("lines, message", [c[1:] for c in BAD_CSV], ids=[c[0] for c in BAD_CSV])
def test_a_bad_csv_gets_one_line_naming_the_row(tmp_path, lines, message):
    import re

    path = tmp_path / "bad.csv"
    path.write_text("\n".join(lines) + "\n")
    before = snapshot(str(tmp_path))
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", str(path), "--out", str(tmp_path / "run")]))
    assert code != 0 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert "Traceback" not in err and snapshot(str(tmp_path)) == before  # no run folder half made


def test_a_csv_far_larger_than_any_real_set_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.csv"
    path.write_text("\n".join(good_lines()) + "\n")
    monkeypatch.setattr(userdata, "MAX_CSV_BYTES", 10)
    with pytest.raises(data.DataError, match="far more than any MNIST-style set as CSV"):
        userdata.read_csv(str(path))
    before = snapshot(str(tmp_path))
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", str(path), "--out", str(tmp_path / "run")]))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "huge.csv is " in err and "Traceback" not in err, err
    assert snapshot(str(tmp_path)) == before
    code, _, err = capture(lambda: main_of("predict", [str(path), "--out", str(tmp_path / "submission.csv")]))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "far more than any" in err, err
    assert snapshot(str(tmp_path)) == before


def test_too_many_rows_are_refused_by_count(tmp_path, monkeypatch):
    path = tmp_path / "long.csv"
    path.write_text("\n".join(good_lines()) + "\n")
    monkeypatch.setattr(userdata, "MAX_BYTES", 20)  # 6 rows of 5 cells
    with pytest.raises(data.DataError, match="holds 6 rows, more than any MNIST-style set"):
        userdata.read_csv(str(path))


def folder_case(tmp_path, layout):
    from PIL import Image

    root = tmp_path / "set"
    for name, files in layout.items():
        (root / name).mkdir(parents=True)
        for f in files:
            if f.endswith(".png") and not f.startswith(("broken", "._")):  # those two: bytes that are no image
                Image.new("L", (20, 20), 60 + 40 * len(f)).save(root / name / f)
            else:
                (root / name / f).write_text("not an image")
    return str(root)


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"cats": ["a.png"], "dogs": []}, r"set/dogs holds no PNG, JPEG, BMP, GIF, WebP or TIFF images"),
        ({"cats": ["a.png"], "dogs": ["notes.txt"]}, r"set/dogs holds no PNG"),
        ({"cats": ["a.png", "b.png"]}, r"holds only one class folder \(cats\)"),
        ({"cats": ["a.png"], "dogs": ["b.png", "broken.png"]}, r"broken.png is not an image this reads"),
    ],
    ids=["empty folder", "no images", "single class", "unreadable image"],
)
def test_a_bad_class_folder_gets_one_line_naming_it(tmp_path, layout, message):
    import re

    root = folder_case(tmp_path, layout)
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", root, "--out", str(tmp_path / "run")]))
    assert code != 0 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not os.path.exists(tmp_path / "run")


def test_hidden_files_beside_the_images_are_not_read(tmp_path):
    root = folder_case(tmp_path, {"cats": ["a.png", "._a.png"], "dogs": ["bb.png", "._bb.png"], ".hidden": ["c.png"]})
    images, labels, classes = userdata.read_class_folders(root)  # the ._ files hold no image
    assert classes == ["cats", "dogs"] and labels.tolist() == [0, 1]


def test_images_all_of_one_shade_are_refused(tmp_path):
    # four images of the same grey, two a class: one of each is held out to test, two train
    root = folder_case(tmp_path, {"cats": ["a.png", "b.png"], "dogs": ["c.png", "d.png"]})
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", root, "--out", str(tmp_path / "run")]))
    assert code == 1 and "every training image is the same shade" in err, err


def test_an_unknown_name_or_path_is_one_line():
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", "cifar"]))
    assert code == 2 and "unknown dataset 'cifar': neither a built-in one (mnist, fashion-mnist" in err


def test_a_missing_emnist_set_is_named_by_its_own_file_names(tmp_path):
    with pytest.raises(data.DataError, match=r"emnist-letters-train-images-idx3-ubyte\[\.gz\] and emnist-letters-"):
        data.find_split(data.DATASETS["emnist-letters"], "train", str(tmp_path), download=False)


# ---------------------------------------------------------------------------------------------
# CSV edges: a header alone, Excel's byte-order mark, old Macs' line ends, a line of millions of cells
# ---------------------------------------------------------------------------------------------


def test_a_csv_of_a_header_alone_is_one_line_saying_it_holds_no_rows(kaggle_run, tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text(good_lines()[0] + "\n")
    with pytest.raises(data.DataError, match="empty.csv holds no rows, only its header; add one image a line"):
        userdata.read_csv(str(path))
    code, _, err = capture(lambda: main_of("predict", [str(path), "--ckpt", kaggle_run[0]]))
    assert code == 1 and len(err.strip().splitlines()) == 1 and "holds no rows" in err, err


def test_a_csv_saved_by_excel_with_a_byte_order_mark_reads_as_without(kaggle, tmp_path):
    pixels, labels, _ = userdata.read_csv(kaggle[0], need_labels=True)
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbf" + open(kaggle[0], "rb").read())
    marked, marked_labels, _ = userdata.read_csv(str(path), need_labels=True)
    assert torch.equal(marked, pixels) and torch.equal(marked_labels, labels)
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(good_lines()[1:]).encode() + b"\n")  # no header: a number first
    assert userdata.read_csv(str(path), need_labels=True)[1].tolist() == [0, 1, 0, 1, 0, 1]
    (tmp_path / "classes.txt").write_bytes(b"\xef\xbb\xbfcat\r\ndog\r\n")  # Notepad's, beside it
    assert userdata.read_csv(str(path), need_labels=True)[2] == ["cat", "dog"]
    path.write_bytes("label,p0\n0,1\n".encode("utf-16"))
    with pytest.raises(data.DataError, match="is UTF-16 text"):
        userdata.read_csv(str(path))


def test_old_mac_line_ends_are_line_ends(kaggle, tmp_path):
    pixels, labels, _ = userdata.read_csv(kaggle[0], need_labels=True)
    text = open(kaggle[0], "rb").read().replace(b"\r\n", b"\n")
    for name, ends in (("mac.csv", b"\r"), ("windows.csv", b"\r\n")):
        path = tmp_path / name
        path.write_bytes(text.replace(b"\n", ends))
        read, read_labels, _ = userdata.read_csv(str(path), need_labels=True)
        assert torch.equal(read, pixels) and torch.equal(read_labels, labels), name
    path.write_bytes(b"\r".join(line.encode() for line in broken(good_lines(), 4, "1,2,x7,3,4")))
    with pytest.raises(data.DataError, match=r"line 4, column pixel1: 'x7' is not a whole number"):
        userdata.read_csv(str(path))


def test_a_line_of_a_million_cells_is_parsed_without_a_python_object_per_cell(tmp_path):
    """A string per cell cost 60 bytes a cell and more (20 MB of CSV took 1 GB); the chunk's 8 bytes a
    cell and a few copies of the line's bytes are what it may take, the search for a bad cell included."""
    import tracemalloc

    cells = 1024 * 1024  # one 1024x1024 image: a line of 3 MB
    header = b"label," + b",".join(b"pixel%d" % i for i in range(cells)) + b"\n7,"
    cases = {  # file: (its bytes, what reading it raises or None)
        "wide.csv": (b"10," * (cells - 1) + b"10\n", None),
        "bad.csv": (b"10," * (cells - 1) + b"1.5\n", r"bad.csv line 1, column 1048575: '1.5' is not a whole number"),
        "named.csv": (header + b"10," * (cells - 1) + b"x\n", r"line 2, column pixel1048575: 'x' is not a whole"),
    }
    for name, (text, _) in cases.items():
        (tmp_path / name).write_bytes(text)
    del header, text
    peaks = {}
    tracemalloc.start()
    try:
        for name, (_, message) in cases.items():
            tracemalloc.reset_peak()
            if message is None:
                pixels, labels, _ = userdata.read_csv(str(tmp_path / name))
            else:
                with pytest.raises(data.DataError, match=message):
                    userdata.read_csv(str(tmp_path / name))
            peaks[name] = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels.shape == (1, 1, 28, 28) and labels is None and bool((pixels == 10).all())
    # about 18 and 38 bytes a cell here (the line's 3 bytes a cell a few times over, and the named
    # file's 10 MB header twice): a Python string per cell made them 75 and 105
    assert peaks["wide.csv"] < 30 * cells and peaks["bad.csv"] < 30 * cells, peaks
    assert peaks["named.csv"] < 60 * cells, peaks


def test_a_line_wider_than_a_chunk_is_refused_before_parsing(tmp_path, monkeypatch):
    path = tmp_path / "one-line.csv"
    path.write_text(",".join(["1"] * 121) + "\n")  # a file whose line ends were lost: every row on one line
    monkeypatch.setattr(userdata, "CHUNK_CELLS", 100)
    with pytest.raises(data.DataError, match=r"line 1 has 121 cells, more than an image row of any size this reads"):
        userdata.read_csv(str(path))


# ---------------------------------------------------------------------------------------------
# Inputs that are no regular file: refused before they are opened, not read forever or waited on
# ---------------------------------------------------------------------------------------------


def without_waiting(call, fifo):
    """What CALL returns, or the exception it raises, run in a thread: if it still waits on FIFO after
    10 s, a writer opens and closes the FIFO to free it and the test fails (rather than hanging the run)."""
    import threading

    outcome = []

    def target():
        try:
            outcome.append(call())
        except BaseException as e:  # handed to the test
            outcome.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the reader waiting in it sees the end
        thread.join(10)
        pytest.fail(f"{fifo} was opened and waited on, not refused")
    return outcome[0]


def refuse_opening(monkeypatch, name):
    """Opening NAME from userdata fails the test at once: a refusal must come before any open."""
    real_open, real_os_open = open, os.open

    def check(path):
        if isinstance(path, (str, os.PathLike)) and os.path.basename(path) == name:
            raise AssertionError(f"{path} was opened")

    monkeypatch.setattr(userdata, "open", lambda path, *a, **k: check(path) or real_open(path, *a, **k), raising=False)
    monkeypatch.setattr(userdata.os, "open", lambda path, *a, **k: check(path) or real_os_open(path, *a, **k))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are a POSIX thing")
def test_a_fifo_named_csv_is_refused_not_waited_on(kaggle_run, tmp_path):
    fifo = str(tmp_path / "x.csv")
    os.mkfifo(fifo)
    error = without_waiting(lambda: userdata.read_csv(fifo), fifo)
    assert isinstance(error, UserError) and "x.csv is a named pipe, not a regular file" in str(error)
    for script, argv in (("train", [*FAST, "--dataset", fifo]), ("predict", [fifo, "--ckpt", kaggle_run[0]])):
        code, _, err = without_waiting(functools.partial(capture, functools.partial(main_of, script, argv)), fifo)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "x.csv is a named pipe" in err, err


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_csv_that_links_to_dev_zero_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    link = tmp_path / "zero.csv"
    link.symlink_to("/dev/zero")
    refuse_opening(monkeypatch, "zero.csv")
    with pytest.raises(UserError, match=r"zero.csv is a link to a device, not a regular file; give a file saved"):
        userdata.read_csv(str(link))
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", str(link), "--out", str(tmp_path / "r")]))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "zero.csv is a link to a device" in err, err
    assert not os.path.exists(tmp_path / "r")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX files")
def test_idx_files_and_a_classes_txt_that_are_no_regular_file_are_named(tmp_path):
    """(An image in a class folder is preprocess.read_gray's to refuse: test_preprocess.py.)"""
    folder = tmp_path / "parts"
    folder.mkdir()
    images, labels = bars(30, 3)
    for kind, t, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
        (folder / f"train-{kind}-ubyte").write_bytes(idx_bytes(t, magic))
    (folder / "t10k-images-idx3-ubyte").symlink_to("/dev/zero")  # no pair is read from a device
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte is a link to a device, not a regular file"):
        userdata.open_dataset(str(folder))
    os.remove(folder / "t10k-images-idx3-ubyte")
    os.mkfifo(folder / "classes.txt")  # was passed over as missing: the names must not silently be numbers
    error = without_waiting(lambda: userdata.open_dataset(str(folder)), str(folder / "classes.txt"))
    assert isinstance(error, UserError) and "classes.txt is a named pipe" in str(error), error


def test_a_file_that_grew_past_its_checked_size_is_read_no_further(tmp_path, monkeypatch):
    path = tmp_path / "growing.csv"
    path.write_text("\n".join(good_lines()) + "\n")
    real, size, inode = os.fstat, len("\n".join(good_lines()[:3]) + "\n"), os.stat(path).st_ino

    def fstat(fd):  # the size it had when checked: three lines
        st = real(fd)
        return os.stat_result((*st[:6], size, *st[7:])) if st.st_ino == inode else st

    monkeypatch.setattr(os, "fstat", fstat)
    assert len(userdata.read_csv(str(path), need_labels=True)[1]) == 2  # what it held when it was checked


# ---------------------------------------------------------------------------------------------
# Tiny sets: a few images a class still hold out a test split
# ---------------------------------------------------------------------------------------------


def tiny_folder(root, per_class, classes=3):
    from PIL import Image

    images, labels = bars(per_class * classes, classes, side=40)
    for i, (x, k) in enumerate(zip(images, labels.tolist())):
        os.makedirs(root / f"class{k}", exist_ok=True)
        Image.fromarray(x.numpy()).save(root / f"class{k}" / f"{i}.png")
    return str(root)


def test_the_stratified_share_holds_out_one_of_each_class_of_two_or_more():
    labels = torch.tensor([0] * 3 + [1] * 2 + [2] * 1 + [3] * 70)
    held = userdata.stratified_share(labels, userdata.TEST_SHARE, userdata.TEST_SEED)
    assert torch.bincount(labels[held], minlength=4).tolist() == [1, 1, 0, 10]  # the rule, else a seventh
    assert torch.equal(held, userdata.stratified_share(labels, userdata.TEST_SHARE, userdata.TEST_SEED))


def test_three_images_a_class_train_and_evaluate_on_the_same_held_out_images(tmp_path):
    root = tiny_folder(tmp_path / "tiny", 3)
    out = str(tmp_path / "run")
    argv = ["--dataset", root, "--model", "fast", "--epochs", "1", "--progress", "off", "--out", out]
    code, printed, err = capture(lambda: main_of("train", argv))
    assert code == 0 and "at least one image of each class, 3 of 9 images" in printed, err
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert len(ckpt["data"]["test"]["indices"]) == 3 and "test_acc" in ckpt["history"][-1]
    code, printed, err = capture(lambda: main_of("evaluate", [out]))
    assert code == 0 and "the test split it was trained beside: 3 of 9 images" in printed and "/3)" in printed, err


def test_one_image_a_class_says_what_to_do_and_an_empty_recorded_split_too(tmp_path):
    root = tiny_folder(tmp_path / "one", 1)
    out = str(tmp_path / "run")
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", root, "--out", out]))
    assert code == 2 and len(err.strip().splitlines()) == 1 and not os.path.exists(out), err
    assert "holds too few images for a test split (3, one a class); add images" in err and "--test" in err
    images, labels = bars(9, 3)  # what an older version recorded for 3 images a class: no test image
    record = {"kind": "share", "indices": torch.zeros(0, dtype=torch.int32), "count": 9}
    record["labels_crc"] = zlib.crc32(labels.to(torch.uint8).numpy().tobytes())
    path = write_csv(tmp_path / "nine.csv", images, labels)
    with pytest.raises(data.DataError, match="trained beside an empty test split of .*nine.csv; pass --test"):
        userdata.open_dataset(path, record=record)
