"""Train a registry model on an MNIST-style dataset, on CPU, CUDA or MPS.

    python train.py --model cnn --epochs 5 --device mps
    python train.py @recipes/fast.args --seed 1                 # a recipe file; later flags override it
    python train.py --model tiny --dataset fashion-mnist --data-dir DIR --val 5000
    python train.py @recipes/strong.args --dataset train.csv       # your own data: a CSV, or a folder
    python train.py --resume runs/mnist-cnn-20261122-101500      # continue where it stopped

Writes DIR/log.csv (a row per epoch), DIR/args.json (the resolved flags), DIR/last.pt after every
epoch, and DIR/best.pt (by validation accuracy) when --val is set. DIR is --out, or
runs/<dataset>-<model>-<time>. Under torchrun it trains with DDP, --batch-size being the global batch:

    torchrun --standalone --nproc_per_node=4 train.py --model cnn --batch-size 512
"""
import argparse
import importlib.util
import os
import sys

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import distributed
from checkpoint import Progress, model_kwargs, restore_record, seed_rank
from cli import Parser, UserError, chance_and_strength, checked, non_negative, positive, say, stop_on_signals
from data import DATASETS, Augment, Batches, normalization, pixel_stats, split_off_val
from device import autocast_for, keep_freed_memory, resolve_amp
from files import WriteError
from loop import Config, Data, Stepper, Stopped, fit, score_untrained
from models import OPTIONS, count_params, get_model, list_models, model_options, option_problem
from forms import more_digits
from optimizers import DEFAULT_LR, build_optimizer
from runfolder import (RunFolder, find_resume, keep_steps, lock_folder, log_columns, prepare_out, release_folders,
                       resume_args, rewrite_log, write_args)
from userdata import open_dataset


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
        g.add_argument(f"--{name}", type=checked(option.kind, lambda v, name=name: option_problem(name, v),
                                                 "a whole number" if option.kind is int else "a number"),
                       help=f"{option.help}, for {having} (default: the model's own)")
    g.add_argument("--dataset", default="mnist", metavar="NAME_OR_PATH", help=f"a built-in set ({', '.join(DATASETS)}) "
                   "or your own: a CSV file (a label column and N*N pixel columns, as Kaggle's digit recognizer), a "
                   "folder of class folders of images, or a folder of IDX files (default: mnist)")
    g.add_argument("--test", metavar="PATH", help="your own labelled test set, of the same kind as --dataset (default: a "
                   "stratified seventh of --dataset, recorded in the checkpoint)")
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
                       ("elastic", "a smooth random warp of up to 3*S pixels"),
                       ("noise", "scan or camera grain of std up to 0.4*S")):
        g.add_argument(f"--{flag}", type=chance_and_strength, default=[0.0, 0.0], metavar="P[:S]",
                       help=f"with probability P per image, {what}; strength S in 0..1 (default: 1). For "
                       f"digits that are not MNIST's: photos, scans, other pens (default: off)")
    for flag, what in (("fonts", "digits rendered from the installed handwriting fonts (fontdigits.py; the "
                                 "families held out for evaluate.py --shifts are never used)"),
                       ("european", "of the training set's 7s, 1s and 4s rewritten crossed, flagged and closed "
                                    "(forms.py)")):
        g.add_argument(f"--{flag}", type=non_negative(int), default=0, metavar="N", help=f"add N {what}, for "
                       f"digits written elsewhere than MNIST's (default: 0)")
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


def check_args(args):
    """Cross-flag checks that argparse cannot do alone."""
    def bad(message):
        raise UserError(message, 2)
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        bad("--tensorboard needs the tensorboard package: pip install tensorboard")
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
    if (args.stop_val_acc or 0) > 100:
        bad(f"--stop-val-acc is a percentage, at most 100, got {args.stop_val_acc}")


# ---------------------------------------------------------------------------------------------
# Set-up, in the order train() takes it
# ---------------------------------------------------------------------------------------------

