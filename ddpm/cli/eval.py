"""What `eval.py` does: FID, KID and Inception Score of generated images (an .npz, a folder of
PNGs, or a checkpoint sampled on the fly) against cached statistics of a dataset split, and
with nll=true a checkpoint's negative log-likelihood bound in bits/dim on held-out images."""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import hydra
import torch
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ddpm.cli.sources import (
    checkpoint_sampler,
    held_out_images,
    image_files,
    npz_array,
    source_batches,
)
from ddpm.compile import check_setting
from ddpm.data.folder import (
    open_image,
)
from ddpm.data.loaders import LOADERS
from ddpm.device import pick_device
from ddpm.files import (
    atomic_write,
    check_free_space,
    check_output_dir,
)
from ddpm.generate import Evaluations
from ddpm.likelihood import bpd_exact
from ddpm.metrics.fid import InceptionMetrics, check_count, measure
from ddpm.metrics.inception import has_classifier, inception_weights
from ddpm.metrics.reference import cached_reference, reference_subset, stats_key
from ddpm.module import DiffusionModule, load_module
from ddpm.samplers import (
    SAMPLERS,
    check_guidance,
    check_seed,
    check_steps,
    dry_run,
)
from ddpm.trusted import allow_targets

log = logging.getLogger(__name__)


def negative_log_likelihood(
    cfg: DictConfig,
    module: DiffusionModule,
    device: torch.device,
) -> dict:
    """The variational bound of every one of n held-out images over all T steps (T network
    calls per batch; `ddpm.likelihood.bpd_exact`), with the EMA weights of the source
    checkpoint's `module` (loaded by `check_inputs`)."""
    source = Path(cfg.source)
    if module.autoencoder is not None:
        raise ValueError(
            f"{source} is a latent DDPM: its bound is of latents, not of 256-level pixels, and "
            "not comparable in bits/dim; measure it with FID/KID (fid=true)"
        )
    images, labels, label = held_out_images(cfg)
    net = module.ema.module
    if images.shape[1:] != (net.in_channels, net.image_size, net.image_size):
        raise ValueError(
            f"{source} models {net.in_channels}x{net.image_size}x{net.image_size} images, the "
            f"dataset gives {tuple(images.shape[1:])}: evaluate on the data it was trained on"
        )
    T = module.schedule.num_timesteps
    batches = list(range(0, len(images), cfg.batch_size))
    generator = torch.Generator().manual_seed(cfg.seed)
    parts: dict[str, list[torch.Tensor]] = {"bpd": [], "prior": [], "decoder": []}
    with tqdm(total=len(batches) * T, unit="step", desc=f"nll {len(images)} images") as bar:
        for start in batches:
            x0 = images[start : start + cfg.batch_size].to(device).float() / 127.5 - 1
            y = None
            if module.num_classes and labels is not None:
                y = labels[start : start + cfg.batch_size].to(device)
            with torch.no_grad():
                out = bpd_exact(
                    module.denoiser(net, y),
                    module.schedule,
                    x0,
                    module.variance,
                    generator=generator,
                    progress=bar.update,
                )
            for key in parts:
                parts[key].append(out[key].cpu())
    bpd = torch.cat(parts["bpd"])
    result = {
        f"bpd_{label}": bpd.mean().item(),
        f"bpd_{label}_std_err": (bpd.std().item() / len(bpd) ** 0.5) if len(bpd) > 1 else None,
        f"bpd_{label}_prior": torch.cat(parts["prior"]).mean().item(),
        f"bpd_{label}_decoder": torch.cat(parts["decoder"]).mean().item(),
        "nll_variance": module.variance,
    }
    log.info(
        "NLL bound on %d images of %s: %.4f bits/dim (L_T %.2e, L_0 %.4f), variance %s",
        len(bpd),
        label,
        result[f"bpd_{label}"],
        result[f"bpd_{label}_prior"],
        result[f"bpd_{label}_decoder"],
        module.variance,
    )
    return result


def output_path(cfg: DictConfig) -> Path:
    """Where the JSON goes: out=, or beside the source (<source>.fid.json / .nll.json)."""
    return json_path(cfg.out, cfg.source, cfg.fid)


def json_path(out: str | None, source: str, fid: bool) -> Path:
    suffix = ".fid.json" if fid else ".nll.json"
    return Path(out) if out else Path(str(source).rstrip("/") + suffix)


def log_dir(out: str | None, source: str | None, fid: bool) -> str:
    """eval.py's Hydra run directory (its eval.log) goes beside the JSON, into eval_logs/:
    not into the directory eval.py happens to be started from. The ${ddpm_eval_logs:...}
    resolver of conf/eval.yaml."""
    if source is None and not out:  # source=??? (named by check_inputs): not the cwd either
        return str(Path(tempfile.gettempdir()) / "ddpm_eval_logs")
    return str(json_path(out, str(source), fid).absolute().parent / "eval_logs")


