"""A faster network forward for sampling: `torch.compile` of the (EMA) network, when the job's
number of network calls makes the compile time pay (`compile=auto|true|false` of sample.py,
eval.py and the FID callback).

On a CPU: inductor with `freezing` (the weights folded into the graph as constants, so that
convolutions get prepacked oneDNN weights and GroupNorm+SiLU fuse with their neighbours); the
option is given to this one compile (`torch.compile(options=...)`), so the process's global
inductor config is left as it was. Frozen weights are a copy: a network whose weights change
later (the FID callback's EMA between validations) is compiled without freezing. On CUDA:
`mode="reduce-overhead"`, CUDA graphs, whose outputs live in a pool the next replay overwrites:
they are cloned (a sampler keeps earlier predictions, DPM++ 2M for one).

The last, partial batch of a job would compile the graph again for its shape (tens of seconds
on a CPU, measured: bench/compile_speed.py); instead it is padded to the compiled batch with
copies of its first image and the padding dropped from the output (images are independent in
this network: GroupNorm normalises each image alone, attention runs within an image).

A compile that fails (no C++ compiler, an op inductor cannot lower ...) falls back to the eager
network, with one warning; sampling goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

SETTINGS = ("auto", "true", "false")


@dataclass(frozen=True)
class Payoff:
    """What compiling is expected to buy on a kind of device: eager seconds / compiled seconds
    per network call, and the seconds compiling takes per module of the network (compile time
    grows with the graph, not with the FLOPs)."""

    speedup: float
    compile_s_per_module: float
    measured: str  # where the figures come from


# bench/compile_speed.py, 2026-12-06, the quickstart UNet (142 modules) in bf16 at batch 128 on
# the 2-core EPYC, 1 thread, variants side by side in one process while ~5 developers shared
# the 2 cores: at load ~10 eager 3.88 s/call, frozen inductor 1.17x, unfrozen 1.23x (compiling
# 222-253 s); again with warm caches 1.09x / 1.12x; at load ~4 1.03x / 1.09x (eager 0.63 s).
# sample.py n=100 end to end, compiled then eager, at load ~3: 60 s of compiled sampling vs
# 40-45 s eager. ENVIRONMENT.md's quiet 2-thread figure: 1.3-1.6x after ~55 s of compiling
# (0.39 s per module). Quiet, 2 threads, each variant its own copy (bench/results/
# compile_cpu_quiet.json): frozen 1.10x, frozen channels_last 1.16x, unfrozen 1.14x (why so
# little: docs/benchmarks.md, the convolutions already run at the GEMM rate). The rule takes
# 1.1 (what the one-process measurements agree on) and the quiet compile time; the eager
# seconds per call it weighs them against are timed at run time
PAYOFF = {
    ("cpu", True): Payoff(1.1, 0.39, "2026-12-06, 2-core EPYC, quickstart UNet, bf16"),
    ("cpu", False): Payoff(1.1, 0.39, "2026-12-06, 2-core EPYC, quickstart UNet, bf16"),
    # not measured here (no GPU was lent): a conservative guess until bench/gpu.sh has run
    ("cuda", False): Payoff(1.3, 0.5, "a guess for CUDA graphs: not measured"),
}


def check_setting(value: object, key: str = "compile") -> str:
    """compile=auto|true|false (YAML booleans too) -> "auto" | "true" | "false"."""
    text = str(value).lower() if isinstance(value, bool | str) else None
    if text not in SETTINGS:
        raise ValueError(
            f"{key}={value!r}: give {key}=auto (compile when the job is long enough to pay), "
            f"{key}=true or {key}=false"
        )
    return text


def payoff(device: torch.device, freezing: bool) -> Payoff | None:
    """The measured payoff on `device`, or None where compiling is not supported (mps)."""
    kind = device.type
    return PAYOFF.get((kind, freezing and kind == "cpu"))


def worth_compiling(
    net: nn.Module, device: torch.device, calls: int, seconds_per_call: float, freezing: bool
) -> tuple[bool, str]:
    """compile=auto's rule: compile when the calls' expected saving, calls × seconds per eager
    call × (1 - 1/speedup), exceeds the expected compile time (seconds per module × modules).
    Returns the decision and the sentence that says why."""
    known = payoff(device, freezing)
    if known is None:
        return False, f"no compiled forward on {device.type}"
    modules = sum(1 for _ in net.modules())
    compile_s = known.compile_s_per_module * modules
    saving = calls * seconds_per_call * (1 - 1 / known.speedup)
    verdict = saving > compile_s
    why = (
        f"{calls} network calls x {seconds_per_call:.3f} s eager x (1 - 1/{known.speedup}) "
        f"= {saving:.0f} s saved {'>' if verdict else '<='} ~{compile_s:.0f} s of compiling "
        f"({modules} modules; {known.measured})"
    )
    return verdict, why


class CompiledForward:
    """`net`'s forward, compiled on the first call (padded to that call's batch afterwards), and
    eager again for good after a compile that fails. Called as the network is: (x, t, y)."""

    def __init__(
        self,
        net: nn.Module,
        device: torch.device,
        *,
        freezing: bool = True,
        pad: bool = True,
        backend: str | Callable = "inductor",
    ) -> None:
        self.net, self.pad, self.device = net, pad, device
        self.cuda_graphs = device.type == "cuda" and backend == "inductor"
        if self.cuda_graphs:
            self.compiled = torch.compile(net, mode="reduce-overhead", dynamic=False)
        else:
            options = {"freezing": True} if freezing and backend == "inductor" else None
            self.compiled = torch.compile(net, backend=backend, options=options, dynamic=False)
        self.batch: int | None = None  # the compiled batch: smaller ones are padded to it
        self.failed = False
        self.compile_seconds: float | None = None

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.failed:
            return self.net(x, t, y)
        count = x.shape[0]
        if self.pad and self.batch is not None and count < self.batch:
            x, t, y = (_padded(v, self.batch) for v in (x, t, y))
        start = time.perf_counter() if self.batch is None else None
        try:
            if self.cuda_graphs:  # a new step: the previous replay's outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            out = self.compiled(x, t, y)
        except Exception as e:  # whatever failed, eager sampling goes on
            self.failed = True
            cause = getattr(e, "inner_exception", None) or e  # dynamo wraps the backend's
            lines = str(cause).strip().splitlines() or [""]
            log.warning(
                "compile: torch.compile of the sampling network failed (%s: %s); sampling "
                "eagerly (compile=false skips the attempt)",
                type(cause).__name__,
                lines[0],
            )
            return self.net(x[:count], t[:count], None if y is None else y[:count])
        if start is not None:
            self.batch, self.compile_seconds = count, time.perf_counter() - start
            log.info("compile: compiled the sampling network in %.1f s", self.compile_seconds)
        out = out[:count]
        return out.clone() if self.cuda_graphs else out


def _padded(v: Tensor | None, batch: int) -> Tensor | None:
    """`v` (B, ...) grown to `batch` rows with copies of its first row (a valid input)."""
    if v is None:
        return None
    return torch.cat([v, v[:1].expand(batch - v.shape[0], *v.shape[1:])])


def compiled_forward(
    net: nn.Module,
    device: torch.device,
    *,
    freezing: bool = True,
    pad: bool = True,
    backend: str | Callable = "inductor",
) -> CompiledForward:
    """`CompiledForward` of `net` (in eval mode: freezing folds the weights as they are now)."""
    return CompiledForward(net, device, freezing=freezing, pad=pad, backend=backend)


def calls_of(n: int, batch_size: int, calls_per_batch: int) -> int:
    """Network calls of a job: batches × calls per batch (the sampler's steps, or more)."""
    return math.ceil(n / batch_size) * calls_per_batch
