"""What `train.py` does: compose -> instantiate -> fit, around the resume and run-directory
checks, and the clean-up that lets the next job of a multirun start fresh."""

from __future__ import annotations

import logging
import math
import os
import sys
from itertools import count
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from omegaconf import DictConfig, OmegaConf

from ddpm import adm, unet
from ddpm.cli.errors import InputError
from ddpm.device import choose_precision
from ddpm.files import check_output_dir
from ddpm.module import check_min_snr_gamma
from ddpm.objectives import check_vlb
from ddpm.resample import check_timestep_sampler
from ddpm.run.checkpoints import (
    AtomicCheckpointIO,
    first_unused,
    remove_dead_writes,
)
from ddpm.run.resume import (
    ApplyOptimizerSettings,
    RecordDataset,
    check_resume,
    dataset_identity,
    write_metrics,
)
from ddpm.run.runlock import first_process, run_lock
from ddpm.run.stages import check_distillation, run_stages
from ddpm.run.stopping import Interrupt, LaunchTimer
from ddpm.run.tracking import dirname, record_run
from ddpm.samplers import check_guidance, check_seed
from ddpm.trusted import allow_targets

log = logging.getLogger(__name__)

DDP_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RANK")

OmegaConf.register_new_resolver("ddpm_dirname", dirname, replace=True)  # hydra/default.yaml


def save_config(cfg: DictConfig, out: Path) -> None:
    """config.yaml, resolved; a resumed run with other settings keeps the first one and adds
    config.resume<k>.yaml beside it."""
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = out / "config.yaml"
    if path.is_file() and path.read_text() != text:
        path = first_unused(out / f"config.resume{k}.yaml" for k in count(1))
        log.info("resumed with changed settings: %s", path)
    path.write_text(text)


def build_loggers(cfg: DictConfig, out: Path, resuming: bool) -> list:
    """The configured loggers. Lightning's CSVLogger deletes an existing metrics.csv; a resumed
    run logs to logs/resume<k>/ instead, so the first part stays."""
    loggers = []
    for node in (cfg.get("logger") or {}).values():
        overrides = {}
        if resuming and str(node.get("_target_", "")).endswith("CSVLogger"):
            base = Path(node.save_dir) / node.name
            if (base / "metrics.csv").exists():
                overrides["version"] = first_unused(base / f"resume{k}" for k in count(1)).name
        loggers.append(build(node, **overrides))
    return loggers


