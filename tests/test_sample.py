"""sample.py's outputs: evaluator .npz, animation, noise-level figure, sentences, resuming."""

from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, run_script
from fakes import pattern, write_idx
from PIL import Image


@pytest.fixture(scope="module")
def letters_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny class-conditional model trained 4 steps on a fake EMNIST letters copy."""
    root = tmp_path_factory.mktemp("emnist")
    raw = root / "EMNIST" / "raw"
    write_idx(raw / "emnist-letters-train-images-idx3-ubyte", np.stack([pattern(28)[0].T] * 52))
    write_idx(raw / "emnist-letters-train-labels-idx1-ubyte", np.arange(52) % 26 + 1)
    run = root / "run"
    run_script(
        "train.py",
        *FAST,
        "dataset=emnist",
        f"paths.data_dir={root}",
        "dataset.batch_size=8",
        f"hydra.run.dir={run}",
    )
    return run / "checkpoints" / "last.ckpt"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.mark.slow
def test_npz_animation_and_noise_levels(trained_run: Path, tmp_path: Path):
    out = tmp_path / "s"
    run_script(
        "sample.py",
        f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}",
        "n=4",
        "batch_size=4",
        "sampler=ddim",
        "steps=6",
        "labels=cycle",
        "guidance=1.5",
        "npz=true",
        "animate=true",
        "noise_levels=true",
        f"out={out}",
    )
    arr = np.load(out / "samples.npz")["arr_0"]
    assert arr.shape == (4, 28, 28, 1) and arr.dtype == np.uint8
    assert np.array_equal(arr[2, :, :, 0], _pixels(out / "images" / "000002.png"))
    gif = Image.open(out / "animation.gif")
    assert gif.n_frames == 7  # the noise, then each of the 6 steps
    first = np.asarray(gif.convert("L")).copy()
    gif.seek(gif.n_frames - 1)
    assert gif.info["duration"] >= 1000  # the final image is held
    assert not np.array_equal(first, np.asarray(gif.convert("L")))
    figure = Image.open(out / "noise_levels.png")
    assert figure.width == (2 + 6 * (28 + 2)) * 3  # six noise levels side by side, 3x scale

    # a real image instead of the first sample: the t = 0 cell shows it (σ_0 = 0.01)
    real = np.zeros((28, 28), np.uint8)
    real[4:24, 10:18] = 255
    Image.fromarray(real).save(tmp_path / "real.png")
    out2 = tmp_path / "s2"
    run_script(
        "sample.py",
        f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}",
        "n=1",
        "steps=2",
        "noise_levels=true",
        f"noise_levels_image={tmp_path / 'real.png'}",
        f"out={out2}",
    )
    # below the caption and the t= strip (14 px each), past the 2 px grid padding, 3x scale
    cell = np.asarray(Image.open(out2 / "noise_levels.png").convert("L"))[28 + 6 :: 3, 6::3]
    assert np.abs(cell[:28, :28].astype(int) - real).mean() < 8


@pytest.mark.slow
def test_class_name_and_bad_labels(trained_run: Path, tmp_path: Path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    run_script(
        "sample.py", f"ckpt={ckpt}", "n=2", "steps=3", "class_name=7", f"out={tmp_path / 'a'}"
    )
    assert len(list((tmp_path / "a" / "images").glob("*.png"))) == 2
    proc = run_script(
        "sample.py",
        f"ckpt={ckpt}",
        "n=2",
        "steps=3",
        "class_name=q",
        f"out={tmp_path / 'b'}",
        check=False,
    )
    assert (
        proc.returncode != 0 and "class_name='q' is not one of the model's classes" in proc.stderr
    )
    proc = run_script(
        "sample.py",
        f"ckpt={ckpt}",
        "n=2",
        "steps=3",
        "labels=[1,12]",
        f"out={tmp_path / 'c'}",
        check=False,
    )
    assert (
        proc.returncode != 0 and "labels [12] are outside the model's classes 0..9" in proc.stderr
    )
    proc = run_script(
        "sample.py", f"ckpt={ckpt}", "n=2", "image_size=32", f"out={tmp_path / 'd'}", check=False
    )
    assert proc.returncode != 0
    assert "trained on 1x28x28 images, not 1x32x32 as asked" in proc.stderr


@pytest.mark.slow
def test_resume_finishes_without_redoing(trained_run: Path, tmp_path: Path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    full, part = tmp_path / "full", tmp_path / "part"
    args = [f"ckpt={ckpt}", "n=6", "batch_size=2", "steps=3"]
    run_script("sample.py", *args, f"out={full}")
    run_script("sample.py", *args, f"out={part}")
    # an interruption after 4 images: the last two and the grid were never written
    for name in ("000004.png", "000005.png"):
        (part / "images" / name).unlink()
    (part / "grid.png").unlink()
    kept = (part / "images" / "000001.png").stat().st_mtime_ns
    run_script("sample.py", *args, f"out={part}", "resume=true")
    assert (part / "images" / "000001.png").stat().st_mtime_ns == kept  # not redone
    for k in range(6):
        name = f"{k:06d}.png"
        assert np.array_equal(_pixels(full / "images" / name), _pixels(part / "images" / name))
    assert np.array_equal(_pixels(full / "grid.png"), _pixels(part / "grid.png"))
    # killed after its last image, before the grid: resuming draws nothing and writes the grid
    (part / "grid.png").unlink()
    run_script("sample.py", *args, f"out={part}", "resume=true")
    assert np.array_equal(_pixels(full / "grid.png"), _pixels(part / "grid.png"))


@pytest.mark.slow
def test_text_writes_a_sentence(letters_ckpt: Path, tmp_path: Path):
    out = tmp_path / "t"
    run_script(
        "sample.py",
        f"ckpt={letters_ckpt}",
        "text='HELLO WORLD'",
        "text_width=5",
        "steps=3",
        "guidance=2",
        "animate=true",
        "animation_hold_ms=3500",
        "scale=1",
        f"out={out}",
    )
    page = Image.open(out / "text.png")
    assert page.size == (5 * 28, 2 * 28)  # two lines of five letters
    gif = Image.open(out / "animation.gif")
    assert gif.size[0] == 5 * 28 and gif.n_frames == 4
    gif.seek(gif.n_frames - 1)
    assert gif.info["duration"] == 3500  # the sentence held as long as asked
    proc = run_script(
        "sample.py",
        f"ckpt={letters_ckpt}",
        "text='HI 5'",
        "steps=2",
        f"out={tmp_path / 'bad'}",
        check=False,
    )
    assert proc.returncode != 0 and "cannot write '5'" in proc.stderr
