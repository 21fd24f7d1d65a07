"""Progressive distillation (ddpm/distill.py, ddpm/distillation.py, ddpm/run/stages.py): the
math exactly, one stage of a tiny teacher through train.py's machinery, the bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, train_config
from omegaconf import OmegaConf

from ddpm.checkpoint import CheckpointError
from ddpm.cli.sample import sampling
from ddpm.cli.train import train
from ddpm.distill import (
    alpha_sigma,
    ddim_step,
    distillation_target,
    halvings,
    stage_grids,
    step_times,
    teacher_two_steps,
    x0_from_output,
)
from ddpm.generate import generate_all
from ddpm.module import DiffusionModule, load_module
from ddpm.objectives import Prediction
from ddpm.samplers import sample_ddim
from ddpm.schedule import NoiseSchedule


@pytest.mark.parametrize("T", [1000, 999, 10])
def test_the_student_grid_is_every_other_point_of_the_teachers(T: int):
    for steps in (1, 2, 4, 5):
        student, teacher = stage_grids(T, steps)
        assert len(student) == steps and len(teacher) == 2 * steps
        assert torch.equal(teacher[1::2], student) and student[-1] == T - 1
        t, t_mid, t_prev = step_times(student, teacher, torch.arange(steps))
        assert torch.equal(t, student) and bool((t_prev < t_mid).all() and (t_mid < t).all())
        assert t_prev[0] == -1 and torch.equal(t_prev[1:], student[:-1])
    assert halvings(64, 4) == [32, 16, 8, 4] and halvings(2, 1) == [1]
    for bad in ((48, 4), (4, 4), (4, 8)):
        with pytest.raises(ValueError, match="distill.teacher_steps=.* does not halve"):
            halvings(*bad)


def test_one_student_step_on_the_target_lands_where_the_teachers_two_did():
    """The teacher's two steps are the project's DDIM sampler's (2-step chain from t = T - 1 to
    the clean image); one DDIM step of a student that predicts x̃ reproduces them."""
    schedule = NoiseSchedule.cosine(20)
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def denoiser(x, t):  # any smooth function of (x, t) will do (diffusers' dummy model)
        return Prediction(torch.tanh(x) * (t[:, None, None, None] + 1) / 21)

    def teacher_x0(z, t):
        return schedule.predict_x0(z, t, denoiser(z, t).eps)

    two = sample_ddim(denoiser, schedule, x_T, 2, spacing="trailing", clip_x0=False)
    student, teacher = stage_grids(20, 1)
    times = step_times(student, teacher, torch.zeros(3, dtype=torch.long))
    z_prev = teacher_two_steps(teacher_x0, schedule, x_T, times)
    torch.testing.assert_close(z_prev, two, rtol=1e-5, atol=1e-5)
    # a middle step too (t'' not the clean image): x̃ takes z_t exactly to z_t''
    student, teacher = stage_grids(20, 4)
    times = step_times(student, teacher, torch.tensor([1, 2, 3]))
    z_prev = teacher_two_steps(teacher_x0, schedule, x_T, times)
    at, prev = alpha_sigma(schedule, times[0], 4), alpha_sigma(schedule, times[2], 4)
    x_tilde = distillation_target(x_T, z_prev, at, prev)
    torch.testing.assert_close(ddim_step(x_tilde, x_T, at, prev), z_prev, rtol=1e-5, atol=1e-5)
    # and the 1-step DDIM sampler of a student predicting x̃ ends where the teacher's two did
    x_tilde = distillation_target(
        x_T, two, *(alpha_sigma(schedule, torch.tensor([s] * 3), 4) for s in (19, -1))
    )
    one = sample_ddim(
        lambda x, t: Prediction(schedule.predict_eps(x, t, x_tilde)),
        schedule,
        x_T,
        1,
        spacing="trailing",
        clip_x0=False,
    )
    torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-4)
    for objective, out in (("x0", x_T), ("v", schedule.velocity(x_T, times[0], x_tilde))):
        x0 = x0_from_output(objective, schedule, out, x_T, times[0])
        assert torch.allclose(x0, x_T if objective == "x0" else x0, atol=1e-5)


def tiny_teacher(path: Path, objective: str = "v", num_classes: int | None = 10) -> Path:
    """A tiny class-conditional v-teacher (random weights) as a checkpoint file, written the
    way Lightning writes one's fields, without a training run."""
    cfg = compose_config([*FAST, f"module.objective={objective}", "model.num_classes=10"])
    plain = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "schedule")}
    module = DiffusionModule(
        net={**plain["model"], "num_classes": num_classes},
        schedule=plain["schedule"],
        optimizer=OmegaConf.to_container(cfg.module.optimizer, resolve=True),
        objective=objective,
    )
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "sampling": {"sampler": "ddpm", "steps": 4, "guidance": 1.0 if num_classes else 0.0},
            "class_names": [str(k) for k in range(10)],
        },
        path,
    )
    return path


