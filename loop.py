"""train.py's training loop, top to bottom: epochs, steps, evaluation, early stopping and saving.

    config = Config.from_args(args, steps_per_epoch=len(batches))    # the hyper-parameters, once
    stepper = Stepper(model, model, optimizer, device)                 # what takes the steps
    fit(stepper, config, progress, data, folder, StopRequest())        # to the last epoch or a stop
    row = train_epoch(stepper, config, batches, epoch=1)               # one epoch alone (bench.py)

The learning rate is a pure function of the global step, and data order and augmentation are seeded
per step, so a run saved mid-epoch resumes exactly; the record it saves is built and read back in
checkpoint.py. Under torchrun every rank runs this same code at the same steps: metric sums and
the stop flags are all-reduced, evaluation is sharded, and only rank 0 writes (runfolder.py).
"""
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import distributed
from checkpoint import Partial
from cli import StopRequest, say
from runfolder import epoch_line
from scoring import log_probs, score


@dataclass(frozen=True)
class Config:
    """The hyper-parameters the loop reads, resolved from train.py's flags once."""
    epochs: int
    lr: float                      # the peak learning rate
    scheduler: str = "none"        # none, step, exp, cosine or onecycle
    gamma: float = 0.1             # decay factor per epoch (exp) or per step_size epochs (step)
    step_size: int = 5
    warmup: float = 0.0            # epochs of linear warm-up in front of the schedule
    label_smoothing: float = 0.0
    l1: float = 0.0                # penalty weights on sum |w| and sum w^2
    l2: float = 0.0
    clip_grad: float = 0.0         # gradient-norm clip, 0: off
    save_every: int = 0            # also save every N steps inside an epoch
    eval_every: int = 1            # score val and test every N epochs, and after the last; 0: the last only
    tta: bool = False              # score with test-time augmentation
    stop_loss: float = None        # early stopping: training loss, validation accuracy, patience
    stop_val_acc: float = None
    patience: int = None
    log_every: int = 0             # steps between rows of steps.csv; 0: none
    progress: float = 0.0          # seconds between progress lines; below 1, updated in place

    @classmethod
    def from_args(cls, args, steps_per_epoch, interactive=None):
        """From train.py's resolved flags. Runs saved before a flag existed resume without it."""
        interactive = sys.stdout.isatty() if interactive is None else interactive
        log_every = max(1, steps_per_epoch // 20) if getattr(args, "log_every", None) is None else args.log_every
        keys = [f for f in cls.__dataclass_fields__ if f not in ("log_every", "progress")]
        return cls(**{k: getattr(args, k) for k in keys if hasattr(args, k)}, log_every=log_every,
                   progress={"on": 0.5, "off": 0, "auto": 0.5 if interactive else 30}[getattr(args, "progress", "off")])


@dataclass
class Stepper:
    """What takes the steps, and the device and precision they run in."""
    model: torch.nn.Module            # the plain module: what is saved and evaluated
    step_model: torch.nn.Module       # what the steps call: the model, compiled, or wrapped in DDP
    optimizer: object                 # optimizers.build_optimizer's
    device: torch.device
    ema: torch.nn.Module = None       # torch.optim.swa_utils.AveragedModel, with --ema
    scaler: torch.amp.GradScaler = None
    autocast: object = field(default_factory=nullcontext)
    channels_last: bool = False
    world: distributed.World = None   # None in one process


@dataclass
class Data:
    """The splits of a run, as uint8 tensors on the device, and how they are fed."""
    info: object           # data.DatasetInfo
    norm: tuple            # (mean, std) the model sees its inputs normalized with
    batches: object        # data.Batches: the training set, shuffled and augmented per step
    splits: dict           # {"val": (images, labels), "test": (images, labels)}
    record: dict = None    # userdata.Source.record: which images are the test split, for the checkpoint
    note: str = ""         # where the test split came from, said at the start


class Stopped(Exception):
    """Ends training before the last epoch: divergence (code 1), or a signal (130 for Ctrl-C)."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# The run: epochs
# ---------------------------------------------------------------------------------------------

def fit(stepper, config, progress, data, folder, stop, start=(1, 0, None)):
    """Train from (epoch, step, partial sums) to the last epoch or an early stop; after each epoch a
    row of log.csv, best.pt (with a validation split) and last.pt. `progress` is the record the
    folder saves (the same object: its history grows here)."""
    first_epoch, step, partial = start
    best_key = "ema_val_acc" if stepper.ema is not None else "val_acc"
    steps = len(data.batches)
    for epoch in range(first_epoch, config.epochs + 1):
        row = {"epoch": epoch, **train_epoch(stepper, config, data.batches, epoch, step, partial, folder, stop)}
        step, partial = 0, None
        scored = epoch == config.epochs or (config.eval_every and epoch % config.eval_every == 0)
        if scored:
            row.update(evaluate(stepper, data, config.tta))
        reason = stop_reason(row, config, progress.early, stepper.ema is not None)
        if reason and not scored:   # a run that ends early ends scored
            row.update(evaluate(stepper, data, config.tta))
        progress.history.append(row)
        progress.early.stopped = reason
        if best_key in row and row[best_key] > progress.early.best_val_acc:
            progress.early.best_val_acc = row[best_key]
            folder.save(stepper, epoch, 0, name="best.pt")   # before last.pt: a crash between them redoes it
        folder.save(stepper, epoch, 0)
        folder.append_epoch(row, epoch * steps)
        say(stop, epoch_line(row, config.epochs))
        if reason:
            say(stop, f"stopping after epoch {epoch}: {reason}")
            break


def score_untrained(stepper, config, progress, data, folder, stop):
    """Epoch 0: the untrained model's figures (--eval-untrained, as notebook 001 does)."""
    progress.history.append({"epoch": 0, **evaluate(stepper, data, config.tta)})
    folder.append_epoch(progress.history[-1], 0)
    say(stop, epoch_line(progress.history[-1], config.epochs))


def stop_reason(row, config, early, ema):
    """Why training should stop after this epoch, or None; `early` carries the patience state."""
    if config.stop_loss is not None and row["train_loss"] < config.stop_loss:
        return f"the mean training loss {row['train_loss']:.4f} fell below --stop-loss {config.stop_loss:g}"
    key = "ema_val" if ema else "val"
    if config.stop_val_acc is not None and row[f"{key}_acc"] >= config.stop_val_acc:
        return f"validation accuracy {row[f'{key}_acc']:.2f} % reached --stop-val-acc {config.stop_val_acc:g}"
    if config.patience is not None:
        if early.best_val_loss is None or row[f"{key}_loss"] < early.best_val_loss:
            early.best_val_loss, early.best_epoch, early.bad_epochs = row[f"{key}_loss"], row["epoch"], 0
        else:
            early.bad_epochs += 1
            if early.bad_epochs >= config.patience:
                return (f"validation loss has not improved for {config.patience} epochs (best "
                        f"{early.best_val_loss:.4f} at epoch {early.best_epoch})")
    return None


# ---------------------------------------------------------------------------------------------
# One epoch: steps
# ---------------------------------------------------------------------------------------------

def train_epoch(stepper, config, batches, epoch, start=0, partial=None, folder=None, stop=None):
    """One pass over the training batches from batch `start` (a resumed epoch's next step); the epoch's
    row: train loss and accuracy, last lr, seconds and images per second. Without a folder nothing
    is logged or saved (bench.py times this alone)."""
    stepper.model.train()
    steps, stop = len(batches), stop if stop is not None else StopRequest()
    sums = EpochSums(stepper, partial or Partial())
    last_print, lr = sums.t0, config.lr
    for i, (x, y) in enumerate(batches.epoch(epoch - 1, start), start):
        global_step = (epoch - 1) * steps + i
        lr = config.lr * lr_factor(global_step, steps, steps * config.epochs, config)
        share = 1.0 if stepper.world is None else len(y) * stepper.world.size / batches.global_len(i)
        loss, logits = train_step(stepper, config, x, y, lr, share)
        sums.add(i, loss, logits, y)
        if folder is not None:
            log_steps(folder, config, sums, global_step + 1, epoch, lr, i + 1 == steps)   # before a save: it holds the window
            check_step(stepper, config, sums, folder, stop, epoch, i, steps, loss)
        last_print = show_progress(config, sums, stop, epoch, i, steps, last_print)
    if config.progress and config.progress < 1:
        say(stop, " " * 72, end="\r")
    elapsed = time.perf_counter() - sums.t0
    loss_total, correct, seen = sums.totals()
    return {"train_loss": loss_total / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1), "lr": lr,
            "seconds": sums.partial.seconds + elapsed, "images_per_s": (seen - sums.partial.seen) / max(elapsed, 1e-9)}


