"""What a file may ask this project to build.

A checkpoint's `hyper_parameters` are the Hydra configs it was trained with, and rebuilding the
model passes them to `hydra.utils.instantiate`, which calls whatever `_target_` names. That is
the point of a config the user writes (their own network class, their own optimizer), and a hole
in a file from someone else: `weights_only=True` stops a pickle from running code, but not a
config that names `builtins.exec` (Hydra's own blocklist stops only `os.system` and a few more),
a chain of nested `_target_`s, or an interpolation (`${oc.decode:...}`) that makes one.

So every config read from a file (checkpoints, autoencoder checkpoints, and what they embed) is
checked here before anything is built from it:
- each slot that is built (`net`, `schedule`, `optimizer`, `lr_scheduler`, `autoencoder.net`)
  names one of the callables this project means for it (`ALLOWED`);
- every argument is plain data (None, bool, int, float, str, and lists / dicts of them), with no
  `_target_` (or other Hydra key) below the slot and no `${` interpolation anywhere.
A file that asks for anything else is refused in one line that names the key and what it names,
before anything is imported or built. Configs the user composes (conf/, overrides) are not
checked: their `_target_` freedom is theirs. A class of the user's own (a network they wrote)
becomes loadable from their checkpoints with `trusted_targets=[mypackage.MyNet]` (sample.py,
eval.py, train.py; train.py also trusts its own module config's `_target_`s), or
`allow("network", "mypackage.MyNet")` from Python.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

# Hydra reads these keys of a node: below a checked slot, only plain data may appear
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_convert_", "_recursive_")


def _torch_classes(module: Any, base: type) -> set[str]:
    """`torch.optim.Adam`-style names of `module`'s public subclasses of `base`."""
    return {
        f"{module.__name__}.{name}"
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, base) and not name.startswith("_")
    }


_AUTOENCODERS = {
    "diffusers.AutoencoderKL",
    "diffusers.models.AutoencoderKL",
    "diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL",
}

# slot kind -> (the callables a file may name for it, what the message calls one)
ALLOWED: dict[str, tuple[set[str], str]] = {
    "network": ({"ddpm.unet.UNet", "ddpm.adm.ADM"}, "a network of this project"),
    "autoencoder": (set(_AUTOENCODERS), "an autoencoder this project uses"),
    "schedule": (
        {
            "ddpm.schedule.NoiseSchedule",
            "ddpm.schedule.NoiseSchedule.linear",
            "ddpm.schedule.NoiseSchedule.cosine",
            "ddpm.schedule.NoiseSchedule.sigmoid",
        },
        "a noise schedule of this project",
    ),
    "optimizer": (
        _torch_classes(torch.optim, torch.optim.Optimizer),
        "a torch optimizer",
    ),
    "lr_scheduler": (
        _torch_classes(torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler),
        "a torch learning-rate scheduler",
    ),
}

# the slots of the hyper_parameters of this project's modules, and what each builds; `net`
# is the DiffusionModule's network or the AutoencoderModule's autoencoder
SLOTS: dict[str, tuple[str, ...]] = {
    "net": ("network", "autoencoder"),
    "schedule": ("schedule",),
    "optimizer": ("optimizer",),
    "lr_scheduler": ("lr_scheduler",),
}


class UntrustedFile(RuntimeError):
    """A file whose configs name code this project does not build from files. Not a
    CheckpointError on purpose: resume=auto skips a checkpoint that does not load and goes on
    with an older one, but a planted one is a reason to stop."""


def allow(kind: str, target: str) -> None:
    """Let files name `target` (a dotted path, e.g. "mypackage.MyNet") for slots of `kind`
    ("network", "autoencoder", "schedule", "optimizer", "lr_scheduler"): for checkpoints of
    one's own classes. Names are compared as written; nothing is imported here."""
    if kind not in ALLOWED:
        raise ValueError(f"kind must be one of {sorted(ALLOWED)}, got {kind!r}")
    ALLOWED[kind][0].add(target)


