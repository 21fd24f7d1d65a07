"""OpenAI's improved-diffusion / guided-diffusion state dicts in (`python -m ddpm.convert import
MODEL.pt OUT.ckpt --flags ...`), offline: the published files cannot be downloaded here, so the
.pt files are random networks at a small width in OpenAI's layout, written from the meaning of
the flags (not from the converter's mapping): diffusers' UNet2DModel of the same function with
its weights mapped onto OpenAI's keys (tests/adm_reference.py), which the converted checkpoint
must then compute; the flags are the READMEs' own."""

from __future__ import annotations

import argparse
import json
import math
import pickle
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from adm_reference import adm_weights, diffusers_twin
from conftest import compose_config
from diffusers import UNet2DModel
from PIL import Image

from ddpm.adm import ADM
from ddpm.cli import eval as evaluation
from ddpm.cli.sample import sample
from ddpm.convert.__main__ import main
from ddpm.convert.openai import ConversionError, parse_flags, read_flags
from ddpm.module import load_module
from ddpm.schedule import NoiseSchedule

# the READMEs' MODEL_FLAGS + DIFFUSION_FLAGS
CIFAR10 = (  # improved-diffusion: cifar10_uncond_50M_500K.pt
    "--image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True --dropout 0.3 "
    "--diffusion_steps 4000 --noise_schedule cosine"
)
IMAGENET64 = (  # improved-diffusion: imagenet64_uncond_100M_1500K.pt
    "--image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True "
    "--diffusion_steps 4000 --noise_schedule cosine"
)
GUIDED_256 = (  # guided-diffusion: 256x256_diffusion.pt
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
    "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True"
)

# small networks of the two codebases' kinds: the flags, and the ADM they describe written out
SMALL_CIFAR10 = CIFAR10.replace("128", "32").replace("--num_res_blocks 3", "--num_res_blocks 1")
SMALL_CIFAR10_ADM = {  # improved-diffusion's create_model for SMALL_CIFAR10, OpenAI's names
    "image_size": 32, "in_channels": 3, "model_channels": 32, "out_channels": 6,
    "num_res_blocks": 1, "attention_resolutions": [16, 8], "dropout": 0.3,
    "channel_mult": [1, 2, 2, 2], "num_heads": 4, "use_scale_shift_norm": True,
}  # fmt: skip
SMALL_GUIDED = (
    "--attention_resolutions 8 --class_cond True --diffusion_steps 1000 --image_size 16 "
    "--learn_sigma True --noise_schedule linear --num_channels 32 --channel_mult 1,2 "
    "--num_head_channels 16 --num_res_blocks 1 --resblock_updown True "
    "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True"
)
SMALL_GUIDED_ADM = {
    "image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6,
    "num_res_blocks": 1, "attention_resolutions": [8], "channel_mult": [1, 2],
    "num_classes": 1000, "null_label": False, "num_head_channels": 16,
    "use_scale_shift_norm": True, "resblock_updown": True, "use_new_attention_order": True,
}  # fmt: skip


def random_weights(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random and non-zero (OpenAI zero-initialises the output convs; a random
    function tests every path), scaled by fan-in so that activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2 + (p == 1).float())
    return net.eval()


def openai_file(path: Path, adm: dict, dtype: torch.dtype = torch.float32) -> ADM:
    """An OpenAI-layout .pt: the state dict of a random ADM (in `dtype`, as a use_fp16 run may
    save it); returns that network with the weights as saved, in float32."""
    net = random_weights(ADM(**adm))
    state = {k: v.to(dtype) for k, v in net.state_dict().items()}
    torch.save(state, path)
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net


def openai_file_of_twin(path: Path, adm: dict, dtype: torch.dtype = torch.float32):
    """An OpenAI-layout .pt made from an independent implementation: diffusers' UNet2DModel of
    the same function (random weights, rounded to `dtype` as the file stores them), its weights
    mapped onto OpenAI's keys by rule (tests/adm_reference.py). Returns the UNet2DModel."""
    twin = random_weights(diffusers_twin(adm))
    with torch.no_grad():
        for w in twin.parameters():
            w.copy_(w.to(dtype).float())
    state = adm_weights(twin, ADM(**adm), adm)
    torch.save({k: v.to(dtype) for k, v in state.items()}, path)
    return twin


