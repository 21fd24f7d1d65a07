"""Bad-input cases of round three (issue 23), hangs: the layout of test_bad_inputs.CASES
((case, entry point, overrides, the message it must give)); `files` makes the files they name
(its keys fill {placeholders} in the overrides, beside the shared ones)."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path

from PIL import Image

BOMB = r"its header declares 900 M pixels, more than the 134 M an image may have"
PIPE = r"is a named pipe \(FIFO\), not a regular file"

CASES: list[tuple[str, str, list[str], str]] = [
    (
        "decompression bomb in a training folder",
        "train",
        ["dataset=folder", "dataset.data_dir={bomb_folder}", "dataset.class_folders=false"],
        rf"cannot read image .*bomb_folder/bomb\.png \(ImageTooLarge: {BOMB}.*skip_bad=true",
    ),
    (
        "zip member declaring 4 GB",
        "train",
        ["dataset=folder", "dataset.data_dir={bomb_zip}", "dataset.class_folders=false"],
        r"cannot read image .*bomb\.zip/huge\.png \(ValueError: the zip member declares 4000 "
        r"MiB uncompressed, more than the 1024 MiB",
    ),
    (
        "noise_levels_image a FIFO",
        "sample",
        ["noise_levels=true", "noise_levels_image={fifo}"],
        rf"^noise_levels_image=.*fifo\.png {PIPE}",
    ),
    (
        "noise_levels_image /dev/zero",
        "sample",
        ["noise_levels=true", "noise_levels_image=/dev/zero"],
        r"^noise_levels_image=/dev/zero is a character device, not a regular file",
    ),
    (
        "noise_levels_image a decompression bomb",
        "sample",
        ["noise_levels=true", "noise_levels_image={bomb_folder}/bomb.png"],
        rf"^noise_levels_image=.*bomb\.png: {BOMB}",
    ),
    (
        "eval: a decompression bomb in the source folder",
        "eval",
        ["source={bomb_folder}", "n=2"],
        rf"^source: .*bomb_folder/bomb\.png: {BOMB}",
    ),
    (
        "eval: a FIFO in the source folder",
        "eval",
        ["source={fifo_folder}", "n=2"],
        rf"^source=.*fifo_folder/b\.png {PIPE}",
    ),
    (
        "eval: source a FIFO named .npz",
        "eval",
        ["source={fifo_npz}"],
        rf"^source=.*fifo\.npz {PIPE}",
    ),
]


def png_declaring(width: int, height: int) -> bytes:
    """A 67-byte PNG whose header (IHDR) declares width x height pixels: a decompression bomb's
    shape without its gigabytes (only its header is ever read)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # after the signature, length and "IHDR"
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def zip_declaring(path: Path, members: dict[str, bytes], name: str, size: int) -> Path:
    """A zip of `members` whose member `name` claims `size` bytes uncompressed (its central
    directory entry, which zipfile reads, and its local header)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    data = bytearray(path.read_bytes())
    # the size field and where the name starts, in a central directory entry / a local header
    for signature, field, name_at in ((b"PK\x01\x02", 24, 46), (b"PK\x03\x04", 22, 30)):
        start = data.find(signature)
        while start >= 0:
            if data[start + name_at :].startswith(name.encode()):
                data[start + field : start + field + 4] = struct.pack("<I", size)
            start = data.find(signature, start + 4)
    path.write_bytes(bytes(data))
    return path


def small_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (28, 28), color=value).save(buf, "PNG")
    return buf.getvalue()


def files(root: Path, ckpt: Path) -> dict[str, str]:
    """Files for the cases above, made under `root`; `ckpt` is the tiny trained run's
    last.ckpt (read it, never change it)."""
    bombs = root / "bomb_folder"
    bombs.mkdir()
    (bombs / "a.png").write_bytes(small_png(0))
    (bombs / "bomb.png").write_bytes(png_declaring(30000, 30000))
    fifos = root / "fifo_folder"
    fifos.mkdir()
    (fifos / "a.png").write_bytes(small_png(0))
    os.mkfifo(fifos / "b.png")  # nobody ever writes: opening it would wait forever
    os.mkfifo(root / "fifo.png")
    os.mkfifo(root / "fifo.npz")
    members = {"a0.png": small_png(0), "a1.png": small_png(50), "huge.png": small_png(99)}
    bomb_zip = zip_declaring(root / "bomb.zip", members, "huge.png", 4000 * 2**20)
    return {
        "bomb_folder": str(bombs),
        "fifo_folder": str(fifos),
        "fifo": str(root / "fifo.png"),
        "fifo_npz": str(root / "fifo.npz"),
        "bomb_zip": str(bomb_zip),
    }
