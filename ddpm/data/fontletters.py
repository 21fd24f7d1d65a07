"""An offline stand-in for EMNIST letters: A-Z and a-z rendered from the fonts matplotlib ships
(DejaVu, STIX, Computer Modern), augmented, as 28x28 white-on-black images.

EMNIST cannot be downloaded on machines without a network; this set lets the sentence feature
(`sample.py text=...`) be shown end to end anyway. It is what it says: printed letters of 18
typefaces, not handwriting. Each image is a glyph with a random stroke width (as drawn or
dilated), a random affine map (rotation, shear, scale, shift) and an elastic distortion, fitted
into the 20x20 centre of a 28x28 image and softened like EMNIST's. Labels and orientation are
EMNIST-letters' as `ddpm.data.loaders.load_emnist` returns them: classes 0..25 = 'a'..'z', upper
and lower case in one class, upright; `cases="upper"` (or `"lower"`) draws one case only, for
models that should write capitals without learning two shapes per class. The set is drawn
from a seed and cached in the per-user cache (`<user cache>/fontletters/`, see
`ddpm.files.user_cache_dir`): what the fonts and the seed give is the same in every working
directory. A cache file is checked against what it should hold (its key, count, shape, labels,
a checksum of the pixels, ink in every image) and rendered anew, with a warning, if it does not.
"""

from __future__ import annotations

import hashlib
import logging
import string
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ddpm.files import atomic_write, load_failure, move_aside, remove_dead_temps, user_cache_dir

log = logging.getLogger(__name__)

FONTS = [
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
]  # fmt: skip
VERSION = 1  # of the recipe below: part of the cache's name
CASES = ("both", "upper", "lower")


