"""Train a registry model on an MNIST-style dataset, on CPU, CUDA or MPS.

    python train.py --model cnn --epochs 5 --device mps
    python train.py @recipes/fast.args --seed 1                 # a recipe file; later flags override it
    python train.py --model tiny --dataset fashion-mnist --data-dir DIR --val 5000
    python train.py --resume runs/mnist-cnn-20261122-101500      # continue where it stopped

Writes DIR/log.csv (a row per epoch), DIR/args.json (the resolved flags), DIR/last.pt after every
epoch, and DIR/best.pt (by validation accuracy) when --val is set. DIR is --out, or
runs/<dataset>-<model>-<time>. Under torchrun it trains with DDP, --batch-size being the global batch:

    torchrun --standalone --nproc_per_node=4 train.py --model cnn --batch-size 512
"""
import argparse
import importlib.util
import json
import os
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import distributed
from checkpoint import checkpoint_path, load_checkpoint, model_kwargs
from cli import Parser, UserError, non_negative, positive
from device import autocast_for, keep_freed_memory, resolve_amp
from files import WriteError
from data import DATASETS, Augment, Batches, DatasetInfo, dataset_info, load_split, normalization, split_off_val
from loop import (DEFAULT_LR, Run, Stop, empty_partial, epoch_scalars, evaluate_splits, open_tensorboard, save, say,
                  train_one_epoch)
from models import OPTIONS, count_params, get_model, list_models, model_options, option_problem
from optimizers import build_optimizer
from runlog import (append_row, epoch_line, keep_steps, lock_folder, log_columns, prepare_out, read_run_args,
                    release_folders, rewrite_log, start_steps, write_args)

# Flags a resumed run may change; every other flag must match the checkpoint's.
RESUME_MAY_CHANGE = {"epochs", "device", "data_dir", "resume", "debug", "save_every", "compile", "progress",
                     "log_every", "tensorboard", "eval_every", "out", "overwrite"}


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------

def build_parser():
    p = Parser(prog="train.py", description="Train a model from models.py on an MNIST-style dataset. "
               "@FILE reads flags from a file, such as recipes/fast.args; flags after it override it.")
    add_data_flags(p.add_argument_group("model and data"))
    add_optimization_flags(p.add_argument_group("optimization"))
    add_regularization_flags(p.add_argument_group("regularization"))
    add_run_flags(p)
    return p


def add_data_flags(g):
    g.add_argument("--model", default="cnn", choices=list_models(), help="architecture (default: cnn)")
    for name, option in OPTIONS.items():   # declared once, in models.py
        having = ", ".join(m for m in list_models() if name in model_options(m))
        g.add_argument(f"--{name}", type=model_option(name), help=f"{option.help}, for {having} (default: the "
                       f"model's own)")
    g.add_argument("--dataset", default="mnist", choices=list(DATASETS), help="(default: mnist)")
    g.add_argument("--data-dir", help="folder holding the IDX files, flat or as <Name>/raw/ "
                   "(default: search ./data, then download)")
    g.add_argument("--norm", default="dataset", choices=["dataset", "mnist", "unit", "raw"],
                   help="input scaling: the dataset's own mean/std, MNIST's mean/std, 0..1, or raw 0..255 "
                   "pixels as notebook 002 fed them (default: dataset)")
    g.add_argument("--val", type=non_negative(int), default=0, help="hold out N training images for "
                   "validation, chosen by N alone (default: 0, train on all)")
    g.add_argument("--subset", type=non_negative(int), default=0, help="use only the first N training and "
                   "test images, for quick checks (default: 0, all)")


