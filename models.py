"""Every architecture of the toolkit, in one registry. Needs only torch, so it can be copied out alone.

    python models.py                  # name, parameters and a one-line description of each model
    python models.py --summary tiny   # layer-by-layer output shapes and parameter counts

    from models import get_model, list_models
    model = get_model("cnn", in_channels=1, num_classes=10)   # returns logits

A family is one class with explicit arguments; each registered name is the class itself (a family of
one) or a small function that calls it with a variant's settings. The options a user may set (width,
depth, dropout) are declared once, in OPTIONS, and train.py's flags, the checkpoint check and the
torch.hub entries all read them from there. Parameter counts are for 1x28x28 inputs and 10 classes;
tests/test_models.py checks each against the count printed by the notebook it comes from. (The
command line, `python models.py`, uses cli.py beside this file.)
"""

import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn


class ModelError(ValueError):
    """An unknown model name or option; the message says what is valid."""

    user_error, code = True, 2  # cli.run prints the message as it is, exit 2


@dataclass(frozen=True)
class Option:
    """A model argument users may set: its type, its range (high excluded when `open_high`) and what it does."""

    kind: type
    low: float
    high: float
    help: str
    open_high: bool = False

    def problem(self, value):
        """Why VALUE is not a valid setting, or None."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return "must be a number"
        if self.kind is int and not isinstance(value, int):  # 2.0 too: a layer's size is an int
            return "must be a whole number"
        above = value >= self.high if self.open_high else value > self.high
        if value < self.low or above:
            return f"must be from {self.low:g} to {self.high:g}{' (excluded)' if self.open_high else ''}"
        return None


# The options a model may take besides in_channels and num_classes. Bounds far above any real model, so
# that a typo or a damaged checkpoint cannot ask for terabytes; checkpoint.py also sizes the whole model.
OPTIONS = {
    "width": Option(int, 1, 1024, "maps in the first stage"),
    "depth": Option(int, 1, 64, "blocks per stage"),
    "dropout": Option(float, 0, 1, "dropout probability before the classifier", open_high=True),
}
SHAPE_LIMITS = {"in_channels": 64, "num_classes": 100_000}  # what get_model accepts for the data's shape

_REGISTRY = {}


def register(name):
    """Decorator that adds a model (a class, or a function that builds one) under `name`; a name can
    be registered only once."""

    def add(build):
        if name in _REGISTRY:
            raise ModelError(f"model name {name!r} is already registered (by {_REGISTRY[name].__name__})")
        _REGISTRY[name] = build
        return build

    return add


def list_models():
    return sorted(_REGISTRY)


def registered(name):
    """The class or function registered under NAME."""
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _REGISTRY[name]


def model_options(name):
    """The keyword arguments a model takes besides in_channels and num_classes, with defaults."""
    params = inspect.signature(_REGISTRY[name]).parameters.values()
    return {p.name: p.default for p in params if p.name not in ("self", "in_channels", "num_classes")}


def option_problem(key, value):
    """Why VALUE is not a valid setting of the model argument KEY (an option, in_channels or
    num_classes), as words to follow it ("must be from 1 to 1024"), or None."""
    option = OPTIONS.get(key) or (Option(int, 1, SHAPE_LIMITS[key], key) if key in SHAPE_LIMITS else None)
    return "is not a model argument" if option is None else option.problem(value)


def get_model(name, **kwargs):
    registered(name)  # or the one line that names the models there are
    allowed = set(model_options(name)) | set(SHAPE_LIMITS)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ModelError(f"model {name!r} has no option {unknown[0]!r}; it takes: {', '.join(sorted(allowed))}")
    for key, value in kwargs.items():
        problem = option_problem(key, value)
        if problem:
            raise ModelError(f"model {name!r}: {key}={value!r} {problem}")
    return _REGISTRY[name](**kwargs)


def describe(name):
    return (_REGISTRY[name].__doc__ or "").strip().splitlines()[0]


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def conv_bn(cin, cout, kernel=3, padding=1, bias=False):
    """Conv, BatchNorm, ReLU. The conv needs no bias: BatchNorm's shift takes its place."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=padding, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


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
            nn.Conv2d(in_channels, 16, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 5, padding=2),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 32, 7, 7) -> (B, 1568)
            nn.Linear(32 * 7 * 7, 100),
            nn.ReLU(inplace=True),
            nn.Linear(100, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("cnn-basic")
class CNNBasic(nn.Module):
    """Valid 5x5 and 3x3 convs (16, 32) with max-pool, FC 128, He init; notebook 001 'CNN'."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(16, 32, 3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 12 -> 10 -> 5
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 32, 5, 5) -> (B, 800)
            nn.Linear(800, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
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
            nn.Conv2d(in_channels, 32, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 64, 7, 7) -> (B, 3136)
            nn.Linear(3136, 256),
            nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
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
            conv_bn(32, 64, 5, padding=2, bias=True),
            nn.MaxPool2d(2),  # 28 -> 14
            conv_bn(64, 128, 5, padding=2, bias=True),
            nn.MaxPool2d(3, stride=1),  # 14 -> 12
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 128, 12, 12) -> (B, 18432)
            nn.Dropout(dropout),
            nn.Linear(128 * 12 * 12, num_classes),
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
            nn.Conv2d(in_channels, 32, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 24 -> 12
            nn.Conv2d(32, 64, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 12 -> 8 -> 4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 64, 4, 4) -> (B, 1024)
            nn.Linear(1024, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
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
            nn.Conv2d(in_channels, 6, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 32 -> 28 -> 14
            nn.Conv2d(6, 16, 5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14 -> 10 -> 5
            nn.Conv2d(16, 120, 5),
            nn.ReLU(inplace=True),  # 5 -> 1
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 120, 1, 1) -> (B, 120)
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


@register("tiny")
class Tiny(nn.Module):
    """Under 10k parameters: 3x3 conv-BN-ReLU (4-24 channels), global average pool; notebook 004."""

    def __init__(self, in_channels=1, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(in_channels, 4),
            conv_bn(4, 8),
            nn.MaxPool2d(2),  # 28 -> 14
            conv_bn(8, 16, padding=0),
            conv_bn(16, 20, padding=0),  # 14 -> 12 -> 10
            nn.Conv2d(20, 24, 3, bias=False),  # 10 -> 8
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 24, 8, 8) -> (B, 24)
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
            conv_bn(in_channels, 8),
            conv_bn(8, 16),
            nn.MaxPool2d(2),  # 28 -> 14
            conv_bn(16, 16, padding=0),
            conv_bn(16, 16, padding=0),  # 14 -> 12 -> 10
            conv_bn(16, 20, padding=0),  # 10 -> 8
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 20, 8, 8) -> (B, 20)
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
        # On a CPU a 1-channel 28x28 input makes the first conv memory-bound, so it
        # stays narrow and pools at once; BatchNorm at full resolution cost more time than it saved
        # in epochs, and one 5x5 conv beat two 3x3 ones at equal accuracy.
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 28 -> 14
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14 -> 7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),  # (B, 16, 7, 7) -> (B, 784)
            nn.Linear(16 * 7 * 7, 64),
            nn.ReLU(inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class Strided(nn.Module):
    """The CPU speed family: a 6x6 stride-2 conv, optionally a 3x3 conv at 14 px, max-pool to 7 px,
    a 3x3 conv-BN at 7 px, FC. With `crop`, the model reads only the centre of its input."""

    def __init__(self, in_channels=1, num_classes=10, maps=16, maps14=0, maps7=48, hidden=64, crop=0):
        super().__init__()
        # The stride-2 first conv works at 14x14, a quarter of the cost of a 28x28 one with the same
        # reach (it equals folding 2x2 pixels into channels before a 3x3 conv, without the copy).
        # Pooling comes before ReLU and BatchNorm where it can, so that they run on a quarter of the
        # values; BatchNorm on the conv at 7 px allows a high learning rate. results/README.md has
        # the measurements behind each choice.
        self.crop = crop
        side = (28 - 2 * crop) // 4  # 28 -> 14 -> 7; 24 -> 12 -> 6 with crop=2; 20 -> 10 -> 5 with crop=4
        if maps14:
            stem = [
                nn.Conv2d(in_channels, maps, 6, stride=2, padding=2),
                nn.ReLU(inplace=True),
                nn.Conv2d(maps, maps14, 3, padding=1, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(maps14),
                nn.ReLU(inplace=True),
            ]
        else:
            stem = [nn.Conv2d(in_channels, maps, 6, stride=2, padding=2), nn.MaxPool2d(2), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(
            *stem,
            nn.Conv2d(maps14 or maps, maps7, 3, padding=1, bias=False),
            nn.BatchNorm2d(maps7),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Linear(maps7 * side * side, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        if self.crop:  # MNIST's digits sit in a 20x20 box near the centre; the rim is nearly always blank
            x = x[..., self.crop : -self.crop, self.crop : -self.crop]
        # Flattened in (h, w, c) order: on a channels-last tensor that is a view, and its gradient
        # keeps the layout; (c, h, w) order copies, and the ReLU behind it then runs backward on
        # mismatched layouts, a sizeable share of a CPU step.
        return self.classifier(self.features(x).permute(0, 2, 3, 1).flatten(1))


@register("strided")
def strided(in_channels=1, num_classes=10):
    """Built for one epoch on a CPU: a 6x6 stride-2 conv (16), max-pool, 3x3 conv-BN (48), FC 64."""
    return Strided(in_channels, num_classes, maps=16, maps7=48, hidden=64)


@register("strided-wide")
def strided_wide(in_channels=1, num_classes=10):
    """`strided` with 32 and 64 maps and FC 128."""
    return Strided(in_channels, num_classes, maps=32, maps7=64, hidden=128)


@register("strided-deep")
def strided_deep(in_channels=1, num_classes=10):
    """Built for 5 epochs on a CPU: 6x6 stride-2 conv (32), 3x3 conv (32), pool, BN, conv-BN (64), FC 128."""
    return Strided(in_channels, num_classes, maps=32, maps14=32, maps7=64, hidden=128)


@register("strided-crop")
def strided_crop(in_channels=1, num_classes=10):
    """`strided` on the central 24x24 pixels, where MNIST's digits are: 0.73x the work."""
    return Strided(in_channels, num_classes, maps=16, maps7=48, hidden=64, crop=2)


@register("strided-wide-crop")
def strided_wide_crop(in_channels=1, num_classes=10):
    """`strided-wide` on the central 24x24 pixels: 0.73x the work."""
    return Strided(in_channels, num_classes, maps=32, maps7=64, hidden=128, crop=2)


@register("strided-crop20")
def strided_crop20(in_channels=1, num_classes=10):
    """`strided` on the central 20x20 pixels, MNIST's digit box: 0.51x the work (recipes/fast.args)."""
    return Strided(in_channels, num_classes, maps=16, maps7=48, hidden=64, crop=4)


@register("strided-wide-crop20")
def strided_wide_crop20(in_channels=1, num_classes=10):
    """`strided-wide` on the central 20x20 pixels: 0.51x the work (recipes/strong.args)."""
    return Strided(in_channels, num_classes, maps=32, maps7=64, hidden=128, crop=4)


class VGG(nn.Module):
    """VGG-style: three stages of two 3x3 conv-BN-ReLU (w, 2w, 4w maps), global average pool."""

    def __init__(self, in_channels=1, num_classes=10, width=32, dropout=0.0):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w),
            conv_bn(w, w),
            nn.MaxPool2d(2),  # 28 -> 14
            conv_bn(w, 2 * w),
            conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),  # 14 -> 7
            conv_bn(2 * w, 4 * w),
            conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 4w, 7, 7) -> (B, 4w)
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