OmegaConf.register_new_resolver("ddpm_eval_logs", log_dir, replace=True)
# the result file, and the tables beside it: what must fit on out='s disk before the work
OUT_SPACE = 1 << 20


def check_inputs(cfg: DictConfig, device: torch.device) -> DiffusionModule | None:
    """Every option and file that can be checked without the Inception network or sampling:
    a bad one fails here, before minutes of work, with its name and the fix. Returns the
    source checkpoint's module, on `device` (the one load of it: the NLL and the sampling
    use it), or None for a source of images."""
    if OmegaConf.is_missing(cfg, "source"):
        raise ValueError(
            "source= is missing: give the images to measure (an .npz, a folder of images or "
            "a .ckpt to sample from), e.g. source=samples/q/samples.npz"
        )
    if not cfg.fid and not cfg.nll:
        raise ValueError("fid=false and nll=false leave nothing to measure; set one to true")
    check_seed(cfg.seed)
    check_guidance(cfg.guidance)
    check_setting(cfg.get("compile", "false"))
    least, why = (2, "FID needs at least 2 images per set") if cfg.fid else (1, "n must be >= 1")
    if not isinstance(cfg.n, int) or cfg.n < least:
        raise ValueError(
            f"n={cfg.n}: {why}, got {cfg.n}; give the number of source images to measure "
            "(papers: n=50000)"
        )
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(
            f"batch_size={cfg.batch_size}: give the images per forward pass, >= 1 "
            "(e.g. batch_size=100)"
        )
    out = output_path(cfg)
    if out.is_dir():
        raise IsADirectoryError(
            f"out={out} is a directory; give the JSON's file name, e.g. out={out / 'fid.json'}"
        )
    check_output_dir(out.parent, "out", out, fix="DIR/fid.json")
    check_free_space(out, "out", OUT_SPACE, fix="DIR/fid.json")
    source = Path(cfg.source)
    module = None
    if source.suffix == ".ckpt":
        module = load_module(source, map_location=device)
        if cfg.guidance and not module.num_classes:
            raise ValueError(
                f"guidance={cfg.guidance} needs a class-conditional model, and {source} is "
                "unconditional (trained with model.num_classes=null); drop guidance="
            )
        size = module.image_shape[-1]
        check_sampling_steps(cfg, module.schedule.num_timesteps)
        check_sampler_options(cfg, module)
    else:
        given = [k for k in ("steps", "guidance", "table") if cfg[k]]
        if given:
            raise ValueError(
                f"{', '.join(f'{k}={cfg[k]}' for k in given)} applies to checkpoint sources "
                f"(.ckpt), which eval.py samples from; source={source} holds images: drop it"
            )
        if cfg.nll:
            raise ValueError(f"nll=true needs source= to be a checkpoint (.ckpt), got {source}")
        if source.suffix == ".npz":
            size = npz_array(source).shape[2]
        elif source.is_dir():
            with open_image(image_files(source, cfg.n)[0]) as first:  # checked there
                size = first.width
        else:
            raise FileNotFoundError(f"source={source}: not an .npz, a folder of images or a .ckpt")
    if cfg.fid:
        check_reference_split(cfg)
        if size != cfg.dataset.image_size:
            raise ValueError(
                f"source images are {size} px, the reference {cfg.dataset.name} is "
                f"{cfg.dataset.image_size} px: compare at one resolution (dataset.image_size)"
            )
    return module


def check_sampling_steps(cfg: DictConfig, num_timesteps: int) -> None:
    """steps= (or the sampler group's) and every table entry's steps within the checkpoint's
    T: 0 would sample all T steps under the name of 0, a step count above T fail after the
    reference statistics' minutes."""
    from_group = cfg.steps is None and cfg.sampler.get("steps") is not None
    steps = cfg.steps if cfg.steps is not None else cfg.sampler.get("steps")
    check_steps(steps, num_timesteps, "sampler.steps" if from_group else "steps")
    for entry in cfg.table or []:
        _, steps = parse_entry(entry)
        if steps > num_timesteps:
            raise ValueError(
                f"table entry {entry!r} asks for {steps} steps, more than the checkpoint's "
                f"T={num_timesteps}; give steps in [1, {num_timesteps}]"
            )


