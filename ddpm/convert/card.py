"""The README.md model card of an exported pipeline: what was trained on what, for how long,
how well (the run's metrics.json), and the lines that sample it with diffusers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PREDICTIONS = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def run_dir(ckpt: Path) -> Path:
    """RUN of RUN/checkpoints/x.ckpt (train.py's layout), else the checkpoint's folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def run_metrics(ckpt: Path) -> dict[str, Any]:
    """The run's metrics.json, or {}."""
    run = run_dir(ckpt)
    try:
        value = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _schedule(schedule: dict[str, Any], T: int) -> str:
    name = str(schedule.get("_target_", "")).rsplit(".", 1)[-1]
    args = ", ".join(f"{k} {v}" for k, v in schedule.items() if k not in ("_target_", "betas"))
    return f"{name} ({args})" if args else f"{name} (given betas, T = {T})"


def _figure(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


USE = """```python
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{folder}")
images = pipe(batch_size=4, num_inference_steps={T}).images  # PIL images
```
"""

USE_LABELS = """DDPMPipeline passes no class labels (nor guidance), and this UNet needs them
(`num_class_embeds` = {rows}: classes 0..{last}{null}). These lines draw class `y` with
guidance `w` on the pipeline's own scheduler:

```python
import torch
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{folder}")
y, w, g = torch.tensor([0, 1, 2, 3]), {w}, torch.Generator().manual_seed(0)
x = torch.randn(4, {c}, {s}, {s}, generator=g)
for t in pipe.scheduler.timesteps:  # all {T} steps
    out = pipe.unet(x, t, class_labels=y).sample
{guided}    x = pipe.scheduler.step(out, t, x, generator=g).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)  # (4, {c}, {s}, {s}) in [0, 1]
```
"""

GUIDED = """    if w:  # classifier-free guidance: (1 + w) out(y) - w out(null)
        null = torch.full_like(y, {null})
        out = (1 + w) * out - w * pipe.unet(x, t, class_labels=null).sample
"""


def model_card(module: Any, raw: dict[str, Any], ckpt: Path, record: dict[str, Any]) -> str:
    """README.md of the exported folder of the checkpoint `ckpt` (`raw`, loaded as `module`)."""
    hp, net = module.hparams, module.ema.module
    T = module.schedule.num_timesteps
    C, S = net.in_channels, net.image_size
    dataset = (raw.get("dataset") or {}).get("name", "unknown")
    params = sum(p.numel() for p in net.parameters())
    objective = f"{hp.objective} (prediction_type {PREDICTIONS[hp.objective]})"
    if hp.learn_sigma:
        objective += ", learned variances (variance_type learned_range, 2C output channels)"
    rows = [
        ("dataset", f"{dataset} ({S}x{S}x{C})"),
        ("training steps", raw.get("global_step", "unknown")),
        ("objective", objective),
        ("noise schedule", f"{_schedule(dict(hp.schedule), T)}, T = {T}"),
        ("network", f"ddpm.unet.UNet, {params / 1e6:.2f}M parameters (here: UNet2DModel)"),
        ("weights", f"EMA, decay {hp.ema_decay}"),
    ]
    origin = raw.get("converted_from") or {}
    if origin:  # not trained here: converted in, then out again
        rows.insert(0, ("converted from", f"{origin.get('format')} folder {origin.get('source')}"))
    how = "converted into" if origin else "trained with"
    metrics = run_metrics(ckpt)
    rows += [(f"metrics.json: {k}", _figure(v)) for k, v in metrics.items() if k != "step"]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    folder = "PATH/TO/THIS/FOLDER"
    if module.num_classes:
        null = record.get("null_label")
        use = USE_LABELS.format(
            folder=folder,
            rows=module.num_classes + (null is not None),
            last=module.num_classes - 1,
            null=f"; {null} is the null label" if null is not None else "",
            w=2.0 if null is not None else 0.0,
            c=C,
            s=S,
            T=T,
            guided=GUIDED.format(null=null) if null is not None else "",
        )
    else:
        use = USE.format(folder=folder, T=T)
    return f"""---
library_name: diffusers
pipeline_tag: unconditional-image-generation
tags: [ddpm, diffusion]
---
# {run_dir(ckpt).name}/{ckpt.name}

A denoising diffusion model {how} ddpm (PyTorch Lightning + Hydra), exported by
`python -m ddpm.convert export {ckpt.name} DIR`.

| | |
|---|---|
{table}

## Sampling

{use}
`ddpm.json` beside this card holds what diffusers' configs cannot: the class names, the null
label, the sampler the run's grids used. `python -m ddpm.convert import DIR OUT.ckpt` turns
this folder back into a checkpoint for ddpm's sample.py and eval.py.
"""