def lr_factor(step, steps_per_epoch, total_steps, config):
    """Multiplier of the peak lr at a global step; a pure function of the step, so resume is exact."""
    epoch = step // steps_per_epoch
    if config.scheduler == "step":
        f = config.gamma ** (epoch // config.step_size)
    elif config.scheduler == "exp":
        f = config.gamma ** epoch
    elif config.scheduler == "cosine":
        f = 0.5 * (1 + math.cos(math.pi * step / total_steps))
    elif config.scheduler == "onecycle":   # the shape of torch's OneCycleLR: 25 % rise, cosine both ways
        rise = max(1, int(0.25 * total_steps))
        if step < rise:
            f = 1 / 25 + (1 - 1 / 25) * (1 - math.cos(math.pi * step / rise)) / 2
        else:
            t = (step - rise) / max(1, total_steps - rise)
            f = 1 / 25e4 + (1 - 1 / 25e4) * (1 + math.cos(math.pi * t)) / 2
    else:
        f = 1.0
    if config.warmup:
        f *= min(1.0, (step + 1) / (config.warmup * steps_per_epoch))
    return f


def penalty(model, config):
    """notebook 002's weight penalties: L1 * sum|w| + L2 * sum w^2 over all parameters. (The notebook
    used the unsquared norm for its L2 term; the squared one is the usual L2 penalty.)"""
    params = list(model.parameters())
    total = 0.0
    if config.l1:
        total = total + config.l1 * sum(p.abs().sum() for p in params)
    if config.l2:
        total = total + config.l2 * sum(p.pow(2).sum() for p in params)
    return total


def train_step(stepper, config, x, y, lr, global_share):
    """Forward, backward and one optimizer step at learning rate `lr`; returns (loss, logits)."""
    for group in stepper.optimizer.param_groups:
        group["lr"] = lr
    with stepper.autocast:
        logits = stepper.step_model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    if config.l1 or config.l2:
        loss = loss + penalty(stepper.model, config)
    # DDP averages the ranks' gradients; weighting each rank's mean by its share of the global batch
    # makes that average the gradient of the global batch's mean loss, even when shares differ.
    grad_loss = loss if stepper.world is None else loss * global_share
    stepper.optimizer.zero_grad(set_to_none=True)
    scaler = stepper.scaler
    (scaler.scale(grad_loss) if scaler else grad_loss).backward()
    if config.clip_grad:
        if scaler:
            scaler.unscale_(stepper.optimizer)
        torch.nn.utils.clip_grad_norm_(stepper.model.parameters(), config.clip_grad)
    if scaler:
        scaler.step(stepper.optimizer)
        scaler.update()
    else:
        stepper.optimizer.step()
    if stepper.ema is not None:
        stepper.ema.update_parameters(stepper.model)
    return loss.detach().float(), logits


class EpochSums:
    """The running loss, correct count and images of an epoch, summed on the device so that an
    accelerator is never made to wait on every step; read back only at checks."""

    def __init__(self, stepper, partial):
        self.world, self.partial = stepper.world, partial
        self.loss = torch.tensor(partial.loss_sum, device=stepper.device)
        self.correct = torch.tensor(partial.correct, device=stepper.device)
        self.seen = partial.seen
        self.first_bad = torch.tensor(-1, device=stepper.device)   # first step whose loss was not finite
        self.t0 = time.perf_counter()
        # the sums at the last row of steps.csv, saved mid-epoch so that a resumed run's rows match
        self.window = partial.window or (partial.loss_sum, partial.correct, partial.seen)
        self.window_t = self.t0

    def add(self, i, loss, logits, y):
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), i, self.first_bad)
        self.loss += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)

    def totals(self):
        """(loss sum, correct, seen) of the epoch so far, over all ranks."""
        if self.world is None:
            return self.loss.item(), int(self.correct.item()), self.seen
        loss, correct, seen = distributed.sum_all(self.world, self.loss.device, self.loss, self.correct, self.seen)
        return loss, int(correct), int(seen)

    def snapshot(self):
        """What a mid-epoch checkpoint stores to continue these sums."""
        loss, correct, seen = self.totals()
        return Partial(loss, correct, seen, self.partial.seconds + time.perf_counter() - self.t0, tuple(self.window))


