"""ddpm.adm.ADM (issue 26 part 1): the same function as an independent implementation,
diffusers' UNet2DModel (scale-shift resnets, resnet up/down blocks, head widths, labels), on
random weights mapped by rule (tests/adm_reference.py); the same as OpenAI's own UNetModel
where guided-diffusion-sdk is installed (its state dict loaded strictly); OpenAI's state-dict
layout; the features diffusers cannot express checked on their own; and model=adm through
train.py and sample.py."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from adm_reference import adm_weights, diffusers_twin
from conftest import FAST, compose_config, train_config
from PIL import Image

from ddpm.adm import ADM, AttentionBlock, ResBlock
from ddpm.checkpoint import CheckpointError
from ddpm.cli import train as training
from ddpm.cli.sample import sample
from ddpm.generate import generate_all
from ddpm.module import load_module

# improved-diffusion's CIFAR-10 network (Nichol & Dhariwal 2021): --num_channels 128
# --num_res_blocks 3 --learn_sigma True, attention at 16 and 8 px with 4 heads, dropout 0.3,
# scale-shift norm; T = 4000 with rescale_timesteps: t scaled by 1000 / 4000
CIFAR10 = {
    "image_size": 32,
    "in_channels": 3,
    "model_channels": 128,
    "out_channels": 6,
    "num_res_blocks": 3,
    "attention_resolutions": [16, 8],
    "dropout": 0.3,
    "channel_mult": [1, 2, 2, 2],
    "num_heads": 4,
    "use_scale_shift_norm": True,
    "timestep_scale": 1000 / 4000,
}
# guided-diffusion's ImageNet 64 flags (head channels, BigGAN up/down, the new attention order,
# class labels with the null row) at a quarter of the width and 32 px
GUIDED = {
    **CIFAR10,
    "model_channels": 32,
    "channel_mult": [1, 2, 3, 4],
    "num_res_blocks": 2,
    "dropout": 0.1,
    "num_head_channels": 32,
    "resblock_updown": True,
    "use_new_attention_order": True,
    "num_classes": 10,
    "timestep_scale": 1.0,
}


def max_difference(config: dict, n: int, seed: int = 0) -> tuple[float, ADM]:
    """max |ADM - UNet2DModel| on n random images, timesteps (and labels), in eval mode."""
    torch.manual_seed(seed)
    twin = diffusers_twin(config).eval()
    net = ADM(**config).eval()
    net.load_state_dict(adm_weights(twin, net, config), strict=True)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(
        n, config["in_channels"], config["image_size"], config["image_size"], generator=g
    )
    t = torch.randint(0, 4000, (n,), generator=g)
    y = None
    if config.get("num_classes"):  # the null row too, when there is one
        rows = config["num_classes"] + config.get("null_label", True)
        y = torch.arange(n) % rows
    with torch.no_grad():
        ours = net(x, t, y)
        theirs = twin(x, t * config.get("timestep_scale", 1.0), class_labels=y).sample
    assert ours.shape == (n, config["out_channels"], config["image_size"], config["image_size"])
    assert theirs.abs().max() > 0.1  # the comparison is of a working network, not of zeros
    return (ours - theirs).abs().max().item(), net


@pytest.mark.slow
def test_improved_diffusion_cifar10_equals_diffusers_and_has_52_5m_parameters():
    diff, net = max_difference(CIFAR10, n=2)
    params = sum(p.numel() for p in net.parameters())
    assert params == sum(p.numel() for p in diffusers_twin(CIFAR10).parameters())
    assert round(params / 1e6, 1) == 52.5  # the paper's CIFAR-10 model (cifar10_uncond_50M)
    assert diff < 1e-4, diff


def test_cifar10_layout_at_a_quarter_of_the_width_equals_diffusers():
    diff, _ = max_difference({**CIFAR10, "model_channels": 32, "num_heads": 1}, n=1)
    assert diff < 1e-4, diff


@pytest.mark.parametrize("new_order", [True, False], ids=["new_order", "legacy_order"])
def test_guided_diffusion_layout_equals_diffusers(new_order: bool):
    """Head channels, BigGAN up/down, labels with the null row; the qkv rows read in each
    order (the mapping lays diffusers' q, k, v out as OpenAI's code reads them)."""
    diff, _ = max_difference({**GUIDED, "use_new_attention_order": new_order}, n=2)
    assert diff < 1e-4, diff


def test_openai_layout_without_null_row_and_plain_embedding_equals_diffusers():
    """null_label=False (an OpenAI checkpoint's K rows), the DDPM-style added embedding, conv
    resampling (16 px, 3 levels)."""
    config = {
        **GUIDED,
        "image_size": 16,
        "channel_mult": [1, 2, 2],
        "attention_resolutions": [8],
        "null_label": False,
        "use_scale_shift_norm": False,
        "resblock_updown": False,
    }
    diff, net = max_difference(config, n=2)
    assert diff < 1e-4, diff
    assert net.label_emb.weight.shape == (10, 4 * 32)
    with pytest.raises(ValueError, match="no null label"):
        net(torch.zeros(1, 3, 16, 16), torch.zeros(1, dtype=torch.long))


def test_state_dict_has_openai_keys_and_shapes():
    """The names and shapes of OpenAI's UNetModel (tiny: 2 levels, 1 block), spelled out."""
    net = ADM(16, 3, 32, 6, 1, [8], channel_mult=[1, 2], num_classes=4, resblock_updown=True)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes["time_embed.0.weight"] == (128, 32) and shapes["label_emb.weight"] == (5, 128)
    assert shapes["input_blocks.0.0.weight"] == (32, 3, 3, 3)
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (32, 128)
    assert shapes["input_blocks.2.0.in_layers.2.weight"] == (32, 32, 3, 3)  # the down ResBlock
    assert shapes["input_blocks.3.0.skip_connection.weight"] == (64, 32, 1, 1)
    assert shapes["input_blocks.3.1.qkv.weight"] == (192, 64, 1)  # Conv1d, as OpenAI's
    assert shapes["middle_block.1.proj_out.weight"] == (64, 64, 1)
    assert shapes["output_blocks.0.0.in_layers.0.weight"] == (128,)
    assert shapes["output_blocks.1.2.out_layers.3.weight"] == (64, 64, 3, 3)  # the up ResBlock
    assert shapes["out.2.weight"] == (6, 32, 3, 3)
    assert len(net.output_blocks) == 4 and len(net.input_blocks) == 4
    plain = ADM(16, 3, 32, None, 1, [8], channel_mult=[1, 2])
    keys = set(plain.state_dict())
    assert "input_blocks.2.0.op.weight" in keys and "output_blocks.1.2.conv.weight" in keys
    assert "label_emb.weight" not in keys
    # guided-diffusion's 512 px model starts at half the width: int(0.5 · c) channels
    half = ADM(16, 3, 64, None, 1, [8], channel_mult=[0.5, 1]).state_dict()
    assert half["time_embed.0.weight"].shape == (256, 64)
    assert half["input_blocks.0.0.weight"].shape == (32, 3, 3, 3)
    assert half["output_blocks.3.0.in_layers.0.weight"].shape == (64,)  # 32 + the first skip
    assert half["out.2.weight"].shape == (3, 32, 3, 3)
    # emb_layers double for AdaGN's scale and shift
    assert ADM(16, 3, 32, None, 1, [], channel_mult=[1], use_scale_shift_norm=True).state_dict()[
        "input_blocks.1.0.emb_layers.1.weight"
    ].shape == (64, 128)


def openai_difference(config: dict, n: int) -> float:
    """max |ADM - OpenAI's own UNetModel| (guided-diffusion's unet.py, as the PyPI package
    guided-diffusion-sdk 1.0.0 ships it) with its random weights loaded strictly: no mapping,
    the same state dict. torch's init everywhere (OpenAI zero-inits residual branches)."""
    unet = pytest.importorskip(
        "guided_diffusion.unet", reason="pip install --no-deps guided-diffusion-sdk==1.0.0"
    )
    size, scale = config["image_size"], config.get("timestep_scale", 1.0)
    theirs = {k: v for k, v in config.items() if k not in ("timestep_scale", "null_label")}
    theirs["attention_resolutions"] = [size // r for r in config["attention_resolutions"]]
    torch.manual_seed(0)
    ref = unet.UNetModel(**theirs).eval()
    for m in ref.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    net = ADM(**{**config, "null_label": False}).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(n, config["in_channels"], size, size)
    t = torch.randint(0, 4000, (n,))
    y = torch.arange(n) % config["num_classes"] if config.get("num_classes") else None
    with torch.no_grad():
        ours, theirs = net(x, t, y), ref(x, t.float() * scale, y)
        moved = ref(x, (t.float() + 1) * scale, y)  # a working network: t + 1 moves it
    assert (moved - theirs).abs().max() > 1e-3
    return (ours - theirs).abs().max().item()


@pytest.mark.slow
def test_improved_diffusion_cifar10_equals_openai_code():
    assert openai_difference(CIFAR10, n=2) < 1e-5


def test_guided_diffusion_layout_equals_openai_code():
    """OpenAI's code as the reference for what diffusers has no equivalent of: their K label
    rows, num_heads_upsample, a channel_mult starting at 0.5 (the 512 px model's), with BigGAN
    up/down, AdaGN and the new QKV order (the legacy one: the CIFAR-10 test above)."""
    config = {**GUIDED, "num_head_channels": -1}
    config |= {"num_heads": 2, "num_heads_upsample": 1, "channel_mult": [0.5, 1, 2, 2]}
    assert openai_difference({**config, "model_channels": 64}, n=2) < 1e-5


def _attention(x: torch.Tensor, block: AttentionBlock) -> torch.Tensor:
    """OpenAI's attention written out in float64: (q/d^¼)·(k/d^¼) softmax, per head."""
    B, C, H, W = x.shape
    x, heads = x.double().reshape(B, C, H * W), block.num_heads
    h = F.group_norm(x, 32, block.norm.weight.double(), block.norm.bias.double(), 1e-5)
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[..., 0].double(), h)
    qkv = qkv + block.qkv.bias.double()[:, None]
    if block.new_order:
        q, k, v = (z.reshape(B * heads, -1, H * W) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(B * heads, -1, H * W).chunk(3, dim=1)
    scale = q.shape[1] ** -0.25
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(B, C, H * W)
    out = torch.einsum("oc,bct->bot", block.proj_out.weight[..., 0].double(), a)
    return (x + out + block.proj_out.bias.double()[:, None]).reshape(B, C, H, W)


def test_num_heads_upsample_and_each_order_against_written_out_attention():
    """num_heads_upsample (no UNet2DModel has other heads on the way up): the up path's
    attention has that many heads, and every block equals OpenAI's attention in float64."""
    torch.manual_seed(0)
    net = ADM(16, 3, 64, None, 1, [8], channel_mult=[1, 2], num_heads=4, num_heads_upsample=2)
    down = [m for m in net.input_blocks.modules() if isinstance(m, AttentionBlock)]
    up = [m for m in net.output_blocks.modules() if isinstance(m, AttentionBlock)]
    assert [b.num_heads for b in down] == [4] and [b.num_heads for b in up] == [2, 2]
    assert net.middle_block[1].num_heads == 4
    x = torch.randn(2, 128, 8, 8)
    for block in (down[0], up[0]):
        for new_order in (False, True):
            block.new_order = new_order
            torch.nn.init.normal_(block.proj_out.weight)  # zero at init: make it count
            with torch.no_grad():
                diff = (block(x).double() - _attention(x, block)).abs().max().item()
            assert diff < 1e-4, (block.num_heads, new_order, diff)


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients():
    config = {
        **GUIDED,
        "image_size": 16,
        "channel_mult": [1, 2],
        "attention_resolutions": [8],
        "dropout": 0.0,
    }
    torch.manual_seed(0)
    plain = ADM(**config).train()
    for p in plain.parameters():  # no zero-initialised branches: every gradient counts
        torch.nn.init.normal_(p, std=0.05)
    ckpt = ADM(**{**config, "use_checkpoint": True}).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for net in (plain, ckpt):
        block = next(m for m in net.modules() if isinstance(m, ResBlock))
        block.in_layers.register_forward_hook(lambda *_: calls.append(1))
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([5, 700]), torch.tensor([1, 10])
    grads = []
    for net in (plain, ckpt):
        calls.clear()
        net(x, t, y).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
        assert len(calls) == (2 if net is ckpt else 1)  # recomputed in the backward pass
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    calls.clear()
    with torch.no_grad():  # sampling: no checkpointing
        ckpt(x, t, y)
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"image_size": 28}, "model.image_size"),
        ({"model_channels": 48}, "model.model_channels"),
        ({"attention_resolutions": [12]}, "model.attention_resolutions"),
        ({"num_head_channels": 48}, "model.num_head_channels"),
        ({"num_head_channels": -1, "num_heads": 3}, "model.num_heads"),
        ({"num_head_channels": -1, "num_heads_upsample": 5}, "model.num_heads_upsample"),
        ({"timestep_scale": 0}, "model.timestep_scale"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"num_classes": 0}, "model.num_classes"),
    ],
)
def test_bad_values_are_named(change: dict, key: str):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as error:
        ADM(**{**GUIDED, **change})
    assert "\n" not in str(error.value)