def font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def glyph(font: ImageFont.FreeTypeFont, char: str, size: int = 40) -> Image.Image:
    """`char` drawn white on black, cropped to its ink."""
    canvas = Image.new("L", (2 * size, 2 * size))
    ImageDraw.Draw(canvas).text((size // 2, size // 4), char, fill=255, font=font)
    return canvas.crop(canvas.getbbox())


def elastic(img: Image.Image, rng: np.random.Generator, strength: float = 1.0) -> Image.Image:
    """A smooth random displacement of ~`strength` px: a 3x3 grid of random offsets,
    upsampled bicubically (as smooth as a Gaussian-blurred field, without the convolution)."""
    w, h = img.size
    coarse = torch.from_numpy(rng.normal(0, strength, size=(1, 2, 3, 3))).float()
    field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic")
    # torchvision's displacement is in [-1, 1] grid units: pixels * 2 / size
    displacement = (field[0].permute(1, 2, 0) * torch.tensor([2 / w, 2 / h]))[None]
    out = TF.elastic(TF.pil_to_tensor(img), displacement)
    return Image.fromarray(out[0].numpy())


def augment(img: Image.Image, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 letter from a cropped glyph."""
    # as drawn or dilated by 1-2 px (thinner would fade the light typefaces to grey at 28 px)
    stroke = rng.choice([0, 1, 1, 2])
    if stroke > 0:
        img = img.filter(ImageFilter.MaxFilter(2 * stroke + 1))
    w, h = img.size
    side = max(w, h) + 8
    square = Image.new("L", (side, side))
    square.paste(img, ((side - w) // 2, (side - h) // 2))
    # rotation ±12° and horizontal shear ±0.25 about the centre (PIL maps output to input)
    angle, shear = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(-0.25, 0.25)
    cos, sin = np.cos(angle), np.sin(angle)
    a, b, d, e = cos, sin + shear * cos, -sin, cos - shear * sin
    c = side / 2 - a * side / 2 - b * side / 2
    f = side / 2 - d * side / 2 - e * side / 2
    box = square.transform(
        square.size, Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
    )
    box = elastic(box, rng)
    box = box.crop(box.getbbox() or (0, 0, side, side))
    # fit the ink into the 20x20 centre (scaled by ±12 %), shifted by up to 2 px
    scale = 20 * rng.uniform(0.88, 1.12) / max(box.size)
    size = (max(1, round(box.width * scale)), max(1, round(box.height * scale)))
    box = box.resize(size, Image.Resampling.LANCZOS)
    out = Image.new("L", (28, 28))
    dx, dy = rng.integers(-2, 3, size=2)
    out.paste(box, ((28 - size[0]) // 2 + int(dx), (28 - size[1]) // 2 + int(dy)))
    return np.asarray(out.filter(ImageFilter.GaussianBlur(0.5)))


def render_letters(
    per_class: int = 400, seed: int = 0, cases: str = "both"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per_class x 26, 1, 28, 28) uint8 letters and their labels 0..25: half upper case
    (even images of a class) with `cases="both"`, else all of the one case."""
    if cases not in CASES:
        raise ValueError(f"fontletters cases must be one of {CASES}, got {cases!r}")
    fonts = [ImageFont.truetype(str(font_dir() / name), 32) for name in FONTS]
    rng = np.random.default_rng(seed)
    glyphs = {}  # (font, char) -> the glyph, drawn once
    images, labels = [], []
    for label, lower in enumerate(string.ascii_lowercase):
        for k in range(per_class):
            upper = cases == "upper" or (cases == "both" and k % 2 == 0)
            char = lower.upper() if upper else lower
            font = (k // 2) % len(fonts)
            if (font, char) not in glyphs:
                glyphs[font, char] = glyph(fonts[font], char)
            images.append(augment(glyphs[font, char], rng))
            labels.append(label)
    return torch.from_numpy(np.stack(images))[:, None], torch.tensor(labels)


def load_letters(
    root: Path | None = None, per_class: int = 400, seed: int = 0, cases: str = "both"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The set of `per_class`, `seed` and `cases`, from its cache in `root`/fontletters (None:
    the per-user cache) or rendered (and cached)."""
    key = {"version": VERSION, "per_class": per_class, "seed": seed, "cases": cases}
    name = f"letters-v{VERSION}-{per_class}-{seed}" + ("" if cases == "both" else f"-{cases}")
    folder = Path(root) if root is not None else user_cache_dir()
    path = folder / "fontletters" / f"{name}.pt"
    remove_dead_temps(path.parent)
    if path.is_file():
        cached = _load_cache(path, key)
        if cached is not None:
            return cached
    images, labels = render_letters(per_class, seed, cases)
    record = {"key": key, "images": images, "labels": labels, "sha256": _digest(images, labels)}
    try:
        atomic_write(path, lambda f: torch.save(record, f))
    except OSError as e:  # a full disk, a read-only cache: the letters are in memory
        log.warning("letters not cached (%s); rendered again next time", e)
    return images, labels


def _digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    digest = hashlib.sha256(images.contiguous().numpy())
    digest.update(labels.contiguous().numpy())
    return digest.hexdigest()


def _load_cache(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached letters if they are what `key` renders, else None (moved aside, warned)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        problem = _cache_problem(data, key)
    except Exception as e:  # a cut or foreign file, a pickle with code
        problem = load_failure(e)
    if problem is None:
        return data["images"], data["labels"]
    aside = move_aside(path)  # kept for a look
    log.warning("letters cache %s: %s; moved to %s and rendered anew", path, problem, aside)
    return None


def _cache_problem(data: object, key: dict) -> str | None:
    """Why a loaded letters cache is not the set of `key`, or None."""
    if not isinstance(data, dict) or data.get("key") != key:
        return "it was not made for these settings (or by this version)"
    images, labels = data.get("images"), data.get("labels")
    n = 26 * key["per_class"]
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return "its images are not a uint8 tensor"
    if tuple(images.shape) != (n, 1, 28, 28):
        return f"its images are {tuple(images.shape)}, not {(n, 1, 28, 28)}"
    expected = torch.arange(26).repeat_interleave(key["per_class"])
    if not isinstance(labels, torch.Tensor) or not torch.equal(labels, expected):
        return "its labels are not 0..25 in order"
    if data.get("sha256") != _digest(images, labels):
        return "its pixels do not match their checksum"
    blank = int((images.flatten(1).amax(1) == 0).sum())
    if blank:
        return f"{blank} of its images are blank"
    return None