def check_step(stepper, config, sums, folder, stop, epoch, i, steps, loss):
    """The checks between steps: stop on a non-finite loss before anything is saved, save and stop on
    a signal, save every --save-every steps. On accelerators the loss is read every 50 steps only."""
    periodic = config.save_every and (i + 1) % config.save_every == 0 and i + 1 < steps
    check = periodic or (i + 1) % (1 if stepper.device.type == "cpu" else 50) == 0 or i + 1 == steps
    asked = (stop.why, stop.code) if stop else None
    if stepper.world is not None:   # all ranks check at the same steps and act on what any of them saw
        asked = None
        if check:
            sums.first_bad, stopped = distributed.agree(stepper.world, sums.first_bad, bool(stop))
            asked = ((stop.why, stop.code) if stop else ("stopped on another rank", 130)) if stopped else None
    if (asked or periodic or check) and int(sums.first_bad) >= 0:   # never save weights after a bad step
        last = f"{folder.out}/last.pt"
        kept = f"{last} still holds the last good state" if folder.has("last.pt") else "nothing was saved"
        raise Stopped(f"the loss became {'nan' if loss.isnan() else 'inf'} at epoch {epoch}, step "
                      f"{int(sums.first_bad) + 1} of {steps}: training diverged and {kept}. "
                      f"Try a lower --lr (this run used {config.lr:g}) or --clip-grad 1", 1)
    if asked or periodic:
        folder.save(stepper, epoch - 1, i + 1, sums.snapshot())
    if asked:
        why, code = asked
        raise Stopped(f"{why}: stopped at epoch {epoch}, step {i + 1} of {steps}; saved {folder.out}/last.pt. "
                      f"Continue with: {distributed.command(stepper.world)} train.py --resume {folder.out}", code)


