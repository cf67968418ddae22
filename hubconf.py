"""torch.hub entry points: one per model of models.py (`cnn-basic` is `cnn_basic`), with the shipped
weights for `cnn`, `vgg` and `resnet`.

    model = torch.hub.load("<owner>/<repo>", "cnn", pretrained=True)              # MNIST, 99.45 %
    model = torch.hub.load(".", "strided_deep", source="local", weights="fashion-mnist")   # Fashion-MNIST
    model = torch.hub.load(".", "resnet", source="local", width=64)               # untrained, any option
    model = torch.hub.load(".", "strided_wide_crop20", source="local", weights="runs/kaggle")   # your own run

A pretrained model takes images on 0..1 shaped (N, 1, 28, 28), white ink on black as in MNIST,
normalizes them as its training did, and returns logits in eval mode; `model.classes` names the
outputs (checkpoint.Normalized, which export.py's pt2 and ONNX files hold too). Without weights an entry
returns the plain model of models.get_model.
"""

import functools as _functools
import inspect as _inspect
import os as _os

import checkpoint as _checkpoint
import models as _models

dependencies = ["torch"]

_HERE = _os.path.dirname(_os.path.realpath(__file__))

# torch.hub imports this file with the repository put first on sys.path, but a module named `models`
# or `checkpoint` that the caller imported earlier wins over ours, and would build the wrong networks.
for _module in (_models, _checkpoint):
    if _os.path.dirname(_os.path.realpath(_module.__file__)) != _HERE:
        raise ImportError(
            f"another module named {_module.__name__!r} ({_module.__file__}) was imported before "
            f"this repository's; load the hub model in a process that has not imported it"
        )

# Shipped weights per entry, the default first; the accuracies are the test_acc of each file's last history row.
_SHIPPED = {
    "cnn": ("mnist",),
    "vgg": ("mnist-top",),
    "strided-deep": ("fashion-mnist",),
    "resnet": ("fashion-mnist-top",),
}
_ABOUT = {
    "mnist": "MNIST, 99.45 %",
    "mnist-top": "MNIST, 99.76 %",
    "fashion-mnist": "Fashion-MNIST, 92.91 % here, 93.39 % with evaluate.py's test-time augmentation",
    "fashion-mnist-top": "Fashion-MNIST, 94.53 %",
}


def _pretrained(name, weights, kwargs):
    path = _weights_path(name, weights)
    ckpt = _checkpoint.load_checkpoint(path)
    if ckpt["model"]["name"] != name:
        raise ValueError(
            f"{weights} holds a {ckpt['model']['name']} model, not {name}; load it with the "
            f"{ckpt['model']['name'].replace('-', '_')} entry"
        )
    built = {**_models.model_options(name), **ckpt["model"]["kwargs"]}
    for key, value in kwargs.items():
        if key not in built:
            raise ValueError(f"model {name!r} has no option {key!r}; it takes: {', '.join(sorted(built))}")
        if value != built[key]:
            raise ValueError(
                f"the {weights!r} weights are a {name} with {key}={built[key]!r}; leave {key} "
                f"out, or drop pretrained to build an untrained {name} with {key}={value!r}"
            )
    return _checkpoint.normalized_model(ckpt, path=path)[0]


def _weights_path(name, weights):
    """The checkpoint WEIGHTS names: a shipped one, or one of your own (a .pt file or a run folder of
    train.py), whose classes and normalization come with it."""
    if isinstance(weights, str) and weights not in _ABOUT and (weights.endswith(".pt") or _os.path.isdir(weights)):
        return _checkpoint.checkpoint_path(weights)
    shipped, entry = _SHIPPED.get(name, ()), name.replace("-", "_")
    if weights is None:
        if not shipped:
            raise ValueError(
                f"{entry} has no shipped weights; pretrained=True works for "
                f"{', '.join(e.replace('-', '_') for e in _SHIPPED)}, or leave it out for an untrained {entry}"
            )
        weights = shipped[0]
    if weights not in _ABOUT:
        raise ValueError(
            f"unknown weights {weights!r}; the shipped ones are {', '.join(map(repr, _ABOUT))}, "
            f"or give a checkpoint of your own (a .pt file or a run folder)"
        )
    if weights not in shipped:
        owner = next(e for e, names in _SHIPPED.items() if weights in names).replace("-", "_")
        raise ValueError(
            f"the {weights!r} weights belong to {owner}, not {entry}; "
            + (f"{entry} has {', '.join(map(repr, shipped))}" if shipped else f"{entry} has none")
        )
    return _os.path.join(_HERE, "weights", f"{weights}.pt")


def _entry(name):
    """The hub entry of a registry model: its own signature (functools.wraps), plus `pretrained` and
    `weights` for the shipped files."""
    build = _models.registered(name)
    shipped = _SHIPPED.get(name)

    @_functools.wraps(build)
    def entry(pretrained=False, *, weights=None, **kwargs):
        if pretrained or weights is not None:
            return _pretrained(name, weights, kwargs)
        return _models.get_model(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name.replace("-", "_")
    entry.__module__ = __name__
    P = _inspect.Parameter  # what help() and editors show: pretrained, weights, then the model's own arguments
    entry.__signature__ = _inspect.Signature(
        [P("pretrained", P.POSITIONAL_OR_KEYWORD, default=False), P("weights", P.KEYWORD_ONLY, default=None)]
        + [p.replace(kind=P.KEYWORD_ONLY) for p in _inspect.signature(build).parameters.values()]
    )
    options = ", ".join(f"{k}={v!r}" for k, v in _models.model_options(name).items()) or "none"
    listed = "; ".join(f"{w!r} ({_ABOUT[w]})" for w in shipped) if shipped else ""
    entry.__doc__ = "\n".join(
        [
            _models.describe(name),
            "",
            f"Options: {options}; in_channels=1, num_classes=10.",
            (
                f"Pretrained weights (the model takes images on 0..1, (N, 1, 28, 28)): {listed}; pretrained=True loads "
                f"{shipped[0]!r}, weights=NAME any of them."
                if shipped
                else "No shipped weights: pretrained=True raises ValueError."
            ),
        ]
    )
    return entry


for _model_name in _models.list_models():
    _fn = _entry(_model_name)
    globals()[_fn.__name__] = _fn
del _model_name, _fn, _module
