"""Reference statistics are cached and reused; eval.py writes FID as JSON."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config, run_script
from omegaconf import OmegaConf
from PIL import Image

from ddpm.cli import eval as evaluation
from ddpm.cli.eval import write_table
from ddpm.cli.sources import image_files, npz_images, read_image
from ddpm.data.folder import load_image_folder
from ddpm.data.loaders import load_mnist5k
from ddpm.metrics.fid import REAL_STATES, InceptionMetrics, check_count, metric_name
from ddpm.metrics.inception import fid_helper_file
from ddpm.metrics.reference import cached_reference, stats_key


def test_reference_statistics_are_cached_and_invalidated(weights, tmp_path: Path):
    images = load_mnist5k().images[:70]
    calls = []

    def real():
        calls.append(1)
        return images.split(35)

    key = stats_key("mnist5k", "train", images, weights, 64, tmp_path)
    first = InceptionMetrics(weights, features=64, kid=True)
    path = cached_reference(first, key, real, tmp_path)
    assert path.is_file() and len(calls) == 1

    def must_not_run():
        raise AssertionError("the cached statistics were not used")

    second = InceptionMetrics(weights, features=64, kid=True)
    assert cached_reference(second, key, must_not_run, tmp_path) == path
    for state in REAL_STATES:
        assert torch.equal(getattr(first.fid, state), getattr(second.fid, state))
    assert torch.equal(torch.cat(first.kid.real_features), torch.cat(second.kid.real_features))
    # FID alone reads the same file; any change of the key (here the count) computes anew
    assert cached_reference(InceptionMetrics(weights, features=64), key, must_not_run, tmp_path)
    fewer = stats_key("mnist5k", "train", images[:65], weights, 64, tmp_path)
    cached_reference(InceptionMetrics(weights, features=64), fewer, lambda: [images[:65]], tmp_path)
    assert len(calls) == 1 and len(list((tmp_path / "fid_stats").glob("*.pt"))) == 2

    # a file cached without KID's features is recomputed when KID is asked for
    def real65():
        calls.append(1)
        return [images[:65]]

    with_kid = InceptionMetrics(weights, features=64, kid=True)
    cached_reference(with_kid, fewer, real65, tmp_path)
    assert len(calls) == 2 and len(torch.cat(with_kid.kid.real_features)) == 65


def test_the_cache_key_follows_the_images_and_the_network(weights, tmp_path: Path):
    """Other images under the same dataset name and count, or another network saved under the
    same file name, are another key: their statistics are computed, never the cached ones."""
    images = load_mnist5k().images
    key = stats_key("folder", "train", images[:70], weights, 64, tmp_path)
    other_images = stats_key("folder", "train", images[70:140], weights, 64, tmp_path)
    assert other_images != key and other_images["n"] == key["n"]
    assert stats_key("folder", "train", images[:70], weights, 64, tmp_path) == key  # stable
    # another network under the same file name (and a changed file is hashed again)
    renamed = tmp_path / "net" / Path(weights).name
    renamed.parent.mkdir()
    state = torch.load(weights, weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"] * 1.01
    torch.save(state, renamed)
    other_net = stats_key("folder", "train", images[:70], str(renamed), 64, tmp_path)
    assert other_net["network_sha256"] != key["network_sha256"]
    metrics = InceptionMetrics(weights, features=64)
    path = cached_reference(metrics, key, lambda: images[:70].split(35), tmp_path)
    computed = []
    for other in (other_images, other_net):
        cached_reference(
            InceptionMetrics(weights, features=64),
            other,
            lambda: computed.append(1) or [images[:70]],
            tmp_path,
        )
    assert len(computed) == 2 and len(list(path.parent.glob("*.pt"))) == 3


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "random bytes", "wrong shape", "another key", "not finite"],
)
def test_a_corrupt_cache_file_is_named_moved_aside_and_rebuilt(weights, tmp_path, caplog, damage):
    images = load_mnist5k().images[:70]
    key = stats_key("mnist5k", "train", images, weights, 64, tmp_path)
    path = cached_reference(InceptionMetrics(weights, features=64), key, lambda: [images], tmp_path)
    good = torch.load(path, weights_only=True)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random bytes":
        path.write_bytes(bytes(range(256)) * 4)
    else:
        bad = dict(good)
        if damage == "wrong shape":
            bad["real_features_sum"] = torch.zeros(2048, dtype=torch.float64)
        elif damage == "another key":
            bad["key"] = {**key, "n": 5}
        else:
            bad["real_features_cov_sum"] = bad["real_features_cov_sum"] * float("nan")
        torch.save(bad, path)
    metrics = InceptionMetrics(weights, features=64)
    with caplog.at_level("WARNING"):
        assert cached_reference(metrics, key, lambda: [images], tmp_path) == path
    assert f"reference statistics {path}" in caplog.text and "computed anew" in caplog.text
    assert path.with_name(path.name + ".corrupt").is_file()  # kept for a look
    for state in REAL_STATES:
        assert torch.equal(getattr(metrics.fid, state).cpu(), good[state])


def test_too_few_images_and_names(caplog):
    with caplog.at_level("WARNING"):
        check_count(1000, 2048)  # allowed, as papers' small-n FIDs are, with a warning
    assert "rank-deficient (n <= d)" in caplog.text
    with pytest.raises(ValueError, match="at least 2 images"):
        check_count(1, 64)
    assert metric_name(50000, "train", "ddim100") == "fid50k_train_ddim100"
    assert metric_name(10000, "test") == "fid10k_test"


def test_eval_py_on_an_npz(tmp_path: Path):
    # eval.py's 100 reference images are reference_subset's: order[:100] of a seed-0
    # permutation (mnist5k is sorted by class); these 70 are others, of the same mix
    order = torch.randperm(5000, generator=torch.Generator().manual_seed(0))
    digits = load_mnist5k().images[order[100:170]]
    npz = tmp_path / "samples.npz"
    np.savez(npz, arr_0=digits.permute(0, 2, 3, 1).numpy())
    args = [
        f"source={npz}",
        "n=70",
        "reference_n=100",
        "features=64",
        f"weights={fid_helper_file()}",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path}",
    ]
    run_script("eval.py", *args)
    result = json.loads((tmp_path / "samples.npz.fid.json").read_text())
    assert result["reference"]["n"] == 100 and result["reference"]["split"] == "train"
    # real digits against other real digits of the same mix of classes: close
    assert 0 <= result["fid70_train"] < 1.0
    assert abs(result["kid70_train"]) < 0.02 and result["kid70_train_std"] >= 0
    assert "is70" not in result  # fid-helper's weights have no classifier: IS is left out
    assert len(list((tmp_path / "cache" / "fid_stats").glob("*.pt"))) == 1


def eval_checkpoint(trained_run: Path, tmp_path: Path, *overrides: str) -> None:
    """eval.py on the tiny trained checkpoint: 70 samples against 100 digits, 64-d features."""
    run_script(
        "eval.py",
        f"source={trained_run / 'checkpoints' / 'last.ckpt'}",
        "n=70",
        "reference_n=100",
        "features=64",
        f"weights={fid_helper_file()}",
        f"cache_dir={tmp_path}",
        f"hydra.run.dir={tmp_path}",
        *overrides,
    )


@pytest.mark.slow
def test_eval_py_samples_a_checkpoint(trained_run: Path, tmp_path: Path):
    out = tmp_path / "fid.json"
    eval_checkpoint(
        trained_run,
        tmp_path,
        "sampler=dpmpp_2m",
        "steps=2",
        "guidance=1",
        f"out={out}",
    )
    result = json.loads(out.read_text())
    # a 4-step model draws noise, far from the digits
    assert result["fid70_train_dpmpp_2m2"] > 1.0


@pytest.mark.slow
def test_metrics_sharded_over_two_processes_equal_one(
    trained_run: Path, weights_with_classifier: str, tmp_path: Path
):
    import subprocess
    import sys

    from conftest import ROOT

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    script = str(ROOT / "tests" / "fid_ddp_script.py")
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for world, launcher in (
        (1, [sys.executable, script]),
        (
            2,
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                "2",
                script,
            ],
        ),
    ):
        out = tmp_path / f"fid{world}.json"
        proc = subprocess.run(
            # a cache of its own: rank 0 builds the reference from 2 batches while rank 1
            # holds none (the uneven states torchmetrics gathers item by item)
            [*launcher, str(ckpt), weights_with_classifier, str(tmp_path / f"c{world}"), str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[world] = json.loads(out.read_text())
    one, two = results[1], results[2]
    assert two.pop("world_size") == 2 and one.pop("world_size") == 1
    assert set(one) == {
        "fid70_train_ddim3",
        "kid70_train_ddim3",
        "kid70_train_ddim3_std",
        "is70_ddim3",
        "is70_ddim3_std",
    }
    assert one["fid70_train_ddim3"] > 1.0  # noise vs digits: far
    assert two == pytest.approx(one, rel=1e-4)


@pytest.mark.slow
def test_train_py_logs_fid_at_validation(tmp_path: Path):
    import csv

    from conftest import FAST, tiny_fid

    run = tmp_path / "run"
    run_script(
        "train.py",
        *FAST,
        *tiny_fid(tmp_path / "cache"),
        f"hydra.run.dir={run}",
    )
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # the callback follows the sampler group (ddpm) with its own steps; validations run after
    # steps 2 and 4 (logged at 1 and 3) and every second one measures FID: only the first
    fid = [
        (int(r["step"]), float(r["val/fid70_train_ddpm2"]))
        for r in rows
        if r.get("val/fid70_train_ddpm2")
    ]
    assert [step for step, _ in fid] == [1], rows
    assert fid[0][1] > 1.0
    kid = [float(r["val/kid70_train_ddpm2"]) for r in rows if r.get("val/kid70_train_ddpm2")]
    assert len(kid) == 1 and kid[0] > 0.01
    assert len([r for r in rows if r.get("val/loss")]) == 2
    # the network evaluations per image, logged beside: 2 steps, doubled by guidance
    guided = OmegaConf.load(run / "config.yaml").callbacks.fid.guidance > 0
    nfe = [float(r["val/nfe_per_image_ddpm2"]) for r in rows if r.get("val/nfe_per_image_ddpm2")]
    assert nfe == [2 * (2 if guided else 1)]


@pytest.mark.slow
def test_step_count_table(trained_run: Path, tmp_path: Path):
    out = tmp_path / "ckpt.json"
    eval_checkpoint(
        trained_run,
        tmp_path,
        "table=[ddim:2,ddim:3,dpmpp_2m:2]",
        f"out={out}",
    )
    result = json.loads(out.read_text())
    names = ["fid70_train_ddim2", "fid70_train_ddim3", "fid70_train_dpmpp_2m2"]
    assert all(result[n] > 0 for n in names)
    assert [result[f"nfe_per_image_{s}"] for s in ("ddim2", "ddim3", "dpmpp_2m2")] == [2, 3, 2]
    assert (tmp_path / "ckpt.fid_vs_nfe.png").is_file()
    table = (tmp_path / "ckpt.table.md").read_text().splitlines()
    assert table[0] == "| sampler | steps | NFE / image | FID (70 samples vs train) | KID ×10³ |"
    assert [row.split("|")[1:3] for row in table[2:]] == [
        [" ddim ", " 2 "],
        [" ddim ", " 3 "],
        [" dpmpp_2m ", " 2 "],
    ]
    kid = float(table[2].split("|")[5].split("±")[0])
    assert kid == pytest.approx(1e3 * result["kid70_train_ddim2"], abs=0.01)
    csv = (tmp_path / "ckpt.table.csv").read_text().splitlines()
    assert csv[0] == "sampler,steps,nfe_per_image,fid,kid,kid_std" and len(csv) == 4
    assert float(csv[1].split(",")[3]) == pytest.approx(result["fid70_train_ddim2"], rel=1e-5)


def test_table_csv_is_what_the_string_join_wrote(tmp_path: Path):
    """write_table's CSV goes through csv.writer now: the same bytes as the former joins."""
    values = {
        "fid70_train_ddim2": 4.123456789,
        "kid70_train_ddim2": 0.0123,
        "kid70_train_ddim2_std": 0.001,
    }
    rows = [("ddim", 2, values, 2), ("dpmpp_2m", 10, {k: v * 2 for k, v in values.items()}, 10)]
    write_table(rows, tmp_path / "t", 70, "train")
    former = ["sampler,steps,nfe_per_image,fid,kid,kid_std"]
    for name, steps, v, nfe in rows:
        cells = [v["fid70_train_ddim2"], v["kid70_train_ddim2"], v["kid70_train_ddim2_std"]]
        former.append(f"{name},{steps},{nfe}," + ",".join(f"{c:.6f}" for c in cells))
    assert (tmp_path / "t.table.csv").read_text() == "\n".join(former) + "\n"
    row = (tmp_path / "t.table.md").read_text().splitlines()[2]
    assert row.startswith("| ddim | 2 | 2 | 4.12 |")


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "I;16", "JPEG"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_image_file_is_read_as_its_l_or_rgb_conversion(tmp_path: Path, mode, channels):
    """Palette images are read as their colours (not their indices), alpha is dropped,
    16-bit images keep their top 8 bits, JPEGs decode; all as the reference's channels."""
    g = np.random.default_rng(0)
    rgb = Image.fromarray(g.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    path = tmp_path / ("x.jpg" if mode == "JPEG" else "x.png")
    if mode == "P":
        rgb.quantize(16).save(path)
    elif mode == "I;16":
        wide = g.integers(0, 65536, (12, 10), dtype=np.uint16)
        Image.fromarray(wide).save(path)
        expected = (wide >> 8).astype(np.uint8)
        expected = expected if channels == 1 else np.repeat(expected[..., None], 3, axis=2)
    elif mode == "JPEG":
        rgb.save(path, quality=95)
    else:
        rgb.convert(mode).save(path)
    got = read_image(path, channels)
    assert got.dtype == np.uint8 and got.shape == ((12, 10) if channels == 1 else (12, 10, 3))
    if mode != "I;16":
        expected = np.asarray(Image.open(path).convert("L" if channels == 1 else "RGB"))
    assert np.array_equal(got, expected)
    if mode == "P":  # the colours, which the palette indices are not
        assert not np.array_equal(got, np.asarray(Image.open(path)))


def test_npz_of_grayscale_without_a_channel_axis(tmp_path: Path):
    digits = load_mnist5k().images[:5]  # (5, 1, 28, 28)
    np.savez(tmp_path / "flat.npz", arr_0=digits[:, 0].numpy())  # (N, H, W)
    np.savez(tmp_path / "nhwc.npz", arr_0=digits.permute(0, 2, 3, 1).numpy())
    assert torch.equal(npz_images(tmp_path / "flat.npz", 5), digits)
    assert torch.equal(npz_images(tmp_path / "nhwc.npz", 4), digits[:4])
    np.savez(tmp_path / "float.npz", arr_0=digits.float().numpy())
    with pytest.raises(ValueError, match="expected uint8 images"):
        npz_images(tmp_path / "float.npz", 5)


def test_a_16_bit_image_reads_the_same_as_reference_and_as_sample(tmp_path: Path):
    """A training folder (the reference of dataset=folder) and eval.py's image source read a
    16-bit PNG alike, by its top 8 bits (PIL's own convert would clip it at 255)."""
    wide = np.random.default_rng(1).integers(0, 65536, (16, 16), dtype=np.uint16)
    (tmp_path / "pics").mkdir()
    Image.fromarray(wide).save(tmp_path / "pics" / "a.png")
    reference = load_image_folder(tmp_path / "pics", 16, 1, class_folders=False)[0]
    source = read_image(tmp_path / "pics" / "a.png", 1)
    assert np.array_equal(reference[0, 0].numpy(), source)
    assert np.array_equal(source, (wide >> 8).astype(np.uint8))


def test_an_rgb_npz_against_a_grayscale_reference_is_converted_as_files_are(tmp_path: Path):
    rgb = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", arr_0=rgb)
    gray = npz_images(tmp_path / "rgb.npz", 3, channels=1)
    expected = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb])
    assert gray.shape == (3, 1, 8, 8) and np.array_equal(gray[:, 0].numpy(), expected)
    assert npz_images(tmp_path / "rgb.npz", 3, channels=3).shape == (3, 3, 8, 8)