def allow_targets(targets: Any, key: str = "trusted_targets") -> None:
    """The user's `trusted_targets=[a.B, ...]`: classes of their own that files may name in
    any slot (what the user names is theirs to trust, as in their own configs)."""
    if targets is None:
        return
    if isinstance(targets, str) or not isinstance(targets, Sequence):
        raise ValueError(
            f"{key} must be a list of dotted names, e.g. [mypackage.MyNet]; got {targets!r}"
        )
    for target in targets:
        if not isinstance(target, str) or not all(p.isidentifier() for p in target.split(".")):
            raise ValueError(f"{key} entries are dotted names like mypackage.MyNet; got {target!r}")
        if any(target in names for names, _ in ALLOWED.values()):
            continue  # one of ours: allowed where it belongs, not in every slot
        for kind in ALLOWED:
            allow(kind, target)


def _refuse(source: str | Path, where: str, what: str) -> UntrustedFile:
    return UntrustedFile(f"{source}: {where} {what}; refusing to load it")


def _own_class_hint(target: Any) -> str:
    """How to load a checkpoint of one's own class, for a name outside the standard library
    (no hint for `builtins.open` and its kind: no one's own class)."""
    top = str(target).split(".")[0]
    if not isinstance(target, str) or not top.isidentifier() or top in sys.stdlib_module_names:
        return ""
    return f" (if it is a class of your own, trust it with trusted_targets=[{target}])"


def check_plain(value: Any, where: str, source: str | Path) -> None:
    """`value` is plain data that builds nothing: scalars, strings without `${`, and lists,
    tuples and str-keyed dicts of those with no Hydra key (`_target_`, `_args_`, ...)."""
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        if "${" in value:  # OmegaConf would resolve it, and a resolver can build a node
            raise _refuse(source, where, f"holds the interpolation {value[:60]!r}")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", source)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _refuse(source, where, f"has a key of type {type(key).__name__}")
            if key in HYDRA_KEYS:
                named = f"names `{item}`" if key == "_target_" else f"sets {key}"
                raise _refuse(source, f"{where}.{key}", f"{named}, a nested Hydra node")
            check_plain(item, f"{where}.{key}", source)
        return
    raise _refuse(source, where, f"holds a {type(value).__name__}, not plain data")


def check_node(node: Any, kinds: tuple[str, ...], where: str, source: str | Path) -> None:
    """`node` is a config that builds one of the callables allowed for `kinds`, with plain
    arguments (`_partial_: true` allowed: optimizers and schedulers are built partial)."""
    if not isinstance(node, dict):
        raise _refuse(source, where, f"is a {type(node).__name__}, not a config")
    target = node.get("_target_")
    allowed = set().union(*(ALLOWED[k][0] for k in kinds))
    if not isinstance(target, str) or target not in allowed:
        what = " or ".join(ALLOWED[k][1] for k in kinds)
        raise _refuse(
            source, where, f"names `{target}`, which is not {what}{_own_class_hint(target)}"
        )
    for key, value in node.items():
        if key == "_target_":
            continue
        if key == "_partial_" and isinstance(value, bool):
            continue
        if key in HYDRA_KEYS:
            raise _refuse(source, f"{where}.{key}", "is a Hydra option a file may not set")
        check_plain(value, f"{where}.{key}", source)


def check_hyper_parameters(hparams: Any, source: str | Path) -> None:
    """The `hyper_parameters` of a checkpoint build nothing but what `ALLOWED` lists: each
    slot of `SLOTS` (when set) checked by `check_node`, the autoencoder a latent model embeds
    likewise, every other value plain data."""
    if hparams is None:
        return
    if not isinstance(hparams, dict):
        raise _refuse(source, "hyper_parameters", f"is a {type(hparams).__name__}, not a dict")
    for key, value in hparams.items():
        where = f"hyper_parameters.{key}"
        if key in SLOTS and value is not None:
            check_node(value, SLOTS[key], where, source)
        elif key == "autoencoder" and isinstance(value, dict):
            for part, item in value.items():
                if part == "net":
                    check_node(item, ("autoencoder",), f"{where}.net", source)
                else:
                    check_plain(item, f"{where}.{part}", source)
        else:
            check_plain(value, where, source)
