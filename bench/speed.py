"""Training and sampling speed of this project's UNets beside lucidrains' and diffusers', at the
same widths, depth and attention, each in its own process on the same batches.

    python -m bench.speed                                   # CPU: batch 8, fp32
    python -m bench.speed --device cuda --batch 128 --precision bf16 --compile
    python -m bench.speed --only ours_cifar10 lucidrains --json bench/results/speed.json
    make bench                                              # installs the peers ([bench]) first

Measured per contender: a full training step (forward, MSE noise-prediction loss, backward,
Adam, EMA update) in images/s after warm-up; peak memory (CUDA max allocated, or the process's
peak RSS on CPU); sampling images/s with DDIM (50 steps unless --sample-steps) and, on GPU,
DDPM 1000 steps; forward FLOPs per image (torch.utils.flop_counter); and on GPU the fraction of
the device's dense peak that the training throughput means (MFU, 3 x forward FLOPs per image).

Contenders (the DDPM CIFAR-10 network: 32 px, widths 128/256/256/256, 2 res blocks per level,
attention at 16 px, dropout 0.1, linear schedule T = 1000):
  ours_cifar10     ddpm.unet.UNet from conf/model/ddpm_cifar10.yaml and DiffusionModule's loss
  ours_quickstart  the quickstart's small conditional UNet (28 px digits), for reference
  lucidrains       denoising_diffusion_pytorch Unet(dim=128, dim_mults=(1, 2, 2, 2), full
                   attention at 16 px; its other levels have linear attention, which it can't
                   turn off) + GaussianDiffusion(objective="pred_noise", beta_schedule="linear")
                   + ema_pytorch.EMA, as its Trainer uses them
  diffusers        UNet2DModel configured like google/ddpm-cifar10-32 + DDPMScheduler, the loop
                   of diffusers' train_unconditional example + EMAModel; DDIMPipeline to sample
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

CONTENDERS = ("ours_cifar10", "ours_quickstart", "lucidrains", "diffusers")
PEERS = ("lucidrains", "diffusers")
# dense bf16 / fp32 (TF32 off) peak FLOP/s by device name, for MFU
PEAK = {"H100": {"bf16": 989e12, "32": 67e12}, "H200": {"bf16": 989e12, "32": 67e12}}


class Contender:
    """One network with its training step and sampler, built as its own project builds it."""

    image_size, channels = 32, 3

    def __init__(self, name: str, device: torch.device, args: argparse.Namespace) -> None:
        self.name, self.device, self.args = name, device, args
        getattr(self, f"_build_{name}")()

    # ---------------------------------------------------------------- ours
    def _ours(self, model_file: str, image_size: int, channels: int, classes: int | None):
        from omegaconf import OmegaConf

        from ddpm.module import DiffusionModule

        root = Path(__file__).resolve().parents[1] / "conf"
        net = OmegaConf.to_container(OmegaConf.load(root / "model" / model_file))
        net.update(image_size=image_size, in_channels=channels, num_classes=classes)
        schedule = OmegaConf.to_container(OmegaConf.load(root / "schedule" / "linear.yaml"))
        fused = self.device.type == "cuda"
        optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2e-4}
        optimizer["fused" if fused else "foreach"] = True
        self.module = DiffusionModule(
            net=net,
            schedule=schedule,
            optimizer=optimizer,
            channels_last=self.args.channels_last,  # the module's own switches
            compile=self.args.compile,
        )
        self.module.to(self.device).train()
        self.image_size, self.channels, self.classes = image_size, channels, classes
        self.forward_net = self.module.net
        self.optimizer = self.module.configure_optimizers()
        self.params = sum(p.numel() for p in self.forward_net.parameters())
        self.step_count = 0

        def train_step(x: torch.Tensor) -> None:
            y = None
            if self.classes:
                y = torch.randint(0, self.classes, (len(x),), device=self.device)
            with self._autocast():
                loss = self.module.loss_fn(x, y).mean()
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_count += 1
            self.module.ema.step(self.module.net, self.step_count)

        def sample(n: int, steps: int, sampler: str) -> torch.Tensor:
            labels = [k % self.classes for k in range(n)] if self.classes else None
            with self._autocast():
                return self.module.generate(n, sampler=sampler, steps=steps, labels=labels)

        def forward(x: torch.Tensor) -> torch.Tensor:
            t = torch.zeros(len(x), dtype=torch.long, device=self.device)
            y = torch.zeros(len(x), dtype=torch.long, device=self.device) if classes else None
            return self.forward_net(x, t, y)

        self.train_step, self.sample, self.forward = train_step, sample, forward

    def _build_ours_cifar10(self) -> None:
        self._ours("ddpm_cifar10.yaml", 32, 3, None)

    def _build_ours_quickstart(self) -> None:
        self._ours("unet_small.yaml", 28, 1, 10)

    # ---------------------------------------------------------------- lucidrains
    def _build_lucidrains(self) -> None:
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet
        from ema_pytorch import EMA

        net = Unet(
            dim=128,
            dim_mults=(1, 2, 2, 2),
            channels=3,
            dropout=0.1,
            full_attn=(False, True, False, False),
            flash_attn=self.device.type == "cuda",
        )
        diffusion = GaussianDiffusion(
            net,
            image_size=32,
            timesteps=1000,
            sampling_timesteps=self.args.sample_steps,
            objective="pred_noise",
            beta_schedule="linear",
            auto_normalize=False,  # the batches are in [-1, 1] already
        ).to(self.device)
        if self.args.channels_last:
            diffusion.to(memory_format=torch.channels_last)
        ema = EMA(diffusion, beta=0.9999, update_every=1).to(self.device)
        optimizer = torch.optim.Adam(diffusion.parameters(), lr=2e-4, betas=(0.9, 0.99))
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

        unet = UNet2DModel(  # google/ddpm-cifar10-32's config
            sample_size=32,
            in_channels=3,
            out_channels=3,
            layers_per_block=2,
            block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            dropout=0.1,
            downsample_padding=0,
            flip_sin_to_cos=False,
            freq_shift=1,
            norm_eps=1e-6,
        ).to(self.device)
        if self.args.channels_last:
            unet.to(memory_format=torch.channels_last)
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True)
        ema.to(self.device)
        optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
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
        if self.args.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def batch(self, n: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, self.channels, self.image_size, self.image_size, generator=g) * 2 - 1
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.args.channels_last else x


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
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "precision": args.precision,
        "batch": args.batch,
        "params_m": c.params / 1e6,
        "gflop_per_image": flops / 1e9,
        "train_img_s": train_ips,
        "peak_memory_mb": memory,
        "channels_last": args.channels_last,
        "compile": args.compile,
        f"ddim{args.sample_steps}_img_s": sampling("ddim", args.sample_steps),
    }
    if args.ddpm_steps:
        result[f"ddpm{args.ddpm_steps}_img_s"] = sampling("ddpm", args.ddpm_steps)
    if device.type == "cuda":
        peak = next((v for k, v in PEAK.items() if k in result["device"]), None)
        if peak:
            result["mfu"] = 3 * flops * train_ips / peak[args.precision]
    return result


def table(results: list[dict], sample_key: str) -> str:
    peers = [r["train_img_s"] for r in results if r["contender"] in PEERS]
    fastest_peer = max(peers) if peers else None
    head = "| contender | params | precision | batch | train img/s | vs fastest peer | peak MB |"
    head += f" {sample_key.replace('_img_s', '')} img/s | GFLOP/img | MFU |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['train_img_s'] / fastest_peer:.2f}x" if fastest_peer else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(
            f"| {r['contender']} | {r['params_m']:.1f}M | {r['precision']} | {r['batch']} | "
            f"{r['train_img_s']:.2f} | {ratio} | {r['peak_memory_mb']:.0f} | "
            f"{r[sample_key]:.2f} | {r['gflop_per_image']:.2f} | {mfu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 GPU, 8 CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile our UNet")
    parser.add_argument("--sample-batch", type=int, default=None)
    parser.add_argument("--sample-steps", type=int, default=50)
    parser.add_argument("--ddpm-steps", type=int, default=None, help="default: 1000 GPU, off CPU")
    parser.add_argument("--only", nargs="*", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or (128 if gpu else 8)
    args.steps = args.steps or (50 if gpu else 5)
    args.sample_batch = args.sample_batch or (256 if gpu else 4)
    if args.ddpm_steps is None:
        args.ddpm_steps = 1000 if gpu else 0
    if args.one:  # the child: one contender, one JSON line
        print(json.dumps(measure(args.one, args)))
        return []
    results = []
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
    if args.json:
        passthrough = [a for a in passthrough if a != args.json]
    passthrough = [a for a in passthrough if a not in args.only and a != "--only"]
    for name in args.only:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.speed", *passthrough, "--one", name],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['train_img_s']:.2f} train img/s", file=sys.stderr)
    print(table(results, f"ddim{args.sample_steps}_img_s"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
