"""SFD's time grids and the teacher's trajectory (SFD, Zhou et al. 2024, Sec. 3 and Alg. 2).

Student timestamps are the polynomial (rho) schedule; the teacher runs DPM-Solver++(3M) on the
nested grid with K sub-steps per student interval, so its grid holds every student timestamp and
its states there are the student's targets.
"""

from __future__ import annotations

import math

import torch

from ..validation import TeacherOutputError, check_denoiser_output
from ..schedules import karras_ramp


def polynomial_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """The `n` student timestamps t_0 = sigma_max > ... > t_{n-1} = sigma_min (SFD Sec. 4; EDM Eq. 5).

    Unlike a sampling schedule there is no appended zero: an SFD student is trained, and sampled,
    down to sigma_min.
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n (number of timestamps) must be an int >= 2 (NFE = n - 1), got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    sigmas = karras_ramp(n, sigma_min, sigma_max, rho)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # exact ends, whatever the rounding
    return sigmas.to(device)


def nested_grid(student_sigmas: torch.Tensor, substeps: int, rho: float = 7.0) -> torch.Tensor:
    """The teacher's grid: `substeps` polynomial sub-intervals inside each student interval.

    Point K*i is the student's timestamp i exactly (copied, not recomputed), so the teacher's state
    there is the target without interpolation.
    """
    if not isinstance(substeps, int) or substeps < 1:
        raise ValueError(f"substeps (K) must be an int >= 1, got {substeps!r}")
    n = len(student_sigmas)
    grid = polynomial_sigmas(substeps * (n - 1) + 1, float(student_sigmas[-1]), float(student_sigmas[0]), rho)
    grid = grid.to(student_sigmas)
    grid[::substeps] = student_sigmas
    return grid


@torch.no_grad()
def dpmpp_3m_trajectory(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None) -> list[torch.Tensor]:
    """Deterministic DPM-Solver++(3M) (Lu et al. 2022, multistep data prediction) from x at sigmas[0].

    Returns the state at every grid point (index 0 is x itself). The order ramps up over the first
    steps (no history yet) and back down over the last two, which keeps short grids stable. The
    third-order term uses the exact Taylor coefficient of the exponential integrator, 2*phi_3 on the
    second divided difference, which gives the third-order steps a local error of order 4 (tests
    check the rate). Globally the trajectory is second order: its first step and last two steps are
    first/second order, and one first-order step's local error O(h^2) sets the total;
    no dynamic thresholding (it changes the ODE being solved; the authors' code applies it).
    """
    extra_args = extra_args or {}
    sig = [float(s) for s in sigmas]
    if any(s <= 0 for s in sig):
        raise ValueError("the teacher grid must stay above zero (DPM-Solver++ works in log sigma)")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    state = x.to(dtype)
    states, history, gaps = [x], [], []  # history: denoised estimates, newest last; gaps: their lambda steps
    steps = len(sig) - 1
    for i in range(steps):
        denoised = model(state.to(x.dtype), state.new_full((x.shape[0],), sig[i]).to(x.dtype), **extra_args)
        check_denoiser_output(denoised, x, "teacher", f"at sigma {sig[i]:.4g}", TeacherOutputError)
        denoised = denoised.to(dtype)
        h = math.log(sig[i] / sig[i + 1])
        order = min(3, len(history) + 1, steps - i)
        state = multistep_update(state, denoised, history, gaps, h, order)
        history, gaps = (history + [denoised])[-2:], (gaps + [h])[-2:]
        states.append(state.to(x.dtype))
    return states


@torch.no_grad()
def euler_trajectory(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None) -> list[torch.Tensor]:
    """Euler through `sigmas` from x at sigmas[0] (SFD Eq. 4 at every point); returns the state at every
    grid point (index 0 is x). The teacher solver of SFD's second stage, whose teacher is itself an
    Euler-sampled SFD student."""
    extra_args = extra_args or {}
    sig = [float(s) for s in sigmas]
    states = [x]
    for i in range(len(sig) - 1):
        denoised = model(states[-1], x.new_full((x.shape[0],), sig[i]), **extra_args)
        check_denoiser_output(denoised, x, "teacher", f"at sigma {sig[i]:.4g}", TeacherOutputError)
        states.append(euler_step(states[-1], sig[i], sig[i + 1], denoised.to(x.dtype)))
    return states


def multistep_update(state, denoised, history, gaps, h: float, order: int):
    """One DPM-Solver++ multistep update over log-sigma step h (Lu et al. 2022, data prediction).

    `history` holds the previous denoised estimates (newest last) and `gaps` their log-sigma steps.
    The exponential integrator is applied exactly to the Taylor polynomial of the estimate through
    the last `order` points.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    phi1 = -math.expm1(-h)  # 1 - e^-h
    phi2 = 1 - phi1 / h  # int_0^h e^{-(h-u)} u du / h
    state = math.exp(-h) * state + phi1 * denoised
    if order == 1:
        return state
    r0 = gaps[-1] / h
    d1_0 = (denoised - history[-1]) / r0  # slope of the estimate per step h
    if order == 2:
        return state + phi2 * d1_0
    r1 = gaps[-2] / h
    d1_1 = (history[-1] - history[-2]) / r1
    d2 = (d1_0 - d1_1) / (r0 + r1)  # second divided difference = h^2 D'' / 2
    phi3 = 0.5 - phi2 / h  # int_0^h e^{-(h-u)} u^2/2 du / h^2
    return state + phi2 * (d1_0 + d2 * r0) + 2 * phi3 * d2


def euler_step(x: torch.Tensor, sigma: float, sigma_next: float, denoised: torch.Tensor) -> torch.Tensor:
    """One Euler step of the PF-ODE, x + (t' - t)(x - D)/t (SFD Eq. 4): the student's only update."""
    return x + (x - denoised) * ((sigma_next - sigma) / sigma)


def analytic_denoised(x: torch.Tensor, sigma: float, sigma_data: float = 1.0) -> torch.Tensor:
    """The analytical first step's estimate (SFD's AFS): D(x, t) = x - t * x / sqrt(sigma_data^2 + t^2).

    At large t the noise is nearly all of x, so eps ~ x / std(x); costs no model call. sigma_data = 1
    is the authors' choice; set the data's per-element std if it differs much from 1.
    """
    return x - x * (sigma / math.sqrt(sigma_data ** 2 + sigma ** 2))


def broadcast_sigma(sigma: float, x: torch.Tensor) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


__all__ = ["polynomial_sigmas", "nested_grid", "dpmpp_3m_trajectory", "euler_trajectory", "multistep_update", "euler_step", "analytic_denoised", "broadcast_sigma"]
