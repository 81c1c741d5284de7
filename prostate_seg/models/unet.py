"""2D U-Net (Ronneberger et al., 2015) with 'same' convolutions and batch or instance norm."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prostate_seg.errors import ConfigError
from prostate_seg.settings import shown


# batch: statistics of the training set, frozen at inference; instance: each slice's own, as
# nnU-Net does, so a scan from an unseen centre is normalised as the training slices were.
NORMS = {"batch": nn.BatchNorm2d,
         "instance": lambda channels: nn.InstanceNorm2d(channels, affine=True)}


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2; the conv bias is dropped because the norm removes it."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch"):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            NORMS[norm](out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            NORMS[norm](out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Encoder of ``len(features)`` levels, a bottleneck of ``2 * features[-1]`` channels, and a
    decoder with transposed-conv up-sampling and skip connections. Returns logits.

    Any input size works: the input is zero-padded to a multiple of ``2 ** len(features)`` and
    the output cropped back, so no skip connection ever needs resizing.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1,
                 features: Sequence[int] = (64, 128, 256, 512), norm: str = "batch"):
        super().__init__()
        features = [int(f) for f in features]
        if not features:
            raise ConfigError("model.net.features must list at least one level")
        if norm not in NORMS:
            raise ConfigError(f"model.net.norm={shown(norm)}: choose one of {', '.join(NORMS)}")
        self.down = nn.ModuleList()
        channels = in_channels
        for width in features:
            self.down.append(DoubleConv(channels, width, norm))
            channels = width
        self.bottleneck = DoubleConv(channels, 2 * channels, norm)
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        for width in reversed(features):
            self.up.append(nn.ConvTranspose2d(2 * width, width, kernel_size=2, stride=2))
            self.decode.append(DoubleConv(2 * width, width, norm))
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)
        self.multiple = 2 ** len(features)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.multiple, -width % self.multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for up, decode, skip in zip(self.up, self.decode, reversed(skips)):
            x = decode(torch.cat([skip, up(x)], dim=1))
        return self.head(x)[..., :height, :width]