def convert(src: Path, out: Path, flags: str, *extra: str) -> None:
    assert main(["import", str(src), str(out), "--flags", flags, *extra]) == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("openai")
    return {
        "cifar10": root / "cifar10.pt",
        "cifar10_twin": openai_file_of_twin(root / "cifar10.pt", SMALL_CIFAR10_ADM),
        "guided": root / "guided.pt",
        "guided_twin": openai_file_of_twin(root / "guided.pt", SMALL_GUIDED_ADM, torch.float16),
    }


def difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| relative to max(1, max |theirs|)."""
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1))


# ---------------------------------------------------------------- the flags


def test_the_readmes_flags_read_as_their_codebases_read_them():
    codebase, _, c = read_flags(CIFAR10)  # 32 px: improved-diffusion's create_model only
    assert codebase == "improved"
    assert c.net["channel_mult"] == [1, 2, 2, 2] and c.net["attention_resolutions"] == [16, 8]
    assert c.net["num_heads"] == 4 and c.net["use_scale_shift_norm"] is True
    assert c.net["timestep_scale"] == 1000 / 4000  # rescale_timesteps True by default there
    assert c.schedule == {"_target_": "ddpm.schedule.NoiseSchedule.cosine", "timesteps": 4000,
                          "s": 0.008, "max_beta": 0.999}  # fmt: skip
    assert (c.objective, c.variance, c.vlb_weight) == ("eps", "learned", 0.001)

    codebase, values, c = read_flags(GUIDED_256)  # flags only guided-diffusion has
    assert codebase == "guided" and values["use_fp16"] is True
    assert c.net["num_classes"] == 1000 and c.net["null_label"] is False
    assert c.net["channel_mult"] == [1, 1, 2, 2, 4, 4] and c.net["timestep_scale"] == 1.0
    assert c.net["num_head_channels"] == 64 and c.net["resblock_updown"] is True
    assert c.vlb_weight == 1 / 1000  # rescale_learned_sigmas False: L_vlb unscaled

    # 64 px and no guided-only flag: both read it, with rescale_timesteps True vs False
    with pytest.raises(ConversionError, match="--rescale_timesteps.*--codebase improved"):
        read_flags(IMAGENET64)
    assert read_flags(IMAGENET64, "improved")[2].net["timestep_scale"] == 0.25
    with pytest.raises(ConversionError, match="--rescale_learned_sigmas"):  # the next one
        read_flags(IMAGENET64 + " --rescale_timesteps False")
    both = " --rescale_timesteps False --rescale_learned_sigmas False"
    assert read_flags(IMAGENET64 + both)[0] == "either"

    # fixed variances (improved-diffusion's --sigma_small), the x_0 objective, L_vlb training
    c = read_flags("--image_size 32 --sigma_small True --predict_xstart True --use_kl True")[2]
    assert (c.objective, c.variance) == ("x0", "small")
    assert read_flags("--image_size 32")[2].variance == "large"


# the READMEs' flags and the model sizes their papers give (ADM: Dhariwal & Nichol 2021's
# 64 / 128 / 256 px and LSUN models; the CIFAR-10 network of issue 26, 52.5M)
PUBLISHED_SIZES = {
    CIFAR10: 52.5e6,
    GUIDED_256: 554e6,
    GUIDED_256.replace("--class_cond True", "--class_cond False --dropout 0.1"): 552e6,  # LSUN
    GUIDED_256.replace("256", "64").replace("linear", "cosine").replace("2 --res", "3 --res")
    .replace("--num_channels 64", "--num_channels 192") + " --use_new_attention_order True"
    + " --dropout 0.1": 296e6,
    GUIDED_256.replace("256", "128").replace("--num_head_channels 64", "--num_heads 4")
    .replace("--num_channels 128", "--num_channels 256"): 422e6,
    # channel_mult 0.5, 1, 1, 2, 2, 4, 4: a first level of int(0.5 · 256) channels
    GUIDED_256.replace("256", "512").replace("--num_channels 512", "--num_channels 256")
    .replace("--use_fp16 True", "--use_fp16 False"): 559e6,
}  # fmt: skip


@pytest.mark.parametrize(
    "flags", list(PUBLISHED_SIZES), ids=["32", "256", "lsun", "64", "128", "512"]
)
def test_the_published_flags_describe_networks_of_the_published_sizes(flags: str):
    """The networks of the READMEs' flags, built on the meta device (no memory, no time)."""
    c = read_flags(flags)[2]
    with torch.device("meta"):
        net = ADM(**{k: v for k, v in c.net.items() if k != "_target_"}, out_channels=6)
    size = PUBLISHED_SIZES[flags]  # to the papers' precision, 0.1M of 52.5M and 1M of 554M
    assert abs(sum(p.numel() for p in net.parameters()) - size) < 0.002 * size


