"""Resuming a run: which checkpoint to continue from (`resume_from`), and whether it may be
continued here: the same network (`check_same_network`), the same noise schedule, objective,
optimizer, LR schedule and data (`check_same_process`, refused unless resume_changes=allow,
then `ApplyOptimizerSettings` makes the new settings real), not another run's directory. A run
whose checkpoint has nothing left to train keeps its results (`finished_run`; metrics.json is
merged, never replaced by a part that logged less: `write_metrics`).

Lightning does the resuming itself (model, EMA, optimizer, LR schedule, counters, callbacks and,
through `ResumableLoader`, the data position); this is what it does not check."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ddpm import unet
from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.files import atomic_write, read_json
from ddpm.moved import canonical
from ddpm.run.checkpoints import checkpoint_files, checkpoint_step, find_checkpoint

log = logging.getLogger(__name__)

NOT_COMPARED: Any = "<not compared>"  # a setting a check leaves out / a checkpoint lacks

# what a run writes into its directory (Hydra's own .hydra/ and log come before the run starts)
RUN_OUTPUTS = (
    "checkpoints",
    "run.json",
    "metrics.json",
    "loss_curve.png",
    "samples",
    "config.yaml",
)


def check_not_another_run(path: Path, out: Path) -> None:
    """resume=PATH of a checkpoint from elsewhere into a run directory that already holds a
    run: continuing would overwrite that run's results (metrics.json, loss_curve.png,
    samples/final.png, run.json) with those of another. A checkpoint inside `out` continues
    that run from an earlier step; a new directory starts a branch from the file."""
    out, path = out.resolve(), path.resolve()
    if out in path.parents:
        return
    held = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not held:
        return
    origin = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    raise CheckpointError(
        f"resume={path} is not a checkpoint of the run in {out}, which holds another run "
        f"({', '.join(held)}) that this one would overwrite. To continue the checkpoint's run: "
        f"hydra.run.dir={origin}; to continue the run in {out}: resume=auto; to start from the "
        "checkpoint in a directory of its own: a new hydra.run.dir (or copy the checkpoint "
        f"into {out / 'checkpoints'} to continue from it there)"
    )


def check_same_process(
    path: Path,
    ckpt: dict[str, Any],
    schedule: dict | None,
    objective: str | None,
    allow: bool,
    *,
    optimizer: Any = NOT_COMPARED,
    lr_scheduler: Any = NOT_COMPARED,
    dataset: Any = NOT_COMPARED,
    training: dict[str, Any] | None = None,
) -> list[str]:
    """A resume with another noise schedule (T, type, βs) or objective would go on training
    the weights for another task, and one with another dataset on other data; another
    optimizer or learning-rate schedule would be silently overruled by the checkpoint's
    (Lightning restores their state, settings included, while run.json records the new ones).
    Each change is named and refused unless `resume_changes=allow` (then a warning, and the
    caller applies the new optimizer settings: `ApplyOptimizerSettings`). The checkpoint's own
    values are in its hyper_parameters (and `dataset`, `RecordDataset`); returns the changed
    keys. A schedule of None, or a setting left NOT_COMPARED, is not compared (an autoencoder
    has no schedule; a checkpoint from before a setting was kept has no record of it)."""
    saved = ckpt.get("hyper_parameters") or {}
    changes = []
    if schedule is not None:
        changes += _changes("schedule", saved.get("schedule", NOT_COMPARED), schedule)
    if objective is not None and "objective" in saved and saved["objective"] != objective:
        changes.append(("module.objective", repr(saved["objective"]), repr(objective)))
    # the loss (mse | l1 | vlb) and the draw of t: another training objective, like `objective`
    for key, new in (training or {}).items():
        if key in saved and saved[key] != new:
            changes.append((f"module.{key}", repr(saved[key]), repr(new)))
    changes += _changes("module.optimizer", saved.get("optimizer", NOT_COMPARED), optimizer)
    old = saved.get("lr_scheduler", NOT_COMPARED)
    changes += _changes("module.lr_scheduler", old, lr_scheduler)
    changes += _changes("dataset", _current(ckpt.get("dataset", NOT_COMPARED)), _current(dataset))
    if not changes:
        return []
    listed = ", ".join(f"{key}={old} (this run: {new})" for key, old, new in changes)
    if allow:
        log.warning("resume_changes=allow: resuming %s with changed settings: %s", path, listed)
        return [key for key, _, _ in changes]
    raise CheckpointError(
        f"{path} was trained with {listed}. Resume with the checkpoint's values, or set "
        "resume_changes=allow to go on training it with the new ones (or start a new run: a "
        "new hydra.run.dir)"
    )


def _changes(prefix: str, old: Any, new: Any) -> list[tuple[str, str, str]]:
    """(key, old, new) for each setting of a config node that differs; another class
    (`_target_`, whose options differ too) is one change named by the group; nothing when the
    checkpoint has no record of it (saved before it was kept); None is "none" (constant LR)."""
    if NOT_COMPARED in (old, new) or old == new:
        return []
    if not isinstance(old, dict) or not isinstance(new, dict):
        return [(prefix, repr(old), repr(new))]
    kinds = [str(c.get("_target_", "")).rsplit(".", 1)[-1] for c in (old, new)]
    if kinds[0] != kinds[1]:
        return [(prefix, *kinds)]
    return [
        (f"{prefix}.{key}", repr(old.get(key)), repr(new.get(key)))
        for key in sorted(set(old) | set(new))
        if _plain(old.get(key)) != _plain(new.get(key))
    ]


def _current(node: Any) -> Any:
    """A config node with its `_target_` by today's name (a checkpoint from before the
    regrouping records `ddpm.data.ImageDataModule`, today's config names
    `ddpm.data.datamodule.ImageDataModule`: one class)."""
    if isinstance(node, dict) and "_target_" in node:
        return {**node, "_target_": canonical(node["_target_"])}
    return node


def _plain(value: Any) -> Any:
    """Lists and tuples alike (YAML gives lists, a saved config may hold tuples)."""
    return list(value) if isinstance(value, tuple | list) else value


class RecordDataset(L.Callback):
    """Keeps what identifies the training data (`dataset` in every checkpoint), so that a
    resume onto other data is named by `check_same_process`."""

    def __init__(self, dataset: dict[str, Any]) -> None:
        self.dataset = dataset

    def on_save_checkpoint(self, trainer: L.Trainer, module: Any, checkpoint: dict) -> None:
        checkpoint["dataset"] = self.dataset


class ApplyOptimizerSettings(L.Callback):
    """resume_changes=allow with another optimizer or LR schedule: Lightning restores the
    checkpoint's optimizer and scheduler state, settings included, so the new learning rate
    would be silently ignored. Right after that restore (on_train_start), every optimizer
    setting and the scheduler's state become those a run with the new settings would have at
    this step (a fresh scheduler stepped as often), keeping the optimizer's moments."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import warnings

        from lightning.pytorch.core.optimizer import _configure_optimizers

        fresh, schedulers, _ = _configure_optimizers(pl_module.configure_optimizers())
        for live, new in zip(trainer.lr_scheduler_configs, schedulers, strict=False):
            scheduler = new["scheduler"] if isinstance(new, dict) else new
            # the run's optimizer steps (the scheduler steps once each): a restored scheduler's
            # own count would be 0 where the checkpoint had none of this kind
            steps = trainer.global_step
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()"
                warnings.simplefilter("ignore")
                for _ in range(steps - int(getattr(scheduler, "last_epoch", 0))):
                    scheduler.step()  # sets the fresh optimizer's lr as it goes
            live.scheduler.load_state_dict(scheduler.state_dict())
        for live, new in zip(trainer.optimizers, fresh, strict=False):
            for group, new_group in zip(live.param_groups, new.param_groups, strict=False):
                group.update({k: v for k, v in new_group.items() if k != "params"})
        rates = [g["lr"] for o in trainer.optimizers for g in o.param_groups]
        log.info("resume_changes=allow: the new optimizer settings apply (lr now %s)", rates)


