import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from ddpm.unet import AttnBlock, Downsample, UNet, check_config, timestep_embedding


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_output_has_input_shape(channels, size):
    # attention at a level of each: 28 -> 14 -> 7 px; 32 -> 16 -> 8 -> 4; 64 -> ... -> 8
    ch_mult, attn = ((1, 2, 2), (7,)) if size == 28 else ((1, 2, 2, 2), (8,))
    net = UNet(
        size,
        channels,
        ch=16,
        ch_mult=ch_mult,
        num_res_blocks=1,
        attn_resolutions=attn,
        dropout=0.1,
    )
    x = torch.randn(2, channels, size, size)
    out = net(x, torch.tensor([0, 999]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_cifar10_preset_has_35_7m_parameters():
    net = UNet(
        32, 3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
    )
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 35.7e6) < 0.1e6, n


def test_output_depends_on_timestep_and_label():
    torch.manual_seed(0)
    net = UNet(
        8,
        1,
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(4,),
        dropout=0,
        num_classes=3,
    )
    x = torch.randn(1, 1, 8, 8)
    a = net(x, torch.tensor([10]), torch.tensor([0]))
    assert not torch.allclose(a, net(x, torch.tensor([500]), torch.tensor([0])))
    assert not torch.allclose(a, net(x, torch.tensor([10]), torch.tensor([2])))
    # no label: the null class, index num_classes
    assert torch.allclose(net(x, torch.tensor([10])), net(x, torch.tensor([10]), torch.tensor([3])))


def test_size_not_divisible_is_refused():
    with pytest.raises(ValueError, match="image_size=30 is not divisible by 4"):
        UNet(30, 1, ch=8, ch_mult=(1, 2, 2))


def test_wrong_input_size_is_refused():
    net = UNet(16, 1, ch=8, ch_mult=(1, 2), attn_resolutions=())
    with pytest.raises(ValueError, match="16x16"):
        net(torch.randn(1, 1, 32, 32), torch.tensor([1]))


def test_attention_of_no_level_or_no_heads_is_refused():
    # [5] used to train a network without attention: refused when a run is configured, while
    # a checkpoint written with it (the network as if it were not there) still loads
    small = {"image_size": 16, "in_channels": 1, "ch": 8, "ch_mult": [1, 2]}
    with pytest.raises(ValueError, match=r"attn_resolutions=\[5\] names no level.* 16, 8 px"):
        check_config({**small, "attn_resolutions": [5]})
    stray = UNet(**small, num_res_blocks=1, attn_resolutions=(5,))
    assert sum(isinstance(m, AttnBlock) for m in stray.modules()) == 1  # the middle block's
    with pytest.raises(ValueError, match="model.num_heads must be an integer >= 1"):
        UNet(16, 1, ch=8, ch_mult=(1, 2), attn_resolutions=(8,), num_heads=0)
    net = UNet(16, 1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=2)
    assert sum(isinstance(m, AttnBlock) for m in net.modules()) == 4  # 1 down, 2 up, 1 middle


def test_attention_by_level_is_attention_by_size_and_fits_any_image_size():
    """attn_levels=[-1] (the quickstart's model) builds at 28 px the network attn_resolutions
    =[7] did, weights and outputs alike, and at 32 px attends at 8 px, where [7] attended at
    no level."""
    args = {"in_channels": 1, "ch": 8, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "dropout": 0.0}
    torch.manual_seed(0)
    by_size = UNet(28, **args, attn_resolutions=(7,))
    torch.manual_seed(0)
    by_level = UNet(28, **args, attn_resolutions=(), attn_levels=(-1,))
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([3, 700])
    assert by_size.state_dict().keys() == by_level.state_dict().keys()
    assert torch.equal(by_size(x, t), by_level(x, t))
    at_32 = UNet(32, **args, attn_resolutions=(), attn_levels=(-1,))
    assert sum(isinstance(m, AttnBlock) for m in at_32.modules()) == 4  # 1 down, 2 up, middle
    check_config({"image_size": 32, **args, "attn_resolutions": [], "attn_levels": [-1]})
    with pytest.raises(
        ValueError,
        match=r"model.attn_levels must be a list of level indices in "
        r"\[-3, 2\] \(0: 28 px, -1: the last level, 7 px\), got \[3\]",
    ):
        UNet(28, **args, attn_levels=[3])


def _tiny(**options) -> UNet:
    args = {"ch": 16, "ch_mult": (1, 2), "num_res_blocks": 1, "attn_resolutions": (8,)}
    return UNet(16, 3, **(args | options), dropout=0.0).eval()


def test_the_diffusers_options_at_their_defaults_are_the_network_as_it_was():
    """downsample_padding ... null_label at their defaults: the same weights, the same output
    (tests/test_fixture_checkpoint.py: a checkpoint from before draws the same pixels)."""
    torch.manual_seed(0)
    before = _tiny(num_classes=3)
    torch.manual_seed(0)
    options = {"downsample_padding": 1, "flip_sin_to_cos": False, "freq_shift": 1}
    options |= {"norm_eps": 1e-6, "norm_groups": None, "head_dim": None, "null_label": True}
    now = _tiny(num_classes=3, **options)
    assert list(before.state_dict()) == list(now.state_dict())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), torch.tensor([1, 3])
    assert torch.equal(before(x, t, y), now(x, t, y))


def test_downsample_padding_0_is_tensorflow_same():
    """padding=0 pads right and bottom only (TF "SAME", Ho et al.'s code): output pixel (0, 0)
    sees input rows and columns 0..2; padding=1's window starts at -1 and sees 0..1."""
    for padding, sees in ((0, 3), (1, 2)):
        down = Downsample(4, padding)
        x = torch.zeros(1, 4, 8, 8, requires_grad=True)
        out = down(x)
        assert out.shape[-2:] == (4, 4)
        out[0, :, 0, 0].sum().backward()
        reached = x.grad[0].abs().sum(0) > 0
        assert reached[:sees, :sees].all() and not reached[sees:, :].any(), padding


@pytest.mark.parametrize(("flip", "shift"), [(False, 1), (True, 0), (True, 1), (False, 0)])
def test_timestep_embedding_layouts_are_diffusers(flip, shift):
    t = torch.tensor([0, 1, 17, 500, 999])
    ours = timestep_embedding(t, 64, flip_sin_to_cos=flip, freq_shift=shift)
    theirs = get_timestep_embedding(t, 64, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(ours, theirs)


def test_groups_heads_and_labels_of_the_diffusers_options():
    net = _tiny(
        norm_groups=4, head_dim=8, num_classes=5, null_label=False, attn_resolutions=(16, 8)
    )
    assert {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm)} == {4}
    assert {m.num_heads for m in net.modules() if isinstance(m, AttnBlock)} == {2, 4}  # 16, 32
    assert net.class_embed.num_embeddings == 5  # no null row
    with pytest.raises(ValueError, match="no null label"):
        net(torch.randn(1, 3, 16, 16), torch.tensor([3]))
    with pytest.raises(
        ValueError, match=r"model.norm_groups=3 does not divide the widths \[16, 32\]"
    ):
        check_config({"image_size": 16, "ch": 16, "ch_mult": [1, 2], "norm_groups": 3})
    with pytest.raises(ValueError, match=r"model.head_dim=5 does not divide"):
        _tiny(head_dim=5)
    with pytest.raises(ValueError, match="model.downsample_padding must be 1"):
        _tiny(downsample_padding=2)
    with pytest.raises(ValueError, match="model.norm_eps must be a number in"):
        _tiny(norm_eps=0)
