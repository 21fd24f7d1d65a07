"""OpenAI's improved-diffusion / guided-diffusion models in: a `.pt` state dict and the flags
of its README (MODEL_FLAGS and DIFFUSION_FLAGS) -> a checkpoint of this project.

    python -m ddpm.convert import MODEL.pt OUT.ckpt --flags "$MODEL_FLAGS $DIFFUSION_FLAGS" \
        [--codebase auto | improved | guided]

The flags are read as the codebase's `scripts/image_sample.py` reads them (its argparse, its
`model_and_diffusion_defaults()`, the same str2bool); the two codebases' defaults differ
(improved-diffusion: rescale_timesteps and rescale_learned_sigmas True, channel_mult from
the image size 32 / 64 / 256; guided-diffusion: both False, --channel_mult, 64 / 128 / 256 /
512), so `--codebase auto` reads the flags both ways and takes the one that accepts them, or
either when both read them alike, and refuses (naming the setting) when they differ.

    flag                                   checkpoint
    --image_size --num_channels            net (ddpm.adm.ADM) image_size, model_channels
    --num_res_blocks --num_heads ...       net: the option of the same name
    --attention_resolutions "16,8"         net attention_resolutions [16, 8] (pixel sizes)
    --channel_mult "" (guided) / none      net channel_mult: create_model's table by image size
    --class_cond True                      net num_classes 1000, null_label false (no guidance)
    --learn_sigma True                     module.learn_sigma; sampler variance learned
    --sigma_small True (improved)          sampler variance small, nll_variance small
    --diffusion_steps T                    schedule T
    --noise_schedule linear                NoiseSchedule.linear(T, 1000/T · 1e-4, 1000/T · 0.02)
    --noise_schedule cosine                NoiseSchedule.cosine(T, s = 0.008, max_beta = 0.999)
    --predict_xstart True                  module.objective x0 (else eps)
    --rescale_timesteps True               net timestep_scale 1000 / T (t · 1000/T embedded)
    --rescale_learned_sigmas               module.vlb_weight: 0.001 (λ of L_hybrid) / 1/T
    --use_kl True                          module.loss vlb with learned σ (L_vlb alone, as
                                           trained: what a fine-tuning here trains); recorded
                                           only with fixed σ (module.loss=vlb needs learned σ)
    --use_checkpoint                       net use_checkpoint (memory only)
    --use_fp16                             recorded: weights are read as float32; sample.py's
                                           precision= chooses the inference precision
    --timestep_respacing, --use_ddim ...   refused: sampling options, given to sample.py instead

The state dict is read with torch.load(weights_only=True) and loaded strictly: the first key
that is missing, extra or of another shape is named with both shapes. No OpenAI code runs in a
conversion: the network is `ddpm.adm.ADM`, whose state dict has OpenAI's keys and shapes, and
the written checkpoint is read back with `load_module` and run against the network the weights
were loaded into. (tests/test_convert_openai.py checks the result against guided-diffusion's
own code: its argparse, its create_model_and_diffusion, its timestep-wrapped model.)
"""

from __future__ import annotations

import argparse
import pickle
import re
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from torch import Tensor, nn

from ddpm.convert import build
from ddpm.convert.unet2d import ConversionError
from ddpm.files import check_output_dir
from ddpm.module import load_module

CODEBASES = ("improved", "guided")
NAMES = {"improved": "improved-diffusion", "guided": "guided-diffusion"}
NUM_CLASSES = 1000  # script_util.NUM_CLASSES: the ImageNet classes of class_cond

