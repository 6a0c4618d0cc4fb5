"""The small shared math of the samplers and the per-run set-up.

Step arithmetic runs in float32 or better whatever the model's dtype: `prepare` lifts x to that
"step dtype", and `Run.denoise` hands the model x in the caller's dtype and lifts its output back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import validation
from .parametrization import VE, Parametrization, ancestral_step, for_run

__all__ = ["Run", "ancestral_step", "append_dims", "cfg_pp_state", "default_noise_sampler", "log_sigma_gap", "prepare",
           "step_dtype", "supports_uncond"]


_PASSED = 2**62  # above any check index: a check's flag is _PASSED + index when it passed


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Appends trailing singleton dimensions so that x broadcasts against an ndim-D latent."""
    return x[(...,) + (None,) * (ndim - x.ndim)]


def step_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models, the input dtype when it is already float32 or wider."""
    return torch.promote_types(dtype, torch.float32)


def supports_uncond(model) -> bool:
    """The CFG++ protocol: a student that keeps its last unconditional estimate as an attribute."""
    return hasattr(model, "last_uncond_denoised")


@dataclass
class Run:
    """One sampling run: the model bound to its extra_args and dtypes, and the schedule as floats."""

    model: Callable
    x_in: torch.Tensor  # the caller's x: read only, never written
    sigmas_in: torch.Tensor  # the caller's sigmas, handed to callbacks and noise samplers as is
    sigmas: list[float]
    extra_args: dict
    noise_sampler: Callable
    param: Parametrization = VE()  # how the model's state is built from x0 and noise
    # Deferred finiteness checks: (error class, message) per check, and on the device the index of the
    # first one that failed (PASSED + index while none has), read once by check_outputs.
    _checks: list = field(default_factory=list, init=False, repr=False)
    _first_failed: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def dtype(self) -> torch.dtype:
        return step_dtype(self.x_in.dtype)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def start(self) -> torch.Tensor:
        return self.x_in.to(self.dtype)

    def call(self, model: Callable, x: torch.Tensor, sigma: float, extra_args: dict, who: str = "model (the student)",
             where: str | None = None, error=validation.StudentOutputError) -> torch.Tensor:
        """model(x, sigma * s_in, **extra_args) in the model's dtype; the result, checked (a tensor of
        x's shape, finite), in the step dtype."""
        s_in = x.new_full((x.shape[0],), sigma)
        out = model(x.to(self.x_in.dtype), s_in, **extra_args)
        where = f"at sigma={sigma:.4g}" if where is None else where
        validation.check_denoiser_shape(out, x, who, where, error)
        self.expect_finite(out, error, validation.non_finite_message(who, where))
        return out.to(self.dtype)

    def expect_finite(self, value: torch.Tensor, error: type[Exception], message: str) -> None:
        """Records, on value's device, whether value is all finite; no host read (a GPU keeps its queue).
        check_outputs raises `error(message)` for the first recorded check that failed."""
        index = len(self._checks)
        self._checks.append((error, message))
        # PASSED + index when finite, index when not: the minimum over the run is the first failure
        flag = torch.isfinite(value).all().to(torch.int64) * _PASSED + index
        self._first_failed = flag if self._first_failed is None else torch.minimum(self._first_failed, flag)

    def check_outputs(self) -> None:
        """Raises the first failed finiteness check so far (which model, step and sigma): one host read.
        The samplers call it at the end of the run and after each guided step's refinement."""
        if self._first_failed is None:
            return
        first = int(self._first_failed)
        if first < _PASSED:
            error, message = self._checks[first]
            raise error(message)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return self.call(self.model, x, sigma, self.extra_args)

    def noise(self, i: int) -> torch.Tensor:
        """Unit noise for step i from the noise sampler, k-diffusion's (sigma, sigma_next) protocol."""
        noise = self.noise_sampler(self.sigmas_in[i], self.sigmas_in[i + 1])
        validation.check_noise("noise_sampler", noise, self.x_in, i)
        return noise.to(self.dtype)

    def uncond(self) -> torch.Tensor:
        """The student's unconditional estimate from its last call (CFG++)."""
        u = self.model.last_uncond_denoised
        if u is None:
            raise RuntimeError("cfg_pp=True but the model's last_uncond_denoised is None after its call")
        return u.to(self.dtype)

    def report(self, callback, i: int, x, refinement, sigma_hat=None) -> None:
        """k-diffusion's callback dict with the refined estimate as 'denoised', plus
        'student_denoised' / 'teacher_denoised' on guided steps."""
        if callback is not None:
            sigma = self.sigmas_in[i]
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma if sigma_hat is None else sigma_hat,
                      "denoised": refinement.denoised, **refinement.info})

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        self.check_outputs()
        return x.to(self.x_in.dtype)


def prepare(model, x, sigmas, extra_args=None, noise_sampler=None, cfg_pp: bool = False, parametrization=None,
            **options) -> Run:
    """Validates a sampler's shared arguments and binds them into a Run. parametrization None: the
    model's declared one (its `parametrization` attribute), else VE. `options` are the sampler's
    k-diffusion options (eta, s_noise, s_churn, s_tmin, s_tmax), checked here with the rest."""
    for name, value in options.items():
        validation.check_sampler_option(name, value)
    validation.check_callable("model", model)
    validation.check_latent(x)
    values = validation.check_sigmas(sigmas)
    param = for_run(parametrization, model, values)
    param.check_sigmas(values)
    if cfg_pp and not isinstance(param, VE):
        raise ValueError("cfg_pp=True is defined for VE models here; pass parametrization='ve' or cfg_pp=False")
    validation.check_extra_args("extra_args", extra_args)
    validation.check_optional_callable("noise_sampler", noise_sampler)
    if cfg_pp and not supports_uncond(model):
        raise TypeError(
            "cfg_pp=True needs a model that exposes its unconditional estimate as `last_uncond_denoised`; "
            "wrap it in kdistpp.CFGDenoiser (see docs/cfg_pp.md)"
        )
    if noise_sampler is None:
        noise_sampler = default_noise_sampler(x)
    return Run(model, x, sigmas, values, {} if extra_args is None else extra_args, noise_sampler, param)


def default_noise_sampler(x: torch.Tensor) -> Callable:
    """Fresh unit noise from the global RNG, drawn like x (so a webui seed controls it)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def cfg_pp_state(run: Run, x: torch.Tensor, denoised: torch.Tensor, cfg_pp: bool) -> torch.Tensor:
    """CFG++ (Chung et al. 2024): the state whose implied noise is the unconditional one.

    x = denoised + sigma * eps, so x + (denoised - U) = denoised + sigma * eps_uncond; any update
    linear in (x, denoised) then renoises along the unconditional direction while still landing on
    the guided estimate. Without CFG++ the state is x itself.
    """
    return x + (denoised - run.uncond()) if cfg_pp else x


def log_sigma_gap(sigma: float, sigma_next: float) -> float:
    """h = lambda_next - lambda with lambda = -log(sigma): the DPM-Solver step size (inf at sigma 0)."""
    return math.inf if sigma_next == 0 else math.log(sigma / sigma_next)