def parse_and_check(argv, world):
    """(the run's arguments, the checkpoint to resume or None, the folder the resumed checkpoint is in
    or None, whether to continue in that folder)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("dataset", "test"):   # a path to your own data is recorded whole: a resume may start elsewhere
        value = getattr(args, flag)
        if value and value not in DATASETS and os.path.exists(value):
            setattr(args, flag, os.path.abspath(value))
    resumed, source, in_place = None, None, False
    if args.resume:
        resumed, source, own, saved = distributed.on_rank0(world, find_resume, args.resume)
        in_place = not args.out   # with --out: a new folder, the old one left as it is
        if in_place and not own:
            raise UserError(f"--resume {args.resume} is not the last.pt of its own run folder (with that run's "
                            f"args.json beside it), so continuing in place could overwrite files that are not "
                            f"its own; continue it in a new folder with --out NEW", 2)
        args = resume_args(build_parser, argv, saved)
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


def load_data(args, world, device, channels_last, record=None):
    """Whole splits as uint8 on the device, the validation images held out of the training set. A
    resumed run's RECORD names the test split it was trained beside."""
    if args.dataset in DATASETS:
        distributed.fetch_data(world, args.dataset, args.data_dir)
    source = open_dataset(args.dataset, args.data_dir, args.test, record, device)
    info, (images, labels), test = source.info, source.train, source.test
    if args.val >= len(labels):
        raise UserError(f"--val {args.val} leaves nothing to train on: the training set has {len(labels):,} images", 2)
    own = args.dataset not in DATASETS
    norm = {"dataset": lambda: own_stats(images) if own else normalization(args.dataset, args.data_dir),
            "mnist": lambda: normalization("mnist"), "unit": lambda: (0.0, 1.0), "raw": lambda: (0.0, 1 / 255)}[args.norm]()
    (images, labels), val = split_off_val(images, labels, args.val)
    if args.subset:
        images, labels, test = images[:args.subset], labels[:args.subset], (test[0][:args.subset], test[1][:args.subset])
    if getattr(args, "fonts", 0) or getattr(args, "european", 0):   # getattr: runs saved before these flags
        images, labels = more_digits(images, labels, info.classes, args.fonts, args.european, args.seed)
    batches = Batches(images, labels, args.batch_size, *norm, shuffle=True, seed=args.seed,
                      augment=build_augment(args, info), drop_last=args.drop_last, channels_last=channels_last,
                      rank=world.rank if world else 0, world_size=world.size if world else 1)
    if len(batches) == 0:
        raise UserError(f"--batch-size {args.batch_size} with --drop-last leaves no batch of "
                        f"{len(labels):,} training images", 2)
    return Data(info, norm, batches, {"val": val, "test": test}, source.record, source.note)


def own_stats(images):
    """The mean and std of a user's training images, rounded as the built-in sets' recorded ones are."""
    mean, std = (round(v, 4) for v in pixel_stats(images))
    if std == 0:
        raise UserError(f"every training image is the same shade (mean {mean}); there is nothing to learn from them")
    return mean, std


def build_augment(args, info):
    flip = info.flips and args.augment if args.flip is None else args.flip
    # getattr: runs saved before these flags existed resume without them
    extra = {k: tuple(getattr(args, k, None) or (0.0, 0.0)) for k in ("stroke", "blur", "lowres", "elastic", "noise")}
    if not (args.augment or args.erase or flip or any(p for p, _ in extra.values())):
        return None
    return Augment(*(v if args.augment else 0 for v in (args.rotate, args.translate, args.scale)), args.erase, flip,
                   **extra)


def build_stepper(args, world, device, data, channels_last):
    """The model and everything that steps it."""
    model = get_model(args.model, **model_kwargs(args, len(data.info.classes))).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay, args.momentum, args.nesterov,
                                compiled=args.compile)
    return Stepper(
        model, torch.compile(model) if args.compile else model, optimizer, device,
        ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None,
        scaler=torch.amp.GradScaler(device.type) if args.amp == "fp16" else None,
        autocast=autocast_for(args.amp, device), channels_last=channels_last, world=world)


