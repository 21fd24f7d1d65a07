"""Pure image helpers: uint8 conversion, grids, PNG and GIF files, denoising animations,
noise-level figures, sentences. Nothing here knows a model.

torchvision makes grids and converts tensors to PIL images; PIL writes the files and draws the
captions (torchvision's own PNG writer is deprecated since 0.29); `textwrap` wraps sentences.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import make_grid

from ddpm.files import atomic_write


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 [0, 255], rounding as image files store them."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_png(image: Tensor, path: str | Path) -> None:
    """Write one uint8 image (C, H, W), C = 1 (grayscale PNG) or 3 (RGB), as a PNG: whole or
    not at all (`atomic_write`), so a kill or a full disk leaves no truncated file."""
    picture = to_pil_image(image.cpu())
    atomic_write(path, lambda f: picture.save(f, format="PNG"))


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as one PNG grid; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    # the grid holds exactly the pixels that the per-image PNGs of sample.py hold
    grid = make_grid(to_uint8(images.cpu()), nrow=nrow, padding=2)
    save_png(grid[:1] if images.shape[1] == 1 else grid, path)  # make_grid turns gray into RGB
    return path


def to_pil(images: Tensor, nrow: int, scale: int = 1, padding: int = 2) -> Image.Image:
    """uint8 (N, C, H, W) -> one RGB PIL grid, upscaled `scale` times (nearest: sharp pixels)."""
    grid = make_grid(images.cpu(), nrow=nrow, padding=padding)  # (3, H, W) uint8
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return (
        img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        if scale > 1
        else img
    )


def caption(img: Image.Image, text: str, height: int = 14) -> Image.Image:
    """The image with a black strip above it carrying `text`."""
    out = Image.new("RGB", (img.width, img.height + height))
    out.paste(img, (0, height))
    ImageDraw.Draw(out).text((2, 1), text, fill=(255, 255, 255), font=ImageFont.load_default())
    return out


class Recorder:
    """A sampler callback keeping x_t every few steps, for an animation of the denoising."""

    def __init__(self, steps: int, max_frames: int = 60) -> None:
        self.every = max(1, math.ceil(steps / max_frames))
        self.steps = steps
        self.frames: list[tuple[int, Tensor]] = []

    def __call__(self, i: int, t: Tensor, x: Tensor, x0: Tensor) -> None:
        if i % self.every == 0 or i == self.steps - 1:
            # x_t is the state after step i; its noise level is the next timestep's
            self.frames.append((i + 1, to_uint8(x.detach().float().cpu())))


def save_animation(
    recorder: Recorder,
    path: str | Path,
    layout: Callable[[Tensor], Image.Image],
    initial: Tensor,
    frame_ms: int = 80,
    hold_ms: int = 2000,
) -> Path:
    """GIF from pure noise (`initial`, x_T in [-1, 1]) to the images, each frame drawn by
    `layout(uint8 images)` and captioned with its step; the final frame is held for `hold_ms`."""
    total = recorder.steps
    frames = [caption(layout(to_uint8(initial.float().cpu())), f"step 0/{total} (noise)")]
    for step, images in recorder.frames:
        frames.append(caption(layout(images), f"step {step}/{total}"))
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0)
    return path


def noise_levels_figure(x_t: Tensor, x0_hat: Tensor, ts: list[int], scale: int = 3) -> Image.Image:
    """Top row: an image noised to each t, x_t (len(ts), C, H, W); bottom row: the model's
    estimate of x_0 from each (`ddpm.generate.denoised`), both in [-1, 1]. Columns are captioned
    with t."""
    rows = to_pil(to_uint8(torch.cat([x_t.clamp(-1, 1), x0_hat]).cpu()), len(ts), scale)
    head = Image.new("RGB", (rows.width, 14))
    draw = ImageDraw.Draw(head)
    step = rows.width / len(ts)
    for k, tk in enumerate(ts):
        draw.text(
            (int(k * step) + 3, 1), f"t={tk}", fill=(255, 255, 255), font=ImageFont.load_default()
        )
    out = Image.new("RGB", (rows.width, rows.height + 14))
    out.paste(head, (0, 0))
    out.paste(rows, (0, 14))
    return caption(out, "top: x_t = q_sample(x_0, t); bottom: the model's x_0 estimate")


def wrap_words(text: str, width: int) -> list[str]:
    """Greedy word wrap to lines of at most `width` characters, words one space apart; a longer
    word gets its own line, unbroken (a letter is never split from its word)."""
    return textwrap.wrap(
        " ".join(text.split()), width, break_long_words=False, break_on_hyphens=False
    )


def letter_labels(lines: list[str], class_names: list[str]) -> list[int]:
    """Class index of every non-space character, matched exactly or else case-insensitively."""
    exact = {name: i for i, name in enumerate(class_names)}
    folded = {name.lower(): i for i, name in enumerate(class_names)}
    labels = []
    for ch in "".join(lines).replace(" ", ""):
        if ch in exact:
            labels.append(exact[ch])
        elif ch.lower() in folded:
            labels.append(folded[ch.lower()])
        else:
            raise ValueError(
                f"text: the model cannot write {ch!r}; its classes are {''.join(class_names)}"
            )
    return labels


def sentence(images: Tensor, lines: list[str], background: int = 0) -> Tensor:
    """Lay generated letters (N, C, H, W) uint8 out as the lines of text, spaces left blank."""
    _, c, h, w = images.shape
    width = max(len(line) for line in lines)
    canvas = torch.full((c, len(lines) * h, width * w), background, dtype=torch.uint8)
    k = 0
    for row, line in enumerate(lines):
        for col, ch in enumerate(line):
            if ch != " ":
                canvas[:, row * h : (row + 1) * h, col * w : (col + 1) * w] = images[k]
                k += 1
    return canvas
