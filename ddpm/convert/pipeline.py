"""diffusers pipeline folders in and out: `import_pipeline` (a DDPMPipeline-style folder, a
unet/ + scheduler/ pair, or a bare UNet2DModel folder -> a checkpoint of this project) and
`export_pipeline` (a checkpoint -> a folder `DDPMPipeline.from_pretrained` loads).

Every setting is checked before a file is written, and the converted network is run against
the source network on the same inputs (`max_difference`): a conversion that is not the same
function stops there. What diffusers' files cannot say (class names, the null label of
classifier-free guidance, the sampler a run's grids used) travels in `ddpm.json` beside them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from torch import nn

from ddpm.checkpoint import load_checkpoint
from ddpm.convert import build
from ddpm.convert.card import model_card
from ddpm.convert.scheduler import Process, from_scheduler, to_scheduler
from ddpm.convert.unet2d import (
    ConversionError,
    diffusers_config,
    effective_config,
    from_diffusers,
    net_config,
    to_diffusers,
)
from ddpm.files import check_output_dir
from ddpm.module import load_module

RECORD = "ddpm.json"  # what diffusers' configs cannot hold, beside them
TOLERANCE = 1e-4  # max |Δ| of the outputs, relative to max(1, max |output|)


@dataclass
class Source:
    """Where the parts of a diffusers folder are."""

    root: Path  # SRC
    unet: Path  # the folder of config.json and the weights
    scheduler: Path | None  # scheduler_config.json, if there is one
    record: dict[str, Any]  # ddpm.json of an exported folder, else {}


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: a JSON object was expected, got {type(value).__name__}")
    return value


def locate(src: Path) -> Source:
    """The UNet and scheduler of `src`: a pipeline folder (model_index.json), a unet/ (+
    scheduler/) pair, or a UNet2DModel folder (config.json, maybe scheduler_config.json)."""
    if not src.is_dir():
        raise ConversionError(f"SRC={src} is not a folder: give a diffusers pipeline folder")
    record = read_json(src / RECORD) if (src / RECORD).is_file() else {}
    index = src / "model_index.json"
    if index.is_file():
        parts = {k: v for k, v in read_json(index).items() if not k.startswith("_")}
        other = sorted(set(parts) - {"unet", "scheduler"})
        if other:
            raise ConversionError(
                f"{index}: the pipeline has {other} besides a UNet and a scheduler (a latent or "
                "text-conditional pipeline); only DDPM-style pipelines (unet + scheduler) convert"
            )
        if "unet" not in parts:
            raise ConversionError(f"{index}: the pipeline has no unet; SRC must hold a UNet")
        scheduler = src / "scheduler" / "scheduler_config.json"
        unet = src / "unet"
        if not (unet / "config.json").is_file():
            raise ConversionError(f"{index} names a unet, but {unet / 'config.json'} is missing")
        return Source(src, unet, scheduler if "scheduler" in parts else None, record)
    if (src / "unet" / "config.json").is_file():
        scheduler = src / "scheduler" / "scheduler_config.json"
        return Source(src, src / "unet", scheduler if scheduler.is_file() else None, record)
    if (src / "config.json").is_file():
        scheduler = src / "scheduler_config.json"
        return Source(src, src, scheduler if scheduler.is_file() else None, record)
    raise ConversionError(
        f"SRC={src} holds no UNet: no model_index.json, unet/config.json or config.json (give "
        "the folder `huggingface-cli download REPO --local-dir DIR` wrote)"
    )


def scheduler_options(
    schedule: str, timesteps: int, beta_start: float, beta_end: float, prediction: str,
    variance: str, clip: bool,
) -> dict[str, Any]:  # fmt: skip
    """A DDPMScheduler config from the command line's --schedule options (a bare UNet)."""
    names = {"cosine": "squaredcos_cap_v2"}  # this project's name for it
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": timesteps,
        "beta_schedule": names.get(schedule, schedule),
        "beta_start": beta_start,
        "beta_end": beta_end,
        "prediction_type": prediction,
        "variance_type": variance,
        "clip_sample": clip,
    }


def _plain(value: Any) -> Any:
    """A config as JSON would hold it (tuples as lists): plain data for weights_only."""
    return json.loads(json.dumps(value))


def _unet_config(source: Source) -> dict[str, Any]:
    path = source.unet / "config.json"
    raw = read_json(path)
    kind = raw.get("_class_name", "UNet2DModel")
    if kind != "UNet2DModel":
        raise ConversionError(
            f"{path}: _class_name={kind!r} cannot be converted exactly: only UNet2DModel "
            "(the unconditional / class-conditional DDPM network) maps to ddpm.unet.UNet"
        )
    return _plain(effective_config(raw))


