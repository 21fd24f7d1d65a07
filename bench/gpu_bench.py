"""The GPU benchmark of issue 27, in one call of <= 8 minutes (`bench/gpu.sh`): the DDPM CIFAR-10
UNet's training img/s and MFU in bf16, eager and compiled (batch 128); sampling img/s eager vs
compiled (CUDA graphs on a GPU: `ddpm.compile`); a distilled student's sampling speed when its
checkpoint is given. Figures go to OUTDIR/gpu_bench.json, rewritten after every section (a
timeout keeps what was measured).

    bash bench/gpu.sh OUTDIR                               # the GPU machine, everything
    bash bench/gpu.sh --student runs/x/last.ckpt OUTDIR    # + a student's speed
    bash bench/gpu.sh --device cpu --tiny OUTDIR           # the CPU check of the code (seconds)

Importable without hydra-core, omegaconf, diffusers, torch-fidelity, wandb, mlxtend (the GPU
machine lacks them): the networks are `ddpm.unet.UNet` built here with the sizes of
conf/model/ddpm_cifar10.yaml and conf/model/unet_small.yaml written in Python, a checkpoint is
read with torch.load(weights_only=True) and its `_target_`s resolved against the allowlist of
`ddpm.trusted` (no Hydra to instantiate them). FLOPs are counted by torch.utils.flop_counter;
MFU = training FLOP/s / the device's dense bf16 peak (`PEAK_BF16`, by device name).
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm.compile import compiled_forward
from ddpm.objectives import eps_from_output, split_output
from ddpm.samplers import sample_ddim
from ddpm.schedule import NoiseSchedule
from ddpm.trusted import ALLOWED
from ddpm.unet import UNet

# dense bf16 tensor-core peaks (FLOP/s, no sparsity), from the vendors' data sheets
PEAK_BF16 = {
    "H200": 989.4e12,
    "H100 SXM": 989.4e12,  # torch names it "NVIDIA H100 80GB HBM3"
    "H100 80GB HBM3": 989.4e12,
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.5e12,
    "A100": 312e12,
}
# conf/model/ddpm_cifar10.yaml (Ho et al. 2020, Appendix B: 35.7M parameters)
CIFAR10 = dict(image_size=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
               attn_resolutions=(16,), dropout=0.1, num_heads=1)  # fmt: skip
# conf/model/unet_small.yaml at the quickstart's 28 px digits, 10 classes
QUICKSTART = dict(image_size=28, in_channels=1, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                  attn_resolutions=(), attn_levels=(-1,), dropout=0.0, num_classes=10)  # fmt: skip
TINY = dict(image_size=8, in_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(4,), dropout=0.1)  # fmt: skip


def peak_bf16(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak, None where the table has no entry."""
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16.items():
        if all(word in name for word in key.split()):
            return name, peak
    return name, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], None], device: torch.device, warmup: int, seconds: float) -> float:
    """Calls per second of `fn` after `warmup` calls, timed over about `seconds`."""
    for _ in range(warmup):
        fn()
    sync(device)
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        fn()
        calls += 1
        sync(device)
    return calls / (time.perf_counter() - start)


