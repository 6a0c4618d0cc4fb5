"""Argument checks shared by every sampler: run once, before any model call.

Each message names the argument, says what was passed and what is expected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch


def check_callable(name: str, value) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be a callable denoiser D(x, sigma, **extra_args), got {type(value).__name__}")


def check_latent(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}; pass x.float()")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")


def check_sigmas(sigmas) -> list[float]:
    """Validates a k-diffusion schedule and returns its values as Python floats."""
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a 1-D torch.Tensor, got {type(sigmas).__name__}")
    if sigmas.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(sigmas.shape)}")
    if sigmas.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 entries (one step), got {sigmas.numel()}")
    values = [float(s) for s in sigmas.detach().cpu().double()]
    if not all(math.isfinite(s) for s in values):
        raise ValueError(f"sigmas must be finite, got {values}")
    if any(s < 0 for s in values):
        raise ValueError(f"sigmas must be non-negative, got {values}")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be non-increasing (noisiest first), got {values}; flip it")
    if any(s == 0 for s in values[:-1]):
        raise ValueError(f"sigmas: only the last sigma may be 0, got {values}")
    return values


def check_options(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def step_weights(w, guided: Iterable[int], n_steps: int) -> list[float]:
    """Expands `w` (a float, or one value per step) to one float per step, 0 off the guided steps."""
    guided = sorted(set(guided))
    if isinstance(w, (int, float)) and not isinstance(w, bool):
        per_step = [float(w)] * n_steps
    elif isinstance(w, torch.Tensor) and w.ndim == 0:
        per_step = [float(w)] * n_steps
    elif isinstance(w, (Sequence, torch.Tensor)) and not isinstance(w, (str, bytes)):
        per_step = [float(v) for v in w]
        if guided and len(per_step) <= guided[-1]:
            raise ValueError(
                f"w has {len(per_step)} values but step {guided[-1]} is guided; "
                f"give one value per step (at least {guided[-1] + 1})"
            )
    else:
        raise TypeError(f"w must be a float or a sequence of floats (one per step), got {type(w).__name__}")
    for i in guided:
        if not math.isfinite(per_step[i]) or per_step[i] < 0:
            raise ValueError(f"w must be finite and >= 0, got {per_step[i]} for step {i}")
    chosen = set(guided)
    return [per_step[i] if i in chosen else 0.0 for i in range(n_steps)]


def check_renoise(renoise) -> None:
    if isinstance(renoise, str):
        check_options("renoise", renoise, ("next", "current", "random"))
    elif isinstance(renoise, (int, float)) and not isinstance(renoise, bool):
        if not (math.isfinite(renoise) and renoise > 0):
            raise ValueError(f"a fixed renoise level must be a finite sigma > 0, got {renoise}")
    else:
        raise TypeError(f"renoise must be 'next', 'current', 'random' or a sigma > 0, got {renoise!r}")


def check_extra_args(name: str, value) -> None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments or None, got {type(value).__name__}")


def check_optional_callable(name: str, value: Callable | None) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable (sigma, sigma_next) -> noise, or None; got {type(value).__name__}")