def test_eval_py_prints_the_nll_bound_of_held_out_images(trained_run: Path, tmp_path: Path):
    """nll=true: the bound over all T steps of n images training held out, in bits/dim."""
    out = tmp_path / "nll.json"
    proc = run_script(
        "eval.py",
        f"source={trained_run / 'checkpoints' / 'last.ckpt'}",
        "nll=true",
        "fid=false",
        "n=4",
        "batch_size=4",
        f"out={out}",
        f"hydra.run.dir={tmp_path}",
    )
    result = json.loads(out.read_text())
    bpd = result["bpd_mnist5k_val"]
    # a 4-step model is far from the data, but the bound is a finite, positive number of bits
    # of which L_T (x_T vs N(0, I)) is a tiny part
    assert 0 < bpd < 100 and result["bpd_mnist5k_val_std_err"] > 0
    assert 0 <= result["bpd_mnist5k_val_prior"] < 0.01 * bpd
    assert result["nll_variance"] == "large"
    assert '"bpd_mnist5k_val"' in proc.stdout and "fid" not in json.dumps(result)

    # in-process: a second interpreter start (~6 s) only to read one message
    cfg = compose_config([f"source={tmp_path}", "nll=true", "fid=false", "n=2"], name="eval")
    with pytest.raises(ValueError, match="nll=true needs source= to be a checkpoint"):
        evaluation.evaluate(cfg)


