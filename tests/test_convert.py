"""diffusers pipelines in and out (`python -m ddpm.convert`), offline: the folders are built
here with diffusers and random weights in the exact configs of the published DDPM models
(google/ddpm-cifar10-32, the 256 px ones at a small width), and the checkpoints are trained
here. Equal means: the same function to float32 noise, not an approximation."""

from __future__ import annotations

import inspect
import json
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, compose_config, train_config
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from ddpm.cli import eval as evaluation
from ddpm.cli import train as training
from ddpm.cli.sample import sample
from ddpm.convert import build, export_pipeline, import_pipeline
from ddpm.convert.__main__ import fine_tune_overrides, main
from ddpm.convert.pipeline import scheduler_options
from ddpm.convert.unet2d import effective_config, net_config
from ddpm.grids import timesteps
from ddpm.module import load_module
from ddpm.samplers import sample_ddim, sample_ddpm
from ddpm.schedule import NoiseSchedule
from ddpm.unet import UNet

FIXTURE = Path(__file__).parent / "fixtures" / "main_a2bb1d3.ckpt"

# google/ddpm-cifar10-32's unet/config.json (the settings that differ from diffusers' defaults
# written out; the rest are the defaults, as the published file's)
CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}
# the 256 px models (celebahq, church, bedroom, cat): six levels [128, 128, 256, 256, 512,
# 512], attention at 16 px (the fifth level); here at an eighth of the width
DDPM_256_SMALL = {
    **CIFAR10,
    "sample_size": 256,
    "block_out_channels": [16, 16, 32, 32, 64, 64],
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4,
    "norm_num_groups": 8,
}
LINEAR = {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def random_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random and non-zero, scaled so that activations stay O(1) (diffusers
    initialises no layer to zero, but a random function tests more than an initialised one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2 + (p == 1).float())
    return model.eval()


def pipeline_folder(
    folder: Path, unet: dict, scheduler: dict | None = None, seed: int = 0
) -> UNet2DModel:
    """A DDPMPipeline folder as save_pretrained writes it (or a bare UNet without `scheduler`)."""
    model = random_weights(UNet2DModel(**unet), seed)
    if scheduler is None:
        model.save_pretrained(folder)
    else:
        DDPMPipeline(unet=model, scheduler=DDPMScheduler(**scheduler)).save_pretrained(folder)
    return model


def outputs(net, x, t, y=None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(net, UNet2DModel):
            return net(x, t, class_labels=y).sample
        return net(x, t, y) if y is not None else net(x, t)


def same_function(ours, theirs, channels: int, size: int, T: int, classes: int | None = None):
    """max |ours - theirs| on random x at t = 0, T/2, T-1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, channels, size, size, generator=g)
    t = torch.tensor([0, T // 2, T - 1])
    y = torch.tensor([0, 1, classes - 1]) if classes else None
    want = outputs(theirs, x, t, y)
    return float((outputs(ours, x, t, y) - want).abs().max()), want


@contextmanager
def diffusers_warnings() -> Iterator[list[str]]:
    """What diffusers' loggers warn (they do not propagate to pytest's caplog) and Python's
    warnings, while inside."""
    found: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found.append(record.getMessage())

    handler, logger = Collect(logging.WARNING), logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


# ---------------------------------------------------------------- import


def import_cifar10(root: Path, widths: list[int]) -> tuple[UNet2DModel, Path]:
    """google/ddpm-cifar10-32 as a folder (its configs, random weights; `widths` its
    block_out_channels), imported."""
    scheduler = {**LINEAR, "variance_type": "fixed_large", "clip_sample": True}
    unet = {**CIFAR10, "block_out_channels": widths}
    theirs = pipeline_folder(root / "ddpm-cifar10-32", unet, scheduler)
    import_pipeline(root / "ddpm-cifar10-32", root / "cifar10.ckpt")
    return theirs, root / "cifar10.ckpt"


def check_cifar10_import(theirs: UNet2DModel, ckpt: Path) -> None:
    module = load_module(ckpt)  # an ordinary checkpoint: the public way in
    net = module.ema.module
    difference, want = same_function(net, theirs, 3, 32, 1000)
    assert difference < 1e-4 and want.abs().max() > 0.1  # a function of x, not ~0
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the network and its EMA: the same weights
    diffusers_scheduler = DDPMScheduler(**LINEAR)
    np.testing.assert_allclose(
        module.schedule.alphas_cumprod.numpy(),
        diffusers_scheduler.alphas_cumprod.numpy(),
        atol=1e-6,
    )
    hp = module.hparams
    assert hp.net["downsample_padding"] == 0 and hp.net["attn_resolutions"] == [16]
    assert hp.objective == "eps" and not hp.learn_sigma and hp.nll_variance == "large"
    assert module.sampling == {
        "sampler": "ddpm", "steps": None, "variance": "large", "clip_x0": True, "guidance": 0.0
    }  # fmt: skip


def test_the_cifar10_config_is_the_35_75m_unet_of_ho_et_al():
    """The published config maps onto the network of conf/model/ddpm_cifar10.yaml with TF's
    padding, 35.75M parameters (the random-weight check of its function: the slow test)."""
    config = net_config(effective_config(UNET_JSON), "config.json", False, False)
    assert config == {
        "_target_": "ddpm.unet.UNet", "image_size": 32, "in_channels": 3, "ch": 128,
        "ch_mult": [1, 2, 2, 2], "num_res_blocks": 2, "attn_resolutions": [16],
        "dropout": 0.0, "num_heads": 1, "num_classes": None, "downsample_padding": 0,
    }  # fmt: skip
    net = UNet(**{k: v for k, v in config.items() if k != "_target_"})
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    assert sum(p.numel() for p in UNet2DModel(**CIFAR10).parameters()) == 35_746_307


def test_the_cifar10_layout_imports_as_the_same_function(tmp_path: Path):
    """google/ddpm-cifar10-32's config at a quarter of its width, every other setting its own."""
    check_cifar10_import(*import_cifar10(tmp_path, [32, 64, 64, 64]))


@pytest.mark.slow
def test_the_cifar10_model_imports_as_the_same_function(tmp_path: Path):
    """The published config as it is: 35.75M random weights, outputs equal to 1e-4 (fp32)."""
    theirs, ckpt = import_cifar10(tmp_path, CIFAR10["block_out_channels"])
    assert (
        round(sum(p.numel() for p in load_module(ckpt).ema.module.parameters()) / 1e6, 2) == 35.75
    )
    check_cifar10_import(theirs, ckpt)


@pytest.mark.parametrize("size", [64, pytest.param(256, marks=pytest.mark.slow)])
def test_the_256_px_layout_imports_as_the_same_function(tmp_path: Path, size: int):
    """Six levels, attention at the fifth (16 px at 256, 4 px at 64: the same network but for
    its input size), 8 groups per norm (so norm_groups is written), fixed_small and a bare
    unet/ + scheduler/ pair (no model_index.json)."""
    scheduler = {**LINEAR, "variance_type": "fixed_small"}
    theirs = pipeline_folder(
        tmp_path / "church", {**DDPM_256_SMALL, "sample_size": size}, scheduler
    )
    (tmp_path / "church" / "model_index.json").unlink()
    import_pipeline(tmp_path / "church", tmp_path / "church.ckpt")
    module = load_module(tmp_path / "church.ckpt")
    net = module.hparams.net
    assert net["ch_mult"] == [1, 1, 2, 2, 4, 4] and net["attn_resolutions"] == [size // 16]
    assert net["norm_groups"] == 8 and module.sampling["variance"] == "small"
    difference, _ = same_function(module.ema.module, theirs, 3, size, 1000)
    assert difference < 1e-4


@pytest.mark.parametrize("null_label", ["none", "last"])
def test_a_class_conditional_model_imports_with_its_labels(tmp_path: Path, null_label: str):
    """num_class_embeds = 5: five classes (--null-label none, the default for a folder not
    exported from here) or four and the null label of guidance (--null-label last)."""
    unet = {**CIFAR10, "block_out_channels": [32, 64], "sample_size": 16, "num_class_embeds": 5}
    unet |= {"down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "norm_num_groups": 8}
    unet |= {"up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 16}
    theirs = pipeline_folder(tmp_path / "cond", unet, {**LINEAR, "prediction_type": "v_prediction"})
    import_pipeline(tmp_path / "cond", tmp_path / "cond.ckpt", null_label=null_label)
    module = load_module(tmp_path / "cond.ckpt")
    assert module.hparams.objective == "v" and module.hparams.net["head_dim"] == 16
    classes = 5 if null_label == "none" else 4
    assert module.hparams.cond_drop_prob == (0.0 if null_label == "none" else 0.1)
    assert module.num_classes == classes and module.class_names == [str(k) for k in range(classes)]
    difference, _ = same_function(module.ema.module, theirs, 3, 16, 1000, classes=classes)
    assert difference < 1e-4
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    if null_label == "last":  # no label: the null row, as a diffusers call with label 4
        np.testing.assert_allclose(
            outputs(module.ema.module, x, t),
            outputs(theirs, x, t, torch.tensor([4, 4])),
            atol=1e-4,
        )
    else:
        with pytest.raises(ValueError, match="no null label"):
            module.ema.module(x, t)


def test_a_bare_unet_takes_the_schedule_from_the_command_line(tmp_path: Path):
    unet = {**CIFAR10, "block_out_channels": [32, 32], "sample_size": 8, "norm_num_groups": 8}
    unet |= {"down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2}
    theirs = pipeline_folder(tmp_path / "unet", unet)
    options = scheduler_options("cosine", 500, 1e-4, 0.02, "sample", "fixed_small", False)
    import_pipeline(tmp_path / "unet", tmp_path / "bare.ckpt", schedule=options)
    module = load_module(tmp_path / "bare.ckpt")
    cosine = {"_target_": "ddpm.schedule.NoiseSchedule.cosine", "timesteps": 500}
    assert module.hparams.schedule == cosine | {"s": 0.008, "max_beta": 0.999}
    assert module.hparams.objective == "x0" and module.sampling["clip_x0"] is False
    reference = DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(module.schedule.alphas_cumprod, reference.alphas_cumprod, atol=1e-6)
    assert same_function(module.ema.module, theirs, 3, 8, 500)[0] < 1e-4


# ---------------------------------------------------------------- export


def train_tiny(run: Path, *overrides: str) -> Path:
    """4 steps of the tiny UNet (debug=fast: 28 px digits, class-conditional, v, cosine), with
    8 groups in every norm (gcd(32, C) differs across its widths 8 / 16 / 24, diffusers'
    norm_num_groups is one number): its last checkpoint."""
    training.train(train_config(run, [*FAST, "++model.norm_groups=8", *overrides]))
    return run / "checkpoints" / "last.ckpt"


def untrained_checkpoint(path: Path, net: dict, schedule: dict, objective: str, variance: str):
    """A checkpoint of this project with random weights, as a converter writes one."""
    hparams = build.hyper_parameters(net, schedule, objective, variance)
    kwargs = {k: v for k, v in net.items() if k != "_target_"}
    weights = random_weights(UNet(**kwargs), seed=3).state_dict()
    sampling = {"sampler": "ddpm", "steps": 3, "variance": variance, "clip_x0": True}
    ckpt = build.checkpoint(build.build_module(hparams, lambda _: weights), [], sampling, {})
    return build.save(ckpt, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A trained class-conditional checkpoint with learned variances (v, cosine), and an
    unconditional ε-model with σ² = β and the linear schedule (random weights), exported."""
    root = tmp_path_factory.mktemp("trained")
    tiny = {"_target_": "ddpm.unet.UNet", "image_size": 28, "in_channels": 1, "ch": 8}
    tiny |= {"ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [14], "norm_groups": 8}
    ckpts = {
        "conditional": train_tiny(root / "conditional", "module.learn_sigma=true"),
        "unconditional": untrained_checkpoint(
            root / "unconditional.ckpt",
            tiny,
            {"_target_": "ddpm.schedule.NoiseSchedule.linear"},
            "eps",
            "large",
        ),  # fmt: skip
    }
    for name, ckpt in list(ckpts.items()):
        export_pipeline(ckpt, root / f"{name}_pipeline")
        ckpts[f"{name}_pipeline"] = root / f"{name}_pipeline"
    return ckpts


@pytest.mark.parametrize("name", ["conditional", "unconditional"])
def test_an_export_loads_in_diffusers_without_a_warning_and_is_the_same_model(trained, name):
    folder, module = trained[f"{name}_pipeline"], load_module(trained[name])
    with diffusers_warnings() as found:
        # low_cpu_mem_usage=False: without the accelerate package diffusers warns otherwise,
        # about the environment, not the folder
        pipe = DDPMPipeline.from_pretrained(folder, low_cpu_mem_usage=False)
    assert found == []
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert {p.name for p in folder.iterdir()} >= {"README.md", "ddpm.json", "model_index.json"}
    hp, conditional = module.hparams, name == "conditional"
    config = pipe.scheduler.config
    assert config.prediction_type == {"v": "v_prediction", "eps": "epsilon"}[hp.objective]
    assert config.variance_type == ("learned_range" if conditional else "fixed_large")
    assert pipe.unet.config.out_channels == (2 if conditional else 1)
    assert pipe.unet.config.num_class_embeds == (11 if conditional else None)
    np.testing.assert_allclose(
        pipe.scheduler.alphas_cumprod.numpy(), module.schedule.alphas_cumprod.numpy(), atol=1e-6
    )
    difference, _ = same_function(
        module.ema.module, pipe.unet, 1, 28, 1000, 10 if conditional else None
    )
    assert difference < 1e-5
    g = torch.Generator().manual_seed(0)
    if not conditional:  # DDPMPipeline itself, a few steps
        images = pipe(batch_size=2, num_inference_steps=3, generator=g, output_type="np").images
        assert images.shape == (2, 28, 28, 1) and np.isfinite(images).all()
        return
    # the lines of the model card: labels (and guidance) on the pipeline's own scheduler
    pipe.scheduler.set_timesteps(3)
    y, w, x = torch.tensor([0, 7]), 2.0, torch.randn(2, 1, 28, 28, generator=g)
    for t in pipe.scheduler.timesteps:
        out = pipe.unet(x, t, class_labels=y).sample
        out = (1 + w) * out - w * pipe.unet(x, t, class_labels=torch.full_like(y, 10)).sample
        x = pipe.scheduler.step(out, t, x, generator=g).prev_sample
    assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()
    assert "class_labels=y" in (folder / "README.md").read_text()


@pytest.mark.parametrize("name", ["conditional", "unconditional"])
def test_import_of_an_export_draws_what_the_checkpoint_draws(trained, name, tmp_path: Path):
    """Round trip: the same samples from sample.py with the same seed (the checkpoint's own
    sampler: DDPM 3 steps, guidance 2 for the conditional one), the same weights and tables."""
    ckpt = trained[name]
    back = tmp_path / "back.ckpt"
    import_pipeline(trained[f"{name}_pipeline"], back)
    original, again = load_module(ckpt), load_module(back)
    defaults = {k: v.default for k, v in inspect.signature(UNet).parameters.items()}
    assert defaults | again.hparams.net == defaults | original.hparams.net  # the same network
    assert again.sampling == original.sampling and again.class_names == original.class_names
    for a, b in zip(
        original.ema.module.state_dict().values(),
        again.ema.module.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert torch.equal(original.schedule.alphas_cumprod, again.schedule.alphas_cumprod)
    drawn = []
    for path in (ckpt, back):
        out = tmp_path / path.stem
        overrides = [f"ckpt={path}", "n=3", "seed=5", "precision=32", "npz=true", f"out={out}"]
        sample(compose_config(overrides, name="sample"))
        drawn.append(np.load(out / "samples.npz")["arr_0"])
    assert np.array_equal(*drawn)


# ---------------------------------------------------------------- samplers, step by step


def dummy_net(learned: bool):
    """A network of x and t alone (diffusers' scheduler tests use x * t / (t + 1)), float32
    whatever x is: its output leaves [-1, 1] at some steps, so x̂_0 clipping is exercised; v in
    [-1, 1] for learned σ."""

    def net(x: torch.Tensor, t: torch.Tensor, y=None) -> torch.Tensor:
        x, t = x.float(), t.float().reshape(-1, 1, 1, 1)
        out = 1.3 * x * t / (t + 1) + 0.1 * torch.sin(3 * x)
        return torch.cat([out, torch.tanh(x)], dim=1) if learned else out

    return net


def steps_agree(module, scheduler, run_ours, step_kwargs) -> tuple[float, float]:
    """max |ours - diffusers| over every step of a chain: at each of our states x_t, diffusers'
    step from it with the same model output and the same noise (one generator each, seeded
    alike, drawn in the same order) against our next state. Twice: in float32 with each side's
    own tables (the module's, the scheduler's), then in float64 with one table of ᾱ for both
    (a float64 NoiseSchedule of the module's betas), where only the step math can differ."""
    net, channels = dummy_net(module.hparams.learn_sigma), 1
    ddim = isinstance(scheduler, DDIMScheduler)  # which takes the prediction's channels only
    errors = []
    for dtype in (torch.float32, torch.float64):
        if dtype == torch.float64:
            module.schedule = NoiseSchedule(module.schedule.betas.double(), dtype=dtype)
            scheduler.alphas_cumprod = module.schedule.alphas_cumprod
            scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=dtype)
        x_T = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(1))
        states = [x_T.to(dtype)]
        g = torch.Generator().manual_seed(0)
        run_ours(module.denoiser(net), module.schedule, states[0], g, recorder(states))
        assert len(states) == len(scheduler.timesteps) + 1
        g, error = torch.Generator().manual_seed(0), 0.0
        for i, t in enumerate(scheduler.timesteps):
            out = net(states[i], torch.full((2,), int(t)))
            out = out[:, :channels] if ddim else out
            prev = scheduler.step(out, t, states[i], generator=g, **step_kwargs).prev_sample
            error = max(error, float((prev - states[i + 1]).abs().max()))
        errors.append(error)
    return errors[0], errors[1]


def recorder(states: list):
    return lambda i, t, x, x0: states.append(x.clone())


# float32, each side's own tables: diffusers' 1 - ᾱ_t (float32) loses digits near t = 0
# (ᾱ ≈ 0.9996 at t = 2: 1e-4 relative in the posterior's weights), where ours are float64.
# float64, one table for both: what is left is diffusers computing its terms with the model
# output and the noise (float32 here, as the network's) in their dtype, ~1e-8
FLOAT32, FLOAT64 = 2e-4, 1e-6


@pytest.mark.parametrize(
    ("name", "variance"),
    [("unconditional", "large"), ("unconditional", "small"), ("conditional", "learned")],
)
def test_ddpm_steps_equal_diffusers_ddpm_scheduler(trained, name, variance):
    """Our DDPM sampler = DDPMScheduler built from the exported config, step by step: all T
    steps, and a respaced chain of 10 given to it as its custom `timesteps` (diffusers then
    respaces β as we do: β_i = 1 - ᾱ_τi / ᾱ_τ(i-1))."""
    names = {"large": "fixed_large", "small": "fixed_small", "learned": "learned_range"}
    config = DDPMScheduler.load_config(trained[f"{name}_pipeline"] / "scheduler")
    for steps in (1000, 10):
        module = load_module(trained[name])
        scheduler = DDPMScheduler.from_config(config, variance_type=names[variance])
        clip = scheduler.config.clip_sample

        def ours(denoiser, schedule, x_T, g, callback, steps=steps, clip=clip):
            sample_ddpm(denoiser, schedule, x_T, steps, generator=g, callback=callback,
                        variance=variance, clip_x0=clip)  # fmt: skip

        scheduler.set_timesteps(timesteps=timesteps(1000, steps).flip(0).tolist())
        float32, float64 = steps_agree(module, scheduler, ours, {})
        assert float32 < FLOAT32 and float64 < FLOAT64, (steps, float32, float64)


@pytest.mark.parametrize("name", ["conditional", "unconditional"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_steps_equal_diffusers_ddim_scheduler_over_all_t(trained, name, eta):
    """Our DDIM = DDIMScheduler (set_alpha_to_one, use_clipped_model_output: ε refitted to
    the clipped x̂_0, as ours does) at all T steps, where every spacing of diffusers visits
    T - 1 ... 0 as ours do. With fewer steps none is ours: 'leading' visits k·T/S (+
    steps_offset; never T - 1), 'trailing' T - 1 - k·T/S (never 0), and 'linspace' our
    uniform grid but steps from t to t - T/S instead of to the grid's previous point."""
    module = load_module(trained[name])
    config = DDIMScheduler.load_config(trained[f"{name}_pipeline"] / "scheduler")
    for spacing in ("leading", "trailing", "linspace"):
        scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing)
        scheduler.set_timesteps(1000)
        assert scheduler.timesteps.tolist() == list(range(999, -1, -1)), spacing

    def ours(denoiser, schedule, x_T, g, callback):
        sample_ddim(denoiser, schedule, x_T, 1000, generator=g, callback=callback,
                    eta=eta, clip_x0=scheduler.config.clip_sample)  # fmt: skip

    kwargs = {"eta": eta, "use_clipped_model_output": True}
    float32, float64 = steps_agree(module, scheduler, ours, kwargs)
    assert float32 < FLOAT32 and float64 < FLOAT64, (float32, float64)
    fewer = {}
    for spacing in ("leading", "trailing", "linspace"):
        scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing)
        scheduler.set_timesteps(50)
        fewer[spacing] = scheduler.timesteps.flip(0).tolist()
    assert fewer["leading"][-1] == 980 and fewer["trailing"][0] == 19
    assert fewer["linspace"] == timesteps(1000, 50).tolist()  # our uniform grid, but:
    linspace = DDIMScheduler.from_config(config, timestep_spacing="linspace")
    linspace.set_timesteps(50)
    assert 41 - linspace.config.num_train_timesteps // linspace.num_inference_steps == 21  # not 20


# ---------------------------------------------------------------- the entry points on an import

DIGITS = {  # a 28 px grayscale UNet2DModel (mnist5k, eval.py's default dataset), 20 steps
    **CIFAR10,
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    scheduler = {
        **LINEAR,
        "num_train_timesteps": 20,
        "beta_end": 0.2,
        "variance_type": "fixed_large",
    }
    pipeline_folder(root / "pipeline", DIGITS, scheduler)
    import_pipeline(root / "pipeline", root / "digits.ckpt")
    return root / "digits.ckpt"


def test_sample_py_and_eval_py_run_on_an_imported_checkpoint(digits: Path, tmp_path: Path):
    out = tmp_path / "samples"
    sample(compose_config([f"ckpt={digits}", "n=3", "npz=true", f"out={out}"], name="sample"))
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (3, 28, 28, 1) and images.dtype == np.uint8
    assert json.loads((out / "sample.json").read_text())["sampler.variance"] == "large"
    result = tmp_path / "nll.json"
    overrides = [f"source={digits}", "nll=true", "fid=false", "n=2", "batch_size=2"]
    evaluation.evaluate(compose_config([*overrides, f"out={result}"], name="eval"))
    bpd = json.loads(result.read_text())["bpd_mnist5k_val"]
    assert 0 < bpd < 100  # random weights: a finite bound, far from the data


def test_train_py_fine_tunes_an_imported_checkpoint(digits: Path, tmp_path: Path):
    """resume=OUT.ckpt in a new run directory, with the overrides the import prints (they
    rebuild the imported network) and the module settings of the run (resume_changes=allow:
    the quickstart's AdamW and v-objective over the import's Adam and ε would be refused)."""
    net = load_module(digits).hparams.net
    overrides = fine_tune_overrides(net).split()
    run = tmp_path / "finetune"
    cfg = train_config(
        run,
        [*FAST, f"resume={digits}", "resume_changes=allow", "schedule=linear"]
        + ["schedule.timesteps=20", "schedule.beta_end=0.2", "module.objective=eps", *overrides],
    )
    training.train(cfg)
    tuned = load_module(run / "checkpoints" / "last.ckpt")
    assert tuned.hparams.net == net
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4  # 4 steps on from the import's step 0


def test_eval_py_measures_fid_and_a_sampler_table_of_an_imported_checkpoint(
    digits: Path, tmp_path: Path, weights: str
):
    """FID (64-d features, fid-helper's offline Inception) for each row of table=."""
    result = tmp_path / "fid.json"
    overrides = [f"source={digits}", "n=10", "reference_n=20", "features=64", "kid=false"]
    overrides += [f"weights={weights}", f"cache_dir={tmp_path}", "table=[ddim:2,ddpm:20]"]
    evaluation.evaluate(compose_config([*overrides, f"out={result}"], name="eval"))
    figures = json.loads(result.read_text())
    assert figures["fid10_train_ddim2"] > 0 and figures["fid10_train_ddpm20"] > 0
    assert "ddim" in (tmp_path / "fid.table.md").read_text()


# ---------------------------------------------------------------- bad inputs


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


UNET_JSON = {"_class_name": "UNet2DModel", **CIFAR10}
SCHEDULER_JSON = {"_class_name": "DDPMScheduler", **LINEAR, "variance_type": "fixed_large"}


def bad_folder(root: Path, unet: dict | None, scheduler: dict | None, index: dict | None = None):
    """A pipeline folder of configs only, no weights: a refusal must come before they are read."""
    if unet is not None:
        write_json(root / "unet" / "config.json", {**UNET_JSON, **unet})
    if scheduler is not None:
        write_json(root / "scheduler" / "scheduler_config.json", {**SCHEDULER_JSON, **scheduler})
    if index is not None:
        write_json(root / "model_index.json", {"_class_name": "DDPMPipeline", **index})
    return root


BAD_IMPORTS = {  # what is wrong -> (unet, scheduler, model_index) settings, words of the line
    "no UNet": (None, None, None, ["holds no UNet"]),
    "a block type": (
        {"down_block_types": ["DownBlock2D", "AttnSkipDownBlock2D", "DownBlock2D", "DownBlock2D"]},
        {}, None, ["down_block_types", "AttnSkipDownBlock2D"],
    ),
    "no scheduler": ({}, None, None, ["has no scheduler", "--schedule"]),
    "AdaGN": ({"resnet_time_scale_shift": "scale_shift"}, {}, None, ["resnet_time_scale_shift"]),
    "not square": ({"sample_size": [32, 64]}, {}, None, ["sample_size", "square"]),
    "attention one way": (
        {"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]},
        {}, None, ["up_block_types", "down levels [1] but up levels [2]"],
    ),
    "a text UNet": ({"_class_name": "UNet2DConditionModel"}, {}, None, ["UNet2DConditionModel"]),
    "a latent pipeline": (
        {}, {}, {"unet": ["diffusers", "UNet2DModel"], "vqvae": ["diffusers", "VQModel"]},
        ["model_index.json", "vqvae"],
    ),
    "σ² predicted": ({}, {"variance_type": "learned"}, None, ["variance_type", "learned_range"]),
    "2C out, fixed σ": ({"out_channels": 6}, {}, None, ["out_channels=6", "learned_range"]),
    "thresholding": ({}, {"thresholding": True}, None, ["thresholding"]),
    "zero SNR": ({}, {"rescale_betas_zero_snr": True}, None, ["rescale_betas_zero_snr"]),
    "prediction": ({}, {"prediction_type": "flow"}, None, ["prediction_type", "flow"]),
}  # fmt: skip


def refused(capsys, argv: list[str], words: list[str], root: Path) -> str:
    """`python -m ddpm.convert ARGV` fails with one line holding `words`, writing nothing."""
    before = sorted(str(p) for p in root.rglob("*"))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and not out, err
    assert all(word in err for word in words), (err, words)
    assert "Traceback" not in err
    assert sorted(str(p) for p in root.rglob("*")) == before, "something was written"
    return err


@pytest.mark.parametrize("case", list(BAD_IMPORTS))
def test_a_bad_import_is_one_line_and_writes_nothing(tmp_path: Path, capsys, case: str):
    unet, scheduler, index, words = BAD_IMPORTS[case]
    src = bad_folder(tmp_path / "src", unet, scheduler, index)
    src.mkdir(exist_ok=True)
    refused(capsys, ["import", str(src), str(tmp_path / "out.ckpt")], words, tmp_path)


def test_an_existing_output_is_refused_both_ways(tmp_path: Path, capsys, trained):
    (tmp_path / "taken.ckpt").write_bytes(b"mine")
    src = bad_folder(tmp_path / "src", {}, {})
    refused(capsys, ["import", str(src), str(tmp_path / "taken.ckpt")], ["exists"], tmp_path)
    (tmp_path / "pipeline").mkdir()
    argv = ["export", str(trained["unconditional"]), str(tmp_path / "pipeline")]
    refused(capsys, argv, ["exists", "--overwrite"], tmp_path)
    assert main([*argv, "--overwrite"]) == 0  # replaced, whole
    assert (tmp_path / "pipeline" / "unet" / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_a_checkpoint_diffusers_cannot_hold_exactly_is_refused_by_name(tmp_path, capsys):
    """The fixture's tiny UNet (widths 8, 16: GroupNorms of 8, 16 and 24 groups by gcd(32, C))
    has no one norm_num_groups: the line names model.norm_groups and the fix."""
    argv = ["export", str(FIXTURE), str(tmp_path / "out")]
    refused(capsys, argv, ["model.norm_groups", "train with model.norm_groups=8"], tmp_path)


def test_schedule_options_are_refused_where_the_folder_has_a_scheduler(tmp_path, capsys):
    src = bad_folder(tmp_path / "src", {}, {})
    argv = ["import", str(src), str(tmp_path / "out.ckpt"), "--schedule", "linear"]
    refused(capsys, argv, ["--schedule is for a UNet folder without one"], tmp_path)


def test_a_latent_model_is_refused_by_name(tmp_path: Path, capsys):
    """DDPMPipeline has no autoencoder stage (and LDMPipeline decodes with a VQModel)."""
    vae = {"_target_": "diffusers.AutoencoderKL", "in_channels": 1, "out_channels": 1}
    vae |= {"block_out_channels": [8, 8], "down_block_types": ["DownEncoderBlock2D"] * 2}
    vae |= {"up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 2}
    vae |= {"norm_num_groups": 4, "layers_per_block": 1}
    net = {"_target_": "ddpm.unet.UNet", "image_size": 8, "in_channels": 2, "ch": 32}
    net |= {"ch_mult": [1], "attn_resolutions": []}
    hparams = build.hyper_parameters(
        net, {"_target_": "ddpm.schedule.NoiseSchedule.linear"}, "eps", "large"
    )
    hparams["autoencoder"] = {"net": vae}
    kwargs = {k: v for k, v in net.items() if k != "_target_"}
    module = build.build_module(hparams, lambda _: UNet(**kwargs).state_dict())
    ckpt = build.save(build.checkpoint(module, [], {}, {}), tmp_path / "latent.ckpt")
    refused(capsys, ["export", str(ckpt), str(tmp_path / "out")], ["latent model"], tmp_path)
