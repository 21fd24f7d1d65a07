"""What `eval.py` does: FID, KID and Inception Score of generated images (an .npz, a folder of
PNGs, or a checkpoint sampled on the fly) against cached statistics of a dataset split, and
with nll=true a checkpoint's negative log-likelihood bound in bits/dim on held-out images."""

from __future__ import annotations

import csv
import inspect
import io
import json
import logging
import math
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import hydra
import numpy as np
import numpy.lib.format as npy
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from ddpm.datasets import LOADERS
from ddpm.device import pick_device
from ddpm.files import (
    atomic_write,
    check_free_space,
    check_output_dir,
    check_regular,
    read_regular,
)
from ddpm.folder import (
    DEFLATE_MAX_RATIO,
    IMAGE_SUFFIXES,
    MAX_IMAGE_BYTES,
    ImageTooLarge,
    convert,
    open_image,
)
from ddpm.generate import generate
from ddpm.inception import has_classifier, inception_weights
from ddpm.likelihood import bpd_exact
from ddpm.metrics import InceptionMetrics, check_count, measure
from ddpm.module import load_module
from ddpm.reference import cached_reference, reference_subset, stats_key
from ddpm.render import IMAGE_NAME, SETTINGS, to_uint8
from ddpm.samplers import (
    SAMPLERS,
    check_guidance,
    check_seed,
    check_steps,
    sampler_label,
    sampler_settings,
)
from ddpm.trusted import allow_targets

log = logging.getLogger(__name__)


def read_image(path: Path, channels: int) -> np.ndarray:
    """An image file as uint8 (H, W) for channels=1 or (H, W, 3), converted as the reference
    images of an image-folder dataset are (`ddpm.folder.convert`). Read with the bounds of a
    training folder's images: a regular file of at most MAX_IMAGE_BYTES, MAX_PIXELS."""
    data = read_regular(path, MAX_IMAGE_BYTES, "source")  # a FIFO swapped in cannot block
    try:
        with open_image(data) as img:
            return np.asarray(convert(img, "L" if channels == 1 else "RGB"))
    except ImageTooLarge as e:
        raise ValueError(f"source: {path}: {e}") from None


def npz_array(path: Path) -> np.ndarray:
    """An .npz's arr_0 as uint8 (N, H, W, C), checked: (N, H, W) grayscale gets C = 1, and
    (N, C, H, W) (PyTorch's layout, C = 1 or 3 and W not) is transposed."""
    check_regular(path, "source")  # np.load would wait forever on a FIFO
    try:
        archive = np.load(path)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"source={path} is not a readable .npz ({type(e).__name__}: {e}); write it with "
            "np.savez(path, arr_0=images)"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            f"source={path} holds one bare array (.npy), not an .npz archive; write it with "
            "np.savez(path, arr_0=images)"
        )
    with archive:
        if "arr_0" not in archive.files:
            raise ValueError(
                f"source={path} has no arr_0 (it holds {', '.join(archive.files) or 'nothing'}); "
                "eval.py reads the images from arr_0, as OpenAI's and EDM's evaluators do: "
                "np.savez(path, arr_0=images)"
            )
        check_declared_size(archive, path)
        try:
            array = archive["arr_0"]
        except ValueError as e:  # an object array, which would need pickle
            raise ValueError(f"source={path}: arr_0 is not a plain array ({e})") from None
    if array.ndim == 4 and array.shape[1] in (1, 3) and array.shape[-1] not in (1, 3):
        log.info("%s: arr_0 is (N, C, H, W) %s; read as (N, H, W, C)", path, array.shape)
        array = array.transpose(0, 2, 3, 1)
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or array.dtype != np.uint8:
        raise ValueError(
            f"source={path}: arr_0 is {array.dtype} {array.shape}; expected uint8 images "
            "(N, H, W, C) with C = 1 or 3, (N, C, H, W) or (N, H, W)"
        )
    return array


def check_declared_size(archive: np.lib.npyio.NpzFile, path: Path) -> None:
    """Refuse an arr_0 whose header declares more bytes than the archive holds of it, before
    numpy allocates them all (a few bytes declaring terabytes is a MemoryError traceback)."""
    names = archive.zip.namelist()
    info = archive.zip.getinfo("arr_0.npy" if "arr_0.npy" in names else "arr_0")
    readers = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}
    try:
        with archive.zip.open(info) as member:
            read = readers.get(npy.read_magic(member))
            if read is None:  # a later format version: numpy checks it itself
                return
            shape, _, dtype = read(member)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"source={path}: arr_0 is unreadable ({e})") from None
    declared = math.prod(shape) * dtype.itemsize
    holds = info.file_size  # and a deflated member, at most what deflate's best ratio gives
    if info.compress_type == zipfile.ZIP_DEFLATED:
        holds = min(holds, DEFLATE_MAX_RATIO * info.compress_size + 2**10)
    if declared > holds:
        raise ValueError(
            f"source={path}: arr_0 declares {dtype} {shape} ({declared / 2**30:.1f} GiB), but "
            f"the archive holds at most {holds} bytes of it: a truncated or crafted file; "
            "write it again with np.savez(path, arr_0=images)"
        )


