"""Train a registry model on an MNIST-style dataset, on CPU, CUDA or MPS: the whole run, top to bottom.

    python train.py --model cnn --epochs 5 --device mps
    python train.py @recipes/fast.args --seed 1                 # a recipe file; later flags override it
    python train.py --model tiny --dataset fashion-mnist --data-dir DIR --val 5000
    python train.py @recipes/strong.args --dataset train.csv       # your own data: a CSV, or a folder
    python train.py --resume runs/mnist-cnn-20261122-101500      # continue where it stopped

Writes DIR/args.json (the resolved flags), and after every epoch DIR/last.pt, a row of DIR/log.csv,
the epoch's rows of DIR/steps.csv, and DIR/best.pt (by validation accuracy) when --val is set. DIR is
--out, or runs/<dataset>-<model>-<time>. A run stopped by Ctrl-C, SIGTERM or a crash continues from
its last finished epoch, exactly as if it had never stopped. Under torchrun it trains with DDP,
--batch-size being the global batch:

    torchrun --standalone --nproc_per_node=4 train.py --model cnn --batch-size 512

The file reads in order: flags, main() (set-up, the epoch loop), one epoch with its training step,
evaluation, checkpoints saved and restored side by side, the run folder and its logs, and torchrun.
"""

import argparse
import csv
import gc
import importlib.util
import io
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from checkpoint import (
    MAX_PARTS,
    SCALARS,
    checkpoint_path,
    load_checkpoint,
    make_checkpoint,
    model_kwargs,
    plain,
    save_checkpoint,
)
from cli import (
    Parser,
    UserError,
    WriteError,
    chance_and_strength,
    checked,
    describe_error,
    make_folder,
    non_negative,
    open_new,
    positive,
    read_log,
    remove_temporaries,
    run,
    say,
    stop_on_signals,
    write_problem,
    write_text_atomic,
)
from data import DATASETS, Augment, Batches, load_split, log_probs, normalization, pixel_stats, score, split_off_val
from device import autocast_for, keep_freed_memory, pick_device, resolve_amp
from models import OPTIONS, count_params, get_model, list_models, model_options, option_problem
from optimizers import DEFAULT_LR, build_optimizer

# Under torchrun (RANK, LOCAL_RANK and WORLD_SIZE set) this process is one rank of several, as in
# nanoGPT's train.py; a plain run is rank 0 of 1 and never enters process-group code.
DDP = "RANK" in os.environ
RANK, WORLD = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if DDP else (0, 1)
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))

# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def build_parser():
    """Every flag of a run, in one place; the resolved values go to args.json and into every checkpoint."""
    p = Parser(
        prog="train.py",
        description="Train a model from models.py on an MNIST-style dataset. "
        "@FILE reads flags from a file, such as recipes/fast.args; flags after it override it.",
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="cnn", choices=list_models(), help="architecture (default: cnn)")
    for name, option in OPTIONS.items():  # declared once, in models.py
        having = ", ".join(m for m in list_models() if name in model_options(m))
        g.add_argument(
            f"--{name}",
            type=checked(
                option.kind,
                lambda v, name=name: option_problem(name, v),
                "a whole number" if option.kind is int else "a number",
            ),
            help=f"{option.help}, for {having} (default: the model's own)",
        )
    g.add_argument(
        "--dataset",
        default="mnist",
        metavar="NAME_OR_PATH",
        help=f"a built-in set ({', '.join(DATASETS)}) "
        "or your own: a CSV file (a label column and N*N pixel columns, as Kaggle's digit recognizer), a "
        "folder of class folders of images, or a folder of IDX files (default: mnist)",
    )
    g.add_argument(
        "--test",
        metavar="PATH",
        help="your own labelled test set, of the same kind as --dataset (default: a "
        "stratified seventh of --dataset, recorded in the checkpoint)",
    )
    g.add_argument(
        "--data-dir",
        help="folder holding the IDX files, flat or as <Name>/raw/ (default: search ./data, then download)",
    )
    g.add_argument(
        "--norm",
        default="dataset",
        choices=["dataset", "mnist", "unit", "raw"],
        help="input scaling: the dataset's own mean/std, MNIST's mean/std, 0..1, or raw 0..255 "
        "pixels as notebook 002 fed them (default: dataset)",
    )
    g.add_argument(
        "--val",
        type=non_negative(int),
        default=0,
        help="hold out N training images for validation, chosen by N alone (default: 0, train on all)",
    )
    g.add_argument(
        "--subset",
        type=non_negative(int),
        default=0,
        help="use only the first N training and test images, for quick checks (default: 0, all)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive(int), default=5, help="(default: 5)")
    g.add_argument("--batch-size", type=positive(int), default=128, help="(default: 128)")
    g.add_argument("--drop-last", action="store_true", help="drop the last, smaller batch of each epoch")
    g.add_argument(
        "--optimizer",
        default="adam",
        choices=list(DEFAULT_LR),
        help="(default: adam; radam uses decoupled weight decay, as notebook 000)",
    )
    g.add_argument(
        "--lr",
        type=positive(float),
        help="peak learning rate (default: 0.01 for sgd, 3e-3 for the adam family, 1.0 for adadelta)",
    )
    g.add_argument("--momentum", type=non_negative(float), default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum for SGD")
    g.add_argument(
        "--weight-decay", type=non_negative(float), default=0.0, help="the optimizer's weight decay (default: 0)"
    )
    g.add_argument(
        "--scheduler",
        default="cosine",
        choices=["none", "step", "exp", "cosine", "onecycle"],
        help="learning-rate schedule, set every step (default: cosine)",
    )
    g.add_argument(
        "--gamma",
        type=positive(float),
        default=0.1,
        help="decay factor per epoch for exp, per --step-size epochs for step (default: 0.1)",
    )
    g.add_argument("--step-size", type=positive(int), default=5, help="epochs between step decays (default: 5)")
    g.add_argument(
        "--warmup",
        type=non_negative(float),
        default=0.0,
        help="epochs of linear warm-up in front of any schedule (default: 0)",
    )
    g.add_argument(
        "--clip-grad",
        type=non_negative(float),
        default=0.0,
        help="clip the gradient norm to this value (default: 0, off)",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds weights, shuffling and augmentation (default: 0)")
    g.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels: the same seed gives identical logs on CPU"
    )
    g = p.add_argument_group("regularization")
    g.add_argument("--label-smoothing", type=non_negative(float), default=0.0, help="(default: 0)")
    g.add_argument(
        "--l1",
        type=non_negative(float),
        default=0.0,
        help="L1 penalty: adds L1 * sum|w| to the loss (notebook 002's lambda1; default: 0)",
    )
    g.add_argument(
        "--l2",
        type=non_negative(float),
        default=0.0,
        help="L2 penalty: adds L2 * sum w^2 to the loss, apart from --weight-decay (default: 0)",
    )
    g.add_argument(
        "--augment",
        action="store_true",
        help="random affine on the device: rotation, translation, scale (see the next three)",
    )
    g.add_argument("--rotate", type=non_negative(float), default=10.0, help="max rotation, degrees (default: 10)")
    g.add_argument(
        "--translate", type=non_negative(float), default=0.1, help="max shift, fraction of the side (default: 0.1)"
    )
    g.add_argument("--scale", type=non_negative(float), default=0.1, help="max zoom in or out (default: 0.1)")
    g.add_argument(
        "--erase", type=non_negative(float), default=0.0, help="probability of random erasing per image (default: 0)"
    )
    g.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        help="random horizontal flips (default: on with --augment for fashion-mnist, off for digits)",
    )
    for flag, what in (
        ("stroke", "thicker or thinner strokes (2x2 dilation or erosion, blended in by up to S)"),
        ("blur", "Gaussian blur (sigma 1, blended in by up to S)"),
        ("lowres", "a round trip through 14, 12 or 10 pixels a side (S: how far down)"),
        ("elastic", "a smooth random warp of up to 3*S pixels"),
        ("noise", "scan or camera grain of std up to 0.4*S"),
    ):
        g.add_argument(
            f"--{flag}",
            type=chance_and_strength,
            default=[0.0, 0.0],
            metavar="P[:S]",
            help=f"with probability P per image, {what}; strength S in 0..1 (default: 1). For "
            f"digits that are not MNIST's: photos, scans, other pens (default: off)",
        )
    for flag, what in (
        (
            "fonts",
            "digits rendered from the installed handwriting fonts (fontdigits.py; the "
            "families held out for evaluate.py --shifts are never used)",
        ),
        ("european", "of the training set's 7s, 1s and 4s rewritten crossed, flagged and closed (forms.py)"),
    ):
        g.add_argument(
            f"--{flag}",
            type=non_negative(int),
            default=0,
            metavar="N",
            help=f"add N {what}, for digits written elsewhere than MNIST's (default: 0)",
        )
    g.add_argument(
        "--ema",
        type=non_negative(float),
        default=0.0,
        help="keep an exponential moving average of the weights with this decay, e.g. 0.999; "
        "it is evaluated and saved beside the raw weights (default: 0, off)",
    )
    g = p.add_argument_group("stopping and evaluation")
    g.add_argument(
        "--stop-loss",
        type=positive(float),
        help="stop once an epoch's mean training loss (penalties included) falls below this (notebook 002: 0.38)",
    )
    g.add_argument("--stop-val-acc", type=positive(float), help="stop once validation accuracy (%%) reaches this")
    g.add_argument("--patience", type=positive(int), help="stop after this many epochs without a lower validation loss")
    g.add_argument(
        "--eval-untrained",
        action="store_true",
        help="evaluate the untrained model first (epoch 0 in the log), as notebook 001 does",
    )
    g.add_argument(
        "--eval-every",
        type=non_negative(int),
        default=1,
        metavar="N",
        help="score the validation and test sets every N epochs, and always after the last; 0: after "
        "the last only, which saves their time in short runs (default: 1)",
    )
    g.add_argument(
        "--tta",
        action="store_true",
        help="score with test-time augmentation: the softmax averaged over "
        "the image shifted one pixel each way (and mirrored where that keeps the class); evaluate.py "
        "then does the same for this run's checkpoints",
    )
    g = p.add_argument_group("speed")
    g.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto, an accelerator when present)"
    )
    g.add_argument(
        "--amp",
        default="auto",
        choices=["auto", "off", "bf16", "fp16"],
        help="mixed precision: auto takes bf16 where the device computes it natively (recent GPUs, "
        "CPUs with AMX or AVX512-BF16) and fp32 elsewhere; fp16 adds a gradient scaler. The "
        "choice is recorded, and a resumed run keeps it (default: auto)",
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints stay plain)")
    g.add_argument(
        "--channels-last",
        default="auto",
        choices=["auto", "on", "off"],
        help="NHWC memory layout; auto turns it on where it measured faster: CPU, and CUDA with --amp (default: auto)",
    )
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<dataset>-<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    g.add_argument(
        "--resume",
        metavar="DIR_OR_CKPT",
        help="continue a run from its last.pt (the end of its last "
        "finished epoch), in its own folder; any other checkpoint (best.pt, a copy) continues in a new "
        "folder given with --out",
    )
    g.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress line during epochs: in place on a terminal, every 30 s otherwise (default: auto)",
    )
    g.add_argument(
        "--log-every",
        type=non_negative(int),
        metavar="N",
        help="a row of steps.csv every N steps: loss and accuracy over those steps, lr, speed; "
        "written at the epoch's end (default: about 20 rows an epoch; 0: none)",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the step and epoch figures to DIR/tb/ for TensorBoard (needs: pip install tensorboard)",
    )
    return p


def check_args(args):
    """Cross-flag checks that argparse cannot do alone."""

    def bad(message):
        raise UserError(message, 2)

    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        bad("--tensorboard needs the tensorboard package: pip install tensorboard")
    for option in OPTIONS:
        if getattr(args, option) is not None and option not in model_options(args.model):
            bad(
                f"--{option}: model {args.model!r} has no {option} option; models with one: "
                f"{', '.join(m for m in list_models() if option in model_options(m))}"
            )
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
    if args.batch_size % WORLD:
        lower = max(WORLD, args.batch_size - args.batch_size % WORLD)
        bad(
            f"--batch-size {args.batch_size} is the global batch and must split evenly over the {WORLD} "
            f"processes; use a multiple of {WORLD}, e.g. {lower}"
        )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class Data:
    """The splits of a run, as uint8 tensors on the device."""

    info: object  # data.DatasetInfo: name, classes, whether mirror images keep their class
    norm: tuple  # (mean, std) the model sees its inputs normalized with
    train: tuple  # (images [N, 1, 28, 28], labels [N]), without the validation images
    splits: dict  # {"val": (images, labels), "test": (images, labels)}: what each epoch is scored on
    test_source: dict  # how to find the same test images again (userdata.Source.record): saved in checkpoints
    note: str = ""  # where the test split came from, said at the start


