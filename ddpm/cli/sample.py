"""What `sample.py` does: a checkpoint's EMA model -> grid.png, one PNG per image, and when
asked samples.npz, animation.gif, noise_levels.png, text.png (see sample.py for the options)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ddpm.cli.sample_folder import (
    SETTINGS,
    check_earlier,
    check_recorded_settings,
    finished_images,
    measured_record,
    own_files,
    settings_record,
)
from ddpm.compile import check_setting
from ddpm.data.folder import load_image
from ddpm.device import autocast, pick_device
from ddpm.files import FULL, DiskFull, atomic_write, check_output_dir
from ddpm.generate import (
    Evaluations,
    denoised,
    first_frame,
    generate,
    generate_all,
    image_labels,
)
from ddpm.images import (
    Recorder,
    letter_labels,
    noise_levels_figure,
    save_animation,
    save_grid,
    save_png,
    sentence,
    to_pil,
    to_uint8,
    wrap_words,
)
from ddpm.module import DiffusionModule, load_module
from ddpm.samplers import check_guidance, check_seed, check_steps, dry_run, sampler_settings
from ddpm.trusted import allow_targets

log = logging.getLogger(__name__)


def check_shape(module, cfg: DictConfig) -> None:
    """Refuse a checkpoint of another image size or channel count than the one asked for."""
    channels, size, _ = module.image_shape
    trained = (channels, size)
    asked = (cfg.channels or channels, cfg.image_size or size)
    if asked != trained:
        raise ValueError(
            f"{cfg.ckpt} was trained on {trained[0]}x{trained[1]}x{trained[1]} images, not "
            f"{asked[0]}x{asked[1]}x{asked[1]} as asked (image_size / channels); use a checkpoint "
            "trained at that size or drop the option"
        )


def sampling(cfg: DictConfig, module) -> tuple[dict, float]:
    """generate()'s sampler arguments and the guidance w: by default (sampler=checkpoint,
    guidance=null) those the checkpoint's final training grid was drawn with, so that
    `sample.py ckpt=...` alone draws what training showed; DDPM over all T steps and no
    guidance for a checkpoint that has none. `steps=`, `guidance=` and sampler options
    (`+sampler.variance=large`) override either way."""
    saved = dict(module.sampling)
    saved_guidance = float(saved.pop("guidance", 0.0) or 0.0)
    config = OmegaConf.to_container(cfg.sampler, resolve=True)
    if config["name"] == "checkpoint":
        del config["name"]
        config = {"name": saved.pop("sampler", "ddpm"), **saved, **config}
    sampler = sampler_settings(config, cfg.steps)
    # 0 would run all T steps and record 0; the key is where this run's value came from
    from_group = cfg.steps is None and cfg.sampler.get("steps") is not None
    key = "sampler.steps" if from_group else "steps"
    check_steps(sampler["steps"], module.schedule.num_timesteps, key)
    dry_run(sampler, module.schedule, module.hparams.learn_sigma)  # option values, before work
    guidance = saved_guidance if cfg.guidance is None else float(cfg.guidance)
    check_guidance(guidance)
    return sampler, guidance


def resolve_labels(cfg: DictConfig, n: int, module) -> tuple[list[int] | None, int | None]:
    """labels / class_name options -> one label per image (or None) and the grid's row length."""
    num_classes, names = module.num_classes, module.class_names
    spec = cfg.labels
    if cfg.class_name is not None:
        name = str(cfg.class_name)  # the command line makes class_name=7 an int
        if name not in names:
            raise ValueError(f"class_name={name!r} is not one of the model's classes {names}")
        spec = [names.index(name)] * n
    if spec == "auto":  # a class-conditional model draws one class per grid column
        spec = "cycle" if num_classes else None
    if spec is None:
        return None, None
    if not num_classes:
        raise ValueError("labels= was given but the checkpoint's model is not class-conditional")
    if spec == "cycle":
        return image_labels("cycle", 0, n, num_classes), num_classes
    indices = isinstance(spec, Sequence) and not isinstance(spec, str)
    if not indices or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
        # int() of a word says only "invalid literal"; a class by its name is class_name=
        more = ", ..." if len(names) > 10 else ""
        known = f" (the model's: {', '.join(map(str, names[:10]))}{more})"
        raise ValueError(
            f"labels={_shown(spec)} must be class indices 0..{num_classes - 1} (e.g. "
            "labels=[3,3,7]), cycle, auto or null; for a class by its name give class_name=NAME"
            + (known if names else "")
        )
    labels = [int(v) for v in spec]
    if len(labels) != n:
        raise ValueError(f"labels has {len(labels)} entries but n={n}; give one label per image")
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside the model's classes 0..{num_classes - 1}")
    return labels, None


def _shown(value: object) -> str:
    """A labels= value as the command line wrote it: [a, b], not ['a', 'b'] or ListConfig."""
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return str(value)
    return "[" + ", ".join(map(str, value)) + "]"


def noise_levels_t(ts: list[int] | None, num_timesteps: int) -> list[int]:
    """The timesteps of the noise-level figure: the given ones, checked against the schedule,
    or 0, 10, 25, 50 and 75 % of T and the last, T - 1 (for T = 1000: 0, 100, 250, 500, 750,
    999)."""
    if ts is None:
        fractions = (0, 0.1, 0.25, 0.5, 0.75, 1.0)
        return [min(round(f * num_timesteps), num_timesteps - 1) for f in fractions]
    bad = [t for t in ts if not 0 <= int(t) < num_timesteps]
    if bad:
        raise ValueError(
            f"noise_levels_t {bad} are outside the model's timesteps 0..{num_timesteps - 1}; "
            "give t's within them or drop noise_levels_t (null: spread over the schedule)"
        )
    return [int(t) for t in ts]


def check_text(cfg: DictConfig, module) -> None:
    """Refuse a text= that the model cannot write, before any letter is drawn."""
    if not module.num_classes or not module.class_names:
        raise ValueError(
            "text= needs a class-conditional model trained on letters (dataset=emnist)"
        )
    if cfg.text_width < 1:
        raise ValueError(f"text_width must be >= 1 (characters per line), got {cfg.text_width}")
    # wrap_words never splits a word: a longer one would make a line (and text.png) that wide
    longest = max(str(cfg.text).split(), key=len)
    if len(longest) > cfg.text_width:
        shown = longest if len(longest) <= 20 else longest[:17] + "..."
        raise ValueError(
            f"text= holds a word of {len(longest)} letters ({shown!r}), longer than "
            f"text_width={cfg.text_width} characters per line; give text_width={len(longest)} "
            "or more, or split the word"
        )
    letter_labels(wrap_words(str(cfg.text), cfg.text_width), module.class_names)


def check_options(cfg: DictConfig) -> None:
    """Options that need no model, checked before it is loaded (n, batch_size, text,
    animation_hold_ms, seed, guidance, grid_max): a seed beyond 32 bits draws another seed's
    images, guidance=nan black ones, grid_max=0 an empty grid.png."""
    if cfg.n < 1 or cfg.batch_size < 1:
        raise ValueError(
            f"n and batch_size must be >= 1, got n={cfg.n}, batch_size={cfg.batch_size}: n is "
            "the number of images (e.g. n=64), batch_size the images per forward pass"
        )
    if cfg.text is not None and not str(cfg.text).strip():
        raise ValueError(
            f"text={str(cfg.text)!r} holds no letters; give a sentence (text='HELLO WORLD') "
            "or drop text= to draw n images"
        )
    hold_ms(cfg)  # a wrong value fails before any work
    check_setting(cfg.get("compile", "false"))
    check_seed(cfg.seed)
    check_guidance(cfg.guidance)
    grid_max = cfg.grid_max
    if isinstance(grid_max, bool) or not isinstance(grid_max, int) or grid_max < 1:
        raise ValueError(
            "grid_max must be an integer >= 1 (grid.png shows the first grid_max images, e.g. "
            f"grid_max=256), got {grid_max!r}"
        )


def hold_ms(cfg: DictConfig) -> int:
    """How long animation.gif shows its final frame (ms)."""
    hold = cfg.get("animation_hold_ms", 2000)
    if isinstance(hold, bool) or not isinstance(hold, int) or hold < 0:
        raise ValueError(f"animation_hold_ms must be an integer >= 0 (milliseconds), got {hold!r}")
    return hold


@dataclass
class Plan:
    """What sample.py will draw and write, every input checked and nothing yet written. `cfg`
    holds the options used as given (n, seed, batch_size, use_ema, scale, grid_max, npz,
    animate, text, text_width, resume)."""

    cfg: DictConfig
    module: DiffusionModule  # the checkpoint's, on the device
    out: Path
    sampler: dict  # generate()'s sampler arguments
    guidance: float
    precision: torch.autocast  # the context of every network call
    labels: list[int] | None  # one class per image; None: unconditional (or text=)
    nrow: int | None  # grid.png's row length: one class per column; None: square
    record: dict  # out/sample.json: the settings that decide the pixels
    stale: list[Path]  # earlier outputs in out/ that this run removes before it writes
    noise_t: list[int] | None  # the timesteps of noise_levels.png; None: no figure
    real: torch.Tensor | None  # its real image (1, C, H, W) uint8; None: the first sample
    hold_ms: int  # how long animation.gif shows its final frame
    tally: Evaluations  # the network evaluations of the drawing, counted as they happen


