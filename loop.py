"""The hand-written training and evaluation loops that train.py runs and bench.py times.

    run = Run(args, model, model, optimizer, device, info, norm)
    row = train_one_epoch(run, batches, epoch=1)             # train loss and accuracy, lr, speed
    row.update(evaluate_splits(run, {"test": (x_u8, y)}))    # test loss and accuracy

A Run names what every step needs: the model and what steps it (compiled or wrapped in DDP), the
optimizer, precision, the run folder. The learning rate is a pure function of the global step, and
data order and augmentation are seeded per step, so a run saved mid-epoch resumes exactly.
"""
import argparse
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import distributed
from checkpoint import make_checkpoint, rng_state, save_checkpoint
from cli import close_stdout
from data import Batches
from runlog import append_steps

# Adam-family 3e-3: with a cosine schedule over a short budget it beat 1e-3 and 2e-3 here (cnn, 1 epoch).
DEFAULT_LR = {"sgd": 0.01, "adam": 3e-3, "adamw": 3e-3, "radam": 3e-3, "adadelta": 1.0}


@dataclass
class Run:
    """What the loop steps, and where it saves."""
    args: argparse.Namespace          # the resolved flags; saved in every checkpoint
    model: torch.nn.Module            # the plain module: what is saved and evaluated
    step_model: torch.nn.Module       # what the steps call: the model, compiled, or wrapped in DDP
    optimizer: object                 # optimizers.build_optimizer's
    device: torch.device
    info: object                      # data.DatasetInfo of the training set
    norm: tuple                       # (mean, std) on the 0..1 scale
    ema: torch.nn.Module = None       # torch.optim.swa_utils.AveragedModel, with --ema
    autocast: object = field(default_factory=nullcontext)
    scaler: torch.amp.GradScaler = None
    channels_last: bool = False
    world: distributed.World = None   # None in one process
    out: str = None                   # the run folder
    progress: float = 0               # seconds between progress lines; below 1, updated in place
    history: list = field(default_factory=list)    # one dict per finished epoch
    stopping: dict = field(default_factory=dict)   # early-stopping state, saved with the run
    stop: tuple = None                # (why, exit code) once a signal asks to save and stop
    log_every: int = 0                # steps between rows of steps.csv; 0: none
    tb: object = None                 # a torch.utils.tensorboard SummaryWriter, with --tensorboard (rank 0)


class Stop(Exception):
    """Ends training before the last epoch: divergence (code 1), or a signal (130 for Ctrl-C)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Learning rate, optimizer, penalties
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

def empty_partial():
    """The running sums of an epoch before its first step (saved as `partial_epoch` mid-epoch)."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def train_step(run, x, y, lr, global_share):
    """Forward, backward and one optimizer step at learning rate `lr`; returns (loss, logits)."""
    args = run.args
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with run.autocast:
        logits = run.step_model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=args.label_smoothing)
    if args.l1 or args.l2:
        loss = loss + penalty(run.model, args)
    # DDP averages the ranks' gradients; weighting each rank's mean by its share of the global batch
    # makes that average the gradient of the global batch's mean loss, even when shares differ.
    grad_loss = loss if run.world is None else loss * global_share
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler:
        run.scaler.scale(grad_loss).backward()
        if args.clip_grad:
            run.scaler.unscale_(run.optimizer)
    else:
        grad_loss.backward()
    if args.clip_grad:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), args.clip_grad)
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    if run.ema is not None:
        run.ema.update_parameters(run.model)
    return loss.detach().float(), logits


class EpochSums:
    """The running loss, correct count and images of an epoch, summed on the device so that an
    accelerator is never made to wait on every step; read back only at checks."""

    def __init__(self, run, partial):
        self.run, self.partial = run, partial
        self.loss = torch.tensor(partial["loss_sum"], device=run.device)
        self.correct = torch.tensor(partial["correct"], device=run.device)
        self.seen = partial["seen"]
        self.first_bad = torch.tensor(-1, device=run.device)   # first step whose loss was not finite
        self.t0 = time.perf_counter()
        # the sums at the last row of steps.csv, saved mid-epoch so that a resumed run's rows match
        self.window = tuple(partial.get("window") or (partial["loss_sum"], partial["correct"], partial["seen"]))
        self.window_t = self.t0

    def add(self, i, loss, logits, y):
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), i, self.first_bad)
        self.loss += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)

    def totals(self):
        """(loss sum, correct, seen) of the epoch so far, over all ranks."""
        if self.run.world is None:
            return self.loss.item(), int(self.correct.item()), self.seen
        loss, correct, seen = distributed.sum_all(self.run.world, self.run.device, self.loss, self.correct, self.seen)
        return loss, int(correct), int(seen)

    def snapshot(self):
        """What a mid-epoch checkpoint stores to continue these sums."""
        loss, correct, seen = self.totals()
        return {"loss_sum": loss, "correct": correct, "seen": seen, "window": list(self.window),
                "seconds": self.partial["seconds"] + time.perf_counter() - self.t0}