@dataclass
class Learner:
    """The model being trained and what updates it."""

    model: torch.nn.Module  # the plain module: what is saved and evaluated
    optimizer: object  # optimizers.build_optimizer's
    ema: AveragedModel = None  # --ema: the moving average of the weights
    scaler: torch.amp.GradScaler = None  # --amp fp16
    autocast: object = None  # the precision's autocast context, built once
    channels_last: bool = False


@dataclass
class History:
    """What a run has done, saved in every checkpoint: a row per epoch, and the early-stopping state."""

    rows: list = field(default_factory=list)
    best_val_acc: float = -1.0  # for best.pt
    best_val_loss: float = None  # for --patience
    best_epoch: int = None
    bad_epochs: int = 0
    stopped: str = None  # why the run stopped early, once it has


class Stopped(Exception):
    """Ends training inside an epoch: a non-finite loss (code 1), or a signal (130 for Ctrl-C)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def main(argv):
    try:
        return train(argv)
    finally:
        release_folders()  # the folder lock ends with the run, also when main runs in a longer process


def train(argv):
    """Flags, device, data, model and folder; then the epochs, each saved as it ends; then one line."""
    args, resumed, source, in_place = parse_args(argv)
    complete = resumed and ((resumed.get("stopping") or {}).get("stopped") or resumed["epoch"] >= args.epochs)
    if complete and in_place:  # said before the data is read or the folder touched (a new --out is made first)
        why = complete if isinstance(complete, str) else f"it finished epoch {resumed['epoch']} of {args.epochs}"
        print(f"{source} is complete ({why}); pass a larger --epochs to train further")
        return 0
    keep_freed_memory()
    device = rank_device(args.device) if DDP else pick_device(args.device)
    args.amp, precision = resolve_amp(args.amp, device)  # the resolved precision is what args.json records
    torch.manual_seed(args.seed)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = args.channels_last == "on" or (
        args.channels_last == "auto" and (device.type == "cpu" or (device.type == "cuda" and args.amp != "off"))
    )

    # Under torchrun, set-up that can fail on one rank alone (its files, rank 0's folder) ends in meet(),
    # where every rank learns of the failure; in one process a failure is raised at once.
    out, failure = None, None
    try:
        if DDP and LOCAL_RANK:  # one process per node finds (or downloads) the files first
            dist.barrier()
        try:
            data = load_data(args, device, resumed["data"].get("test") if resumed else None)
        finally:
            if DDP and not LOCAL_RANK:
                dist.barrier()
        batches = Batches(
            *data.train,
            args.batch_size,
            *data.norm,
            shuffle=True,
            seed=args.seed,
            augment=build_augment(args, data.info),
            drop_last=args.drop_last,
            channels_last=channels_last,
            rank=RANK,
            world_size=WORLD,
        )
        if len(batches) == 0:
            raise UserError(
                f"--batch-size {args.batch_size} with --drop-last leaves no batch of "
                f"{len(data.train[1]):,} training images",
                2,
            )
        learner = build_learner(args, len(data.info.classes), device, channels_last)
        history, first_epoch = History(), 1
        if resumed:
            try:
                history, first_epoch = restore(resumed, learner), resumed["epoch"] + 1
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
                why = str(e)[:160] if str(e).startswith("its optimizer state") else type(e).__name__
                raise UserError(
                    f"{args.resume} cannot be resumed: its saved training state is damaged or does not "
                    f"fit ({why}); evaluate.py may still read its weights; start a new run"
                ) from None
        if RANK == 0:
            out = open_folder(args, history.rows, (first_epoch - 1) * len(batches), source, in_place)
    except Exception as e:
        if not DDP:
            raise
        failure = e
    if DDP:
        out = meet(failure, out)
    if history.stopped or first_epoch > args.epochs:
        why = history.stopped or f"it finished epoch {first_epoch - 1} of {args.epochs}"
        print(f"{out} is complete ({why}); pass a larger --epochs to train further")
        return 0
    if resumed:
        print(f"resuming {out} at epoch {first_epoch}")
    elif args.resume:
        print(f"{out} was stopped before its first epoch ended, so it has no checkpoint: training it from the start")

    # What the steps call: the model, wrapped in DDP under torchrun, compiled with --compile. The plain
    # module stays what is saved and evaluated.
    forward = learner.model
    if DDP:
        forward = torch.nn.parallel.DistributedDataParallel(
            forward, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        forward = torch.compile(forward)
    tb = None
    if args.tensorboard and RANK == 0:
        from torch.utils.tensorboard import SummaryWriter  # optional; check_args made sure it is there

        tb = SummaryWriter(os.path.join(out, "tb"))
    with stop_on_signals() as stop:
        if data.note:
            say(stop, f"{args.dataset}: {data.note}")
        processes = f" x {WORLD} processes ({dist.get_backend()})" if DDP else ""
        say(
            stop,
            f"{args.model} ({count_params(learner.model):,} parameters) on {args.dataset}: "
            f"{len(data.train[1]):,} train, {len(data.splits['val'][1]):,} val, "
            f"{len(data.splits['test'][1]):,} test images; {device}{processes}, {precision}; run folder {out}",
        )
        crop_note = cropped_ink(learner.model, data.train[0], args)
        if crop_note:
            say(stop, crop_note)
        try:
            if args.eval_untrained and not history.rows:  # epoch 0, as notebook 001 logs it
                history.rows.append({"epoch": 0, **evaluate(learner, data, args.tta)})
                if RANK == 0:
                    append_rows(out, "log.csv", history.rows[-1:], log_columns(args))
                say(stop, epoch_line(history.rows[-1], args.epochs))
            for epoch in range(first_epoch, args.epochs + 1):
                # dropout's stream, per (seed, epoch, rank): a resumed epoch draws what an uninterrupted one would
                torch.manual_seed(((args.seed * 1_000_003 + epoch) * 1_009 + RANK) % 2**63)
                figures, step_rows = train_one_epoch(learner, forward, batches, epoch, args, stop)
                row = {"epoch": epoch, **figures}
                scored = epoch == args.epochs or (args.eval_every and epoch % args.eval_every == 0)
                if scored:
                    row.update(evaluate(learner, data, args.tta))
                reason = stop_reason(row, args, history, learner.ema is not None)
                if reason and not scored:  # a run that ends early ends scored
                    row.update(evaluate(learner, data, args.tta))
                history.rows.append(row)
                history.stopped = reason
                best_key = "ema_val_acc" if learner.ema is not None else "val_acc"
                better = best_key in row and row[best_key] > history.best_val_acc
                if better:
                    history.best_val_acc = row[best_key]
                if RANK == 0:  # best.pt before last.pt: a crash between the two redoes the epoch
                    if better:
                        save(os.path.join(out, "best.pt"), learner, args, data, history)
                    save(os.path.join(out, "last.pt"), learner, args, data, history)
                    append_rows(out, "log.csv", history.rows[-1:], log_columns(args))
                    append_rows(out, "steps.csv", step_rows, STEP_COLUMNS)
                    if tb is not None:
                        log_to_tensorboard(tb, history.rows[-1], step_rows, epoch * len(batches))
                say(stop, epoch_line(history.rows[-1], args.epochs))
                if reason:
                    say(stop, f"stopping after epoch {epoch}: {reason}")
                    break
        except Stopped as stopped:
            last = os.path.join(out, "last.pt")
            kept = (
                f"{last} still holds the last good state (epoch {history.rows[-1]['epoch']})"
                if os.path.exists(last) and history.rows
                else "nothing was saved"
            )
            hint = (
                f"Try a lower --lr (this run used {args.lr:g}) or --clip-grad 1"
                if stopped.code == 1
                else f"Continue with: {restart_command()} train.py --resume {out}"
            )
            print(f"train.py: {'error: ' if stopped.code == 1 else ''}{stopped}; {kept}. {hint}", file=sys.stderr)
            return stopped.code
        except WriteError as e:
            kept = (
                f"{out}/last.pt holds the last good state"
                if os.path.exists(os.path.join(out, "last.pt"))
                else "nothing was saved yet"
            )
            print(
                f"train.py: error: {e}. Training stopped; {kept}. Continue with: {restart_command()} train.py "
                f"--resume {out}",
                file=sys.stderr,
            )
            return 1
        finally:
            if tb is not None:
                tb.close()
    last = history.rows[-1]
    ema = f" (EMA weights {last['ema_test_acc']:.2f} %)" if args.ema else ""
    say(
        stop,
        f"done: test accuracy {last['test_acc']:.2f} %{ema} after epoch {last['epoch']}; "
        f"checkpoint {out}/last.pt, log {out}/log.csv",
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Set-up: flags (a resumed run's own), data, model
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    """(the run's flags, the checkpoint to resume or None, the folder it is in, whether to continue in
    that folder)."""
    args = build_parser().parse_args(argv)
    for flag in ("dataset", "test"):  # a path to your own data is recorded whole: a resume may start elsewhere
        value = getattr(args, flag)
        if value and value not in DATASETS and os.path.exists(value):
            setattr(args, flag, os.path.abspath(value))
    resumed, source, in_place = None, None, False
    if args.resume:
        resumed, source, own, saved = find_resume(args.resume)
        in_place = not args.out  # with --out: a new folder, the old one left as it is
        if in_place and not own:
            raise UserError(
                f"--resume {args.resume} is not the last.pt of its own run folder (with that run's "
                f"args.json beside it), so continuing in place could overwrite files that are not "
                f"its own; continue it in a new folder with --out NEW",
                2,
            )
        args = resume_args(argv, saved)
    check_args(args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    return args, resumed, source, in_place


# Flags a resumed run may change; every other flag must match the checkpoint's.
RESUME_MAY_CHANGE = set(
    "epochs device data_dir resume debug compile progress log_every tensorboard eval_every out overwrite".split()
)


def resume_args(argv, saved):
    """The saved run's flags, with those typed now (ARGV) that a resume may change; any other flag typed
    must match the saved one."""
    parser, quiet = build_parser(), build_parser()
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    typed = vars(quiet.parse_args(argv))
    for key, value in typed.items():
        if key not in RESUME_MAY_CHANGE and saved.get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(
                f"--resume: the run was trained with {flag} {saved.get(key)}, not {value}; "
                f"drop {flag} to continue it as it was, or start a new run",
                2,
            )
    args = parser.parse_args([])
    vars(args).update({k: v for k, v in saved.items() if k in vars(args)})
    vars(args).update({k: v for k, v in typed.items() if k in RESUME_MAY_CHANGE})
    return args


def find_resume(path):
    """(checkpoint or None, its folder, whether that is the run's own, its saved flags) for --resume PATH.
    A folder is the run's own when PATH is its last.pt with the run's args.json beside it; any other
    checkpoint (a best.pt, a copy elsewhere) continues only in a new folder (--out). A run killed
    before its first save has args.json but no last.pt: it starts over with those flags."""
    args_file = os.path.join(path, "args.json")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "last.pt")) and os.path.exists(args_file):
        saved = read_run_args(path)
        if saved is None:
            raise UserError(f"{args_file} is not a train.py run's; start a new run instead", 2)
        return None, os.path.abspath(path), True, saved
    ckpt = load_checkpoint(path)
    file = os.path.abspath(checkpoint_path(path))
    if not isinstance(ckpt.get("args"), dict) or ckpt.get("optimizer") is None:
        raise UserError(
            f"{path} holds weights without the training state a resume needs (the optimizer's); "
            f"train a new run, or evaluate it with evaluate.py",
            2,
        )
    for key in ("stopping", "scaler"):  # as load_checkpoint checks the flags and history: plain and bounded
        if ckpt.get(key) is not None and not (isinstance(ckpt[key], dict) and plain(ckpt[key], 1, [MAX_PARTS])):
            raise UserError(f"{path} is damaged: its {key} is not a plain record of bounded size; start a new run")
    if not isinstance(ckpt.get("ema_steps", 0), int):
        raise UserError(f"{path} is damaged: its EMA step count is not a whole number; start a new run")
    if ckpt.get("step"):  # older versions also saved inside an epoch
        raise UserError(
            f"{path} was saved inside epoch {ckpt['epoch'] + 1} by an older train.py, which continued "
            f"from there; this one continues from the end of an epoch only: start a new run",
            2,
        )
    folder = os.path.dirname(file)
    saved = read_run_args(folder)
    own = (
        os.path.basename(file) == "last.pt"
        and saved is not None
        and all(saved.get(k) == v for k, v in ckpt["args"].items() if k not in RESUME_MAY_CHANGE | {"save_every"})
    )
    return ckpt, folder, own, ckpt["args"]


def load_data(args, device, test_source=None):
    """Whole splits as uint8 on the device, the validation images held out of the training set. A
    resumed run's TEST_SOURCE names the test split it was trained beside."""
    if args.dataset in DATASETS:
        if args.test:
            raise UserError(f"--test is for your own data; {args.dataset} has its own test split", 2)
        info, test_source, note = DATASETS[args.dataset], {"kind": "builtin"}, ""
        images, labels = load_split(args.dataset, "train", args.data_dir, device)
        test = load_split(args.dataset, "test", args.data_dir, device)
    else:
        from userdata import open_dataset  # your own files: a CSV, class folders, IDX files

        source = open_dataset(args.dataset, args.data_dir, args.test, test_source, device)
        info, (images, labels), test = source.info, source.train, source.test
        test_source, note = source.record, source.note
    if args.val >= len(labels):
        raise UserError(f"--val {args.val} leaves nothing to train on: the training set has {len(labels):,} images", 2)
    if args.norm == "dataset":  # the training images' own mean and std: recorded for the built-in sets
        norm = normalization(args.dataset, args.data_dir) if args.dataset in DATASETS else own_stats(images)
    else:
        norm = {"mnist": normalization("mnist"), "unit": (0.0, 1.0), "raw": (0.0, 1 / 255)}[args.norm]
    (images, labels), val = split_off_val(images, labels, args.val)
    if args.subset:
        images, labels = images[: args.subset], labels[: args.subset]
        test = tuple(t[: args.subset] for t in test)
    if getattr(args, "fonts", 0) or getattr(args, "european", 0):  # getattr: runs saved before these flags
        from forms import more_digits  # rendering and rewriting digits needs Pillow and fonts

        images, labels = more_digits(images, labels, info.classes, args.fonts, args.european, args.seed)
    return Data(info, norm, (images, labels), {"val": val, "test": test}, test_source, note)


def own_stats(images):
    """The mean and std of a user's training images, rounded as the built-in sets' recorded ones are."""
    mean, std = (round(v, 4) for v in pixel_stats(images))
    if std == 0:
        raise UserError(f"every training image is the same shade (mean {mean}); there is nothing to learn from them")
    return mean, std


def cropped_ink(model, images, args):
    """A line for a model that reads only the centre of its input (the crop models, made for MNIST's digit
    box) run on images whose ink reaches the rim, or None. MNIST's digits lose 3 % of their ink to the
    20x20 crop and Fashion-MNIST's clothes 24 % (sleeves, soles, straps), so past 5 % it is said."""
    crop = getattr(model, "crop", 0)
    if not crop:
        return None
    sample = images[:5000].float()
    share = 1 - float(sample[..., crop:-crop, crop:-crop].sum() / sample.sum().clamp(min=1))
    if share <= 0.05:
        return None
    side = images.shape[-1] - 2 * crop
    fits = "@recipes/fashion-fast.args or @recipes/fashion-strong.args" + (
        "" if args.dataset == "fashion-mnist" else f" --dataset {args.dataset}"
    )
    return (
        f"note: {args.model} reads only the central {side}x{side} pixels (MNIST's digit box), and "
        f"{100 * share:.0f} % of these images' ink lies outside them; for images that fill the frame use a "
        f"model that reads it whole: python train.py {fits}"
    )


def build_augment(args, info):
    flip = info.flips and args.augment if args.flip is None else args.flip
    # getattr: runs saved before these flags existed resume without them
    extra = {k: tuple(getattr(args, k, None) or (0.0, 0.0)) for k in ("stroke", "blur", "lowres", "elastic", "noise")}
    if not (args.augment or args.erase or flip or any(p for p, _ in extra.values())):
        return None
    return Augment(
        *(v if args.augment else 0 for v in (args.rotate, args.translate, args.scale)), args.erase, flip, **extra
    )


def build_learner(args, num_classes, device, channels_last):
    model = get_model(args.model, **model_kwargs(args, num_classes)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(
        model, args.optimizer, args.lr, args.weight_decay, args.momentum, args.nesterov, compiled=args.compile
    )
    return Learner(
        model,
        optimizer,
        ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None,
        scaler=torch.amp.GradScaler(device.type) if args.amp == "fp16" else None,
        autocast=autocast_for(args.amp, device),
        channels_last=channels_last,
    )


# ---------------------------------------------------------------------------------------------
# One epoch: the training step, the checks between steps, the step log
# ---------------------------------------------------------------------------------------------


# A mean cross-entropy this large means logits of that size, from which no run recovers. fp32 overflows to
# inf soon after; bf16 has fp32's range, so a diverged bf16 run can go on at 1e30 without ever reaching inf.
DIVERGED = 1e8


def train_one_epoch(learner, forward, batches, epoch, args, stop):
    """One pass over the training batches. Returns the epoch's row (train loss and accuracy, last lr,
    seconds, images/s) and its rows of steps.csv; raises Stopped on a non-finite loss or a signal."""
    model, optimizer, scaler = learner.model, learner.optimizer, learner.scaler
    model.train()
    steps = len(batches)
    device = next(model.parameters()).device
    # Sums stay on the device, so that an accelerator is not made to wait on every step; the loss is
    # read back at the checks, every step on a CPU (where it costs nothing) and every 50 on accelerators.
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device, dtype=torch.long), 0
    first_bad = torch.tensor(-1, device=device)  # the first step whose loss was not finite
    check_every = 1 if device.type == "cpu" else 50
    log_every = max(1, steps // 20) if args.log_every is None else args.log_every
    interval = {"on": 0.5, "off": 0, "auto": 0.5 if sys.stdout.isatty() else 30}[args.progress]  # seconds
    step_rows, window = [], (0.0, 0, 0, time.perf_counter())  # the sums at the last row of steps.csv
    t0 = shown = time.perf_counter()
    lr = args.lr
    for i, (x, y) in enumerate(batches.epoch(epoch - 1)):
        global_step = (epoch - 1) * steps + i
        lr = args.lr * lr_factor(global_step, steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with learner.autocast:
            logits = forward(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        if args.l1 or args.l2:
            loss = loss + penalty(model, args.l1, args.l2)
        # DDP averages the ranks' gradients; weighting each rank's mean by its share of the global batch
        # makes that average the gradient of the global batch's mean loss, even when shares differ.
        grad_loss = loss * len(y) * WORLD / batches.global_len(i) if DDP else loss
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(grad_loss) if scaler else grad_loss).backward()
        if args.clip_grad:
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if learner.ema is not None:
            learner.ema.update_parameters(model)

        loss = loss.detach().float()
        first_bad = torch.where((first_bad < 0) & ~(loss.abs() <= DIVERGED), i, first_bad)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        last = i + 1 == steps
        if (i + 1) % check_every == 0 or last:  # every rank checks at the same steps: they stop together
            bad, asked = agree(first_bad, stop) if DDP else (int(first_bad), bool(stop))
            if bad >= 0:  # raised before the epoch's end: no weights of a bad step are ever saved
                raise Stopped(
                    f"the loss became {loss.item():.3g} at epoch {epoch}, step {bad + 1} of {steps}: training diverged",
                    1,
                )
            if asked:
                raise Stopped(
                    f"{stop.why or 'stopped on another rank'}: stopped at epoch {epoch}, step {i + 1} of {steps}",
                    stop.code or 130,
                )
        if log_every and ((global_step + 1) % log_every == 0 or last):
            loss_now, correct_now, seen_now = sums_of(loss_sum, correct, seen)
            now, n = time.perf_counter(), seen_now - window[2]
            step_rows.append(
                {
                    "step": global_step + 1,
                    "epoch": epoch,
                    "train_loss": (loss_now - window[0]) / n,
                    "train_acc": 100.0 * (correct_now - window[1]) / n,
                    "lr": lr,
                    "images_per_s": n / max(now - window[3], 1e-9),
                }
            )
            window = (loss_now, correct_now, seen_now, now)
        if interval and time.perf_counter() - shown > interval:
            shown = time.perf_counter()
            say(
                stop,
                f"  epoch {epoch} step {i + 1}/{steps}  loss {loss_sum.item() / seen:.4f}  "
                f"{seen / (shown - t0):,.0f} img/s",
                end="\r" if interval < 1 else "\n",
            )
    if interval and interval < 1:
        say(stop, " " * 72, end="\r")
    elapsed = time.perf_counter() - t0
    loss_total, right, images = sums_of(loss_sum, correct, seen)
    return {
        "train_loss": loss_total / images,
        "train_acc": 100.0 * right / images,
        "lr": lr,
        "seconds": elapsed,
        "images_per_s": images / WORLD / max(elapsed, 1e-9),
    }, step_rows


def sums_of(loss_sum, correct, seen):
    """(loss sum, correct, seen) as Python numbers; under torchrun summed over the ranks."""
    if not DDP:
        return float(loss_sum), int(correct), int(seen)
    t = torch.tensor(
        [float(loss_sum), float(correct), float(seen)],
        dtype=torch.float64,
        device=loss_sum.device if torch.is_tensor(loss_sum) else "cpu",
    )
    dist.all_reduce(t)
    return t[0].item(), int(t[1].item()), int(t[2].item())


def lr_factor(step, steps_per_epoch, args):
    """Multiplier of the peak lr at a global step: a pure function of the step, so a resumed run
    follows the same schedule."""
    epoch, total = step // steps_per_epoch, steps_per_epoch * args.epochs
    if args.scheduler == "step":
        f = args.gamma ** (epoch // args.step_size)
    elif args.scheduler == "exp":
        f = args.gamma**epoch
    elif args.scheduler == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * step / total))
    elif args.scheduler == "onecycle":  # the shape of torch's OneCycleLR: 25 % rise, cosine both ways
        rise = max(1, int(0.25 * total))
        if step < rise:
            f = 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / rise)) / 2
        else:
            t = (step - rise) / max(1, total - rise)
            f = 1 / 25e4 + (1 - 1 / 25e4) * (1 + math.cos(math.pi * t)) / 2
    else:
        f = 1.0
    if args.warmup:
        f *= min(1.0, (step + 1) / (args.warmup * steps_per_epoch))
    return f