def sample(cfg: DictConfig) -> Path:
    """sample.py: every check (`plan_sampling`), then the images (`write_samples`). A full
    disk midway is one line naming the file, and how to finish the job: the images written so
    far are kept and resume=true draws only the rest."""
    try:
        return write_samples(plan_sampling(cfg))
    except OSError as e:
        if e.errno not in FULL:
            raise
        line = _full_line(e, Path(cfg.out))
        raise OSError(f"{line}; then rerun with resume=true to finish the job") from None


def _full_line(e: OSError, out: Path) -> str:
    """A full disk's error in one line naming the file (`DiskFull` already does; a write
    that failed inside a library may know no file name: then the folder)."""
    if isinstance(e, DiskFull):
        return str(e)
    where = e.filename or f"into {out}"
    return f"cannot write {where}: {e.strerror}; free space or write elsewhere"


def plan_sampling(cfg: DictConfig) -> Plan:
    """Every check of sample.py's inputs, before any work: the options, the output folder
    and its earlier outputs, the checkpoint (loaded once), the sampler, the noise-level
    figure, labels and text, and that resume=true continues with the same settings. Nothing
    is written and nothing drawn."""
    allow_targets(cfg.get("trusted_targets"))  # the user's own classes a checkpoint may name
    check_options(cfg)
    out = Path(cfg.out)
    check_output_dir(out, "out")
    earlier = check_earlier(out, cfg.overwrite, cfg.resume)
    device = pick_device(cfg.device)
    precision = autocast(cfg.precision, device)  # a wrong value fails before any work
    module = load_module(cfg.ckpt, map_location=device)
    check_shape(module, cfg)
    if cfg.guidance and not module.num_classes:
        raise ValueError(
            f"guidance={cfg.guidance} needs a class-conditional model, and {cfg.ckpt} is "
            "unconditional (trained with model.num_classes=null); drop guidance="
        )
    sampler, guidance = sampling(cfg, module)
    noise_t, real = None, None
    if cfg.noise_levels:  # a wrong t or image fails now, not after the sampling
        noise_t = noise_levels_t(cfg.noise_levels_t, module.schedule.num_timesteps)
        if cfg.noise_levels_image:
            channels, size, _ = module.image_shape
            real = load_image(cfg.noise_levels_image, size, channels, "noise_levels_image")
    labels, nrow = (None, None) if cfg.text else resolve_labels(cfg, cfg.n, module)
    if labels is None and not cfg.text:
        if cfg.guidance:
            raise ValueError(
                f"guidance={cfg.guidance} needs labels to guide towards, and labels=null draws "
                "unconditional samples; give labels=cycle (or a list, or class_name=NAME), or "
                "drop guidance="
            )
        guidance = 0.0  # unconditional samples of a conditional model: nothing to guide towards
    if cfg.text:
        check_text(cfg, module)
    record = settings_record(cfg, sampler, guidance, labels, nrow)
    if earlier and cfg.resume and not cfg.overwrite:
        check_recorded_settings(out, record)
    return Plan(
        cfg=cfg,
        module=module,
        out=out,
        sampler=sampler,
        guidance=guidance,
        precision=precision,
        labels=labels,
        nrow=nrow,
        record=record,
        stale=stale_files(out, cfg.overwrite),
        noise_t=noise_t,
        real=real,
        hold_ms=hold_ms(cfg),
        tally=Evaluations(),
    )


def stale_files(out: Path, overwrite: bool) -> list[Path]:
    """What of sample.py's own files in out/ this run removes: overwrite=true, all of them;
    resume=true, what is made from the images (grid, npz ...), made anew for this run's n and
    options; always, the temporary files of cut writes."""
    stale = []
    for path in own_files(out):
        derived = path.parent == out and path.name != SETTINGS
        if overwrite or derived or path.name.endswith(".tmp"):
            stale.append(path)
    return stale