def test_a_linear_schedule_is_openais_scaled_to_t():
    """get_named_beta_schedule: linear β from 1e-4 · 1000/T to 0.02 · 1000/T, cosine by
    betas_for_alpha_bar (max β 0.999), written out here in numpy from the codebase's formulas."""
    for T in (1000, 4000):
        schedule = read_flags(f"--image_size 32 --diffusion_steps {T}")[2].schedule
        kwargs = {k: v for k, v in schedule.items() if k != "_target_"}
        ours = NoiseSchedule.linear(**kwargs).betas.double().numpy()
        scale = 1000 / T
        theirs = np.linspace(scale * 0.0001, scale * 0.02, T, dtype=np.float64)
        np.testing.assert_allclose(ours, theirs, rtol=1e-6)  # float32 buffers
    schedule = read_flags("--image_size 32 --diffusion_steps 4000 --noise_schedule cosine")[2]
    ours = NoiseSchedule.cosine(**{k: v for k, v in schedule.schedule.items() if k != "_target_"})

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    theirs = [min(1 - alpha_bar((i + 1) / 4000) / alpha_bar(i / 4000), 0.999) for i in range(4000)]
    np.testing.assert_allclose(ours.betas.double().numpy(), theirs, rtol=1e-6)


# ---------------------------------------------------------------- the converted network


def outputs(net, x, t, y=None) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(net, UNet2DModel):
            return net(x, t, class_labels=y).sample
        return net(x, t, y)


def test_an_improved_diffusion_file_converts_to_the_same_function(files, tmp_path: Path):
    """T = 4000 with rescale_timesteps: our net(x, t) is the source's model(x, t · 1000/4000)
    (the source: diffusers' UNet2DModel whose weights the file holds)."""
    out = tmp_path / "cifar10.ckpt"
    convert(files["cifar10"], out, SMALL_CIFAR10)
    module, theirs = load_module(out), files["cifar10_twin"]
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 3999])
    want = outputs(theirs, x, t.float() * 1000 / 4000)
    assert difference(outputs(module.ema.module, x, t), want) < 1e-4
    assert difference(outputs(theirs, x, t.float()), want) > 1e-2  # the rescaling matters
    hp = module.hparams
    assert hp.learn_sigma and hp.objective == "eps" and module.schedule.num_timesteps == 4000
    assert module.sampling["variance"] == "learned"
    raw = torch.load(out, weights_only=True)
    assert raw["converted_from"]["codebase"] == "improved"
    # the vlb checkpoint's --use_kl True: L_vlb alone is what a fine-tuning here trains
    assert hp.loss == "mse"
    convert(files["cifar10"], tmp_path / "vlb.ckpt", SMALL_CIFAR10 + " --use_kl True")
    assert load_module(tmp_path / "vlb.ckpt").hparams.loss == "vlb"