def check_sampler_options(cfg: DictConfig, module: DiffusionModule) -> None:
    """The sampler's option values (and each table entry's sampler), by a dry run on one pixel
    (`ddpm.samplers.dry_run`): a wrong order or spacing fails now, not after the reference
    statistics. Each setting is the one `source_batches` will draw with (`checkpoint_sampler`)."""
    entries = [parse_entry(entry) for entry in cfg.table or []]
    for name, steps in [(None, None), *entries]:
        dry_run(checkpoint_sampler(cfg, name, steps), module.schedule, module.hparams.learn_sigma)


def check_reference_split(cfg: DictConfig) -> None:
    """reference_split must name a part of the dataset; a dataset that is one set (mnist5k,
    a folder) calls it train, the name its metrics carry."""
    loader = LOADERS.get(cfg.dataset.name)
    takes_split = loader is not None and "split" in inspect.signature(loader).parameters
    if not takes_split and cfg.reference_split != "train":
        raise ValueError(
            f"reference_split={cfg.reference_split!r}: dataset {cfg.dataset.name} has no "
            "splits (its images are one set, named train); use reference_split=train"
        )


def evaluate(cfg: DictConfig) -> dict:
    allow_targets(cfg.get("trusted_targets"))  # the user's own classes a checkpoint may name
    device = pick_device(cfg.device)
    module = check_inputs(cfg, device)  # a checkpoint source: loaded here, once
    result: dict = {"n": cfg.n, "source": str(cfg.source)}
    if cfg.nll:
        result.update(negative_log_likelihood(cfg, module, device))
    if cfg.fid:
        result.update(inception_metrics(cfg, module, device))
    out = output_path(cfg)
    print(json.dumps(result))  # first: a result that cannot be written is not lost
    try:
        atomic_write(out, lambda f: f.write(json.dumps(result, indent=1).encode()))
    except OSError as e:
        raise OSError(
            f"out={out}: the result is printed above, but could not be written ({e}); "
            "copy it from there, or free space and rerun with another out="
        ) from None
    return result


def inception_metrics(
    cfg: DictConfig, module: DiffusionModule | None, device: torch.device
) -> dict:
    """FID (and KID, IS) of the source's n images, or of a checkpoint's `module`'s samples
    per table= entry, against the reference split's cached statistics."""
    check_count(cfg.n, cfg.features)
    datamodule = hydra.utils.instantiate(cfg.dataset, split=cfg.reference_split)
    # the statistics are keyed by the images' content: they are read even on a cache hit
    try:
        images = datamodule.load().images
    except ValueError as e:  # the loader knows the splits, and names its own option
        if str(e).startswith("dataset.split="):
            raise ValueError(str(e).replace("dataset.split=", "reference_split=", 1)) from None
        raise
    reference = reference_subset(images, cfg.reference_n)
    check_count(len(reference), cfg.features)
    weights = inception_weights(cfg.weights, cfg.cache_dir)
    inception_score = cfg.inception_score
    if inception_score == "auto":
        inception_score = has_classifier(weights)
        if not inception_score:
            log.info("no Inception Score: %s has no classifier layer", weights)
    metrics = InceptionMetrics(
        weights, device, cfg.features, kid=cfg.kid, inception_score=bool(inception_score)
    )
    key = stats_key(
        datamodule.name, cfg.reference_split, reference, weights, cfg.features, cfg.cache_dir
    )
    cache = cached_reference(metrics, key, lambda: reference.split(cfg.batch_size), cfg.cache_dir)
    log.info("reference statistics: %s", cache)

    entries = [parse_entry(e) for e in cfg.table] if cfg.table else [(None, None)]
    result: dict = {"reference": key, "features": cfg.features}
    rows = []
    for entry_name, entry_steps in entries:
        channels = int(reference.shape[1])
        tally = Evaluations()  # a checkpoint source's network evaluations, counted
        batches, sampler = source_batches(
            cfg,
            module,
            channels,
            entry_name,
            entry_steps,
            compile=cfg.get("compile", "false"),
            evaluations=tally,
        )

        def checked(batches: Iterator[torch.Tensor], bar: tqdm) -> Iterator[torch.Tensor]:
            for batch in batches:
                if batch.shape[-1] != datamodule.image_size:
                    raise ValueError(
                        f"source images are {batch.shape[-1]} px, the reference {datamodule.name} "
                        f"is {datamodule.image_size} px: compare at one resolution "
                        "(dataset.image_size)"
                    )
                yield batch
                bar.update(len(batch))

        with tqdm(total=cfg.n, unit="img", desc=f"metrics {sampler or ''}") as bar:
            values = measure(metrics, checked(batches, bar), cfg.n, cfg.reference_split, sampler)
        result.update(values)
        if tally.images:  # sampled here: what each image cost in network evaluations
            key = f"nfe_per_image_{sampler}" if cfg.table else "nfe_per_image"
            result[key] = tally.per_image
            log.info("%s: %g network evaluations per image", sampler, tally.per_image)
        rows.append((entry_name, entry_steps, values, tally.per_image))
    if cfg.table:
        out = output_path(cfg)
        try:
            write_table(rows, out.with_suffix(""), cfg.n, cfg.reference_split)
        except OSError as e:  # the minutes of sampling are not lost with the table
            print(json.dumps(result))
            raise OSError(
                f"the table beside out={out} could not be written ({e}); the results are "
                "printed above"
            ) from None
    return result


