"""ResNet-18 (He et al. 2016) for 3x224x224 images in [0, 1]: the production-scale model of bench_scale.py.

One nn.Module class in the file (what `selfheal archive` and TorchServe pick as the model class):
the basic blocks are ModuleDicts run by `forward`. 11.2M parameters with 10 classes.
"""
import torch
from torch import nn


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for i in range(2):
                s = stride if i == 0 else 1
                block = nn.ModuleDict({"conv1": nn.Conv2d(c_in, c_out, 3, s, 1, bias=False), "bn1": nn.BatchNorm2d(c_out),
                                       "conv2": nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), "bn2": nn.BatchNorm2d(c_out)})
                if s != 1 or c_in != c_out:
                    block["down"] = nn.Sequential(nn.Conv2d(c_in, c_out, 1, s, bias=False), nn.BatchNorm2d(c_out))
                blocks.append(block)
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, 224, 224) in [0, 1]
        out = self.stem(x)
        for b in self.blocks:
            y = torch.relu(b["bn1"](b["conv1"](out)))
            y = b["bn2"](b["conv2"](y))
            out = torch.relu(y + (b["down"](out) if "down" in b else out))
        return self.fc(self.pool(out).flatten(1))  # (B, C) logits
