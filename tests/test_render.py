import random

import pytest
import torch
from PIL import Image

from bench.readability import centre_28, split_grid
from ddpm.cli.sample import noise_levels_t
from ddpm.cli.sample_folder import load_png
from ddpm.generate import image_labels
from ddpm.images import save_grid, save_png, to_uint8, wrap_words


def test_grid_round_trips_through_png(tmp_path):
    images = torch.rand(23, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_grid(images, tmp_path / "g" / "grid.png", nrow=10)
    tiles = split_grid(path, n=23)
    assert tiles.shape == (23, 1, 28, 28)
    assert torch.equal((tiles * 255).round().to(torch.uint8), to_uint8(images))
    # the 32 px tiles of latent models: found from the grid's shape, read at their 28 px centre
    big = torch.rand(23, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    tiles = split_grid(save_grid(big, tmp_path / "g32" / "grid.png", nrow=10), n=23)
    assert tiles.shape == (23, 1, 32, 32)
    read = (centre_28(tiles) * 255).round().to(torch.uint8)
    assert torch.equal(read, to_uint8(big[..., 2:30, 2:30]))


def test_cycle_labels_put_one_class_per_column():
    assert image_labels("cycle", 0, 12, 5) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert image_labels("cycle", 7, 3, 5) == [2, 3, 4]  # by image index, whatever the batch
    assert image_labels("auto", 0, 3, 5) == [0, 1, 2] and image_labels("auto", 0, 3, None) is None
    assert image_labels([4, 3, 2, 1], 1, 2, 5) == [3, 2] and image_labels(None, 0, 3, 5) is None


def test_to_uint8_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]


def test_save_png_writes_what_the_hand_written_pil_code_wrote(tmp_path):
    """save_png is torchvision's to_pil_image + PIL now: byte-identical files to the former
    hand conversion (HWC array, gray squeezed), and load_png reads the pixels back."""
    g = torch.Generator().manual_seed(0)
    for channels in (1, 3):
        image = torch.randint(0, 256, (channels, 9, 7), dtype=torch.uint8, generator=g)
        save_png(image, tmp_path / "new.png")
        array = image.permute(1, 2, 0).numpy()
        Image.fromarray(array[..., 0] if channels == 1 else array).save(tmp_path / "old.png")
        assert (tmp_path / "new.png").read_bytes() == (tmp_path / "old.png").read_bytes()
        assert torch.equal(load_png(tmp_path / "new.png")[0], image)


def _greedy_wrap(text: str, width: int) -> list[str]:
    """The former hand-written word wrap, kept as the reference."""
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def test_wrap_words_on_textwrap_equals_the_greedy_wrap():
    rng = random.Random(0)
    for _ in range(500):
        words = [
            "".join(rng.choices("AB-C", k=rng.randint(1, 12))) for _ in range(rng.randint(0, 9))
        ]
        text = "".join(w + " " * rng.randint(1, 3) for w in words)
        width = rng.randint(1, 16)
        assert wrap_words(text, width) == _greedy_wrap(text, width), (text, width)


def test_noise_level_steps_follow_the_schedule_length():
    assert noise_levels_t(None, 1000) == [0, 100, 250, 500, 750, 999]
    assert noise_levels_t(None, 400) == [0, 40, 100, 200, 300, 399]
    assert noise_levels_t([0, 5], 10) == [0, 5]
    with pytest.raises(ValueError, match=r"noise_levels_t \[999\] are outside .* 0..399"):
        noise_levels_t([0, 999], 400)
