"""A user's regression model: remaining useful life (cycles) from sensor readings."""
import torch
from torch import nn


class RULRegressor(nn.Module):
    def __init__(self, n_sensors: int = 8, hidden: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_sensors, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 100.0  # (B, 1): cycles left
