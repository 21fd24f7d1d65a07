"""diffusers' `UNet2DModel` <-> `ddpm.unet.UNet`: configs and weights, both ways, by rule.

A UNet2DModel of DownBlock2D / AttnDownBlock2D blocks (the DDPM models of Ho et al. as diffusers
publishes them) is the same function as a UNet with the options below; anything else is refused
by name (`ConversionError`) before a weight is read.

    UNet2DModel                                   ddpm.unet.UNet
    sample_size, in_channels                      image_size, in_channels
    block_out_channels [c0, c1, ...]              ch = c0, ch_mult = [c_k / c0]
    layers_per_block                              num_res_blocks
    AttnDownBlock2D k / AttnUpBlock2D n-1-k       attn_resolutions [image_size / 2^k]
    attention_head_dim (null: one head)           head_dim (null: num_heads = 1)
    norm_num_groups, norm_eps                     norm_groups, norm_eps
    downsample_padding, flip_sin_to_cos, freq_shift   the options of the same names
    num_class_embeds                              num_classes (+ 1 row when null_label)
    out_channels = 2 in_channels                  learned variances (module.learn_sigma)

Weights (module paths; `down.i` counts the UNet's flat list of levels and downsamplers):

    time_embedding.linear_1 / linear_2            time_embed.0 / time_embed.2
    class_embedding, conv_in, conv_out            class_embed, conv_in, conv_out
    {down,up}_blocks.k.resnets.j                  down.i.res / up.i.res (emb_proj: time_emb_proj,
                                                  skip: conv_shortcut)
    {down,up}_blocks.k.attentions.j               down.i.attn: norm = group_norm, qkv = [to_q;
                                                  to_k; to_v] as 1x1 convs, proj = to_out.0
    down_blocks.k.downsamplers.0.conv             down.i.conv (up: upsamplers, up.i.conv)
    mid_block.resnets.0 / attentions.0 / resnets.1    mid.0.res / mid.0.attn / mid.1.res
    conv_norm_out                                 norm_out
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from ddpm.unet import AttnBlock, Downsample, UNet, Upsample, _Level, attention_sizes

DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}  # block type -> attends
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}

# UNet2DModel settings the UNet has no option for: the one value it maps exactly, and why
FIXED: dict[str, tuple[Any, str]] = {
    "center_input_sample": (False, "the UNet takes x in [-1, 1] as it is"),
    "time_embedding_type": ("positional", "the UNet embeds t with sinusoids"),
    "mid_block_type": ("UNetMidBlock2D", "the UNet's middle is ResBlock, attention, ResBlock"),
    "mid_block_scale_factor": (1, "the UNet's middle block does not rescale"),
    "downsample_type": ("conv", "the UNet downsamples with a stride-2 conv"),
    "upsample_type": ("conv", "the UNet upsamples by nearest neighbour and a conv"),
    "act_fn": ("silu", "the UNet's activation is SiLU"),
    "resnet_time_scale_shift": ("default", "the UNet adds the time embedding (no AdaGN)"),
    "add_attention": (True, "the UNet's middle block attends"),
    "class_embed_type": (None, "the UNet embeds labels with a table (num_class_embeds)"),
}


class ConversionError(ValueError):
    """A setting, file or weight that cannot be mapped exactly, named with its value and fix."""


def _refuse(where: str, key: str, value: Any, why: str) -> ConversionError:
    return ConversionError(f"{where}: {key}={value!r} cannot be converted exactly: {why}")


def effective_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The settings diffusers builds a UNet2DModel from: its defaults, then the file's (an old
    config.json lacks keys; diffusers fills them in, e.g. attention_head_dim 8)."""
    params = inspect.signature(UNet2DModel.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    return defaults | {k: v for k, v in raw.items() if k in defaults}


def _attention_levels(config: dict[str, Any], where: str) -> list[int]:
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    for key, types, known in (
        ("down_block_types", down, DOWN_BLOCKS),
        ("up_block_types", up, UP_BLOCKS),
    ):
        other = [t for t in types if t not in known]
        if other:
            why = f"block type {other[0]} is not one of {sorted(known)}"
            raise _refuse(where, key, types, why)
    levels = [k for k, t in enumerate(down) if DOWN_BLOCKS[t]]
    up_levels = sorted(len(up) - 1 - j for j, t in enumerate(up) if UP_BLOCKS[t])
    if levels != up_levels:
        why = (
            f"it attends at down levels {levels} but up levels {up_levels}; the UNet attends "
            "at the same levels both ways"
        )
        raise _refuse(where, "up_block_types", up, why)
    return levels


def _image_size(config: dict[str, Any], where: str) -> int:
    size = config["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(where, "sample_size", size, "the UNet takes square images")
        size = size[0]
    if not isinstance(size, int) or size < 1:
        raise _refuse(where, "sample_size", size, "the UNet needs the image size")
    return size


def net_config(
    config: dict[str, Any], where: str, learn_sigma: bool, null_label: bool
) -> dict[str, Any]:
    """A UNet config (`_target_` ddpm.unet.UNet, plain data) for the UNet2DModel `config`
    (effective, `effective_config`); `learn_sigma`: the output holds the variance too."""
    for key, (value, why) in FIXED.items():
        if config[key] != value:
            raise _refuse(where, key, config[key], f"{why} (only {value!r} maps)")
    widths = list(config["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths):
        why = f"the UNet's level widths are multiples of the first ({ch})"
        raise _refuse(where, "block_out_channels", widths, why)
    if config["time_embedding_dim"] not in (None, 4 * ch):
        why = f"the UNet's time embedding is 4 x block_out_channels[0] = {4 * ch} wide"
        raise _refuse(where, "time_embedding_dim", config["time_embedding_dim"], why)
    groups, attn_groups = config["norm_num_groups"], config["attn_norm_num_groups"]
    if attn_groups not in (None, groups):
        why = f"the UNet's attention norms have norm_num_groups={groups} groups"
        raise _refuse(where, "attn_norm_num_groups", attn_groups, why)
    channels = config["in_channels"]
    out = config["out_channels"]
    if out != (2 * channels if learn_sigma else channels):
        if learn_sigma:
            why = (
                f"the scheduler's variance_type learned_range needs {2 * channels} output "
                f"channels (in_channels={channels}: the prediction, then the variance)"
            )
        else:
            why = (
                f"in_channels={channels}: {channels} output channels map, or {2 * channels} "
                "with the scheduler's variance_type learned_range"
            )
        raise _refuse(where, "out_channels", out, why)
    size = _image_size(config, where)
    levels = _attention_levels(config, where)
    head_dim = config["attention_head_dim"]
    net = {
        "_target_": "ddpm.unet.UNet",
        "image_size": size,
        "in_channels": channels,
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "num_res_blocks": config["layers_per_block"],
        "attn_resolutions": [size // 2**k for k in levels],
        "dropout": float(config["dropout"]),
        "num_heads": 1,
        "num_classes": None,
    }
    classes = config["num_class_embeds"]
    if classes is not None:
        if null_label and classes < 2:
            why = "a null label (its last row) leaves no class: import with --null-label none"
            raise _refuse(where, "num_class_embeds", classes, why)
        net["num_classes"] = classes - 1 if null_label else classes
        if not null_label:
            net["null_label"] = False
    # the options whose defaults are the UNet as it always was: written only where they differ
    options = {
        "downsample_padding": config["downsample_padding"],
        "flip_sin_to_cos": bool(config["flip_sin_to_cos"]),
        "freq_shift": config["freq_shift"],
        "norm_eps": float(config["norm_eps"]),
        "head_dim": head_dim,
    }
    defaults = inspect.signature(UNet).parameters
    net |= {k: v for k, v in options.items() if v != defaults[k].default}
    every = {ch} | set(widths)
    if any(math.gcd(32, w) != groups for w in every):  # gcd(32, C) is not this everywhere
        net["norm_groups"] = groups
    return net


def diffusers_config(net: UNet, config: dict[str, Any], where: str) -> dict[str, Any]:
    """The UNet2DModel settings of the built UNet `net` (its config `config`, plain data)."""
    params = inspect.signature(UNet).parameters
    config = {k: p.default for k, p in params.items()} | dict(config)
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    eps = {m.eps for m in net.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) > 1:
        why = (
            f"its GroupNorms have {sorted(groups)} groups (gcd(32, C) per width), diffusers' one "
            f"norm_num_groups for all: train with model.norm_groups={min(groups)}"
        )
        raise _refuse(where, "model.norm_groups", config.get("norm_groups"), why)
    ch_mult = list(config["ch_mult"])
    if ch_mult[0] != 1:
        why = (
            "diffusers' first level is as wide as its stem (block_out_channels[0]), the UNet's "
            "is ch * ch_mult[0]: only ch_mult[0] = 1 maps"
        )
        raise _refuse(where, "model.ch_mult", ch_mult, why)
    size = net.image_size
    n = len(ch_mult)
    sizes = attention_sizes(size, ch_mult, config["attn_resolutions"], config["attn_levels"])
    attends = [size // 2**k in sizes for k in range(n)]
    shapes = {(m.qkv.in_channels, m.num_heads) for m in net.modules() if isinstance(m, AttnBlock)}
    if all(heads == 1 for _, heads in shapes):
        head_dim = None
    else:
        dims = {width // heads for width, heads in shapes}
        if len(dims) > 1:
            why = (
                f"its attention heads are {sorted(dims)} channels wide, diffusers' one "
                "attention_head_dim for all blocks: train with model.head_dim=D"
            )
            raise _refuse(where, "model.num_heads", config.get("num_heads"), why)
        head_dim = dims.pop()
    classes = net.num_classes
    return {
        "sample_size": size,
        "in_channels": net.in_channels,
        "out_channels": net.conv_out.out_channels,
        "block_out_channels": [net.ch * m for m in ch_mult],
        "layers_per_block": config["num_res_blocks"],
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        "downsample_padding": config["downsample_padding"],
        "flip_sin_to_cos": net.flip_sin_to_cos,
        "freq_shift": net.freq_shift,
        "norm_num_groups": groups.pop(),
        "norm_eps": eps.pop(),
        "attention_head_dim": head_dim,
        "dropout": float(config["dropout"]),
        "num_class_embeds": classes + net.null_label if classes else None,
        **{key: value for key, (value, _) in FIXED.items()},
    }


def layer_pairs(net: UNet) -> list[tuple[str, str, str]]:
    """(our module path, diffusers' module path, kind) of every layer with weights: kind
    "same" (the tensors as they are), "linear" (a 1x1 conv of ours, a Linear of theirs) or
    "qkv" (our one qkv conv, their to_q, to_k, to_v)."""
    pairs = [
        ("time_embed.0", "time_embedding.linear_1", "same"),
        ("time_embed.2", "time_embedding.linear_2", "same"),
        ("conv_in", "conv_in", "same"),
        ("norm_out", "conv_norm_out", "same"),
        ("conv_out", "conv_out", "same"),
    ]
    if net.class_embed is not None:
        pairs.append(("class_embed", "class_embedding", "same"))
    for ours, blocks, resample in (
        ("down", "down_blocks", Downsample),
        ("up", "up_blocks", Upsample),
    ):
        k = j = 0
        for i, block in enumerate(getattr(net, ours)):
            if isinstance(block, resample):
                name = "downsamplers" if resample is Downsample else "upsamplers"
                pairs.append((f"{ours}.{i}.conv", f"{blocks}.{k}.{name}.0.conv", "same"))
                k, j = k + 1, 0
                continue
            pairs += _level_pairs(block, f"{ours}.{i}", f"{blocks}.{k}", j)
            j += 1
    pairs += _level_pairs(net.mid[0], "mid.0", "mid_block", 0)
    pairs += _level_pairs(net.mid[1], "mid.1", "mid_block", 1, attn_j=0)
    return pairs


def _level_pairs(
    level: _Level, ours: str, theirs: str, j: int, attn_j: int | None = None
) -> list[tuple[str, str, str]]:
    """The ResBlock (resnets.j) and attention (attentions.attn_j, by default j) of one entry
    of a path or the middle block."""
    res = f"{theirs}.resnets.{j}"
    names = ("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj")
    names += ("norm2", "norm2"), ("conv2", "conv2")
    if isinstance(level.res.skip, nn.Conv2d):
        names += (("skip", "conv_shortcut"),)
    pairs = [(f"{ours}.res.{a}", f"{res}.{b}", "same") for a, b in names]
    if isinstance(level.attn, AttnBlock):
        attn = f"{theirs}.attentions.{j if attn_j is None else attn_j}"
        pairs += [
            (f"{ours}.attn.norm", f"{attn}.group_norm", "same"),
            (f"{ours}.attn.qkv", attn, "qkv"),
            (f"{ours}.attn.proj", f"{attn}.to_out.0", "linear"),
        ]
    return pairs


def _as_conv(w: Tensor) -> Tensor:
    return w.reshape(*w.shape, 1, 1) if w.ndim == 2 else w


def from_diffusers(net: UNet, state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """A UNet2DModel state dict -> the state dict of `net`; every tensor used exactly once."""
    out, used = {}, set()
    for ours, theirs, kind in layer_pairs(net):
        for p in ("weight", "bias"):
            if kind == "qkv":
                keys = [f"{theirs}.to_{x}.{p}" for x in "qkv"]
                value = (
                    torch.cat([state[k] for k in keys if k in state]) if keys[0] in state else None
                )
            else:
                keys = [f"{theirs}.{p}"]
                value = state.get(keys[0])
            if value is None:
                continue
            out[f"{ours}.{p}"] = _as_conv(value) if kind != "same" and p == "weight" else value
            used.update(keys)
    left = sorted(set(state) - used)
    if left:
        raise ConversionError(
            f"{where}: weights {left[:3]} ({len(left)} in all) have no place in ddpm.unet.UNet; "
            "the file's layers are not those its config describes"
        )
    return out


def to_diffusers(net: UNet, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of `net` -> that of the UNet2DModel of `diffusers_config`."""
    out = {}
    for ours, theirs, kind in layer_pairs(net):
        for p in ("weight", "bias"):
            key = f"{ours}.{p}"
            if key not in state:
                continue
            value = state[key]
            if kind == "qkv":
                for x, part in zip("qkv", value.chunk(3), strict=True):
                    out[f"{theirs}.to_{x}.{p}"] = part.flatten(1) if p == "weight" else part
            elif kind == "linear" and p == "weight":
                out[f"{theirs}.{p}"] = value.flatten(1)
            else:
                out[f"{theirs}.{p}"] = value
    return out
