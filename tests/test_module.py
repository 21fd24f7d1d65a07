import math
import pickle
from types import SimpleNamespace

import pytest
import torch

from ddpm.generate import DiffusionModel, denoised, generate, generate_all
from ddpm.module import EMA, DiffusionModule
from ddpm.nonfinite import DivergenceError, NonFiniteGuard
from ddpm.objectives import Prediction, split_output

NET = {
    "_target_": "ddpm.unet.UNet",
    "image_size": 8,
    "in_channels": 1,
    "ch": 16,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [4],
    "dropout": 0.0,
}
SCHEDULE = {"_target_": "ddpm.schedule.NoiseSchedule.linear", "timesteps": 100, "beta_end": 0.1}
OPT = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 3e-3}


def make(**kwargs) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(net=kwargs.pop("net", NET), schedule=SCHEDULE, optimizer=OPT, **kwargs)


def images(n=8):
    g = torch.Generator().manual_seed(1)
    # simple structured images in [-1, 1]: bright squares at different places
    x = -torch.ones(n, 1, 8, 8)
    for i in range(n):
        r, c = divmod(i, 4)
        x[i, :, 2 * r : 2 * r + 4, c : c + 4] = 1
    return x + 0.01 * torch.randn(x.shape, generator=g)


def eval_loss(module, x):
    with torch.no_grad():
        return module.loss_fn(x, None, generator=torch.Generator().manual_seed(0)).mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
def test_tiny_model_overfits_a_few_images(objective):
    module = make(objective=objective, loss_weighting="min_snr" if objective == "eps" else "none")
    x = images()
    optimizer = module.configure_optimizers()["optimizer"]
    before = eval_loss(module, x.repeat(8, 1, 1, 1))
    for _ in range(150):
        loss = module.loss_fn(x.repeat(4, 1, 1, 1), None).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss(module, x.repeat(8, 1, 1, 1))
    assert after < 0.5 * before, (before, after)


def test_ema_follows_the_warmed_up_decay():
    net = torch.nn.Linear(2, 2, bias=False)
    ema = EMA(net, decay=0.99)
    assert ema.decay_at(0) == pytest.approx(0.1)
    assert ema.decay_at(10_000) == 0.99
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.step(net, 0)  # first update copies the weights
    assert torch.equal(ema.module.weight, net.weight)
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.step(net, 5)
    d = 6 / 15
    assert torch.allclose(ema.module.weight, torch.full((2, 2), d * 1 + (1 - d) * 3))
    assert not ema.module.weight.requires_grad