class ResNet(nn.Module):
    """Pre-activation ResNet: `depth` blocks at each of 28, 14 and 7 px (w, 2w, 4w maps), average pool."""

    def __init__(self, in_channels=1, num_classes=10, width=32, depth=2, dropout=0.0):
        super().__init__()
        w, layers = width, []
        for stage, (cin, cout) in enumerate([(w, w), (w, 2 * w), (2 * w, 4 * w)]):
            for block in range(depth):
                layers.append(PreActBlock(cin if block == 0 else cout, cout, 2 if stage and not block else 1))
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            *layers,  # 28 -> 14 -> 7
            nn.BatchNorm2d(4 * w),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # -> (B, 4w)
        )
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register("vgg")
def vgg(in_channels=1, num_classes=10, width=32, dropout=0.0):
    """VGG-style: three stages of two 3x3 conv-BN-ReLU (w, 2w, 4w maps), global average pool."""
    return VGG(in_channels, num_classes, width, dropout)


@register("resnet")
def resnet(in_channels=1, num_classes=10, width=32, depth=2, dropout=0.0):
    """Pre-activation ResNet: `depth` blocks at each of 28, 14 and 7 px (w, 2w, 4w maps), average pool."""
    return ResNet(in_channels, num_classes, width, depth, dropout)


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


def main(argv=None):
    """`python models.py`: the model table, or one model's layers; errors and closed pipes as every command."""
    from cli import run  # the command line only; the library above needs torch alone

    return run(list_or_summarise, sys.argv[1:] if argv is None else argv)


def list_or_summarise(argv):
    from cli import Parser

    parser = Parser(prog="models.py", description="List the registered models, or summarise one.")
    parser.add_argument("--summary", metavar="NAME", help="print each layer's output shape and parameters")
    args = parser.parse_args(argv)
    if args.summary:
        registered(args.summary)  # ModelError: one line, exit 2
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