def penalty(model, l1, l2):
    """notebook 002's weight penalties: L1 * sum|w| + L2 * sum w^2 over all parameters. (The notebook
    used the unsquared norm for its L2 term; the squared one is the usual L2 penalty.)"""
    params = list(model.parameters())
    total = 0.0
    if l1:
        total = total + l1 * sum(p.abs().sum() for p in params)
    if l2:
        total = total + l2 * sum(p.pow(2).sum() for p in params)
    return total


# ---------------------------------------------------------------------------------------------
# Evaluation and early stopping
# ---------------------------------------------------------------------------------------------


def evaluate(learner, data, tta=False):
    """Loss and accuracy of the weights (and the EMA weights) on each split that has images. Under
    torchrun each rank scores a slice and the sums are added up, so the figures are one process's."""
    row = {}
    models = [("", learner.model)] + ([("ema_", learner.ema.module)] if learner.ema is not None else [])
    for prefix, model in models:
        if DDP:  # BatchNorm statistics move on each rank's batches: rank 0's are the ones saved
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)
        for split, (images, labels) in data.splits.items():
            if not len(labels):
                continue
            lo, hi = len(labels) * RANK // WORLD, len(labels) * (RANK + 1) // WORLD
            logp = log_probs(
                model,
                images[lo:hi],
                *data.norm,
                tta=tta,
                flips=data.info.flips,
                channels_last=learner.channels_last,
                autocast=learner.autocast,
            )
            if not DDP:
                loss, acc = score(logp, labels)
            else:
                loss_sum, right, _ = sums_of(
                    F.nll_loss(logp, labels[lo:hi], reduction="sum") if hi > lo else 0.0,
                    (logp.argmax(1) == labels[lo:hi]).sum() if hi > lo else 0,
                    0,
                )
                loss, acc = loss_sum / len(labels), 100.0 * right / len(labels)
            row[f"{prefix}{split}_loss"], row[f"{prefix}{split}_acc"] = loss, acc
    return row