def test_ema_moves_once_per_optimizer_step():
    """With gradient accumulation over 2 batches, 6 batches are 3 optimizer steps: 3 EMA
    updates, made in optimizer_step (so a checkpoint saved at a step holds its update)."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    module = make(ema_warmup=False)
    x = images()
    loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 3
    assert int(module.ema.n_averaged) == 3


def _step(module, guard, trainer, x):
    """One training step as Lightning runs it, with the guard's hooks: loss, backward,
    the check before the optimizer step (which then skips parameters without gradients)."""
    optimizer = torch.optim.SGD(module.net.parameters(), lr=0.1)
    optimizer.zero_grad()
    loss = module.loss_fn(x, None).mean()
    guard.on_before_backward(trainer, module, loss)
    loss.backward()
    guard.on_before_optimizer_step(trainer, module, optimizer)
    optimizer.step()


def test_module_brings_its_guard_with_its_settings():
    module = make(nonfinite="skip", nonfinite_check_every=3, nonfinite_max_skips=2)
    module.trainer = SimpleNamespace(loggers=[])  # what configure_callbacks reads
    guard = next(c for c in module.configure_callbacks() if isinstance(c, NonFiniteGuard))
    assert (guard.mode, guard.check_every, guard.max_skips) == ("skip", 3, 2)


def test_nonfinite_loss_is_skipped_or_stops():
    module = make()
    guard = NonFiniteGuard("skip", max_skips=2)
    trainer = SimpleNamespace(global_step=0, precision="32-true")
    bad = torch.full((4, 1, 8, 8), float("nan"))
    before = [p.detach().clone() for p in module.net.parameters()]
    _step(module, guard, trainer, bad)  # the update is dropped: the weights stay as they were
    assert guard.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, module.net.parameters(), strict=True))
    with pytest.raises(DivergenceError, match="2 updates in a row had a non-finite loss"):
        _step(module, guard, trainer, bad)

    guard = NonFiniteGuard("stop")
    guard.check()  # nothing seen yet
    guard.note(torch.tensor(True), 1)
    guard.check()
    guard.note(torch.tensor(False), 1)
    guard.note(torch.tensor(False), 2)  # the first bad step is the one reported
    with pytest.raises(DivergenceError, match="non-finite at step 1: .* last good one is intact"):
        guard.check()
    with pytest.raises(DivergenceError):  # nor is a diverged state ever written
        guard.on_save_checkpoint(trainer, module, {})


def test_skip_counts_a_nonfinite_loss_under_fp16_and_in_any_micro_batch():
    """Under fp16 the GradScaler skips non-finite gradients, but a non-finite loss is still
    counted (and stops the run after max_skips); with gradient accumulation a NaN in any
    micro-batch drops the accumulated step, not only when it is the last one."""
    module = make()
    trainer = SimpleNamespace(global_step=0, precision="16-mixed")
    guard = NonFiniteGuard("skip", max_skips=1)
    with pytest.raises(DivergenceError, match="non-finite loss"):
        _step(module, guard, trainer, torch.full((4, 1, 8, 8), float("nan")))

    guard = NonFiniteGuard("skip")
    trainer = SimpleNamespace(global_step=0, precision="32-true")
    optimizer = torch.optim.SGD(module.net.parameters(), lr=0.1)
    for loss in (float("nan"), 1.0):  # two micro-batches: NaN first, then a finite one
        guard.on_before_backward(trainer, module, torch.tensor(loss))
    for p in module.net.parameters():
        p.grad = torch.zeros_like(p)
    guard.on_before_optimizer_step(trainer, module, optimizer)
    assert guard.skipped_steps == 1 and guard.loss_finite is None  # reset for the next step


def test_nonfinite_gradient_skips_the_update():
    module = make()
    guard = NonFiniteGuard("skip")
    trainer = SimpleNamespace(global_step=0, precision="bf16-mixed")
    for p in module.net.parameters():
        p.grad = torch.zeros_like(p)
    next(module.net.parameters()).grad[0] = float("inf")
    optimizer = torch.optim.SGD(module.net.parameters(), lr=0.1)
    guard.on_before_optimizer_step(trainer, module, optimizer)
    assert all(p.grad is None for p in module.net.parameters()) and guard.skipped_steps == 1


def test_loss_curve_marks_steps_without_a_finite_loss(tmp_path):
    """module.nonfinite=skip: a skipped step's loss is NaN or inf, and Lightning passes {} for a
    step without a loss; neither is plotted, and neither crashes the curve (it did, KeyError)."""
    from ddpm.run.callbacks import LossCurve

    curve = LossCurve(every_n_steps=1)
    trainer = SimpleNamespace(global_step=0, default_root_dir=str(tmp_path))
    outputs = [{"loss": torch.tensor(0.5)}, {}, {"loss": torch.tensor(float("nan"))}, None]
    outputs += [torch.tensor(float("inf")), torch.tensor(0.25)]
    for step, out in enumerate(outputs, 1):
        trainer.global_step = step
        curve.on_train_batch_end(trainer, None, out, None, step)
    assert curve.steps == [1, 3, 5, 6]  # no point without a loss; a gap for a non-finite one
    assert curve.losses[::3] == [0.5, 0.25] and all(math.isnan(v) for v in curve.losses[1:3])
    LossCurve.on_train_end.__wrapped__(curve, trainer, None)  # without rank_zero_only's rank
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


@pytest.mark.parametrize("lr", [float("nan"), -1.0, 0.0, "ten"])
def test_bad_learning_rate_is_named(lr):
    with pytest.raises(ValueError, match="module.optimizer.lr must be a finite number > 0"):
        DiffusionModule(net=NET, schedule=SCHEDULE, optimizer={**OPT, "lr": lr})


def test_unknown_device_is_named():
    from ddpm.device import pick_device

    for name in ("tpu", "cuda:x", "xla"):
        with pytest.raises(ValueError, match=f"^device={name} is not .*use device=auto, cpu"):
            pick_device(name)
    assert pick_device("cpu") == torch.device("cpu")


def test_bad_module_options_are_named():
    with pytest.raises(ValueError, match="module.objective"):
        make(objective="score")
    with pytest.raises(ValueError, match="module.loss"):
        make(loss="huber")
    with pytest.raises(ValueError, match="module.ema_decay"):
        make(ema_decay=1.5)


def test_generate_gives_images_in_range_independent_of_batch():
    module = make()
    ddpm5 = {"sampler": "ddpm", "steps": 5}
    a = generate_all(module, 4, sampler=ddpm5, seed=3)
    b = generate_all(module, 4, sampler=ddpm5, seed=3, batch_size=2)
    c = torch.cat([generate_all(module, 2, sampler=ddpm5, seed=3, first=k) for k in (0, 2)])
    assert a.shape == (4, 1, 8, 8)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert list(generate(module, 0, sampler=ddpm5)) == []  # nothing left to draw: no batch


def test_class_conditional_training_and_guidance():
    module = make(net={**NET, "num_classes": 3}, cond_drop_prob=0.5)
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    assert torch.isfinite(module.loss_fn(x, y)).all()
    ddpm = {"sampler": "ddpm", "steps": 4}
    out = generate_all(module, 3, sampler=ddpm, labels=[0, 1, 2], guidance=2.0)
    assert out.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="not class-conditional"):
        generate_all(make(), 1, sampler=ddpm, labels=[0])
    with pytest.raises(ValueError, match="guidance needs labels"):
        generate_all(module, 1, sampler=ddpm, labels=None, guidance=1.0)


@pytest.mark.parametrize("objective", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_every_objective_samples_with_every_sampler(objective, sampler):
    module = make(objective=objective)
    out = generate_all(module, 2, sampler={"sampler": sampler, "steps": 4}, seed=1)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert out.min() >= -1 and out.max() <= 1


def test_the_module_is_what_generate_needs():
    """DiffusionModule has every attribute and method of generate's DiffusionModel protocol."""
    assert isinstance(make(), DiffusionModel)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_denoisers_return_one_type(learn_sigma):
    """Both denoisers return a Prediction, v None unless learn_sigma; the guided one's ε is
    (1 + w) ε(x, y) - w ε(x, ∅) of the plain one's, v the conditional v."""
    module = make(net={**NET, "num_classes": 3}, learn_sigma=learn_sigma).eval()
    net, x, t = module.ema.module, images(4), torch.tensor([3, 40, 70, 99])
    y, null = torch.tensor([0, 1, 2, 1]), torch.full((4,), 3)
    with torch.no_grad():
        cond = module.denoiser(net, y)(x, t)
        uncond = module.denoiser(net, null)(x, t)
        guided = module.guided_denoiser(net, y, 2.0)(x, t)
        unguided = module.guided_denoiser(net, y)(x, t)
    for pred in (cond, guided, unguided):
        assert isinstance(pred, Prediction) and pred.eps.shape == x.shape
        assert (pred.v is not None) == learn_sigma
    assert not torch.allclose(cond.eps, uncond.eps)  # the label matters: w is seen
    torch.testing.assert_close(guided.eps, 3 * cond.eps - 2 * uncond.eps, rtol=1e-4, atol=1e-5)
    assert torch.equal(unguided.eps, cond.eps)
    if learn_sigma:
        torch.testing.assert_close(guided.v, cond.v, rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_loss():
    x = images()
    plain, nhwc = make(), make(channels_last=True)
    assert nhwc.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(eval_loss(nhwc, x), eval_loss(plain, x), rtol=1e-4, atol=1e-5)


def test_compile_failure_falls_back_to_eager(caplog):
    module = make(compile=True)
    assert set(module.state_dict()) == set(make().state_dict())  # compiling renames no weight
    copy = pickle.loads(pickle.dumps(module.net))  # copies are plain, eager networks
    assert copy._compiled_call_impl is None and module.net._compiled_call_impl is not None

    def broken(*args):
        raise RuntimeError("no C compiler")

    module.net._compiled_call_impl = broken  # what a failed compilation raises at first call
    module.train()
    with caplog.at_level("WARNING"):
        loss = module.loss_fn(images(), None).mean()
    assert torch.isfinite(loss) and module.net._compiled_call_impl is None
    with caplog.at_level("WARNING"):  # and for good: no second attempt, no second warning
        module.loss_fn(images(), None)
    assert caplog.text.count("torch.compile failed") == 1
    assert "torch.compile failed (RuntimeError: no C compiler); training eagerly" in caplog.text


def test_learning_rate_is_logged_under_one_name_with_or_without_a_schedule():
    """LearningRateMonitor names the rate after the scheduler: a run without an LR schedule
    gets a constant one, so `train/lr` is there either way, and the rate does not move."""
    module = make()
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["name"] == "train/lr"
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == OPT["lr"]


def vlb_of(module, x, seed=0):
    """The learned-variance model's L_vlb part of the loss (bits/dim x T · λ), at fixed noise."""
    hybrid = module.loss_fn(x, None, generator=torch.Generator().manual_seed(seed))
    module.hparams.vlb_weight, weight = 0.0, module.hparams.vlb_weight
    simple = module.loss_fn(x, None, generator=torch.Generator().manual_seed(seed))
    module.hparams.vlb_weight = weight
    return (hybrid - simple).mean().item()


def test_learned_variances_train_and_sample():
    """L_hybrid on a tiny model: the L_vlb part falls, the learned σ² stays between β̃ and β
    (v within [-1, 1]), the mean's gradient comes from L_simple only, and every sampler runs
    (DDPM with the learned σ)."""
    module = make(learn_sigma=True)
    assert module.net.conv_out.out_channels == 2  # ε and v for one channel
    x = images().repeat(4, 1, 1, 1)
    optimizer = module.configure_optimizers()["optimizer"]
    with torch.no_grad():
        before = vlb_of(module, x)
    for _ in range(240):
        loss = module.loss_fn(x, None).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = vlb_of(module, x)
        t = torch.randint(0, 100, (len(x),), generator=torch.Generator().manual_seed(2))
        _, v = split_output(
            module.net(module.schedule.q_sample(x, t, torch.randn_like(x)), t), learn_sigma=True
        )
    assert 0 < after < 0.7 * before, (before, after)
    # σ² within [β̃, β] for all but a few pixels (v is not clamped, as in improved-diffusion)
    assert v.quantile(0.05) >= -1 and v.quantile(0.95) <= 1, (v.quantile(0.05), v.quantile(0.95))

    # stop-gradient: the L_vlb part alone moves only the variance half of the last layer
    module.zero_grad()
    x_one = images()[:4]
    hybrid = module.loss_fn(x_one, None, generator=torch.Generator().manual_seed(3)).mean()
    module.hparams.vlb_weight, weight = 0.0, module.hparams.vlb_weight
    simple = module.loss_fn(x_one, None, generator=torch.Generator().manual_seed(3)).mean()
    module.hparams.vlb_weight = weight
    (hybrid - simple).backward()
    grad = module.net.conv_out.weight.grad
    assert grad[0].abs().sum() == 0 and grad[1].abs().sum() > 0

    for name in ("ddpm", "ddim", "dpmpp_2m"):
        out = generate_all(module, 4, sampler={"sampler": name, "steps": 5}, progress=False)
        assert out.shape == (4, 1, 8, 8) and out.abs().max() <= 1
    x_t, x0_hat = denoised(module, x[:1], [0, 50, 99])  # the noise-level figure's model half
    assert x_t.shape == x0_hat.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="learn_sigma"):
        generate_all(
            make(),
            2,
            sampler={"sampler": "ddpm", "steps": 3, "variance": "learned"},
            progress=False,
        )