def build(node: Any, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, raising the underlying error itself: Hydra wraps a bad value's
    message in one repr per nesting level (escaped quotes and all)."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        root: BaseException = e
        while isinstance(root, InstantiationException) and root.__cause__ is not None:
            root = root.__cause__
        if root is e:
            raise
        raise root from e


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit the configured module on the configured data; returns the final logged metrics (of
    a run that had already finished: its saved ones, nothing trained or written)."""
    check_settings(cfg)
    if cfg.get("teacher"):  # progressive distillation: one run per stage, below this one's
        return distill(cfg)
    trust_own_targets(cfg)
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    check_output_dir(out, "hydra.run.dir", fix="DIR (or paths.log_dir=DIR)")
    out.mkdir(parents=True, exist_ok=True)  # Hydra has made it, unless called in-process
    # one run per directory: a second launch would interleave its checkpoints and logs with
    # this one's. Held until metrics.json is written, so a launch that waited for it finds
    # the run finished.
    with run_lock(out):
        return fit(cfg, out)


def distill(cfg: DictConfig) -> dict[str, Any]:
    """`teacher=PATH`: its stages (`ddpm.run.stages`), each trained by `train` in its own
    directory under this run's, which stays locked while they run; the last stage's metrics."""
    plan = check_distillation(cfg)  # the teacher and the distill options, before any work
    out = Path(cfg.paths.output_dir)
    check_output_dir(out, "hydra.run.dir", fix="DIR (or paths.log_dir=DIR)")
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        return run_stages(cfg, out, plan, train)


def trust_own_targets(cfg: DictConfig) -> None:
    """What this run's own config builds (a network or optimizer class of the user's), and
    `trusted_targets`, may be named by the checkpoints it resumes from and writes: the user
    wrote them, and they are built from the config anyway."""
    allow_targets(cfg.get("trusted_targets"))
    module = cfg.get("module") or {}
    for key in ("net", "schedule", "optimizer", "lr_scheduler"):
        node = module.get(key)
        if OmegaConf.is_dict(node) and isinstance(node.get("_target_"), str):
            allow_targets([node["_target_"]], key=f"module.{key}._target_")


def fit(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """`train` inside the run directory's lock."""
    # before building anything: a missing, corrupt or unsafe checkpoint fails now
    ckpt_path, apply_changes, done = check_resume(cfg, out)
    if done is not None:
        return done
    remove_dead_writes(out)
    if first_process():  # a DDP child's own config.resume<k>.yaml would claim another resume
        save_config(cfg, out)
    if cfg.get("print_config"):
        print_config_tree(cfg)

    datamodule: L.LightningDataModule = build(cfg.dataset, seed=cfg.seed)
    module: L.LightningModule = build(cfg.module)
    if cfg.get("test") and not is_overridden("test_step", module):
        raise ValueError(f"test=true: {type(module).__name__} has no test stage; drop test=true")
    # a callback set to null (callbacks.sample_grid=null) is off, also when another config
    # (debug=fast) then sets some of its options
    nodes = (cfg.get("callbacks") or {}).values()
    callbacks = [build(c) for c in nodes if c is not None and "_target_" in c]
    callbacks.append(Interrupt())  # Ctrl-C saves a checkpoint, whatever the callbacks config
    if cfg.trainer.get("max_time"):  # per launch: Lightning's would stop a continued run at once
        callbacks.append(LaunchTimer(cfg.trainer.max_time, interval="step"))
    callbacks.append(RecordDataset(dataset_identity(cfg.dataset)))
    if apply_changes:
        callbacks.append(ApplyOptimizerSettings())
    loggers = build_loggers(cfg, out, resuming=ckpt_path is not None)
    plugins = [build(p) for p in cfg.trainer.get("plugins") or []]
    trainer: L.Trainer = build(
        cfg.trainer,
        precision=choose_precision(cfg.trainer.precision, cfg.trainer.accelerator),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[*plugins, AtomicCheckpointIO()],
        max_time=None,  # LaunchTimer above
    )

    record_run(cfg, trainer, loggers, out)  # run.json; config and scale to every logger
    log.info("run directory: %s", out)
    if ckpt_path is not None:
        log.info("resuming from %s", ckpt_path)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except torch.OutOfMemoryError as e:
        first = (str(e).splitlines() or [""])[0]
        batch = cfg.dataset.get("batch_size")
        raise InputError(
            f"Error: out of memory in training ({first}). Lower dataset.batch_size (now {batch}) "
            "and raise trainer.accumulate_grad_batches by the same factor to keep the "
            "effective batch"
        ) from e
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    log.info("finished at step %d: %s", trainer.global_step, metrics)
    warn_if_cut_short(trainer, cfg.trainer.get("max_time"))
    if cfg.get("test") and not trainer.interrupted:
        # the checkpoint callback's best (newest, as it ranks by step), else the weights now
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics |= {k: float(v) for k, v in trainer.callback_metrics.items() if "test/" in k}
    if trainer.is_global_zero:  # what `python -m ddpm.results` tabulates over a sweep
        metrics = write_metrics(out / "metrics.json", trainer.global_step, metrics)
    return metrics


@rank_zero_only
def print_config_tree(cfg: DictConfig) -> None:
    """The composed config as a tree, one branch per top-level key (print_config=false: off)."""
    from rich import print as rich_print
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else value
        tree.add(str(key)).add(Syntax(str(text).rstrip(), "yaml"))
    rich_print(tree)


def check_settings(cfg: DictConfig) -> None:
    """Values that would otherwise fail deep in Lightning or torch (a ZeroDivisionError, a
    TypeError), or only at the first validation, or train nothing: one line naming the key,
    before any work."""
    if cfg.get("seed") is not None:
        check_seed(cfg.seed)
    if cfg.get("resume_changes", "refuse") not in ("refuse", "allow"):
        raise ValueError(f"resume_changes must be refuse or allow, got {cfg.resume_changes!r}")
    check_trainer(cfg.trainer)
    check_module(cfg.get("module") or {})
    timesteps = (cfg.get("schedule") or {}).get("timesteps")
    if not isinstance(timesteps, int) or timesteps < 1:
        return  # the schedule's own check names it
    check_callbacks(cfg.get("callbacks") or {}, timesteps)


def check_trainer(trainer: DictConfig) -> None:
    """The trainer's step counts and device, named by their keys."""
    steps = trainer.get("max_steps")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(
            f"trainer.max_steps must be an integer (optimizer steps, -1: no limit), got {steps!r}"
        )
    if steps == 0:
        raise ValueError(
            "trainer.max_steps=0 trains nothing: give the number of optimizer steps, e.g. "
            "trainer.max_steps=10000 (-1: until trainer.max_time)"
        )
    # 0 or -2 would reach run.json as an effective batch of 0 or -16 before Lightning objects
    accumulate = trainer.get("accumulate_grad_batches", 1)
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(
            "trainer.accumulate_grad_batches must be an integer >= 1 (batches per optimizer "
            f"step; 1: no accumulation), got {accumulate!r}"
        )
    interval = trainer.get("val_check_interval")
    if interval is not None and (
        isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0
    ):
        raise ValueError(
            "trainer.val_check_interval must be > 0 (an integer: every that many steps; a "
            f"fraction: of an epoch), got {interval!r}"
        )
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        mps = accelerator == "gpu" and torch.backends.mps.is_available()
        if not mps:
            raise ValueError(
                f"trainer.accelerator={accelerator} (trainer=gpu) needs a GPU, and torch sees "
                "none here: use trainer=cpu, or trainer.accelerator=auto"
            )


