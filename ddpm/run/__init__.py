"""ddpm.run: the machinery of a training run (checkpoints, resuming, stopping, callbacks,
tracking, launching, the run lock). See docs/design.md."""
