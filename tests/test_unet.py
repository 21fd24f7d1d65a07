import pytest
import torch

from ddpm.unet import AttnBlock, UNet, check_config


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_output_has_input_shape(channels, size):
    # attention at a level of each: 28 -> 14 -> 7 px; 32 -> 16 -> 8 -> 4; 64 -> ... -> 8
    ch_mult, attn = ((1, 2, 2), (7,)) if size == 28 else ((1, 2, 2, 2), (8,))
    net = UNet(
        size, channels, ch=16, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=attn, dropout=0.1
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
