"""Train a registry model on an MNIST-style dataset, on CPU, CUDA or MPS.

    python train.py --model cnn --epochs 5 --device mps
    python train.py --model tiny --dataset fashion-mnist --data-dir ../shared/datasets --val 5000
    python train.py --resume runs/mnist-cnn-20261122-101500      # continue where it stopped

Writes DIR/log.csv (a row per epoch), DIR/args.json, DIR/last.pt after every epoch, and
DIR/best.pt (by validation accuracy) when --val is set. DIR is --out, or runs/<dataset>-<model>-<time>.
Under torchrun it trains with DDP, --batch-size being the global batch (see distributed.py):

    torchrun --standalone --nproc_per_node=4 train.py --model cnn --batch-size 512
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import distributed
from common import (MODEL_OPTIONS, Parser, UserError, checkpoint_path, load_checkpoint, make_checkpoint, model_kwargs,
                    non_negative, positive, rng_state, save_atomic)
from data import DATASETS, Augment, Batches, dataset_info, load_split, normalization, split_off_val
from evaluate import predict_logits, score
from models import count_params, get_model, list_models, model_options
from runlog import append_row, epoch_line, log_columns, prepare_out, rewrite_log, write_args

# Adam-family 3e-3: with a cosine schedule over a short budget it beat 1e-3 and 2e-3 here (cnn, 1 epoch).
DEFAULT_LR = {"sgd": 0.01, "adam": 3e-3, "adamw": 3e-3, "radam": 3e-3, "adadelta": 1.0}
# Flags a resumed run may change; every other flag must match the checkpoint's.
RESUME_MAY_CHANGE = {"epochs", "device", "data_dir", "resume", "debug", "save_every", "compile", "progress"}


def build_parser():
    p = Parser(prog="train.py", description="Train a model from models.py on an MNIST-style dataset.")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="cnn", choices=list_models(), help="architecture (default: cnn)")
    g.add_argument("--dropout", type=non_negative(float), help="dropout probability, for models that have "
                   "dropout (default: the model's own)")
    g.add_argument("--width", type=positive(int), help="maps in the first stage, for vgg and resnet (default: "
                   "the model's own)")
    g.add_argument("--depth", type=positive(int), help="blocks per stage, for resnet (default: the model's own)")
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

    g = p.add_argument_group("optimization")
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

    g = p.add_argument_group("regularization")
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
    g.add_argument("--ema", type=non_negative(float), default=0.0,
                   help="keep an exponential moving average of the weights with this decay, e.g. 0.999; "
                   "it is evaluated and saved beside the raw weights (default: 0, off)")

    g = p.add_argument_group("stopping and evaluation")
    g.add_argument("--stop-loss", type=positive(float), help="stop once an epoch's mean training loss "
                   "(penalties included) falls below this (notebook 002: 0.38)")
    g.add_argument("--stop-val-acc", type=positive(float), help="stop once validation accuracy (%%) reaches this")
    g.add_argument("--patience", type=positive(int), help="stop after this many epochs without a lower "
                   "validation loss")
    g.add_argument("--eval-untrained", action="store_true", help="evaluate the untrained model first "
                   "(epoch 0 in the log), as notebook 001 does")

    g = p.add_argument_group("speed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto, an "
                   "accelerator when present)")
    g.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"],
                   help="mixed precision; fp16 adds a gradient scaler (default: off)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (checkpoints stay plain)")
    g.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                   help="NHWC memory layout; auto turns it on where it measured faster: CPU, and CUDA "
                   "with --amp (default: auto)")

    g = p.add_argument_group("output")
    g.add_argument("--out", help="run folder (default: runs/<dataset>-<model>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    g.add_argument("--resume", metavar="DIR_OR_CKPT", help="continue a run from its last.pt (or this checkpoint)")
    g.add_argument("--save-every", type=non_negative(int), default=0,
                   help="also save last.pt every N steps inside an epoch (default: 0, at epoch ends only)")
    g.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress line during epochs: in place on a terminal, every 30 s otherwise (default: auto)")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def check_args(args):
    """Cross-flag checks that argparse cannot do alone."""
    def bad(message):
        raise UserError(message, 2)
    for option in MODEL_OPTIONS:
        if getattr(args, option) is not None and option not in model_options(args.model):
            bad(f"--{option}: model {args.model!r} has no {option} option; models with one: "
                f"{', '.join(m for m in list_models() if option in model_options(m))}")
    if args.dropout is not None and args.dropout >= 1:
        bad(f"--dropout must be below 1, got {args.dropout}")
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
    if args.translate > 0.5:
        bad(f"--translate is a fraction of the image side; above 0.5 the digit can leave it, got {args.translate}")
    if args.stop_val_acc is not None and args.stop_val_acc > 100:
        bad(f"--stop-val-acc is a percentage, at most 100, got {args.stop_val_acc}")


def find_resume(path):
    """(checkpoint or None, run folder, saved arguments) for --resume. A run killed before its first
    save has args.json but no last.pt: it is started over with the same arguments."""
    args_file = os.path.join(path, "args.json")
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "last.pt")) and os.path.exists(args_file):
        try:
            with open(args_file) as f:
                return None, os.path.abspath(path), json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"{args_file} cannot be read ({e}); start a new run instead") from None
    ckpt = load_checkpoint(path)
    return ckpt, os.path.dirname(os.path.abspath(checkpoint_path(path))), ckpt["args"]


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
# Learning rate, optimizer, augmentation
# ---------------------------------------------------------------------------------------------

def lr_factor(step, steps_per_epoch, total_steps, args):
    """Multiplier of the peak lr at a global step; a pure function of the step, so resume is exact."""
    epoch = step // steps_per_epoch
    if args.scheduler == "step":
        f = args.gamma ** (epoch // args.step_size)
    elif args.scheduler == "exp":
        f = args.gamma ** epoch
    elif args.scheduler == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * step / total_steps))
    elif args.scheduler == "onecycle":   # the shape of torch's OneCycleLR: 25 % rise, cosine both ways
        rise = max(1, int(0.25 * total_steps))
        if step < rise:
            f = 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / rise)) / 2
        else:
            t = (step - rise) / max(1, total_steps - rise)
            f = 1 / 25e4 + (1 - 1 / 25e4) * (1 + math.cos(math.pi * t)) / 2
    else:
        f = 1.0
    if args.warmup:
        f *= min(1.0, (step + 1) / (args.warmup * steps_per_epoch))
    return f


def build_optimizer(model, args):
    params, lr, wd = model.parameters(), args.lr, args.weight_decay
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=wd)
    if args.optimizer == "adam":
        return torch.optim.Adam(params, lr, weight_decay=wd)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr, weight_decay=wd)
    if args.optimizer == "radam":
        return torch.optim.RAdam(params, lr, weight_decay=wd, decoupled_weight_decay=True)
    return torch.optim.Adadelta(params, lr, weight_decay=wd)


def build_augment(args, info):
    flip = info.flips and args.augment if args.flip is None else args.flip
    if not (args.augment or args.erase or flip):
        return None
    on = args.augment
    return Augment(args.rotate if on else 0, args.translate if on else 0, args.scale if on else 0, args.erase, flip)


def penalty(model, args):
    """notebook 002's weight penalties: L1 * sum|w| + L2 * sum w^2 over all parameters. (The notebook
    used the unsquared norm for its L2 term; the squared one is the usual L2 penalty.)"""
    params = list(model.parameters())
    total = 0.0
    if args.l1:
        total = total + args.l1 * sum(p.abs().sum() for p in params)
    if args.l2:
        total = total + args.l2 * sum(p.pow(2).sum() for p in params)
    return total


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

class Stop(Exception):
    """Ends training before the last epoch: divergence (code 1) or Ctrl-C (code 130)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


