"""U-Net shapes and size."""

import pytest
import torch

from prostate_seg.errors import ConfigError
from prostate_seg.models import UNet


@pytest.mark.parametrize("size", [(48, 48), (37, 53), (16, 17)])
def test_any_input_size_gives_logits_of_the_same_size(size):
    net = UNet(in_channels=3, out_channels=1, features=[4, 8, 16])
    out = net(torch.randn(2, 3, *size))
    assert out.shape == (2, 1, *size)


def test_study_unet_has_31_million_parameters():
    net = UNet()
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(31.0e6, rel=0.01)


def test_padding_does_not_leak_into_the_cropped_output():
    """The same image, padded by the caller or by the net, gives the same logits on its area."""
    torch.manual_seed(0)
    net = UNet(features=[4, 8]).eval()
    x = torch.randn(1, 1, 30, 30)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 2))
    assert torch.allclose(net(x), net(padded)[..., :30, :30], atol=1e-6)


def test_instance_norm_scores_a_scan_whatever_its_gain_as_it_was_trained():
    """Each slice is normalised by its own statistics: a brighter scan (gain 3) gives the same
    logits, and inference (eval mode) is what training saw; batch norm's frozen training
    statistics give neither."""
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    instance = UNet(features=[4, 8], norm="instance")
    assert torch.allclose(instance.train()(x), instance.eval()(x), atol=1e-6)
    change = (instance(3 * x) - instance(x)).abs().max()
    batch = UNet(features=[4, 8], norm="batch")
    batch.train()(x)  # running statistics of these slices
    assert change < 1e-3 < 10 * change < (batch.eval()(3 * x) - batch(x)).abs().max()
    with pytest.raises(ConfigError, match="model.net.norm=layer: choose one of batch, instance"):
        UNet(norm="layer")