def parse_entry(entry: str) -> tuple[str, int]:
    """'ddim:50' -> ('ddim', 50)."""
    name, _, steps = str(entry).partition(":")
    if not steps.isdigit():
        raise ValueError(f"table entries are sampler:steps, e.g. ddim:50; got {entry!r}")
    if int(steps) < 1:  # 0 would sample all T steps and report them as 0
        raise ValueError(
            f"table entry {entry!r} asks for {int(steps)} steps: give sampler:steps with steps "
            ">= 1, e.g. ddim:50"
        )
    if name not in SAMPLERS:  # found now, not after the reference statistics
        raise ValueError(
            f"table entry {entry!r} names no sampler: {name!r} is not one of {sorted(SAMPLERS)}"
        )
    return name, int(steps)


def by_kind(values: dict[str, float]) -> dict[str, float]:
    """{'fid50k_train_ddim10': 4.1, 'kid..._std': ...} -> {'fid': 4.1, 'kid_std': ...}."""
    out = {}
    for name, value in values.items():
        kind = next(k for k in ("fid", "kid", "is") if name.startswith(k))
        out[kind + ("_std" if name.endswith("_std") else "")] = value
    return out


def write_table(rows: list, stem: Path, n: int, split: str) -> None:
    """FID (and KID, IS when measured) and network evaluations per image per (sampler, steps)
    as Markdown (also printed) and CSV, like Table 1 of the DDIM paper, and FID against NFE per
    sampler as <stem>.fid_vs_nfe.png. Each written atomically: a full disk names the file."""
    table = [(name, steps, by_kind(values), nfe) for name, steps, values, nfe in rows]
    kinds = [k for k in ("fid", "kid", "is") if k in table[0][2]]
    heads = {"fid": f"FID ({n} samples vs {split})", "kid": "KID ×10³", "is": "IS"}
    lines = ["| sampler | steps | NFE / image | " + " | ".join(heads[k] for k in kinds) + " |"]
    lines.append("|---|---|---|" + "---|" * len(kinds))
    columns = kinds + [f"{k}_std" for k in kinds[1:]]
    text = io.StringIO()
    rows_csv = csv.writer(text, lineterminator="\n")
    rows_csv.writerow(["sampler", "steps", "nfe_per_image", *columns])
    for name, steps, v, nfe in table:
        cells = [f"{nfe:g}", f"{v['fid']:.2f}"]
        if "kid" in v:
            cells.append(f"{1e3 * v['kid']:.2f} ± {1e3 * v['kid_std']:.2f}")
        if "is" in v:
            cells.append(f"{v['is']:.2f} ± {v['is_std']:.2f}")
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
        rows_csv.writerow([name, steps, f"{nfe:g}", *(f"{v[c]:.6f}" for c in columns)])
    atomic_write(Path(f"{stem}.table.csv"), lambda f: f.write(text.getvalue().encode()))
    markdown = "\n".join(lines) + "\n"
    atomic_write(Path(f"{stem}.table.md"), lambda f: f.write(markdown.encode()))
    print(markdown)
    figure = fid_vs_nfe([(name, nfe, v["fid"]) for name, _, v, nfe in table], n, split)
    atomic_write(Path(f"{stem}.fid_vs_nfe.png"), lambda f: figure.savefig(f, format="png"))


def fid_vs_nfe(points: list[tuple[str, float, float]], n: int, split: str) -> Figure:
    """FID against network evaluations per image, one line per sampler (its table entries in
    order of NFE), NFE on a log axis. FID only: the digits' readability (bench/readability.py)
    needs its classifier from bench/, which the package does not import."""
    figure = Figure(figsize=(6, 4), dpi=100)  # no pyplot: no backend state, Agg when saved
    ax = figure.subplots()
    for name in dict.fromkeys(name for name, _, _ in points):  # in the table's order
        line = sorted((nfe, fid) for other, nfe, fid in points if other == name)
        ax.plot(*zip(*line, strict=True), marker="o", label=name)
    ax.set(xscale="log", xlabel="network evaluations per image (NFE)")
    ax.set(ylabel=f"FID ({n} samples vs {split})", title="FID against NFE")
    ax.legend()
    figure.tight_layout()
    return figure