# model=adm shrunk to a 2-level, 32-channel network on the 28 px digits (levels 28, 14)
TINY_ADM = [
    "model=adm",
    "model.model_channels=32",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[14]",
    "model.dropout=0.1",
    "model.use_checkpoint=true",
    "module.learn_sigma=true",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.sample_grid.n=2",
    "callbacks.sample_grid.steps=2",
    "callbacks.sample_grid.final_steps=2",
]


def test_model_adm_module_trains_a_step_and_samples_guided():
    """model=adm as train.py composes it, built by the DiffusionModule (learned σ: 2C
    outputs; the quickstart's labels with the null row): an optimizer step through the
    checkpointed blocks, then guided DDPM with the learned variances."""
    cfg = compose_config(TINY_ADM)
    assert cfg.model._target_ == "ddpm.adm.ADM" and cfg.model.num_classes == 10
    torch.manual_seed(0)
    module = hydra.utils.instantiate(cfg.module)
    assert isinstance(module.net, ADM) and module.net.out_channels == 2
    optimizer = module.configure_optimizers()["optimizer"]
    x, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 3, 9, 1])
    before = {k: p.detach().clone() for k, p in module.net.named_parameters()}
    loss = module.loss_fn(x, y).mean()
    loss.backward()
    optimizer.step()
    assert math.isfinite(loss.item())
    # the output conv starts at zero (OpenAI's zero_module), so the first step moves it alone
    moved = {k for k, p in module.net.named_parameters() if not torch.equal(before[k], p)}
    assert moved == {"out.2.weight", "out.2.bias"}, sorted(moved)
    out = generate_all(
        module, 2, sampler={"sampler": "ddpm", "steps": 2}, labels=[1, 2], guidance=2.0
    )
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


