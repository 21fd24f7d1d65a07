"""Caches are checked like checkpoints (issue 23, parts 2, 7 and 9): every cached file a
library would unpickle is loaded weights-only and compared with what it should hold first; a
cache of the wrong content is named in a warning, moved aside and rebuilt; what killed writes
left is removed at the next start; a full disk is one line naming the file; caches live in
one per-user directory and eval.py's logs beside its result, never in the working directory.

Every planted pickle carries a payload that touches a marker file: it must never exist."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, compose_config

from ddpm import files
from ddpm.data import fontletters
from ddpm.files import DiskFull, atomic_write, user_cache_dir
from ddpm.metrics import inception
from ddpm.metrics.inception import fid_helper_file, inception_weights

ADVICE = ("weights_only", "likely succeed")  # torch's invitation to load a file unsafely


class Payload:
    """Unpickled, it creates `marker`: a file that runs code when loaded unsafely."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def no_advice(text: str) -> None:
    assert not any(a in text for a in ADVICE), text


def converted_name(cache: Path) -> Path:
    source = fid_helper_file()
    digest = inception.file_sha256(source)[:12]
    return cache / f"inception-2015-12-05-from-{source.stem}-{digest}.pth"


# -- part 2: third-party weights checked before torch-fidelity unpickles them ----------------


def test_a_planted_converted_inception_file_is_checked_and_replaced(tmp_path, caplog):
    """The file torch-fidelity loads with weights_only=False: a pickle planted at the name of
    the conversion never runs; it is moved aside, named, and the conversion written anew."""
    marker = tmp_path / "pwned"
    planted = converted_name(tmp_path)
    torch.save({"fc.weight": Payload(marker)}, planted)
    with caplog.at_level(logging.WARNING):
        weights = inception_weights(fid_helper_file(), tmp_path)
    assert weights == str(planted) and not marker.exists()
    assert "converted Inception weights" in caplog.text and "could run code" in caplog.text
    no_advice(caplog.text)
    assert planted.with_name(planted.name + ".corrupt").is_file()
    # a weights-only file of other tensors (a zeroed network) is not trusted either
    state = torch.load(planted, weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"].zero_()
    torch.save(state, planted)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        inception_weights(fid_helper_file(), tmp_path)
    assert "tensors differ from the conversion of its source" in caplog.text
    assert torch.load(planted, weights_only=True)["Conv2d_1a_3x3.conv.weight"].any()
    # and a good one is reused as it is
    caplog.clear()
    before = planted.stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        inception_weights(fid_helper_file(), tmp_path)
    assert planted.stat().st_mtime_ns == before and "Inception" not in caplog.text


def test_torch_fidelitys_download_is_checked_before_it_loads_it(tmp_path, monkeypatch, caplog):
    """weights=null: torch-fidelity reads its earlier download from torch's hub cache with
    weights_only=False; a file planted there is moved aside (to be downloaded anew)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    marker = tmp_path / "pwned"
    download = inception.download_file()
    download.parent.mkdir(parents=True)
    torch.save({"x": Payload(marker)}, download)
    with caplog.at_level(logging.WARNING):
        assert inception_weights(None) is None
    assert not download.exists() and download.with_name(download.name + ".corrupt").is_file()
    assert "downloaded Inception weights" in caplog.text and "sha256 is not 6726825d" in caplog.text
    assert not marker.exists()
    no_advice(caplog.text)


def test_has_classifier_refuses_a_pickle_in_one_line(tmp_path):
    """inception_score=auto reads the classifier: torch's UnpicklingError (with its advice)
    was a traceback there; now a one-line refusal."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": Payload(marker)}, evil)
    with pytest.raises(ValueError, match="refused Inception weights .*could run code") as info:
        inception.has_classifier(str(evil))
    assert info.value.__cause__ is None and info.value.__suppress_context__
    no_advice(str(info.value))
    assert not marker.exists()


# -- part 7: caches verify what they hold ----------------------------------------------------


