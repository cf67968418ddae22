"""Your own data: a Kaggle-style CSV, a folder of class folders, IDX files with other classes and EMNIST
by name train, evaluate and predict with the data's own classes; every bad input is one line."""

import csv
import gzip
import os

import pytest
import torch

import data
import userdata
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
    root = folder_case(tmp_path, {"cats": ["a.png"], "dogs": ["b.png"]})  # two images of the same grey
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", root, "--out", str(tmp_path / "run")]))
    assert code == 1 and "every training image is the same shade" in err, err


def test_an_unknown_name_or_path_is_one_line():
    code, _, err = capture(lambda: main_of("train", [*FAST, "--dataset", "cifar"]))
    assert code == 2 and "unknown dataset 'cifar': neither a built-in one (mnist, fashion-mnist" in err


def test_a_missing_emnist_set_is_named_by_its_own_file_names(tmp_path):
    with pytest.raises(data.DataError, match=r"emnist-letters-train-images-idx3-ubyte\[\.gz\] and emnist-letters-"):
        data.find_split(data.DATASETS["emnist-letters"], "train", str(tmp_path), download=False)