def train_one_epoch(run, batches, epoch, start=0, partial=None):
    """One pass over the training batches from batch `start` (a resumed epoch's next step); returns the
    epoch's row: train loss and accuracy, last lr, seconds and images per second."""
    run.model.train()
    args, steps = run.args, len(batches)
    sums = EpochSums(run, partial or empty_partial())
    last_print, lr = sums.t0, args.lr
    for i, (x, y) in enumerate(batches.epoch(epoch - 1, start), start):
        lr = args.lr * lr_factor((epoch - 1) * steps + i, steps, steps * args.epochs, args)
        share = 1.0 if run.world is None else len(y) * run.world.size / batches.global_len(i)
        loss, logits = train_step(run, x, y, lr, share)
        sums.add(i, loss, logits, y)
        log_steps(run, sums, (epoch - 1) * steps + i + 1, epoch, lr, i + 1 == steps)   # before a save: it holds the window
        after_step(run, sums, epoch, i, steps, loss)
        last_print = show_progress(run, sums, epoch, i, steps, last_print)
    if run.progress and run.progress < 1:
        say(run, " " * 72, end="\r")
    elapsed = time.perf_counter() - sums.t0
    loss_total, correct, seen = sums.totals()
    return {"train_loss": loss_total / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1), "lr": lr,
            "seconds": sums.partial["seconds"] + elapsed,
            "images_per_s": (seen - sums.partial["seen"]) / max(elapsed, 1e-9)}


def after_step(run, sums, epoch, i, steps, loss):
    """The checks between steps: stop on a non-finite loss before anything is saved, save and stop on
    a signal, save every --save-every steps. On accelerators the loss is read every 50 steps only."""
    args = run.args
    periodic = args.save_every and (i + 1) % args.save_every == 0 and i + 1 < steps
    check = periodic or (i + 1) % (1 if run.device.type == "cpu" else 50) == 0 or i + 1 == steps
    stop = run.stop
    if run.world is not None:   # all ranks check at the same steps and act on what any of them saw
        stop = None
        if check:
            sums.first_bad, stopped = distributed.agree(run.world, sums.first_bad, run.stop is not None)
            stop = (run.stop or ("stopped on another rank", 130)) if stopped else None
    if (stop or periodic or check) and int(sums.first_bad) >= 0:   # never save weights after a bad step
        last = os.path.join(run.out, "last.pt")
        kept = f"{last} still holds the last good state" if os.path.exists(last) else "nothing was saved"
        raise Stop(f"the loss became {'nan' if loss.isnan() else 'inf'} at epoch {epoch}, step "
                   f"{int(sums.first_bad) + 1} of {steps}: training diverged and {kept}. "
                   f"Try a lower --lr (this run used {args.lr:g}) or --clip-grad 1", 1)
    if stop or periodic:
        save(run, epoch - 1, i + 1, sums.snapshot())
    if stop:
        why, code = stop
        raise Stop(f"{why}: stopped at epoch {epoch}, step {i + 1} of {steps}; saved {run.out}/last.pt. "
                   f"Continue with: {distributed.command(run.world)} train.py --resume {run.out}", code)


def log_steps(run, sums, step, epoch, lr, epoch_end):
    """Every run.log_every steps and at the epoch's end: a row of steps.csv (and TensorBoard scalars)
    with the loss and accuracy of the steps since the last row, whose sums are sums.window. Every
    rank reaches the same steps, so the sums are global."""
    if not run.log_every or (step % run.log_every and not epoch_end):
        return
    (loss, correct, seen), (loss0, correct0, seen0) = sums.totals(), sums.window
    now, n = time.perf_counter(), seen - seen0
    if n > 0:
        row = {"step": step, "epoch": epoch, "train_loss": (loss - loss0) / n, "train_acc": 100.0 * (correct - correct0) / n,
               "lr": lr, "images_per_s": (seen - max(seen0, sums.partial["seen"])) / max(now - sums.window_t, 1e-9)}
        distributed.on_rank0(run.world, record_steps, run, row)
    sums.window, sums.window_t = (loss, correct, seen), now


def record_steps(run, row):
    append_steps(run.out, row)
    if run.tb is not None:
        for key in ("train_loss", "train_acc", "lr", "images_per_s"):
            run.tb.add_scalar(f"step/{key}", row[key], row["step"])


def open_tensorboard(out):
    from torch.utils.tensorboard import SummaryWriter   # the package is optional; train.py checks for it
    return SummaryWriter(os.path.join(out, "tb"))


def epoch_scalars(run, row, step):
    """An epoch's figures (train, val and test loss and accuracy) in TensorBoard, at its last step."""
    if run.tb is None:
        return
    for key, value in row.items():
        if key.endswith(("_loss", "_acc")):
            run.tb.add_scalar(f"epoch/{key}", value, step)
    run.tb.flush()


