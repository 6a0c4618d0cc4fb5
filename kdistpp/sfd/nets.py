"""A small EDM-preconditioned MLP denoiser and its denoising-score-matching trainer.

The teacher of the SFD experiments and tests (vector data: toy mixtures, 8x8 digits); also a
template for wiring `StepEmbedding` into a network of your own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .conditioning import StepEmbedding, sinusoidal_embedding


class MLPDenoiser(nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, Eq. 7 and Table 1).

    With `step_conditioned=True` it takes `num_steps` (SFD-v) and adds its embedding to the time
    embedding; the embedding starts at zero, so such a copy of an unconditioned teacher begins
    identical to it (see `load_teacher`).

    With `n_classes > 0` it is class-conditional: `label` (B,) long, with -1 or None meaning "no
    class" (the null label that classifier-free guidance's unconditional branch uses, Ho & Salimans
    2022); its embedding is added to the time embedding.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, sigma_data: float = 0.5,
                 step_conditioned: bool = False, time_dim: int = 64, n_classes: int = 0):
        super().__init__()
        self.dim, self.sigma_data, self.time_dim, self.n_classes = dim, sigma_data, time_dim, n_classes
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.step_embedding = StepEmbedding(hidden) if step_conditioned else None
        self.class_embedding = nn.Embedding(n_classes + 1, hidden) if n_classes else None  # last row: no class
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, num_steps=None, label=None) -> torch.Tensor:
        sigma = sigma.reshape(-1, 1).to(x.dtype).expand(x.shape[0], 1)
        sd2 = self.sigma_data ** 2
        c_in, c_skip = 1 / (sigma ** 2 + sd2).sqrt(), sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        emb = self.time_mlp(sinusoidal_embedding(sigma[:, 0].log() * 250, self.time_dim))  # EDM's c_noise = ln(sigma)/4, scaled to the sinusoid's range
        if self.step_embedding is not None:
            if num_steps is None:
                raise TypeError("this denoiser is step-conditioned (SFD-v): pass num_steps (the number of timestamps)")
            emb = emb + self.step_embedding(num_steps, batch=x.shape[0], device=x.device)
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(self.class_index(label, x))
        elif label is not None:
            raise TypeError("this denoiser is unconditional: build it with n_classes > 0 to pass label")
        h = self.inp(c_in * x) + emb
        for block in self.blocks:
            h = h + block(h) + emb
        return c_skip * x + c_out * self.out(h)

    def class_index(self, label, x: torch.Tensor) -> torch.Tensor:
        """Rows of the class embedding: the label, or the null row for None / -1."""
        if label is None:
            return torch.full((x.shape[0],), self.n_classes, dtype=torch.long, device=x.device)
        label = torch.as_tensor(label, device=x.device).long().reshape(-1).expand(x.shape[0])
        if bool(((label < -1) | (label >= self.n_classes)).any()):
            raise ValueError(f"label must lie in 0..{self.n_classes - 1}, or be -1 for no class")
        return torch.where(label < 0, torch.full_like(label, self.n_classes), label)

    def load_teacher(self, teacher: "MLPDenoiser") -> "MLPDenoiser":
        """Initialise from an (unconditioned) teacher: every shared weight copied, the step embedding kept at zero."""
        missing, unexpected = self.load_state_dict(teacher.state_dict(), strict=False)
        if unexpected or any(not k.startswith("step_embedding.") for k in missing):
            raise ValueError(f"teacher does not match this network: missing {missing}, unexpected {unexpected}")
        return self


def train_dsm(model: nn.Module, data: torch.Tensor, iterations: int, batch_size: int = 256, lr: float = 2e-3,
              p_mean: float = -1.2, p_std: float = 1.2, seed: int = 0, progress: bool = True,
              labels: torch.Tensor | None = None, label_dropout: float = 0.0) -> list[float]:
    """Denoising score matching with EDM's log-normal sigmas and loss weight (Karras et al. 2022, Eq. 8).

    Cosine-decayed Adam; returns the loss per iteration; a tqdm bar shows progress (progress=False
    hides it). With `labels` (one per row of data) the
    model is trained class-conditionally, each label replaced by -1 (no class) with probability
    `label_dropout`, so one network gives both branches of classifier-free guidance.
    """
    if labels is not None and len(labels) != len(data):
        raise ValueError(f"labels must give one class per data row ({len(data)}), got {len(labels)}")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must lie in [0, 1), got {label_dropout}")
    from tqdm.auto import trange

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / iterations)))
    sd = model.sigma_data
    losses = []
    model.train()
    for _ in trange(iterations, disable=not progress, desc="DSM"):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x0 = data[idx]
        sigma = (torch.randn(batch_size, 1, generator=g) * p_std + p_mean).exp().to(data)
        noisy = x0 + sigma * torch.randn(x0.shape, generator=g).to(data)
        weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
        extra = {}
        if labels is not None:
            drop = torch.rand(batch_size, generator=g) < label_dropout
            extra["label"] = torch.where(drop, -1, labels.cpu()[idx].long()).to(data.device)
        loss = (weight * (model(noisy, sigma, **extra) - x0) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses
