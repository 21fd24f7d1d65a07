"""Train a diffusion model: compose the config, instantiate everything from it, fit.

    python train.py                                  # the quickstart (MNIST digits, CPU)
    python train.py schedule=cosine trainer.max_steps=10000
    python train.py debug=fast                       # a few steps of everything
    python train.py hydra.run.dir=runs/cifar/a       # rerun it: it continues (resume=auto)
    python train.py resume=runs/x/checkpoints/step_0004000.ckpt hydra.run.dir=runs/x2  # from a file
    python train.py --cfg job                        # print the composed config

Each run writes to runs/<name>/<date_time>/ (on SLURM runs/<name>/<job id>, which a requeued job
keeps): config.yaml (resolved), checkpoints/ (last.ckpt and every N steps), samples/ (grids
during training and final.png), loss_curve.png, logs. resume=auto (the default) continues from
the checkpoint of that directory with the highest step that loads, skipping corrupt ones by
name. Ctrl-C, SIGTERM and SIGUSR1 save checkpoints/last.ckpt at the end of the current step.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from ddpm.cli.errors import one_line_errors
from ddpm.cli.train import run
from ddpm.run.launch import use_ddp_child_command


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    use_ddp_child_command(__file__)  # DDP children rerun this job, not the whole sweep
    with one_line_errors("dataset.batch_size"):  # a bad input is one line (HYDRA_FULL_ERROR=1:
        return run(cfg)  # the whole trace)


if __name__ == "__main__":
    main()
