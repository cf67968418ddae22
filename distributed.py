"""Several processes under torchrun, one per GPU (or per CPU slot): train.py's distributed mode.

    torchrun --standalone --nproc_per_node=4 train.py --model cnn --batch-size 512 --lr 4e-3
    torchrun --nnodes=2 --node-rank=0 --nproc_per_node=8 --rdzv-backend c10d \\
             --rdzv-endpoint host0:29500 train.py --batch-size 2048      # the same on host1, --node-rank=1

train.py runs through launch(main): without torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE) that
is exactly cli.run(main). Under torchrun, every rank runs the same script on the same arguments;
rank 0 alone prints and writes files, and the ranks exchange what they need at fixed points:

- setup: the ranks meet in exchange() after each step that can fail on one of them (a missing file
  on one node, a run folder rank 0 refuses). A rank that fails joins the next exchange with its
  error instead, so the others stop at once with rank 0 printing one message; nobody waits on a
  rank that is gone.
- training: DDP averages the gradients; the divergence and Ctrl-C/SIGTERM flags are all-reduced at
  the same steps on every rank, metric sums are all-reduced, and evaluation is sharded (loop.py); rank
  0 writes, and a write that fails there reaches every rank (runfolder.RunFolder).
"""
import datetime
import functools
import gc
import io
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cli import UserError, debug_asked, describe_error, run
from device import pick_device as pick_one_device
from data import dataset_info, find_split

# How long a rank waits in a collective before giving up: long enough for another rank to download
# a dataset, short enough that a rank stuck without an error message does not hold a GPU for hours.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class World:
    rank: int
    local_rank: int
    size: int
    local_size: int
    training: bool = False   # past setup: a failing rank can no longer meet the others in an exchange
    shared: bool = False     # this rank's failure is known to every rank; rank 0 reports it
    local_error: bool = False


class Agreed(UserError):
    """An error raised on every rank at the same point; rank 0 prints it, the others stay quiet."""


_WORLD = None


def current():
    """The World of this process under torchrun, or None in a plain single-process run."""
    return _WORLD


def from_env():
    if not all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return None
    size = int(os.environ["WORLD_SIZE"])
    return World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), size,
                 int(os.environ.get("LOCAL_WORLD_SIZE", size)))


# ---------------------------------------------------------------------------------------------
# Launch: join the group, let rank 0 speak, leave the group whatever happens
# ---------------------------------------------------------------------------------------------

def launch(main, argv=None):
    """cli.run(main), in distributed mode when torchrun started this process."""
    global _WORLD
    world = from_env()
    if world is None:
        return run(main, argv)
    argv = sys.argv[1:] if argv is None else argv
    debug = debug_asked(argv)
    stdout, stderr = sys.stdout, sys.stderr
    if world.rank:   # the others' stderr is kept, and shown only for a failure rank 0 cannot know of
        sys.stdout = open(os.devnull, "w")
        if not debug:
            sys.stderr = io.StringIO()
    try:
        if not join(world, stderr):
            return 1
        _WORLD = world
        code = run(guarded(main, world), argv)
        if world.rank and world.local_error and isinstance(sys.stderr, io.StringIO):
            stderr.write("".join(f"[rank {world.rank}] {line}\n" for line in sys.stderr.getvalue().splitlines()))
        return code
    finally:
        _WORLD = None
        if dist.is_initialized():
            # Free the DDP wrapper (held in a reference cycle by train.py's closures) while the group is
            # alive: gloo threads torn down at interpreter exit abort the process ("terminate called").
            gc.collect()
            dist.destroy_process_group()
        sys.stdout, sys.stderr = stdout, stderr


def join(world, stderr):
    """Join the process group: gloo for CPU tensors (and the exchanges, which pickle objects on the
    CPU), NCCL for CUDA tensors when this machine has GPUs. False, after one line, when it fails."""
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    try:
        dist.init_process_group(backend, timeout=TIMEOUT)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        print(f"{os.path.basename(sys.argv[0])}: error: rank {world.rank} could not join the other processes "
              f"({first}); check that every node reaches torchrun's --rdzv-endpoint", file=stderr)
        return False
    return True


