"""Importance sampling of t (ddpm.resample, iDDPM Sec. 3.3) and L_vlb training: p(t) from known
losses, the exact unbiasedness of the 1/(T p) weights, the warm-up, the ring of the last K
losses against improved-diffusion's rule, the history in checkpoints and across a resume, the
gathering of every rank's losses, and training steps with both."""

from __future__ import annotations

import io
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FAST, train_config
from omegaconf import OmegaConf
from resample_ddp_script import BATCH, STEPS, rank_main

from ddpm.cli import train as training
from ddpm.cli.train import check_module
from ddpm.module import DiffusionModule
from ddpm.resample import (
    HISTORY,
    UNIFORM_PROB,
    LossSecondMomentSampler,
    UniformSampler,
    all_gather_losses,
    make_timestep_sampler,
)

T = 6
NET = {
    "_target_": "ddpm.unet.UNet",
    "image_size": 8,
    "in_channels": 1,
    "ch": 8,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}
SCHEDULE = {"_target_": "ddpm.schedule.NoiseSchedule.cosine", "timesteps": T}
OPT = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}


def make(**kwargs) -> DiffusionModule:
    torch.manual_seed(0)
    return DiffusionModule(net=NET, schedule=SCHEDULE, optimizer=OPT, **kwargs)


def images(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1).round(decimals=2)


def warmed(losses_of_t) -> LossSecondMomentSampler:
    """A sampler fed K losses per t, losses_of_t(t, j) the j-th of t."""
    sampler = LossSecondMomentSampler(T)
    t = torch.arange(T).repeat_interleave(HISTORY)
    j = torch.arange(HISTORY).repeat(T)
    sampler.record(
        t, torch.tensor([losses_of_t(a, b) for a, b in zip(t.tolist(), j.tolist(), strict=True)])
    )
    return sampler


def fifo_reference(stream: list[tuple[int, float]], k: int = HISTORY) -> dict[int, list[float]]:
    """improved-diffusion's update_with_all_losses, one loss at a time: each t keeps its last
    k losses, the oldest shifted out."""
    kept: dict[int, list[float]] = {}
    for t, loss in stream:
        kept.setdefault(t, []).append(loss)
        kept[t] = kept[t][-k:]
    return kept


