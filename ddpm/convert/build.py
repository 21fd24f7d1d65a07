"""A checkpoint of this project from a network config, a process and converted weights: the
same file train.py writes (hyper_parameters as DiffusionModule takes them, the network and its
EMA, a fresh optimizer and LR-schedule state), so that sample.py, eval.py and a `resume=`
fine-tuning read it as one of their own. Shared by every converter (diffusers; OpenAI next)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import torch
from torch import Tensor, nn

from ddpm.files import atomic_write
from ddpm.module import DiffusionModule

# Ho et al.'s optimizer and warm-up, as conf/module/diffusion.yaml: what a fine-tuning run
# with the default module config (or experiment=ddpm_cifar10) resumes without a change
OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2.0e-4}
LR_SCHEDULER = {
    "_target_": "torch.optim.lr_scheduler.LinearLR",
    "_partial_": True,
    "start_factor": 2.0e-4,
    "total_iters": 5000,
}


def hyper_parameters(
    net: dict[str, Any], schedule: dict[str, Any], objective: str, variance: str
) -> dict[str, Any]:
    """DiffusionModule's arguments: its defaults, the converted network and process, and
    Ho et al.'s optimizer. `variance` large / small / learned: the DDPM sampler's, which is
    also the bound's (nll_variance) for fixed ones."""
    params = inspect.signature(DiffusionModule).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return defaults | {
        "net": net,
        "schedule": schedule,
        "optimizer": dict(OPTIMIZER),
        "lr_scheduler": dict(LR_SCHEDULER),
        "objective": objective,
        "learn_sigma": variance == "learned",
        "nll_variance": variance if variance in ("large", "small") else "large",
        # a network without a null label has no row to drop labels to (guidance training)
        **({"cond_drop_prob": 0.0} if net.get("null_label") is False else {}),
    }


def build_module(
    hparams: dict[str, Any], weights: Callable[[nn.Module], dict[str, Tensor]]
) -> DiffusionModule:
    """The module of `hparams`, its network and EMA both given `weights(network)` (the state
    dict for the network as built, so a converter maps keys onto its layers), in eval mode."""
    module = DiffusionModule(**hparams)
    state = weights(module.net)
    module.net.load_state_dict(state)
    module.ema.module.load_state_dict(state)
    module.ema.n_averaged.fill_(1)  # the EMA holds weights (an update averages into them)
    return module.eval()


def checkpoint(
    module: DiffusionModule,
    class_names: list[str],
    sampling: dict[str, Any],
    converted_from: dict[str, Any],
) -> dict[str, Any]:
    """The Lightning checkpoint of a converted `module` at step 0. The optimizer and LR
    schedule states are those a fresh run starts with, so `train.py resume=` can fine-tune
    from it (Lightning refuses a checkpoint without them)."""
    optimizers = module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    return {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": module.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [scheduler.state_dict()],
        "hparams_name": "kwargs",
        "hyper_parameters": dict(module.hparams),
        "class_names": list(class_names),
        "sampling": dict(sampling),
        "converted_from": converted_from,
    }


def save(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write `ckpt` atomically: a failed or killed conversion leaves no file at `path`."""
    return atomic_write(path, lambda f: torch.save(ckpt, f))
