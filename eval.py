"""FID, KID and Inception Score of generated images against cached statistics of a dataset, as
papers report them.

    python eval.py source=samples/c/samples.npz dataset=cifar10 n=50000 weights=PATH
    python eval.py source=runs/.../last.ckpt dataset=mnist5k n=10000 sampler=ddim steps=50

The reference statistics are computed once per (dataset, split, size, count, network) and cached
in cache_dir; the result is printed and written as JSON under names that say how it was made,
e.g. fid50k_train_ddim100, kid50k_train_ddim100 (and _std), is50k_ddim100 (and _std).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpm.cli.errors import one_line_errors
from ddpm.cli.eval import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    with one_line_errors():  # a bad input is one line (HYDRA_FULL_ERROR=1: the whole trace)
        evaluate(cfg)


if __name__ == "__main__":
    main()