# script_util.model_and_diffusion_defaults() of each codebase (their argparse's flags and types)
DEFAULTS: dict[str, dict[str, Any]] = {
    "improved": {
        "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
        "num_heads_upsample": -1, "attention_resolutions": "16,8", "dropout": 0.0,
        "learn_sigma": False, "sigma_small": False, "class_cond": False,
        "diffusion_steps": 1000, "noise_schedule": "linear", "timestep_respacing": "",
        "use_kl": False, "predict_xstart": False, "rescale_timesteps": True,
        "rescale_learned_sigmas": True, "use_checkpoint": False, "use_scale_shift_norm": True,
    },
    "guided": {
        "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4,
        "num_heads_upsample": -1, "num_head_channels": -1, "attention_resolutions": "16,8",
        "channel_mult": "", "dropout": 0.0, "class_cond": False, "use_checkpoint": False,
        "use_scale_shift_norm": True, "resblock_updown": False, "use_fp16": False,
        "use_new_attention_order": False,
        # diffusion_defaults()
        "learn_sigma": False, "diffusion_steps": 1000, "noise_schedule": "linear",
        "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
        "rescale_timesteps": False, "rescale_learned_sigmas": False,
    },
}  # fmt: skip
# create_model's channel_mult by image size (guided-diffusion: when --channel_mult is "")
CHANNEL_MULT: dict[str, dict[int, list[float]]] = {
    "improved": {256: [1, 1, 2, 2, 4, 4], 64: [1, 2, 3, 4], 32: [1, 2, 2, 2]},
    "guided": {
        512: [0.5, 1, 1, 2, 2, 4, 4],
        256: [1, 1, 2, 2, 4, 4],
        128: [1, 1, 2, 3, 4],
        64: [1, 2, 3, 4],
    },
}
# the setting of a Conversion -> the flag whose default differs between the codebases
FLAG_OF = {
    "net.timestep_scale": "--rescale_timesteps",
    "vlb_weight": "--rescale_learned_sigmas",
    "net.channel_mult": "--channel_mult",
}
# image_sample.py's own flags: how a sampling run chose, which is no part of the model
SAMPLING = {
    "use_ddim": "sampler=ddim",
    "clip_denoised": "sampler.clip_x0=true|false",
    "num_samples": "n=N",
    "batch_size": "batch_size=N",
    "model_path": "the .pt as SRC",
}


@dataclass
class Conversion:
    """What a checkpoint takes from the flags."""

    net: dict[str, Any]  # an ADM config (plain data)
    schedule: dict[str, Any]  # a NoiseSchedule config
    objective: str  # eps | x0
    variance: str  # the DDPM sampler's and the bound's: learned | large | small
    vlb_weight: float  # λ of L_hybrid as the codebase weighed L_vlb (learned σ only)


class _Parser(argparse.ArgumentParser):
    """argparse as the scripts build it, with its errors raised instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments"):
            message += (
                " (not a flag of the model: give the README's MODEL_FLAGS and DIFFUSION_FLAGS "
                "only, without TRAIN_FLAGS or SAMPLE_FLAGS)"
            )
        raise ConversionError(f"--flags: {message}")


def str2bool(value: str | bool) -> bool:
    """The scripts' str2bool: yes/true/t/y/1 and no/false/f/n/0, any case."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError("boolean value expected")


def parse_flags(text: str, codebase: str) -> dict[str, Any]:
    """The flag values `codebase`'s image_sample.py would run with: its defaults, then `text`
    (shell words) as its argparse reads them (types from the defaults, str2bool for bools,
    unique prefixes of a flag accepted as argparse accepts them)."""
    parser = _Parser(prog=NAMES[codebase], add_help=False)
    for key, default in DEFAULTS[codebase].items():
        kind = str2bool if isinstance(default, bool) else type(default)
        parser.add_argument(f"--{key}", default=default, type=kind)
    for key in SAMPLING:
        parser.add_argument(f"--{key}")
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ConversionError(f"--flags {text!r}: not shell words ({e})") from None
    values = vars(parser.parse_args(words))
    given = [key for key in SAMPLING if values.pop(key) is not None]
    if given:
        raise ConversionError(
            f"--flags: --{given[0]} is an option of image_sample.py, not of the model: drop it "
            f"(sample.py takes {SAMPLING[given[0]]})"
        )
    respacing = values["timestep_respacing"]
    if respacing:
        ddim = respacing.startswith("ddim")
        hint = f"sampler={'ddim' if ddim else 'ddpm'} steps={respacing.removeprefix('ddim')}"
        raise ConversionError(
            f"--flags: --timestep_respacing {respacing} chooses the sampling steps, not the "
            f"model: drop it and pass {hint} to sample.py (uniform steps over [0, T-1], which "
            "may differ by a step from space_timesteps' sections)"
        )
    return values