def _process(source: Source, options: dict[str, Any] | None) -> tuple[Process, dict]:
    if source.scheduler is not None and options is not None:
        raise ConversionError(
            f"{source.scheduler} gives the schedule; --schedule is for a UNet folder without "
            "one: drop --schedule and its options"
        )
    if source.scheduler is None and options is None:
        raise ConversionError(
            f"{source.unet} has no scheduler (scheduler/scheduler_config.json): give the "
            "training schedule, e.g. --schedule linear --timesteps 1000 (Ho et al.'s)"
        )
    if options is not None:
        return from_scheduler(options, "--schedule"), options
    raw = read_json(source.scheduler)
    return from_scheduler(raw, str(source.scheduler)), raw


def _null_label(source: Source, choice: str) -> bool:
    if choice not in ("auto", "last", "none"):
        raise ConversionError(f"--null-label must be auto, last or none, got {choice!r}")
    if choice == "auto":  # an exported folder says; another model has none we know of
        return source.record.get("null_label") is not None
    return choice == "last"


def _recorded(source: Source, classes: int | None) -> tuple[list[str], dict[str, Any]]:
    """The class names and sampler settings of an exported folder's ddpm.json (checked: a
    folder from anyone), else numbered classes and no sampler settings."""
    record, where = source.record, source.root / RECORD
    names = record.get("class_names") or [str(k) for k in range(classes or 0)]
    if (
        not isinstance(names, list)
        or len(names) != (classes or 0)
        or not all(isinstance(name, str) for name in names)
    ):
        raise ConversionError(
            f"{where}: class_names={str(names)[:80]} is not a list of {classes or 0} names "
            "(one per class of the UNet): correct or delete the file"
        )
    sampling = record.get("sampling") or {}
    if not isinstance(sampling, dict) or not isinstance(sampling.get("sampler", "ddpm"), str):
        raise ConversionError(
            f"{where}: sampling={str(sampling)[:80]} is not a sampler setting (a dict such as "
            '{"sampler": "ddpm", "steps": null}): correct or delete the file'
        )
    return names, sampling


