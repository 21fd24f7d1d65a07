import pickle
from pathlib import Path

import pytest
import torch

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.module import load_module


class _Payload:
    """Unpickling this would create a marker file: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path: Path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refused to load .*evil.ckpt"):
        load_checkpoint(path)
    assert not marker.exists()
    # the payload is real: a plain unpickle would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_corrupt_checkpoint_is_named(tmp_path: Path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_is_named(trained_run: Path, tmp_path: Path):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["net"]["ch"] = 16  # weights no longer fit the described network
    path = tmp_path / "other.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_module(path)
    del ckpt["hyper_parameters"]
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="not written by ddpm"):
        load_module(path)


def test_checkpoint_round_trip_rebuilds_the_ema(trained_run: Path):
    module = load_module(trained_run / "checkpoints" / "last.ckpt")
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(module.ema.module.conv_in.weight, state["ema.module.conv_in.weight"])
    assert not module.training
    assert pickle.dumps(module.hparams)  # plain data


@pytest.mark.slow
def test_unsafe_file_is_refused_in_one_line_without_torchs_advice(tmp_path: Path):
    """Every entry point that loads a checkpoint, given a malicious one: the project's refusal
    only. Torch's own error ends with "Re-running torch.load with weights_only=False will
    likely succeed", an invitation to run the payload; it must never be shown (nor, under
    HYDRA_FULL_ERROR=1, the chained cause that holds it)."""
    import os
    import subprocess
    import sys

    from conftest import FAST, ROOT, refused_in_one_line

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _Payload(str(marker))}, evil)
    planted = tmp_path / "planted"
    (planted / "checkpoints").mkdir(parents=True)
    (planted / "checkpoints" / "last.ckpt").write_bytes(evil.read_bytes())
    runs = [
        ("sample.py", f"ckpt={evil}", f"out={tmp_path / 's'}", f"hydra.run.dir={tmp_path / 's'}"),
        ("eval.py", f"source={evil}", f"out={tmp_path / 'e.json'}", f"hydra.run.dir={tmp_path}"),
        ("train.py", *FAST, f"resume={evil}", f"hydra.run.dir={tmp_path / 'a'}"),
        ("train.py", *FAST, f"hydra.run.dir={planted}"),  # resume=auto finds it
        (
            "train.py",
            *FAST,
            "experiment=latent_mnist5k",
            f"autoencoder={evil}",
            f"hydra.run.dir={tmp_path / 'b'}",
        ),
    ]
    refused_in_one_line(runs, "refused to load", never="weights_only=False")
    # the whole trace (HYDRA_FULL_ERROR=1): still not torch's advice
    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *runs[2][1:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    shown = proc.stdout + proc.stderr
    assert "Traceback" in shown and "refused to load" in shown
    assert "weights_only=False" not in shown
    assert not marker.exists()