def add_optimization_flags(g):
    g.add_argument("--epochs", type=positive(int), default=5, help="(default: 5)")
    g.add_argument("--batch-size", type=positive(int), default=128, help="(default: 128)")
    g.add_argument("--drop-last", action="store_true", help="drop the last, smaller batch of each epoch")
    g.add_argument("--optimizer", default="adam", choices=list(DEFAULT_LR),
                   help="(default: adam; radam uses decoupled weight decay, as notebook 000)")
    g.add_argument("--lr", type=positive(float), help="peak learning rate (default: 0.01 for sgd, 3e-3 for the "
                   "adam family, 1.0 for adadelta)")
    g.add_argument("--momentum", type=non_negative(float), default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum for SGD")
    g.add_argument("--weight-decay", type=non_negative(float), default=0.0,
                   help="the optimizer's weight decay (default: 0)")
    g.add_argument("--scheduler", default="cosine", choices=["none", "step", "exp", "cosine", "onecycle"],
                   help="learning-rate schedule, set every step (default: cosine)")
    g.add_argument("--gamma", type=positive(float), default=0.1, help="decay factor per epoch for exp, per "
                   "--step-size epochs for step (default: 0.1)")
    g.add_argument("--step-size", type=positive(int), default=5, help="epochs between step decays (default: 5)")
    g.add_argument("--warmup", type=non_negative(float), default=0.0,
                   help="epochs of linear warm-up in front of any schedule (default: 0)")
    g.add_argument("--clip-grad", type=non_negative(float), default=0.0,
                   help="clip the gradient norm to this value (default: 0, off)")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, shuffling and augmentation (default: 0)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: the same seed gives identical logs on CPU")


def add_regularization_flags(g):
    g.add_argument("--label-smoothing", type=non_negative(float), default=0.0, help="(default: 0)")
    g.add_argument("--l1", type=non_negative(float), default=0.0,
                   help="L1 penalty: adds L1 * sum|w| to the loss (notebook 002's lambda1; default: 0)")
    g.add_argument("--l2", type=non_negative(float), default=0.0,
                   help="L2 penalty: adds L2 * sum w^2 to the loss, apart from --weight-decay (default: 0)")
    g.add_argument("--augment", action="store_true",
                   help="random affine on the device: rotation, translation, scale (see the next three)")
    g.add_argument("--rotate", type=non_negative(float), default=10.0, help="max rotation, degrees (default: 10)")
    g.add_argument("--translate", type=non_negative(float), default=0.1,
                   help="max shift, fraction of the side (default: 0.1)")
    g.add_argument("--scale", type=non_negative(float), default=0.1, help="max zoom in or out (default: 0.1)")
    g.add_argument("--erase", type=non_negative(float), default=0.0,
                   help="probability of random erasing per image (default: 0)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips (default: on with --augment for fashion-mnist, off for digits)")
    for flag, what in (("stroke", "thicker or thinner strokes (2x2 dilation or erosion, blended in by up to S)"),
                       ("blur", "Gaussian blur (sigma 1, blended in by up to S)"),
                       ("lowres", "a round trip through 14, 12 or 10 pixels a side (S: how far down)"),
                       ("elastic", "a smooth random warp of up to 3*S pixels")):
        g.add_argument(f"--{flag}", type=chance_and_strength, default=[0.0, 0.0], metavar="P[:S]",
                       help=f"with probability P per image, {what}; strength S in 0..1 (default: 1). For "
                       f"digits that are not MNIST's: photos, scans, other pens (default: off)")
    g.add_argument("--ema", type=non_negative(float), default=0.0,
                   help="keep an exponential moving average of the weights with this decay, e.g. 0.999; "
                   "it is evaluated and saved beside the raw weights (default: 0, off)")


def add_run_flags(p):
    g = p.add_argument_group("stopping and evaluation")
    g.add_argument("--stop-loss", type=positive(float), help="stop once an epoch's mean training loss "
                   "(penalties included) falls below this (notebook 002: 0.38)")
    g.add_argument("--stop-val-acc", type=positive(float), help="stop once validation accuracy (%%) reaches this")
    g.add_argument("--patience", type=positive(int), help="stop after this many epochs without a lower "
                   "validation loss")
    g.add_argument("--eval-untrained", action="store_true", help="evaluate the untrained model first "
                   "(epoch 0 in the log), as notebook 001 does")
    g.add_argument("--eval-every", type=non_negative(int), default=1, metavar="N",
                   help="score the validation and test sets every N epochs, and always after the last; 0: after "
                   "the last only, which saves their time in short runs (default: 1)")
    g.add_argument("--tta", action="store_true", help="score with test-time augmentation: the softmax averaged over "
                   "the image shifted one pixel each way (and mirrored where that keeps the class); evaluate.py "
                   "then does the same for this run's checkpoints")
    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto, an "
                   "accelerator when present)")
    g.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"],
                   help="mixed precision: auto takes bf16 where the device computes it natively (recent GPUs, "
                   "CPUs with AMX or AVX512-BF16) and fp32 elsewhere; fp16 adds a gradient scaler. The "
                   "choice is recorded, and a resumed run keeps it (default: auto)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints stay plain)")
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory layout; auto turns it on where it measured faster: CPU, and CUDA "
                   "with --amp (default: auto)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<dataset>-<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    g.add_argument("--resume", metavar="DIR_OR_CKPT", help="continue a run from its last.pt, in its own folder; "
                   "any other checkpoint (best.pt, a copy) continues in a new folder given with --out")
    g.add_argument("--save-every", type=non_negative(int), default=0,
                   help="also save last.pt every N steps inside an epoch (default: 0, at epoch ends only)")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress line during epochs: in place on a terminal, every 30 s otherwise (default: auto)")
    g.add_argument("--log-every", type=non_negative(int), metavar="N",
                   help="a row of steps.csv every N steps: loss and accuracy over those steps, lr, speed "
                   "(default: about 20 rows an epoch; 0: none)")
    g.add_argument("--tensorboard", action="store_true", help="also write the step and epoch figures to "
                   "DIR/tb/ for TensorBoard (needs: pip install tensorboard)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")