def test_the_checkpoint_is_read_once_per_evaluation(trained_run: Path, tmp_path, monkeypatch):
    """nll=true and a table of three samplers read the source checkpoint once: its checks,
    the bound and every entry's sampling use the module loaded then (it was read five times:
    the checks, the bound, each entry). Counted at torch.load, whatever loader calls it."""
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    hparams = state["hyper_parameters"]
    # T = 10: the bound's T network calls in a moment (the network takes any t)
    state["hyper_parameters"] = {**hparams, "schedule": {**hparams["schedule"], "timesteps": 10}}
    ckpt = tmp_path / "t10.ckpt"
    torch.save(state, ckpt)
    reads = []
    real = torch.load

    def counted(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f) == ckpt:
            reads.append(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counted)
    args = [
        f"source={ckpt}",
        "nll=true",
        "table=[ddim:2,ddim:3,dpmpp_2m:2]",
        "n=4",
        "batch_size=4",
        "reference_n=100",
        "features=64",
        f"weights={fid_helper_file()}",
        f"cache_dir={tmp_path / 'cache'}",
        f"out={tmp_path / 'r.json'}",
    ]
    result = evaluation.evaluate(compose_config(args, name="eval"))
    assert len(reads) == 1
    assert result["bpd_mnist5k_val"] > 0
    assert all(result[f"fid4_train_{s}"] > 0 for s in ("ddim2", "ddim3", "dpmpp_2m2"))
    assert (tmp_path / "r.table.md").is_file()