def distill_config(run: Path, teacher: Path, *overrides: str):
    return train_config(
        run,
        [
            "experiment=distill_quickstart",
            *FAST,
            "logger=none",
            f"teacher={teacher}",
            "print_config=false",
            "distill.teacher_steps=2",
            "distill.steps=1",
            "trainer.max_steps=15",
            "trainer.limit_val_batches=0",
            "callbacks.model_checkpoint.every_n_train_steps=100",
            "module.optimizer.lr=3e-3",
            "module.lr_scheduler.total_iters=1",
            "module.ema_decay=0.5",
            *overrides,
        ],
    )


def test_one_stage_of_a_tiny_teacher(tmp_path: Path):
    """2 -> 1 step, 15 steps of batch 8: the student's one step lands nearer the guided
    teacher's two DDIM steps than before (where the student was the teacher, unguided);
    its checkpoint loads with load_module and sample.py draws with its one step by default;
    a rerun of the same command trains nothing."""
    teacher_path = tiny_teacher(tmp_path / "teacher.ckpt")
    run = tmp_path / "run"
    train(distill_config(run, teacher_path))
    last = run / "stage_1_1steps" / "checkpoints" / "last.ckpt"
    student, teacher = load_module(last), load_module(teacher_path)
    assert student.sampling == {
        "sampler": "ddim",
        "eta": 1.0,  # distill.eta: the students' stochastic DDIM by default
        "spacing": "trailing",
        "clip_x0": True,
        "steps": 1,
        "guidance": 0.0,
    }
    record = torch.load(last, weights_only=True)["distillation"]
    assert record["guidance"] == 1.0 and record["steps"] == 1 and record["stage"] == 1
    assert len(record["teacher_sha256"]) == 64

    settings = {"sampler": "ddim", "spacing": "trailing"}
    target = generate_all(
        teacher, 20, sampler={**settings, "steps": 2}, guidance=1.0, progress=False
    )

    def error(module):
        one = generate_all(module, 20, sampler={**settings, "steps": 1}, progress=False)
        return (one - target).square().mean().item()

    before, after = error(teacher), error(student)
    assert after < 0.5 * before, (before, after)

    cfg = compose_config([f"ckpt={last}"], name="sample")
    sampler, guidance = sampling(cfg, student)
    assert sampler["steps"] == 1 and sampler["spacing"] == "trailing" and guidance == 0.0
    assert sampler["eta"] == 1.0

    mtime = last.stat().st_mtime_ns
    train(distill_config(run, teacher_path))  # the same command again: the stage is done
    assert last.stat().st_mtime_ns == mtime
    other = tiny_teacher(tmp_path / "other.ckpt")  # another teacher for the same run: refused
    with pytest.raises(ValueError, match="is not the file this run's stages were distilled"):
        train(distill_config(run, other))
    assert last.stat().st_mtime_ns == mtime


@pytest.mark.parametrize(
    "case, overrides, message",
    [
        ("random", [], "refused to load .*teacher.ckpt"),
        ("autoencoder", [], "is not a diffusion model's checkpoint"),
        ("v", ["distill.teacher_steps=48", "distill.steps=4"], "does not halve"),
        ("eps", ["distill.teacher_steps=8", "distill.steps=4"], "unstable below 8 steps"),
        ("unconditional", ["distill.guidance=2"], "no classifier-free guidance"),
    ],
)
def test_bad_inputs_are_one_line_before_any_work(tmp_path, case, overrides, message):
    path = tmp_path / "teacher.ckpt"
    if case == "random":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    elif case == "autoencoder":  # an autoencoder's hyper_parameters: a net and no schedule
        torch.save(
            {
                "state_dict": {},
                "hyper_parameters": {"net": {"_target_": "diffusers.AutoencoderKL"}},
            },
            path,
        )
    else:
        tiny_teacher(path, "eps" if case == "eps" else "v", None if case == "unconditional" else 10)
    run = tmp_path / "run"
    with pytest.raises((ValueError, CheckpointError), match=message) as error:
        train(distill_config(run, path, *overrides))
    assert "\n" not in str(error.value)
    assert not run.exists()
