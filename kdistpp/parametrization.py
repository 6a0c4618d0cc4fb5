"""How a model's state is built from a clean latent and noise: VE (k-diffusion's) or rectified flow.

The samplers run in the model's own coordinates and ask the parametrization only the few things in
which the two differ, as ComfyUI's `model_sampling` classes do:

    state at sigma          VE: x = x0 + sigma n           flow: x = (1 - s) x0 + s n
    x0's weight in it       VE: 1                          flow: 1 - s
    ancestral step          VE: k-diffusion's sigma_up     flow: ComfyUI's *_RF down-step rule
    2S midpoint             VE: sqrt(sigma_i sigma_down)   flow: the same in log-SNR, 0.9999 at s = 1

The deterministic updates need nothing more: with r = sigma_next / sigma, Euler's
x + (x - x0) / sigma * (sigma_next - sigma) = r x + (1 - r) x0 is VE Euler in VE coordinates and
flow Euler (DDIM) in flow coordinates, and DPM-Solver++'s (sigma_next / sigma) x - expm1(-h) x0 is
the same form. A flow model is a VE model in y = x / (1 - s), sigma = s / (1 - s) (kdistpp.flow),
which is why the refinement keeps its meaning: the derivations are in docs/samplers.md. Running
in flow coordinates keeps s = 1 (sigma = infinity), where most flow schedules start, finite.
"""

from __future__ import annotations

import math
import warnings

import torch

