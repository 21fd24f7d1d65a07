"""A rank of tests/test_resample.py's two-process check (torch.multiprocessing.spawn): it imports
only torch and ddpm.resample, so that each spawned process starts in about a second."""

import torch
import torch.distributed as dist

from ddpm.resample import LossSecondMomentSampler

T, STEPS = 6, 12
BATCH = (3, 5)  # rank 1's batches are larger: the gather pads rank 0's


def rank_main(rank: int, init_file: str, out: str) -> None:
    """Draw t from the rank's sampler and record losses that differ by rank, STEPS times;
    save the sampler's state as `out`.<rank>."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(rank)
    sampler = LossSecondMomentSampler(T)
    for _ in range(STEPS):
        t, _ = sampler.sample(BATCH[rank], "cpu", g)
        sampler.update(t, torch.rand(BATCH[rank], generator=g) + t)
    torch.save(sampler.state_dict(), f"{out}.{rank}")
    dist.destroy_process_group()
