"""The device a command runs on, the precision it computes in, and the memory habits that keep it fast.

    device = pick_device("auto")                   # cuda or mps when present, else the CPU; or a sentence why not
    amp, note = resolve_amp("auto", device)        # "bf16" where the device computes it natively, else "off"
    with autocast_for(amp, device): ...

Each command chooses its device once, at the top, and builds its autocast context once.
"""

import ctypes
import os
import sys
from contextlib import nullcontext

import torch

from cli import UserError


def keep_freed_memory():
    """Ask glibc to keep freed memory for reuse instead of handing it back to the system at once.

    By default it maps every large block afresh and returns it when freed, so each step's activations
    and gradients fault their pages in again, a large share of a CPU run's time (results/README.md
    has the counts). Blocks under 32 MB stay in the heap, and up to 1 GB of freed heap is kept.
    Elsewhere than glibc this does nothing; returns whether it was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def pick_device(name):
    """torch.device for auto|cpu|cuda|cuda:N|mps, or a UserError saying why it cannot be used."""
    if name == "auto":
        if torch.accelerator.is_available():
            return torch.accelerator.current_accelerator()
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps", 2) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} asked for a CUDA GPU, but none is available here; "
                f"use --device cpu, or auto to take whatever is present",
                2,
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0", 2
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(
                "--device mps asked for Apple's GPU, but MPS is not available here; "
                "use --device cpu, or auto to take whatever is present",
                2,
            )
    elif device.type != "cpu":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps", 2)
    return device


# oneDNN's names (ONEDNN_MAX_CPU_ISA) for the instruction sets with bf16 or fp16 dot products, from
# oneDNN's dnnl_cpu_isa_t; an older name keeps oneDNN's convolutions off those units.
ISA_WITH = {
    "bf16": {
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX10_1_512",
        "AVX512_CORE_AMX",
        "AVX10_1_512_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
        "ALL",
        "DEFAULT",
    },
    "fp16": {
        "AVX512_CORE_FP16",
        "AVX10_1_512",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
        "ALL",
        "DEFAULT",
    },
}
UNITS = {
    "bf16": (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16")),
    "fp16": (("amx_fp16", "AMX-FP16"), ("avx512_fp16", "AVX512-FP16")),
}


def cpu_units(kind):
    """(whether this CPU computes KIND, bf16 or fp16, in hardware; what it has or lacks, in words).
    Without such units torch converts every half-precision operand to fp32 and back in software,
    several times slower than plain fp32. ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA, torch's own
    switches that keep its kernels to an older instruction set, are honoured, so that a restricted
    run chooses as it would on that older CPU."""
    get = getattr(torch.cpu, "get_capabilities", None)  # torch 2.9 and later; before, assume none
    caps = get() if get else {}
    units = [name for key, name in UNITS[kind] if caps.get(key)]
    if not units:
        return False, f"this CPU has no {kind} units ({' or '.join(n for _, n in UNITS[kind])})"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").strip().upper()
    if isa not in ISA_WITH[kind]:
        return False, f"ONEDNN_MAX_CPU_ISA={isa} keeps oneDNN off the CPU's {' and '.join(units)} units"
    aten = torch.backends.cpu.get_cpu_capability()
    if not aten.startswith("AVX512"):
        return False, f"ATen runs its {aten} kernels (ATEN_CPU_CAPABILITY), not AVX-512"
    return True, f"this CPU has {' and '.join(units)}"


def native_bf16(device):
    """(whether DEVICE computes bf16 natively, why, in words)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} computes bf16"
        return False, f"{name} has no bf16 units"
    if device.type == "cpu":
        return cpu_units("bf16")
    # torch runs bf16 on MPS with recent macOS, but these models were never measured there: fp32 is safe.
    return False, f"bf16 is not chosen by default on {device.type}"


def resolve_amp(amp, device):
    """(off, bf16 or fp16; a note for the start line) for --amp auto|off|bf16|fp16 on DEVICE. auto takes
    bf16 where the device computes it natively and fp32 everywhere else. bf16 or fp16 asked for on a CPU
    that would emulate it still runs, after a warning."""
    if amp == "off":
        return "off", "fp32"
    native, why = (
        native_bf16(device) if amp in ("auto", "bf16") else (cpu_units("fp16") if device.type == "cpu" else (True, ""))
    )
    if amp == "auto":
        return ("bf16", f"bf16 autocast (--amp auto: {why})") if native else ("off", f"fp32 (--amp auto: {why})")
    if device.type == "cpu" and not native:
        print(
            f"warning: --amp {amp} is emulated in software here ({why}) and runs several times slower "
            f"than fp32; --amp auto picks fp32 on this machine",
            file=sys.stderr,
        )
    return amp, f"{amp} autocast"


def autocast_for(amp, device):
    """The autocast context of a resolved --amp (off, bf16 or fp16), built once; nullcontext for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def machine(device="cpu"):
    """What work on DEVICE (a --device name) is timed on, for reports: the GPU it uses, else the CPU."""
    dev = pick_device(device)
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA)"
    if dev.type == "mps":
        return "Apple GPU (MPS)"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        cpu = platform.processor() or platform.machine() or "CPU"
    return f"{cpu}, {os.cpu_count()} cores"
