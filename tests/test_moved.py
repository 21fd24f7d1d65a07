"""The names of the flat package keep working where users wrote them: `_target_`s in their own
configs (ddpm.callbacks.FID, ddpm.latents.LatentDataModule ...) name the same classes, a
checkpoint written before the regrouping resumes (its dataset record names the old class), and
`ddpm.load_module` is the package's loading API."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, ROOT, train_config
from hydra.utils import get_object, instantiate

import ddpm
from ddpm.cli.errors import CheckOutputDir
from ddpm.cli.train import train
from ddpm.data.datamodule import ImageDataModule
from ddpm.data.latents import LatentDataModule
from ddpm.module import DiffusionModule
from ddpm.moved import MODULES, PACKAGES, canonical
from ddpm.run import callbacks, launch, stopping, tracking
from ddpm.run.checkpoints import ModelCheckpoint
from ddpm.schedule import NoiseSchedule
from ddpm.unet import UNet

FIXTURE = Path(__file__).parent / "fixtures" / "main_a2bb1d3.ckpt"

# every `_target_` of this project that conf/ named before the regrouping, and what it is now
OLD_TARGETS = {
    "ddpm.autoencoder.AutoencoderModule": "ddpm.autoencoder.AutoencoderModule",
    "ddpm.callbacks.FID": callbacks.FID,
    "ddpm.callbacks.LossCurve": callbacks.LossCurve,
    "ddpm.callbacks.ReconstructionGrid": callbacks.ReconstructionGrid,
    "ddpm.callbacks.SampleGrid": callbacks.SampleGrid,
    "ddpm.cluster.CheckLauncher": launch.CheckLauncher,
    "ddpm.data.ImageDataModule": ImageDataModule,
    "ddpm.errors.CheckOutputDir": CheckOutputDir,
    "ddpm.latents.LatentDataModule": LatentDataModule,
    "ddpm.module.DiffusionModule": DiffusionModule,
    "ddpm.resume.ModelCheckpoint": ModelCheckpoint,
    "ddpm.resume.Preemption": stopping.Preemption,
    "ddpm.schedule.NoiseSchedule.cosine": NoiseSchedule.cosine,
    "ddpm.tracking.wandb_logger": tracking.wandb_logger,
    "ddpm.unet.UNet": UNet,
}


@pytest.mark.parametrize("old", list(OLD_TARGETS))
def test_old_targets_name_the_same_objects(old: str):
    new = OLD_TARGETS[old]
    new = get_object(new) if isinstance(new, str) else new
    assert get_object(old) == new  # (==: a classmethod is bound anew at each access)
    assert get_object(canonical(old)) == new
    assert canonical(canonical(old)) == canonical(old)


def test_old_target_instantiates_and_unknown_names_say_where_they_looked():
    cb = instantiate({"_target_": "ddpm.callbacks.LossCurve", "every_n_steps": 3})
    assert isinstance(cb, callbacks.LossCurve) and cb.every_n_steps == 3
    with pytest.raises(AttributeError, match=r"ddpm.resume has no 'nothing' \(looked in"):
        _ = ddpm.resume.nothing
    with pytest.raises(AttributeError, match="ddpm.cli.errors.CheckOutputDir"):
        _ = ddpm.resume.CheckRunDirectory
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = ddpm.nothing
    assert canonical("ddpm.nothing.Here") == "ddpm.nothing.Here"  # compared as written
    assert canonical("torch.optim.Adam") == "torch.optim.Adam"


def test_the_tables_name_modules_that_exist():
    """Each old module's homes import; no old name is also a module of today (it would shadow
    the stand-in)."""
    for old, homes in {**MODULES, **PACKAGES}.items():
        for home in homes:
            assert get_object(home), home
        if old in MODULES:
            assert not (ROOT / "ddpm" / f"{old}.py").exists(), old


def test_load_module_is_the_package_api_and_imports_stay_light():
    module = ddpm.load_module(FIXTURE)
    assert isinstance(module, DiffusionModule)
    assert isinstance(module.ema.module, UNet) and isinstance(module.schedule, NoiseSchedule)
    assert module.hparams.objective == "v"
    probe = "import sys, ddpm.schedule, ddpm.samplers; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


def test_a_checkpoint_from_before_the_regrouping_resumes(tmp_path: Path):
    """Its `dataset` record names ddpm.data.ImageDataModule, today's config
    ddpm.data.datamodule.ImageDataModule: one class, so no "dataset changed" refusal."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURE, run / "checkpoints" / "step_0000004.ckpt")
    metrics = train(train_config(run, [*FAST, "trainer.max_steps=6"]))
    assert metrics["train/loss"] > 0
    assert (run / "checkpoints" / "step_0000006.ckpt").is_file()
