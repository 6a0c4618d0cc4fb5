"""Which steps of a schedule are guided, and how strongly: the first N, a set of indices, a sigma
window, or a per-step list of weights.

Where the refinement lands in sigma, not its index, decides what it can fix (coarse layout and
mode weights at high sigma, detail at low sigma), so a window in sigma transfers across step
counts and schedules where an index does not.

Every value a caller passes either acts or is refused: a w > 0 that guides no step warns
(GuidanceWarning), a w list longer than the schedule or positive on a step outside an explicit
`guidance_steps` is an error.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from . import validation


WINDOW_RTOL = 1e-6  # float32's relative rounding is 6e-8; schedule sigmas differ by far more


class GuidanceWarning(UserWarning):
    """A Distillation++ setting asked for guidance that no step of the run receives."""


@dataclass(frozen=True)
class SigmaWindow:
    """Guide every step whose starting sigma_i lies in [lo, hi] (inclusive)."""

    lo: float
    hi: float

    def __post_init__(self):
        for name in ("lo", "hi"):
            value = getattr(self, name)
            if not validation.is_real(value) or not math.isfinite(float(value)) or float(value) < 0:
                raise ValueError(f"SigmaWindow.{name} must be a finite sigma >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))  # numpy / 0-d tensor bounds become floats
        if self.lo > self.hi:
            raise ValueError(f"SigmaWindow needs lo <= hi, got lo={self.lo}, hi={self.hi}; swap them")

    def steps(self, sigmas: list[float]) -> list[int]:
        # Inclusive to float32 rounding: a bound typed as 14.6 holds the float32 sigma 14.6000004.
        lo, hi = self.lo * (1 - WINDOW_RTOL), self.hi * (1 + WINDOW_RTOL)
        return [i for i, s in enumerate(sigmas[:-1]) if lo <= s <= hi]


_STEPS_TYPES = "an int N (the first N steps), a collection of step indices or a SigmaWindow"


def guided_step_indices(guidance_steps, sigmas: list[float]) -> list[int]:
    """`guidance_steps` as sorted step indices: int N = the first N steps, a collection of indices,
    or a SigmaWindow (every step whose sigma_i lies in it)."""
    n_steps = len(sigmas) - 1
    if isinstance(guidance_steps, SigmaWindow):
        return guidance_steps.steps(sigmas)
    if validation.is_bool(guidance_steps):
        raise TypeError(f"guidance_steps must be {_STEPS_TYPES}, got a bool")
    if validation.is_integer(guidance_steps):
        n = int(guidance_steps)
        if not 0 <= n <= n_steps:
            raise ValueError(f"guidance_steps={n} is beyond the schedule's {n_steps} steps; use 0..{n_steps}")
        return list(range(n))
    if not isinstance(guidance_steps, Iterable) or isinstance(guidance_steps, (str, bytes)) \
            or getattr(guidance_steps, "ndim", None) == 0:  # a 0-d float tensor or array is not a step count
        raise TypeError(f"guidance_steps must be {_STEPS_TYPES}, got {guidance_steps!r}")
    steps = []
    for i in guidance_steps:
        if validation.is_bool(i) or not validation.is_integer(i):
            raise TypeError(f"guidance_steps must hold ints, got {i!r}")
        i = int(i)
        if not 0 <= i < n_steps:
            raise ValueError(f"guidance_steps holds step {i}, beyond the schedule's steps 0..{n_steps - 1}")
        steps.append(i)
    return sorted(set(steps))


def step_weights(w, guidance_steps, sigmas: list[float]) -> tuple[float, ...]:
    """The teacher weight of every step (0 = unguided, no teacher call).

    w: None or 0 (the baseline), a float for every guided step, or one value per step (a list,
    tuple, 1-D tensor or array; missing trailing values are 0). guidance_steps None means the
    first step for a float w, and the steps with a positive value for a w list.
    """
    n_steps = len(sigmas) - 1
    if w is None:
        per_step, scalar = [0.0] * n_steps, True
    elif validation.is_real(w):
        per_step, scalar = [float(w)] * n_steps, True
    elif validation.is_bool(w) or isinstance(w, (str, bytes)) or not isinstance(w, Iterable):
        raise TypeError(f"w must be a float or a sequence of floats (one per step), got {type(w).__name__}")
    else:
        values = list(w)
        if not all(validation.is_real(v) for v in values):
            raise TypeError(f"w must be a float or a sequence of floats (one per step), got {values!r}")
        if len(values) > n_steps:
            raise ValueError(f"w has {len(values)} values but the schedule has {n_steps} steps; "
                             "give at most one value per step")
        per_step, scalar = [float(v) for v in values] + [0.0] * (n_steps - len(values)), False
    for i, v in enumerate(per_step):
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"w must be finite and >= 0, got {v} for step {i}")

    if guidance_steps is None:
        guided = [0] if scalar and n_steps else [i for i, v in enumerate(per_step) if v > 0]
    else:
        guided = guided_step_indices(guidance_steps, sigmas)
        if not scalar:
            outside = [i for i, v in enumerate(per_step) if v > 0 and i not in guided]
            if outside:
                i = outside[0]
                raise ValueError(f"w[{i}]={per_step[i]} but step {i} is not among guidance_steps={guidance_steps!r}; "
                                 f"a w list implies its steps: drop guidance_steps, or set w[{i}] to 0")
            if guided and len(values) <= guided[-1]:
                raise ValueError(f"w has {len(values)} values but step {guided[-1]} is guided; "
                                 f"give one value per step (at least {guided[-1] + 1})")
    chosen = set(guided)
    weights = tuple(per_step[i] if i in chosen else 0.0 for i in range(n_steps))
    listed_idle = [i for i in guided if not scalar and per_step[i] == 0] if guidance_steps is not None else []
    if listed_idle:
        warnings.warn(f"guidance_steps={guidance_steps!r} lists step {listed_idle[0]}, but w[{listed_idle[0]}] is 0: "
                      "that step is not guided", GuidanceWarning, stacklevel=caller_stacklevel())
    if any(v > 0 for v in per_step) and not any(v > 0 for v in weights):
        warnings.warn(f"w={w!r} guides no step: guidance_steps={guidance_steps!r} selects none of this schedule's "
                      f"{n_steps} steps (sigmas {[round(s, 4) for s in sigmas]}); the run is the unguided baseline",
                      GuidanceWarning, stacklevel=caller_stacklevel())
    return weights


def caller_stacklevel() -> int:
    """The warnings stacklevel of the first frame outside kdistpp and torch's no_grad wrapper, so a
    warning points at the user's call whichever public function led here."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(package)
                                 or frame.f_code.co_filename.endswith(os.path.join("utils", "_contextlib.py"))):
        frame, level = frame.f_back, level + 1
    return level