def npz_images(path: Path, n: int, channels: int = 3) -> torch.Tensor:
    """The first n images of an .npz's arr_0 as (n, C, H, W) uint8: (N, H, W, C) as OpenAI's and
    EDM's evaluators store them, (N, C, H, W), or (N, H, W) grayscale (`npz_array`). RGB images
    compared with a grayscale reference are converted as image files are (PIL's "L");
    grayscale ones are repeated to RGB by the metrics, which is PIL's "RGB" of them."""
    array = npz_array(path)
    if len(array) < n:
        raise ValueError(f"source={path} holds {len(array)} images, fewer than n={n}; lower n")
    array = array[:n]
    if channels == 1 and array.shape[-1] == 3:
        array = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in array])[..., None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def source_folder(source: Path) -> Path:
    """The folder of images to measure: sample.py's output folder means its images/ (one PNG
    per image), not its grid.png, text.png or noise-level figure."""
    if (source / SETTINGS).is_file() or (
        (source / "grid.png").is_file() and (source / "images").is_dir()
    ):
        log.info(
            "source=%s is a sample.py output folder: measuring its images/, not grid.png", source
        )
        return source / "images"
    return source


def image_files(source: Path, n: int) -> list[Path]:
    """The first n image files of a folder (sorted, subfolders included), all of one size."""
    folder = source_folder(source)
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if folder != source:
        found = [p for p in found if IMAGE_NAME.fullmatch(p.name)]
    if len(found) < n:
        raise ValueError(
            f"source={folder} holds {len(found)} image files "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}), fewer than n={n}; lower n or add images"
        )
    files = found[:n]
    sizes: dict[tuple[int, int], Path] = {}
    for path in files:  # PIL reads the size from the header, not the pixels
        check_regular(path, "source")  # a FIFO would block PIL's open
        try:
            with open_image(path) as img:
                sizes.setdefault(img.size, path)
        except ImageTooLarge as e:
            raise ValueError(f"source: {path}: {e}") from None
        except (OSError, SyntaxError) as e:
            raise ValueError(f"source: cannot read {path} ({e}); remove or replace it") from None
    if len(sizes) > 1:
        (a, first), (b, other) = list(sizes.items())[:2]
        raise ValueError(
            f"source={folder} holds images of different sizes ({first.name} is {a[0]}x{a[1]}, "
            f"{other.name} {b[0]}x{b[1]}): FID compares images of one size; resize them all "
            "to the reference's size, or give a folder of one size"
        )
    lossy = [p for p in files if p.suffix.lower() in (".jpg", ".jpeg")]
    if lossy:
        log.warning(
            "source: %d of %d images are JPEGs, whose compression artefacts raise FID; "
            "papers measure lossless images (PNG or an .npz)",
            len(lossy),
            len(files),
        )
    return files


def source_batches(
    cfg: DictConfig,
    device: torch.device,
    channels: int,
    name: str | None = None,
    steps: int | None = None,
) -> tuple[Iterator[torch.Tensor], str | None]:
    """uint8 (B, C, H, W) batches of the first n images of the source, and the sampler's label.

    Image files are read with the reference's `channels`. For a checkpoint, `name` and `steps`
    override the sampler config (the options of cfg.sampler apply when it is the same sampler;
    another one runs with its defaults).
    """
    source = Path(cfg.source)
    if source.suffix == ".npz":
        return iter(npz_images(source, cfg.n, channels).split(cfg.batch_size)), None
    if source.is_dir():
        files = image_files(source, cfg.n)

        def read() -> Iterator[torch.Tensor]:
            for i in range(0, len(files), cfg.batch_size):
                arrays = [read_image(f, channels) for f in files[i : i + cfg.batch_size]]
                batch = torch.from_numpy(np.stack(arrays))
                yield batch[:, None] if batch.ndim == 3 else batch.permute(0, 3, 1, 2)

        return read(), None
    if source.suffix == ".ckpt":
        module = load_module(source, map_location=device)
        sampler = sampler_settings(OmegaConf.to_container(cfg.sampler, resolve=True), cfg.steps)
        if name is not None and name != sampler["sampler"]:
            sampler = {"sampler": name, "steps": None}  # another sampler: its own defaults
        if steps is not None:
            sampler["steps"] = steps
        batches = generate(
            module,
            cfg.n,
            sampler=sampler,
            seed=cfg.seed,
            guidance=cfg.guidance if module.num_classes else 0.0,
            batch_size=cfg.batch_size,
            progress=False,  # the metrics' bar counts these images
        )
        label = sampler_label(sampler, module.schedule.num_timesteps)
        return (to_uint8(images) for _, images in batches), label
    raise FileNotFoundError(f"source={source}: not an .npz, a folder of images or a .ckpt")


