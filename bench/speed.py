"""Training and sampling speed of this project's UNets beside lucidrains' and diffusers', at the
same widths, depth and attention, each in its own process on the same batches.

    python -m bench.speed                                   # CPU: both sizes, every switch
    python -m bench.speed --size quickstart --variants fp32 bf16
    python -m bench.speed --device cuda --size cifar10 --batch 128 --variants bf16 bf16+compile
    make bench                                              # installs the peers ([bench]) first

Measured per contender: a full training step (forward, MSE noise-prediction loss, backward,
Adam, EMA update) in images/s after warm-up; peak memory (CUDA max allocated, or the process's
peak RSS on CPU); sampling images/s with DDIM (50 steps unless --sample-steps) and, on GPU,
DDPM 1000 steps; forward FLOPs per image (torch.utils.flop_counter); and on GPU the fraction of
the device's dense peak that the training throughput means (MFU, 3 x forward FLOPs per image).

Sizes (--size), each with all three projects' networks at the same widths and depth:
  quickstart  28 px, 1 channel, widths 32/64/64, 1 res block per level (2 on the way up),
              attention at 7 px, batch 64: the quickstart's network (conf/model/unet_small.yaml)
  cifar10     32 px, 3 channels, widths 128/256/256/256, 2 res blocks per level, attention at
              16 px, dropout 0.1, batch 8 on CPU: the DDPM CIFAR-10 network (35.7M parameters)
Contenders at each size:
  ours        ddpm.unet.UNet and DiffusionModule's loss and EMA
  lucidrains  denoising_diffusion_pytorch Unet(dim, dim_mults, full attention where ours has
              it; its other levels have linear attention, which it can't turn off, and 2 res
              blocks per level going down) + GaussianDiffusion(pred_noise) + ema_pytorch.EMA, as
              its Trainer uses them
  diffusers   UNet2DModel configured like ours (google/ddpm-cifar10-32's config at cifar10),
              the loop of diffusers' train_unconditional example + EMAModel; DDIMPipeline to sample
Variants (--variants) are the engine's switches, applied to every contender where it has them:
  fp32, bf16 (torch.autocast, what trainer.precision=bf16-mixed does), +cl (channels_last),
  +compile (torch.compile of the network; ours only), +fused (fused Adam instead of foreach).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CONTENDERS = ("ours", "lucidrains", "diffusers")
PEERS = ("lucidrains", "diffusers")
# the network of each size: (image size, channels, widths, res blocks, attention resolution,
# dropout), the batch on CPU
SIZES = {
    "quickstart": {
        "image_size": 28,
        "channels": 1,
        "widths": (32, 64, 64),
        "blocks": 1,
        "attn": 7,
        "dropout": 0.0,
        "cpu_batch": 64,
    },
    "cifar10": {
        "image_size": 32,
        "channels": 3,
        "widths": (128, 256, 256, 256),
        "blocks": 2,
        "attn": 16,
        "dropout": 0.1,
        "cpu_batch": 8,
    },
}
VARIANTS = ("fp32", "bf16", "fp32+cl", "bf16+cl", "fp32+fused", "bf16+fused", "bf16+compile")
# dense bf16 / fp32 (TF32 off) peak FLOP/s by device name, for MFU
PEAK = {"H100": {"bf16": 989e12, "32": 67e12}, "H200": {"bf16": 989e12, "32": 67e12}}


class Contender:
    """One network with its training step and sampler, built as its own project builds it."""

    def __init__(self, name: str, device: torch.device, args: argparse.Namespace) -> None:
        self.name, self.device, self.args = name, device, args
        self.size = SIZES[args.size]
        self.image_size, self.channels = self.size["image_size"], self.size["channels"]
        self.bf16 = "bf16" in args.variant
        self.channels_last = "+cl" in args.variant
        getattr(self, f"_build_{name}")()

    def _optimizer(self, params) -> torch.optim.Optimizer:
        fused = "+fused" in self.args.variant
        return torch.optim.Adam(params, lr=2e-4, **{"fused" if fused else "foreach": True})

    # ---------------------------------------------------------------- ours
    def _build_ours(self) -> None:
        from omegaconf import OmegaConf

        from ddpm.generate import generate_all
        from ddpm.module import DiffusionModule

        size = self.size
        widths = size["widths"]
        net = {
            "_target_": "ddpm.unet.UNet",
            "image_size": self.image_size,
            "in_channels": self.channels,
            "ch": widths[0],
            "ch_mult": [w // widths[0] for w in widths],
            "num_res_blocks": size["blocks"],
            "attn_resolutions": [size["attn"]],
            "dropout": size["dropout"],
        }
        root = Path(__file__).resolve().parents[1] / "conf"
        schedule = OmegaConf.to_container(OmegaConf.load(root / "schedule" / "linear.yaml"))
        self.module = DiffusionModule(
            net=net,
            schedule=schedule,
            optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2e-4},
            channels_last=self.channels_last,  # the module's own switches
            compile="+compile" in self.args.variant,
        )
        self.module.to(self.device).train()
        self.optimizer = self._optimizer(self.module.net.parameters())
        self.params = sum(p.numel() for p in self.module.net.parameters())
        self.step_count = 0

        def train_step(x: torch.Tensor) -> None:
            with self._autocast():
                loss = self.module.loss_fn(x, None).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            self.module.ema.step(self.module.net, self.step_count)

        def sample(n: int, steps: int, sampler: str) -> torch.Tensor:
            settings = {"sampler": sampler, "steps": steps}
            return generate_all(
                self.module, n, sampler=settings, context=self._autocast, progress=False
            )

        def forward(x: torch.Tensor) -> torch.Tensor:
            return self.module.net(x, torch.zeros(len(x), dtype=torch.long, device=self.device))

        self.train_step, self.sample, self.forward = train_step, sample, forward

    # ---------------------------------------------------------------- lucidrains
    def _build_lucidrains(self) -> None:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA

        widths = self.size["widths"]
        net = Unet(
            dim=widths[0],
            dim_mults=tuple(w // widths[0] for w in widths),
            channels=self.channels,
            dropout=self.size["dropout"],
            # full attention at the level whose resolution is ours' attention resolution
            full_attn=tuple(
                self.image_size // 2**i == self.size["attn"] for i in range(len(widths))
            ),
            flash_attn=self.device.type == "cuda",
        )
        diffusion = GaussianDiffusion(
            net,
            image_size=self.image_size,
            timesteps=1000,
            sampling_timesteps=self.args.sample_steps,
            objective="pred_noise",
            beta_schedule="linear",
            auto_normalize=False,  # the batches are in [-1, 1] already
        ).to(self.device)
        if self.channels_last:
            diffusion.to(memory_format=torch.channels_last)
        ema = EMA(diffusion, beta=0.9999, update_every=1).to(self.device)
        optimizer = self._optimizer(diffusion.parameters())
        self.params = sum(p.numel() for p in net.parameters())

        def train_step(x: torch.Tensor) -> None:
            with self._autocast():
                loss = diffusion(x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update()

        def sample(n: int, steps: int, sampler: str) -> torch.Tensor:
            diffusion.sampling_timesteps = steps
            diffusion.is_ddim_sampling = sampler == "ddim"
            with torch.inference_mode(), self._autocast():
                return diffusion.sample(batch_size=n)

        def forward(x: torch.Tensor) -> torch.Tensor:
            return net(x, torch.zeros(len(x), dtype=torch.long, device=self.device))

        self.train_step, self.sample, self.forward = train_step, sample, forward

    # ---------------------------------------------------------------- diffusers
    def _build_diffusers(self) -> None:
        import torch.nn.functional as F
        from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        widths = self.size["widths"]
        attn = [self.image_size // 2**i == self.size["attn"] for i in range(len(widths))]
        unet = UNet2DModel(  # at cifar10: google/ddpm-cifar10-32's config
            sample_size=self.image_size,
            in_channels=self.channels,
            out_channels=self.channels,
            layers_per_block=self.size["blocks"],
            block_out_channels=widths,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            attention_head_dim=None if self.args.size == "cifar10" else widths[-1],  # 1 head
            dropout=self.size["dropout"],
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_eps=1e-6,
        ).to(self.device)
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True)
        ema.to(self.device)
        optimizer = self._optimizer(unet.parameters())
        self.params = sum(p.numel() for p in unet.parameters())

        def train_step(x: torch.Tensor) -> None:
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (len(x),), device=self.device)
            noisy = scheduler.add_noise(x, noise, t)
            with self._autocast():
                pred = unet(noisy, t).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(unet.parameters())

        def sample(n: int, steps: int, sampler: str) -> torch.Tensor:
            if sampler == "ddim":
                pipe = DDIMPipeline(
                    unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config)
                )
            else:
                pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            with self._autocast():
                return pipe(batch_size=n, num_inference_steps=steps, output_type="np").images

        def forward(x: torch.Tensor) -> torch.Tensor:
            return unet(x, torch.zeros(len(x), dtype=torch.long, device=self.device)).sample

        self.train_step, self.sample, self.forward = train_step, sample, forward

    # ---------------------------------------------------------------- shared
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def batch(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, self.channels, self.image_size, self.image_size, generator=g) * 2 - 1
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(name: str, args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(args.device)
    torch.manual_seed(0)
    c = Contender(name, device, args)
    x = c.batch(args.batch)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        c.forward(c.batch(1))
    flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        c.train_step(x)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        c.train_step(x)
    _sync(device)
    train_ips = args.batch * args.steps / (time.perf_counter() - start)
    memory = _peak_memory_mb(device)

    def sampling(sampler: str, steps: int) -> float:
        c.sample(args.sample_batch, 2, sampler)  # warm-up
        _sync(device)
        start = time.perf_counter()
        c.sample(args.sample_batch, steps, sampler)
        _sync(device)
        return args.sample_batch / (time.perf_counter() - start)

    result = {
        "contender": name,
        "size": args.size,
        "variant": args.variant,
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "params_m": c.params / 1e6,
        "gflop_per_image": flops / 1e9,
        "train_img_s": train_ips,
        "peak_memory_mb": memory,
        f"ddim{args.sample_steps}_img_s": sampling("ddim", args.sample_steps),
    }
    if args.ddpm_steps:
        result[f"ddpm{args.ddpm_steps}_img_s"] = sampling("ddpm", args.ddpm_steps)
    if device.type == "cuda":
        peak = next((v for k, v in PEAK.items() if k in result["device"]), None)
        if peak:
            precision = "bf16" if "bf16" in args.variant else "32"
            result["mfu"] = 3 * flops * train_ips / peak[precision]
    return result


def table(results: list[dict], sample_key: str) -> str:
    """One row per (size, variant, contender): images/s, the switch's speed-up over the same
    contender in fp32, and ours over each peer at the same network and variant."""
    by = {(r["size"], r["variant"], r["contender"]): r for r in results}
    head = (
        "| size | variant | contender | params | batch | train img/s | vs its fp32 | "
        "ours vs it | peak MB | " + sample_key.replace("_img_s", "") + " img/s | GFLOP/img | MFU |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in results:
        fp32 = by.get((r["size"], "fp32", r["contender"]))
        ours = by.get((r["size"], r["variant"], "ours"))
        speedup = f"{r['train_img_s'] / fp32['train_img_s']:.2f}x" if fp32 else "-"
        ratio = (
            f"{ours['train_img_s'] / r['train_img_s']:.2f}x"
            if ours and r["contender"] != "ours"
            else "-"
        )
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['contender']} | {r['params_m']:.2f}M | "
            f"{r['batch']} | {r['train_img_s']:.1f} | {speedup} | {ratio} | "
            f"{r['peak_memory_mb']:.0f} | {r[sample_key]:.2f} | {r['gflop_per_image']:.3f} | "
            f"{mfu} |"
        )
    return "\n".join(lines)


def run_child(name: str, size: str, variant: str, args: argparse.Namespace) -> dict | None:
    command = [
        sys.executable,
        "-m",
        "bench.speed",
        "--one",
        name,
        "--size",
        size,
        "--variant",
        variant,
        "--device",
        args.device,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--sample-steps",
        str(args.sample_steps),
        "--sample-batch",
        str(args.sample_batch),
        "--ddpm-steps",
        str(args.ddpm_steps),
    ]
    if args.batch:
        command += ["--batch", str(args.batch)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{size} {variant} {name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", nargs="*", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="e.g. bf16+cl")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 GPU, per size CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    parser.add_argument("--sample-batch", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=None, help="default: 1000 GPU, off CPU")
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.steps = args.steps or (50 if gpu else 10)
    args.sample_batch = args.sample_batch or (256 if gpu else 4)
    if args.ddpm_steps is None:
        args.ddpm_steps = 1000 if gpu else 0
    if args.one:  # the child: one contender, one JSON line
        args.size = args.size[0] if isinstance(args.size, list) else args.size
        args.batch = args.batch or (128 if gpu else SIZES[args.size]["cpu_batch"])
        print(json.dumps(measure(args.one, args)))
        return []
    unknown = {
        v
        for v in args.variants
        for part in v.split("+")
        if part not in ("fp32", "bf16", "cl", "compile", "fused")
    }
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; e.g. {', '.join(VARIANTS)}")
    jobs = [
        (size, variant, name)
        for size in args.size
        for variant in args.variants
        for name in args.only
        if not ("+compile" in variant and name != "ours")  # the peers' own code has no switch
    ]
    rounds: dict[tuple, list[dict]] = {}
    # rounds interleave the contenders, so a machine that slows down mid-run hurts all alike
    for k in range(args.repeats):
        for job in jobs:
            if "+compile" in job[1] and k:  # compiling takes a minute: measured once
                continue
            result = run_child(job[2], job[0], job[1], args)
            if result is not None:
                rounds.setdefault(job, []).append(result)
                print(
                    f"round {k + 1}: {' '.join(job)}: {result['train_img_s']:.1f} train img/s",
                    file=sys.stderr,
                )
    results = []
    for runs in rounds.values():  # the median round of each, by training speed
        runs.sort(key=lambda r: r["train_img_s"])
        results.append({**runs[len(runs) // 2], "rounds": [r["train_img_s"] for r in runs]})
    print(table(results, f"ddim{args.sample_steps}_img_s"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