def model_option(name):
    """argparse type for a model option of models.OPTIONS: its kind and its range."""
    option = OPTIONS[name]

    def parse(text):
        try:
            value = option.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if option.kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        problem = option_problem(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    parse.__name__ = f"{name} value"
    return parse


def chance_and_strength(text):
    """argparse type for P or P:S, a probability and a strength, both in 0..1 (S defaults to 1)."""
    try:
        p, _, strength = text.partition(":")
        value = [float(p), float(strength) if strength else 1.0]   # a list: what args.json gives back
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P or P:S (probability and strength), got {text!r}") from None
    if not all(0 <= v <= 1 for v in value):
        raise argparse.ArgumentTypeError(f"P and S must be between 0 and 1, got {text!r}")
    return value


def check_args(args):
    """Cross-flag checks that argparse cannot do alone."""
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard", 2)
    def bad(message):
        raise UserError(message, 2)
    for option in OPTIONS:
        if getattr(args, option) is not None and option not in model_options(args.model):
            bad(f"--{option}: model {args.model!r} has no {option} option; models with one: "
                f"{', '.join(m for m in list_models() if option in model_options(m))}")
    # Fractions that must stay below 1: at 1, smoothing erases the labels, a zoom can shrink an image to
    # nothing, and momentum or EMA never forget.
    for flag in ("label_smoothing", "erase", "ema", "scale", "momentum"):
        if getattr(args, flag) >= 1:
            bad(f"--{flag.replace('_', '-')} must be below 1, got {getattr(args, flag)}")
    if args.nesterov and (args.optimizer != "sgd" or args.momentum == 0):
        bad("--nesterov needs --optimizer sgd with --momentum above 0")
    for flag in ("stop_val_acc", "patience"):
        if getattr(args, flag) is not None and not args.val:
            bad(f"--{flag.replace('_', '-')} watches the validation set; add --val N (e.g. --val 5000)")
        if getattr(args, flag) is not None and args.eval_every != 1:
            bad(f"--{flag.replace('_', '-')} reads the validation set after every epoch; drop --eval-every")
    if args.translate > 0.5:
        bad(f"--translate is a fraction of the image side; above 0.5 the digit can leave it, got {args.translate}")
    if args.stop_val_acc is not None and args.stop_val_acc > 100:
        bad(f"--stop-val-acc is a percentage, at most 100, got {args.stop_val_acc}")


def find_resume(path):
    """(checkpoint or None, its folder, whether that is the run's own, saved arguments) for --resume PATH.
    A folder is the run's own when PATH is its last.pt with the run's args.json beside it; any other
    checkpoint (a best.pt, a copy elsewhere) continues only in a new folder (--out). A run killed
    before its first save has args.json but no last.pt: it starts over with those arguments."""
    args_file = os.path.join(path, "args.json")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "last.pt")) and os.path.exists(args_file):
        saved = read_run_args(path)
        if saved is None:
            raise UserError(f"{args_file} is not a train.py run's; start a new run instead", 2)
        return None, os.path.abspath(path), True, saved
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("args"), dict) or ckpt.get("optimizer") is None:
        raise UserError(f"{path} holds weights without the training state a resume needs (optimizer, "
                        f"random streams); train a new run, or evaluate it with evaluate.py", 2)
    file = os.path.abspath(checkpoint_path(path))
    folder = os.path.dirname(file)
    saved = read_run_args(folder)
    own = os.path.basename(file) == "last.pt" and saved is not None and all(
        saved.get(k) == v for k, v in ckpt["args"].items() if k not in RESUME_MAY_CHANGE)
    return ckpt, folder, own, ckpt["args"]