def held_out_images(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """The first n images (uint8) and labels of `nll_split`: "val" is the part of the dataset
    training held out (the datamodule's validation split), anything else a split of the
    source (e.g. CIFAR-10's test set, as DDPM's Table 2 reports)."""
    datamodule = hydra.utils.instantiate(cfg.dataset)
    if cfg.nll_split == "val":
        datamodule.setup("fit")
        images, labels = datamodule.val_set.images, datamodule.val_set.labels
    else:
        data = datamodule.load(cfg.nll_split)
        images, labels = data.images, data.labels
    if len(images) < cfg.n:
        raise ValueError(
            f"nll_split={cfg.nll_split} of {datamodule.name} holds {len(images)} images, fewer "
            f"than n={cfg.n}; lower n"
        )
    label = f"{datamodule.name}_{cfg.nll_split}"
    return images[: cfg.n], None if labels is None else labels[: cfg.n], label


def negative_log_likelihood(cfg: DictConfig, device: torch.device) -> dict:
    """The variational bound of every one of n held-out images over all T steps (T network
    calls per batch; `ddpm.likelihood.bpd_exact`), with the checkpoint's EMA weights."""
    source = Path(cfg.source)
    if source.suffix != ".ckpt":
        raise ValueError(f"nll=true needs source= to be a checkpoint (.ckpt), got {source}")
    module = load_module(source, map_location=device)
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
                    module.model_out(net, y),
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


def check_inputs(cfg: DictConfig) -> None:
    """Every option and file that can be checked without the Inception network or sampling:
    a bad one fails here, before minutes of work, with its name and the fix."""
    if OmegaConf.is_missing(cfg, "source"):
        raise ValueError(
            "source= is missing: give the images to measure (an .npz, a folder of images or "
            "a .ckpt to sample from), e.g. source=samples/q/samples.npz"
        )
    if not cfg.fid and not cfg.nll:
        raise ValueError("fid=false and nll=false leave nothing to measure; set one to true")
    check_seed(cfg.seed)
    check_guidance(cfg.guidance)
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
    if source.suffix == ".ckpt":
        module = load_module(source, map_location="cpu")
        if cfg.guidance and not module.num_classes:
            raise ValueError(
                f"guidance={cfg.guidance} needs a class-conditional model, and {source} is "
                "unconditional (trained with model.num_classes=null); drop guidance="
            )
        size = module.image_shape[-1]
        check_sampling_steps(cfg, module.schedule.num_timesteps)
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
    check_inputs(cfg)
    result: dict = {"n": cfg.n, "source": str(cfg.source)}
    if cfg.nll:
        result.update(negative_log_likelihood(cfg, device))
    if cfg.fid:
        result.update(inception_metrics(cfg, device))
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


def inception_metrics(cfg: DictConfig, device: torch.device) -> dict:
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
        batches, sampler = source_batches(cfg, device, channels, entry_name, entry_steps)

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
        rows.append((entry_name, entry_steps, values))
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
    """FID (and KID, IS when measured) per (sampler, steps) as Markdown and CSV, like Table 1
    of the DDIM paper. Both written atomically: a full disk names the file."""
    table = [(name, steps, by_kind(values)) for name, steps, values in rows]
    kinds = [k for k in ("fid", "kid", "is") if k in table[0][2]]
    heads = {"fid": f"FID ({n} samples vs {split})", "kid": "KID ×10³", "is": "IS"}
    lines = ["| sampler | steps | " + " | ".join(heads[k] for k in kinds) + " |"]
    lines.append("|---|---|" + "---|" * len(kinds))
    columns = kinds + [f"{k}_std" for k in kinds[1:]]
    text = io.StringIO()
    rows_csv = csv.writer(text, lineterminator="\n")
    rows_csv.writerow(["sampler", "steps", *columns])
    for name, steps, v in table:
        cells = [f"{v['fid']:.2f}"]
        if "kid" in v:
            cells.append(f"{1e3 * v['kid']:.2f} ± {1e3 * v['kid_std']:.2f}")
        if "is" in v:
            cells.append(f"{v['is']:.2f} ± {v['is_std']:.2f}")
        lines.append(f"| {name} | {steps} | " + " | ".join(cells) + " |")
        rows_csv.writerow([name, steps, *(f"{v[c]:.6f}" for c in columns)])
    atomic_write(Path(f"{stem}.table.csv"), lambda f: f.write(text.getvalue().encode()))
    markdown = "\n".join(lines) + "\n"
    atomic_write(Path(f"{stem}.table.md"), lambda f: f.write(markdown.encode()))