def train_one_epoch(r, batches, epoch, start, partial, args):
    """One pass over the training batches from batch `start`. Metrics are summed on the device and
    read back only for checks and the progress line, so an accelerator never waits on every step."""
    r.model.train()
    steps, device = len(batches), r.device
    loss_sum = torch.tensor(partial["loss_sum"], device=device)
    correct = torch.tensor(partial["correct"], device=device)
    seen, seconds = partial["seen"], partial["seconds"]
    first_bad = torch.tensor(-1, device=device)   # first step whose loss was not finite
    check_every = 1 if device.type == "cpu" else 50   # .item() is free on the CPU, a sync elsewhere
    t0 = last_print = time.perf_counter()
    penalized = args.l1 or args.l2

    def totals():   # (loss sum, correct, seen) of the epoch so far, over all ranks
        if r.dist is None:
            return loss_sum.item(), int(correct.item()), seen
        total_loss, total_correct, total_seen = distributed.sum_all(r.dist, device, loss_sum, correct, seen)
        return total_loss, int(total_correct), int(total_seen)

    def snapshot():
        total_loss, total_correct, total_seen = totals()
        return {"loss_sum": total_loss, "correct": total_correct, "seen": total_seen,
                "seconds": seconds + time.perf_counter() - t0}

    lr = args.lr
    for i, (x, y) in enumerate(batches.epoch(epoch - 1, start), start):
        lr = args.lr * lr_factor((epoch - 1) * steps + i, steps, steps * args.epochs, args)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        with r.autocast:
            logits = r.step_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
        if penalized:
            loss = loss + penalty(r.model, args)
        # DDP averages the ranks' gradients; weighting each rank's mean by its share of the global batch
        # makes that average the gradient of the global batch's mean loss, even when shares differ.
        grad_loss = loss if r.dist is None else loss * (len(y) * r.dist.size / batches.global_len(i))
        r.optimizer.zero_grad(set_to_none=True)
        if r.scaler:
            r.scaler.scale(grad_loss).backward()
            if args.clip_grad:
                r.scaler.unscale_(r.optimizer)
        else:
            grad_loss.backward()
        if args.clip_grad:
            torch.nn.utils.clip_grad_norm_(r.model.parameters(), args.clip_grad)
        if r.scaler:
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            r.optimizer.step()
        if r.ema is not None:
            r.ema.update_parameters(r.model)

        loss = loss.detach().float()
        first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), i, first_bad)
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        periodic = args.save_every and (i + 1) % args.save_every == 0 and i + 1 < steps
        check = periodic or (i + 1) % check_every == 0 or i + 1 == steps
        interrupted = r.interrupted
        if r.dist is not None:   # all ranks check at the same steps and act on what any of them saw
            interrupted = False
            if check:
                first_bad, interrupted = distributed.agree(r.dist, first_bad, r.interrupted)
        saving = interrupted or periodic
        if saving or check:   # never save weights after a bad step
            if int(first_bad) >= 0:
                last = os.path.join(r.out, "last.pt")
                kept = (f"{last} still holds the last good state" if os.path.exists(last)
                        else "nothing was saved")
                raise Stop(f"the loss became {'nan' if loss.isnan() else 'inf'} at epoch {epoch}, step "
                           f"{int(first_bad) + 1} of {steps}: training diverged and {kept}. "
                           f"Try a lower --lr (this run used {args.lr:g}) or --clip-grad 1", 1)
        if interrupted:
            r.save(epoch - 1, i + 1, snapshot())
            raise Stop(f"interrupted at epoch {epoch}, step {i + 1} of {steps}; saved {r.out}/last.pt. "
                       f"Continue with: {distributed.command(r.dist)} train.py --resume {r.out}", 130)
        if saving:
            r.save(epoch - 1, i + 1, snapshot())
        now = time.perf_counter()
        if r.progress and now - last_print > r.progress:
            last_print = now
            print(f"  epoch {epoch} step {i + 1}/{steps}  loss {loss_sum.item() / seen:.4f}  "
                  f"{(seen - partial['seen']) / (now - t0):,.0f} img/s", end="\r" if r.progress < 1 else "\n",
                  flush=True)
    if r.progress and r.progress < 1:
        print(" " * 72, end="\r")
    elapsed = time.perf_counter() - t0
    loss_total, correct_total, seen = totals()
    return {"train_loss": loss_total / max(seen, 1), "train_acc": 100.0 * correct_total / max(seen, 1),
            "lr": lr, "seconds": seconds + elapsed, "images_per_s": (seen - partial["seen"]) / max(elapsed, 1e-9)}


