"""Which steps of a schedule are guided: the first N, a set of indices, or a sigma window.

Where the refinement lands in sigma, not its index, decides what it can fix (coarse layout and
mode weights at high sigma, detail at low sigma), so a window in sigma transfers across step
counts and schedules where an index does not.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SigmaWindow:
    """Guide every step whose starting sigma_i lies in [lo, hi] (inclusive)."""

    lo: float
    hi: float

    def __post_init__(self):
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"SigmaWindow.{name} must be a finite sigma >= 0, got {value!r}")
        if self.lo > self.hi:
            raise ValueError(f"SigmaWindow needs lo <= hi, got lo={self.lo}, hi={self.hi}; swap them")

    def steps(self, sigmas: list[float]) -> list[int]:
        return [i for i, s in enumerate(sigmas[:-1]) if self.lo <= s <= self.hi]


def guided_step_indices(guidance_steps, sigmas: list[float]) -> list[int]:
    """`guidance_steps` as sorted step indices: int N = the first N steps, a collection of indices,
    or a SigmaWindow (every step whose sigma_i lies in it)."""
    n_steps = len(sigmas) - 1
    if isinstance(guidance_steps, SigmaWindow):
        return guidance_steps.steps(sigmas)
    if isinstance(guidance_steps, bool):
        raise TypeError("guidance_steps must be an int, a collection of step indices or a SigmaWindow, got a bool")
    if isinstance(guidance_steps, int):
        if not 0 <= guidance_steps <= n_steps:
            raise ValueError(
                f"guidance_steps={guidance_steps} is beyond the schedule's {n_steps} steps; use 0..{n_steps}"
            )
        return list(range(guidance_steps))
    if not isinstance(guidance_steps, Iterable) or isinstance(guidance_steps, (str, bytes)):
        raise TypeError("guidance_steps must be an int, a collection of step indices or a SigmaWindow, "
                        f"got {guidance_steps!r}")
    steps = []
    for i in guidance_steps:
        if isinstance(i, bool) or not isinstance(i, int) and not (isinstance(i, torch.Tensor) and i.ndim == 0):
            raise TypeError(f"guidance_steps must hold ints, got {i!r}")
        i = int(i)
        if not 0 <= i < n_steps:
            raise ValueError(f"guidance_steps holds step {i}, beyond the schedule's steps 0..{n_steps - 1}")
        steps.append(i)
    return sorted(set(steps))