def check_module(module: DictConfig) -> None:
    """Values the module and network constructors check, checked here too so that they fail
    before config.yaml is written (a rerun would add a config.resume<k>.yaml); and the weight
    decay, which torch's optimizers refuse only when training starts, without the key."""
    if "min_snr_gamma" in module:
        check_min_snr_gamma(module.min_snr_gamma)
    if "timestep_sampler" in module:
        check_timestep_sampler(module.timestep_sampler)
    if "loss" in module and "learn_sigma" in module:  # a diffusion module (not the autoencoder)
        weighting, weight = module.get("loss_weighting", "none"), module.get("vlb_weight", 0.0)
        check_vlb(module.loss, module.learn_sigma, weighting, weight)
    net = module.get("net") or {}
    if net.get("_target_") == "ddpm.unet.UNet":
        unet.check_config(net)
    if net.get("_target_") == "ddpm.adm.ADM":
        adm.check_config(**net)
    decay = (module.get("optimizer") or {}).get("weight_decay")
    if decay is None:
        return
    number = not isinstance(decay, bool) and isinstance(decay, int | float)
    if not number or not math.isfinite(decay) or decay < 0:
        raise ValueError(
            "module.optimizer.weight_decay must be a finite number >= 0 (0: none; e.g. 0.01 "
            f"with torch.optim.AdamW), got {decay!r}"
        )


def check_callbacks(callbacks: DictConfig, timesteps: int) -> None:
    """The sampling callbacks' step counts and guidance, against the schedule's T."""
    for name, node in callbacks.items():
        if node is None or "_target_" not in node:
            continue
        for key in ("steps", "final_steps"):
            value = node.get(key)
            if value is not None and not (isinstance(value, int) and 1 <= value <= timesteps):
                raise ValueError(
                    f"callbacks.{name}.{key} must be a number of sampling steps in [1, "
                    f"{timesteps}] (the schedule's T, schedule.timesteps), got {value!r}"
                )
        if "guidance" in node:
            check_guidance(node.get("guidance"), f"callbacks.{name}.guidance")


def warn_if_cut_short(trainer: L.Trainer, max_time: str | None) -> None:
    """The wall-clock guard is a last resort: when it, not max_steps, ended training, say so
    loudly, since the run's samples and metrics are then those of a shorter run."""
    cut = max_time and trainer.max_steps > 0 and trainer.global_step < trainer.max_steps
    if cut and not trainer.interrupted:
        log.warning(
            "\n%s\nSTOPPED EARLY: trainer.max_time=%s ended training at step %d of %d. "
            "This machine is slower than the run was sized for, so the samples and metrics "
            "are those of a shorter run. Continue it with the same command plus "
            "hydra.run.dir=%s, or raise trainer.max_time.\n%s",
            "!" * 80,
            max_time,
            trainer.global_step,
            trainer.max_steps,
            trainer.default_root_dir,
            "!" * 80,
        )


def run(cfg: DictConfig) -> float | None:
    """One job: `train`, then the clean-up a multirun needs before its next job; returns the
    value a Hydra sweeper (hparams_search=optuna) minimises."""
    environment = {k: os.environ.get(k) for k in DDP_VARIABLES}
    try:
        metrics = train(cfg)
    finally:
        # the next job of a multirun starts clean: Lightning leaves the process group and its
        # LOCAL_RANK / MASTER_PORT ... set, after which it would wait for ranks never started
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        # and its own W&B run: Lightning's WandbLogger reuses a run still open in the process
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    name = cfg.get("optimized_metric") or "val/bpd"
    if name not in metrics:
        message = f"optimized_metric={name} was not logged; logged: {sorted(metrics)}"
        if _optimizing():
            raise KeyError(message)  # a sweeper would minimise nothing
        log.warning(message)
        return None
    return metrics[name]


def _optimizing() -> bool:
    """Whether a sweeper that uses the returned value (Optuna) runs this job."""
    try:
        return "optuna" in str(HydraConfig.get().sweeper.get("_target_", "")).lower()
    except ValueError:
        return False