def resume_args(parser, argv, saved):
    """The saved run's arguments, with the flags typed now that a resume may change."""
    quiet = build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    explicit = vars(quiet.parse_args(argv))
    for key, value in explicit.items():
        if key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume: the run was trained with {flag} {saved.get(key)}, not {value}; "
                            f"drop {flag} to continue it as it was, or start a new run", 2)
    args = parser.parse_args([])
    vars(args).update({k: v for k, v in saved.items() if k in vars(args)})
    vars(args).update({k: v for k, v in explicit.items() if k in RESUME_MAY_CHANGE})
    return args


# ---------------------------------------------------------------------------------------------
# The steps of a run, in the order main() takes them
# ---------------------------------------------------------------------------------------------

@dataclass
class Data:
    """The splits of a run, as uint8 tensors on the device, and how they are fed."""
    info: DatasetInfo
    norm: tuple            # (mean, std) the model sees its inputs normalized with
    batches: Batches       # the training set, shuffled and augmented per step
    splits: dict           # {"val": (images, labels), "test": (images, labels)}


def parse_and_check(argv, world):
    """(the run's arguments, the checkpoint to resume or None, the folder the resumed checkpoint is in
    or None, whether to continue in that folder)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    resumed, source, in_place = None, None, False
    if args.resume:
        resumed, source, own, saved = distributed.on_rank0(world, find_resume, args.resume)
        in_place = not args.out   # with --out: a new folder, the old one left as it is
        if in_place and not own:
            raise UserError(f"--resume {args.resume} is not the last.pt of its own run folder (with that run's "
                            f"args.json beside it), so continuing in place could overwrite files that are not "
                            f"its own; continue it in a new folder with --out NEW", 2)
        args = resume_args(parser, argv, saved)
    check_args(args)
    distributed.check_args(world, args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    return args, resumed, source, in_place


def setup_device(args, world):
    """The device, seeded and set to the kernels --deterministic asks for; whether to use NHWC; and the
    precision, resolved into args.amp (what args.json and the checkpoint record)."""
    device = distributed.pick_device(args.device, world)
    args.amp, precision = resolve_amp(args.amp, device)
    torch.manual_seed(args.seed)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = args.channels_last == "on" or (
        args.channels_last == "auto" and (device.type == "cpu" or (device.type == "cuda" and args.amp != "off")))
    return device, channels_last, precision


def load_data(args, world, device, channels_last):
    """Whole splits as uint8 on the device, the validation images held out of the training set."""
    info = dataset_info(args.dataset)
    distributed.fetch_data(world, args.dataset, args.data_dir)
    images, labels = load_split(args.dataset, "train", args.data_dir, device)
    if args.val >= len(labels):
        raise UserError(f"--val {args.val} leaves nothing to train on: the training set has {len(labels):,} images", 2)
    (images, labels), val = split_off_val(images, labels, args.val)
    test = load_split(args.dataset, "test", args.data_dir, device)
    if args.subset:
        images, labels, test = images[:args.subset], labels[:args.subset], (test[0][:args.subset], test[1][:args.subset])
    norm = {"dataset": lambda: normalization(args.dataset, args.data_dir), "mnist": lambda: normalization("mnist"),
            "unit": lambda: (0.0, 1.0), "raw": lambda: (0.0, 1 / 255)}[args.norm]()
    batches = Batches(images, labels, args.batch_size, *norm, shuffle=True, seed=args.seed,
                      augment=build_augment(args, info), drop_last=args.drop_last, channels_last=channels_last,
                      rank=world.rank if world else 0, world_size=world.size if world else 1)
    if len(batches) == 0:
        raise UserError(f"--batch-size {args.batch_size} with --drop-last leaves no batch of "
                        f"{len(labels):,} training images", 2)
    return Data(info, norm, batches, {"val": val, "test": test})


def build_augment(args, info):
    flip = info.flips and args.augment if args.flip is None else args.flip
    # getattr: runs saved before these flags existed resume without them
    extra = {k: tuple(getattr(args, k, None) or (0.0, 0.0)) for k in ("stroke", "blur", "lowres", "elastic")}
    if not (args.augment or args.erase or flip or any(p for p, _ in extra.values())):
        return None
    on = args.augment
    return Augment(args.rotate if on else 0, args.translate if on else 0, args.scale if on else 0, args.erase, flip,
                   **extra)


def build_run(args, world, device, data, channels_last):
    """The model and everything that steps it."""
    model = get_model(args.model, **model_kwargs(args, len(data.info.classes))).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Run(
        args, model, torch.compile(model) if args.compile else model, build_optimizer(model, args), device,
        data.info, data.norm, channels_last=channels_last, world=world,
        ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None,
        autocast=autocast_for(args.amp, device),
        scaler=torch.amp.GradScaler(device.type) if args.amp == "fp16" else None,
        progress={"on": 0.5, "off": 0, "auto": 0.5 if sys.stdout.isatty() else 30}[args.progress],
        log_every=max(1, len(data.batches) // 20) if args.log_every is None else args.log_every)


def restore(run, resumed, source, in_place, steps):
    """Load a checkpoint's state into the run, in its own folder or (--out) a new one; (first epoch,
    first step, partial sums) to continue from, or None when the run is already complete."""
    last_step = resumed["epoch"] * steps + int(resumed["step"])

    def folder():   # rank 0: the folder, with the record rebuilt from the checkpoint (unsaved rows dropped)
        if in_place:
            lock_folder(source)
        out = source if in_place else prepare_out(run.args)
        write_args(out, run.args)
        rewrite_log(out, resumed["history"], log_columns(run.args))
        keep_steps(source, out, last_step)
        return out
    run.out = distributed.on_rank0(run.world, folder)
    try:
        start = load_state(run, resumed)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise UserError(f"{run.args.resume} cannot be resumed: its saved training state is damaged or does "
                        f"not fit ({type(e).__name__}); evaluate.py may still read its weights; start a new run") from None
    if run.world and run.world.rank:   # the saved partial sums are global: count them once, on rank 0
        start = start[:2] + (None,)
    if run.stopping.get("stopped") or start[0] > run.args.epochs:
        why = run.stopping.get("stopped") or f"it finished epoch {resumed['epoch']} of {run.args.epochs}"
        print(f"{run.out} is complete ({why}); pass a larger --epochs to train further")
        return None
    print(f"resuming {run.out} at epoch {start[0]}, step {start[1]}")
    return start


def load_state(run, resumed):
    """The saved weights, optimizer, EMA, scaler and RNG state into the run; where to continue from."""
    run.model.load_state_dict(resumed["state_dict"])
    run.optimizer.load_state_dict(resumed["optimizer"])
    if run.ema is not None:
        run.ema.module.load_state_dict(resumed["ema_state_dict"])
        run.ema.n_averaged.fill_(resumed["ema_steps"])
    if run.scaler is not None and resumed.get("scaler"):
        run.scaler.load_state_dict(resumed["scaler"])
    distributed.restore_rng(run.world, resumed, run.device)
    run.history, run.stopping = list(resumed["history"]), dict(resumed["stopping"])
    return resumed["epoch"] + 1, int(resumed["step"]), resumed["partial_epoch"]


def start_folder(run, run_dir):
    """A new run's folder, made by rank 0 (a resumed run that never saved starts over in its own)."""
    def make():
        if run_dir:
            lock_folder(run_dir)
        out = run_dir or prepare_out(run.args)
        write_args(out, run.args)
        rewrite_log(out, [], log_columns(run.args))
        start_steps(out)
        return out
    run.out = distributed.on_rank0(run.world, make)   # every rank learns the outcome
    distributed.seed_rank(run.world, run.args.seed)
    return 1, 0, None