def max_difference(ours: nn.Module, theirs: UNet2DModel, T: int, classes: int | None) -> float:
    """max |ours - theirs| / max(1, max |theirs|) on 3 random images at t = 0, T/2, T-1
    (labels 0, 1, 2 mod the classes), in fp32 on the CPU."""
    g = torch.Generator().manual_seed(0)
    shape = (3, theirs.config.in_channels, ours.image_size, ours.image_size)
    x = torch.randn(shape, generator=g)
    t = torch.tensor([0, T // 2, T - 1])
    y = torch.arange(3) % classes if classes else None
    with torch.no_grad():
        want = theirs(x, t, class_labels=y).sample
        got = ours(x, t, y) if y is not None else ours(x, t)
    return float((got - want).abs().max() / want.abs().max().clamp(min=1.0))


def _check_same(difference: float, what: str) -> None:
    if not difference <= TOLERANCE:  # nan too
        raise ConversionError(
            f"{what}: the converted network differs from the source by {difference:.2g} "
            f"(tolerance {TOLERANCE:g}); nothing was written. Please report this model."
        )


def _load_unet(folder: Path) -> UNet2DModel:
    try:
        return UNet2DModel.from_pretrained(
            folder, torch_dtype=torch.float32, low_cpu_mem_usage=False
        ).eval()
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{folder}: diffusers could not load the UNet: {first}") from None


def import_pipeline(
    src: str | Path,
    out: str | Path,
    *,
    schedule: dict[str, Any] | None = None,
    null_label: str = "auto",
    dropout: float | None = None,
) -> dict[str, Any]:
    """Convert the diffusers folder `src` into the checkpoint `out` (which must not exist);
    `schedule`: a scheduler config for a folder without one (`scheduler_options`); `dropout`
    for fine-tuning (diffusers' configs say 0.0). Returns a summary."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConversionError(f"OUT={out} exists: give a new path (nothing is overwritten)")
    check_output_dir(out.parent, "OUT", out, fix="NEW.ckpt")
    source = locate(src)
    unet_config = _unet_config(source)
    process, scheduler_config = _process(source, schedule)
    learn_sigma = process.variance == "learned"
    where = str(source.unet / "config.json")
    net = net_config(unet_config, where, learn_sigma, _null_label(source, null_label))
    if dropout is not None:
        if not 0 <= dropout < 1:
            raise ConversionError(f"--dropout must be in [0, 1), got {dropout}")
        net["dropout"] = float(dropout)
    theirs = _load_unet(source.unet)
    hparams = build.hyper_parameters(net, process.schedule, process.objective, process.variance)
    return _finish_import(source, out, theirs, hparams, process, unet_config, scheduler_config)


def _finish_import(
    source: Source,
    out: Path,
    theirs: UNet2DModel,
    hparams: dict[str, Any],
    process: Process,
    unet_config: dict[str, Any],
    scheduler_config: dict[str, Any],
) -> dict[str, Any]:
    """Map the weights, check the function, write the checkpoint."""
    where = str(source.unet)
    state = theirs.state_dict()
    try:
        module = build.build_module(hparams, lambda net: from_diffusers(net, state, where))
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ConversionError(f"{where}: the weights do not fit their config: {first}") from None
    T = module.schedule.num_timesteps
    classes = module.num_classes
    difference = max_difference(module.ema.module, theirs, T, classes)
    _check_same(difference, where)
    names, sampling = _recorded(source, classes)
    sampling = sampling or {
        "sampler": "ddpm",
        "steps": None,
        "variance": process.variance,
        "clip_x0": process.clip_x0,
        "guidance": 0.0,
    }
    converted_from = {
        "format": "diffusers",
        "diffusers_version": diffusers.__version__,
        "source": str(source.root),
        "unet": unet_config,
        "scheduler": _plain(scheduler_config),
        "inference_only": _plain(process.ignored),
        "max_difference": difference,
    }
    ckpt = build.checkpoint(module, names, _plain(sampling), converted_from)
    build.save(ckpt, out)
    params = sum(p.numel() for p in module.ema.module.parameters())
    return {
        "out": str(out),
        "parameters": params,
        "max_difference": difference,
        "net": hparams["net"],
    }


def _export_variance(module: Any) -> str:
    """The DDPM variance an exported scheduler gets: learned for learned variances, else the
    checkpoint's DDPM sampler setting (large or small; auto and other samplers: small, what
    `variance: auto` draws with)."""
    if module.hparams.learn_sigma:
        return "learned"
    sampling = module.sampling or {}
    variance = sampling.get("variance") if sampling.get("sampler", "ddpm") == "ddpm" else None
    return variance if variance in ("large", "small") else "small"


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing an old one only now."""
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def export_pipeline(ckpt: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write the checkpoint `ckpt` as a DDPMPipeline folder `out` (refused if it exists,
    unless `overwrite`): model_index.json, unet/ (the EMA weights, safetensors), scheduler/,
    a README.md model card and ddpm.json. Returns a summary."""
    ckpt, out = Path(ckpt), Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"OUT_DIR={out} is a file: give a folder")
    if out.exists() and not overwrite:
        raise ConversionError(f"OUT_DIR={out} exists: give --overwrite to replace it")
    check_output_dir(out.parent, "OUT_DIR", out)
    raw = load_checkpoint(ckpt)
    module = load_module(ckpt)
    hparams = module.hparams
    if module.autoencoder is not None:
        raise ConversionError(
            f"{ckpt} is a latent model (module.autoencoder): DDPMPipeline samples pixels with "
            "no autoencoder stage, and diffusers' LDMPipeline decodes with a VQModel, not an "
            "AutoencoderKL; exporting it would write a pipeline that outputs latents"
        )
    net, config = module.ema.module, dict(hparams.net)
    if config.get("_target_") != "ddpm.unet.UNet":
        raise ConversionError(
            f"{ckpt}: hyper_parameters.net names {config.get('_target_')}, not ddpm.unet.UNet"
        )
    unet = UNet2DModel(**diffusers_config(net, config, str(ckpt)))
    unet.load_state_dict(to_diffusers(net, net.state_dict()))
    variance = _export_variance(module)
    clip = bool((module.sampling or {}).get("clip_x0", True))
    schedule = to_scheduler(hparams.schedule, module.schedule, hparams.objective, variance, clip)
    scheduler = DDPMScheduler(**schedule)
    T = module.schedule.num_timesteps
    difference = max_difference(net, unet.eval(), T, module.num_classes)
    _check_same(difference, str(ckpt))
    alphas = (scheduler.alphas_cumprod.double() - module.schedule.alphas_cumprod.double()).abs()
    record = {
        "exported_by": "python -m ddpm.convert export",
        "checkpoint": ckpt.name,
        "class_names": list(module.class_names),
        "null_label": module.num_classes if module.num_classes and net.null_label else None,
        "sampling": dict(module.sampling or {}),
        "objective": hparams.objective,
        "schedule": dict(hparams.schedule),
        "global_step": raw.get("global_step"),
        "dataset": raw.get("dataset"),
        "max_difference": difference,
        "alphas_cumprod_max_difference": float(alphas.max()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        folder = tmp / "pipeline"
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
        (folder / RECORD).write_text(json.dumps(_plain(record), indent=1) + "\n")
        (folder / "README.md").write_text(model_card(module, raw, ckpt, record))
        _replace_folder(folder, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    params = sum(p.numel() for p in net.parameters())
    return {"out": str(out), "parameters": params, **record}
