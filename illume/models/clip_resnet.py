"""CLIP's modified ResNet as MAGMA uses it: the attention pool removed, the last feature map as tokens.

Our own implementation of the architecture in Radford et al. (2021), Sec. 2.4: a 3-convolution stem with an
average pool instead of a max pool, anti-aliased strided blocks (an average pool before the strided
convolution) and, in CLIP, an attention pool on top, which MAGMA drops so that every cell of the final
feature map becomes one prefix token. Module names follow CLIP's so that official weights map one to one.

Widths are configurable: RN50x16 is `layers=(6, 8, 18, 8), width=96` at 384 px, giving 12 x 12 = 144 tokens of
96 * 32 = 3072 features; the demo uses a much smaller one.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Bottleneck(nn.Module):
    """ResNet bottleneck whose stride is an average pool after the 3x3 convolution (CLIP's anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # CLIP names these "-1", "0", "1"; kept for checkpoint compatibility.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class ModifiedResNet(nn.Module):
    """CLIP's image tower without the attention pool.

    Args:
        layers: Number of bottleneck blocks in each of the four stages.
        width: Channels of the stem; stage i has `width * 2**i` planes and 4x that many output channels.

    The output has `width * 32` channels on a grid 32x smaller than the input.
    """

    def __init__(self, layers: tuple[int, int, int, int] | list[int], width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.output_dim = width * 32

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        modules = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        modules += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Map images (N, 3, H, W) to a feature map (N, width * 32, H / 32, W / 32)."""
        # Channels-last activations: oneDNN's (CPU) and cuDNN's (GPU) convolutions are faster on NHWC; 1.4-2x
        # for the demo's tower on CPU, forward and backward. The weights keep their layout (safetensors).
        x = pixel_values.to(self.conv1.weight.dtype).contiguous(memory_format=torch.channels_last)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x)))).contiguous()
