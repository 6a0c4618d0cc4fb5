"""Sampling an SFD student with the library's samplers, with or without Distillation++ on top."""

from __future__ import annotations

import torch

from ..samplers import sample_euler_distpp
from .trainer import SFDConfig
from .trajectory import analytic_denoised


class AnalyticFirstStep:
    """Wraps an SFD student trained with `afs=True`: at sigma_max it returns AFS's analytic estimate
    (no model call); elsewhere it calls the student. Use it as `model` in any kdistpp sampler."""

    def __init__(self, model, sigma_max: float, sigma_data: float = 1.0):
        self.model, self.sigma_max, self.sigma_data = model, float(sigma_max), sigma_data

    def __call__(self, x, sigma, **extra_args):
        s = float(sigma.reshape(-1)[0]) if torch.is_tensor(sigma) else float(sigma)
        if abs(s - self.sigma_max) <= 1e-6 * self.sigma_max:
            return analytic_denoised(x, s, self.sigma_data)
        return self.model(x, sigma, **extra_args)


def sfd_denoiser(student, config: SFDConfig, num_steps: int | None = None):
    """The student as the samplers should call it: AFS at the first timestamp if trained with it, and
    SFD-v's `num_steps` conditioning bound in."""
    model = step_conditioned(student, config, config.trained_steps(num_steps))
    return AnalyticFirstStep(model, config.sigma_max, config.sigma_data) if config.afs else model


def step_conditioned(student, config: SFDConfig, n: int):
    """SFD-v's student with its step count `n` bound in (the plain student otherwise)."""
    if not config.step_conditioned:
        return student

    def model(x, sigma, **extra_args):
        steps = torch.full((x.shape[0],), n, dtype=torch.long, device=x.device)
        return student(x, sigma, num_steps=steps, **extra_args)

    return model


@torch.no_grad()
def sample_sfd(student, x, config: SFDConfig, num_steps: int | None = None, extra_args=None, callback=None,
               disable=None, *, teacher=None, w=None, **distpp):
    """Euler through the student's timestamps, ending at sigma_min as trained (SFD Sec. 4; NFE = N - 1,
    N - 2 with AFS). `x` is unit noise times config.sigma_max. `num_steps` must be a count the
    student was trained for (required for SFD-v). With a `teacher` and w > 0 the first step is
    refined by Distillation++ (Park et al. 2024, eq. 9; further keywords as in
    `kdistpp.sample_euler_distpp`), at the cost of one teacher call."""
    n = config.trained_steps(num_steps)
    sigmas = config.timestamps(n, device=x.device)
    model = sfd_denoiser(student, config, n)
    return sample_euler_distpp(model, x, sigmas, extra_args, callback, disable, teacher=teacher, w=w, **distpp)
