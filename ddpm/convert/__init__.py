"""Other people's models in, this project's models out.

    python -m ddpm.convert import SRC OUT.ckpt     a diffusers folder -> a checkpoint
    python -m ddpm.convert import M.pt OUT.ckpt --flags "..."   an OpenAI .pt -> a checkpoint
    python -m ddpm.convert export CKPT OUT_DIR     a checkpoint -> a DDPMPipeline folder

`unet2d` maps diffusers' UNet2DModel onto `ddpm.unet.UNet` (configs and weights, by rule),
`scheduler` a scheduler config onto the schedule, objective and sampler defaults, `build`
writes the checkpoint every converter produces, `pipeline` reads and writes the folders, `card`
writes an exported folder's model card, `openai` reads improved-diffusion / guided-diffusion
state dicts and their flags. docs/published_models.md shows them at work.
"""

from __future__ import annotations

from ddpm.convert.pipeline import export_pipeline, import_pipeline
from ddpm.convert.unet2d import ConversionError

__all__ = ["ConversionError", "export_pipeline", "import_pipeline"]
