"""The denoising network of Ho et al. 2020 (Appendix B), a PixelCNN++-style UNet.

It knows nothing about diffusion: it maps a noisy image and an integer timestep (and optionally a
class label) to a tensor of the image's shape. What that output means (ε, x_0 or v) is decided by
the module that trains it.

Its options beyond the sizes (`downsample_padding`, `flip_sin_to_cos`, `freq_shift`, `norm_eps`,
`norm_groups`, `head_dim`, `null_label`) make it the same function as diffusers' `UNet2DModel`
with DownBlock2D / AttnDownBlock2D blocks, so published models import exactly (`ddpm.convert`);
their defaults are this network as it always was, so existing checkpoints keep their outputs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor,
    dim: int,
    max_period: float = 10000.0,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1,
) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), as in Transformer positional codes:
    [sin(t ω_k), cos(t ω_k)] with ω_k = max_period^(-k / (dim/2 - freq_shift)), k < dim/2
    (freq_shift 1: Ho et al.'s; diffusers' `downscale_freq_shift`), cos first if flipped."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device) / (half - freq_shift)
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _norm(channels: int, groups: int | None = None, eps: float = 1e-6) -> nn.GroupNorm:
    # 32 groups as in the paper; fewer for the narrow networks used on CPU (gcd(32, C)), or
    # the same number everywhere (diffusers' norm_num_groups)
    return nn.GroupNorm(groups or math.gcd(32, channels), channels, eps=eps)


Norm = Callable[[int], nn.GroupNorm]


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the projected time embedding, then again with dropout."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, norm: Norm = _norm
    ) -> None:
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention over the H·W positions (one head by default, as in the paper), via SDPA."""

    def __init__(self, channels: int, num_heads: int = 1, norm: Norm = _norm) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.num_heads, C // self.num_heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, nh, HW, hs)
        h = F.scaled_dot_product_attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class Downsample(nn.Module):
    """A stride-2 3x3 conv. `padding=1` pads one pixel on every side; `padding=0` pads one
    on the right and bottom only: TensorFlow's "SAME" for even sizes, as Ho et al.'s code and
    diffusers' `downsample_padding=0` do (the windows start at pixel 0, not -1)."""

    def __init__(self, channels: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """A ResBlock optionally followed by attention: one entry of the UNet's down or up path."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def attention_sizes(
    image_size: int, ch_mult: Sequence[int], attn_resolutions: Any, attn_levels: Any
) -> set[int]:
    """The feature-map sizes that get self-attention: those of `attn_resolutions`, and those
    of the levels `attn_levels` names (0 the first, -1 the last), which fit any image size."""
    levels = [image_size // 2**k for k in range(len(ch_mult))]
    sizes = ", ".join(map(str, levels))
    if not _is_list(attn_resolutions):
        raise ValueError(
            f"model.attn_resolutions must be a list of feature-map sizes, e.g. [{levels[-1]}] "
            f"or [], got {attn_resolutions!r}; this network's levels are at {sizes} px"
        )
    attn_levels = [] if attn_levels is None else attn_levels
    n = len(levels)
    if not _is_list(attn_levels) or any(
        isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n for k in attn_levels
    ):
        raise ValueError(
            f"model.attn_levels must be a list of level indices in [{-n}, {n - 1}] (0: "
            f"{levels[0]} px, -1: the last level, {levels[-1]} px), got {attn_levels!r}"
        )
    return set(attn_resolutions) | {levels[k] for k in attn_levels}


def check_attention_sizes(image_size: int, ch_mult: Sequence[int], attn_resolutions: Any) -> None:
    """A size in attn_resolutions that is no level's gets no attention at all, and the run
    looks normal: refused when a run is configured (train.py). Not at construction, so that
    checkpoints written with such a size (the network as if it were not there) still load."""
    levels = [image_size // 2**k for k in range(len(ch_mult))]
    stray = [r for r in attn_resolutions if r not in levels]
    if stray:
        raise ValueError(
            f"model.attn_resolutions={list(attn_resolutions)} names no level of the network "
            f"({stray}): its levels are at {', '.join(map(str, levels))} px (model.image_size "
            "/ 2^k); use some of those, [] or model.attn_levels (e.g. [-1]: the last level)"
        )


def _check_attention(
    image_size: int,
    ch: int,
    ch_mult: Sequence[int],
    attn_resolutions: Any,
    num_heads: Any,
    attn_levels: Any = None,
    head_dim: Any = None,
) -> None:
    """Attention settings that would fail deep inside: 0 heads is a ZeroDivisionError at the
    first attention block, heads that do not divide a width a reshape error."""
    attended = attention_sizes(image_size, ch_mult, attn_resolutions, attn_levels)
    levels = [image_size // 2**k for k in range(len(ch_mult))]
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(
            f"model.num_heads must be an integer >= 1 (attention heads; 1 as in Ho et al.), "
            f"got {num_heads!r}"
        )
    # the middle block always attends, at the last level's width
    widths = sorted(
        {ch * ch_mult[-1]} | {ch * ch_mult[k] for k in range(len(ch_mult)) if levels[k] in attended}
    )
    if head_dim is not None:
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(
                f"model.head_dim must be null (model.num_heads heads) or an integer >= 1 "
                f"(channels per head), got {head_dim!r}"
            )
        uneven = [w for w in widths if w % head_dim]
        if uneven:
            raise ValueError(
                f"model.head_dim={head_dim} does not divide the attention widths {uneven}; use "
                "a divisor of them, or model.head_dim=null"
            )
        return
    uneven = [w for w in widths if w % num_heads]
    if uneven:
        raise ValueError(
            f"model.num_heads={num_heads} does not divide the attention widths {uneven} "
            "(model.ch * model.ch_mult of the attended levels and the middle block); use a "
            "divisor of them, e.g. model.num_heads=1"
        )


def _check_layout(
    ch: int, ch_mult: Sequence[int], norm_groups: Any, norm_eps: Any, downsample_padding: Any
) -> None:
    """The options that make this network diffusers' UNet2DModel, one line each."""
    if norm_groups is not None:
        widths = sorted({ch} | {ch * m for m in ch_mult})
        if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
            raise ValueError(
                f"model.norm_groups must be null (gcd(32, C) groups per GroupNorm) or an "
                f"integer >= 1, got {norm_groups!r}"
            )
        uneven = [w for w in widths if w % norm_groups]
        if uneven:
            raise ValueError(
                f"model.norm_groups={norm_groups} does not divide the widths {uneven} "
                "(model.ch and model.ch * model.ch_mult); use a divisor of them, or null"
            )
    number = isinstance(norm_eps, (int, float)) and not isinstance(norm_eps, bool)
    if not number or not 0 < norm_eps < 1:
        raise ValueError(f"model.norm_eps must be a number in (0, 1), e.g. 1e-6; got {norm_eps!r}")
    if downsample_padding not in (0, 1) or isinstance(downsample_padding, bool):
        raise ValueError(
            "model.downsample_padding must be 1 (pad every side) or 0 (pad right and bottom: "
            f"TensorFlow's SAME, as Ho et al.'s models), got {downsample_padding!r}"
        )


def check_sizes(
    image_size: int,
    in_channels: int,
    ch: int,
    ch_mult: Sequence[int],
    attn_resolutions: Any,
    dropout: float,
    num_heads: Any,
    attn_levels: Any = None,
    head_dim: Any = None,
    norm_groups: Any = None,
    norm_eps: Any = 1e-6,
    downsample_padding: Any = 1,
) -> None:
    """The constructor's value checks, one line naming the model.<key> each."""
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        raise ValueError(
            f"model.image_size={image_size} is not divisible by {factor}, the UNet's "
            f"downsampling factor for ch_mult={list(ch_mult)}; use fewer levels in "
            "model.ch_mult or resize the data (dataset.image_size)"
        )
    if not isinstance(ch, int) or ch < 4:  # the time embedding's sin/cos need 2 pairs
        raise ValueError(f"model.ch (the base width) must be an integer >= 4, got {ch!r}")
    if not ch_mult or any(not isinstance(m, int) or m < 1 for m in ch_mult):
        raise ValueError(
            f"model.ch_mult must be a non-empty list of integers >= 1, got {list(ch_mult)}"
        )
    if in_channels < 1:  # 1 gray, 3 RGB, or an autoencoder's latent channels
        raise ValueError(f"model.in_channels must be >= 1, got {in_channels}")
    if not 0 <= dropout < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {dropout}")
    _check_attention(image_size, ch, ch_mult, attn_resolutions, num_heads, attn_levels, head_dim)
    _check_layout(ch, ch_mult, norm_groups, norm_eps, downsample_padding)


def check_config(config: Mapping[str, Any]) -> None:
    """`check_sizes` of a UNet config (model=...), missing keys at the constructor's defaults:
    train.py's check before anything is built or written."""
    parameters = inspect.signature(UNet).parameters
    args = {k: p.default for k, p in parameters.items()} | {
        k: v for k, v in config.items() if k in parameters
    }
    check_sizes(*(args[k] for k in inspect.signature(check_sizes).parameters))
    check_attention_sizes(args["image_size"], args["ch_mult"], args["attn_resolutions"])


class _Blocks:
    """The UNet's ResBlocks and attention blocks, made with its shared settings: heads of
    `head_dim` channels each, or `num_heads` heads whatever the width."""

    def __init__(
        self, emb_dim: int, dropout: float, norm: Norm, num_heads: int, head_dim: int | None
    ) -> None:
        self.emb_dim, self.dropout, self.norm = emb_dim, dropout, norm
        self.num_heads, self.head_dim = num_heads, head_dim

    def res(self, c_in: int, c_out: int) -> ResBlock:
        return ResBlock(c_in, c_out, self.emb_dim, self.dropout, self.norm)

    def attn(self, width: int) -> AttnBlock:
        heads = width // self.head_dim if self.head_dim else self.num_heads
        return AttnBlock(width, heads, self.norm)


class UNet(nn.Module):
    """`UNet(x, t, y=None) -> tensor of x's shape`.

    Args:
        image_size: height = width of the inputs; must be divisible by 2^(len(ch_mult) - 1).
        in_channels: 1 (grayscale), 3 (RGB) or a latent's channels; out_channels defaults to
            in_channels.
        ch: base width; level i has ch * ch_mult[i] channels.
        num_res_blocks: ResBlocks per level on the way down (one more on the way up).
        attn_resolutions: feature-map sizes (e.g. [16]) that get self-attention.
        attn_levels: levels that get self-attention, by index (0: image_size, 1: after the
            first downsampling; -1: the last level): unlike sizes, they fit any image size.
        num_classes: if set, a class embedding is added to the time embedding; index
            `num_classes` is the null label used for classifier-free guidance.
        downsample_padding: 1 pads the stride-2 convs on every side; 0 on the right and bottom
            only (TF "SAME": Ho et al.'s models, diffusers' `downsample_padding=0`).
        flip_sin_to_cos, freq_shift: the timestep embedding's layout (`timestep_embedding`).
        norm_eps: ε of every GroupNorm.
        norm_groups: groups of every GroupNorm; None: gcd(32, C) for C channels.
        head_dim: channels per attention head (heads = width / head_dim in each block); None:
            `num_heads` heads everywhere.
        null_label: the class embedding has the extra null row (index num_classes); False for
            a model that was trained without one (diffusers' `num_class_embeds`): labels are
            then required.

    Shapes: x (B, C, H, W) float, t (B,) int64 in [0, T), y (B,) int64 or None.
    """

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 3,
        out_channels: int | None = None,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_classes: int | None = None,
        attn_levels: Sequence[int] | None = None,
        downsample_padding: int = 1,
        flip_sin_to_cos: bool = False,
        freq_shift: int = 1,
        norm_eps: float = 1e-6,
        norm_groups: int | None = None,
        head_dim: int | None = None,
        null_label: bool = True,
    ) -> None:
        super().__init__()
        args = (image_size, in_channels, ch, ch_mult, attn_resolutions, dropout, num_heads)
        check_sizes(
            *args,
            attn_levels,
            head_dim=head_dim,
            norm_groups=norm_groups,
            norm_eps=norm_eps,
            downsample_padding=downsample_padding,
        )
        attn_resolutions = attention_sizes(image_size, ch_mult, attn_resolutions, attn_levels)
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.null_label = bool(null_label)
        self.flip_sin_to_cos = bool(flip_sin_to_cos)
        self.freq_shift = freq_shift
        emb_dim = 4 * ch
        norm = partial(_norm, groups=norm_groups, eps=norm_eps)
        blocks = _Blocks(emb_dim, dropout, norm, num_heads, head_dim)

        self.ch = ch
        self.time_embed = nn.Sequential(
            nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        # one extra row: the null label of classifier-free guidance
        rows = (num_classes or 0) + self.null_label
        self.class_embed = nn.Embedding(rows, emb_dim) if num_classes else None

        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        cur = self._paths(blocks, ch, ch_mult, num_res_blocks, attn_resolutions, downsample_padding)
        self.norm_out = norm(cur)
        self.conv_out = nn.Conv2d(cur, out_channels or in_channels, 3, padding=1)

    def _paths(
        self,
        blocks: _Blocks,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attended: set[int],
        downsample_padding: int,
    ) -> int:
        """The down path, the middle and the up path (in this order: the state dict's); returns
        the width the up path ends at."""
        self.down = nn.ModuleList()
        skip_channels = [ch]
        cur, res = ch, self.image_size
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                out = ch * mult
                attn = blocks.attn(out) if res in attended else None
                self.down.append(_Level(blocks.res(cur, out), attn))
                cur = out
                skip_channels.append(cur)
            if level != len(ch_mult) - 1:
                self.down.append(Downsample(cur, downsample_padding))
                skip_channels.append(cur)
                res //= 2

        self.mid = nn.ModuleList(
            [_Level(blocks.res(cur, cur), blocks.attn(cur)), _Level(blocks.res(cur, cur), None)]
        )

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                out = ch * mult
                attn = blocks.attn(out) if res in attended else None
                self.up.append(_Level(blocks.res(cur + skip_channels.pop(), out), attn))
                cur = out
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2
        return cur

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"UNet built for {self.image_size}x{self.image_size} images got {tuple(x.shape)}"
            )
        emb = timestep_embedding(t, self.ch, 10000.0, self.flip_sin_to_cos, self.freq_shift)
        emb = self.time_embed(emb)
        if self.class_embed is not None:
            if y is None and not self.null_label:
                raise ValueError(
                    "this class-conditional UNet has no null label (model.null_label=false: "
                    "trained without one, e.g. a diffusers num_class_embeds model): give labels "
                    "(labels=cycle or a list) and no guidance"
                )
            if y is None:  # unconditional use of a conditional model: the null label
                y = torch.full_like(t, self.num_classes)
            emb = emb + self.class_embed(y)

        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, _Level):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
