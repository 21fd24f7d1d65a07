"""ddpm.cli: what the entry points (train.py, sample.py, eval.py, python -m ddpm.results) run.
Nothing in the package imports it. See docs/design.md."""