@contextmanager
def stop_on_signals(run):
    """Ctrl-C, or the SIGTERM with which schedulers (SLURM, Kubernetes) stop or preempt a job, asks the
    run to save at the end of the step and stop; a second signal quits at once, and the last save is
    whole anyway. Exit 130 after Ctrl-C, 143 after SIGTERM, as the shell reports a death by signal."""
    def handler(signum, frame):
        if run.stop:
            raise KeyboardInterrupt
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        run.stop = ("interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)", 128 + signum)
        print(f"\n{name}: saving at the end of this step (send it again to quit now)", file=sys.stderr, flush=True)
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def fit(run, data, start):
    """Train from (epoch, step, partial sums) to the last epoch or an early stop; one log row an epoch."""
    args, (first_epoch, step, partial) = run.args, start
    columns, best_key = log_columns(args), "ema_val_acc" if args.ema else "val_acc"
    if args.eval_untrained and not run.history:
        run.history.append({"epoch": 0, **evaluate_splits(run, data.splits)})
        distributed.on_rank0(run.world, append_row, run.out, run.history[-1], columns)
        say(run, epoch_line(run.history[-1], args))
    every = getattr(args, "eval_every", 1)   # runs saved before --eval-every resume scoring every epoch
    for epoch in range(first_epoch, args.epochs + 1):
        row = {"epoch": epoch, **train_one_epoch(run, data.batches, epoch, step, partial)}
        step, partial = 0, empty_partial()
        scored = epoch == args.epochs or (every and epoch % every == 0)
        if scored:
            row.update(evaluate_splits(run, data.splits))
        reason = stop_reason(row, args, run.stopping)
        if reason and not scored:   # a run that ends early ends scored
            row.update(evaluate_splits(run, data.splits))
        run.history.append(row)
        if reason:
            run.stopping["stopped"] = reason
        if args.val and best_key in row and row[best_key] > run.stopping.get("best_val_acc", -1.0):
            run.stopping["best_val_acc"] = row[best_key]
            save(run, epoch, 0, None, "best.pt")   # before last.pt: a crash between them redoes this epoch
        save(run, epoch, 0, None)
        distributed.on_rank0(run.world, append_row, run.out, row, columns)
        distributed.on_rank0(run.world, epoch_scalars, run, row, epoch * len(data.batches))
        say(run, epoch_line(row, args))
        if reason:
            say(run, f"stopping after epoch {epoch}: {reason}")
            break


