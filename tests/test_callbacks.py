import torch

from bench.readability import split_grid
from ddpm.generate import image_labels
from ddpm.render import save_grid, to_uint8


def test_grid_round_trips_through_png(tmp_path):
    images = torch.rand(23, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_grid(images, tmp_path / "g" / "grid.png", nrow=10)
    tiles = split_grid(path, n=23)
    assert tiles.shape == (23, 1, 28, 28)
    assert torch.equal((tiles * 255).round().to(torch.uint8), to_uint8(images))


def test_cycle_labels_put_one_class_per_column():
    assert image_labels("cycle", 0, 12, 5) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert image_labels("cycle", 7, 3, 5) == [2, 3, 4]  # by image index, whatever the batch
    assert image_labels("auto", 0, 3, 5) == [0, 1, 2] and image_labels("auto", 0, 3, None) is None
    assert image_labels([4, 3, 2, 1], 1, 2, 5) == [3, 2] and image_labels(None, 0, 3, 5) is None


def test_to_uint8_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