# Bad sources that need files of their own (the bad-input table's fixture has none of these):
# (case, overrides ({files} filled in), the message). Each fails before the Inception network
# is loaded, and leaves the files as they were.
EVAL_FILE_CASES = [
    (
        "npz without arr_0",
        ["source={no_arr_0}"],
        r"^source=.*no_arr_0.npz has no arr_0 \(it holds images\); eval.py reads the images from "
        r"arr_0, as OpenAI's and EDM's evaluators do: np.savez\(path, arr_0=images\)",
    ),
    (
        "flat npz",
        ["source={flat}"],
        r"^source=.*flat.npz: arr_0 is uint8 \(80, 784\); expected uint8 images \(N, H, W, C\)",
    ),
    (
        "a bare .npy named .npz",
        ["source={bare}"],
        r"^source=.*bare.npz holds one bare array \(.npy\), not an .npz archive",
    ),
    (
        "images of mixed sizes",
        ["source={mixed}"],
        r"^source=.*mixed holds images of different sizes \(00.png is 28x28, 40.png 32x32\): "
        r"FID compares images of one size",
    ),
    (
        "images of another size than the reference",
        ["source={large}"],
        r"^source images are 32 px, the reference mnist5k is 28 px: compare at one resolution",
    ),
    (
        "sample.py's output folder with too few images",
        ["source={sampled}", "n=70"],
        r"^source=.*sampled/images holds 4 image files .*fewer than n=70",
    ),
    (
        "guidance on an unconditional checkpoint",
        ["source={uncond}", "guidance=3"],
        r"^guidance=3 needs a class-conditional model, and .*uncond.ckpt is unconditional",
    ),
    (
        "guidance for a source of images",
        ["source={nchw}", "guidance=3"],
        r"^guidance=3 applies to checkpoint sources \(.ckpt\), which eval.py samples from",
    ),
    (
        "out= on a read-only disk",
        ["source={nchw}", "out={readonly}/fid.json"],
        r"^out=.*readonly/fid.json: cannot write to .*readonly \(Read-only file system\); "
        r"choose a writable place: out=DIR/fid.json",
    ),
]