def _channel_mult(values: dict[str, Any], codebase: str) -> list[float]:
    text = values.get("channel_mult", "")
    if text:
        try:
            return [int(m) for m in text.split(",")]
        except ValueError:
            raise ConversionError(
                f"--flags: --channel_mult {text!r} is not integers separated by commas, "
                "e.g. 1,2,3,4"
            ) from None
    size, table = values["image_size"], CHANNEL_MULT[codebase]
    if size not in table:
        flag = " and no --channel_mult" if codebase == "guided" else ""
        raise ConversionError(
            f"--flags: --image_size {size}{flag}: {NAMES[codebase]}'s create_model has a "
            f"channel_mult for {sorted(table)} only (unsupported image size)"
        )
    return list(table[size])  # 512 px: [0.5, ...], int(0.5 · num_channels) wide, as ADM builds


def _attention(values: dict[str, Any]) -> list[int]:
    text = values["attention_resolutions"]
    try:
        return [int(r) for r in text.split(",")]
    except ValueError:
        raise ConversionError(
            f"--flags: --attention_resolutions {text!r} is not pixel sizes separated by "
            "commas, e.g. 16,8"
        ) from None


def _schedule(values: dict[str, Any]) -> dict[str, Any]:
    """gaussian_diffusion.get_named_beta_schedule(noise_schedule, T) as a NoiseSchedule."""
    T, name = values["diffusion_steps"], values["noise_schedule"]
    if T < 1:
        raise ConversionError(f"--flags: --diffusion_steps {T} must be >= 1")
    if name == "linear":
        # Ho et al.'s 1e-4 .. 0.02 at T = 1000, scaled by 1000/T to keep ᾱ_T near 0 for any T
        scale = 1000 / T
        if scale * 0.02 >= 1:
            raise ConversionError(
                f"--flags: --diffusion_steps {T} with --noise_schedule linear gives β_T = "
                f"{scale * 0.02:g} >= 1: no diffusion has it (T >= 21 does)"
            )
        target = "ddpm.schedule.NoiseSchedule.linear"
        return {"_target_": target, "timesteps": T, "beta_start": scale * 0.0001,
                "beta_end": scale * 0.02}  # fmt: skip
    if name == "cosine":  # Nichol & Dhariwal 2021, eq. 17, β clipped at 0.999
        target = "ddpm.schedule.NoiseSchedule.cosine"
        return {"_target_": target, "timesteps": T, "s": 0.008, "max_beta": 0.999}
    raise ConversionError(
        f"--flags: --noise_schedule {name!r}: the codebases know linear and cosine only"
    )


def convert_flags(values: dict[str, Any], codebase: str) -> Conversion:
    """The network, schedule and process of parsed flag `values` (`parse_flags`)."""
    T = values["diffusion_steps"]
    schedule = _schedule(values)
    net: dict[str, Any] = {
        "_target_": "ddpm.adm.ADM",
        "image_size": values["image_size"],
        "in_channels": 3,  # create_model's: RGB
        "model_channels": values["num_channels"],
        "num_res_blocks": values["num_res_blocks"],
        "attention_resolutions": _attention(values),
        "dropout": float(values["dropout"]),
        "channel_mult": _channel_mult(values, codebase),
        "num_classes": NUM_CLASSES if values["class_cond"] else None,
        # label_emb has exactly the 1000 rows: no null label (unconditional: model=adm's true)
        "null_label": not values["class_cond"],
        "num_heads": values["num_heads"],
        "num_head_channels": values.get("num_head_channels", -1),
        "num_heads_upsample": values["num_heads_upsample"],
        "use_scale_shift_norm": values["use_scale_shift_norm"],
        "resblock_updown": values.get("resblock_updown", False),
        "use_new_attention_order": values.get("use_new_attention_order", False),
        "use_checkpoint": values["use_checkpoint"],
        # _scale_timesteps: t · 1000/T before the embedding when rescale_timesteps
        "timestep_scale": 1000 / T if values["rescale_timesteps"] else 1.0,
    }
    learned = values["learn_sigma"]
    variance = "learned" if learned else ("small" if values.get("sigma_small") else "large")
    # L_hybrid = mse + vb (· T/1000 when rescale_learned_sigmas); here mse + λ · T · vb
    vlb_weight = (0.001 if values["rescale_learned_sigmas"] else 1 / T) if learned else 0.001
    objective = "x0" if values["predict_xstart"] else "eps"
    return Conversion(net, schedule, objective, variance, vlb_weight)


