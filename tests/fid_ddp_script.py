"""FID, KID and IS of a checkpoint's samples on the 64-d features, in 1 process or under
torch.distributed.run.

    python tests/fid_ddp_script.py CKPT WEIGHTS CACHE_DIR OUT_JSON
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fid_ddp_script.py ...

Used by tests/test_eval.py to show that sharding the generation gives the single-process values.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from ddpm.data.loaders import load_mnist5k
from ddpm.generate import generate, shard
from ddpm.metrics.fid import InceptionMetrics, measure
from ddpm.metrics.reference import prepare_reference, stats_key
from ddpm.module import load_module


def main() -> None:
    ckpt, weights, cache, out = sys.argv[1:5]
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    module = load_module(ckpt)
    metrics = InceptionMetrics(weights, features=64, kid=True, inception_score=True)
    reference = load_mnist5k().images[:100]
    key = stats_key("mnist5k", "train", reference, weights, 64, cache)
    prepare_reference(metrics, key, lambda: reference.split(50), cache, rank)
    first, count = shard(70, rank, world)
    batches = generate(
        module,
        count,
        sampler={"sampler": "ddim", "steps": 3},
        first=first,
        guidance=1.0,
        batch_size=20,
        progress=False,
    )
    values = measure(metrics, (images for _, images in batches), 70, "train", "ddim3")
    if rank == 0:
        with open(out, "w") as f:
            json.dump({**values, "world_size": world}, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