@pytest.fixture(scope="module")
def bad_sources(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sources")
    digits = load_mnist5k().images[:80]  # (80, 1, 28, 28)
    np.savez(root / "no_arr_0.npz", images=digits.numpy())
    np.savez(root / "flat.npz", arr_0=digits.reshape(80, -1).numpy())
    np.save(root / "bare.npy", digits.numpy())
    (root / "bare.npy").rename(root / "bare.npz")
    np.savez(root / "nchw.npz", arr_0=digits.numpy())
    for name, sizes in (("mixed", [28] * 40 + [32] + [28] * 39), ("large", [32] * 80)):
        (root / name).mkdir()
        for k, size in enumerate(sizes):
            Image.new("L", (size, size), color=k).save(root / name / f"{k:02d}.png")
    from conftest import compose_config

    from ddpm.cli import sample as sampling

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt={ckpt}", f"out={root / 'sampled'}", "n=4", "steps=2"]
    sampling.sample(compose_config(args, name="sample"))
    state = torch.load(ckpt, weights_only=True)
    state["hyper_parameters"] = {**state["hyper_parameters"]}
    state["hyper_parameters"]["net"] = {**state["hyper_parameters"]["net"], "num_classes": None}
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if "class_embed" not in k}
    torch.save(state, root / "uncond.ckpt")
    (root / "readonly").mkdir()
    names = ["no_arr_0", "flat", "bare", "nchw"]
    files = {name: str(root / f"{name}.npz") for name in names}
    files |= {n: str(root / n) for n in ("mixed", "large", "sampled", "readonly")}
    return {**files, "uncond": str(root / "uncond.ckpt"), "root": str(root)}


