"""ADM: the UNet of improved-diffusion and guided-diffusion, as a network of this project.

Nichol & Dhariwal 2021 (iDDPM, arXiv 2102.09672) and Dhariwal & Nichol 2021 (ADM, arXiv
2105.05233, Sec. 3: heads, BigGAN residual up/down, adaptive group normalization), written from
the papers and by reading OpenAI's public unet.py / nn.py; tests/test_adm.py checks it against
diffusers' UNet2DModel. It knows nothing about diffusion: net(x, t, y) -> (B, out_channels, H, W).
Its module tree is OpenAI's `UNetModel`'s, so their state dicts (time_embed.0/.2, label_emb,
input_blocks.N.M.{in_layers, emb_layers, out_layers, skip_connection, norm, qkv, proj_out, op},
middle_block.*, output_blocks.*, out.0/.2) load with strict=True when the config matches.

Notation (per file, as in the papers):
    x       (B, C, H, W) input; t (B,) int64 timesteps; y (B,) int64 class labels
    c       model_channels; level k has c · channel_mult[k] channels at image_size / 2^k px
    e       (B, 4c) embedding: MLP(sinusoids(s · t)) + E[y], s = timestep_scale
    AdaGN   AdaGN(h, e) = (1 + w_s(e)) · GroupNorm(h) + w_b(e)    (ADM Sec. 3, use_scale_shift_norm)
    qkv     the 1x1 projection to queries, keys and values, (B, 3C, HW); legacy order: channels
            grouped (head, q|k|v, ch), new order (q|k|v, head, ch): same tensor, other rows
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

GROUPS = 32  # OpenAI's normalization(): GroupNorm with 32 groups, eps 1e-5


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """OpenAI's sinusoids: (B,) float timesteps -> (B, dim) [cos(t ω_k), sin(t ω_k)] with
    ω_k = max_period^(-k / (dim/2)), k < dim/2 (cos first, no frequency shift; diffusers'
    flip_sin_to_cos=True, downscale_freq_shift=0); a zero column when dim is odd."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm in float32 whatever the activations' dtype (OpenAI's GroupNorm32): a group's
    mean and variance under bf16/fp16 autocast would lose their digits. Returns x's dtype."""

    def __init__(self, channels: int) -> None:
        super().__init__(GROUPS, channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.weight.float(), self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _zero(module: nn.Module) -> nn.Module:
    """OpenAI's zero_module: the last conv of each residual branch (and the output) starts
    at zero, so that every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


_halve = partial(F.avg_pool2d, kernel_size=2, stride=2)  # BigGAN's down: 2x2 average pool
_double = partial(F.interpolate, scale_factor=2.0, mode="nearest")


class _Checkpointed(nn.Module):
    """A block whose forward is recomputed in the backward pass when `use_checkpoint` is set
    (activation checkpointing, torch.utils.checkpoint): only while training with grad, so
    evaluation and sampling run plainly. Dropout masks are replayed (torch keeps the RNG)."""

    use_checkpoint: bool = False

    def _forward(self, *args: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, *args: Tensor) -> Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)


class ResBlock(_Checkpointed):
    """GroupNorm -> SiLU -> (up/down) -> conv; then the embedding, added (DDPM) or as AdaGN's
    scale and shift; GroupNorm -> SiLU -> dropout -> conv (zero-initialised); plus the skip,
    a 1x1 conv when the width changes. `up` / `down`: BigGAN's residual resampling (nearest
    neighbour / 2x2 average pool on both branches, ADM Sec. 3). x (B, C, H, W), emb (B, E)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        out = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.resample = _double if up else _halve if down else None
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out)
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out, out, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def _forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.resample is not None:  # resample after the activation, before the conv
            h = self.resample(self.in_layers[:-1](x))
            x = self.resample(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:  # AdaGN: (1 + scale) · GroupNorm(h) + shift
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(_Checkpointed):
    """Self-attention over the H·W positions with `num_heads` heads, softmax(q kᵀ / √d) v
    by F.scaled_dot_product_attention. `new_order`: qkv's rows are (q|k|v, head, ch)
    (guided-diffusion's QKVAttention), else (head, q|k|v, ch) (QKVAttentionLegacy, and
    improved-diffusion's only order). x (B, C, H, W) -> the same shape."""

    def __init__(
        self, channels: int, num_heads: int, new_order: bool = False, use_checkpoint: bool = False
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.new_order = new_order
        self.use_checkpoint = use_checkpoint
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)  # Conv1d: OpenAI's tensor shapes
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def _forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T), T = HW
        nh, hs = self.num_heads, C // self.num_heads
        if self.new_order:
            q, k, v = qkv.reshape(B, 3, nh, hs, H * W).unbind(1)  # each (B, nh, hs, T)
        else:
            q, k, v = qkv.reshape(B, nh, 3 * hs, H * W).split(hs, dim=2)
        h = F.scaled_dot_product_attention(  # (B, nh, T, hs)
            q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)
        )
        h = h.transpose(-1, -2).reshape(B, C, H * W)  # channel = head · hs + j, as OpenAI's
        return (x + self.proj_out(h)).reshape(B, C, H, W)


