"""Rectified-flow models in VE-sigma terms, and the schedules flow users run.

A flow model's state x_s = (1 - s) x0 + s n is the VE state y = x0 + sigma n of the same model in
y = x / (1 - s), sigma = s / (1 - s) (back: s = sigma / (1 + sigma), x = y / (1 + sigma)); the
denoised estimate and the noise estimate are the same numbers in both. s = 1 is sigma = infinity,
where y is undefined: the maps send it there exactly (no 1 - s rounding), and kdistpp's samplers
with parametrization='flow' run in flow coordinates, so a schedule starting at s = 1 needs no
conversion at all. These maps are for research code that wants the VE view (a VE-only sampler,
a comparison with a VE teacher's sigma).
"""

from __future__ import annotations

import math

import torch

from . import validation


def ve_sigma(s):
    """sigma = s / (1 - s); exactly infinity at s = 1. Accepts floats and tensors."""
    if isinstance(s, torch.Tensor):
        return torch.where(s >= 1, torch.full_like(s, math.inf), s / (1 - s).clamp_min(torch.finfo(s.dtype).tiny))
    return math.inf if s >= 1 else s / (1 - s)


def flow_sigma(sigma):
    """s = sigma / (1 + sigma); exactly 1 at sigma = infinity. Accepts floats and tensors."""
    if isinstance(sigma, torch.Tensor):
        return torch.where(torch.isinf(sigma), torch.ones_like(sigma), sigma / (1 + sigma))
    return 1.0 if math.isinf(sigma) else sigma / (1 + sigma)


def to_ve(x: torch.Tensor, s: float) -> torch.Tensor:
    """The VE state y = x / (1 - s) of a flow state at s < 1."""
    if s >= 1:
        raise ValueError("the VE state at s = 1 (sigma = infinity) is undefined; sample in flow coordinates "
                         "(parametrization='flow') or start the VE run below s = 1")
    return x / (1 - s)


def to_flow(y: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow state x = y / (1 + sigma) of a VE state at a finite sigma."""
    return y / (1 + sigma)


def call_as_ve(flow_model, y: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
    """A flow denoiser evaluated as a VE one at a finite sigma: D(y / (1 + sigma), sigma / (1 + sigma))."""
    scale = (1 + sigma.to(y.dtype)).reshape(-1, *([1] * (y.ndim - 1)))
    return flow_model(y / scale, flow_sigma(sigma), **extra_args)


class VEDenoiser:
    """A flow denoiser D(x, s) seen as a VE denoiser: D_ve(y, sigma) = D(y / (1 + sigma), sigma / (1 + sigma))."""

    parametrization = "ve"  # what the samplers see: a VE denoiser, whatever the wrapped model is

    def __init__(self, flow_model):
        validation.check_callable("flow_model", flow_model)
        self.flow_model = flow_model

    def __call__(self, y, sigma, **extra_args):
        if bool(torch.isinf(sigma).any()):
            raise ValueError("a VE denoiser cannot be called at sigma = infinity (s = 1): sample in flow "
                             "coordinates with parametrization='flow'")
        return call_as_ve(self.flow_model, y, sigma, **extra_args)


def time_snr_shift(shift: float, t):
    """s = shift t / (1 + (shift - 1) t): SD3 (shift 3), Wan (5-8), Qwen-Image and most Lightning LoRAs.
    Equal to ComfyUI's `time_snr_shift` and diffusers' static shift."""
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def flux_mu(image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, base_seq_len: int = 256,
            max_seq_len: int = 4096) -> float:
    """Flux's resolution-dependent shift parameter: mu linear in the image's token count
    ((H/16) * (W/16) for a Flux latent of H x W pixels), 0.5 at 256 tokens and 1.15 at 4096."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_time_shift(mu: float, t):
    """s = e^mu / (e^mu + (1 / t - 1)) (Flux; ComfyUI's ModelSamplingFlux, diffusers' dynamic shift)."""
    if isinstance(t, torch.Tensor):
        return torch.where(t > 0, math.exp(mu) / (math.exp(mu) + (1 / t.clamp_min(1e-30) - 1)), torch.zeros_like(t))
    return 0.0 if t == 0 else math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def get_sigmas_flow(n: int, shift: float = 1.0, mu: float | None = None, device="cpu") -> torch.Tensor:
    """n flow sigmas from s = 1 down, then 0: t evenly spaced in (0, 1], shifted by `shift`
    (time_snr_shift) or, with `mu`, by Flux's shift. Hosts' own sigmas can be passed to the
    samplers as they are; this is for code that builds its own schedule."""
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    t = torch.linspace(1, 0, int(n) + 1, dtype=torch.float64)[:-1]
    s = flux_time_shift(mu, t) if mu is not None else time_snr_shift(shift, t)
    return torch.cat([s, s.new_zeros(1)]).float().to(device)
