"""Progressive distillation's stages (Salimans & Ho 2022, Algorithm 2, the outer loop): `train.py
teacher=PATH` halves the teacher's DDIM steps stage by stage (64 -> 32 -> 16 -> 8 -> 4), each
stage an ordinary run of train.py's machinery in its own directory
`<run>/stage_<k>_<N>steps/` (checkpoints, EMA, loggers, signals, resume=auto, run lock), whose
student (`ddpm.distillation.StudentModule`) teaches the next stage. Rerunning the same command
with `hydra.run.dir=<run>` skips the finished stages and continues the unfinished one.
`<run>/distill.json` records each stage's steps and wall time.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.distill import halvings
from ddpm.files import atomic_write
from ddpm.run.resume import finished_step
from ddpm.samplers import check_guidance

log = logging.getLogger(__name__)

# below this many steps an ε student is unstable (Salimans & Ho 2022, Sec. 4: x̂ = (z - σ ε̂)/α
# amplifies ε̂'s error by 1/α at the noisy end, where the few-step student must start)
MIN_EPS_STEPS = 8
# the student's settings that come from the distillation config, not from its teacher
TRAINING_KEYS = (
    "optimizer",
    "lr_scheduler",
    "ema_decay",
    "ema_warmup",
    "nonfinite",
    "nonfinite_check_every",
    "nonfinite_max_skips",
    "channels_last",
    "compile",
)


@dataclass
class Plan:
    """What the stages will do, checked before any work."""

    teacher: Path
    hparams: dict[str, Any]  # the teacher's DiffusionModule hyper_parameters
    steps: list[int]  # the students' steps, stage by stage
    guidance: float  # w of the first stage (later stages distil an already guided student)
    record: dict[str, Any] = field(default_factory=dict)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_distillation(cfg: DictConfig) -> Plan:
    """The teacher and the distill options, one line each, before any work: a teacher that is
    not a diffusion checkpoint, steps that do not halve to the target, an ε teacher asked for
    fewer than 8 steps, guidance asked of a teacher without labels or a null label."""
    path = Path(str(cfg.teacher)).expanduser()
    ckpt = load_checkpoint(path)  # missing, corrupt, unsafe: CheckpointError, naming the file
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or "schedule" not in hparams or "net" not in hparams:
        raise CheckpointError(
            f"teacher={path} is not a diffusion model's checkpoint (its hyper_parameters lack "
            "'net' and 'schedule': an autoencoder's, or another program's?): give a checkpoint "
            "of `python train.py` with module=diffusion, e.g. runs/quickstart/<date>/checkpoints/"
            "last.ckpt"
        )
    options = cfg.get("distill") or {}
    steps = halvings(int(options.get("teacher_steps", 64)), int(options.get("steps", 4)))
    objective = hparams.get("objective", "eps")
    if objective == "eps" and steps[-1] < MIN_EPS_STEPS:
        raise ValueError(
            f"teacher={path} predicts eps, and an eps student is unstable below "
            f"{MIN_EPS_STEPS} steps (Salimans & Ho 2022, Sec. 4), distill.steps={steps[-1]}: "
            f"give distill.steps={MIN_EPS_STEPS} or more, or a teacher trained with "
            "module.objective=v"
        )
    guidance = options.get("guidance")
    sampling = ckpt.get("sampling") or {}
    guidance = float(sampling.get("guidance") or 0.0) if guidance is None else guidance
    check_guidance(guidance, "distill.guidance")
    net = hparams["net"]
    if guidance and (not net.get("num_classes") or not net.get("null_label", True)):
        raise ValueError(
            f"distill.guidance={guidance}: teacher={path} is not class-conditional with a null "
            "label, so it has no classifier-free guidance to distil: give distill.guidance=0"
        )
    if cfg.get("resume", "auto") not in ("auto", None) or cfg.get("ckpt_path") is not None:
        raise ValueError(
            f"resume={cfg.resume} with teacher=PATH: each stage resumes itself (resume=auto); "
            "to continue a distillation rerun it with hydra.run.dir=<its run directory>"
        )
    record = {
        "teacher": str(path.absolute()),
        "teacher_sha256": _sha256(path),
        "teacher_steps": steps[0] * 2,
        "guidance": float(guidance),
        "num_stages": len(steps),
    }
    return Plan(path, hparams, steps, float(guidance), record)


def stage_config(cfg: DictConfig, plan: Plan, k: int, teacher: Path, out: Path) -> DictConfig:
    """Stage k's (1-based) train.py config: the student (the teacher's network and schedule,
    the distillation's optimizer and EMA) in `out`, its grid and sample.py's default sampler
    the DDIM of its own N-step trailing grid, unguided (the guidance is in its weights)."""
    steps = plan.steps[k - 1]
    stage = copy.deepcopy(cfg)
    options = OmegaConf.to_container(cfg.get("distill") or {}, resolve=True)
    training = OmegaConf.to_container(cfg.module, resolve=True)
    clip_x0 = bool(options.get("clip_x0", True))
    module = {
        **plan.hparams,
        **{key: training[key] for key in TRAINING_KEYS if key in training},
        "_target_": "ddpm.distillation.StudentModule",
        "_recursive_": False,
        "cond_drop_prob": 0.0,  # the student learns the guided teacher at its labels only
        "teacher": str(teacher),
        "steps": steps,
        "guidance": plan.guidance if k == 1 else 0.0,
        "clip_x0": clip_x0,
        "record": {**plan.record, "stage": k, "steps": steps},
    }
    # η of the student's own sampler (training is the same either way: it learns deterministic
    # DDIM steps); stochastic steps read better at 4 (Meng et al. sample distilled models so too)
    eta = float(options.get("eta", 1.0))
    sampler = {"name": "ddim", "eta": eta, "spacing": "trailing", "clip_x0": clip_x0}
    with open_dict(stage):
        stage.teacher = None
        stage.print_config = bool(cfg.get("print_config")) and k == 1
        stage.paths.output_dir = str(out)
        stage.module = module
        stage.sampler = sampler
        grid = stage.callbacks.get("sample_grid")
        if grid is not None:
            grid.sampler = sampler
            grid.steps = grid.final_steps = steps
            grid.guidance = 0.0
    return stage


def run_stages(
    cfg: DictConfig, out: Path, plan: Plan, train: Callable[[DictConfig], dict[str, Any]]
) -> dict[str, Any]:
    """Every stage in turn through `train` (train.py's, on the stage's config); a stage that
    has finished is not trained again (`train` finds it so), one that stops early (Ctrl-C,
    preemption, max_time) ends the loop with the command that continues it."""
    record_path = out / "distill.json"
    done = _read(record_path)  # the stages that finished, as earlier runs recorded them
    earlier = json.loads(record_path.read_text()).get("teacher_sha256") if done else None
    if earlier not in (None, plan.record["teacher_sha256"]):
        raise ValueError(
            f"teacher={plan.teacher} is not the file this run's stages were distilled from "
            f"(sha256 {earlier[:12]}..., {record_path}): give that teacher, or a new run "
            "directory"
        )
    teacher, metrics = plan.teacher, {}
    total = len(plan.steps)
    for k, steps in enumerate(plan.steps, 1):
        directory = out / f"stage_{k}_{steps}steps"
        w = plan.guidance if k == 1 else 0.0
        message = (
            f"stage {k}/{total}: {2 * steps} -> {steps} steps, teacher {teacher}, w={w:g}, "
            f"{cfg.trainer.max_steps} optimizer steps of batch {cfg.dataset.batch_size} "
            f"-> {directory}"
        )
        log.info(message)
        start = time.perf_counter()
        metrics = train(stage_config(cfg, plan, k, teacher, directory))
        seconds = time.perf_counter() - start
        last = directory / "checkpoints" / "last.ckpt"
        step = finished_step(load_checkpoint(last), cfg.trainer) if last.is_file() else None
        if step is None:
            log.warning(
                "stage %d/%d stopped before trainer.max_steps: continue the distillation with "
                "the same command plus hydra.run.dir=%s",
                *(k, total, out),
            )
            return metrics
        if str(k) not in done:  # a stage found finished keeps the timing it was trained in
            done[str(k)] = {
                "steps": steps,
                "teacher_steps": 2 * steps,
                "seconds": round(seconds, 1),
                "optimizer_steps": step,
                "checkpoint": str(last),
                **metrics,
            }
            _write(record_path, plan, done)
        log.info("stage %d/%d done: %d steps -> %s (%.0f s)", k, total, steps, last, seconds)
        teacher = last
    return metrics


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()).get("stages") or {})


def _write(path: Path, plan: Plan, stages: dict[str, Any]) -> None:
    seconds = sum(float(entry.get("seconds", 0.0)) for entry in stages.values())
    body = {**plan.record, "steps": plan.steps, "seconds": round(seconds, 1), "stages": stages}
    text = json.dumps(body, indent=1, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
