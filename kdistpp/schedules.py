"""Noise schedules in VE-sigma form (decreasing, ending at 0), as k-diffusion builds them."""

from __future__ import annotations

import math

import torch


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Appends the final sigma = 0 that k-diffusion schedules end with."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """Karras et al. (2022), eq. 5: n sigmas evenly spaced in sigma**(1/rho), then 0."""
    _check_range(n, sigma_min, sigma_max)
    return append_zero(karras_ramp(n, sigma_min, sigma_max, rho).float()).to(device)


def karras_ramp(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The n sigmas of Karras et al. (2022), eq. 5, from sigma_max down to sigma_min, in float64 and
    without the final zero (SFD trains and samples down to sigma_min)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> torch.Tensor:
    """n sigmas evenly spaced in log sigma, then 0."""
    _check_range(n, sigma_min, sigma_max)
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return append_zero(sigmas.float()).to(device)


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