def test_a_guided_diffusion_file_converts_and_sample_py_draws_from_it(files, tmp_path: Path):
    """fp16 weights, 1000 classes (no null label), head channels, BigGAN up/down, the new
    attention order: the same function; sample.py draws with the learned variance."""
    out = tmp_path / "guided.ckpt"
    convert(files["guided"], out, SMALL_GUIDED)
    module, theirs = load_module(out), files["guided_twin"]
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([0, 999]), torch.tensor([7, 999])
    assert difference(outputs(module.ema.module, x, t, y), outputs(theirs, x, t, y)) < 1e-4
    assert module.num_classes == 1000 and module.hparams.cond_drop_prob == 0

    samples = tmp_path / "samples"
    overrides = [f"ckpt={out}", "n=2", "steps=3", "labels=[1,999]", "npz=true", f"out={samples}"]
    sample(compose_config(overrides, name="sample"))
    images = np.load(samples / "samples.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert json.loads((samples / "sample.json").read_text())["sampler.variance"] == "learned"


# a guided-diffusion layout at a small width with what the other tests leave out: heads by
# number and fewer up the network, the legacy attention order, rescaled timesteps at T = 4000
SMALL_GUIDED_RESCALED = (
    "--image_size 16 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 "
    "--attention_resolutions 8 --num_heads 2 --num_heads_upsample 1 --class_cond True "
    "--learn_sigma True --resblock_updown True --diffusion_steps 4000 --noise_schedule cosine "
    "--rescale_timesteps True --dropout 0.1"
)


def test_openais_own_script_util_reads_the_flags_and_builds_the_same_model(tmp_path: Path):
    """guided-diffusion's own code (guided-diffusion-sdk, which make install adds): its argparse
    gives the values parse_flags gives, its create_model_and_diffusion a UNetModel whose state
    dict converts to a network equal to its timestep-wrapped model, and its betas ours."""
    su = pytest.importorskip("guided_diffusion.script_util")
    for flags in (GUIDED_256, SMALL_GUIDED, SMALL_GUIDED_RESCALED):
        parser = argparse.ArgumentParser()
        su.add_dict_to_argparser(parser, su.model_and_diffusion_defaults())
        assert parse_flags(flags, "guided") == vars(parser.parse_args(shlex.split(flags)))

    args = parse_flags(SMALL_GUIDED_RESCALED, "guided")
    model, diffusion = su.create_model_and_diffusion(**args)
    torch.save(random_weights(model).state_dict(), tmp_path / "model.pt")
    convert(tmp_path / "model.pt", tmp_path / "model.ckpt", SMALL_GUIDED_RESCALED)
    module = load_module(tmp_path / "model.ckpt")
    g = torch.Generator().manual_seed(0)
    x, t, y = (
        torch.randn(2, 3, 16, 16, generator=g),
        torch.tensor([0, 3999]),
        torch.tensor([3, 999]),
    )
    with torch.no_grad():  # _WrappedModel: t -> t · 1000/T before the UNetModel (rescale)
        want = diffusion._wrap_model(model)(x, t, y=y)
    assert difference(outputs(module.ema.module, x, t, y), want) < 1e-5
    np.testing.assert_allclose(module.schedule.betas64.numpy(), diffusion.betas, rtol=1e-10)
    assert (diffusion.model_var_type.name, diffusion.model_mean_type.name) == (
        "LEARNED_RANGE",
        "EPSILON",
    )
    assert module.hparams.learn_sigma and module.hparams.objective == "eps"


def test_eval_py_measures_the_nll_of_a_converted_file(tmp_path: Path):
    """eval.py nll=true: the bound with the learned variance over all T = 10 steps."""
    flags = (
        "--image_size 16 --num_channels 32 --channel_mult 1,2 --attention_resolutions 8 "
        "--learn_sigma True --diffusion_steps 10 --noise_schedule cosine"
    )
    adm = {"image_size": 16, "in_channels": 3, "model_channels": 32, "out_channels": 6,
           "num_res_blocks": 2, "attention_resolutions": [8], "channel_mult": [1, 2],
           "num_heads": 4, "use_scale_shift_norm": True}  # fmt: skip
    openai_file(tmp_path / "model.pt", adm)
    convert(tmp_path / "model.pt", tmp_path / "model.ckpt", flags)
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"{i}.png")
    result = tmp_path / "nll.json"
    overrides = [f"source={tmp_path / 'model.ckpt'}", "nll=true", "fid=false", "n=2"]
    overrides += ["batch_size=2", "dataset=folder", f"dataset.data_dir={data}"]
    overrides += ["dataset.image_size=16", "dataset.val_fraction=0.5", "dataset.batch_size=2"]
    overrides += [f"out={result}"]
    evaluation.evaluate(compose_config(overrides, name="eval"))
    figures = json.loads(result.read_text())
    assert 0 < figures["bpd_folder_val"] < 100 and figures["nll_variance"] == "learned"