def stop_reason(row, args, history, ema):
    """Why training should stop after this epoch, or None; HISTORY carries the patience state."""
    if args.stop_loss is not None and row["train_loss"] < args.stop_loss:
        return f"the mean training loss {row['train_loss']:.4f} fell below --stop-loss {args.stop_loss:g}"
    key = "ema_val" if ema else "val"
    if args.stop_val_acc is not None and row[f"{key}_acc"] >= args.stop_val_acc:
        return f"validation accuracy {row[f'{key}_acc']:.2f} % reached --stop-val-acc {args.stop_val_acc:g}"
    if args.patience is not None:
        if history.best_val_loss is None or row[f"{key}_loss"] < history.best_val_loss:
            history.best_val_loss, history.best_epoch, history.bad_epochs = row[f"{key}_loss"], row["epoch"], 0
        else:
            history.bad_epochs += 1
            if history.bad_epochs >= args.patience:
                return (
                    f"validation loss has not improved for {args.patience} epochs (best "
                    f"{history.best_val_loss:.4f} at epoch {history.best_epoch})"
                )
    return None


def epoch_line(row, epochs):
    """One line per epoch: train, val and test loss/accuracy, lr, time and speed."""
    parts = [f"epoch {row['epoch']:>3}/{epochs}"]
    parts.append(
        f"train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f} %" if "train_loss" in row else "untrained"
    )
    for prefix in ("", "ema_"):
        for split in ("val", "test"):
            if f"{prefix}{split}_loss" in row:
                name = f"{'EMA ' if prefix else ''}{split}"
                parts.append(f"{name} loss {row[f'{prefix}{split}_loss']:.4f} acc {row[f'{prefix}{split}_acc']:.2f} %")
    if "lr" in row:
        parts.append(f"lr {row['lr']:.2e}  {row['seconds']:.1f} s  {row['images_per_s']:,.0f} img/s")
    return "  ".join(parts)


