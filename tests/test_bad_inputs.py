"""The bad-input table: each wrong value gets a specific message that names it (and the fix),
and nothing already on disk changes. In-process through the entry points' own functions (the
subprocess path is covered in test_entrypoints / test_resume).

    pytest tests/test_bad_inputs.py -s | grep BAD-INPUT   # each message (docs/bad_inputs.md)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import bad_cases_caches
import bad_cases_hangs
import bad_cases_untrusted
import bad_cases_values
import pytest
import torch
from bad_cases_sample_eval import SAMPLE_EVAL_CASES
from bad_cases_train import TRAIN_CASES
from conftest import compose_config, train_config

from ddpm.cli import eval as evaluation
from ddpm.cli import sample as sampling
from ddpm.cli import train as training

TRAIN = ["debug=fast", "+trainer.enable_progress_bar=false"]

# (case, entry point, overrides, the message it must give). {ckpt}, {evil}, {other}, {empty},
# {corrupt}, {tmp} are filled in from fixtures.
CASES = [
    ("unknown key", "train", ["learning_rate=1"], r"Could not override 'learning_rate'"),
    (
        "unknown option of a group",
        "train",
        ["schedule=quadratic"],
        r"Could not find 'schedule/quadratic'.*Available options.*cosine.*linear.*sigmoid",
    ),
    (
        "β outside (0, 1)",
        "train",
        ["schedule=linear", "schedule.beta_end=1.5"],
        r"linear schedule needs 0 < beta_start <= beta_end < 1, got .*beta_end=1.5",
    ),
    (
        "no timesteps",
        "train",
        ["schedule.timesteps=0"],
        r"schedule.timesteps must be a positive integer, got 0",
    ),
    (
        "image size the UNet can't halve",
        "train",
        ["dataset.image_size=29", "model.image_size=29"],
        r"^model.image_size=29 is not divisible by 2, the UNet's downsampling factor",
    ),
    ("batch size 0", "train", ["dataset.batch_size=0"], r"dataset.batch_size must be >= 1, got 0"),
    (
        "validation fraction out of range",
        "train",
        ["dataset.val_fraction=1.5"],
        r"dataset.val_fraction must be in \[0, 1\), got 1.5",
    ),
    (
        "unknown objective",
        "train",
        ["module.objective=score"],
        r"module.objective must be one of \('eps', 'x0', 'v'\), got 'score'",
    ),
    ("EMA decay above 1", "train", ["module.ema_decay=1.5"], r"module.ema_decay"),
    (
        "negative max_steps",
        "train",
        ["trainer.max_steps=-5"],
        r"`max_steps` must be a non-negative integer or -1 \(infinite steps\). You passed in -5",
    ),
    (
        "wrong dataset path",
        "train",
        ["dataset=folder", "dataset.data_dir={tmp}/no-such-folder"],
        r"no-such-folder",
    ),
    (
        "empty dataset folder",
        "train",
        ["dataset=folder", "dataset.data_dir={empty}"],
        r"the folder .*empty holds no images .* check dataset.data_dir",
    ),
    (
        "unreadable image in a folder",
        "train",
        ["dataset=folder", "dataset.data_dir={corrupt}", "dataset.class_folders=false"],
        r"bad\.png.*skip_bad=true",
    ),
    (
        "more classes in the data than configured",
        "train",
        ["dataset.num_classes=3", "model.num_classes=3"],
        r"has 10 classes but dataset.num_classes=3",
    ),
    (
        "unknown divergence policy",
        "train",
        ["module.nonfinite=ignore"],
        r"module.nonfinite must be one of \('stop', 'skip'\), got 'ignore'",
    ),
    (
        "two-channel images",
        "train",
        ["dataset.channels=2"],
        r"dataset.channels 1 or 3",
    ),
    (
        "checkpoint of another architecture",
        "train",
        ["resume={other}"],
        r"other.ckpt was trained with another network: ch 48 \(this run's 8\).*model.<key>",
    ),
    (
        "missing checkpoint to resume",
        "train",
        ["resume={tmp}/nope.ckpt"],
        r"checkpoint not found: .*nope.ckpt",
    ),
    (
        "malicious checkpoint",
        "train",
        ["resume={evil}"],
        r"refused to load .*evil.ckpt: .* could run code when unpickled \(Unsupported global: "
        r"GLOBAL getattr\)\. Only load",
    ),
    (
        "sample: negative steps",
        "sample",
        ["steps=-3"],
        r"sampler steps must be in \[1, 1000\] \(the schedule's T\), got -3",
    ),
    ("sample: zero images", "sample", ["n=0"], r"n and batch_size must be >= 1"),
    (
        "sample: guidance without a conditional model",
        "sample_uncond",
        ["guidance=3"],
        r"guidance=3 needs a class-conditional model, and .*uncond.ckpt is unconditional",
    ),
    (
        "sample: label outside the classes",
        "sample",
        ["n=2", "labels=[3,12]"],
        r"labels \[12\] are outside the model's classes 0..9",
    ),
    (
        "sample: text lines of no width",
        "sample",
        ["text=12 34", "text_width=0"],
        r"text_width must be >= 1 \(characters per line\), got 0",
    ),
    (
        "sample: not a ddpm checkpoint",
        "sample",
        ["ckpt={foreign}"],
        r"was not written by ddpm's DiffusionModule",
    ),
    (
        "sample: unknown sampler option",
        "sample",
        ["+sampler.temperature=2"],
        r"sampler option 'temperature' is not one of ddpm's: \['clip_x0', 'variance'\]",
    ),
    (
        "sample: DDIM η below 0",
        "sample",
        ["sampler=ddim", "sampler.eta=-1"],
        r"eta must be >= 0",
    ),
    (
        "train: the grid's sampler option out of range",
        "train",
        ["sampler=abm", "sampler.order=9"],
        r"sampler.order=9: the ABM predictor's order is an integer from 1 to 4",
    ),
    (
        "sample: ABM order out of range",
        "sample",
        ["sampler=abm", "sampler.order=7"],
        r"sampler.order=7: the ABM predictor's order is an integer from 1 to 4",
    ),
    (
        "sample: unknown step spacing",
        "sample",
        ["sampler=dpmpp_3m", "sampler.spacing=even"],
        r"sampler.spacing='even': the timestep spacing is 'uniform', 'quadratic', 'logsnr'",
    ),
    (
        "eval: a table entry's sampler option out of range",
        "eval",
        ["sampler=abm", "sampler.order=0", "table=[abm:10]"],
        r"sampler.order=0: the ABM predictor's order is an integer from 1 to 4",
    ),
    (
        "sample: would overwrite earlier samples",
        "sample_again",
        [],
        r"already holds samples .*resume=true to continue .*overwrite=true",
    ),
    (
        "eval: missing Inception weights",
        "eval",
        ["weights={tmp}/no-weights.pth"],
        r"Inception weights not found: .*no-weights.pth",
    ),
    (
        "eval: too few images for a covariance",
        "eval",
        ["n=1", "features=64"],
        r"FID needs at least 2 images per set, got 1",
    ),
    (
        "eval: unknown source",
        "eval",
        ["source={tmp}/samples.txt"],
        r"not an .npz, a folder of images or a .ckpt",
    ),
    (
        "eval: malformed step-count table",
        "eval",
        ["table=[ddim50]"],
        r"table entries are sampler:steps, e.g. ddim:50; got 'ddim50'",
    ),
]


# round two (issue 16): the sample/eval cases and the train cases live beside this file, one
# list each, run by the same test below
CASES += SAMPLE_EVAL_CASES + TRAIN_CASES
# round three (issue 23): one list per concern, each with the files its cases name
ROUND_THREE = (bad_cases_untrusted, bad_cases_hangs, bad_cases_values, bad_cases_caches)
CASES += [case for cases in ROUND_THREE for case in cases.CASES]


@pytest.fixture(scope="module")
def files(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    from PIL import Image

    for k in range(3):
        Image.new("L", (28, 28), color=k * 40).save(root / "corrupt" / f"ok{k}.png")
    (root / "corrupt" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")

    class Payload:
        def __reduce__(self):
            return (Path.touch, (root / "pwned",))

    torch.save({"state_dict": {}, "x": Payload()}, root / "evil.ckpt")
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    from ddpm.module import DiffusionModule

    hparams = {**ckpt["hyper_parameters"]}
    hparams["net"] = {**hparams["net"], "ch": 48}  # a wider network
    other = {**ckpt, "hyper_parameters": hparams}
    other["state_dict"] = DiffusionModule(**hparams).state_dict()
    torch.save(other, root / "other.ckpt")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, root / "foreign.ckpt")
    (root / "samples.txt").write_text("not images")
    extra: dict[str, str] = {}
    for cases in ROUND_THREE:
        (root / cases.__name__).mkdir()
        extra |= cases.files(root / cases.__name__, trained_run / "checkpoints" / "last.ckpt")
    return {
        **extra,
        "ckpt": str(trained_run / "checkpoints" / "last.ckpt"),
        "evil": str(root / "evil.ckpt"),
        "other": str(root / "other.ckpt"),
        "foreign": str(root / "foreign.ckpt"),
        "empty": str(root / "empty"),
        "corrupt": str(root / "corrupt"),
        "tmp": str(root),
    }


@pytest.fixture(scope="module")
def unconditional_ckpt(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The trained checkpoint with its class embedding removed: an unconditional model."""
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"]}
    ckpt["hyper_parameters"]["net"] = {**ckpt["hyper_parameters"]["net"], "num_classes": None}
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if "class_embed" not in k}
    path = tmp_path_factory.mktemp("uncond") / "uncond.ckpt"
    torch.save(ckpt, path)
    return str(path)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_case(kind: str, overrides: list[str], files: dict, uncond: str, out: Path) -> None:
    """Runs one entry point with `overrides`; `out` holds earlier outputs that must survive."""
    overrides = [o.format(**files) for o in overrides]
    if kind == "train":
        training.train(train_config(out, [*TRAIN, *overrides]))
    elif kind.startswith("sample"):
        ckpt = uncond if kind == "sample_uncond" else files["ckpt"]
        args = [f"ckpt={ckpt}", f"out={out / 'samples'}", "n=4", "steps=2"]
        sampling.sample(compose_config([*args, *overrides], name="sample"))
    else:
        from ddpm.metrics.inception import fid_helper_file

        args = [
            f"source={files['ckpt']}",
            "n=70",
            "reference_n=100",
            "features=64",
            f"weights={fid_helper_file()}",
            f"cache_dir={out / 'cache'}",
            f"out={out / 'result.json'}",
        ]
        evaluation.evaluate(compose_config([*args, *overrides], name="eval"))