def guarded(main, world):
    """main, with a failure on this rank alone made known to the others: during set-up they wait in an
    exchange, so the failure meets them there; during training it can only be reported."""
    @functools.wraps(main)
    def call(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:   # torchrun is stopping every rank; there is no one to tell
            raise
        except BaseException as e:   # SystemExit too: argparse errors happen on every rank alike
            if isinstance(e, Agreed) or world.shared:
                raise
            if not world.training:
                try:
                    exchange(world, failure=_failure(e))
                    world.shared = True
                except Exception:
                    pass
                raise
            world.local_error = True
            if isinstance(e, dist.DistError) or "by peer" in str(e):
                raise UserError("lost contact with another process, which probably failed: see its "
                                "message above and torchrun's report") from None
            raise
    return call


def _failure(e):
    """(message, exit code) of an exception, to send to the other ranks."""
    if isinstance(e, SystemExit):
        return None, e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return describe_error(e)


def exchange(world, payload=None, failure=None):
    """Every rank's payload, once all ranks got here. If any rank arrived with a failure, every rank
    that did not fail raises Agreed with the first failing rank's message (the failing rank raises its
    own error after this returns)."""
    gathered = [None] * world.size
    dist.all_gather_object(gathered, (failure, payload))
    failed = [(rank, f) for rank, (f, _) in enumerate(gathered) if f is not None]
    if failed and failure is None:
        rank, (message, code) = failed[0]
        world.shared = True
        raise Agreed(f"rank {rank}: {message}" if message else f"rank {rank} stopped with exit code {code}", code)
    return [p for _, p in gathered]


def on_rank0(world, fn, *args):
    """fn(*args) on rank 0 only, its result handed to every rank; an error in it stops every rank.
    Without a world (one process) it is just fn(*args)."""
    if world is None:
        return fn(*args)
    exchange(world)   # nobody failed before the work starts
    if world.rank:
        return exchange(world)[0]
    try:
        result = fn(*args)
    except Exception as e:
        exchange(world, failure=describe_error(e))
        world.shared = True
        raise
    return exchange(world, result)[0]


def gather(world, value):
    """Every rank's value, in rank order; [value] in one process."""
    return [value] if world is None else exchange(world, value)


def ready(world, model, device, compile_model):
    """End of setup: meet once more, then wrap the model in DDP (and torch.compile over it, which lets
    DDP's graph breaks overlap communication). The module itself stays what is saved and evaluated."""
    exchange(world)
    world.training = True
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(ddp) if compile_model else ddp


# ---------------------------------------------------------------------------------------------
# Setup: arguments, device, data, random numbers
# ---------------------------------------------------------------------------------------------

def check_args(world, args):
    if world and args.batch_size % world.size:
        lower = max(world.size, args.batch_size - args.batch_size % world.size)
        raise UserError(f"--batch-size {args.batch_size} is the global batch and must split evenly over the "
                        f"{world.size} processes; use a multiple of {world.size}, e.g. {lower}", 2)


def pick_device(name, world):
    """The device of this rank: cuda:LOCAL_RANK for CUDA, the CPU for the CPU."""
    device = pick_one_device(name)
    if world is None:
        return device
    if device.type == "mps":
        raise UserError("distributed training runs on CUDA GPUs (NCCL) or the CPU (gloo), not on MPS; "
                        "pass --device cpu, or train in one process with --device mps", 2)
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {world.local_size} processes on this node, but it has "
                            f"{torch.cuda.device_count()} CUDA device(s); use --nproc_per_node="
                            f"{torch.cuda.device_count()}", 2)
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def fetch_data(world, name, data_dir):
    """One process per node finds (or downloads) the files first, so that two ranks never download
    into the same folder at once; the others then read what it found."""
    if world is None:
        return
    if world.local_rank == 0:
        info = dataset_info(name)
        for split in ("train", "test"):
            find_split(info, split, data_dir)
    exchange(world)


def describe(world):
    if world is None:
        return ""
    return f" x {world.size} processes ({dist.get_backend()})"


def command(world):
    """How to start this run again, for the resume hint."""
    if world is None:
        return "python"
    if world.local_size == world.size:
        return f"torchrun --standalone --nproc_per_node={world.size}"
    return "torchrun (with the same --nnodes, --nproc_per_node and --rdzv-* options)"


# ---------------------------------------------------------------------------------------------
# Training and evaluation: the same decisions on every rank, global figures everywhere
# ---------------------------------------------------------------------------------------------

def agree(world, first_bad, interrupted):
    """(first non-finite step on any rank, or -1; whether any rank was interrupted). Every rank calls
    this at the same steps, so one rank's NaN or Ctrl-C stops all of them together."""
    never = torch.iinfo(torch.int64).max
    flags = torch.stack([torch.where(first_bad >= 0, first_bad, never).to(torch.int64),
                         torch.tensor(-1 if interrupted else 0, device=first_bad.device)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return torch.where(flags[0] == never, -1, flags[0]), bool(flags[1] < 0)


def sum_all(world, device, *values):
    """The sums over all ranks of a few numbers (floats, ints or one-element tensors), as floats."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def share_buffers(model):
    """Give every rank rank 0's BatchNorm statistics, which move on each rank's own batches: rank 0's
    are the ones saved, so evaluation uses them too."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)