def training(args: argparse.Namespace, device: torch.device, compiled: bool) -> dict:
    """One ε-prediction training step (Ho et al. Algorithm 1) in bf16 autocast, AdamW: img/s,
    FLOPs per image (forward + backward, counted), MFU."""
    torch.manual_seed(0)
    sizes = TINY if args.tiny else CIFAR10
    net = UNet(**sizes).to(device)
    schedule = NoiseSchedule.linear(1000).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=device.type == "cuda")
    B = args.batch
    x0 = torch.rand(
        B, sizes["in_channels"], sizes["image_size"], sizes["image_size"], device=device
    )
    model = torch.compile(net, backend=args.backend) if compiled else net

    def step() -> None:
        t = torch.randint(0, 1000, (B,), device=device)
        eps = torch.randn_like(x0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(model(schedule.q_sample(x0 * 2 - 1, t, eps), t).float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    start = time.perf_counter()
    step()  # the compile, when compiled
    first_s = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops() / B
    steps_per_s = rate(step, device, args.warmup, args.seconds)
    name, peak = peak_bf16(device)
    return {
        "img_per_s": steps_per_s * B,
        "flops_per_image": flops,
        "tflops_per_s": steps_per_s * B * flops / 1e12,
        "mfu": steps_per_s * B * flops / peak if peak else None,
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "first_step_s": first_s,
    }


def sampling(args, device, net: UNet, schedule, objective: str, steps: int, labels) -> dict:
    """DDIM sampling img/s at `steps` steps (batch args.sample_batch), the network eager and
    compiled (`ddpm.compile`: CUDA graphs on a GPU, inductor with freezing on a CPU)."""
    net = net.to(device).eval()
    B = args.sample_batch
    shape = (B, net.in_channels, net.image_size, net.image_size)
    y = None if labels is None else torch.arange(B, device=device) % labels
    result = {"steps": steps, "batch": B}
    for kind in ("eager", "compiled"):
        forward = net if kind == "eager" else compiled_forward(net, device, backend=args.backend)

        def denoiser(x_t, t, forward=forward):
            out, v = split_output(forward(x_t, t, y), False)
            return eps_from_output(objective, schedule, out, x_t, t), v

        def draw(denoiser=denoiser) -> None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                sample_ddim(denoiser, schedule, torch.randn(shape, device=device), steps)

        start = time.perf_counter()
        draw()
        result[f"{kind}_first_s"] = time.perf_counter() - start
        result[f"{kind}_img_per_s"] = rate(draw, device, 1, args.seconds) * B
    result["speedup"] = result["compiled_img_per_s"] / result["eager_img_per_s"]
    return result


def trusted_target(target: str, kind: str) -> Callable:
    """A checkpoint's `_target_` of slot `kind`, resolved only if `ddpm.trusted` allows it
    (Hydra's instantiate is not on the GPU machine): the longest importable module, then
    attributes (ddpm.schedule.NoiseSchedule.cosine)."""
    allowed, what = ALLOWED[kind]
    if target not in allowed:
        raise ValueError(f"the checkpoint names _target_ {target!r}, not {what}")
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(target)


def student(args, device) -> dict:
    """A (distilled) checkpoint's EMA network, sampled with DDIM at its recorded steps."""
    ckpt = torch.load(args.student, map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    net_cfg = {k: v for k, v in hp["net"].items() if k != "_target_"}
    net = trusted_target(hp["net"]["_target_"], "network")(**net_cfg)
    prefix = "ema.module."
    net.load_state_dict(
        {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    )
    sched_cfg = {k: v for k, v in hp["schedule"].items() if k != "_target_"}
    schedule = trusted_target(hp["schedule"]["_target_"], "schedule")(**sched_cfg).to(device)
    steps = int((ckpt.get("sampling") or {}).get("steps") or 4)
    out = sampling(args, device, net, schedule, hp.get("objective", "eps"), steps,
                   net_cfg.get("num_classes"))  # fmt: skip
    out["checkpoint"] = str(args.student)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder for gpu_bench.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a check of the code")
    parser.add_argument("--student", default=None, help="a distilled student's checkpoint")
    parser.add_argument("--batch", type=int, default=None, help="training batch (128)")
    parser.add_argument("--sample-batch", type=int, default=None, help="sampling batch (256)")
    parser.add_argument("--seconds", type=float, default=None, help="timing per figure (10)")
    parser.add_argument("--only", nargs="+", default=None, help="these sections (all)")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.batch = args.batch or (4 if args.tiny else 128)
    args.sample_batch = args.sample_batch or (4 if args.tiny else 256)
    args.seconds = args.seconds if args.seconds is not None else (0.0 if args.tiny else 10.0)
    args.warmup = 1 if args.tiny else 5
    # --tiny on a CPU checks the code: dynamo traces, no inductor codegen (minutes here)
    args.backend = "eager" if args.tiny and device.type == "cpu" else "inductor"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name, peak = peak_bf16(device)
    result: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": name,
        "torch": torch.__version__,
        "tiny": args.tiny,
        "compile_backend": args.backend,
    }

    def save() -> None:
        (out / "gpu_bench.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)

    sections: list[tuple[str, Callable[[], dict]]] = [
        ("train_eager", lambda: training(args, device, compiled=False)),
        ("train_compiled", lambda: training(args, device, compiled=True)),
    ]
    for label, sizes, steps in (
        ("sample_cifar10", CIFAR10, 50),
        ("sample_quickstart", QUICKSTART, 50),
    ):
        sizes = TINY if args.tiny else sizes
        steps = 2 if args.tiny else steps

        def run(sizes=sizes, steps=steps) -> dict:
            torch.manual_seed(0)
            schedule = NoiseSchedule.linear(1000).to(device)
            return sampling(args, device, UNet(**sizes), schedule, "eps", steps,
                            sizes.get("num_classes"))  # fmt: skip

        sections.append((label, run))
    if args.student:
        sections.append(("student", lambda: student(args, device)))
    for label, section in sections:
        if args.only and label not in args.only:
            continue
        start = time.perf_counter()
        try:
            result[label] = section()
        except Exception as e:  # one failed figure does not lose the others
            result[label] = {"error": f"{type(e).__name__}: {e}"}
        result[label]["section_s"] = round(time.perf_counter() - start, 1)
        save()
    if peak is None and device.type == "cuda":
        result["note"] = f"no bf16 peak known for {name}: MFU not computed"
        save()


if __name__ == "__main__":
    main()