@pytest.mark.slow
def test_train_py_model_adm_then_sample_py(tmp_path: Path):
    """train.py model=adm (class-conditional digits, learned σ, label dropout, checkpointing,
    the quickstart's bf16 autocast where the CPU has it), resumed; sample.py on its checkpoint
    with guidance (the null row) and the learned variances."""
    metrics = training.train(train_config(tmp_path / "run", [*FAST, *TINY_ADM]))
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/bpd"])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = load_module(ckpt)  # weights_only=True: ddpm.adm.ADM is a trusted network
    assert isinstance(module.net, ADM) and module.net.out_channels == 2
    # resumed without activation checkpointing (the same network); another width is refused
    run = [*FAST, *TINY_ADM, "model.use_checkpoint=false", "trainer.max_steps=4"]
    training.train(train_config(tmp_path / "run", run))
    assert torch.load(ckpt, weights_only=True)["global_step"] == 4
    wider = train_config(tmp_path / "run", [*run, "model.model_channels=64"])
    with pytest.raises(CheckpointError, match="model_channels 32 .this run's 64"):
        training.train(wider)
    out = tmp_path / "samples"
    args = [f"ckpt={ckpt}", "n=3", "steps=2", "guidance=2", f"out={out}"]
    sample(compose_config(args, name="sample"))
    assert len(list((out / "images").glob("*.png"))) == 3
    assert Image.open(out / "grid.png").size[0] > 28


def test_model_adm_on_28px_digits_is_refused_before_the_run(tmp_path: Path):
    """The CIFAR-10 network's 3 downsamplings do not fit the quickstart's 28 px: one line with
    the levels that would, before anything is written."""
    cfg = train_config(tmp_path / "run", [*FAST, "model=adm"])
    with pytest.raises(
        ValueError, match=r"model\.image_size=28 .* model\.channel_mult=\[1, 2, 2\]"
    ):
        training.train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
