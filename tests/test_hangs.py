"""Nothing hangs (issue 23, part 5): a FIFO, a device or a decompression bomb given as an
image fails at once in one line naming it; a folder or zip holding one names it (and skips
it under dataset.skip_bad=true). Every test runs under an alarm, so a regression fails here
instead of blocking the suite."""

from __future__ import annotations

import io
import os
import re
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.lib.format as npy
import pytest
import torch
from bad_cases_hangs import png_declaring, small_png, zip_declaring
from PIL import Image

from ddpm.cli.sources import image_files, npz_array, read_image
from ddpm.data.folder import load_image, load_image_folder
from ddpm.files import check_regular, read_regular

LIMIT_S = 20


@pytest.fixture(autouse=True)
def alarm() -> Iterator[None]:
    """SIGALRM after LIMIT_S: a blocked open() of a FIFO is interrupted (EINTR) and the
    handler's error ends the test."""

    def expired(signum, frame):
        raise TimeoutError(f"still running after {LIMIT_S} s: something blocks")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_fifo_and_a_device_are_refused_at_once(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe.png")  # nobody writes to it: open() alone would wait forever
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"^image=.*pipe\.png is a named pipe \(FIFO\)"):
        read_regular(tmp_path / "pipe.png", 2**20, "image")
    with pytest.raises(ValueError, match=r"^/dev/zero is a character device, not a regular"):
        read_regular("/dev/zero", 2**20)  # today's 3 GB in 2 s
    with pytest.raises(ValueError, match=r"^source=.*pipe\.png is a named pipe"):
        check_regular(tmp_path / "pipe.png", "source")
    with pytest.raises(ValueError, match=r"is a directory, not a regular file"):
        load_image(tmp_path, 28, 1, "noise_levels_image")
    assert time.monotonic() - start < 2


