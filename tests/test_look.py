"""Pictures, predicting your own images, shipped weights and export."""
import os

import pytest
import torch
from PIL import Image

import plots
import predict
from conftest import HAS_FASHION, ROOT, SHARED, run_cli, run_script
from data import load_split

SHIPPED = {"mnist": os.path.join(ROOT, "weights", "mnist.pt"),
           "fashion-mnist": os.path.join(ROOT, "weights", "fashion-mnist.pt")}


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory):
    from conftest import write_idx_set
    tmp = tmp_path_factory.mktemp("look")
    data = write_idx_set(str(tmp / "synth"), n_train=300, n_test=200)
    out = str(tmp / "run")
    result = run_cli(["train.py", "--model", "fast", "--epochs", "3", "--val", "50", "--data-dir", data,
                      "--out", out, "--progress", "off"])
    assert result.returncode == 0, result.stderr
    return data, out


def test_evaluate_out_writes_every_picture(synth_run, tmp_path):
    data, run = synth_run
    report = str(tmp_path / "report")
    result = run_cli(["evaluate.py", os.path.join(run, "last.pt"), "--data-dir", data, "--out", report])
    assert result.returncode == 0, result.stderr
    for name, (min_w, min_h) in {"confusion.png": (400, 400), "curves.png": (800, 300),
                                 "correct.png": (400, 200)}.items():
        w, h = png_size(os.path.join(report, name))
        assert min_w <= w <= 4000 and min_h <= h <= 4000, (name, w, h)
    assert "curves.png" in result.stdout and "skipped" not in result.stdout
    assert not [f for f in os.listdir(report) if f.endswith(".tmp")]


def test_mistakes_are_sorted_by_confidence_and_captioned(tmp_path):
    images = torch.randint(0, 255, (6, 1, 28, 28), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    probs = torch.full((6, 10), 0.01)
    probs[0, 7], probs[1, 1], probs[2, 9], probs[3, 3], probs[4, 0], probs[5, 5] = 0.6, 0.9, 0.95, 0.9, 0.3, 0.9
    written = plots.prediction_grids(images, labels, probs, [str(k) for k in range(10)], str(tmp_path))
    assert [os.path.basename(p) for p in written] == ["mistakes.png", "correct.png"]
    w, h = png_size(written[0])
    assert w > 3 * 112 and h > 112   # three mistakes in one row of enlarged tiles, each with a caption


def test_without_matplotlib_the_plots_are_skipped_with_one_line(synth_run, tmp_path, capsys, monkeypatch):
    data, run = synth_run
    monkeypatch.setattr(plots, "have_matplotlib", lambda: False)
    report = str(tmp_path / "report")
    code, out, err = run_script("evaluate", [os.path.join(run, "last.pt"), "--data-dir", data, "--out", report], capsys)
    assert code == 0, err
    assert "skipped confusion.png and curves.png: they need matplotlib" in out
    assert os.path.exists(os.path.join(report, "correct.png"))
    assert not os.path.exists(os.path.join(report, "confusion.png"))


def test_data_show_draws_a_grid(synth_run, tmp_path):
    data, _ = synth_run
    for flags, rows in (([], 4), (["--augment"], 4)):
        out = str(tmp_path / f"grid{len(flags)}.png")
        result = run_cli(["data.py", "--show", "mnist", "--data-dir", data, "--out", out, *flags])
        assert result.returncode == 0, result.stderr
        w, h = png_size(out)
        assert w == 8 * 112 + 9 * 4 and h > rows * 112


# ---------------------------------------------------------------------------------------------
# predict.py
# ---------------------------------------------------------------------------------------------

def as_photo(image, size=200, canvas=(320, 260), at=(90, 20)):
    """An MNIST digit (uint8 [28, 28]) as a user's drawing: dark ink on white paper, enlarged and off-centre."""
    big = Image.fromarray((255 - image).numpy(), mode="L").resize((size, size), Image.BILINEAR)
    paper = Image.new("L", canvas, 255)
    paper.paste(big, at)
    return paper


@pytest.fixture(scope="module")
def mnist_test():
    return load_split("mnist", "test")


def test_preprocessing_recovers_an_mnist_like_digit(mnist_test):
    images, _ = mnist_test
    original = images[0, 0]
    recovered = predict.to_mnist(torch.from_numpy(__import__("numpy").array(as_photo(original))).float() / 255)
    assert recovered.shape == (28, 28) and recovered.dtype == torch.uint8
    # Same place and shape as the original, up to the blur of enlarging and shrinking.
    diff = (recovered.float() - original.float()).abs().mean()
    assert diff < 25, diff


@pytest.mark.skipif(not os.path.exists(SHIPPED["mnist"]), reason="weights/mnist.pt not present")
def test_a_large_off_centre_drawing_classifies_like_the_original(mnist_test, tmp_path, capsys):
    from common import build_model, load_checkpoint
    from data import normalize
    images, labels = mnist_test
    ckpt = load_checkpoint(SHIPPED["mnist"])
    model = build_model(ckpt)[0].eval()
    for k in (0, 1, 2):
        with torch.no_grad():
            expected = model(normalize(images[k:k + 1], ckpt["data"]["mean"], ckpt["data"]["std"])).argmax().item()
        path = str(tmp_path / f"digit{k}.png")
        as_photo(images[k, 0]).save(path)
        code, out, err = run_script("predict", [path], capsys)
        assert code == 0, err
        assert out.split()[1] == str(expected), out


@pytest.mark.skipif(not os.path.exists(SHIPPED["mnist"]), reason="weights/mnist.pt not present")
def test_ten_drawn_digits_mostly_right_with_the_shipped_weights(mnist_test, tmp_path):
    images, labels = mnist_test
    folder = tmp_path / "drawn"
    folder.mkdir()
    picks = list(range(100, 1100, 100))
    for n, k in enumerate(picks):
        as_photo(images[k, 0], size=200, canvas=(300, 300), at=(10 + 9 * n, 90 - 8 * n)).save(folder / f"{n}.png")
    seen = str(tmp_path / "seen")
    result = run_cli(["predict.py", str(folder), "--save-preprocessed", seen])   # the default weights
    assert result.returncode == 0, result.stderr
    predicted = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if line.endswith("%")}
    right = sum(predicted[str(folder / f"{n}.png")] == str(labels[k].item()) for n, k in enumerate(picks))
    assert right >= 9, result.stdout
    assert len(os.listdir(seen)) == 10 and png_size(os.path.join(seen, "0.png")) == (28, 28)


