"""diffusers' UNet2DModel as an independent implementation of ddpm.adm.ADM, for the tests.

`diffusers_twin(config)` builds the UNet2DModel that computes the same function as
`ADM(**config)` (scale-shift resnets, resnet up/down blocks, one head width, labels) and
`adm_weights(twin, config)` maps its (random) weights into ADM's state dict by rule:

    UNet2DModel                                     ADM (OpenAI's UNetModel keys)
    time_embedding.linear_1 / linear_2              time_embed.0 / time_embed.2
    class_embedding, conv_in                        label_emb, input_blocks.0.0
    down_blocks.k.resnets.j / attentions.j          input_blocks.i.0 / input_blocks.i.1
    down_blocks.k.downsamplers.0(.conv)             input_blocks.i.0(.op)   (resnet / conv)
    mid_block.resnets.0 / attentions.0 / resnets.1  middle_block.0 / .1 / .2
    up_blocks.u.resnets.j / attentions.j            output_blocks.i.0 / .1  (u = levels-1-k)
    up_blocks.u.upsamplers.0(.conv)                 output_blocks.i.{1|2}(.conv)
    conv_norm_out / conv_out                        out.0 / out.2
  resnets: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
        -> in_layers.0, in_layers.2, emb_layers.1, out_layers.0, out_layers.3, skip_connection
  attentions: group_norm -> norm; to_out.0 -> proj_out (a 1x1 Conv1d); to_q, to_k, to_v ->
        qkv, rows (q|k|v, head, ch) in the new order, (head, q|k|v, ch) in the legacy one.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel
from torch import Tensor

from ddpm.adm import AttentionBlock, ResBlock

RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def _levels(config: dict[str, Any]) -> tuple[list[int], list[bool]]:
    mult, size = config["channel_mult"], config["image_size"]
    widths = [config["model_channels"] * m for m in mult]
    return widths, [size // 2**k in config["attention_resolutions"] for k in range(len(mult))]


def diffusers_twin(config: dict[str, Any]) -> UNet2DModel:
    """The UNet2DModel of the same function as ADM(**config) (random weights)."""
    widths, attends = _levels(config)
    updown = config.get("resblock_updown", False)
    head_dim = config.get("num_head_channels", -1)
    if head_dim == -1:  # diffusers has one head width: num_heads must give the same everywhere
        dims = {w // config.get("num_heads", 1) for w, a in zip(widths, attends, strict=True) if a}
        dims |= {widths[-1] // config.get("num_heads", 1)}
        assert len(dims) == 1, f"no UNet2DModel has these heads: head widths {dims}"
        head_dim = dims.pop()
    plain = (
        ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
        if updown
        else ("DownBlock2D", "UpBlock2D")
    )
    classes = config.get("num_classes")
    return UNet2DModel(
        sample_size=config["image_size"],
        in_channels=config["in_channels"],
        out_channels=config.get("out_channels") or config["in_channels"],
        flip_sin_to_cos=True,  # OpenAI's [cos, sin]
        freq_shift=0,
        down_block_types=["AttnDownBlock2D" if a else plain[0] for a in attends],
        up_block_types=["AttnUpBlock2D" if a else plain[1] for a in reversed(attends)],
        block_out_channels=widths,
        layers_per_block=config["num_res_blocks"],
        downsample_type="resnet" if updown else "conv",
        upsample_type="resnet" if updown else "conv",
        dropout=config.get("dropout", 0.0),
        attention_head_dim=head_dim,
        norm_num_groups=32,
        attn_norm_num_groups=32,  # else the middle block's attention has no norm (scale_shift)
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if config.get("use_scale_shift_norm") else "default",
        num_class_embeds=classes + config.get("null_label", True) if classes else None,
    )


def _pairs(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(ADM module path, UNet2DModel module path) of every block with weights."""
    widths, attends = _levels(config)
    blocks, updown = config["num_res_blocks"], config.get("resblock_updown", False)
    pairs = [
        ("time_embed.0", "time_embedding.linear_1"),
        ("time_embed.2", "time_embedding.linear_2"),
        ("input_blocks.0.0", "conv_in"),
        ("middle_block.0", "mid_block.resnets.0"),
        ("middle_block.1", "mid_block.attentions.0"),
        ("middle_block.2", "mid_block.resnets.1"),
        ("out.0", "conv_norm_out"),
        ("out.2", "conv_out"),
    ]
    if config.get("num_classes"):
        pairs.append(("label_emb", "class_embedding"))
    resample = ("", "") if updown else (".op", ".conv")
    i = 1
    for k in range(len(widths)):
        for j in range(blocks):
            pairs.append((f"input_blocks.{i}.0", f"down_blocks.{k}.resnets.{j}"))
            if attends[k]:
                pairs.append((f"input_blocks.{i}.1", f"down_blocks.{k}.attentions.{j}"))
            i += 1
        if k != len(widths) - 1:
            pairs.append(
                (f"input_blocks.{i}.0{resample[0]}", f"down_blocks.{k}.downsamplers.0{resample[1]}")
            )
            i += 1
    i = 0
    for u, k in enumerate(reversed(range(len(widths)))):
        for j in range(blocks + 1):
            pairs.append((f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}"))
            if attends[k]:
                pairs.append((f"output_blocks.{i}.1", f"up_blocks.{u}.attentions.{j}"))
            if k and j == blocks:
                n = 1 + attends[k]
                up = "" if updown else ".conv"
                pairs.append((f"output_blocks.{i}.{n}{up}", f"up_blocks.{u}.upsamplers.0{up}"))
            i += 1
    return pairs


def _qkv(twin: UNet2DModel, path: str, name: str, new_order: bool) -> Tensor:
    """to_q, to_k, to_v's `name` (weight or bias) as ADM's qkv rows (a (3C, C, 1) conv)."""
    attn = twin.get_submodule(path)
    q, k, v = (getattr(attn, f"to_{x}").get_parameter(name).detach() for x in "qkv")
    if new_order:  # rows (q|k|v, head, ch)
        rows = torch.cat([q, k, v])
    else:  # rows (head, q|k|v, ch)
        heads = attn.heads
        rows = torch.stack([x.reshape(heads, -1, *x.shape[1:]) for x in (q, k, v)], dim=1)
        rows = rows.reshape(-1, *q.shape[1:])
    return rows[..., None] if name == "weight" else rows


def adm_weights(
    twin: UNet2DModel, adm: torch.nn.Module, config: dict[str, Any]
) -> dict[str, Tensor]:
    """ADM's state dict with `twin`'s weights; asserts that every weight of `twin` is used."""
    source = twin.state_dict()
    used: set[str] = set()
    out: dict[str, Tensor] = {}

    def take(ours: str, theirs: str, transform=lambda w: w) -> None:
        for name in ("weight", "bias"):
            if f"{theirs}.{name}" in source:
                out[f"{ours}.{name}"] = transform(source[f"{theirs}.{name}"])
                used.add(f"{theirs}.{name}")

    new_order = config.get("use_new_attention_order", False)
    for ours, theirs in _pairs(config):
        block = adm.get_submodule(ours)
        if isinstance(block, ResBlock):
            for a, d in RES.items():
                take(f"{ours}.{a}", f"{theirs}.{d}")
        elif isinstance(block, AttentionBlock):
            take(f"{ours}.norm", f"{theirs}.group_norm")
            take(
                f"{ours}.proj_out",
                f"{theirs}.to_out.0",
                lambda w: w[..., None] if w.ndim == 2 else w,
            )
            for name in ("weight", "bias"):
                out[f"{ours}.qkv.{name}"] = _qkv(twin, theirs, name, new_order)
                used |= {f"{theirs}.to_{x}.{name}" for x in "qkv"}
        else:
            take(ours, theirs)
    assert used == set(source), sorted(set(source) - used)[:10]
    return out
