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
