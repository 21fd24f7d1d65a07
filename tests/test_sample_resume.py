"""sample.py resume=true / overwrite=true never mix, trust or leave behind images: the settings
are recorded and checked, cut PNGs are drawn again, the npz holds exactly n images, and
overwrite=true removes sample.py's own files only. Bad inputs of the entry points are one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_script
from PIL import Image

from ddpm import files
from ddpm.cli import sample as sampling


def sample(ckpt: Path, out: Path, *overrides: str) -> Path:
    args = [f"ckpt={ckpt}", f"out={out}", "steps=2", "batch_size=2", "npz=true"]
    args += ["precision=32", *overrides]  # bf16 autocast is slower on most CPUs
    return sampling.sample(compose_config(args, name="sample"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def ckpt(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def full(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six images drawn in one go, which every resumed run must reproduce."""
    return sample(ckpt, tmp_path_factory.mktemp("full") / "s", "n=6")


def test_cut_pngs_are_drawn_again_not_trusted(ckpt, full, tmp_path, caplog):
    out = sample(ckpt, tmp_path / "s", "n=6")
    (out / "images" / "000002.png").write_bytes((out / "images" / "000002.png").read_bytes()[:60])
    (out / "images" / "000004.png").write_bytes(b"")  # a 0-byte file of a full disk
    (out / "images" / ".000005.png.x1y2.tmp").write_bytes(b"half")  # a write cut by a kill
    (out / "grid.png").unlink()
    kept = (out / "images" / "000001.png").stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        sample(ckpt, out, "n=6", "resume=true")
    assert "000002.png is not a whole PNG" in caplog.text and "drawing it again" in caplog.text
    assert (out / "images" / "000001.png").stat().st_mtime_ns == kept  # whole ones not redone
    for k in range(6):
        name = f"images/{k:06d}.png"
        assert np.array_equal(pixels(full / name), pixels(out / name)), name
    assert np.array_equal(pixels(full / "grid.png"), pixels(out / "grid.png"))
    assert not list((out / "images").glob(".*.tmp"))


def test_resume_with_other_settings_or_weights_is_refused(ckpt, tmp_path):
    out = sample(ckpt, tmp_path / "s", "n=4")
    record = json.loads((out / "sample.json").read_text())
    assert record["seed"] == 0 and record["sampler"] == "ddpm" and record["steps"] == 2
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"other settings \(steps 2 there, 3 now\)"):
        sample(ckpt, out, "n=4", "resume=true", "steps=3")
    with pytest.raises(ValueError, match=r"other settings \(guidance 2.0 there, 1.5 now\)"):
        sample(ckpt, out, "n=4", "resume=true", "guidance=1.5")  # 2.0: the checkpoint's
    # the same file name, other weights (training went on): another checkpoint
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"] = {k: v + 1e-3 for k, v in state["state_dict"].items()}
    moved = tmp_path / "last.ckpt"
    torch.save(state, moved)
    with pytest.raises(ValueError, match=r"other settings \(ckpt_sha256 \"[0-9a-f]+"):
        sample(moved, out, "n=4", "resume=true")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # samples of an older sample.py, without the record: they cannot be checked
    (out / "sample.json").unlink()
    with pytest.raises(FileExistsError, match=r"holds samples but no sample.json"):
        sample(ckpt, out, "n=4", "resume=true")


def test_resume_with_a_smaller_n_writes_exactly_n(ckpt, full, tmp_path, caplog):
    """n=4 after n=6: the user asks for 4 images, so samples.npz and grid.png hold 4 (the
    first 4, the same as a run of n=4); images 4 and 5 are of the same settings and stay, for
    a later resume with the larger n."""
    out = sample(ckpt, tmp_path / "s", "n=6")
    with caplog.at_level("INFO"):
        sample(ckpt, out, "n=4", "resume=true")
    assert "images/ holds 2 images beyond n=4" in caplog.text
    array = np.load(out / "samples.npz")["arr_0"]
    assert array.shape == (4, 28, 28, 1)
    assert np.array_equal(array, np.load(full / "samples.npz")["arr_0"][:4])
    assert json.loads((out / "sample.json").read_text())["n"] == 4
    # and npz=false drops the npz of the earlier n rather than leave one of another size
    sample(ckpt, out, "n=5", "resume=true", "npz=false")
    assert not (out / "samples.npz").exists()


def test_overwrite_with_a_smaller_n_leaves_no_stale_images(ckpt, tmp_path):
    out = sample(ckpt, tmp_path / "s", "n=6")
    (out / "precious.txt").write_text("mine")
    (out / "images" / "notes.txt").write_text("mine too")
    (out / "images" / "1234567.png").write_bytes(b"not one of sample.py's names")
    sample(ckpt, out, "n=3", "overwrite=true", "seed=1")
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
        "1234567.png",
        "notes.txt",
    ]
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 3
    assert (out / "precious.txt").read_text() == "mine"
    assert json.loads((out / "sample.json").read_text())["seed"] == 1


def test_a_read_only_out_is_refused_before_the_checkpoint_loads(ckpt, tmp_path, monkeypatch):
    """As root, permission bits stop nothing: a read-only disk is what refuses writes, here
    simulated at the probe file."""

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(sampling, "load_module", lambda *a, **k: pytest.fail("work started"))
    (tmp_path / "ro").mkdir()
    with pytest.raises(PermissionError, match=r"out=.*ro/s: cannot write to .*ro \(Read-only"):
        sample(ckpt, tmp_path / "ro" / "s", "n=2")
    assert not (tmp_path / "ro" / "s").exists()


@pytest.mark.slow
def test_entry_points_print_one_line_not_a_traceback(ckpt, tmp_path):
    """Through Hydra, as a user runs them: `Error: <message>` alone (the run directory check
    of sample.py is a Hydra callback, before Hydra would create out=)."""
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    for script, args in (
        ("sample.py", [f"ckpt={ckpt}", f"out={blocker}"]),
        ("sample.py", [f"ckpt={ckpt}", f"out={tmp_path / 's'}", "text='  '"]),
        ("eval.py", [f"source={ckpt}", "batch_size=0", f"out={tmp_path / 'r.json'}"]),
    ):
        proc = run_script(script, *args, "hydra.run.dir=" + str(tmp_path / "h"), check=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("Error: ") and "Traceback" not in proc.stderr
    assert blocker.read_text() == "a file"


def test_known_errors_become_one_line_unless_the_full_trace_is_asked(monkeypatch):
    from hydra.errors import InstantiationException

    from ddpm.cli.errors import InputError, one_line_errors

    def outcome(error: BaseException) -> str:
        try:
            with one_line_errors():
                raise error
        except SystemExit as e:
            return str(e)
        except BaseException as e:  # noqa: BLE001 - what passes through, by type
            return f"passed {type(e).__name__}"
        return "nothing"

    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    assert outcome(ValueError("n=-5: ...")) == "Error: n=-5: ..."
    assert outcome(InputError("Error: already one")) == "Error: already one"
    wrapped = InstantiationException("Error in call to target ...")
    wrapped.__cause__ = ValueError("dataset.batch_size must be >= 1, got 0")
    assert outcome(wrapped) == "Error: dataset.batch_size must be >= 1, got 0"
    assert outcome(torch.OutOfMemoryError("CUDA out of memory.\nmore")) == (
        "Error: out of memory (CUDA out of memory.); lower batch_size= (images per forward pass)"
    )
    assert outcome(KeyError("a bug")) == "passed KeyError"  # not a bad input: the trace
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert outcome(ValueError("x")) == "passed ValueError"