def test_a_file_over_the_cap_is_refused_before_reading(tmp_path: Path):
    (tmp_path / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(ValueError, match=r"^k=.*big\.png is 0 MiB, more than the 0 MiB"):
        read_regular(tmp_path / "big.png", 4096, "k")
    assert read_regular(tmp_path / "big.png", 5000) == b"\0" * 5000
    link = tmp_path / "link.png"
    link.symlink_to("/dev/zero")  # a symlink is judged by what it points to
    with pytest.raises(ValueError, match=r"link\.png is a character device"):
        read_regular(link, 2**20, "noise_levels_image")


# Pillow warns above its 89 M pixels, and ours (134 M) refuses mid.png's 144 M after that
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_a_bomb_in_a_folder_is_named_and_skipped_under_skip_bad(tmp_path: Path):
    for k in range(3):
        (tmp_path / f"ok{k}.png").write_bytes(small_png(40 * k))
    (tmp_path / "bomb.png").write_bytes(png_declaring(30000, 30000))  # 67 bytes
    (tmp_path / "mid.png").write_bytes(png_declaring(12000, 12000))  # over ours, under Pillow's
    with pytest.raises(ValueError, match=r"bomb\.png \(ImageTooLarge: its header declares 900 M"):
        load_image_folder(tmp_path, 28, 1)
    with pytest.warns(UserWarning, match=r"skipped 2 .* \(bomb\.png: its header .*; also mid\.png"):
        images, _, _ = load_image_folder(tmp_path, 28, 1, skip_bad=True)
    assert images.shape == (3, 1, 28, 28)
    with pytest.raises(
        ValueError, match=r"^noise_levels_image=.*mid\.png: .*12000x12000 \(144 M\)"
    ):
        load_image(tmp_path / "mid.png", 28, 1, "noise_levels_image")


def test_zip_members_that_lie_about_their_size_are_named(tmp_path: Path):
    members = {"a.png": small_png(0), "b.png": small_png(9)}
    # 500 MiB is under the cap, but no deflate stream of ~70 bytes inflates to it
    archive = zip_declaring(tmp_path / "lie.zip", members, "b.png", 500 * 2**20)
    with pytest.raises(ValueError, match=r"lie\.zip/b\.png .*declares 524288000 bytes from \d+ "):
        load_image_folder(archive, 28, 1)
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable images of 2 .*\(b\.png: "):
        assert len(load_image_folder(archive, 28, 1, skip_bad=True)[0]) == 1
    blank = io.BytesIO()
    Image.new("L", (1024, 1024)).save(blank, "BMP")  # 1 MB that deflates about 500:1
    with zipfile.ZipFile(tmp_path / "fine.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("blank.bmp", blank.getvalue())
    info = zipfile.ZipFile(tmp_path / "fine.zip").getinfo("blank.bmp")
    assert info.file_size > 300 * info.compress_size  # a real, high ratio is read
    assert load_image_folder(tmp_path / "fine.zip", 28, 1)[0].shape == (1, 1, 28, 28)


def test_eval_sources_refuse_fifos_and_bombs(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe.npz")
    with pytest.raises(ValueError, match=r"^source=.*pipe\.npz is a named pipe"):
        npz_array(tmp_path / "pipe.npz")
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(small_png(0))
    (folder / "b.png").write_bytes(png_declaring(30000, 30000))
    with pytest.raises(ValueError, match=r"^source: .*b\.png: its header declares 900 M pixels"):
        image_files(folder, 2)
    with pytest.raises(ValueError, match=r"^source: .*b\.png: its header declares 900 M pixels"):
        read_image(folder / "b.png", 1)
    os.mkfifo(folder / "c.png")
    with pytest.raises(ValueError, match=r"^source=.*c\.png is a named pipe"):
        read_image(folder / "c.png", 1)
    np.testing.assert_array_equal(read_image(folder / "a.png", 1), np.zeros((28, 28), np.uint8))


def npz_declaring(path: Path, shape: tuple, compression: int = zipfile.ZIP_DEFLATED) -> Path:
    """An .npz whose arr_0 header declares `shape` (uint8) over 100 bytes of data."""
    header = io.BytesIO()
    npy.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.writestr("arr_0.npy", header.getvalue() + bytes(100))
    return path


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_an_npz_declaring_terabytes_is_named_before_numpy_allocates(tmp_path, compression):
    """(10^7, 256, 256, 3) in 300 bytes: numpy's MemoryError traceback, before; a stored member
    holds its file_size, a deflated one at most deflate's ratio of its compressed bytes."""
    for shape, size in (((10**7, 256, 256, 3), "1831.1 GiB"), ((300, 64, 64, 3), "0.0 GiB")):
        path = npz_declaring(tmp_path / "lie.npz", shape, compression)
        with pytest.raises(ValueError, match=rf"^source=.*lie\.npz: arr_0 declares uint8 .*{size}"):
            npz_array(path)
    np.savez_compressed(tmp_path / "ok.npz", arr_0=np.zeros((500, 32, 32, 3), np.uint8))
    assert npz_array(tmp_path / "ok.npz").shape == (500, 32, 32, 3)  # ~1000:1, and real


GLOO_RESET = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
    "[127.0.0.1]:44433: Connection reset by peer. This is typically caused by a remote worker "
    "hanging or bugs in the application. Check the logs of the remote worker before reporting "
    "an error. GLHF!"
)
GLOO_TIMEOUT = (
    "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out "
    "waiting 30000ms for recv operation to complete"
)


@pytest.mark.parametrize("rank,dead", [(0, 1), (1, 0)])
def test_a_dead_peers_gloo_error_is_one_line_naming_the_rank(monkeypatch, rank, dead):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from ddpm.cli.errors import dead_peer_line, one_line_errors

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    monkeypatch.setattr("ddpm.cli.errors._run_dir", lambda: None)  # no Hydra run here
    line = dead_peer_line(RuntimeError(GLOO_TIMEOUT))
    assert line == (
        f"Error: rank {dead} of 2 stopped answering (seen from rank {rank}): it died, was killed "
        "or hangs (Timed out waiting 30000ms for recv operation to complete, after "
        "trainer.strategy.timeout.seconds). Rerun the same command to resume from the run's "
        "last checkpoint (resume=auto)"
    )
    reset = r"Connection reset by peer\)\. Rerun the same"
    with pytest.raises(SystemExit, match=reset) as info, one_line_errors():
        raise RuntimeError(GLOO_RESET)
    assert "GLHF" not in str(info.value)
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "another rank (of 4) stopped" in dead_peer_line(RuntimeError(GLOO_RESET))


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    from ddpm.cli.errors import dead_peer_line, one_line_errors

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr("ddpm.cli.errors._run_dir", lambda: None)
    assert dead_peer_line(RuntimeError("the operation timed out after 3 retries")) is None
    with pytest.raises(RuntimeError, match="shape mismatch"), one_line_errors():
        raise RuntimeError("shape mismatch")
    joined = torch.distributed.DistStoreError(
        "Timed out after 6 seconds waiting for clients. 1/2 clients joined."
    )
    assert dead_peer_line(joined).startswith(
        "Error: not every DDP rank started within the collective timeout (Timed out after 6 "
        "seconds waiting for clients): one failed at its start"
    )


def test_ddp_configs_bound_the_collective_wait():
    """trainer=ddp and trainer=ddp_cpu build Lightning's DDPStrategy with a 10-minute timeout
    (Lightning's own default: 30 min), which one override changes."""
    from datetime import timedelta

    from conftest import compose_config
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    for trainer in ("ddp", "ddp_cpu"):
        cfg = compose_config([f"trainer={trainer}", "trainer.strategy.timeout.seconds=42"])
        strategy = instantiate(cfg.trainer.strategy)
        assert isinstance(strategy, DDPStrategy) and strategy._timeout == timedelta(seconds=42)
        assert compose_config([f"trainer={trainer}"]).trainer.strategy.timeout.seconds == 600
    assert compose_config(["trainer=ddp_cpu"]).trainer.precision == "auto"  # as before


@pytest.mark.slow
def test_a_stopped_rank_ends_the_run_within_the_timeout_in_one_line(tmp_path: Path):
    """trainer=ddp_cpu (2 gloo processes): rank 1 SIGSTOPped mid-training. Rank 0 gives up after
    trainer.strategy.timeout.seconds, kills the stopped rank and says in one line which rank
    stopped answering and how to resume; the checkpoint to resume from is there."""
    import subprocess
    import sys

    from conftest import FAST, ROOT

    signal.alarm(0)  # this one has its own bound
    timeout_s = 30  # above the second rank's start on a loaded machine (the rendezvous)
    run = tmp_path / "run"
    command = [sys.executable, str(ROOT / "train.py"), *FAST, "trainer=ddp_cpu"]
    overrides = [
        "trainer.max_steps=1000",
        "trainer.val_check_interval=1000",
        f"trainer.strategy.timeout.seconds={timeout_s}",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    stderr = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen([*command, *overrides], cwd=ROOT, env=env, stderr=stderr, text=True)
    child = None
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "last.ckpt").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.1)
        found = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        (child,) = map(int, found.stdout.split())
        os.kill(child, signal.SIGSTOP)
        stopped = time.monotonic()
        proc.wait(timeout=timeout_s + 60)
        took = time.monotonic() - stopped
    finally:
        proc.kill()
        if child is not None and Path(f"/proc/{child}").exists():
            os.kill(child, signal.SIGKILL)
    stderr.seek(0)
    err = stderr.read()
    assert proc.returncode == 1, err[-3000:]
    assert timeout_s - 1 < took < timeout_s + 30, took
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(
        r"Error: rank 1 of 2 stopped answering \(seen from rank 0\): it died, was killed or "
        rf"hangs \(Timed out waiting {timeout_s}000ms for (send|recv) operation to complete, "
        r"after trainer.strategy.timeout.seconds\)\. Rerun the same command with "
        rf"hydra.run.dir={re.escape(str(run))} to resume .*",
        last,
    ), err[-3000:]
    assert "Traceback" not in err
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