def fake_metrics(features: int = 8):
    """A stand-in for InceptionMetrics with the real-state interface cached_reference uses."""
    from ddpm.metrics.fid import REAL_STATES

    class Metrics:
        def __init__(self):
            self.features, self.real_count, self.loaded = features, 0, None

        def update(self, batch, real):
            self.real_count += len(batch)

        def real_state(self):
            state = {s: None for s in REAL_STATES}
            state["real_features_sum"] = torch.zeros(features, dtype=torch.float64)
            state["real_features_cov_sum"] = torch.zeros(features, features, dtype=torch.float64)
            state["real_features_num_samples"] = torch.tensor(self.real_count)
            return {k: v for k, v in state.items() if v is not None}

        def load_real_state(self, state):
            self.loaded = state
            return True

    return Metrics()


def stats_case(tmp_path: Path):
    from ddpm.metrics.reference import stats_key

    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    key = stats_key("mnist5k", "train", images, None, 8, tmp_path)
    return key, lambda: [images]


def test_reference_statistics_of_a_pickle_are_rebuilt_without_torchs_advice(tmp_path, caplog):
    from ddpm.metrics.reference import cached_reference

    key, real = stats_case(tmp_path)
    path = cached_reference(fake_metrics(), key, real, tmp_path)  # where its cache lives
    marker = tmp_path / "pwned"
    torch.save({"key": key, "real_features_sum": Payload(marker)}, path)
    with caplog.at_level(logging.WARNING):
        cached_reference(fake_metrics(), key, real, tmp_path)
    assert "reference statistics" in caplog.text and "could run code" in caplog.text
    no_advice(caplog.text)
    assert not marker.exists() and path.with_name(path.name + ".corrupt").is_file()
    rebuilt = torch.load(path, weights_only=True)
    assert rebuilt["key"] == key
    # a value changed on disk, its shape and finiteness intact: caught by the checksum
    rebuilt["real_features_sum"][0] = 1.0
    torch.save(rebuilt, path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = fake_metrics()
        cached_reference(metrics, key, real, tmp_path)
    assert "its tensors do not match their checksum" in caplog.text and metrics.real_count == 4


def test_a_full_disk_leaves_the_reference_statistics_uncached(tmp_path, monkeypatch, caplog):
    """A cache write that finds no space is a warning naming the file; the statistics are in
    memory and the measurement goes on."""
    from ddpm.metrics.reference import cached_reference

    key, real = stats_case(tmp_path)

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    metrics = fake_metrics()
    with caplog.at_level(logging.WARNING):
        path = cached_reference(metrics, key, real, tmp_path)
    assert metrics.real_count == 4 and not path.exists()
    assert f"not cached (cannot write {path}: No space left on device" in caplog.text
    assert not list(path.parent.glob(".*.tmp"))


def letters_cache(root: Path, per_class: int = 2) -> Path:
    return root / "fontletters" / f"letters-v1-{per_class}-0.pt"


def test_a_letters_cache_of_the_wrong_content_is_rendered_anew(tmp_path, caplog):
    """30 black images that load fine were trusted; now every kind of wrong content is named
    in a warning, kept aside for a look, and the letters rendered again."""
    from ddpm.data.fontletters import load_letters

    images, labels = load_letters(tmp_path, per_class=2)
    path = letters_cache(tmp_path)
    good = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    wrong = {
        "it was not made for these settings": {
            "images": torch.zeros(30, 1, 28, 28, dtype=torch.uint8),
            "labels": torch.zeros(30, dtype=torch.long),
        },
        "its images are (30, 1, 28, 28), not (52, 1, 28, 28)": {
            **good,
            "images": torch.zeros(30, 1, 28, 28, dtype=torch.uint8),
        },
        "its pixels do not match their checksum": {**good, "images": images.flip(0)},
        "52 of its images are blank": {
            **good,
            "images": torch.zeros_like(images),
            "sha256": fontletters._digest(torch.zeros_like(images), labels),
        },
        "its labels are not 0..25 in order": {**good, "labels": labels.flip(0)},
        "it holds more than tensors and plain data": {"images": Payload(marker)},
    }
    for k, (problem, content) in enumerate(wrong.items()):
        torch.save(content, path)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            again, _ = load_letters(tmp_path, per_class=2)
        assert torch.equal(again, images), problem
        assert f"letters cache {path}: {problem}" in caplog.text
        assert path.with_name(f"{path.name}.corrupt{k or ''}").is_file()
    # a cut file is no longer moved aside without a word
    path.write_bytes(path.read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_letters(tmp_path, per_class=2)
    assert "letters cache" in caplog.text and "it does not load" in caplog.text
    assert not marker.exists()
    no_advice(caplog.text)


def test_the_letters_are_cached_per_user(tmp_path, monkeypatch):
    """dataset=fontletters renders once per user ($XDG_CACHE_HOME/ddpm), not once per
    working directory's data/."""
    from ddpm.data.loaders import load_fontletters

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_fontletters(tmp_path / "data", per_class=2)
    assert letters_cache(tmp_path / "xdg" / "ddpm").is_file()
    assert not (tmp_path / "data").exists()


def latent_module(tmp_path: Path):
    """A LatentDataModule whose autoencoder file is only hashed (its cache is planted): the
    content checks run before any autoencoder would be loaded."""
    from ddpm.data.latents import LatentDataModule

    ae = tmp_path / "ae.ckpt"
    ae.write_bytes(b"an autoencoder checkpoint, hashed for the key")
    return LatentDataModule(autoencoder=str(ae), image_size=16, cache_dir=str(tmp_path))


def latents(key: dict, fill: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(0)
    train, val = torch.randn(20, 2, 8, 8, generator=g), torch.randn(4, 2, 8, 8, generator=g)
    return {
        "key": key,
        "train": train * fill,
        "val": val,
        "train_labels": torch.zeros(20, dtype=torch.long),
        "val_labels": torch.zeros(4, dtype=torch.long),
        "class_names": [str(k) for k in range(10)],
        "scale": 1.0,
    }


def test_a_latent_cache_of_nan_is_encoded_anew(tmp_path, monkeypatch, caplog):
    """A cache of the right key but NaN latents was trusted, and the run then blamed the
    learning rate; now it is named, moved aside and encoded again."""
    import hashlib

    from ddpm.data.latents import LatentDataModule, latents_digest

    dm = latent_module(tmp_path)
    key = dm.key()
    name = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
    path = tmp_path / "latents" / f"{dm.name}-16-{name}.pt"
    path.parent.mkdir()
    torch.save(latents(key, fill=float("nan")), path)
    encoded = []
    monkeypatch.setattr(
        LatentDataModule, "_encode", lambda self, key: encoded.append(1) or latents(key)
    )
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert encoded and f"latent cache {path}: its train latents hold NaN or inf" in caplog.text
    assert bool(dm.train_set.images.isfinite().all())
    assert path.with_name(path.name + ".corrupt").is_file()
    rebuilt = torch.load(path, weights_only=True)
    assert rebuilt["sha256"] == latents_digest(rebuilt)
    # a flipped value under a good checksum, and a label count that does not match
    for problem, change in [
        ("its latents do not match their checksum", {"val": rebuilt["val"] + 1}),
        ("its train labels do not count its 20 train latents", {"train_labels": torch.zeros(3)}),
        ("its scale -1.0 is not a positive number", {"scale": -1.0}),
    ]:
        torch.save({**rebuilt, **change}, path)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            latent_module(tmp_path).setup()
        assert problem in caplog.text
    # and a good one is a hit
    encoded.clear()
    latent_module(tmp_path).setup()
    assert not encoded


def test_what_killed_cache_writes_left_is_removed_at_the_next_start(tmp_path, caplog):
    """The temporary files of atomic writes a kill cut short (as large as the cache) are
    removed by the next start of each cache: letters, FID statistics, latents, weights. One a
    live writer holds, or one just made, is left alone."""
    import fcntl

    from ddpm.data.fontletters import load_letters

    old = time.time() - 3600
    dead = [
        tmp_path / "fontletters" / ".letters-v1-2-0.pt.k1l2m3.tmp",
        tmp_path / "fid_stats" / ".mnist5k-train-4-8-0123.pt.a1b2c3.tmp",
        tmp_path / "latents" / ".mnist5k-16-abcd.pt.x9y8z7.tmp",
        tmp_path / ".inception-2015-12-05-from-default_1-7ff4a85c3a63.pth.q1w2e3.tmp",
    ]
    live = tmp_path / "fid_stats" / ".being-written.pt.r4t5y6.tmp"
    young = tmp_path / "fid_stats" / ".just-begun.pt.u7i8o9.tmp"
    kept = tmp_path / "fid_stats" / "notes.tmp"  # not a temporary file of ours
    for path in [*dead, live, young, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a cache file")
        if path is not young:
            os.utime(path, (old, old))
    with open(live, "rb+") as writer, caplog.at_level(logging.WARNING):
        fcntl.flock(writer, fcntl.LOCK_EX)
        load_letters(tmp_path, per_class=2)
        from ddpm.metrics.reference import cached_reference

        key, real = stats_case(tmp_path)
        cached_reference(fake_metrics(), key, real, tmp_path)
        inception_weights(fid_helper_file(), tmp_path)
        dm = latent_module(tmp_path)
        dm._load = lambda path, key: latents(key)  # a hit: only the start's clean-up runs
        dm.setup()
    assert not any(p.exists() for p in dead), [p for p in dead if p.exists()]
    assert live.exists() and young.exists() and kept.exists()
    assert "unfinished writes of a killed run" in caplog.text and dead[0].name in caplog.text


def test_atomic_write_names_the_file_of_a_full_disk(tmp_path):
    def full(f):
        f.write(b"a start")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        DiskFull,
        match=r"^cannot write .*result.json: No space left on device, .* "
        r"free there; free space or write elsewhere$",
    ) as info:
        atomic_write(tmp_path / "result.json", full)
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is None
    assert not list(tmp_path.iterdir())  # neither the file nor its temporary one


def full_after(monkeypatch, k: int, suffix: str):
    """PIL's save finds the disk full after `k` files ending in `suffix`."""
    from PIL import Image

    real = Image.Image.save
    count = [0]

    def save(self, fp, *args, **kwargs):
        if isinstance(fp, (str, Path)) and not str(fp).endswith(suffix):
            return real(self, fp, *args, **kwargs)
        count[0] += 1
        if count[0] > k:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)


def test_sample_py_on_a_full_disk_says_resume_finishes_the_job(trained_run, tmp_path, monkeypatch):
    from ddpm.cli import sample as sampling

    out = tmp_path / "samples"
    args = [f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", f"out={out}", "n=5", "steps=2"]
    args += ["batch_size=2"]
    with monkeypatch.context() as m:
        full_after(m, 3, ".png")
        with pytest.raises(
            OSError,
            match=r"^cannot write .*images/000003.png: No space left on "
            r"device, .*; then rerun with resume=true to finish the job$",
        ):
            sampling.sample(compose_config(args, name="sample"))
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "000000.png",
        "000001.png",
        "000002.png",
    ]  # whole PNGs only: no temporary file, no cut image
    sampling.sample(compose_config([*args, "resume=true"], name="sample"))
    assert len(list((out / "images").glob("*.png"))) == 5 and (out / "grid.png").is_file()


def eval_args(tmp_path: Path, out: Path) -> list[str]:
    """eval.py on 20 real digits (an .npz) against 30 others, 64-d features."""
    from ddpm.data.loaders import load_mnist5k

    npz = tmp_path / "digits.npz"
    np.savez(npz, arr_0=load_mnist5k().images[-20:].permute(0, 2, 3, 1).numpy())
    return [
        f"source={npz}",
        "n=20",
        "reference_n=30",
        "features=64",
        "kid=false",
        f"weights={fid_helper_file()}",
        f"cache_dir={tmp_path / 'cache'}",
        f"out={out}",
    ]


def test_eval_py_checks_out_for_space_before_the_work(tmp_path, monkeypatch):
    import shutil

    from ddpm.cli import eval as evaluation

    def nothing_free(path):
        return shutil._ntuple_diskusage(100, 100, 0)

    def started(*args, **kwargs):
        raise AssertionError("the Inception work began")

    monkeypatch.setattr(files.shutil, "disk_usage", nothing_free)
    monkeypatch.setattr(evaluation, "inception_weights", started)
    out = tmp_path / "results" / "fid.json"
    cfg = compose_config(eval_args(tmp_path, out), name="eval")
    with pytest.raises(
        OSError,
        match=r"^out=.*fid.json: only 0 B free there, 1.0 MiB needed; "
        r"free some space or write elsewhere: out=DIR/fid.json$",
    ):
        evaluation.evaluate(cfg)


def test_eval_py_prints_the_result_it_cannot_write(tmp_path, monkeypatch, capsys):
    from ddpm.cli import eval as evaluation

    out = tmp_path / "fid.json"
    cfg = compose_config(eval_args(tmp_path, out), name="eval")
    real = os.replace

    def full(src, dst):
        if Path(dst) == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(
        OSError,
        match=r"^out=.*fid.json: the result is printed above, but could "
        r"not be written \(cannot write .*fid.json: No space left on device",
    ):
        evaluation.evaluate(cfg)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "fid20_train" in printed and not out.exists()


# -- part 9: one per-user cache, eval.py's logs beside its result ---------------------------


def test_the_user_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir() == tmp_path / "ddpm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec ignores it
    assert user_cache_dir() == Path.home() / ".cache" / "ddpm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir() == Path.home() / ".cache" / "ddpm"
    assert files.cache_root(None) == files.cache_root("") == user_cache_dir()
    assert files.cache_root(tmp_path / "mine") == tmp_path / "mine"  # cache_dir= still works


def test_every_cache_defaults_to_the_user_cache(monkeypatch, tmp_path):
    """eval.py, callbacks=fid and the latent presets: cache_dir null (the per-user cache),
    one paths.cache_dir to move them all."""
    from conftest import train_config

    cfg = compose_config(["source=x.npz"], name="eval")
    assert cfg.cache_dir is None
    run = train_config(tmp_path, ["callbacks=fid", "experiment=latent_mnist5k", "autoencoder=a"])
    assert run.callbacks.fid.cache_dir is None and run.dataset.cache_dir is None
    moved = train_config(tmp_path, ["callbacks=fid", f"paths.cache_dir={tmp_path}"])
    assert moved.callbacks.fid.cache_dir == str(tmp_path)


def test_eval_py_writes_its_logs_beside_its_result_not_into_the_cwd(tmp_path):
    """eval.py started in a directory of the user's writes nothing there: its Hydra run
    directory (eval.log) goes under out='s folder."""
    cwd, results = tmp_path / "cwd", tmp_path / "results"
    cwd.mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"source={tmp_path}/none.npz",
         f"out={results / 'fid.json'}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0 and "none.npz" in proc.stderr + proc.stdout
    assert not list(cwd.iterdir())
    (logs,) = (results / "eval_logs").iterdir()
    assert (logs / "eval.log").is_file()
    cfg = compose_config([f"source={tmp_path}/s.npz"], name="eval")
    assert Path(cfg.hydra.run.dir).parent == tmp_path / "eval_logs"  # beside s.npz.fid.json


@pytest.mark.slow  # the JSON's case is in the fast tier; this one samples a checkpoint
def test_eval_py_prints_the_table_it_cannot_write(trained_run, tmp_path, monkeypatch, capsys):
    """table=: the step-count table's files on a full disk: one line naming the file, and the
    values of every entry printed (minutes of sampling are not lost)."""
    from ddpm.cli import eval as evaluation

    out = tmp_path / "fid.json"
    args = eval_args(tmp_path, out)
    args[0] = f"source={trained_run / 'checkpoints' / 'last.ckpt'}"
    cfg = compose_config([*args, "table=[ddim:2]"], name="eval")
    real = os.replace

    def full(src, dst):
        if str(dst).endswith(".table.csv"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(
        OSError,
        match=r"^the table beside out=.*fid.json could not be written "
        r"\(cannot write .*fid.table.csv: No space left on device",
    ):
        evaluation.evaluate(cfg)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "fid20_train_ddim2" in printed and not list(tmp_path.glob("*.table.*"))


@pytest.mark.parametrize("inception_score", ["false", pytest.param("auto", marks=pytest.mark.slow)])
def test_eval_py_with_a_planted_conversion_runs_nothing(
    tmp_path, monkeypatch, caplog, inception_score
):
    """The case of the issue: a pickle at the cached conversion's name ran under eval.py
    inception_score=false (torch-fidelity's load) and =auto (a traceback with torch's
    advice); now eval.py measures with a fresh conversion and names the planted file."""
    from ddpm.cli import eval as evaluation

    marker = tmp_path / "pwned"
    planted = converted_name(tmp_path / "cache")
    planted.parent.mkdir()
    torch.save({"fc.weight": Payload(marker)}, planted)
    cfg = compose_config(
        [*eval_args(tmp_path, tmp_path / "fid.json"), f"inception_score={inception_score}"],
        name="eval",
    )
    with caplog.at_level(logging.WARNING):
        result = evaluation.evaluate(cfg)
    assert "fid20_train" in result and not marker.exists()
    assert f"converted Inception weights {planted}: it holds more than tensors" in caplog.text
    no_advice(caplog.text)