# ---------------------------------------------------------------- refusals


def bad_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "notes.pt").write_text("not a state dict")
    torch.save({"state_dict": {}, "epoch": 3}, root / "lightning.pt")
    (root / "pickled.pt").write_bytes(pickle.dumps({"w": Path("x")}, protocol=2))
    return {p.stem: p for p in root.iterdir()}


BAD = {  # what is wrong -> (file, flags, extra options, words of the line)
    "a training flag": ("cifar10", SMALL_CIFAR10 + " --lr 1e-4", [], ["--lr 1e-4"]),
    "respacing": (
        "cifar10", SMALL_CIFAR10 + " --timestep_respacing 250", [],
        ["--timestep_respacing 250", "sampler=ddpm steps=250"],
    ),
    "a sampling flag": ("cifar10", SMALL_CIFAR10 + " --use_ddim True", [], ["sampler=ddim"]),
    "which codebase": ("cifar10", IMAGENET64, [], ["--rescale_timesteps", "--codebase"]),
    "not a bool": ("cifar10", SMALL_CIFAR10 + " --learn_sigma maybe", [], ["--learn_sigma"]),
    "no flags": ("cifar10", None, [], ["--flags"]),
    "fixed σ for a learned one": (
        "cifar10", SMALL_CIFAR10.replace("True", "False"), [],
        ["out.2.weight", "(6, 32, 3, 3)", "(3, 32, 3, 3)", "--learn_sigma"],
    ),
    "unconditional flags": (
        "guided", SMALL_GUIDED.replace("--class_cond True", "--class_cond False"), [],
        ["label_emb.weight (1000, 128)", "--class_cond"],
    ),
    "another width": (
        "cifar10", SMALL_CIFAR10.replace("32 --num_res", "64 --num_res"), [],
        ["time_embed.0.weight", "(128, 32)", "(256, 64)"],
    ),
    "heads": ("cifar10", SMALL_CIFAR10 + " --num_heads 3", [], ["--num_heads=3 does not divide"]),
    "a diffusers option": (
        "cifar10", SMALL_CIFAR10, ["--schedule", "linear"], ["--schedule", "diffusers folder"],
    ),
    "not torch's": ("notes", SMALL_CIFAR10, [], ["notes.pt", "torch.load"]),
    "a checkpoint": ("lightning", SMALL_CIFAR10, [], ["'state_dict'", "plain state dict"]),
    "a pickle": ("pickled", SMALL_CIFAR10, [], ["objects other than tensors"]),
}  # fmt: skip


def refused(capsys, argv: list[str], words: list[str], root: Path) -> None:
    """`python -m ddpm.convert ARGV` fails with one line holding `words`, writing nothing."""
    before = sorted(root.rglob("*"))
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and not out, err
    assert all(word in err for word in words), (err, words)
    assert sorted(root.rglob("*")) == before, "something was written"


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_import_is_one_line_and_writes_nothing(files, tmp_path: Path, capsys, case: str):
    name, flags, extra, words = BAD[case]
    src = files.get(name) or bad_files(tmp_path / "bad")[name]
    argv = ["import", str(src), str(tmp_path / "out.ckpt"), *extra]
    refused(capsys, argv + (["--flags", flags] if flags is not None else []), words, tmp_path)