# ---------------------------------------------------------------------------------------------
# Checkpoints: saved at the end of an epoch and restored, side by side
# ---------------------------------------------------------------------------------------------


def save(path, learner, args, data, history):
    """checkpoint.py's self-describing record (model, weights, data, flags, history), plus what
    continuing the run needs: the optimizer, EMA and scaler state, and the early-stopping state. The
    random streams need no saving: data order, augmentation and dropout are seeded per epoch."""
    record = {
        "dataset": data.info.name,
        "mean": data.norm[0],
        "std": data.norm[1],
        "classes": list(data.info.classes),
        "input_shape": [1, 28, 28],
        "rule": data.info.rule,
        "test": data.test_source,
    }
    ckpt = make_checkpoint(learner.model, args, record, history.rows, learner.ema)
    ckpt["optimizer"] = learner.optimizer.state_dict()
    ckpt["stopping"] = {k: v for k, v in asdict(history).items() if k != "rows" and v is not None}
    ckpt["scaler"] = learner.scaler.state_dict() if learner.scaler is not None else None
    if learner.ema is not None:
        ckpt["ema_steps"] = int(learner.ema.n_averaged)
    save_checkpoint(ckpt, path)


def restore(ckpt, learner):
    """The other way: the weights, optimizer, EMA and scaler state into LEARNER; returns the History."""
    learner.model.load_state_dict(ckpt["state_dict"])
    problem = optimizer_problem(ckpt["optimizer"], list(learner.model.parameters()))
    if problem:
        raise ValueError(f"its optimizer state {problem}")
    learner.optimizer.load_state_dict(ckpt["optimizer"])
    if learner.ema is not None:
        learner.ema.module.load_state_dict(ckpt["ema_state_dict"])
        learner.ema.n_averaged.fill_(ckpt["ema_steps"])
    if learner.scaler is not None and ckpt.get("scaler"):
        learner.scaler.load_state_dict(ckpt["scaler"])
    known = {f.name for f in fields(History)} - {"rows"}
    return History(list(ckpt["history"]), **{k: v for k, v in (ckpt.get("stopping") or {}).items() if k in known})