def write_samples(plan: Plan) -> Path:
    """Draw and write what `plan_sampling` checked: only now is anything in out/ changed.
    grid.png, images/, and when asked samples.npz, animation.gif and noise_levels.png; or,
    for text=, text.png."""
    cfg, module, out = plan.cfg, plan.module, plan.out
    for path in plan.stale:
        path.unlink()
    atomic_write(out / SETTINGS, lambda f: f.write(json.dumps(plan.record, indent=1).encode()))
    start = time.perf_counter()
    if cfg.text:
        write_text(plan)
        record_measures(plan, time.perf_counter() - start)
        return out
    everything = write_images(plan)
    record_measures(plan, time.perf_counter() - start)
    save_grid(everything[: cfg.grid_max].float() / 127.5 - 1, out / "grid.png", plan.nrow)
    if cfg.npz:
        array = everything.permute(0, 2, 3, 1).numpy()
        atomic_write(out / "samples.npz", lambda f: np.savez(f, arr_0=array))
    if plan.noise_t is not None:
        first_label = None if plan.labels is None else torch.tensor(plan.labels[:1])
        shown = everything[:1] if plan.real is None else plan.real  # generated, or a real one
        x_t, x0_hat = denoised(
            module, shown.float() / 127.5 - 1, plan.noise_t, cfg.seed, first_label
        )
        figure = noise_levels_figure(x_t, x0_hat, plan.noise_t)
        atomic_write(out / "noise_levels.png", lambda f: figure.save(f, format="PNG"))
    log.info("wrote %d images to %s", cfg.n, out)
    return out


def record_measures(plan: Plan, seconds: float) -> None:
    """sample.json with the drawing's nfe_per_image, compiled and img/s, and the same printed."""
    record = measured_record(plan.record, plan.tally, seconds)
    atomic_write(plan.out / SETTINGS, lambda f: f.write(json.dumps(record, indent=1).encode()))
    if plan.tally.images:
        log.info(
            "%d images in %.1f s (%.2f img/s, %s): %g network evaluations per image",
            plan.tally.images,
            seconds,
            record["img_per_s"] or 0.0,
            "compiled" if plan.tally.compiled else "eager",
            plan.tally.per_image,
        )


def write_images(plan: Plan) -> torch.Tensor:
    """images/000000.png ... as each batch comes (an interrupted run resumes from them), and
    animation.gif of the first batch drawn; returns all n images, uint8 (n, C, H, W)."""
    cfg, module, out = plan.cfg, plan.module, plan.out
    (out / "images").mkdir(parents=True, exist_ok=True)
    kept = finished_images(out, cfg.n, module.image_shape) if cfg.resume else []
    start = len(kept)
    steps = plan.sampler["steps"] or module.schedule.num_timesteps
    recorder = Recorder(steps) if cfg.animate else None
    row = plan.nrow or max(1, int(min(cfg.batch_size, cfg.n - start) ** 0.5))

    def frame(images: torch.Tensor) -> Image.Image:
        return to_pil(images, row, cfg.scale)

    batches = generate(
        module,
        cfg.n - start,
        sampler=plan.sampler,
        seed=cfg.seed,
        first=start,
        labels=plan.labels,
        guidance=plan.guidance,
        batch_size=cfg.batch_size,
        use_ema=cfg.use_ema,
        callback=recorder,  # the first batch is animated
        context=lambda: plan.precision,
        compile=cfg.get("compile", "false"),
        evaluations=plan.tally,
    )
    for first, images in batches:
        images = to_uint8(images.cpu())
        for k, img in enumerate(images):  # written as they come: an interrupted run resumes
            save_png(img, out / "images" / f"{first + k:06d}.png")
        kept.append(images)
        if recorder is not None and first == start:
            x_T = first_frame(module, len(images), cfg.seed, first)
            save_animation(recorder, out / "animation.gif", frame, x_T, hold_ms=plan.hold_ms)
    return torch.cat(kept)


def write_text(plan: Plan) -> Path:
    """text="...": each letter drawn by a letters model, laid out as wrapped lines."""
    cfg, module, out = plan.cfg, plan.module, plan.out
    lines = wrap_words(str(cfg.text), cfg.text_width)
    labels = letter_labels(lines, module.class_names)
    steps = plan.sampler["steps"] or module.schedule.num_timesteps
    recorder = Recorder(steps) if cfg.animate else None
    images = generate_all(
        module,
        len(labels),
        sampler=plan.sampler,
        seed=cfg.seed,
        labels=labels,
        guidance=plan.guidance,
        use_ema=cfg.use_ema,
        callback=recorder,
        context=lambda: plan.precision,
        desc="letters",
        compile=cfg.get("compile", "false"),
        evaluations=plan.tally,
    )
    out.mkdir(parents=True, exist_ok=True)

    def layout(letters: torch.Tensor) -> Image.Image:
        page = sentence(letters, lines)
        return to_pil(page[None], nrow=1, scale=cfg.scale, padding=0)

    page = layout(to_uint8(images.cpu()))
    atomic_write(out / "text.png", lambda f: page.save(f, format="PNG"))  # a full disk: named
    if recorder is not None:
        x_T = first_frame(module, len(labels), cfg.seed)
        save_animation(recorder, out / "animation.gif", layout, x_T, hold_ms=plan.hold_ms)
    log.info("wrote %s", out / "text.png")
    return out
