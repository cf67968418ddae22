"""Every architecture of the toolkit, in one registry. Needs only torch, so it can be copied out alone.

    python models.py                  # name, parameters and a one-line description of each model
    python models.py --summary tiny   # layer-by-layer output shapes and parameter counts

    from models import get_model, list_models
    model = get_model("cnn", in_channels=1, num_classes=10)   # returns logits

Parameter counts are for 1x28x28 inputs and 10 classes; tests/test_models.py checks each against
the count printed by the notebook it comes from.
"""
import argparse
import inspect
import os
import sys

import torch
from torch import nn


class ModelError(ValueError):
    """An unknown model name or option; the message says what is valid."""


_REGISTRY = {}


def register(name):
    """Class decorator that adds a model under `name`; a name can be registered only once."""
    def add(cls):
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is already registered (by {_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        return cls
    return add


def list_models():
    return sorted(_REGISTRY)


def model_options(name):
    """The keyword arguments a model takes besides in_channels and num_classes, with defaults."""
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name: p.default for p in params if p.name not in ("self", "in_channels", "num_classes")}


def get_model(name, **kwargs):
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    allowed = set(model_options(name)) | {"in_channels", "num_classes"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ModelError(f"model {name!r} has no option {unknown[0]!r}; it takes: {', '.join(sorted(allowed))}")
    return _REGISTRY[name](**kwargs)


def describe(name):
    return (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def conv_bn(cin, cout, kernel=3, padding=1, bias=False):
    """Conv, BatchNorm, ReLU. The conv needs no bias: BatchNorm's shift takes its place."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def kaiming_init(model):
    """He-normal weights for every conv and linear layer, as notebook 001 does by hand.

    The last linear layer feeds no ReLU, so it gets the 'linear' gain (notebook 001's fc2).
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers:
        nn.init.kaiming_normal_(m.weight, nonlinearity="linear" if m is layers[-1] else "relu")


# ---------------------------------------------------------------------------------------------
# The notebooks' models
# ---------------------------------------------------------------------------------------------

@register("cnn")
class CNN(nn.Module):
    """Two 5x5 'same' convs (16, 32) with max-pool, FC 100; notebook 000 (RAdam, 99.31 %)."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        # The notebook's code omits padding=2, but its printed model and fc1 (32*7*7) need it.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 32, 7, 7) -> (B, 1568)
            nn.Linear(32 * 7 * 7, 100), nn.ReLU(inplace=True), nn.Linear(100, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("cnn-basic")
class CNNBasic(nn.Module):
    """Valid 5x5 and 3x3 convs (16, 32) with max-pool, FC 128, He init; notebook 001 'CNN'."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(16, 32, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),           # 12 -> 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 32, 5, 5) -> (B, 800)
            nn.Linear(800, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes),
        )
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.features(x))


@register("cnn2")
class CNN2(nn.Module):
    """Two 5x5 'same' convs (32, 64) with max-pool, FC 256, He init; notebook 001 'CNN2'."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 64, 7, 7) -> (B, 3136)
            nn.Linear(3136, 256), nn.ReLU(inplace=True), nn.Linear(256, num_classes),
        )
        kaiming_init(self)

    def forward(self, x):
        return self.classifier(self.features(x))


@register("cnn3")
class CNN3(nn.Module):
    """Four 5x5 conv-BN-ReLU blocks (16-128), dropout, one FC; notebook 001 'CNN3' (Fashion 87 %)."""

    def __init__(self, in_channels=1, num_classes=10, dropout=0.05):
        super().__init__()
        # The notebook's convs keep a bias before BatchNorm: redundant, but kept to match its size.
        self.features = nn.Sequential(
            conv_bn(in_channels, 16, 5, padding=2, bias=True),
            conv_bn(16, 32, 5, padding=2, bias=True),
            conv_bn(32, 64, 5, padding=2, bias=True), nn.MaxPool2d(2),           # 28 -> 14
            conv_bn(64, 128, 5, padding=2, bias=True), nn.MaxPool2d(3, stride=1),  # 14 -> 12
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 128, 12, 12) -> (B, 18432)
            nn.Dropout(dropout), nn.Linear(128 * 12 * 12, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("convnet")
class ConvNet(nn.Module):
    """Valid 5x5 convs (32, 64) with max-pool, FC 128, optional dropout; notebook 002 E1/E2."""

    def __init__(self, in_channels=1, num_classes=10, dropout=0.0):
        super().__init__()
        # E2's forward returns one tensor while its loop unpacks two; this returns the logits.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(32, 64, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),           # 12 -> 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 64, 4, 4) -> (B, 1024)
            nn.Linear(1024, 128), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("lenet5")
class LeNet5(nn.Module):
    """LeNet-5 (6, 16, 120 maps; FC 84) on the image padded to 32x32; notebook 003."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        # padding=2 on the first conv is the classic 28x28 -> 32x32 zero padding.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 32 -> 28 -> 14
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),                     # 14 -> 10 -> 5
            nn.Conv2d(16, 120, 5), nn.ReLU(inplace=True),                                   # 5 -> 1
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 120, 1, 1) -> (B, 120)
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("tiny")
class Tiny(nn.Module):
    """Under 10k parameters: 3x3 conv-BN-ReLU (4-24 channels), global average pool; notebook 004."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, 4), conv_bn(4, 8), nn.MaxPool2d(2),   # 28 -> 14
            conv_bn(8, 16, padding=0), conv_bn(16, 20, padding=0),     # 14 -> 12 -> 10
            nn.Conv2d(20, 24, 3, bias=False),                          # 10 -> 8
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                     # (B, 24, 8, 8) -> (B, 24)
        )
        # The notebook stacks its two linear layers with nothing between; a ReLU makes the second count.
        self.classifier = nn.Sequential(nn.Linear(24, 32), nn.ReLU(inplace=True), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register("tiny2")
class Tiny2(nn.Module):
    """Under 10k parameters: 3x3 conv-BN-ReLU (8-20 channels), GAP, one linear; notebook 004's next step."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        # The notebook planned to drop the linear layers next. In tiny they and its last conv hold 5.4k
        # of 9.9k parameters, behind a 4-map first layer that every later feature is built from; here
        # they go to 8 and 16 maps at full resolution, and one linear layer reads the pooled 20 maps.
        self.features = nn.Sequential(
            conv_bn(in_channels, 8), conv_bn(8, 16), nn.MaxPool2d(2),    # 28 -> 14
            conv_bn(16, 16, padding=0), conv_bn(16, 16, padding=0),      # 14 -> 12 -> 10
            conv_bn(16, 20, padding=0),                                  # 10 -> 8
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                       # (B, 20, 8, 8) -> (B, 20)
        )
        self.classifier = nn.Linear(20, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------------
# Models of this toolkit
# ---------------------------------------------------------------------------------------------

@register("fast")
class Fast(nn.Module):
    """Built for time to accuracy on a CPU: convs of 8 and 16 maps, FC 64, no BatchNorm (52k)."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        # Measured on a 2-core CPU: a 1-channel 28x28 input makes the first conv memory-bound, so it
        # stays narrow and pools at once; BatchNorm at full resolution cost more time than it saved
        # in epochs, and one 5x5 conv beat two 3x3 ones at equal accuracy.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),           # 14 -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 16, 7, 7) -> (B, 784)
            nn.Linear(16 * 7 * 7, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("strided")
class Strided(nn.Module):
    """Built for one epoch on a CPU: a 6x6 stride-2 conv (16), max-pool, 3x3 conv-BN (48), FC 64."""
    maps, hidden = (16, 48), 64

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        # Measured on a 2-core CPU: the stride-2 first conv works at 14x14, a quarter of the cost of a
        # 28x28 one with the same reach (it equals folding 2x2 pixels into channels before a 3x3
        # conv, without the copy); pooling before the ReLU runs the ReLU on a quarter of the values;
        # BatchNorm on the second conv allowed twice the learning rate (one epoch gained 0.1 %), on
        # the first it only cost time.
        self.features = self.make_features(in_channels, *self.maps)
        self.classifier = nn.Sequential(
            nn.Linear(self.maps[-1] * 7 * 7, self.hidden), nn.ReLU(inplace=True), nn.Linear(self.hidden, num_classes),
        )

    @staticmethod
    def make_features(in_channels, c1, c2):
        return nn.Sequential(
            nn.Conv2d(in_channels, c1, 6, stride=2, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True),  # 28 -> 14 -> 7
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
        )

    def forward(self, x):
        # Flattened in (h, w, c) order: on a channels-last tensor that is a view, and its gradient
        # keeps the layout; (c, h, w) order copies, and the ReLU behind it then runs backward on
        # mismatched layouts (10-15 % of a step on a CPU).
        return self.classifier(self.features(x).permute(0, 2, 3, 1).flatten(1))


@register("strided-wide")
class StridedWide(Strided):
    """`strided` with 32 and 64 maps and FC 128."""
    maps, hidden = (32, 64), 128


@register("strided-deep")
class StridedDeep(StridedWide):
    """Built for 5 epochs on a CPU: 6x6 stride-2 conv (32), 3x3 conv (32), pool, BN, conv-BN (64), FC 128."""

    @staticmethod
    def make_features(in_channels, c1, c2):
        # BatchNorm after the pool works on a quarter of the values: before it, its backward pass was
        # 29 % of a step on a CPU, and the step 1.3x as long.
        return nn.Sequential(
            nn.Conv2d(in_channels, c1, 6, stride=2, padding=2), nn.ReLU(inplace=True),            # 28 -> 14
            nn.Conv2d(c1, c1, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),   # 7 x 7
        )


@register("vgg")
class VGG(nn.Module):
    """VGG-style: three stages of two 3x3 conv-BN-ReLU (w, 2w, 4w maps), global average pool."""

    def __init__(self, in_channels=1, num_classes=10, width=32, dropout=0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w), conv_bn(w, w), nn.MaxPool2d(2),             # 28 -> 14
            conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),           # 14 -> 7
            conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),                               # (B, 4w, 7, 7) -> (B, 4w)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv twice, added to the input (He et al. 2016, 'Identity mappings'); a 1x1 conv
    carries the input across a change of width or stride."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(torch.relu(self.bn2(out))) + skip


@register("resnet")
class ResNet(nn.Module):
    """Pre-activation ResNet: `depth` blocks at each of 28, 14 and 7 px (w, 2w, 4w maps), average pool."""

    def __init__(self, in_channels=1, num_classes=10, width=32, depth=2, dropout=0.0):
        super().__init__()
        w, layers = width, []
        for stage, (cin, cout) in enumerate([(w, w), (w, 2 * w), (2 * w, 4 * w)]):
            for block in range(depth):
                layers.append(PreActBlock(cin if block == 0 else cout, cout, 2 if stage and not block else 1))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), *layers,               # 28 -> 14 -> 7
            nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # -> (B, 4w)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def summary(model, input_size=(1, 28, 28)):
    """Rows of (layer, output shape, parameters) for every leaf module, found with forward hooks."""
    rows, hooks = [], []
    for name, module in model.named_modules():
        if not list(module.children()):
            def hook(mod, _inp, out, name=name):
                own = sum(p.numel() for p in mod.parameters(recurse=False))
                rows.append((f"{name} ({type(mod).__name__})", tuple(out.shape[1:]), own))
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return rows


def print_summary(name):
    model = get_model(name)
    rows = summary(model)
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'layer':<{width}}{'output shape':<18}{'params':>10}")
    for layer, shape, n in rows:
        print(f"{layer:<{width}}{str(list(shape)):<18}{n:>10,}")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"total params: {count_params(model):,}  (trainable {trainable:,})")


class OneLineParser(argparse.ArgumentParser):
    """Reports a bad argument in one line, without the usage block, like the other scripts."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
    try:
        return list_or_summarise(argv)
    except BrokenPipeError:   # piped into `head`: stop quietly, and leave the final flush nowhere to fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def list_or_summarise(argv):
    parser = OneLineParser(prog="models.py", description="List the registered models, or summarise one.")
    parser.add_argument("--summary", metavar="NAME", help="print each layer's output shape and parameters")
    args = parser.parse_args(argv)
    if args.summary:
        if args.summary not in _REGISTRY:
            print(f"models.py: error: unknown model {args.summary!r}; choose one of: "
                  f"{', '.join(list_models())}", file=sys.stderr)
            return 2
        print_summary(args.summary)
        return 0
    names = [f"`{name}`" for name in list_models()]
    width = max(len(n) for n in names)
    print(f"| {'name':<{width}} | {'params':>9} | description |")
    print(f"|{'-' * (width + 2)}|{'-' * 11}|-------------|")
    for label, name in zip(names, list_models()):
        print(f"| {label:<{width}} | {count_params(get_model(name)):>9,} | {describe(name)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