def test_warm_up_draws_uniformly_with_unit_weights():
    sampler = LossSecondMomentSampler(T)
    # every t but the last has its K losses: still the warm-up
    t = torch.arange(T - 1).repeat_interleave(HISTORY)
    sampler.record(t, torch.rand(len(t)) * 100)
    assert not sampler.warmed_up()
    assert torch.equal(sampler.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    drawn, weights = sampler.sample(4000, "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(weights, torch.ones(4000))
    counts = torch.bincount(drawn, minlength=T).double()
    assert (counts - 4000 / T).abs().max() < 5 * math.sqrt(4000 / T)  # uniform, within 5 σ
    sampler.record(torch.full((HISTORY,), T - 1), torch.ones(HISTORY))
    assert sampler.warmed_up()


def test_p_after_the_warm_up_is_the_root_mean_square_of_the_losses():
    """Known losses L[t, j] = (t + 1)(j + 1): p(t) = (1 - u) √mean_j L² / Σ + u / T, computed
    here in numpy from the losses fed in."""
    sampler = warmed(lambda t, j: (t + 1.0) * (j + 1.0))
    losses = np.outer(np.arange(1, T + 1), np.arange(1, HISTORY + 1)).astype(np.float64)
    rms = np.sqrt((losses**2).mean(1))
    expected = (1 - UNIFORM_PROB) * rms / rms.sum() + UNIFORM_PROB / T
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-14)
    # the draws follow it, each weighted by 1 / (T p(t))
    t, w = sampler.sample(20000, "cpu", torch.Generator().manual_seed(1))
    freq = torch.bincount(t, minlength=T).numpy() / 20000
    assert np.abs(freq - expected).max() < 5 * np.sqrt(expected.max() / 20000)
    np.testing.assert_allclose(w.numpy(), 1 / (T * expected[t.numpy()]), rtol=1e-6)


def test_weights_keep_the_objective_exactly():
    """E_{t~p}[w(t) L_t] = Σ_t p(t) w(t) L_t = (1/T) Σ_t L_t: summed over every t (not sampled),
    with the weights the sampler hands out, for a p(t) far from uniform."""
    sampler = warmed(lambda t, j: 10.0 ** (t - 2) * (1 + 0.1 * j))
    p = sampler.probabilities()
    assert p.max() / p.min() > 100
    t, w = sampler.sample(50000, "cpu", torch.Generator().manual_seed(2))
    weight_of = dict(zip(t.tolist(), w.tolist(), strict=True))
    assert sorted(weight_of) == list(range(T))  # every t drawn, so each weight is known
    L = torch.rand(T, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5
    weighted = sum(p[s].item() * weight_of[s] * L[s].item() for s in range(T))
    assert weighted == pytest.approx(L.mean().item(), rel=1e-6)  # the float32 weights' rounding


def test_the_ring_keeps_the_last_k_losses_of_each_t_as_improved_diffusion_does():
    """A stream with many losses of one t in a batch (more than K of some): the kept losses
    and counts equal improved-diffusion's one-at-a-time rule, and so does p(t)."""
    g = torch.Generator().manual_seed(4)
    sampler, stream = LossSecondMomentSampler(T), []
    for batch in (5, 40, 3, 64, 17, 120):
        t = torch.randint(0, T, (batch,), generator=g)
        t[: batch // 2] = 2  # crowd one t
        losses = torch.rand(batch, generator=g, dtype=torch.float64)
        sampler.record(t, losses)
        stream += list(zip(t.tolist(), losses.tolist(), strict=True))
    kept = fifo_reference(stream)
    for t in range(T):
        n = int(sampler.seen[t])
        assert n == sum(s == t for s, _ in stream)
        ring = sorted(sampler.history[t, : min(n, HISTORY)].tolist())
        assert ring == sorted(kept[t]), t
    assert sampler.warmed_up()
    rms = np.array([np.sqrt(np.mean(np.square(kept[t]))) for t in range(T)])
    expected = (1 - UNIFORM_PROB) * rms / rms.sum() + UNIFORM_PROB / T
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-12)


def test_nonfinite_losses_are_not_recorded():
    sampler = warmed(lambda t, j: 1.0)
    sampler.record(torch.tensor([0, 1, 1]), torch.tensor([float("nan"), float("inf"), 4.0]))
    assert sampler.seen.tolist() == [HISTORY, HISTORY + 1, *[HISTORY] * (T - 2)]
    assert torch.isfinite(sampler.probabilities()).all()


def test_state_round_trip_continues_the_same_draws():
    """The history in a state dict saved and loaded with weights_only=True: the copy draws the
    same t and weights from the same seed, and stays equal as both go on learning."""
    sampler = warmed(lambda t, j: (t + 1.0) ** 2 + j)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    buffer.seek(0)
    copy = LossSecondMomentSampler(T)
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    for step in range(3):
        a = sampler.sample(16, "cpu", torch.Generator().manual_seed(step))
        b = copy.sample(16, "cpu", torch.Generator().manual_seed(step))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        losses = torch.rand(16, generator=torch.Generator().manual_seed(10 + step))
        sampler.record(a[0], losses)
        copy.record(b[0], losses)
    assert torch.equal(sampler.history, copy.history) and torch.equal(sampler.seen, copy.seen)


def test_gathered_losses_give_every_rank_the_same_history():
    """Two ranks with different local losses (and batch sizes): with a gather that hands each
    the concatenation in rank order (what all_gather_losses does across processes), both keep
    the history of one process that saw every loss."""
    g = torch.Generator().manual_seed(5)
    t0, l0 = torch.randint(0, T, (7,), generator=g), torch.rand(7, generator=g)
    t1, l1 = torch.randint(0, T, (4,), generator=g), torch.rand(4, generator=g)

    def gather(t, losses):
        return torch.cat([t0, t1]), torch.cat([l0, l1])

    ranks = [LossSecondMomentSampler(T) for _ in range(2)]
    ranks[0].update(t0, l0, gather=gather)
    ranks[1].update(t1, l1, gather=gather)
    whole = LossSecondMomentSampler(T)
    whole.record(torch.cat([t0, t1]), torch.cat([l0, l1]))
    for rank in ranks:
        assert torch.equal(rank.history, whole.history) and torch.equal(rank.seen, whole.seen)


def test_all_gather_in_a_one_process_group(tmp_path: Path):
    """all_gather_losses through torch.distributed itself (gloo, world size 1): the sizes and
    padded tensors go through the collectives and come back as they were."""
    t, losses = torch.tensor([3, 0, 3]), torch.tensor([0.5, 1.5, 2.5])
    assert all_gather_losses(t, losses) == (t, losses)  # no process group: as they are
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        got_t, got_losses = all_gather_losses(t, losses)
    finally:
        dist.destroy_process_group()
    assert torch.equal(got_t, t) and torch.equal(got_losses, losses)


@pytest.mark.slow
def test_two_processes_keep_one_history(tmp_path: Path):
    """Two gloo ranks with different losses and batch sizes: after the warm-up both hold the
    same history (so they draw from the same p(t)), holding the losses of both ranks."""
    out = str(tmp_path / "state")
    mp.spawn(rank_main, args=(str(tmp_path / "pg"), out), nprocs=2)
    states = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert torch.equal(states[0]["history"], states[1]["history"])
    assert torch.equal(states[0]["seen"], states[1]["seen"])
    assert int(states[0]["seen"].sum()) == STEPS * sum(BATCH)


def test_uniform_is_todays_draw_and_keeps_the_state_dict():
    """module.timestep_sampler=uniform draws exactly what training drew before (the same
    torch.randint call: checkpoints' RNG streams continue), and adds no state."""
    sampler = make_timestep_sampler("uniform", 1000)
    assert isinstance(sampler, UniformSampler) and not sampler.state_dict()
    t, w = sampler.sample(32, "cpu", torch.Generator().manual_seed(7))
    assert w is None
    assert torch.equal(t, torch.randint(0, 1000, (32,), generator=torch.Generator().manual_seed(7)))
    assert "timestep_sampler.history" not in make().state_dict()


def test_bad_settings_are_named_before_any_work():
    with pytest.raises(ValueError, match=r"^module.timestep_sampler must be one of .*'loss-sec"):
        make(timestep_sampler="loss-second-moment")
    with pytest.raises(ValueError, match=r"^module.loss=vlb .*set module.learn_sigma=true$"):
        make(loss="vlb")
    with pytest.raises(ValueError, match=r"^module.loss_weighting=min_snr .*loss_weighting=none$"):
        make(loss="vlb", learn_sigma=True, loss_weighting="min_snr")
    # the same from train.py's checks, which run before config.yaml is written
    cfg = OmegaConf.create({"loss": "vlb", "learn_sigma": False, "timestep_sampler": "uniform"})
    with pytest.raises(ValueError, match="module.learn_sigma=true"):
        check_module(cfg)
    with pytest.raises(ValueError, match="module.timestep_sampler"):
        check_module(OmegaConf.create({"timestep_sampler": "importance"}))


def test_vlb_is_the_bound_alone_and_trains_mean_and_variance():
    """module.loss=vlb is T · L_t, the same term L_hybrid adds at λ (so: (hybrid - simple) / λ
    at the same t and ε), and its gradient reaches the mean's outputs as well as the
    variance's (L_hybrid's L_vlb reaches only the variance's)."""
    x = images()
    vlb, hybrid = make(learn_sigma=True, loss="vlb"), make(learn_sigma=True)
    hybrid.load_state_dict(vlb.state_dict())
    for m in (vlb, hybrid):
        m.eval()  # validation's uniform t: the same t and ε from one seed
    with torch.no_grad():
        bound = vlb.loss_fn(x, None, generator=torch.Generator().manual_seed(0))
        both = hybrid.loss_fn(x, None, generator=torch.Generator().manual_seed(0))
        hybrid.hparams.vlb_weight = 0.0
        simple = hybrid.loss_fn(x, None, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(bound, (both - simple) / 0.001, rtol=1e-4, atol=1e-5)
    vlb.train()
    vlb.loss_fn(x, None).mean().backward()
    grad = vlb.net.conv_out.weight.grad  # output channel 0: the mean (ε), 1: the variance (v)
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() > 0


def train_steps(module: DiffusionModule, steps: int, seed: int) -> list[float]:
    torch.manual_seed(seed)
    optimizer = module.configure_optimizers()["optimizer"]
    x, out = images(), []
    for _ in range(steps):
        loss = module.loss_fn(x, None).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(loss.item())
    return out


def test_train_steps_with_loss_second_moment_and_vlb_and_a_resume():
    """iDDPM's L_vlb row in small: L_vlb alone, t importance-sampled. The losses are finite,
    the sampler learns from every step (warmed up once every t has K losses, then p(t) is no longer
    uniform); the module's state dict carries the history, so a copy loaded from it draws the
    same t as the original from there on. A uniform run's state loads into it (warm-up anew)."""
    module = make(learn_sigma=True, loss="vlb", timestep_sampler="loss_second_moment")
    sampler = module.timestep_sampler
    losses = train_steps(module, 20, seed=0)  # 160 draws: every t has K = 10 by then
    assert all(math.isfinite(v) for v in losses)
    assert int(sampler.seen.sum()) == 8 * len(losses) and sampler.warmed_up()
    assert not torch.allclose(sampler.probabilities(), torch.full((T,), 1 / T).double())
    state = module.state_dict()
    assert {"timestep_sampler.history", "timestep_sampler.seen"} <= set(state)

    copy = make(learn_sigma=True, loss="vlb", timestep_sampler="loss_second_moment")
    copy.load_state_dict(state)
    g = [torch.Generator().manual_seed(9) for _ in range(2)]
    t = [
        m.loss_fn(images(), None, generator=gen, return_t=True)[1]
        for m, gen in zip((module, copy), g, strict=True)
    ]
    assert torch.equal(t[0], t[1])
    assert torch.equal(module.timestep_sampler.history, copy.timestep_sampler.history)

    # switching samplers on a resume: the missing history starts a warm-up, extra is ignored
    uniform = make(learn_sigma=True, loss="vlb")
    fresh = make(learn_sigma=True, loss="vlb", timestep_sampler="loss_second_moment")
    fresh.load_state_dict(uniform.state_dict())
    assert int(fresh.timestep_sampler.seen.sum()) == 0
    uniform.load_state_dict(state)


# train.py at debug=fast with T = 2, batches of 16: the warm-up (2 · 10 losses) ends after
# two steps, and the steps after draw from the learned p(t)
RESUMABLE = [
    *FAST,
    "module.timestep_sampler=loss_second_moment",
    "schedule.timesteps=2",
    "dataset.batch_size=16",
    "callbacks.sample_grid.steps=2",
    "callbacks.sample_grid.final_steps=2",
]


@pytest.mark.slow
def test_a_resumed_run_draws_what_the_uninterrupted_one_draws(tmp_path: Path):
    """Lightning's own save and restore (train.py, resume=auto): a run stopped at step 4 and
    resumed to 6 ends with the history, the network and the EMA of a run that went to 6."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    training.train(train_config(whole, [*RESUMABLE, "trainer.max_steps=6"]))
    training.train(train_config(parts, [*RESUMABLE, "trainer.max_steps=4"]))
    training.train(train_config(parts, [*RESUMABLE, "trainer.max_steps=6"]))
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (whole, parts))
    assert a["global_step"] == b["global_step"] == 6
    history, seen = (
        a["state_dict"]["timestep_sampler.history"],
        a["state_dict"]["timestep_sampler.seen"],
    )
    assert int(seen.sum()) == 6 * 16 and bool((seen >= HISTORY).all())  # warmed up
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], value, msg=name)
    assert history.abs().sum() > 0


# OpenAI's own code, as the reference: guided-diffusion (improved-diffusion's resample.py and
# training_losses, unchanged), installed by `make install` without its dependencies
OPENAI = "pip install --no-deps guided-diffusion-sdk==1.0.0 (make install does)"


def test_the_rule_equals_openais_own_resampler(monkeypatch):
    """guided-diffusion's LossSecondMomentResampler and ours, fed the same batches of losses
    (one t many times in some): the same p(t) after every batch, uniform in the warm-up."""
    resample = pytest.importorskip("guided_diffusion.resample", reason=OPENAI)
    # its __init__ names np.int, which numpy removed in 1.24 (the int it meant)
    monkeypatch.setattr(np, "int", int, raising=False)
    theirs = resample.LossSecondMomentResampler(SimpleNamespace(num_timesteps=T))
    ours = LossSecondMomentSampler(T)
    g = torch.Generator().manual_seed(6)
    for batch in (7, 30, 2, 50, 9, 64):
        t = torch.randint(0, T, (batch,), generator=g)
        losses = torch.rand(batch, generator=g, dtype=torch.float64) * (t + 1)
        theirs.update_with_all_losses(t.tolist(), losses.tolist())
        ours.record(t, losses)
        p = theirs.weights() / theirs.weights().sum()
        np.testing.assert_allclose(ours.probabilities().numpy(), p, rtol=1e-12)
    assert theirs._warmed_up() and bool(ours.warmed_up())


@pytest.mark.parametrize("loss", ["vlb", "mse"])
def test_losses_equal_openais_training_losses(loss: str):
    """module.loss=vlb is guided-diffusion's RESCALED_KL loss (--use_kl True) and L_hybrid its
    RESCALED_MSE (learned range σ, rescale_learned_sigmas), sample by sample, at the same x_0,
    t and ε, on the same network and cosine β."""
    gd = pytest.importorskip("guided_diffusion.gaussian_diffusion", reason=OPENAI)
    module = make(learn_sigma=True, loss=loss).eval()
    betas = gd.get_named_beta_schedule("cosine", T)
    np.testing.assert_allclose(module.schedule.betas.numpy(), betas, rtol=1e-6)
    diffusion = gd.GaussianDiffusion(
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.LEARNED_RANGE,
        loss_type=gd.LossType.RESCALED_KL if loss == "vlb" else gd.LossType.RESCALED_MSE,
    )
    x = images(16)
    with torch.no_grad():
        ours = module.loss_fn(x, None, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)  # the t and ε loss_fn drew, in its order
        t = torch.randint(0, T, (len(x),), generator=g)
        noise = torch.randn(x.shape, generator=g)
        theirs = diffusion.training_losses(lambda x_t, s: module.net(x_t, s), x, t, noise=noise)
    assert (t == 0).any() and (t > 0).any()  # the decoder's NLL and KL terms both
    torch.testing.assert_close(ours, theirs["loss"], rtol=1e-4, atol=1e-5)
