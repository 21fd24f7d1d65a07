"""Files from strangers run nothing (issue 23, part 1): every config a file holds is checked by
`ddpm.trusted` before anything is built from it. The sample.py / eval.py / train.py resume=
cases are rows of the bad-input table (tests/bad_cases_untrusted.py); here: the checks
themselves, resume=auto onto a planted file, autoencoder=, `python -m ddpm.autoencoder`, the
latent cache, and every entry point as a user runs it (one line, no traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from bad_cases_untrusted import gadgets
from conftest import FAST, refused_in_one_line, train_config

from ddpm import trusted
from ddpm.autoencoder import main as autoencoder_main
from ddpm.checkpoint import load_checkpoint
from ddpm.cli.train import train
from ddpm.data.latents import LatentDataModule
from ddpm.module import load_module
from ddpm.trusted import UntrustedFile, check_hyper_parameters


@pytest.fixture(scope="module")
def hparams(trained_run: Path) -> dict:
    return torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)[
        "hyper_parameters"
    ]


def planted(ckpt: Path, path: Path, **edit) -> Path:
    """`ckpt` with its hyper_parameters edited, written to `path`."""
    original = torch.load(ckpt, weights_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**original, "hyper_parameters": {**original["hyper_parameters"], **edit}}, path)
    return path


def test_a_checkpoint_of_this_project_passes(hparams: dict, trained_run: Path):
    check_hyper_parameters(hparams, "ckpt")  # nothing raised: its own configs are allowed
    assert hparams["net"]["_target_"] == "ddpm.unet.UNet"
    assert hparams["optimizer"]["_target_"] in trusted.ALLOWED["optimizer"][0]
    load_module(trained_run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("name", list(gadgets(Path("m"), {}).keys()))
def test_every_gadget_shape_is_refused_by_name(name: str, hparams: dict, tmp_path: Path):
    edit = gadgets(tmp_path / "pwned", hparams["net"])[name]
    with pytest.raises(UntrustedFile, match=r"^CKPT: hyper_parameters\.\S+ .*refusing to load it$"):
        check_hyper_parameters({**hparams, **edit}, "CKPT")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "value,message",
    [
        ({"a": {"_target_": "x.y"}}, r"hyper_parameters.extra.a._target_ names `x.y`"),
        ([1, {"_partial_": True}], r"hyper_parameters.extra\[1\]._partial_ sets _partial_"),
        (b"bytes", r"hyper_parameters.extra holds a bytes, not plain data"),
        ({1: 2}, r"hyper_parameters.extra has a key of type int"),
    ],
)
def test_values_outside_the_slots_are_plain_data(value, message, hparams: dict):
    with pytest.raises(UntrustedFile, match=message):
        check_hyper_parameters({**hparams, "extra": value}, "CKPT")


def test_a_users_own_network_class_loads_once_allowed(hparams: dict, monkeypatch):
    mine = {**hparams, "net": {**hparams["net"], "_target_": "mypackage.MyNet"}}
    with pytest.raises(UntrustedFile, match="names `mypackage.MyNet`, which is not a network"):
        check_hyper_parameters(mine, "CKPT")
    monkeypatch.setitem(trusted.ALLOWED, "network", ({"ddpm.unet.UNet"}, "a network"))
    trusted.allow("network", "mypackage.MyNet")
    check_hyper_parameters(mine, "CKPT")
    with pytest.raises(ValueError, match="kind must be one of"):
        trusted.allow("anything", "os.system")


def test_an_autoencoder_is_not_a_diffusion_models_network(hparams: dict, trained_run, tmp_path):
    """The slot `net` admits an AutoencoderKL (the autoencoder stage's checkpoints); a
    diffusion checkpoint whose net is one is refused by load_module, before it is built."""
    net = {"_target_": "diffusers.AutoencoderKL", "latent_channels": 2}
    path = planted(trained_run / "checkpoints" / "last.ckpt", tmp_path / "ae-net.ckpt", net=net)
    load_checkpoint(path)  # a well-formed file for the autoencoder stage
    with pytest.raises(UntrustedFile, match="names `diffusers.AutoencoderKL`, which is not a net"):
        load_module(path)


def test_resume_auto_onto_a_planted_checkpoint_stops_the_run(trained_run: Path, tmp_path: Path):
    """A run directory whose newest checkpoint names code: resume=auto stops with the refusal
    instead of setting the file aside and resuming from an older one (a planted file is a
    reason to look, not a corrupt write)."""
    run = tmp_path / "run"
    marker = tmp_path / "pwned"
    edit = gadgets(marker, {})["open"]
    ckpt = planted(
        trained_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt", **edit
    )
    before = ckpt.read_bytes()
    with pytest.raises(
        UntrustedFile, match=r"last.ckpt: hyper_parameters.schedule names `builtins"
    ):
        train(train_config(run, FAST))
    assert ckpt.read_bytes() == before and not marker.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]


def test_autoencoder_option_refuses_a_planted_autoencoder(trained_run: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "ae.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"net": gadgets(marker, {})["open"]["schedule"], "kl_weight": 0.0},
        },
        evil,
    )
    cfg = train_config(
        tmp_path / "run",
        [
            *FAST,
            "experiment=latent_mnist5k",
            f"autoencoder={evil}",
            f"dataset.cache_dir={tmp_path}",
        ],
    )
    with pytest.raises(UntrustedFile, match=r"ae.ckpt: hyper_parameters.net names `builtins.open`"):
        train(cfg)
    assert not marker.exists()


def test_autoencoder_option_given_a_directory_names_the_file(tmp_path: Path):
    run = tmp_path / "aerun"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    cfg = train_config(tmp_path / "run", [*FAST, "experiment=latent_mnist5k", f"autoencoder={run}"])
    with pytest.raises(
        FileNotFoundError,
        match=rf"^autoencoder={run} is a directory; give the checkpoint file .*e.g. "
        rf"autoencoder={run}/checkpoints/last.ckpt",
    ):
        train(cfg)


def test_wrapping_a_folder_whose_config_names_code_writes_nothing(tmp_path: Path, capsys):
    folder = tmp_path / "vae"
    folder.mkdir()
    config = {
        "_class_name": "AutoencoderKL",
        "latent_channels": 4,
        "norm_num_groups": "${oc.env:HOME}",
    }
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "vae.ckpt"
    with pytest.raises(SystemExit):
        autoencoder_main([str(folder), str(out)])
    assert "vae: config.json.norm_num_groups holds the interpolation" in capsys.readouterr().err
    assert not out.exists()


def test_a_latent_cache_holding_a_pickle_payload_runs_nothing(tmp_path: Path):
    """The latent cache holds no configs; it is loaded weights-only (as before issue 23), so
    a planted pickle is set aside, never run: kept as the cache's entry of this file's list of
    everything that reads a file (its content checks are tests/test_caches.py's)."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "latents.pt"
    torch.save({"key": {}, "train": Payload()}, path)
    module = LatentDataModule.__new__(LatentDataModule)  # _load reads no other state
    assert module._load(path, {}) is None
    assert not marker.exists() and not path.exists()


@pytest.mark.slow
def test_every_entry_point_refuses_a_config_gadget_in_one_line(trained_run: Path, tmp_path: Path):
    """As a user runs them: sample.py, eval.py (FID and nll=true), train.py resume= and
    resume=auto, and a latent run's autoencoder=: the refusal alone, no traceback, and the
    gadget's marker file never made."""
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    marker = tmp_path / "pwned"
    edit = gadgets(marker, {})["open"]
    evil = planted(ckpt, tmp_path / "evil.ckpt", **edit)
    planted(ckpt, tmp_path / "planted" / "checkpoints" / "last.ckpt", **edit)
    evil_ae = tmp_path / "ae.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"net": edit["schedule"], "kl_weight": 0}}, evil_ae
    )
    runs = [
        ("sample.py", f"ckpt={evil}", f"out={tmp_path / 's'}"),
        ("eval.py", f"source={evil}", f"out={tmp_path / 'e.json'}"),
        ("eval.py", f"source={evil}", "nll=true", f"out={tmp_path / 'n.json'}"),
        ("train.py", *FAST, f"resume={evil}", f"hydra.run.dir={tmp_path / 'a'}"),
        ("train.py", *FAST, f"hydra.run.dir={tmp_path / 'planted'}"),
        (
            "train.py",
            *FAST,
            "experiment=latent_mnist5k",
            f"autoencoder={evil_ae}",
            f"dataset.cache_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'b'}",
        ),
    ]
    refused_in_one_line(runs, "names `builtins.open`", "refusing to load it")
    assert not marker.exists()


def test_a_checkpoint_of_ones_own_class_loads_with_trusted_targets(trained_run: Path, tmp_path):
    """A network class of the user's own: refused by default with the way to trust it named,
    drawn from with trusted_targets=[that class]; a standard-library callable gets no hint."""
    from conftest import compose_config

    from ddpm.cli.sample import sample

    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    net = {**ckpt["hyper_parameters"]["net"], "_target_": "own_net.OwnUNet"}
    path = planted(trained_run / "checkpoints" / "last.ckpt", tmp_path / "own.ckpt", net=net)
    args = [f"ckpt={path}", "n=2", "steps=2"]
    with pytest.raises(
        UntrustedFile,
        match=r"names `own_net.OwnUNet`, which is not a network of this project or an "
        r"autoencoder this project uses \(if it is a class of your own, trust it with "
        r"trusted_targets=\[own_net.OwnUNet\]\); refusing",
    ):
        sample(compose_config([*args, f"out={tmp_path / 'a'}"], name="sample"))
    assert not (tmp_path / "a").exists()
    saved = {kind: set(names) for kind, (names, _) in trusted.ALLOWED.items()}
    try:
        trusted_args = [*args, f"out={tmp_path / 'b'}", "trusted_targets=[own_net.OwnUNet]"]
        sample(compose_config(trusted_args, name="sample"))
    finally:
        for kind, names in saved.items():
            trusted.ALLOWED[kind][0].intersection_update(names)
    assert (tmp_path / "b" / "grid.png").is_file()
    with pytest.raises(
        UntrustedFile,
        match=r"names `builtins.open`, which is not a noise "
        r"schedule of this project; refusing",
    ):
        check_hyper_parameters({"schedule": {"_target_": "builtins.open"}}, "CKPT")


def test_trusted_targets_must_be_dotted_names():
    with pytest.raises(ValueError, match=r"trusted_targets must be a list of dotted names"):
        trusted.allow_targets("own_net.OwnUNet")
    with pytest.raises(ValueError, match=r"trusted_targets entries are dotted names .*'a b'"):
        trusted.allow_targets(["a b"])


def test_a_run_of_ones_own_network_class_resumes(tmp_path: Path):
    """train.py trusts the _target_s of its own module config: a run of the user's network
    class continues from its own checkpoints (resume=auto), no trusted_targets needed."""
    run = tmp_path / "run"
    own = [*FAST, "model._target_=own_net.OwnUNet"]
    saved = {kind: set(names) for kind, (names, _) in trusted.ALLOWED.items()}
    try:
        train(train_config(run, [*own, "trainer.max_steps=2"]))
        for kind, names in saved.items():  # as a fresh process would start
            trusted.ALLOWED[kind][0].intersection_update(names)
        metrics = train(train_config(run, [*own, "trainer.max_steps=3"]))
    finally:
        for kind, names in saved.items():
            trusted.ALLOWED[kind][0].intersection_update(names)
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert metrics
