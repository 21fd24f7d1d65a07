import pytest
import torch

from ddpm.unet import AttnBlock, UNet


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
    # [5] used to build a network without attention, num_heads=0 a ZeroDivisionError
    with pytest.raises(ValueError, match=r"attn_resolutions=\[5\] names no level.* 16, 8 px"):
        UNet(16, 1, ch=8, ch_mult=(1, 2), attn_resolutions=(5,))
    with pytest.raises(ValueError, match="model.num_heads must be an integer >= 1"):
        UNet(16, 1, ch=8, ch_mult=(1, 2), attn_resolutions=(8,), num_heads=0)
    net = UNet(16, 1, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=2)
    assert sum(isinstance(m, AttnBlock) for m in net.modules()) == 4  # 1 down, 2 up, 1 middle
