"""Pictures made from samples: labelled grids, denoising animations, noise-level figures, sentences.

torchvision makes grids; PIL draws the captions and writes GIFs (torchvision has neither).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.utils import make_grid

from ddpm.callbacks import to_uint8


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


def noise_levels_figure(
    module,
    image: Tensor,
    ts: list[int],
    seed: int = 0,
    labels: Tensor | None = None,
    scale: int = 3,
) -> Image.Image:
    """Top row: `image` (1, C, H, W) in [-1, 1] noised to each t (q_sample); bottom row: the
    model's estimate of x_0 from each. Columns are captioned with t."""
    net = module.ema.module
    device = module.device
    x0 = image.to(device).expand(len(ts), -1, -1, -1)
    t = torch.tensor(ts, device=device, dtype=torch.long)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    x_t = module.schedule.q_sample(x0, t, noise)
    y = None if labels is None else labels.to(device).expand(len(ts))
    with torch.no_grad():
        eps = module.model_fn(net, y)(x_t, t)
    x0_hat = module.schedule.predict_x0(x_t, t, eps).clamp(-1, 1)
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
    """Greedy word wrap to lines of at most `width` characters (a longer word gets its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


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