def evaluate_row(r, splits, norm):
    """Loss and accuracy of the raw (and EMA) weights on each split that has images."""
    row = {}
    models = [("", r.model)] + ([("ema_", r.ema.module)] if r.ema is not None else [])
    for prefix, model in models:
        for split, (x, y) in splits.items():
            if len(y) and r.dist is not None:   # each rank scores a slice; the sums are all-reduced
                row[f"{prefix}{split}_loss"], row[f"{prefix}{split}_acc"] = distributed.evaluate(
                    r.dist, model, x, y, norm, channels_last=r.channels_last, autocast=r.autocast)
            elif len(y):
                logits = predict_logits(model, x, *norm, channels_last=r.channels_last, autocast=r.autocast)
                row[f"{prefix}{split}_loss"], row[f"{prefix}{split}_acc"] = score(logits, y)
    return row


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
    world = distributed.current()   # None unless torchrun started this process
    parser = build_parser()
    args = parser.parse_args(argv)
    resumed, run_dir = None, None
    if args.resume:
        if args.out:
            raise UserError("--resume continues in the run's own folder; drop --out", 2)
        resumed, run_dir, saved = distributed.on_rank0(world, find_resume, args.resume)
        args = resume_args(parser, argv, saved)
    check_args(args)
    distributed.check_args(world, args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]

    device = distributed.pick_device(args.device, world)
    torch.manual_seed(args.seed)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    channels_last = args.channels_last == "on" or (
        args.channels_last == "auto" and (device.type == "cpu" or (device.type == "cuda" and args.amp != "off")))

    # Data: whole splits as uint8 on the device.
    info = dataset_info(args.dataset)
    distributed.fetch_data(world, args.dataset, args.data_dir)
    images, labels = load_split(args.dataset, "train", args.data_dir, device)
    if args.val >= len(labels):
        raise UserError(f"--val {args.val} leaves nothing to train on: the training set has {len(labels):,} images", 2)
    (images, labels), (val_images, val_labels) = split_off_val(images, labels, args.val)
    test_images, test_labels = load_split(args.dataset, "test", args.data_dir, device)
    if args.subset:
        images, labels = images[:args.subset], labels[:args.subset]
        test_images, test_labels = test_images[:args.subset], test_labels[:args.subset]
    norm = {"dataset": normalization(args.dataset, args.data_dir), "mnist": normalization("mnist"),
            "unit": (0.0, 1.0), "raw": (0.0, 1 / 255)}[args.norm]
    batches = Batches(images, labels, args.batch_size, *norm, shuffle=True, seed=args.seed,
                      augment=build_augment(args, info), drop_last=args.drop_last, channels_last=channels_last,
                      rank=world.rank if world else 0, world_size=world.size if world else 1)
    if len(batches) == 0:
        raise UserError(f"--batch-size {args.batch_size} with --drop-last leaves no batch of "
                        f"{len(labels):,} training images", 2)
    splits = {"val": (val_images, val_labels), "test": (test_images, test_labels)}

    # Model and everything that steps it.
    model = get_model(args.model, **model_kwargs(args, len(info.classes))).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    r = SimpleNamespace(
        model=model, step_model=torch.compile(model) if args.compile else model, device=device,
        optimizer=build_optimizer(model, args), channels_last=channels_last,
        ema=AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None,
        autocast=torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext(),
        scaler=torch.amp.GradScaler(device.type) if args.amp == "fp16" else None,
        interrupted=False, out=None, save=None, dist=world,
        progress={"on": 0.5, "off": 0, "auto": 0.5 if sys.stdout.isatty() else 30}[args.progress])

    history, stopping, start_epoch, start_step, partial = [], {}, 1, 0, None
    if resumed:
        r.out = run_dir
        model.load_state_dict(resumed["state_dict"])
        r.optimizer.load_state_dict(resumed["optimizer"])
        if r.ema is not None:
            r.ema.module.load_state_dict(resumed["ema_state_dict"])
            r.ema.n_averaged.fill_(resumed["ema_steps"])
        if r.scaler is not None and resumed.get("scaler"):
            r.scaler.load_state_dict(resumed["scaler"])
        distributed.restore_rng(world, resumed, device)
        history, stopping = resumed["history"], resumed["stopping"]
        start_epoch, start_step, partial = resumed["epoch"] + 1, resumed["step"], resumed["partial_epoch"]
        if world and world.rank:   # the saved partial sums are global: count them once, on rank 0
            partial = None
        # the checkpoint is the record; drop unsaved rows
        distributed.on_rank0(world, rewrite_log, r.out, history, log_columns(args))
        if stopping.get("stopped") or start_epoch > args.epochs:
            why = stopping.get("stopped") or f"it finished epoch {resumed['epoch']} of {args.epochs}"
            print(f"{r.out} is complete ({why}); pass a larger --epochs to train further")
            return 0
        print(f"resuming {r.out} at epoch {start_epoch}, step {start_step}")
    else:
        def start_folder():
            out = run_dir or prepare_out(args)   # a resumed run that never saved starts over in place
            write_args(out, args)
            rewrite_log(out, [], log_columns(args))
            return out
        r.out = distributed.on_rank0(world, start_folder)   # rank 0 decides; every rank learns the outcome
        distributed.seed_rank(world, args.seed)
    partial = partial or {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}

    def save(epoch_done, step, partial_state, name="last.pt"):
        rngs = distributed.gather(world, rng_state(device))   # each rank's dropout stream

        def write():
            extra = {"stopping": stopping, "rng": rngs[0], "scaler": r.scaler.state_dict() if r.scaler else None}
            if world:
                extra["rng_ranks"] = rngs
            if r.ema is not None:
                extra.update(ema_state_dict=r.ema.module.state_dict(), ema_steps=int(r.ema.n_averaged))
            ckpt = make_checkpoint(model, r.optimizer, args, info, norm, history, epoch_done, step, partial_state, extra)
            save_atomic(ckpt, os.path.join(r.out, name))
        distributed.on_rank0(world, write)   # only rank 0 writes; a failed write stops every rank
    r.save = save

    def on_sigint(signum, frame):
        if r.interrupted:       # a second Ctrl-C quits at once; the last save is whole anyway
            raise KeyboardInterrupt
        r.interrupted = True
        print("\nCtrl-C: saving at the end of this step (press again to quit now)", file=sys.stderr, flush=True)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    if world:   # torchrun passes Ctrl-C on as SIGINT, and a scheduler stops jobs with SIGTERM
        previous_term = signal.signal(signal.SIGTERM, on_sigint)
        r.step_model = distributed.ready(world, model, device, args.compile)
    print(f"{args.model} ({count_params(model):,} parameters) on {args.dataset}: {len(labels):,} train, "
          f"{len(val_labels):,} val, {len(test_labels):,} test images; {device}{distributed.describe(world)}; "
          f"run folder {r.out}")
    columns, best_key = log_columns(args), "ema_val_acc" if args.ema else "val_acc"
    try:
        if args.eval_untrained and not history:
            history.append({"epoch": 0, **evaluate_row(r, splits, norm)})
            distributed.on_rank0(world, append_row, r.out, history[-1], columns)
            print(epoch_line(history[-1], args))
        for epoch in range(start_epoch, args.epochs + 1):
            row = {"epoch": epoch, **train_one_epoch(r, batches, epoch, start_step, partial, args)}
            start_step, partial = 0, {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            row.update(evaluate_row(r, splits, norm))
            history.append(row)
            reason = stop_reason(row, args, stopping)
            if reason:
                stopping["stopped"] = reason
            if args.val and row[best_key] > stopping.get("best_val_acc", -1.0):
                stopping["best_val_acc"] = row[best_key]
                save(epoch, 0, None, "best.pt")   # before last.pt: a crash between them redoes this epoch
            save(epoch, 0, None)
            distributed.on_rank0(world, append_row, r.out, row, columns)
            print(epoch_line(row, args))
            if reason:
                print(f"stopping after epoch {epoch}: {reason}")
                break
    except Stop as stop:
        print(f"train.py: {'error: ' if stop.code == 1 else ''}{stop}", file=sys.stderr)
        return stop.code
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if world:
            signal.signal(signal.SIGTERM, previous_term)
    last = history[-1]
    ema = f" (EMA weights {last['ema_test_acc']:.2f} %)" if args.ema else ""
    print(f"done: test accuracy {last['test_acc']:.2f} %{ema} after epoch {last['epoch']}; "
          f"checkpoint {r.out}/last.pt, log {r.out}/log.csv")
    return 0


if __name__ == "__main__":
    sys.exit(distributed.launch(main))   # common.run(main), or DDP under torchrun
