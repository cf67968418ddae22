"""hubconf.py through torch.hub itself: every entry loads, the shipped weights score what their files
record, and a request for weights an entry does not have is refused in one sentence."""

import os

import pytest
import torch

from conftest import ROOT
from models import describe, list_models

ENTRIES = sorted(name.replace("-", "_") for name in list_models())
WEIGHTS = {"mnist": "cnn", "mnist-top": "vgg", "fashion-mnist": "strided-deep", "fashion-mnist-top": "resnet"}
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def hub_load(name, *args, **kwargs):
    return torch.hub.load(ROOT, name, *args, source="local", **kwargs)


@pytest.fixture
def hub_cache(tmp_path):
    """torch.hub.list and help read GitHub repositories only: a hub cache holding this repository as
    `local/mnist-cnn:main` lets them run offline on the working tree."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    os.symlink(ROOT, tmp_path / "local_mnist-cnn_main")
    try:
        yield "local/mnist-cnn:main"
    finally:
        torch.hub.set_dir(previous)


@pytest.fixture(scope="module")
def mnist_test():
    from data import load_split

    images, labels = load_split("mnist", "test")
    return images.float() / 255, labels


def test_list_shows_exactly_the_models(hub_cache):
    assert sorted(torch.hub.list(hub_cache, trust_repo=True, skip_validation=True, verbose=False)) == ENTRIES


@pytest.mark.parametrize("name", ["cnn", "cnn-basic", "tiny"])
def test_help_starts_with_the_registry_description(hub_cache, name):
    doc = torch.hub.help(hub_cache, name.replace("-", "_"), trust_repo=True, skip_validation=True)
    assert doc.splitlines()[0] == describe(name)


def test_docstrings_list_the_shipped_weights():
    import hubconf

    for entry in ENTRIES:
        doc = getattr(hubconf, entry).__doc__
        mine = [w for w, owner in WEIGHTS.items() if owner.replace("-", "_") == entry]
        assert all(f"'{w}'" in doc for w in mine), entry
        assert mine or "No shipped weights" in doc, entry


@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_gives_logits(entry):
    torch.manual_seed(0)
    model = hub_load(entry).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_entries_take_the_model_options():
    model = hub_load("resnet", width=8, depth=1, num_classes=5, in_channels=3)
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 5)
    with pytest.raises(ValueError, match="has no option 'width'"):
        hub_load("cnn", width=8)


@pytest.mark.parametrize("weights", sorted(WEIGHTS))
def test_accuracies_in_the_docstrings_are_the_files(weights):
    import hubconf

    ckpt = torch.load(os.path.join(ROOT, "weights", f"{weights}.pt"), weights_only=True)
    assert ckpt["model"]["name"] == WEIGHTS[weights]
    assert f"{ckpt['history'][-1]['test_acc']:.2f} %" in hubconf._ABOUT[weights]


def test_pretrained_normalizes_as_the_checkpoint_did(mnist_test):
    """The wrapper on 0..1 images gives what preprocess.classify gives on the uint8 ones."""
    from checkpoint import build_model, load_checkpoint
    from preprocess import classify

    images, _ = mnist_test
    model = hub_load("cnn", pretrained=True)
    assert not model.training and model.classes == [str(d) for d in range(10)]
    ckpt = load_checkpoint(os.path.join(ROOT, "weights", "mnist.pt"))
    plain, _ = build_model(ckpt)
    u8 = (images[:500, 0] * 255).round().to(torch.uint8)
    with torch.no_grad():
        probs = model(images[:500]).softmax(1)
    torch.testing.assert_close(probs, classify(plain.eval(), ckpt, u8), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_pretrained_cnn_scores_what_its_file_records(mnist_test):
    images, labels = mnist_test
    model = hub_load("cnn", pretrained=True)
    with torch.no_grad():
        predicted = torch.cat([model(batch).argmax(1) for batch in images.split(2500)])
    accuracy = round((predicted == labels).double().mean().item() * 100, 2)
    recorded = torch.load(os.path.join(ROOT, "weights", "mnist.pt"), weights_only=True)["history"][-1]["test_acc"]
    assert accuracy == recorded >= 99.4


def test_fashion_weights_by_name(mnist_test):
    model = hub_load("strided_deep", weights="fashion-mnist")
    assert model.classes == FASHION
    with torch.no_grad():
        assert model(mnist_test[0][:4]).shape == (4, 10)


def test_weights_fix_the_options_they_were_trained_with():
    assert hub_load("vgg", weights="mnist-top", width=32).classes == [str(d) for d in range(10)]
    with pytest.raises(ValueError, match="width=32; leave width out"):
        hub_load("vgg", weights="mnist-top", width=16)


@pytest.mark.parametrize(
    "entry, kwargs, message",
    [
        ("cnn", {"weights": "imagenet"}, "unknown weights 'imagenet'; the shipped ones are 'mnist', "),
        (
            "tiny",
            {"pretrained": True},
            "tiny has no shipped weights; pretrained=True works for cnn, vgg, strided_deep, resnet",
        ),
        (
            "cnn",
            {"weights": "fashion-mnist"},
            "the 'fashion-mnist' weights belong to strided_deep, not cnn; cnn has 'mnist'",
        ),
        ("cnn_basic", {"weights": "mnist"}, "the 'mnist' weights belong to cnn, not cnn_basic; cnn_basic has none"),
    ],
)
def test_weights_an_entry_lacks_are_refused_in_one_sentence(entry, kwargs, message):
    with pytest.raises(ValueError) as info:
        hub_load(entry, **kwargs)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