@pytest.mark.parametrize("file,dataset,floor", [("mnist.pt", "mnist", 99.0), ("mnist-top.pt", "mnist", 99.7),
                                                 ("fashion-mnist.pt", "fashion-mnist", 90.0),
                                                 ("fashion-mnist-top.pt", "fashion-mnist", 94.0)])
def test_shipped_weights_are_small_and_score_what_they_say(file, dataset, floor):
    """Each shipped file is a slim checkpoint under 5 MB whose recorded accuracy is what it scores now."""
    path = os.path.join(ROOT, "weights", file)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    from common import load_checkpoint
    assert os.path.getsize(path) < 5_000_000
    ckpt = load_checkpoint(path)
    assert ckpt["data"]["dataset"] == dataset and "optimizer" not in ckpt
    assert ckpt["metrics"]["test_acc"] > floor
    if dataset == "fashion-mnist" and not HAS_FASHION:
        return
    result = run_cli(["evaluate.py", path] + (["--data-dir", SHARED] if dataset != "mnist" else []))
    assert result.returncode == 0, result.stderr
    assert f"accuracy {ckpt['metrics']['test_acc']:.2f} %" in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------
# export.py
# ---------------------------------------------------------------------------------------------

def test_export_pt2_matches_the_model(synth_run, tmp_path):
    data, run = synth_run
    out = str(tmp_path / "model.pt2")
    result = run_cli(["export.py", run, "--format", "pt2", "--out", out, "--data-dir", data])
    assert result.returncode == 0, result.stderr
    assert "largest logit difference" in result.stdout and "same prediction for 100.0 %" in result.stdout
    program = torch.export.load(out).module()
    assert program(torch.zeros(3, 1, 28, 28)).shape == (3, 10)   # the batch size stays free


def test_export_ckpt_is_slim_and_evaluates_the_same(synth_run, tmp_path):
    data, run = synth_run
    out = str(tmp_path / "slim.pt")
    result = run_cli(["export.py", run, "--format", "ckpt", "--out", out, "--data-dir", data])
    assert result.returncode == 0, result.stderr
    assert os.path.getsize(out) < os.path.getsize(os.path.join(run, "last.pt")) / 2
    a, b = (run_cli(["evaluate.py", p, "--data-dir", data]) for p in (run, out))
    assert a.stdout.split("accuracy")[1].split("%")[0] == b.stdout.split("accuracy")[1].split("%")[0]


def test_export_onnx_without_its_packages_says_what_to_install(synth_run, tmp_path, capsys, monkeypatch):
    import export
    data, run = synth_run
    monkeypatch.setattr(export, "_importable", lambda name: False)
    code, _, err = run_script("export", [run, "--format", "onnx", "--out", str(tmp_path / "m.onnx"),
                                         "--data-dir", data], capsys)
    assert code == 1 and "pip install onnx onnxscript" in err
    assert not os.path.exists(tmp_path / "m.onnx")


def test_export_onnx_when_installed(synth_run, tmp_path):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    data, run = synth_run
    out = str(tmp_path / "m.onnx")
    result = run_cli(["export.py", run, "--format", "onnx", "--out", out, "--data-dir", data])
    assert result.returncode == 0, result.stderr
    assert "same prediction for 100.0 %" in result.stdout