@pytest.mark.parametrize(
    "kind,overrides,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_named_and_changes_nothing(
    kind, overrides, message, files, unconditional_ckpt, tmp_path: Path
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("a file the user made")
    shutil.copy(files["ckpt"], out / "earlier.ckpt")
    if kind == "sample_again":  # earlier samples, which the second run must keep
        run_case("sample", [], files, unconditional_ckpt, out)
    before = snapshot(out)
    with pytest.raises(Exception, match=f"(?s){message}") as info:
        run_case(kind, overrides, files, unconditional_ckpt, out)
    assert not isinstance(info.value, AssertionError), info.value
    print(f"BAD-INPUT|{kind}|{' '.join(overrides)}|{str(info.value).splitlines()[0]}")
    after = snapshot(out)
    assert {k: after[k] for k in before} == before, "an existing file changed"
    assert not (Path(files["tmp"]) / "pwned").exists()


def test_a_bad_sampler_option_writes_no_output_folder(files, unconditional_ckpt, tmp_path: Path):
    """The sampler's option values are checked by a dry run before the output folder is made:
    a wrong order leaves no half-made folder whose sample.json a rerun would then refuse."""
    with pytest.raises(ValueError, match="sampler.order=5"):
        run_case("sample", ["sampler=abm", "sampler.order=5"], files, unconditional_ckpt, tmp_path)
    assert not (tmp_path / "samples").exists()


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)
