"""Bad-input cases of round three (issue 23), untrusted: checkpoints whose configs name code
(the layout of test_bad_inputs.CASES: (case, entry point, overrides, the message it must give)).
Each gadget, if built, would create the file `pwned` beside the case files, which
test_bad_inputs checks is never there; `files` makes them from the tiny trained run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# what each gadget's code would do: create this file (test_bad_inputs looks for it)
MARKER = "pwned"


def touch(marker: Path) -> str:
    """Python that creates `marker`, for builtins.exec / eval gadgets."""
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def gadgets(marker: Path, net: dict) -> dict[str, dict[str, Any]]:
    """Hyper-parameter edits that would run code if their configs were instantiated, by name:
    a blocked callable, a nested chain, a file-writing call, a callable in an argument, an
    interpolation that decodes into a node, and a Hydra key set below the network."""
    opens = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}  # creates the marker
    return {
        "blocked": {"net": {"_target_": "os.system", "_args_": [f"touch {marker}"]}},
        "chain": {"net": {**net, "ch": {"_target_": "builtins.len", "_args_": [[opens]]}}},
        "open": {"schedule": opens},
        "argument": {
            "schedule": {"_target_": "ddpm.schedule.NoiseSchedule.linear", "timesteps": opens}
        },
        "interpolation": {
            "net": {**net, "dropout": "${oc.decode:'{_target_: builtins.exec, _args_: [x]}'}"}
        },
        "args": {"net": {**net, "_args_": [{"_target_": "os.makedirs", "_args_": [str(marker)]}]}},
        # a latent model's embedded autoencoder
        "latent": {"autoencoder": {"net": opens, "image_size": 28, "source": "ae.ckpt"}},
    }


def files(root: Path, ckpt: Path) -> dict[str, str]:
    """One checkpoint per gadget (`untrusted_<name>`), otherwise the trained run's."""
    marker = root.parent / MARKER
    original = torch.load(ckpt, weights_only=True)
    made = {}
    for name, edit in gadgets(marker, original["hyper_parameters"]["net"]).items():
        path = root / f"{name}.ckpt"
        torch.save({**original, "hyper_parameters": {**original["hyper_parameters"], **edit}}, path)
        made[f"untrusted_{name}"] = str(path)
    # TorchScript: torch.load would hand it to torch.jit.load, whose loading runs code
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), root / "ts.ckpt")
    made["untrusted_torchscript"] = str(root / "ts.ckpt")
    return made


_SAMPLE = [
    (
        "blocked",
        r"blocked.ckpt: hyper_parameters.net names `os.system`, which "
        r"is not a network of this project or an autoencoder this project uses; refusing to load",
    ),
    (
        "chain",
        r"chain.ckpt: hyper_parameters.net.ch._target_ names `builtins.len`, a nested "
        r"Hydra node; refusing to load it",
    ),
    (
        "open",
        r"open.ckpt: hyper_parameters.schedule names `builtins.open`, which is not a noise "
        r"schedule of this project; refusing",
    ),
    (
        "argument",
        r"argument.ckpt: hyper_parameters.schedule.timesteps._target_ names "
        r"`builtins.open`, a nested Hydra node; refusing",
    ),
    (
        "interpolation",
        r"interpolation.ckpt: hyper_parameters.net.dropout holds the "
        r"interpolation .*oc.decode",
    ),
    ("args", r"args.ckpt: hyper_parameters.net._args_ is a Hydra option a file may not set"),
    (
        "latent",
        r"latent.ckpt: hyper_parameters.autoencoder.net names `builtins.open`, which is "
        r"not an autoencoder this project uses; refusing",
    ),
]

CASES: list[tuple[str, str, list[str], str]] = [
    (
        "untrusted TorchScript: sample.py",
        "sample",
        ["ckpt={untrusted_torchscript}"],
        r"^refused to load .*ts.ckpt: the weights-only loader does not read it \(a TorchScript "
        r"file, or another format that runs code when loaded\)\. Only load checkpoints written "
        r"by this project or from a source you trust\.$",
    ),
    *[
        (f"untrusted {name}: sample.py", "sample", [f"ckpt={{untrusted_{name}}}"], message)
        for name, message in _SAMPLE
    ],
    *[
        (f"untrusted {name}: eval.py", "eval", [f"source={{untrusted_{name}}}"], message)
        for name, message in _SAMPLE[:3]
    ],
    (
        "untrusted chain: eval.py nll=true",
        "eval",
        ["source={untrusted_chain}", "nll=true"],
        _SAMPLE[1][1],
    ),
    *[
        (f"untrusted {name}: train.py resume=", "train", [f"resume={{untrusted_{name}}}"], message)
        for name, message in _SAMPLE
    ],
]