def log_steps(folder, config, sums, step, epoch, lr, epoch_end):
    """Every config.log_every steps and at the epoch's end: a row of steps.csv (and TensorBoard
    scalars) with the loss and accuracy of the steps since the last row, whose sums are sums.window.
    Every rank reaches the same steps, so the sums are global."""
    if not config.log_every or (step % config.log_every and not epoch_end):
        return
    (loss, correct, seen), (loss0, correct0, seen0) = sums.totals(), sums.window
    now, n = time.perf_counter(), seen - seen0
    if n > 0:
        folder.append_steps({"step": step, "epoch": epoch, "train_loss": (loss - loss0) / n,
                             "train_acc": 100.0 * (correct - correct0) / n, "lr": lr,
                             "images_per_s": (seen - max(seen0, sums.partial.seen)) / max(now - sums.window_t, 1e-9)})
    sums.window, sums.window_t = (loss, correct, seen), now


def show_progress(config, sums, stop, epoch, i, steps, last_print):
    """A progress line every config.progress seconds: in place on a terminal, a new line in a log."""
    now = time.perf_counter()
    if not config.progress or now - last_print <= config.progress:
        return last_print
    say(stop, f"  epoch {epoch} step {i + 1}/{steps}  loss {sums.loss.item() / sums.seen:.4f}  "
              f"{(sums.seen - sums.partial.seen) / (now - sums.t0):,.0f} img/s", end="\r" if config.progress < 1 else "\n")
    return now


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def evaluate(stepper, data, tta=False):
    """Loss and accuracy of the raw (and EMA) weights on each split that has images: {"test_acc": ...}."""
    row = {}
    models = [("", stepper.model)] + ([("ema_", stepper.ema.module)] if stepper.ema is not None else [])
    for prefix, model in models:
        for split, (x, y) in data.splits.items():
            if len(y):
                row[f"{prefix}{split}_loss"], row[f"{prefix}{split}_acc"] = evaluate_split(stepper, model, data, x, y, tta)
    return row


def evaluate_split(stepper, model, data, images, labels, tta):
    """(mean loss, accuracy %). Under torchrun each rank scores a slice, and the per-image losses and
    correct counts are summed over the ranks, so the accuracy is exactly one process's."""
    kwargs = {"tta": tta, "flips": data.info.flips, "channels_last": stepper.channels_last,
              "autocast": stepper.autocast}
    world = stepper.world
    if world is None:
        return score(log_probs(model, images, *data.norm, **kwargs), labels)
    distributed.share_buffers(model)
    n = len(labels)
    lo, hi = n * world.rank // world.size, n * (world.rank + 1) // world.size
    sums = [0.0, 0]
    if hi > lo:
        logp = log_probs(model, images[lo:hi], *data.norm, **kwargs)
        sums = [F.nll_loss(logp, labels[lo:hi], reduction="sum"), (logp.argmax(1) == labels[lo:hi]).sum()]
    loss_sum, correct = distributed.sum_all(world, labels.device, *sums)
    return loss_sum / n, 100.0 * int(correct) / n
