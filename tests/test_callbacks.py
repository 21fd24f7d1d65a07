import torch

from bench.readability import split_grid
from ddpm.callbacks import cycle_labels, save_grid, to_uint8


def test_grid_round_trips_through_png(tmp_path):
    images = torch.rand(23, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_grid(images, tmp_path / "g" / "grid.png", nrow=10)
    tiles = split_grid(path, n=23)
    assert tiles.shape == (23, 1, 28, 28)
    assert torch.equal((tiles * 255).round().to(torch.uint8), to_uint8(images))


def test_cycle_labels_put_one_class_per_column():
    assert cycle_labels(12, 5) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_to_uint8_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 255, 255]