def open_folder(args, world, data, stepper, resumed, source, in_place):
    """(the run folder, where to start), or (folder, None) when a resumed run is complete. A new run (or
    one killed before its first save) starts fresh; a resumed one continues in its own folder or, with
    --out, a new one, its log rebuilt from the checkpoint (rows that were never saved are dropped)."""
    progress, start, (rank, size) = Progress(), (1, 0, None), (world.rank, world.size) if world else (0, 1)
    if resumed:
        try:
            progress, *start = restore_record(resumed, stepper, rank, size)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise UserError(f"{args.resume} cannot be resumed: its saved training state is damaged or does not fit "
                            f"({type(e).__name__}); evaluate.py may still read its weights; start a new run") from None
    last_step = (resumed["epoch"] * len(data.batches) + start[1]) if resumed else 0

    def make():   # on rank 0
        if in_place:
            lock_folder(source)
        out = source if in_place else prepare_out(args)
        write_args(out, args)
        rewrite_log(out, progress.history, log_columns(args))
        keep_steps(source if resumed else out, out, last_step)
        return out
    out = distributed.on_rank0(world, make)   # every rank learns the outcome
    if rank:   # the saved partial sums are global: count them once, on rank 0
        start = (start[0], start[1], None)
    if not resumed:
        seed_rank(rank, args.seed)
    folder = RunFolder(out, args, data, progress, world, args.tensorboard)
    if progress.early.stopped or start[0] > args.epochs:
        why = progress.early.stopped or f"it finished epoch {resumed['epoch']} of {args.epochs}"
        print(f"{out} is complete ({why}); pass a larger --epochs to train further")
        return folder, None
    if resumed:
        print(f"resuming {out} at epoch {start[0]}, step {start[1]}")
    return folder, tuple(start)


def main(argv):
    try:
        return train(argv)
    finally:
        release_folders()   # the folder lock ends with the run, also when main runs in a longer process


def train(argv):
    """Parse and check, set up device and data, build, open the folder (fresh or resumed), fit, report."""
    world = distributed.current()   # None unless torchrun started this process
    args, resumed, source, in_place = parse_and_check(argv, world)
    keep_freed_memory()
    device, channels_last, precision = setup_device(args, world)
    data = load_data(args, world, device, channels_last, resumed["data"].get("test") if resumed else None)
    stepper = build_stepper(args, world, device, data, channels_last)
    config = Config.from_args(args, len(data.batches))
    folder, start = open_folder(args, world, data, stepper, resumed, source, in_place)
    if start is None:
        return 0
    with stop_on_signals() as stop:
        if world:
            stepper.step_model = distributed.ready(world, stepper.model, device, args.compile)
        if data.note:
            say(stop, f"{args.dataset}: {data.note}")
        say(stop, f"{args.model} ({count_params(stepper.model):,} parameters) on {args.dataset}: "
                  f"{len(data.batches.labels):,} train, {len(data.splits['val'][1]):,} val, "
                  f"{len(data.splits['test'][1]):,} test images; {device}{distributed.describe(world)}, {precision}; "
                  f"run folder {folder.out}")
        try:
            if args.eval_untrained and not folder.progress.history:
                score_untrained(stepper, config, folder.progress, data, folder, stop)
            fit(stepper, config, folder.progress, data, folder, stop, start)
        except Stopped as stopped:
            print(f"train.py: {'error: ' if stopped.code == 1 else ''}{stopped}", file=sys.stderr)
            return stopped.code
        except WriteError as e:
            kept = f"{folder.out}/last.pt holds the last good state" if folder.has("last.pt") else "nothing was saved yet"
            print(f"train.py: error: {e}. Training stopped; {kept}. Continue with: "
                  f"{distributed.command(world)} train.py --resume {folder.out}", file=sys.stderr)
            return 1
        finally:
            folder.close()
    last = folder.progress.history[-1]
    ema = f" (EMA weights {last['ema_test_acc']:.2f} %)" if args.ema else ""
    say(stop, f"done: test accuracy {last['test_acc']:.2f} %{ema} after epoch {last['epoch']}; "
              f"checkpoint {folder.out}/last.pt, log {folder.out}/log.csv")
    return 0


if __name__ == "__main__":
    sys.exit(distributed.launch(main))   # cli.run(main), or DDP under torchrun