def optimizer_problem(saved, params):
    """What makes SAVED, an optimizer's state_dict, unfit for the model's PARAMS, or None. Checked before
    loading, which copies each tensor to its parameter's device and type (an 8-byte tensor of zero stride
    would become gigabytes), while a tensor of the wrong shape would fail only at the first step."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not (isinstance(groups, list) and isinstance(saved.get("state"), dict)):
        return "is not an optimizer's"
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        return "has malformed parameter groups"
    if not all(plain({k: v for k, v in g.items() if k != "params"}, 2, [10_000]) for g in groups):
        return "has settings that are not plain numbers"
    if sum(len(g["params"]) for g in groups) != len(params):
        return "is for a model with another number of parameters"
    for index, entry in saved["state"].items():
        i = int(index) if isinstance(index, int) or (isinstance(index, str) and index.isdigit()) else -1
        if not (0 <= i < len(params) and isinstance(entry, dict)):
            return "names parameters the model does not have"
        for key, value in entry.items():
            if not torch.is_tensor(value):
                if not isinstance(value, SCALARS):
                    return f"has a {key!s:.40} that is neither a tensor nor a number"
                continue
            if key == "step" and value.numel() == 1:
                continue
            if value.shape != params[i].shape:
                return f"has {key!s:.40} of shape {list(value.shape)} for a parameter of {list(params[i].shape)}"
            if value.untyped_storage().nbytes() < value.numel() * value.element_size():
                return f"has {key!s:.40} whose elements overlap in memory, which no optimizer saves"
    return None


# ---------------------------------------------------------------------------------------------
# The run folder: its lock, args.json and the CSV logs
# ---------------------------------------------------------------------------------------------

RUN_FILES = ("last.pt", "best.pt", "log.csv", "steps.csv", "args.json")
RUN_KEYS = {"model", "dataset", "epochs", "batch_size", "optimizer", "seed"}  # in every args.json of ours
STEP_COLUMNS = ["step", "epoch", "train_loss", "train_acc", "lr", "images_per_s"]
_locks = {}  # run folder -> its open lock file; the lock lasts until released or the process ends


def open_folder(args, rows, last_step, source, in_place):
    """The run folder, locked: a new one, or the resumed run's own (SOURCE, when IN_PLACE). args.json is
    written, log.csv rebuilt from the checkpoint's ROWS and steps.csv cut back to LAST_STEP, so that
    neither shows what was never saved."""
    if in_place:
        lock_folder(source)
    out = source if in_place else prepare_out(args)
    write_text_atomic(json.dumps(vars(args), indent=1) + "\n", os.path.join(out, "args.json"))
    write_text_atomic(csv_text(rows, log_columns(args), header=True), os.path.join(out, "log.csv"))
    steps = []
    if last_step:
        try:
            steps = [r for r in read_log(os.path.join(source, "steps.csv")) if int(r["step"]) <= last_step]
        except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: its rows cannot be trusted
            pass
    write_text_atomic(csv_text(steps, STEP_COLUMNS, header=True), os.path.join(out, "steps.csv"))
    return out


def prepare_out(args):
    """Create the run folder. A folder holding another run is refused unless --overwrite."""
    data = os.path.splitext(os.path.basename(args.dataset.rstrip("/\\")))[0] or "data"  # a name, or a path's last part
    out = args.out or os.path.join("runs", f"{data}-{args.model}-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder; choose another --out", 2)
    existing = [f for f in RUN_FILES if os.path.lexists(os.path.join(out, f))]
    if existing and not args.overwrite:
        raise UserError(
            f"--out {out} already holds a run ({', '.join(existing)}); pass --resume {out} to "
            f"continue it, --overwrite to replace it, or choose another --out",
            2,
        )
    if existing and read_run_args(out) is None:
        raise UserError(
            f"--out {out} holds {', '.join(existing)} but no args.json of a train.py run, so they are "
            f"not a run of ours; --overwrite replaces only a run folder: choose another --out",
            2,
        )
    make_folder(out, "--out")
    lock_folder(out)  # before anything of a running run could be removed
    try:
        probe = os.path.join(out, f".write-test.{os.getpid()}.{time.monotonic_ns()}")  # a name no file of yours has
        open_new(probe).close()
        os.remove(probe)
        for f in existing:
            os.remove(os.path.join(out, f))
    except (OSError, WriteError) as e:
        reason = e.strerror if isinstance(e, OSError) else str(e).split(": ", 1)[-1]
        raise UserError(f"cannot write to --out {out} ({reason}); choose a writable folder") from None
    return out


def lock_folder(out):
    """Hold an exclusive lock on OUT/.lock (which records our pid), so a second train.py cannot write
    into a folder whose run is still going. The kernel drops the lock when its process dies, so the
    file left by a killed run does not block. Where fcntl is missing (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:
        return
    path = os.path.join(out, ".lock")
    try:  # never through a symlink planted at the name: the pid would be written into its target
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644), "r+")
    except OSError as e:
        raise UserError(f"cannot write to {out} ({e.strerror}); choose a writable folder") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise UserError(
            f"{out} is in use by a train.py that is still running (pid {pid}); wait for it to end "
            f"or stop it, or choose another --out",
            2,
        ) from None
    f.seek(0)
    if not re.fullmatch(r"\d*\s*", f.read(64)):  # a .lock of the user's own, not a pid that train.py wrote
        f.close()
        raise UserError(f"{out} holds a .lock file that train.py did not write; choose another --out", 2)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _locks[os.path.abspath(out)] = f
    remove_temporaries(out, RUN_FILES)  # a save cut off by a kill left its half-written file