def _no_inception(monkeypatch) -> None:
    """The Inception network must not be loaded: every check comes before it."""
    from ddpm.cli import eval as evaluation

    def started(*args, **kwargs):
        raise AssertionError("the Inception work started before the input was checked")

    monkeypatch.setattr(evaluation, "inception_weights", started)
    monkeypatch.setattr(evaluation, "InceptionMetrics", started)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "overrides,message", [c[1:] for c in EVAL_FILE_CASES], ids=[c[0] for c in EVAL_FILE_CASES]
)
def test_a_bad_source_is_named_before_any_work(
    overrides, message, bad_sources, monkeypatch, tmp_path
):
    import tempfile

    from conftest import compose_config

    from ddpm import files
    from ddpm.cli import eval as evaluation

    if any("readonly" in o for o in overrides):  # as root, only a read-only disk refuses
        real = tempfile.TemporaryFile

        def probe(*args, dir=None, **kwargs):
            if "readonly" in str(dir):
                raise OSError(30, "Read-only file system")
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(files.tempfile, "TemporaryFile", probe)
    _no_inception(monkeypatch)
    args = ["n=70", "features=64", f"cache_dir={tmp_path / 'cache'}", f"out={tmp_path / 'r.json'}"]
    args += [o.format(**bad_sources) for o in overrides]
    before = _snapshot(Path(bad_sources["root"]))
    with pytest.raises((ValueError, OSError)) as info:
        evaluation.evaluate(compose_config(args, name="eval"))
    assert re.search(message, str(info.value)), str(info.value)
    print(f"BAD-INPUT|eval|{' '.join(overrides)}|{str(info.value).splitlines()[0]}")
    assert _snapshot(Path(bad_sources["root"])) == before
    assert not (tmp_path / "r.json").exists()


def test_nchw_npz_jpegs_and_sample_output_folders_are_read_as_meant(
    bad_sources, tmp_path: Path, caplog
):
    """An (N, C, H, W) npz is transposed (C = 1 or 3 and W not: unambiguous); a JPEG folder is
    read, with a warning that JPEG artefacts raise FID; sample.py's output folder means its
    images/, never grid.png."""
    digits = load_mnist5k().images[:80]
    assert torch.equal(npz_images(Path(bad_sources["nchw"]), 80, 1), digits)
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for k in range(3):
        Image.fromarray(digits[k, 0].numpy()).save(jpegs / f"{k}.jpg", quality=95)
    with caplog.at_level("WARNING"):
        assert [p.name for p in image_files(jpegs, 3)] == ["0.jpg", "1.jpg", "2.jpg"]
    assert "3 of 3 images are JPEGs, whose compression artefacts raise FID" in caplog.text
    sampled = Path(bad_sources["sampled"])
    (sampled / "images" / "notes.png").write_bytes(b"")  # not one of sample.py's images
    try:
        files = image_files(sampled, 4)
    finally:
        (sampled / "images" / "notes.png").unlink()
    assert [p.relative_to(sampled).as_posix() for p in files] == [
        f"images/{k:06d}.png" for k in range(4)
    ]