class Downsample(nn.Module):
    """A stride-2 3x3 conv (OpenAI's conv_resample=True); `op` as in their state dicts."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(_double(x))


class TimestepEmbedSequential(nn.Sequential):
    """Layers in a row; the ResBlocks among them also get the embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def widths(model_channels: int, channel_mult: Sequence[float]) -> list[int]:
    """Each level's channels: int(mult · c), as OpenAI's code (fractions allowed)."""
    return [int(m * model_channels) for m in channel_mult]


def _check_heads(
    widths: Sequence[int], up_widths: Sequence[int], num_heads: Any, head_channels: Any,
    heads_up: Any,
) -> None:  # fmt: skip
    """Heads that do not divide a width would fail in a reshape deep inside."""
    if not _is_int(num_heads, 1):
        raise ValueError(f"model.num_heads must be an integer >= 1, got {num_heads!r}")
    if head_channels != -1:
        if not _is_int(head_channels, 1):
            raise ValueError(
                "model.num_head_channels must be -1 (model.num_heads heads) or an integer >= 1 "
                f"(channels per head), got {head_channels!r}"
            )
        uneven = sorted({w for w in widths if w % head_channels})
        if uneven:
            raise ValueError(
                f"model.num_head_channels={head_channels} does not divide the attention "
                f"widths {uneven}; use a divisor of them, or -1 (model.num_heads heads)"
            )
        return
    if heads_up != -1 and not _is_int(heads_up, 1):
        raise ValueError(
            f"model.num_heads_upsample must be -1 (model.num_heads) or an integer >= 1, got "
            f"{heads_up!r}"
        )
    for key, heads, used in (
        ("num_heads", num_heads, widths),
        ("num_heads_upsample", heads_up, up_widths),
    ):
        uneven = sorted({w for w in used if heads != -1 and w % heads})
        if uneven:
            raise ValueError(
                f"model.{key}={heads} does not divide the attention widths {uneven}; use a "
                "divisor of them (or model.num_head_channels)"
            )