def stop_reason(row, args, stopping):
    """Why training should stop after this epoch, or None. `stopping` carries the patience state."""
    if args.stop_loss is not None and row["train_loss"] < args.stop_loss:
        return f"the mean training loss {row['train_loss']:.4f} fell below --stop-loss {args.stop_loss:g}"
    key = "ema_val" if args.ema else "val"
    if args.stop_val_acc is not None and row[f"{key}_acc"] >= args.stop_val_acc:
        return f"validation accuracy {row[f'{key}_acc']:.2f} % reached --stop-val-acc {args.stop_val_acc:g}"
    if args.patience is not None:
        if stopping.get("best_val_loss") is None or row[f"{key}_loss"] < stopping["best_val_loss"]:
            stopping.update(best_val_loss=row[f"{key}_loss"], best_epoch=row["epoch"], bad_epochs=0)
        else:
            stopping["bad_epochs"] += 1
            if stopping["bad_epochs"] >= args.patience:
                return (f"validation loss has not improved for {args.patience} epochs (best "
                        f"{stopping['best_val_loss']:.4f} at epoch {stopping['best_epoch']})")
    return None


def main(argv):
    try:
        return train(argv)
    finally:
        release_folders()   # the folder lock ends with the run, also when main runs in a longer process


def train(argv):
    """parse and check, load data, build, restore or start, fit, report."""
    world = distributed.current()   # None unless torchrun started this process
    args, resumed, source, in_place = parse_and_check(argv, world)
    keep_freed_memory()
    device, channels_last, precision = setup_device(args, world)
    data = load_data(args, world, device, channels_last)
    run = build_run(args, world, device, data, channels_last)
    if resumed:
        start = restore(run, resumed, source, in_place, len(data.batches))
    else:
        start = start_folder(run, source if in_place else None)
    if start is None:
        return 0
    if args.tensorboard:
        run.tb = distributed.on_rank0(world, open_tensorboard, run.out)
    with stop_on_signals(run):
        if world:
            run.step_model = distributed.ready(world, run.model, device, args.compile)
        say(run, f"{args.model} ({count_params(run.model):,} parameters) on {args.dataset}: "
                 f"{len(data.batches.labels):,} train, {len(data.splits['val'][1]):,} val, "
                 f"{len(data.splits['test'][1]):,} test images; {device}{distributed.describe(world)}, {precision}; "
                 f"run folder {run.out}")
        try:
            fit(run, data, start)
        except Stop as stop:
            print(f"train.py: {'error: ' if stop.code == 1 else ''}{stop}", file=sys.stderr)
            return stop.code
        except WriteError as e:
            last = os.path.join(run.out, "last.pt")
            kept = f"{last} holds the last good state" if os.path.exists(last) else "nothing was saved yet"
            print(f"train.py: error: {e}. Training stopped; {kept}. Continue with: "
                  f"{distributed.command(run.world)} train.py --resume {run.out}", file=sys.stderr)
            return 1
    last = run.history[-1]
    ema = f" (EMA weights {last['ema_test_acc']:.2f} %)" if args.ema else ""
    say(run, f"done: test accuracy {last['test_acc']:.2f} %{ema} after epoch {last['epoch']}; "
             f"checkpoint {run.out}/last.pt, log {run.out}/log.csv")
    return 0


if __name__ == "__main__":
    sys.exit(distributed.launch(main))   # cli.run(main), or DDP under torchrun
