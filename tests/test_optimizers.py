"""The plain-tensor optimizers step like torch.optim's, share its state_dict format, and leave
torch._dynamo unimported."""

import io
import subprocess
import sys

import pytest
import torch

import optimizers
from conftest import ROOT

CASES = [  # (ours, torch's, options)
    (optimizers.Adam, torch.optim.Adam, {}),
    (optimizers.Adam, torch.optim.Adam, {"weight_decay": 1e-2}),
    (optimizers.AdamW, torch.optim.AdamW, {"weight_decay": 0.05}),
    (optimizers.SGD, torch.optim.SGD, {}),
    (optimizers.SGD, torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-3}),
    (optimizers.SGD, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
]


def model_and_batches(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 3),
    )
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(30)]
    return model, batches


def train(model, optimizer, batches, lr0):
    for i, (x, y) in enumerate(batches):
        for group in optimizer.param_groups:  # as train.py sets it: a new lr every step
            group["lr"] = lr0 * (1 + i) / len(batches)
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def assert_same(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("ours,theirs,options", CASES)
def test_steps_match_torch_optim(ours, theirs, options):
    lr = 0.05 if ours is optimizers.SGD else 3e-3
    (a, batches), (b, _) = model_and_batches(), model_and_batches()
    train(a, ours(a.parameters(), lr=lr, **options), batches, lr)
    train(b, theirs(b.parameters(), lr=lr, **options), batches, lr)
    assert_same(a, b)


@pytest.mark.parametrize("ours,theirs,options", CASES)
def test_state_dict_moves_between_ours_and_torch_both_ways(ours, theirs, options):
    """Half a run with one, saved through torch.save (weights_only), the other half with the other:
    the same weights as a run with either alone."""
    lr = 0.05 if ours is optimizers.SGD else 3e-3
    whole, batches = model_and_batches()
    train(whole, ours(whole.parameters(), lr=lr, **options), batches, lr)
    for first, second in ((ours, theirs), (theirs, ours)):
        model, _ = model_and_batches()
        opt = first(model.parameters(), lr=lr, **options)
        train(model, opt, batches[:15], lr)
        buffer = io.BytesIO()
        torch.save(opt.state_dict(), buffer)
        buffer.seek(0)
        opt = second(model.parameters(), lr=lr, **options)
        opt.load_state_dict(torch.load(buffer, weights_only=True))
        train(model, opt, batches[15:], lr)
        # the lr schedule restarts in the second half here, in both runs alike
        reference, _ = model_and_batches()
        ref_opt = ours(reference.parameters(), lr=lr, **options)
        train(reference, ref_opt, batches[:15], lr)
        train(reference, ref_opt, batches[15:], lr)
        assert_same(model, reference)
    assert list(opt.state_dict()["param_groups"][0]) == list(
        theirs(whole.parameters(), lr=lr, **options).state_dict()["param_groups"][0]
    )


def test_a_saved_state_for_another_model_is_refused():
    model, _ = model_and_batches()
    opt = optimizers.Adam(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="another model"):
        opt.load_state_dict({"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]})


def test_build_optimizer_uses_torch_optim_when_compiled_and_for_the_rest():
    model, _ = model_and_batches()

    def build(name, compile=False):
        return type(optimizers.build_optimizer(model, name, 1e-3, compiled=compile))

    assert build("adam") is optimizers.Adam and build("sgd") is optimizers.SGD and build("adamw") is optimizers.AdamW
    assert build("adam", compile=True) is torch.optim.Adam
    assert build("radam") is torch.optim.RAdam and build("adadelta") is torch.optim.Adadelta


def test_training_does_not_import_dynamo():
    """The reason these exist: torch.optim imports torch._dynamo, over a second of every short run."""
    code = (
        "import sys, torch, optimizers\n"
        "m = torch.nn.Linear(3, 2)\n"
        "o = optimizers.build_optimizer(m, 'adam', 1e-3)\n"
        "m(torch.randn(4, 3)).sum().backward(); o.step(); o.zero_grad(); o.state_dict()\n"
        "print('torch._dynamo' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