def _architecture(net: dict) -> dict:
    """A UNet config as the network it builds: attention by the sizes it reaches, whichever
    key chose them (attn_resolutions [7] and attn_levels [-1] are one network at 28 px, and a
    size that is no level's builds nothing); an ADM config without use_checkpoint. Other
    configs as they are."""
    if isinstance(net, dict) and net.get("_target_") == "ddpm.adm.ADM":
        # activation checkpointing trades memory for compute: the same network either way
        return {k: v for k, v in net.items() if k != "use_checkpoint"}
    if not isinstance(net, dict) or net.get("_target_") != "ddpm.unet.UNet":
        return net
    try:
        size, mult = net.get("image_size", 32), net.get("ch_mult", (1, 2, 2, 2))
        sizes = unet.attention_sizes(
            size, mult, net.get("attn_resolutions", (16,)), net.get("attn_levels")
        )
        levels = {size // 2**k for k in range(len(mult))}
    except (TypeError, ValueError):  # not a valid config: compared as written
        return net
    rest = {k: v for k, v in net.items() if k not in ("attn_resolutions", "attn_levels")}
    return {**rest, "attention": sorted(sizes & levels)}


def check_same_network(path: Path, ckpt: dict[str, Any], net: dict) -> None:
    """A checkpoint of another architecture, named with what differs (Lightning would fail
    later with a long list of mismatched tensor shapes)."""
    saved = (ckpt.get("hyper_parameters") or {}).get("net")
    if saved is None or saved == net or _architecture(saved) == _architecture(net):
        return
    was, now = _architecture(saved), _architecture(net)
    if "attention" in was and {k: v for k, v in was.items() if k != "attention"} == {
        k: v for k, v in now.items() if k != "attention"
    }:  # the same network but where it attends: say which override rebuilds the checkpoint's
        raise CheckpointError(
            f"{path} was trained with attention at {was['attention']} px, this run's network "
            f"attends at {now['attention']} px. Resume with model.attn_resolutions="
            f"{was['attention']} model.attn_levels=[] (the checkpoint's), or start a new run "
            "directory (hydra.run.dir=DIR)"
        )
    diff = ", ".join(
        f"{k} {saved.get(k)!r} (this run's {net.get(k)!r})"
        for k in sorted(set(saved) | set(net))
        if saved.get(k) != net.get(k)
    )
    raise CheckpointError(
        f"{path} was trained with another network: {diff}. Resume with the same model "
        "settings (model.<key>=<value>), or start a new run directory (hydra.run.dir=DIR)"
    )


def check_resume(cfg: DictConfig, out: Path) -> tuple[Path | None, bool, dict | None]:
    """(checkpoint to resume from, whether changed optimizer settings are to be applied, the
    saved metrics of a run that has nothing left to train, else None), from the checkpoint
    alone: nothing is built or written."""
    found = resume_from(resume_setting(cfg), out)
    if found is None:
        return None, False, None
    ckpt_path, ckpt = found
    check_same_network(ckpt_path, ckpt, OmegaConf.to_container(cfg.module.net, resolve=True))
    module = OmegaConf.to_container(cfg.module, resolve=True)
    diffusion = "schedule" in module  # a diffusion model (not an autoencoder)
    # A changed learning rate (or optimizer, or LR schedule) is refused like a changed noise
    # schedule rather than silently applied: a rerun of a sweep with edited defaults must not
    # quietly mix two settings in one run; resume_changes=allow then applies it for real
    # (Lightning would otherwise restore the checkpoint's, while run.json records the new one).
    changed = check_same_process(
        ckpt_path,
        ckpt,
        module["schedule"] if diffusion else None,
        module.get("objective") if diffusion else None,
        cfg.get("resume_changes", "refuse") == "allow",
        optimizer=module.get("optimizer", NOT_COMPARED),
        lr_scheduler=module.get("lr_scheduler", NOT_COMPARED),
        dataset=dataset_identity(cfg.dataset),
        training={k: module[k] for k in ("loss", "timestep_sampler") if k in module}
        if diffusion
        else None,
    )
    apply = any(key.startswith(("module.optimizer", "module.lr_scheduler")) for key in changed)
    # after the checks: a changed setting is named even when there is nothing left to train
    step = finished_step(ckpt, cfg.trainer)
    if step is not None:
        return ckpt_path, False, finished_run(out, ckpt_path, step, cfg.trainer)
    return ckpt_path, apply, None


# what tells one training set from another; batch size, workers, flips and where a named
# dataset is stored (data_dir, moved between machines) do not
DATASET_KEYS = ("_target_", "name", "image_size", "channels", "num_classes", "val_fraction")


def dataset_identity(dataset: DictConfig) -> dict[str, Any]:
    """The dataset settings a resume must keep (`RecordDataset` saves them in checkpoints); a
    folder or zip dataset is its data_dir."""
    node = OmegaConf.to_container(dataset, resolve=True)
    identity = {key: node[key] for key in DATASET_KEYS if key in node}
    if node.get("name") == "folder" and node.get("data_dir"):
        identity["data_dir"] = str(Path(str(node["data_dir"])).expanduser().absolute())
    return identity


def finished_step(ckpt: dict[str, Any], trainer: DictConfig) -> int | None:
    """The checkpoint's step when it leaves nothing to train under these trainer settings
    (trainer.max_steps reached, or trainer.max_epochs: either ends a run), else None. Fitting
    from it would train no step and then overwrite the run's final metrics, grids and curve
    with those of no training."""
    step = ckpt.get("global_step")
    if not isinstance(step, int):
        return None
    return step if _limit_reached(ckpt, trainer) else None


def _limit_reached(ckpt: dict[str, Any], trainer: DictConfig) -> str | None:
    """Which of trainer.max_steps / max_epochs the checkpoint has reached (as Lightning's fit
    loop counts them: global_step, the epochs processed), or None."""
    max_steps = trainer.get("max_steps", -1)
    if isinstance(max_steps, int) and 0 < max_steps <= ckpt.get("global_step", 0):
        return "trainer.max_steps"
    max_epochs = trainer.get("max_epochs")
    progress = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_progress") or {}
    epochs = (progress.get("current") or {}).get("processed")
    if isinstance(max_epochs, int) and max_epochs >= 0 and isinstance(epochs, int):
        return "trainer.max_epochs" if epochs >= max_epochs else None
    return None


def finished_run(out: Path, ckpt_path: Path, step: int, trainer: DictConfig) -> dict[str, Any]:
    """Say that the run has nothing left to train, and return its saved final metrics."""
    path = out / "metrics.json"
    saved = read_metrics(path)
    key = _limit_reached({"global_step": step}, trainer) or "trainer.max_epochs"
    value = trainer.get(key.split(".")[1])
    kept = f"its results in {out} are kept" if saved else f"it has no {path.name} (stopped first)"
    log.info(
        "this run already finished at step %d (%s, %s=%s): nothing trained, nothing changed; "
        "%s. To train it further, rerun with a higher %s",
        *(step, ckpt_path.name, key, value, kept, key),
    )
    return {k: math.nan if v is None else float(v) for k, v in saved.items() if k != "step"}


def read_metrics(path: Path) -> dict[str, Any]:
    """A run's metrics.json ({} when missing; unreadable: a warning and {})."""
    if not path.is_file():
        return {}
    try:
        return read_json(path)
    except ValueError as e:
        log.warning("%s", e)
        return {}


def write_metrics(path: Path, step: int, metrics: dict[str, float]) -> dict[str, float]:
    """metrics.json: this part's final metrics over the earlier parts' (a resumed run that logs
    fewer, e.g. without test=true or FID this time, keeps the earlier values), written
    atomically (a kill mid-write leaves the old file); returns the merged metrics."""
    earlier = read_metrics(path)
    # valid JSON: a diverged metric is null, not NaN (which JSON does not have)
    finite = {k: v if math.isfinite(v) else None for k, v in metrics.items()}
    merged = {k: v for k, v in {**earlier, **finite}.items() if k != "step"}
    text = json.dumps({"step": step, **merged}, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return {k: math.nan if v is None else float(v) for k, v in merged.items()}


def resume_setting(cfg: DictConfig) -> Any:
    """`resume`, or `ckpt_path` (lightning-hydra-template's name for resume=PATH)."""
    path = cfg.get("ckpt_path")
    if path is None:
        return cfg.resume
    if str(cfg.resume) not in ("auto", str(path)):
        raise ValueError(
            f"ckpt_path={path} and resume={cfg.resume} both say where to start from: give one "
            "(ckpt_path=PATH is resume=PATH)"
        )
    return path


def resume_from(resume: str | None, out: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to continue from, and its contents: resume=auto the newest one of this
    run directory that loads (none: a fresh start), resume=PATH that file, resume=null none
    (refused when the directory already holds checkpoints, which a fresh run would overwrite)."""
    existing = checkpoint_files(out, report=False)  # find_checkpoint reports
    if resume is None or str(resume).lower() in ("null", "none", "never", "false"):
        if existing:
            raise FileExistsError(
                f"the run directory {out} already holds checkpoints ({existing[0].name}, ...), "
                "which a fresh run would overwrite: resume=auto continues that run; a new "
                "hydra.run.dir starts another"
            )
        return None
    if str(resume) == "auto":
        found = find_checkpoint(out)
        if found is None and existing:
            raise CheckpointError(
                f"none of the {len(existing)} checkpoints in {out} loads (see the warnings "
                "above); give one with resume=PATH, or a new hydra.run.dir to start afresh"
            )
        return found
    path = Path(resume)
    if path.is_dir():
        # a file, not a directory: "continue that run" is hydra.run.dir=DIR, and which of its
        # checkpoints is the user's choice to name
        found = [*checkpoint_files(path), *sorted(path.glob("*.ckpt"), reverse=True)]
        steps = {p: checkpoint_step(p) for p in dict.fromkeys(found)}
        listed = ", ".join(
            f"{p} (step {step})" if step is not None else f"{p} (does not load)"
            for p, step in steps.items()
        )
        raise CheckpointError(
            f"resume={resume} is a directory; resume takes a .ckpt file"
            + (f", e.g. one of: {listed}" if listed else " (it holds none)")
            + f". To continue the run in that directory, use hydra.run.dir={resume} (resume=auto)"
        )
    ckpt = load_checkpoint(path)  # a missing, corrupt or unsafe file: a clear error, now
    check_not_another_run(path, out)
    return path, ckpt
