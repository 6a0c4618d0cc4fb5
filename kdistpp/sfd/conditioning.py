"""SFD-v's step conditioning: an embedding of the number of timestamps N for your own network."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer positional embedding of `values` (shape (B,)) into (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    angles = values.float()[:, None] * freqs[None]
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    return nn.functional.pad(emb, (0, dim % 2))


class StepEmbedding(nn.Module):
    """Embeds the number of student timestamps N (SFD-v, Sec. 4.3): sinusoid, then a 2-layer SiLU MLP.

    Add its output wherever your network already adds its time embedding (or use it as a FiLM
    scale/shift). The last layer starts at zero, so a student initialised from the teacher starts
    out exactly equal to the teacher and the conditioning is learned from there.
    """

    def __init__(self, dim: int, hidden: int | None = None, frequency_dim: int = 64):
        super().__init__()
        self.frequency_dim = frequency_dim
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, num_steps, batch: int | None = None, device=None) -> torch.Tensor:
        """num_steps: an int or a (B,) tensor of timestamp counts; returns (B, dim)."""
        if not torch.is_tensor(num_steps):
            if batch is None:
                raise TypeError("num_steps is an int: pass batch= (and device=) to broadcast it")
            num_steps = torch.full((batch,), int(num_steps), device=device)
        return self.mlp(sinusoidal_embedding(num_steps.reshape(-1), self.frequency_dim))
