"""CIFAR's ResNet-20, with BatchNorm or GroupNorm: the real-data benchmark's networks.

Self-contained (imports torch only) and apart from models.py, which torch-model-archiver ships
inside the demo's .mar as its one model class.
"""
import torch
from torch import nn


class _Block(nn.Module):
    """A ResNet basic block (two 3x3 convolutions, identity or 1x1 projection shortcut)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 (He et al. 2016: three stages of three basic blocks, 16/32/64 channels,
    0.27M parameters) for 3x32x32 inputs in [0, 1]. `norm`: "batch" (BatchNorm) or "group"
    (GroupNorm, 8 groups: a network whose statistics do not depend on the batch). `width`: the
    first stage's channels (16 is the paper's; the smoke tests run 8, a quarter of the compute)."""

    def __init__(self, num_classes: int = 10, norm: str = "batch", width: int = 16) -> None:
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"norm must be 'batch' or 'group', got {norm!r}")
        if width < 8 or width % 8:
            raise ValueError(f"width must be a positive multiple of 8 (GroupNorm's 8 groups), got {width}")
        make = nn.BatchNorm2d if norm == "batch" else (lambda c: nn.GroupNorm(8, c))
        self.conv = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = make(width)
        layers, c_in = [], width
        for c_out, stride in ((width, 1), (2 * width, 2), (4 * width, 2)):
            for i in range(3):
                layers.append(_Block(c_in, c_out, stride if i == 0 else 1, make))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 32, 32) in [0, 1]
        out = self.layers(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(out).flatten(1))  # (B, C) logits