def check_config(
    image_size: Any,
    in_channels: Any,
    model_channels: Any,
    num_res_blocks: Any,
    attention_resolutions: Any,
    dropout: Any = 0.0,
    channel_mult: Any = (1, 2, 4, 8),
    num_classes: Any = None,
    num_heads: Any = 1,
    num_head_channels: Any = -1,
    num_heads_upsample: Any = -1,
    timestep_scale: Any = 1.0,
    out_channels: Any = None,
    **_: Any,
) -> None:
    """ADM's values, one line naming the model.<key> and the fix each, before anything is
    built (the constructor calls it; train.py calls it on the composed model config)."""
    mult = channel_mult
    if not isinstance(mult, Sequence) or not mult or not all(_positive(m) for m in mult):
        raise ValueError(
            f"model.channel_mult must be a non-empty list of numbers > 0 (e.g. [1, 2, 2, 2]; "
            f"guided-diffusion's 512 px model starts at 0.5), got {mult!r}"
        )
    factor = 2 ** (len(mult) - 1)
    if not _is_int(image_size, 1) or image_size % factor:
        fits = [m for k, m in enumerate(mult) if _is_int(image_size, 1) and image_size % 2**k == 0]
        raise ValueError(
            f"model.image_size={image_size!r} is not divisible by {factor}, the network's "
            f"downsampling factor for channel_mult={list(mult)}; use fewer levels (e.g. "
            f"model.channel_mult={fits}) or another dataset.image_size"
        )
    if not _is_int(model_channels, 1) or any(
        w < 1 or w % GROUPS for w in widths(model_channels, mult)
    ):
        raise ValueError(
            f"model.model_channels={model_channels!r} times channel_mult {list(mult)} "
            f"must be multiples of {GROUPS} (GroupNorm's {GROUPS} groups); e.g. 32, 64, 128"
        )
    for key, value, optional in (
        ("in_channels", in_channels, False),
        ("num_res_blocks", num_res_blocks, False),
        ("out_channels", out_channels, True),
        ("num_classes", num_classes, True),
    ):
        if not (_is_int(value, 1) or (optional and value is None)):
            null = "null or " if optional else ""
            raise ValueError(f"model.{key} must be {null}an integer >= 1, got {value!r}")
    if not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(timestep_scale, int | float) or not 0 < timestep_scale < math.inf:
        raise ValueError(
            f"model.timestep_scale must be a number > 0 (1000 / T for improved-diffusion's "
            f"rescale_timesteps), got {timestep_scale!r}"
        )
    levels = [image_size // 2**k for k in range(len(channel_mult))]
    if not isinstance(attention_resolutions, Sequence) or any(
        r not in levels for r in attention_resolutions
    ):
        raise ValueError(
            f"model.attention_resolutions={attention_resolutions!r} must list feature-map "
            f"sizes of the network's levels ({', '.join(map(str, levels))} px), e.g. [16, 8]"
        )
    level_widths = widths(model_channels, mult)
    attended = [w for w, r in zip(level_widths, levels, strict=True) if r in attention_resolutions]
    used = [*attended, level_widths[-1]]  # the middle block always attends
    _check_heads(used, attended, num_heads, num_head_channels, num_heads_upsample)


class ADM(nn.Module):
    """`ADM(x, t, y=None) -> (B, out_channels, H, W)`, OpenAI's UNetModel (2-D, conv_resample).

    Args (OpenAI's names):
        image_size: height = width of the inputs, divisible by 2^(len(channel_mult) - 1).
        in_channels: input channels; out_channels: None -> in_channels (2 · in_channels for
            learned σ: the DiffusionModule passes it with module.learn_sigma).
        model_channels: c, the base width; level k has int(c · channel_mult[k]) channels.
        num_res_blocks: ResBlocks per level down (one more up).
        attention_resolutions: feature-map sizes in PIXELS that get attention (e.g. [16, 8]);
            OpenAI's flag "16,8" is the same list (their code turns it into image_size // r).
        dropout: in the ResBlocks' second half.
        num_classes: K: a label embedding is added to the time embedding; with null_label it
            has K + 1 rows, row K the null label of classifier-free guidance (False: exactly
            K rows, as OpenAI's checkpoints: labels are then required).
        num_heads / num_head_channels (-1: use num_heads) / num_heads_upsample (-1: num_heads):
            attention heads, or channels per head, and the up path's heads.
        use_scale_shift_norm: AdaGN instead of adding the embedding (ADM Sec. 3).
        resblock_updown: BigGAN residual blocks for down/upsampling instead of conv/resize.
        use_new_attention_order: qkv's rows (q|k|v, head, ch) instead of (head, q|k|v, ch).
        use_checkpoint: activation checkpointing of every block while training.
        timestep_scale: t is multiplied by it before the sinusoids (improved-diffusion's
            rescale_timesteps=True: 1000 / T).

    Shapes: x (B, in_channels, H, W) float, t (B,) int64, y (B,) int64 or None.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int | None = None,
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16, 8),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        num_classes: int | None = None,
        null_label: bool = True,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_checkpoint: bool = False,
        timestep_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_config(
            image_size, in_channels, model_channels, num_res_blocks, attention_resolutions,
            dropout, channel_mult, num_classes, num_heads, num_head_channels,
            num_heads_upsample, timestep_scale, out_channels,
        )  # fmt: skip
        self.image_size, self.in_channels = image_size, in_channels
        self.out_channels = out_channels or in_channels
        self.model_channels = model_channels
        self.num_classes, self.null_label = num_classes, bool(null_label)
        self.timestep_scale = float(timestep_scale)
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb)
        )
        if num_classes:
            self.label_emb = nn.Embedding(num_classes + self.null_label, emb)
        make = _Maker(
            emb, dropout, use_scale_shift_norm, use_checkpoint, use_new_attention_order,
            num_head_channels, resblock_updown,
        )  # fmt: skip
        level_widths = widths(model_channels, channel_mult)
        sizes = [image_size // 2**k for k in range(len(channel_mult))]
        attends = [r in attention_resolutions for r in sizes]
        skips = self._down(make, in_channels, level_widths, attends, num_res_blocks, num_heads)
        ch = level_widths[-1]
        self.middle_block = TimestepEmbedSequential(
            make.res(ch, ch), make.attn(ch, num_heads), make.res(ch, ch)
        )
        heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self._up(make, level_widths, attends, num_res_blocks, heads_up, skips)
        self.out = nn.Sequential(
            GroupNorm32(level_widths[0]),
            nn.SiLU(),
            _zero(nn.Conv2d(level_widths[0], self.out_channels, 3, padding=1)),
        )

    def _down(
        self, make: _Maker, in_channels: int, widths: list[int], attends: list[bool],
        blocks: int, heads: int,
    ) -> list[int]:  # fmt: skip
        """input_blocks: the first conv, then per level `blocks` ResBlocks (+ attention) and a
        downsampler (a stride-2 conv, or a down ResBlock). Returns the skip widths."""
        ch = widths[0]
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skips = [ch]
        for level, width in enumerate(widths):
            for _ in range(blocks):
                layers: list[nn.Module] = [make.res(ch, width)]
                ch = width
                if attends[level]:
                    layers.append(make.attn(ch, heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != len(widths) - 1:
                down = make.res(ch, ch, down=True) if make.updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skips.append(ch)
        return skips

    def _up(
        self, make: _Maker, widths: list[int], attends: list[bool], blocks: int, heads: int,
        skips: list[int],
    ) -> None:  # fmt: skip
        """output_blocks: per level from the last, `blocks` + 1 ResBlocks on [h, skip] (+
        attention), the last of them followed by an upsampler (except at the first level)."""
        ch = widths[-1]
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for i in range(blocks + 1):
                layers: list[nn.Module] = [make.res(ch + skips.pop(), widths[level])]
                ch = widths[level]
                if attends[level]:
                    layers.append(make.attn(ch, heads))
                if level and i == blocks:
                    layers.append(make.res(ch, ch, up=True) if make.updown else Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"ADM built for {self.image_size}x{self.image_size} images got {tuple(x.shape)}"
            )
        emb = self.time_embed(timestep_embedding(t * self.timestep_scale, self.model_channels))
        if self.num_classes:
            if y is None and not self.null_label:
                raise ValueError(
                    "this class-conditional ADM has no null label (model.null_label=false, "
                    "e.g. an OpenAI checkpoint): give labels (labels=cycle or a list) and no "
                    "guidance"
                )
            if y is None:  # unconditional use of a conditional model: the null label
                y = torch.full_like(t, self.num_classes)
            emb = emb + self.label_emb(y)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h)


class _Maker:
    """The blocks of one ADM, made with its shared settings."""

    def __init__(
        self, emb: int, dropout: float, scale_shift: bool, use_checkpoint: bool,
        new_order: bool, head_channels: int, updown: bool,
    ) -> None:  # fmt: skip
        self.emb, self.dropout, self.scale_shift = emb, dropout, scale_shift
        self.use_checkpoint, self.new_order = use_checkpoint, new_order
        self.head_channels, self.updown = head_channels, updown

    def res(self, c_in: int, c_out: int, up: bool = False, down: bool = False) -> ResBlock:
        return ResBlock(
            c_in, self.emb, self.dropout, c_out, self.scale_shift, up, down, self.use_checkpoint
        )

    def attn(self, width: int, heads: int) -> AttentionBlock:
        if self.head_channels != -1:  # fixed channels per head: heads follow the width
            heads = width // self.head_channels
        return AttentionBlock(width, heads, self.new_order, self.use_checkpoint)
