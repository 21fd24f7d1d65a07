"""sample.py's output folder, the format eval.py reads too: `images/000000.png` ... (image k of
the run, whatever batches drew it), `grid.png`, `samples.npz` and the other outputs, and
`sample.json`, the settings they were drawn with. A rerun with resume=true checks that the
settings are the same and continues from the last whole image (`finished_images`)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

log = logging.getLogger(__name__)

IMAGE_NAME = re.compile(r"\d{6}\.png")  # images/<k>.png: image k of the run
SETTINGS = "sample.json"

# recorded after the drawing, for reading: not settings a resumed run must repeat
MEASURED = ("nfe_per_image", "compiled", "sampling_seconds", "img_per_s")
OUTPUTS = ("grid.png", "samples.npz", "animation.gif", "noise_levels.png", "text.png", SETTINGS)


# temporary files of writes cut short (`atomic_write`): .000003.png.<random>.tmp
TEMP_NAME = re.compile(r"\.(\d{6}\.png|" + "|".join(map(re.escape, OUTPUTS)) + r")\..+\.tmp")


def own_files(out: Path) -> list[Path]:
    """What earlier runs of sample.py left in out/: its named outputs, its numbered images and
    the temporary files of killed writes; nothing else a user keeps there."""
    found = [out / name for name in OUTPUTS if (out / name).is_file()]
    for folder in (out, out / "images"):
        if folder.is_dir():
            found += sorted(p for p in folder.iterdir() if TEMP_NAME.fullmatch(p.name))
    if (out / "images").is_dir():
        found += sorted(p for p in (out / "images").iterdir() if IMAGE_NAME.fullmatch(p.name))
    return found


def check_earlier(out: Path, overwrite: bool, resume: bool) -> list[Path]:
    """Earlier outputs of sample.py in out/; refuses to mix unless resume= or overwrite= says
    what to do with them."""
    earlier = [p for p in own_files(out) if not p.name.endswith(".tmp")]
    if earlier and not overwrite and not resume:
        names = sorted({p.name if p.parent == out else "images" for p in earlier})
        raise FileExistsError(
            f"{out} already holds samples ({', '.join(names)}); choose another "
            "out=DIR, pass resume=true to continue an interrupted run, or overwrite=true"
        )
    return earlier


def settings_record(
    cfg: DictConfig, sampler: dict, guidance: float, labels: list[int] | None, nrow: int | None
) -> dict:
    """What decides the pixels of image k: a resumed run must draw with the same, or the
    folder would hold two sets (n is not among them: image k is the same whatever n)."""
    with open(cfg.ckpt, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if labels is not None and nrow is not None:
        labels = "cycle"  # one class per column, as many images as asked
    options = dict(sampler)
    return {
        "ckpt_sha256": digest,
        "seed": int(cfg.seed),
        "sampler": options.pop("sampler"),
        "steps": options.pop("steps", None),
        **{f"sampler.{k}": v for k, v in sorted(options.items())},
        "guidance": guidance,
        "labels": labels,
        "use_ema": bool(cfg.use_ema),
        "precision": str(cfg.precision),
        "text": None if cfg.text is None else str(cfg.text),
        "ckpt": str(Path(cfg.ckpt).absolute()),  # for reading only: a moved file is the same
        "n": int(cfg.n),
    }


def measured_record(record: dict, tally, seconds: float) -> dict:
    """sample.json after the drawing: the settings and what this run measured of them:
    `nfe_per_image` (network evaluations per image, counted: `ddpm.generate.Evaluations`),
    whether the network ran compiled, and the drawing's seconds and images per second (compile
    time included). A resumed run that had nothing left to draw records none."""
    if not tally.images:
        return record
    return {
        **record,
        "nfe_per_image": tally.per_image,
        "compiled": tally.compiled,
        "sampling_seconds": round(seconds, 3),
        "img_per_s": round(tally.images / seconds, 3) if seconds > 0 else None,
    }


def check_recorded_settings(out: Path, record: dict) -> None:
    """Refuse to resume images drawn with other settings than this run's (out/sample.json)."""
    path = out / SETTINGS
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileExistsError(
            f"{out} holds samples but no {SETTINGS} (the settings they were drawn with), so "
            "resume=true cannot check they match this run's; choose another out=DIR, or "
            "overwrite=true to replace them"
        ) from None
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not readable JSON ({e}); choose another out=DIR, or overwrite=true to "
            "replace the samples there"
        ) from None

    def same(key: str) -> bool:
        old, new = saved.get(key), record.get(key)
        if key == "labels" and isinstance(old, list) and isinstance(new, list):
            return old[: len(new)] == new[: len(old)]  # image k's label, for every common k
        return old == new

    ignored = ("ckpt", "n", *MEASURED)
    keys = [k for k in {**saved, **record} if k not in ignored and not same(k)]
    if keys:

        def short(value: object) -> str:
            text = json.dumps(value)
            return text if len(text) <= 40 else text[:37] + "..."

        diff = "; ".join(
            f"{k} {short(saved.get(k))} there, {short(record.get(k))} now" for k in keys
        )
        raise ValueError(
            f"{out} holds samples drawn with other settings ({diff}): resume=true continues "
            "only with the same settings; rerun with those, choose another out=DIR, or "
            "overwrite=true to replace them"
        )


def finished_images(out: Path, n: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The images 0..k-1 that out/images holds whole, k <= n; a file that does not decode (a
    0-byte or truncated PNG of a kill or a full disk) or has another shape ends the run of
    trusted ones: it is drawn again, with every image after it."""
    kept = []
    for k in range(n):
        path = out / "images" / f"{k:06d}.png"
        if not path.is_file():
            break
        try:
            image = load_png(path)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors of a cut or empty file
            log.warning(
                "%s is not a whole PNG (%s: %s): drawing it again, and the images after it",
                path,
                type(e).__name__,
                e,
            )
            break
        if tuple(image.shape[1:]) != shape:
            log.warning(
                "%s is %s, not the model's %s: drawing it again, and the images after it",
                path,
                "x".join(map(str, image.shape[1:])),
                "x".join(map(str, shape)),
            )
            break
        kept.append(image)
    more = sum(1 for p in own_files(out) if IMAGE_NAME.fullmatch(p.name) and int(p.stem) >= n)
    if more:
        log.info(
            "images/ holds %d images beyond n=%d, drawn with the same settings: kept; "
            "grid.png and samples.npz hold the first %d",
            more,
            n,
            n,
        )
    return kept


def load_png(path: Path) -> torch.Tensor:
    """(1, C, H, W) uint8 from a PNG written by `save_png`."""
    return pil_to_tensor(Image.open(path))[None]
