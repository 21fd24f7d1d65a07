"""A diffusers scheduler config <-> what a checkpoint of this project holds of it: the noise
schedule (β_1..β_T), the objective, and the DDPM sampler's defaults (variance, x̂_0 clipping).

    scheduler_config.json                      checkpoint
    beta_schedule linear / squaredcos_cap_v2   schedule NoiseSchedule.linear / .cosine (float64)
    scaled_linear, sigmoid, ...                schedule NoiseSchedule(betas=[...]): the betas
    trained_betas                              schedule NoiseSchedule(betas=[...])
    prediction_type epsilon / sample / v_prediction     module.objective eps / x0 / v
    variance_type fixed_large / fixed_small    sampler variance large / small (nll_variance too)
    variance_type learned_range                module.learn_sigma, sampler variance learned
    clip_sample                                sampler clip_x0

The settings that only choose how a sampler walks its steps at inference (timestep_spacing,
steps_offset, set_alpha_to_one, skip_prk_steps) are no part of the trained model: they are
recorded, not converted. Anything else at a value that cannot be mapped exactly is refused.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import diffusers
import torch

from ddpm.convert.unet2d import ConversionError
from ddpm.schedule import NoiseSchedule

PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VARIANCES = {
    "fixed_large": "large",
    "fixed_large_log": "large",
    "fixed_small": "small",
    "fixed_small_log": "small",
    "learned_range": "learned",
}
INFERENCE_ONLY = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps")
# read here, or only meaningful with a setting that is refused unless at its default
HANDLED = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "variance_type",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "rescale_betas_zero_snr",
)


@dataclass
class Process:
    """What a checkpoint takes from a scheduler config."""

    schedule: dict[str, Any]  # a NoiseSchedule config (plain data)
    objective: str  # eps | x0 | v
    variance: str  # the DDPM sampler's: large | small | learned
    clip_x0: bool
    ignored: dict[str, Any]  # the inference-only settings, as the file gave them


def _refuse(where: str, key: str, value: Any, why: str) -> ConversionError:
    return ConversionError(f"{where}: {key}={value!r} cannot be converted exactly: {why}")


def _scheduler_class(raw: dict[str, Any], where: str) -> type:
    name = raw.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, str(name), None)
    if not isinstance(cls, type) or not hasattr(cls, "from_config"):
        raise _refuse(where, "_class_name", name, "not a scheduler of this diffusers")
    return cls


def _betas(config: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    """The NoiseSchedule config of the scheduler's betas."""
    T, kind = config["num_train_timesteps"], config["beta_schedule"]
    start, end = config.get("beta_start"), config.get("beta_end")
    if config.get("trained_betas") is not None:
        betas = [float(b) for b in config["trained_betas"]]
        if len(betas) != T:
            why = f"{len(betas)} betas for num_train_timesteps={T}"
            raise _refuse(where, "trained_betas", f"[{len(betas)} values]", why)
        return {"_target_": "ddpm.schedule.NoiseSchedule", "betas": betas, "name": "trained"}
    if kind == "linear":  # float64 here, float32 in diffusers: ᾱ agrees to ~1e-7
        target = "ddpm.schedule.NoiseSchedule.linear"
        return {"_target_": target, "timesteps": T, "beta_start": start, "beta_end": end}
    if kind == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, s = 0.008, β <= 0.999
        target = "ddpm.schedule.NoiseSchedule.cosine"
        return {"_target_": target, "timesteps": T, "s": 0.008, "max_beta": 0.999}
    if kind == "scaled_linear":  # LDM's: √β linear, in float64 as its authors computed it
        steps = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
        betas = steps.tolist()
    else:  # another curve diffusers knows (sigmoid, laplace, ...): its betas as it makes them
        try:
            betas = cls.from_config(config).betas.double().tolist()
        except (NotImplementedError, ValueError, AttributeError) as e:
            why = f"diffusers does not build it ({e})"
            raise _refuse(where, "beta_schedule", kind, why) from None
    return {"_target_": "ddpm.schedule.NoiseSchedule", "betas": betas, "name": kind}


