"""A network class of the user's own (not this project's), for tests/test_untrusted.py: the
project's UNet under another name, so its checkpoints load into it."""

from ddpm.unet import UNet


class OwnUNet(UNet):
    """ddpm.unet.UNet as a class of one's own."""
