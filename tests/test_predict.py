"""predict.py: drawings and photos of digits classified with the shipped weights, and what
--save-preprocessed will and will not write."""

import os

import pytest
import torch

from conftest import ROOT, as_photo, digit_png, main_of, one_line, png_size, run_script, snapshot

SHIPPED = {
    "mnist": os.path.join(ROOT, "weights", "mnist.pt"),
    "fashion-mnist": os.path.join(ROOT, "weights", "fashion-mnist.pt"),
}


@pytest.mark.skipif(not os.path.exists(SHIPPED["mnist"]), reason="weights/mnist.pt not present")
def test_a_large_off_centre_drawing_classifies_like_the_original(mnist_test, tmp_path, capsys):
    from checkpoint import build_model, load_checkpoint
    from data import normalize

    images, labels = mnist_test
    ckpt = load_checkpoint(SHIPPED["mnist"])
    model = build_model(ckpt)[0].eval()
    for k in (0, 1, 2):
        with torch.no_grad():
            expected = model(normalize(images[k : k + 1], ckpt["data"]["mean"], ckpt["data"]["std"])).argmax().item()
        path = str(tmp_path / f"digit{k}.png")
        as_photo(images[k, 0]).save(path)
        code, out, err = run_script("predict", [path], capsys)
        assert code == 0, err
        assert out.split()[1] == str(expected), out


@pytest.mark.skipif(not os.path.exists(SHIPPED["mnist"]), reason="weights/mnist.pt not present")
def test_ten_drawn_digits_mostly_right_with_the_shipped_weights(mnist_test, tmp_path, capsys):
    images, labels = mnist_test
    folder = tmp_path / "drawn"
    folder.mkdir()
    picks = list(range(100, 1100, 100))
    for n, k in enumerate(picks):
        as_photo(images[k, 0], size=200, canvas=(300, 300), at=(10 + 9 * n, 90 - 8 * n)).save(folder / f"{n}.png")
    seen = str(tmp_path / "seen")
    code, out, err = run_script("predict", [str(folder), "--save-preprocessed", seen], capsys)  # the default weights
    assert code == 0, err
    predicted = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.endswith("%")}
    right = sum(predicted[str(folder / f"{n}.png")] == str(labels[k].item()) for n, k in enumerate(picks))
    assert right >= 9, out
    assert len(os.listdir(seen)) == 10 and png_size(os.path.join(seen, "0.png")) == (28, 28)


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


def test_out_never_lands_on_an_input_or_the_checkpoint_under_another_name(tmp_path, capsys):
    folder = tmp_path / "drawn"
    folder.mkdir()
    digit_png(folder / "a.png")
    ckpt = tmp_path / "model.pt"
    os.symlink(SHIPPED["mnist"], ckpt)
    before = snapshot(str(tmp_path))
    for argv in (
        [str(folder), "--out", str(folder / "a.png")],  # an image inside a folder that was given
        [str(folder / "a.png"), "--ckpt", str(ckpt), "--out", SHIPPED["mnist"]],  # the checkpoint behind its link
    ):
        code, line = one_line(lambda argv=argv: main_of("predict", argv))
        assert code == 2 and "which this command reads; choose another file" in line, line
    assert snapshot(str(tmp_path)) == before and os.path.islink(ckpt)


def test_names_from_files_are_escaped_and_csv_cells_never_formulas(tmp_path, capsys):
    import csv

    folder = tmp_path / "drawn"
    folder.mkdir()
    hostile = "=HYPERLINK(1),\x1b]0;pwned\x07.png"
    digit_png(folder / hostile)
    odd = os.fsdecode(b"caf\xff.png")  # a name that is not UTF-8
    digit_png(os.path.join(str(folder), odd))
    out = tmp_path / "preds.csv"
    code, printed, err = run_script("predict", [str(folder), "--out", str(out)], capsys)
    assert code == 0, err
    assert "\x1b" not in printed and "\\x1b]0;pwned\\x07" in printed and "caf\\xff.png" in printed
    rows = list(csv.reader(open(out, encoding="utf-8")))
    assert rows[0] == ["file", "label", "probability"] and len(rows) == 3 and all(len(r) == 3 for r in rows)
    assert {r[0][len(str(folder)) + 1 :] for r in rows[1:]} == {"caf\\xff.png", "=HYPERLINK(1),\\x1b]0;pwned\\x07.png"}
    assert not any(r[0].startswith("=") for r in rows)


def test_save_preprocessed_never_writes_over_a_file_it_did_not_make(tmp_path, capsys):
    image = digit_png(tmp_path / "a.png")
    seen = tmp_path / "seen"
    seen.mkdir()
    (seen / "a.png").write_bytes(b"the user's own picture")
    code, line = one_line(lambda: main_of("predict", [image, "--save-preprocessed", str(seen)]))
    assert code == 2 and "which predict.py did not write" in line
    assert (seen / "a.png").read_bytes() == b"the user's own picture"
    (seen / "a.png").unlink()
    for _ in range(2):  # its own earlier output it may write again
        code, _, err = run_script("predict", [image, "--save-preprocessed", str(seen)], capsys)
        assert code == 0, err
    assert png_size(seen / "a.png") == (28, 28)