def release_folders():
    """Drop this process's folder locks (train.main ends; tests run it many times in one process)."""
    while _locks:
        _locks.popitem()[1].close()


def read_run_args(folder):
    """The flags in FOLDER/args.json when it is one that train.py wrote, else None."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and RUN_KEYS <= set(saved) else None


def log_columns(args):
    """log.csv's columns: fixed by the run's flags, so that every row has the same fields."""
    splits = (["val"] if args.val else []) + ["test"]
    evals = [f"{s}_{m}" for s in splits for m in ("loss", "acc")]
    ema = [f"ema_{c}" for c in evals] if args.ema else []
    return ["epoch", "train_loss", "train_acc", *evals, *ema, "lr", "seconds", "images_per_s"]


def csv_text(rows, columns, header):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def append_rows(out, name, rows, columns):
    """Rows at the end of OUT/NAME, a CSV log; if the write fails, the file is cut back to what it was."""
    path = os.path.join(out, name)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    try:  # O_NOFOLLOW: a symlink planted at the name is refused, not appended to
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        with os.fdopen(os.open(path, flags, 0o644), "a") as f:
            f.write(csv_text(rows, columns, header=False))
    except OSError as e:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise WriteError(write_problem(path, e)) from None


def log_to_tensorboard(tb, row, step_rows, step):
    """The epoch's figures at its last global step, and its step rows, for TensorBoard (--tensorboard)."""
    for key, value in row.items():
        if key.endswith(("_loss", "_acc")):
            tb.add_scalar(f"epoch/{key}", value, step)
    for r in step_rows:
        for key in ("train_loss", "train_acc", "lr", "images_per_s"):
            tb.add_scalar(f"step/{key}", r[key], r["step"])
    tb.flush()


# ---------------------------------------------------------------------------------------------
# torchrun: one process per GPU (or CPU slot); rank 0 prints and writes, every rank steps alike
# ---------------------------------------------------------------------------------------------


def rank_device(name):
    """This rank's device under torchrun: cuda:LOCAL_RANK for CUDA, else the CPU."""
    device = pick_device(name)
    if device.type == "mps":
        raise UserError(
            "distributed training runs on CUDA GPUs (NCCL) or the CPU (gloo), not on MPS; "
            "pass --device cpu, or train in one process with --device mps",
            2,
        )
    if device.type == "cuda":
        if LOCAL_RANK >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started more processes on this node than its {torch.cuda.device_count()} "
                f"CUDA device(s); use --nproc_per_node={torch.cuda.device_count()}",
                2,
            )
        device = torch.device("cuda", LOCAL_RANK)
        torch.cuda.set_device(device)
    return device


def meet(failure, out):
    """The end of set-up under torchrun: every rank learns whether any failed (the first failure is
    raised on all of them) and where rank 0 put the run folder."""
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, (describe_error(failure) if failure is not None else None, out))
    failed = [(r, f) for r, (f, _) in enumerate(gathered) if f is not None]
    if failed:
        r, (message, code) = failed[0]
        raise UserError(message if r == 0 else f"rank {r}: {message}", code)
    return gathered[0][1]


def agree(first_bad, stop):
    """(first step with a non-finite loss on any rank or -1, whether any rank was asked to stop); every
    rank calls it at the same steps."""
    never = torch.iinfo(torch.int64).max
    flags = torch.stack(
        [
            torch.where(first_bad >= 0, first_bad, never).to(torch.int64),
            torch.tensor(-1 if stop else 0, device=first_bad.device),
        ]
    )
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return (-1 if flags[0] == never else int(flags[0])), bool(flags[1] < 0)


def restart_command():
    """How to start this run again, for the resume hint."""
    if not DDP:
        return "python"
    if int(os.environ.get("LOCAL_WORLD_SIZE", WORLD)) == WORLD:
        return f"torchrun --standalone --nproc_per_node={WORLD}"
    return "torchrun (with the same --nnodes, --nproc_per_node and --rdzv-* options)"


def run_rank(argv):
    """train.py as one of torchrun's processes: join the group, train, leave the group whatever happens.
    Rank 0 prints for all of them; the others print nothing unless --debug asks for their output."""
    out, err = sys.stdout, sys.stderr
    if RANK and "--debug" not in argv:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(
            f"train.py: error: rank {RANK} could not join the other processes ({first}); check that every node "
            f"reaches torchrun's --rdzv-endpoint",
            file=err,
        )
        return 1
    try:
        return run(main, argv)
    finally:
        gc.collect()  # free the DDP wrapper while the group lives: gloo torn down at exit aborts the process
        dist.destroy_process_group()
        sys.stdout, sys.stderr = out, err


if __name__ == "__main__":
    if DDP:  # started by torchrun
        sys.exit(run_rank(sys.argv[1:]))
    sys.exit(run(main))
