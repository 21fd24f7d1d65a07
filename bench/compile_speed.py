"""What compiling the sampling network buys, and what it costs: the figures behind
`ddpm.compile`'s `compile=auto` rule, measured side by side in one process.

    OMP_NUM_THREADS=1 python -m bench.compile_speed --json bench/results/compile_cpu.json
    python -m bench.compile_speed --ckpt runs/teacher/<date>/checkpoints/last.ckpt --batch 128

The network is the quickstart's UNet (random weights unless --ckpt: the speed does not depend
on them) under the precision sample.py would use (bf16 autocast on a CPU with native bf16), at
`--batch` images per call (128: sample.py's batch of 64, doubled by classifier-free guidance).
Measured, each variant timed in turns with the others (so a load that comes and goes hits all
alike): eager, eager channels_last, inductor with freezing (what compile=true does on a CPU),
the same with channels_last, inductor without freezing (what the FID callback compiles, whose
weights change between validations); the compile seconds of each; the seconds a partial batch
costs the frozen graph (a recompile, unless padded to the compiled batch: `ddpm.compile`).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ddpm.compile import compiled_forward
from ddpm.device import autocast, pick_device
from ddpm.module import load_module
from ddpm.unet import UNet


def quickstart_net(ckpt: str | None) -> torch.nn.Module:
    """The quickstart's UNet (conf/model/unet_small.yaml at 28 px, 10 classes)."""
    if ckpt:
        return load_module(ckpt).ema.module
    return UNet(
        28,
        1,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        attn_levels=(-1,),
        dropout=0.0,
        num_classes=10,
    )


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument(
        "--variants", nargs="+", default=["eager", "eager_cl", "frozen", "frozen_cl", "unfrozen"]
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = pick_device(args.device)
    net = quickstart_net(args.ckpt).to(device).eval()
    precision = autocast(args.precision, device)
    B = args.batch
    x = torch.randn(B, net.in_channels, net.image_size, net.image_size, device=device)
    t = torch.randint(0, 1000, (B,), device=device)
    y = torch.randint(0, 11, (B,), device=device)
    calls, compile_s = {}, {}
    for name in args.variants:
        cl = name.endswith("_cl")
        fmt = torch.channels_last if cl else torch.contiguous_format
        inp = x.contiguous(memory_format=fmt)
        # each variant its own copy: `.to(memory_format=)` converts a module in place, so a
        # shared network would time "eager" with the last variant's channels_last weights
        model = copy.deepcopy(net).to(memory_format=fmt)
        if name.startswith("eager"):
            fn = model
        else:
            fn = compiled_forward(model, device, freezing=name.startswith("frozen"), pad=False)
        with torch.no_grad(), precision:
            compile_s[name] = timed(fn, inp, t, y)  # eager: warm-up
        calls[name] = (fn, inp)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad(), precision:
        for _ in range(args.rounds):
            for name, (fn, inp) in calls.items():
                seconds[name].append(timed(fn, inp, t, y))
        partial_s = None
        if "frozen" in calls:  # a last, partial batch: a recompile of the frozen graph
            fn, inp = calls["frozen"]
            partial_s = timed(fn, inp[: B * 5 // 8], t[: B * 5 // 8], y[: B * 5 // 8])
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "precision": "bf16"
        if precision.fast_dtype == torch.bfloat16 and precision._enabled
        else "32",
        "batch": B,
        "seconds_per_call": median,
        "image_evals_per_s": {k: B / v for k, v in median.items()},
        "speedup_vs_eager": {k: median["eager"] / v for k, v in median.items()}
        if "eager" in median
        else None,
        "first_call_s": compile_s,
        "partial_batch_first_call_s": partial_s,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