def read_flags(text: str, codebase: str = "auto") -> tuple[str, dict[str, Any], Conversion]:
    """(the codebase, the flag values, their Conversion). `codebase` auto: the codebase that
    reads the flags, or either when both read them to the same checkpoint; refused when both
    read them and the checkpoints would differ."""
    if codebase not in ("auto", *CODEBASES):
        raise ConversionError(f"--codebase must be auto, improved or guided, got {codebase!r}")
    if codebase != "auto":
        values = parse_flags(text, codebase)
        return codebase, values, convert_flags(values, codebase)
    read: dict[str, tuple[dict[str, Any], Conversion]] = {}
    errors: dict[str, str] = {}
    for name in CODEBASES:
        try:
            values = parse_flags(text, name)
            read[name] = values, convert_flags(values, name)
        except ConversionError as e:
            errors[name] = str(e)
    if not read:
        # a flag the other codebase lacks says which one was meant: its reason alone
        known = [n for n in CODEBASES if "unrecognized arguments" not in errors[n]]
        if len(known) == 1 or errors["improved"] == errors["guided"]:
            raise ConversionError(errors[(known or ["improved"])[0]])
        reasons = "; ".join(f"{NAMES[n]}: {errors[n].removeprefix('--flags: ')}" for n in known)
        raise ConversionError(f"--flags: {reasons}")
    if len(read) == 1:
        name = next(iter(read))
        return name, *read[name]
    (_, a), (_, b) = read["improved"], read["guided"]
    if asdict(a) == asdict(b):
        return "either", *read["improved"]
    key, x, y = _first_difference(asdict(a), asdict(b))
    flag = f"{FLAG_OF[key]}, " if key in FLAG_OF else ""
    raise ConversionError(
        f"--flags: improved-diffusion and guided-diffusion read them differently ({flag}{key} "
        f"{x} vs {y}: their defaults differ): give --codebase improved or --codebase guided "
        "(the repository whose README gives the flags), or the flag"
    )


