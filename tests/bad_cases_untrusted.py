"""Bad-input cases of round three (issue 23), untrusted: the layout of test_bad_inputs.CASES
((case, entry point, overrides, the message it must give)); `files` makes the files they name
(its keys fill {placeholders} in the overrides, beside the shared ones)."""

from __future__ import annotations

from pathlib import Path

CASES: list[tuple[str, str, list[str], str]] = []


def files(root: Path, ckpt: Path) -> dict[str, str]:
    """Files for the cases above, made under `root`; `ckpt` is the tiny trained run's
    last.ckpt (read it, never change it)."""
    return {}
