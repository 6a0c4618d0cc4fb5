"""`teacher_guided`: Distillation++ for samplers kdistpp does not ship (Heun, LMS, DPM++ SDE, a UI's own).

The wrapper is a denoiser: it calls the student and, when the sampler evaluates it at the sigma of a
guided step of the schedule, refines the estimate through the same `Guidance.refine` core as the
dedicated samplers.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from . import validation
from .guided_steps import GuidanceWarning, caller_stacklevel
from .parametrization import for_run
from .refine import Guidance, default_renoise_generator, needs_generator, plan
from .steps import Run, default_noise_sampler

# Relative tolerance for "the sampler evaluates at schedule sigma i". Schedules built by two
# libraries from the same arguments differ by ~1e-6 (float32 rounding of the same formula);
# distinct sigmas of a few-step schedule differ by far more than this.
SIGMA_RTOL = 1e-4


def _tolerance(sigma: torch.Tensor) -> float:
    return max(SIGMA_RTOL, torch.finfo(sigma.dtype).eps) if sigma.is_floating_point() else SIGMA_RTOL


class TeacherGuidedDenoiser:
    """A student denoiser whose evaluations at guided schedule sigmas are refined by the teacher.

    An evaluation is at step i when its sigma equals sigma_i of the schedule to a relative 1e-4
    (the same schedule from another library matches; no rounding decides). Every such evaluation
    of a guided step is refined: a sampler that evaluates sigma_i twice (Heun's corrector at
    sigma_{i+1} is step i+1's sigma; DPM++ 2S a at eta=1 puts its midpoint exactly on sigma_{i+1})
    pays one teacher call for each. Evaluations at other sigmas pass through.

    The sampler's sigmas must be the wrapper's: a GuidanceWarning says so when an evaluation goes
    below a schedule sigma the run never evaluated at (churn's sigma_hat, another schedule, a
    schedule built for another step count), from the first guided step down to the sigma after the
    last, since the refinement then never fires or renoises at a level the sampler does not use.
    A batch must share one sigma. Unknown attributes are read from the student, so host code that
    inspects the model (`inner_model`, `last_uncond_denoised`) still works.
    """

    def __init__(self, student, guidance: Guidance, sigmas: torch.Tensor):
        self.student = student
        self.guidance = guidance
        self._schedule = [float(s) for s in sigmas.detach().cpu().double()]
        guided = [i for i, v in enumerate(guidance.weights) if v != 0.0]
        # schedule sigmas a matching run must evaluate at: the guided steps and the one after the last
        self._expected = [] if not guided else [
            j for j in range(guided[0], min(guided[-1] + 2, len(self._schedule))) if self._schedule[j] > 0]
        self._last_sigma = None
        g = guidance
        self._own_generator = g.generator is None and needs_generator(g.form, g.renoise, g.renoise_sampler, g.weights)
        self._generator = g.generator
        self._visited: set[int] = set()
        self._warned = False
        for i in guided:
            twins = [j for j in range(len(self._schedule) - 1) if j != i and self._schedule[j] == self._schedule[i]]
            if twins:
                warnings.warn(f"teacher_guided: guided step {i}'s sigma {self._schedule[i]:.6g} also starts step "
                              f"{twins[0]}; the wrapper knows steps by sigma, so it refines the evaluations of both",
                              GuidanceWarning, stacklevel=caller_stacklevel())

    def _matches(self, value: float, j: int, rtol: float = SIGMA_RTOL) -> bool:
        return abs(value - self._schedule[j]) <= rtol * self._schedule[j]

    def step_of(self, sigma: torch.Tensor) -> int | None:
        """The guided step whose sigma equals this evaluation's, or None. The tolerance is SIGMA_RTOL,
        or the resolution of the sigma's dtype when coarser (k-diffusion hands an fp16 latent an fp16 sigma)."""
        values = sigma.reshape(-1).detach().cpu().double()
        value, rtol = float(values[0]), _tolerance(sigma)
        if values.numel() > 1 and bool((values - value).abs().max() > rtol * value):
            raise ValueError(f"teacher_guided: the sampler passed per-sample sigmas {values.tolist()}; the wrapper "
                             "refines a batch at one schedule sigma: sample these items in separate batches")
        for i, w in enumerate(self.guidance.weights):
            if w != 0.0 and self._matches(value, i, rtol):
                return i
        return None

    def _track(self, value: float, rtol: float) -> bool:
        """Warns once per run when the sampler's schedule skips a sigma the guidance depends on: seen when
        it evaluates below that sigma, or when the next run starts (a wrapper cannot see a run end).
        Returns whether this evaluation starts a new run."""
        new_run = self._last_sigma is None or value > self._last_sigma * (1 + rtol)
        if new_run:
            if self._last_sigma is not None:
                self._warn_skipped([j for j in self._expected if j not in self._visited], "the previous run")
            self._visited, self._warned = set(), False
            if self._expected[:1] == [0] and value > self._schedule[0] * (1 + rtol):  # e.g. churn's sigma_hat
                self._warn_skipped([0], f"this run, which starts at sigma={value:.6g},")
        self._last_sigma = value
        self._visited.update(j for j in self._expected if self._matches(value, j, rtol))
        self._warn_skipped([j for j in self._expected if j not in self._visited
                            and value < self._schedule[j] * (1 - rtol)], f"the sampler, now at sigma={value:.6g},")
        return new_run

    def _warn_skipped(self, skipped: list[int], who: str) -> None:
        if skipped and not self._warned:
            self._warned = True
            j = skipped[0]
            warnings.warn(
                f"teacher_guided: {who} never evaluated the schedule's sigma_{j}={self._schedule[j]:.6g}, so the "
                "guidance built on it did not act as set: pass the sampler the same sigmas as teacher_guided, and "
                "no churn (s_churn=0) on guided steps", GuidanceWarning, stacklevel=caller_stacklevel())

    def __call__(self, x, sigma, **extra_args):
        denoised = self.student(x, sigma, **extra_args)
        validation.check_denoiser_output(denoised, x, "student", f"at sigma={float(sigma.reshape(-1)[0]):.4g}",
                                         validation.StudentOutputError)
        i = self.step_of(sigma)
        value = float(sigma.reshape(-1)[0])
        if self._track(value, _tolerance(sigma)) and self._own_generator:
            # a new run: its renoise stream is seeded as a sampler's is at its start (before any draw)
            self._generator = default_renoise_generator(x)
        if i is None:
            return denoised
        run = replace(self.guidance.run, x_in=x, extra_args=extra_args)
        guide = replace(self.guidance, run=run, generator=self._generator, keyed=self._own_generator)
        g = guide.refine(i, x.to(run.dtype), value, denoised.to(run.dtype), extra_args)
        return g.denoised.to(denoised.dtype)

    @property
    def parametrization(self) -> str:
        """The parametrization this wrapper guides in ('ve' or 'flow'), declared to the sampler it is given."""
        return self.guidance.run.param.name

    def __getattr__(self, name):
        if name in ("student", "guidance", "_schedule", "_expected", "_last_sigma", "_visited", "_warned",
                    "_own_generator", "_generator"):
            raise AttributeError(name)  # not yet set (e.g. while unpickling)
        return getattr(self.student, name)


def teacher_guided(student, teacher, sigmas, *, w, guidance_steps=None, form="interpolate", renoise="next",
                   renoise_sampler=None, teacher_extra_args=None, renoise_generator=None,
                   parametrization=None) -> TeacherGuidedDenoiser:
    """Wraps a student so that any k-diffusion-convention sampler becomes a Distillation++ sampler.

    Pass the same `sigmas` to the sampler. The refinement is paper eq. 9 (or eq. 10 / eps-mixing
    via `form`), applied to every evaluation at the sigma of a guided step; `w`, `guidance_steps`,
    `renoise*` and `parametrization` mean what they mean for the samplers; `teacher_extra_args`
    defaults to the extra_args of each call.

    A wrapped denoiser can only replace the estimate, so this is direction='refined': the sampler's
    noise direction is recomputed from x0h, which scales the shift a guided step makes. On an
    Euler step the output moves by (1 - sigma_{i+1}/sigma_i) * (x0h - x0s) instead of the
    authors' x0h - x0s (0.72x on SDXL-Lightning's 4-step first step), so the paper's w acts
    smaller; the dedicated `sample_*_distpp` samplers default to the authors' update. With Euler,
    Euler ancestral and DPM++ 2M it gives the same result as those samplers with
    direction='refined' (2M: history='refined') when both draw the same renoise noise (pass a
    renoise_generator or renoise_sampler to each: k-diffusion's samplers draw from the global RNG
    in their own order).
    """
    validation.check_callable("student", student)
    validation.check_callable("teacher", teacher)
    values = validation.check_sigmas(sigmas)
    param = for_run(parametrization, student, values)
    param.check_sigmas(values)
    template = Run(student, torch.empty(0), sigmas, values, {}, default_noise_sampler(torch.empty(0)), param)
    guidance = plan(template, teacher, w, guidance_steps, form, renoise, renoise_sampler, teacher_extra_args,
                    "refined", renoise_generator, resolve_extra_args=False, default_generator=False)
    return TeacherGuidedDenoiser(student, guidance, sigmas)