def _first_difference(a: dict, b: dict, prefix: str = "") -> tuple[str, Any, Any]:
    for key in a:
        if isinstance(a[key], dict) and isinstance(b.get(key), dict) and a[key] != b[key]:
            return _first_difference(a[key], b[key], f"{prefix}{key}.")
        if a[key] != b.get(key):
            return f"{prefix}{key}", a[key], b.get(key)
    return prefix.rstrip("."), a, b


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """OpenAI's .pt: a plain {name: tensor} dict, read without running a pickle."""
    if not path.is_file():
        raise ConversionError(f"SRC={path} is not a file: give OpenAI's .pt state dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise ConversionError(
            f"{path}: holds objects other than tensors, which could run code when unpickled "
            f"({first[:120]}); OpenAI's .pt files are plain state dicts"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConversionError(f"{path}: not a file torch.load reads ({first[:120]})") from None
    if not isinstance(state, dict) or not state:
        raise ConversionError(
            f"{path}: holds a {type(state).__name__}, not a state dict (name -> tensor)"
        )
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise ConversionError(
                f"{path}: {key!r} holds a {type(value).__name__}, not a tensor: OpenAI's .pt "
                "files are plain state dicts (a checkpoint of another program is not one)"
            )
    return state


def _hint(key: str) -> str:
    if key.startswith("label_emb"):
        return "--class_cond True has a label_emb of 1000 rows, False none"
    if key.startswith("out.2"):
        return "--learn_sigma True gives 6 output channels, False 3"
    return (
        "check --num_channels, --channel_mult, --num_res_blocks, --attention_resolutions, "
        "--num_heads/--num_head_channels, --use_scale_shift_norm and --resblock_updown "
        "against the README's MODEL_FLAGS"
    )


def fit(net: nn.Module, state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """`state` for the network of the flags, float32: refused at the first key that is
    missing, extra or of another shape (both shapes named)."""
    ours = net.state_dict()
    for key, tensor in ours.items():
        if key not in state:
            shape = tuple(tensor.shape)
            raise ConversionError(
                f"{where}: has no {key} {shape}, which the flags' network has: {_hint(key)}"
            )
        if state[key].shape != tensor.shape:
            theirs, shape = tuple(state[key].shape), tuple(tensor.shape)
            raise ConversionError(
                f"{where}: {key} is {theirs} in the file, {shape} in the flags' network: "
                f"{_hint(key)}"
            )
    extra = [key for key in state if key not in ours]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(
            f"{where}: {extra[0]} {tuple(state[extra[0]].shape)}{more} is in the file but "
            f"not in the flags' network: {_hint(extra[0])}"
        )
    # fp16 files (use_fp16 runs that saved half weights) read exactly as float32
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _probe(module: Any) -> Tensor:
    """The EMA network's output on 2 fixed random images at t = 0 and T - 1 (labels 0, K-1)."""
    net, T = module.ema.module, module.schedule.num_timesteps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, net.in_channels, net.image_size, net.image_size, generator=g)
    t = torch.tensor([0, T - 1])
    classes = module.num_classes
    with torch.no_grad():
        if classes:
            return net(x, t, torch.tensor([0, classes - 1]))
        return net(x, t)


def import_openai(
    src: str | Path, out: str | Path, flags: str, codebase: str = "auto"
) -> dict[str, Any]:
    """Convert OpenAI's state dict `src` with its README's `flags` into the checkpoint `out`
    (which must not exist). Returns a summary (out, codebase, parameters, net, ...)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConversionError(f"OUT={out} exists: give a new path (nothing is overwritten)")
    check_output_dir(out.parent, "OUT", out, fix="NEW.ckpt")
    codebase, values, conversion = read_flags(flags, codebase)
    state = read_state_dict(src)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    hparams = build.hyper_parameters(
        conversion.net, conversion.schedule, conversion.objective, conversion.variance
    )
    hparams["vlb_weight"] = conversion.vlb_weight
    if values["use_kl"] and conversion.variance == "learned":
        hparams["loss"] = "vlb"  # RESCALED_KL: a fine-tuning trains the loss it was trained on
    try:
        module = build.build_module(hparams, lambda net: fit(net, state, str(src)))
    except InstantiationException as e:  # ADM's own check of the config, by name
        last = str(e).strip().splitlines()[-1].replace("model.model_channels", "--num_channels")
        last = re.sub(r"model\.(\w+)", r"--\1", last)  # ADM's keys are the flags' names
        raise ConversionError(f"--flags: the network they describe is refused: {last}") from None
    state.clear()  # the module holds the weights now: one copy in memory, not two
    want = _probe(module)
    classes = module.num_classes
    sampling = {
        "sampler": "ddpm",
        "steps": None,
        "variance": conversion.variance,
        "clip_x0": True,  # image_sample.py's --clip_denoised default
        "guidance": 0.0,
    }
    converted_from = {
        "format": "openai",
        "codebase": codebase,
        "source": str(src),
        "flags": flags,
        "values": values,
        "dtypes": dtypes,
    }
    names = [str(k) for k in range(classes or 0)]
    params = sum(p.numel() for p in module.ema.module.parameters())
    tmp = out.with_name(f".{out.name}.check")
    build.save(build.checkpoint(module, names, sampling, converted_from), tmp)
    del module  # before the file is read back: one copy of the model in memory at a time
    difference = _move_if_same(tmp, out, want)
    return {
        "out": str(out),
        "codebase": codebase,
        "parameters": params,
        "round_trip_difference": difference,
        "net": conversion.net,
        "hparams": {
            k: hparams.get(k)
            for k in ("objective", "learn_sigma", "loss", "vlb_weight", "cond_drop_prob")
        },
        "schedule": conversion.schedule,
    }


def _move_if_same(tmp: Path, out: Path, want: Tensor) -> float:
    """Read the written checkpoint `tmp` back as sample.py does (`load_module`: weights_only,
    trusted targets) and move it to `out` only if it draws `want`, what the converted network
    drew (`_probe`); else remove it. Returns the max difference (0)."""
    try:
        got = _probe(load_module(tmp))
        difference = float((got - want).abs().max())
        if not difference == 0.0:  # the same weights and code: the same floats (nan too)
            raise ConversionError(
                f"{out}: the written checkpoint's network differs from the converted one by "
                f"{difference:.2g}; nothing was written. Please report this model."
            )
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return difference
