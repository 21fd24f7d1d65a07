"""Nothing hangs (issue 23, part 5): a FIFO, a device or a decompression bomb given as an
image fails at once in one line naming it; a folder or zip holding one names it (and skips
it under dataset.skip_bad=true). Every test runs under an alarm, so a regression fails here
instead of blocking the suite."""

from __future__ import annotations

import io
import os
import signal
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from bad_cases_hangs import png_declaring, small_png, zip_declaring
from PIL import Image

from ddpm.evaluation import image_files, npz_array, read_image
from ddpm.files import check_regular, read_regular
from ddpm.folder import load_image, load_image_folder

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
