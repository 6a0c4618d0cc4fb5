"""Argument checks shared by every sampler: run once, before any model call.

Each message names the argument, says what was passed and what is expected.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch


def is_bool(value) -> bool:
    """Python, numpy or 0-d tensor booleans: refused where a number is expected (True is not a weight)."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and value.dtype == torch.bool
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def is_real(value) -> bool:
    """A real scalar: a Python or numpy number, or a 0-d real tensor; not a bool."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_complex() and value.dtype != torch.bool
    if getattr(value, "ndim", None) == 0 and getattr(getattr(value, "dtype", None), "kind", None) in ("f", "i", "u"):
        return True  # a 0-d numpy array
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_integer(value) -> bool:
    """An integer scalar: a Python or numpy int, or a 0-d integer tensor; not a bool."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
    return isinstance(value, numbers.Integral) and not is_bool(value)


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
    values = sigmas.detach().cpu().double().tolist()  # one copy to the host, not a read per sigma
    if not all(math.isfinite(s) for s in values):
        raise ValueError(f"sigmas must be finite, got {values}")
    if any(s < 0 for s in values):
        raise ValueError(f"sigmas must be non-negative, got {values}")
    rises = [i for i, (a, b) in enumerate(zip(values, values[1:])) if b > a]
    if rises:
        falls = any(b < a for a, b in zip(values, values[1:]))
        i = rises[0]
        hint = ("it runs from the least noisy up: reverse it (sigmas.flip(0))" if not falls else
                f"sigma_{i + 1}={values[i + 1]:.6g} is above sigma_{i}={values[i]:.6g}: rebuild the schedule (a "
                "schedule function, or the host's sigmas) so that it decreases throughout")
        raise ValueError(f"sigmas must be non-increasing (noisiest first), got {values}; {hint}")
    if any(s == 0 for s in values[:-1]):
        raise ValueError(f"sigmas: only the last sigma may be 0, got {values}")
    return values


# k-diffusion's sampler options: (lowest allowed value, whether +inf is allowed, what the option does)
SAMPLER_OPTIONS = {
    "eta": (0.0, False, "the ancestral noise scale (0 = deterministic, 1 = the default)"),
    "s_noise": (0.0, False, "the scale of the added noise (1 = the default)"),
    "s_churn": (0.0, False, "the churn amount (0 = none, the default)"),
    "s_tmin": (0.0, False, "the lowest sigma churned (default 0)"),
    "s_tmax": (0.0, True, "the highest sigma churned (default inf)"),
}


def check_sampler_option(name: str, value) -> float:
    """A k-diffusion sampler option (eta, s_noise, s_churn, s_tmin, s_tmax): a real number, not NaN,
    at least 0, finite except s_tmax. Returns it as a float."""
    low, inf_ok, meaning = SAMPLER_OPTIONS[name]
    if not is_real(value):
        raise TypeError(f"{name} must be a real number ({meaning}), got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or (math.isinf(number) and not (inf_ok and number > 0)):
        raise ValueError(f"{name} must be a {'' if inf_ok else 'finite '}number ({meaning}), got {number}")
    if number < low:
        raise ValueError(f"{name} must be >= {low:g} ({meaning}), got {number}")
    return number


def check_noise(name: str, noise, x: torch.Tensor, i: int) -> None:
    """A noise sampler's draw must be a tensor of the latent's shape (checked on the host: no sync)."""
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"{name} returned a {type(noise).__name__} at step {i}; it must return unit noise as a "
                        f"tensor of the latent's shape {tuple(x.shape)}")
    if noise.shape != x.shape:
        raise ValueError(f"{name} returned shape {tuple(noise.shape)} at step {i}; it must return unit noise of the "
                         f"latent's shape {tuple(x.shape)}")


def check_options(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_renoise(renoise) -> None:
    if isinstance(renoise, str):
        check_options("renoise", renoise, ("next", "current", "random"))
    elif is_real(renoise):
        if not (math.isfinite(float(renoise)) and float(renoise) > 0):
            raise ValueError(f"a fixed renoise level must be a finite sigma > 0, got {renoise}")
    else:
        raise TypeError(f"renoise must be 'next', 'current', 'random' or a sigma > 0, got {renoise!r}")


def check_extra_args(name: str, value) -> None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"{name} must be a dict of keyword arguments or None, got {type(value).__name__}")


def check_generator(name: str, value) -> None:
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(value).__name__}")


def check_optional_callable(name: str, value: Callable | None) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be a callable (sigma, sigma_next) -> noise, or None; got {type(value).__name__}")


class DenoiserOutputError(ValueError):
    """A denoiser returned something other than a finite tensor of the latent's shape."""


class StudentOutputError(DenoiserOutputError):
    """The student (the sampled model) returned a bad estimate."""


class TeacherOutputError(DenoiserOutputError):
    """The teacher returned a bad estimate."""


def check_denoiser_output(out, x: torch.Tensor, who: str, where: str, error: type[DenoiserOutputError]) -> None:
    """Refuses an estimate that is not a tensor of x's shape, or that holds NaN/inf, naming the model
    and where it was called, instead of sampling on with it (a (1,1,1,1) output would broadcast).
    The finiteness check reads a flag from the device; the samplers defer it (steps.Run.call)."""
    check_denoiser_shape(out, x, who, where, error)
    if not bool(torch.isfinite(out).all()):
        raise error(non_finite_message(who, where))


def non_finite_message(who: str, where: str) -> str:
    return (f"{who} returned non-finite values (NaN/inf) {where}; check its dtype (fp16 overflow?), its inputs and "
            "its conditioning")


def check_denoiser_shape(out, x: torch.Tensor, who: str, where: str, error: type[DenoiserOutputError]) -> None:
    """The host-side half of check_denoiser_output: a tensor of x's shape (no device read)."""
    if not isinstance(out, torch.Tensor):
        hint = " (a tuple: return its denoised tensor, e.g. wrap it as lambda x, s, **k: model(x, s, **k)[0])" \
            if isinstance(out, tuple) else ""
        raise error(f"{who} returned a {type(out).__name__} {where}; expected a tensor of the latent's "
                    f"shape {tuple(x.shape)}{hint}")
    if out.shape != x.shape:
        raise error(f"{who} returned shape {tuple(out.shape)} {where}; expected the latent's shape {tuple(x.shape)}")