from .guided_steps import caller_stacklevel


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Splits a step to sigma_to into a deterministic part to sigma_down and fresh noise sigma_up.

    sigma_up**2 = eta**2 * sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2 (capped at
    sigma_to) is the DDPM posterior variance for eta = 1, and sigma_down**2 + sigma_up**2 = sigma_to**2.
    """
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    sigma_down = math.sqrt(sigma_to**2 - sigma_up**2)
    return sigma_down, sigma_up


class Parametrization:
    """The base: k-diffusion's variance-exploding convention, x = x0 + sigma * n. Subclasses override
    the methods in which their state differs."""

    name = "ve"

    def noise_scaling(self, sigma: float, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The state at sigma for a clean latent x0 and unit noise (the refinement's renoise, eq. 9)."""
        return x0 + noise * sigma

    def clean_weight(self, sigma: float) -> float:
        """How much a change of x0 moves the state at sigma."""
        return 1.0

    def ancestral_step(self, sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
        """(sigma_down, noise coefficient, scale): x_next = scale * x_down + coefficient * n."""
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        return sigma_down, sigma_up, 1.0

    def midpoint(self, sigma: float, sigma_down: float) -> tuple[float, float]:
        """DPM-Solver++(2S)'s midpoint sigma_s and the log-sigma gap h_s = log(sigma / sigma_s) to it."""
        h = math.log(sigma / sigma_down)
        return sigma * math.exp(-h / 2), h / 2

    def ve_sigma(self, sigma: float) -> float:
        """The VE sigma of this sigma (the eps form's scale)."""
        return sigma

    def check_sigmas(self, values: list[float]) -> None:
        pass

    def check_midpoint_eta(self, values: list[float], eta: float) -> None:
        """k-diffusion's VE ancestral step caps the noise, so every eta >= 0 keeps the down step >= 0."""

    def check_renoise_level(self, sigma: float) -> None:
        """A fixed renoise level must be a sigma of this parametrization."""

    def renoise_at(self, sigma: float) -> float:
        """The level the refinement renoises at when its renoise option resolves to `sigma`: itself
        wherever the state at sigma still holds the estimate (every VE sigma)."""
        return sigma

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class VE(Parametrization):
    """k-diffusion's variance-exploding convention: x = x0 + sigma * n (SD 1.x/SDXL eps and v models
    through their k-diffusion wrappers, and every VE/EDM model)."""


# The renoise level of a flow step whose own level is the pure-noise s = 1: equal weights on the student's
# estimate and the noise, (x0 + n) / 2 (VE sigma 1, log-SNR 0, the middle of the flow schedule before any shift).
PURE_NOISE_FALLBACK = 0.5


class RectifiedFlow(Parametrization):
    """Rectified flow / flow matching: x = (1 - s) x0 + s n, s in [0, 1] (SD3/3.5, Flux, Qwen-Image, Wan,
    Z-Image; ComfyUI's CONST, diffusers' FlowMatchEulerDiscreteScheduler sigmas)."""

    name = "flow"

    def noise_scaling(self, sigma, noise, x0):
        return torch.add(x0 * (1.0 - sigma), noise, alpha=sigma)

    def clean_weight(self, sigma):
        return 1.0 - sigma

    def ancestral_step(self, sigma, sigma_next, eta):
        """ComfyUI's rectified-flow ancestral step (sample_euler_ancestral_RF): the down step is
        s_d = s' (1 + (s'/s - 1) eta), then x' = (1 - s') / (1 - s_d) * x_d + c n with
        c = sqrt(s'^2 - s_d^2 (1 - s')^2 / (1 - s_d)^2). In VE terms it is an ancestral step to
        sigma_d = s_d / (1 - s_d) with sigma_up^2 = sigma'^2 - sigma_d^2: only the rule picking the
        down step differs from k-diffusion's. At eta = 0 or s' = 0 it is the deterministic step to s'.
        A zero-length step (s' = s, e.g. a bf16-rounded schedule starting 1.0, 1.0) keeps x and adds
        no noise: ComfyUI's formula gives exactly that at a repeated s < 1, and 0/0 at s = 1."""
        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        if sigma_down == sigma_next:
            return sigma_next, 0.0, 1.0
        scale = (1 - sigma_next) / (1 - sigma_down)  # exactly 1 at eta = 0: then no noise at all
        coefficient = math.sqrt(max(sigma_next**2 - (sigma_down * scale) ** 2, 0.0))
        return sigma_down, coefficient, scale

    def midpoint(self, sigma, sigma_down):
        """The midpoint in lambda = log((1 - s) / s) (= -log of the VE sigma), as ComfyUI's
        sample_dpmpp_2s_ancestral_RF takes it, including its s_s = 0.9999 at s = 1 (lambda = -inf)."""
        if sigma == 1.0:
            sigma_s = 0.9999
        else:
            lam = (math.log((1 - sigma) / sigma) + math.log((1 - sigma_down) / sigma_down)) / 2
            sigma_s = 1 / (math.exp(lam) + 1)
        return sigma_s, math.log(sigma / sigma_s)

    def ve_sigma(self, sigma):
        return math.inf if sigma >= 1 else sigma / (1 - sigma)

    def check_midpoint_eta(self, values: list[float], eta: float) -> None:
        """DPM-Solver++(2S) needs its down step s_d = s' (1 + (s'/s - 1) eta) above 0 to place its midpoint
        (in log-SNR); eta > 1 pushes it below 0 on a large step (ComfyUI's 2S a RF then returns NaN)."""
        bad = [(i, s, t) for i, (s, t) in enumerate(zip(values, values[1:])) if t > 0 and t * (1 + (t / s - 1) * eta) < 0]
        if bad:
            i, s, t = bad[0]
            limit = min(a / (a - b) for a, b in zip(values, values[1:]) if 0 < b < a)
            raise ValueError(f"eta={eta:g} puts step {i}'s down step (s={s:.4g} to {t:.4g}) below s = 0, where DPM++ 2S "
                             f"ancestral has no midpoint: on this schedule eta must stay below {limit:.4g} (eta <= 1 "
                             "always works)")

    def renoise_at(self, sigma):
        """s = 1 is pure noise, (1 - s) x0 + s n = n: renoised there the teacher would see nothing of the
        student's estimate. 'current' resolves to it on a step from s = 1 (a 1-step student's only step),
        'random' on a schedule whose only positive sigma is 1: those renoise at PURE_NOISE_FALLBACK."""
        return PURE_NOISE_FALLBACK if sigma >= 1 else sigma

    def check_renoise_level(self, sigma):
        if sigma >= 1:
            raise ValueError(f"renoise={sigma} is not a flow sigma: a fixed renoise level of a rectified-flow model "
                             "lies in (0, 1) (s = 1 is pure noise)")

    def check_sigmas(self, values):
        if values and values[0] > 1:
            raise ValueError(f"sigmas of a rectified-flow model lie in [0, 1], got {values[0]} first; pass the "
                             "host's flow sigmas (s), not VE sigmas (convert with kdistpp.flow.flow_sigma)")


PARAMETRIZATIONS = {"ve": VE(), "flow": RectifiedFlow()}
VE_PARAMETRIZATION = PARAMETRIZATIONS["ve"]


class ParametrizationWarning(UserWarning):
    """A run whose parametrization was not given looks like it needs another one."""


def declared(model) -> Parametrization | None:
    """What a denoiser says it is: its `parametrization` attribute ('ve', 'flow' or a Parametrization
    object; kdistpp's flow adapters set 'flow'), or None when it says nothing kdistpp reads."""
    value = getattr(model, "parametrization", None)
    if isinstance(value, Parametrization):
        return value
    if isinstance(value, str) and value in PARAMETRIZATIONS:
        return PARAMETRIZATIONS[value]
    return None


def looks_like_flow(values: list[float]) -> bool:
    """A schedule as flow hosts give it: from s = 1.0 exactly down to 0, every sigma in [0, 1]."""
    return len(values) > 1 and values[0] == 1.0 and values[-1] == 0.0 and all(0.0 <= s <= 1.0 for s in values)


def for_run(parametrization, model, values: list[float]) -> Parametrization:
    """The run's parametrization: the caller's, else the one the model declares, else VE.

    A caller's value that contradicts the model's declaration is refused, naming both; a VE run
    that nobody asked for over a schedule that looks like a flow one warns (ParametrizationWarning):
    a flow model run as VE samples without an error and gives a different image.
    """
    own = declared(model)
    if parametrization is None:
        if own is not None:
            return own
        if looks_like_flow(values):
            warnings.warn("sigmas run from 1.0 down to 0 like a rectified-flow schedule, but the run is VE (the default, "
                          "and the model declares no parametrization): pass parametrization='flow' for a flow model "
                          "(Flux, SD3, Wan...), or parametrization='ve' to keep VE and silence this",
                          ParametrizationWarning, stacklevel=caller_stacklevel())
        return VE_PARAMETRIZATION
    param = resolve(parametrization)
    if own is not None and own.name != param.name:
        raise ValueError(f"parametrization={param.name!r} contradicts the model, which declares "
                         f"parametrization={own.name!r}: leave parametrization out to use the model's, or wrap the "
                         "model as the other kind (kdistpp.flow.VEDenoiser runs a flow model as VE)")
    return param


def check_teacher(param: Parametrization, teacher) -> None:
    """The teacher must be the run's kind of model: the refinement mixes their estimates at one state."""
    own = declared(teacher)
    if own is not None and own.name != param.name:
        raise ValueError(f"the teacher declares parametrization={own.name!r} but the run's parametrization is "
                         f"{param.name!r}: student and teacher must share one (wrap one of them, e.g. with "
                         "kdistpp.flow.VEDenoiser for a flow model in a VE run)")


def resolve(parametrization) -> Parametrization:
    """'ve' or 'flow' (or a parametrization object) as the object the samplers use."""
    if isinstance(parametrization, Parametrization):
        return parametrization
    if isinstance(parametrization, str) and parametrization in PARAMETRIZATIONS:
        return PARAMETRIZATIONS[parametrization]
    raise ValueError(f"parametrization must be 've' (k-diffusion's x0 + sigma n) or 'flow' ((1 - s) x0 + s n), "
                     f"got {parametrization!r}")