def show_progress(run, sums, epoch, i, steps, last_print):
    """A progress line every `run.progress` seconds: in place on a terminal, a new line in a log."""
    now = time.perf_counter()
    if not run.progress or now - last_print <= run.progress:
        return last_print
    say(run, f"  epoch {epoch} step {i + 1}/{steps}  loss {sums.loss.item() / sums.seen:.4f}  "
             f"{(sums.seen - sums.partial['seen']) / (now - sums.t0):,.0f} img/s", end="\r" if run.progress < 1 else "\n")
    return now


def save(run, epoch_done, step, partial, name="last.pt"):
    """Write the run's checkpoint: `epoch_done` epochs complete, plus `step` steps of the next one
    whose running sums are `partial`. Every rank gives its RNG state; rank 0 alone writes."""
    rngs = distributed.gather(run.world, rng_state(run.device))   # each rank's dropout stream

    def write():
        extra = {"stopping": run.stopping, "rng": rngs[0], "scaler": run.scaler.state_dict() if run.scaler else None}
        if run.world:
            extra["rng_ranks"] = rngs
        if run.ema is not None:
            extra.update(ema_state_dict=run.ema.module.state_dict(), ema_steps=int(run.ema.n_averaged))
        ckpt = make_checkpoint(run.model, run.optimizer, run.args, run.info, run.norm, run.history, epoch_done,
                               step, partial, extra)
        save_checkpoint(ckpt, os.path.join(run.out, name))
    distributed.on_rank0(run.world, write)   # a failed write stops every rank


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def predict_logits(model, images, mean, std, batch_size=1000, channels_last=False, autocast=None):
    """Logits (float32) for uint8 images held on the model's device, in large batches."""
    was_training = model.training
    model.eval()
    labels = torch.zeros(len(images), dtype=torch.long, device=images.device)
    batches = Batches(images, labels, batch_size, mean, std, channels_last=channels_last)
    outs = []
    for x, _ in batches.epoch():
        with autocast or nullcontext():
            outs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0, 0, device=images.device)


def tta_views(images, flips):
    """The test-time views of uint8 images [N, 1, H, W]: as they are, shifted one pixel each way
    (zeros come in at the edge), and, where mirror images keep their class, mirrored."""
    padded = F.pad(images, (1, 1, 1, 1))
    h, w = images.shape[-2:]
    views = [images] + [padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]
    if flips:
        views.append(images.flip(-1))
    return views


def predict_probs(model, images, mean, std, batch_size=1000, tta=False, flips=False, channels_last=False,
                  autocast=None):
    """Softmax probabilities of uint8 images, averaged over the test-time views when `tta` is set."""
    views = tta_views(images, flips) if tta else [images]
    probs = [predict_logits(model, v.contiguous(), mean, std, batch_size, channels_last, autocast).softmax(1)
             for v in views]
    return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)


def score(logits, labels):
    """(mean cross-entropy, accuracy in %) of logits against labels."""
    loss = F.cross_entropy(logits, labels).item()
    acc = 100.0 * (logits.argmax(1) == labels).sum().item() / max(len(labels), 1)
    return loss, acc


def evaluate_splits(run, splits):
    """Loss and accuracy of the raw (and EMA) weights on each split that has images: {"test_acc": ...}."""
    row = {}
    models = [("", run.model)] + ([("ema_", run.ema.module)] if run.ema is not None else [])
    for prefix, model in models:
        for split, (x, y) in splits.items():
            if len(y):
                row[f"{prefix}{split}_loss"], row[f"{prefix}{split}_acc"] = evaluate_split(run, model, x, y)
    return row


def log_probs(run, model, images):
    """Log-probabilities of images under the run's evaluation: the plain forward pass, or with --tta the
    log of the softmax averaged over the test-time views (what evaluate.py --tta computes)."""
    kwargs = {"channels_last": run.channels_last, "autocast": run.autocast}
    if getattr(run.args, "tta", False):
        probs = predict_probs(model, images, *run.norm, tta=True, flips=run.info.flips, **kwargs)
        return probs.clamp_min(1e-12).log()
    return predict_logits(model, images, *run.norm, **kwargs).log_softmax(1)


def evaluate_split(run, model, images, labels):
    """(mean loss, accuracy %). Under torchrun each rank scores a slice, and the per-image losses and
    correct counts are summed over the ranks, so the accuracy is exactly one process's."""
    world = run.world
    if world is None:
        return score(log_probs(run, model, images), labels)
    distributed.share_buffers(model)
    n = len(labels)
    lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
    sums = [0.0, 0]
    if hi > lo:
        logp = log_probs(run, model, images[lo:hi])
        sums = [F.nll_loss(logp, labels[lo:hi], reduction="sum"), (logp.argmax(1) == labels[lo:hi]).sum()]
    loss_sum, correct = distributed.sum_all(world, labels.device, *sums)
    return loss_sum / n, 100.0 * int(correct) / n


def say(run, text, end="\n"):
    """print for a run: when the reader of its output went away (`| head`), the run saves at the end
    of the step and stops, as after Ctrl-C, instead of dying in the middle of it."""
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        close_stdout()
        run.stop = run.stop or ("the output pipe closed", 141)