def from_scheduler(raw: dict[str, Any], where: str) -> Process:
    """The Process of a scheduler config as read from its file (`where` names it)."""
    cls = _scheduler_class(raw, where)
    params = inspect.signature(cls.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    config = {**defaults, **{k: v for k, v in raw.items() if not k.startswith("_")}}
    for key, value in config.items():
        known = key in HANDLED or key in INFERENCE_ONLY
        if not known and key in defaults and value != defaults[key]:
            why = f"a {cls.__name__} setting with no counterpart in this project's DDPM"
            raise _refuse(where, key, value, why)
    if config.get("thresholding"):
        why = (
            "dynamic thresholding (Saharia et al.) is no option of this project's samplers; "
            "set it to false in the file to import the model with x̂_0 clipped to [-1, 1]"
        )
        raise _refuse(where, "thresholding", True, why)
    if config.get("rescale_betas_zero_snr"):
        why = "a last β of 1 (zero terminal SNR) is refused by ddpm.schedule.NoiseSchedule"
        raise _refuse(where, "rescale_betas_zero_snr", True, why)
    clip = bool(config.get("clip_sample", True))
    if clip and config.get("clip_sample_range", 1.0) != 1.0:
        why = "the samplers clip x̂_0 to [-1, 1] only"
        raise _refuse(where, "clip_sample_range", config["clip_sample_range"], why)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        why = f"the objectives are {sorted(PREDICTIONS)} (ε, x_0, v)"
        raise _refuse(where, "prediction_type", prediction, why)
    variance = config.get("variance_type", "fixed_small")  # DDPMScheduler's default
    if variance not in VARIANCES:
        why = (
            f"the DDPM sampler's variances are {sorted(VARIANCES)}; 'learned' (σ² itself "
            "predicted) is not learned_range's interpolation"
        )
        raise _refuse(where, "variance_type", variance, why)
    return Process(
        schedule=_betas(config, cls, where),
        objective=PREDICTIONS[prediction],
        variance=VARIANCES[variance],
        clip_x0=clip,
        ignored={k: config[k] for k in INFERENCE_ONLY if k in raw},
    )


def to_scheduler(
    schedule: dict[str, Any], built: NoiseSchedule, objective: str, variance: str, clip: bool
) -> dict[str, Any]:
    """The DDPMScheduler config of a checkpoint's schedule config (`built` from it), objective
    and DDPM variance: a named schedule where diffusers' curve is ours, else the exact betas
    (`trained_betas`; diffusers' "sigmoid" is another curve than ours)."""
    target, T = schedule.get("_target_"), built.num_timesteps
    config: dict[str, Any] = {"num_train_timesteps": T}
    args = {k: v for k, v in schedule.items() if k != "_target_"}
    if target == "ddpm.schedule.NoiseSchedule.linear":
        defaults = inspect.signature(NoiseSchedule.linear).parameters
        start = args.get("beta_start", defaults["beta_start"].default)
        end = args.get("beta_end", defaults["beta_end"].default)
        config |= {"beta_schedule": "linear", "beta_start": start, "beta_end": end}
    elif target == "ddpm.schedule.NoiseSchedule.cosine" and (
        args.get("s", 0.008),
        args.get("max_beta", 0.999),
    ) == (0.008, 0.999):
        config["beta_schedule"] = "squaredcos_cap_v2"
    else:  # beta_schedule is then unused by diffusers: trained_betas come first
        config |= {"beta_schedule": "linear", "trained_betas": built.betas.double().tolist()}
    inverse = {v: k for k, v in PREDICTIONS.items()}
    names = {"large": "fixed_large", "small": "fixed_small", "learned": "learned_range"}
    return config | {
        "prediction_type": inverse[objective],
        "variance_type": names[variance],
        "clip_sample": bool(clip),
        "clip_sample_range": 1.0,
    }
