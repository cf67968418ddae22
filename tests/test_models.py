"""The registry, and every architecture against the shapes and sizes its notebook printed."""

import pytest
import torch

import models
from models import ModelError, count_params, get_model, list_models, register, summary

# Parameter counts for 1x28x28 input and 10 classes, as the notebooks report them.
NOTEBOOK_PARAMS = {
    "cnn": 171_158,
    "cnn-basic": 108_874,
    "cnn2": 857_738,
    "cnn3": 454_250,
    "convnet": 184_586,
    "lenet5": 61_706,
    "tiny": 9_902,
}


@pytest.mark.parametrize("name,params", sorted(NOTEBOOK_PARAMS.items()))
def test_notebook_parameter_counts(name, params):
    assert count_params(get_model(name)) == params


def test_tiny2_keeps_notebook_004s_budget_with_wider_first_layers():
    model = get_model("tiny2")
    assert count_params(model) == 9_074 < 10_000
    shapes = [s for _, s, _ in summary(model) if len(s) == 3]
    assert shapes[0] == (8, 28, 28) and (16, 28, 28) in shapes and (20, 8, 8) in shapes


@pytest.mark.parametrize("name", list_models())
def test_forward_gives_logits_for_any_class_count(name):
    model = get_model(name, in_channels=1, num_classes=7).eval()
    out = model(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 7)
    # logits: neither probabilities (rows summing to 1) nor log-probabilities (rows whose exp sums to 1)
    assert not torch.allclose(out.sum(1), torch.ones(5), atol=1e-3)
    assert not torch.allclose(torch.logsumexp(out, 1), torch.zeros(5), atol=1e-3)


@pytest.mark.parametrize("name", list_models())
def test_backward_reaches_every_parameter(name):
    model = get_model(name)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_notebook_layer_shapes():
    # notebook 004's torchsummary table and notebook 000's printed model
    shapes = [s for _, s, _ in summary(get_model("tiny")) if len(s) == 3]
    assert [28, 28] == list(shapes[0][1:]) and (24, 8, 8) in shapes and (16, 12, 12) in shapes
    rows = summary(get_model("cnn"))
    assert (32, 7, 7) in [s for _, s, _ in rows]
    assert sum(n for _, _, n in rows) == NOTEBOOK_PARAMS["cnn"]


def test_registry_refuses_duplicates_and_unknown_names():
    with pytest.raises(ModelError, match="already registered"):
        register("cnn")(torch.nn.Linear)
    with pytest.raises(ModelError, match="unknown model 'resnet9000'.*cnn, cnn-basic"):
        get_model("resnet9000")
    with pytest.raises(ModelError, match="no option 'dropout'"):
        get_model("cnn", dropout=0.5)


def test_dropout_option():
    assert get_model("convnet", dropout=0.5).classifier[3].p == 0.5
    assert get_model("cnn3").classifier[1].p == 0.05


def test_models_cli(capsys):
    assert models.main([]) == 0
    out = capsys.readouterr().out
    for name, params in NOTEBOOK_PARAMS.items():
        assert f"`{name}`" in out and f"{params:,}" in out
    assert models.main(["--summary", "tiny"]) == 0
    assert "total params: 9,902" in capsys.readouterr().out
    assert models.main(["--summary", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
