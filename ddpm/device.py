"""Which device and which precision a run uses, chosen from what the machine can do."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# CPU instructions that run bf16 matrix work natively (oneDNN uses them for convolutions and
# matmuls); without them bf16 is emulated and slower than fp32
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags (Linux); empty where they can't be read."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether bf16 autocast pays on this CPU: oneDNN present and native bf16 instructions."""
    flags = cpu_flags() if flags is None else flags
    return torch.backends.mkldnn.is_available() and any(f in flags for f in NATIVE_BF16_FLAGS)


def native_bf16(gpu: bool) -> tuple[bool, str]:
    """Whether this machine's GPU (or CPU) computes bf16 natively, and why in words."""
    if gpu:
        native = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return native, "the GPU supports bf16" if native else "the GPU has no bf16"
    if cpu_has_native_bf16():
        return True, "the CPU has native bf16 (AVX512-BF16/AMX)"
    return False, "the CPU has no native bf16 instructions, where bf16 would be slower"


def choose_precision(precision: str | int, accelerator: str) -> str | int:
    """Lightning's `precision` for `auto`: bf16-mixed where the hardware computes bf16 natively
    (CPUs with AVX512-BF16 or AMX: 1.7x faster training of the quickstart, measured in
    bench/speed.py; GPUs that support bf16), else 32-true. Any other value is returned as is."""
    if str(precision) != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    native, why = native_bf16(gpu)
    chosen = "bf16-mixed" if native else "32-true"
    log.info("trainer.precision=auto: %s, since %s", chosen, why)
    return chosen


def autocast(precision: str | int, device: torch.device) -> torch.autocast:
    """The context the network runs in for `precision` auto | bf16 | 32 (sampling): bf16
    autocast where asked for, or with auto where the device computes bf16 natively."""
    if str(precision) not in ("auto", "bf16", "32"):
        raise ValueError(f"precision must be auto, bf16 or 32, got {precision!r}")
    use = str(precision) == "bf16"
    if str(precision) == "auto":
        use, why = native_bf16(device.type == "cuda")
        log.info("precision=auto: %s, since %s", "bf16" if use else "32", why)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def pick_device(name: str) -> torch.device:
    """`auto` (CUDA if present, else CPU) or a torch device name, refused if it isn't there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):  # torch's message lists all its ~20 device types
        raise ValueError(
            f"device={name} is not a device: use device=auto, cpu, cuda or cuda:N"
        ) from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={name} is not supported: use device=auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but CUDA is not available; use device=cpu")
    return device
