"""Turn a checkpoint into images.

    python sample.py ckpt=runs/quickstart/<date>/checkpoints/last.ckpt n=64 seed=0 out=samples/q
    python sample.py ckpt=... sampler=ddim steps=50 n=50000 batch_size=500 npz=true out=samples/c
    python sample.py ckpt=... labels=cycle guidance=2 animate=true noise_levels=true
    python sample.py ckpt=<emnist letters> text="HELLO WORLD" guidance=2 animate=true

writes out/grid.png, out/images/000000.png ... (one PNG per image) and, when asked, out/samples.npz
(uint8 NHWC, as OpenAI's and EDM's evaluators read), out/animation.gif, out/noise_levels.png,
out/text.png, all from the EMA weights, and out/sample.json, the settings they were drawn with:
resume=true continues only with the same ones (and draws again a PNG that does not decode);
overwrite=true removes sample.py's own files of out/ first, nothing else.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpm.cli.errors import one_line_errors
from ddpm.cli.sample import sample


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    with one_line_errors():  # a bad input is one line (HYDRA_FULL_ERROR=1: the whole trace)
        sample(cfg)


if __name__ == "__main__":
    main()
