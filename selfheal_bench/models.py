"""The demo model: a small CNN with BatchNorm for 8x8 digits.

This file is self-contained (imports torch only) because torch-model-archiver
ships it inside the .mar as the model definition.
"""
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two conv blocks with BatchNorm, then a two-layer classifier head."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 2w, 4, 4)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * 16, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 1, 8, 8) in [0, 1]
        return self.head(self.features(x))  # (B, C) logits