def test_ddpm_sampler_draws_with_the_learned_variance():
    """v = -1 everywhere is σ² = β̃ and v = +1 is σ² = β: the same draws as the fixed choices."""
    from ddpm.samplers import image_generators, sample_ddpm
    from ddpm.schedule import NoiseSchedule

    schedule = NoiseSchedule.linear(100)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for v_value, fixed in ((-1.0, "small"), (1.0, "large")):

        def with_v(x, t, v_value=v_value):
            return 0.1 * x, torch.full_like(x, v_value)

        learned = sample_ddpm(
            with_v, schedule, x_T, 20, generator=image_generators(0, 0, 2), variance="auto"
        )
        plain = sample_ddpm(
            lambda x, t: Prediction(0.1 * x),
            schedule,
            x_T,
            20,
            generator=image_generators(0, 0, 2),
            variance=fixed,
        )
        assert torch.allclose(learned, plain, atol=1e-5)


def test_a_network_without_a_null_label_refuses_label_dropout_and_guidance():
    """A class-conditional UNet with no null row (a diffusers num_class_embeds import) cannot
    drop labels in training nor run the unconditional half of guidance: both are named at the
    start, not an IndexError inside the embedding."""
    net = {**NET, "num_classes": 3, "null_label": False}
    with pytest.raises(ValueError, match="set module.cond_drop_prob=0"):
        make(net=net, cond_drop_prob=0.1)
    module = make(net=net, cond_drop_prob=0.0)
    labels = torch.tensor([0, 1])
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5, 50])
    assert module.guided_denoiser(module.net, labels, 0.0)(x, t).eps.shape == x.shape
    with pytest.raises(ValueError, match="guidance=2.0 needs the null label"):
        module.guided_denoiser(module.net, labels, 2.0)
