"""The Distillation++ refinement: the one place where the teacher meets the student's estimate.

Every `*_distpp` sampler and `teacher_guided` call `Guidance.refine` right after the student's
denoiser call. The result says which estimate the solver's update reads and what shift it adds
to the new state afterwards, so that a guided step means what it means in the authors' runs
(`direction='student'`, default) or what k-diffusion's reading of eq. 9 gives ('refined').
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import validation
from .guided_steps import GuidanceWarning, caller_stacklevel, step_weights
from .parametrization import VE, Parametrization, check_teacher
from .steps import Run, default_noise_sampler
from .validation import TeacherOutputError

__all__ = ["DIRECTIONS", "FORMS", "Guidance", "Refinement", "TeacherOutputError", "plan", "unguided"]

FORMS = ("interpolate", "guidance", "eps")
DIRECTIONS = ("student", "refined")


@dataclass(frozen=True)
class Refinement:
    """One refined evaluation, as the solver consumes it.

    estimate: what the solver's update reads. direction='student': the student's raw estimate x0s,
        so the update keeps the student's own noise direction (the authors' Euler++/Euler a++/2M++);
        'refined': the refined x0h replaces the estimate everywhere.
    shift: added to the state after the update, x0h - x0s for 'student', None otherwise. Then a
        guided step = its unguided update shifted by the refinement, whatever the solver.
    denoised: the refined x0h (the callback's 'denoised'); info: the callback's extra keys.
    """

    estimate: torch.Tensor
    denoised: torch.Tensor
    shift: torch.Tensor | None = None
    info: dict | None = None
    param: Parametrization = VE()

    def carry(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The state at `sigma` after the solver's update, moved by the refinement's shift: x0h - x0s
        in VE coordinates, (1 - s)(x0h - x0s) in flow coordinates (the same move of the VE state)."""
        if self.shift is None:
            return x
        return torch.add(x, self.shift, alpha=self.param.clean_weight(sigma))  # one kernel; alpha 1.0 in VE: exact


@dataclass(frozen=True)
class Guidance:
    """Which steps are guided, how strongly, and how: validated once, before any model call."""

    teacher: Callable | None  # None only when no step is guided
    weights: tuple[float, ...]  # w per step; 0 means the step is not guided (no teacher call)
    form: str
    renoise: str | float
    renoise_sampler: Callable | None
    teacher_extra_args: dict | None  # None: the student's extra_args of the same call
    run: Run
    direction: str = "student"
    generator: torch.Generator | None = None  # the renoise noise and 'random' level (plan fills in a default)
    keyed: bool = False  # generator is the default stream: its noise and level keyed to the state

    def renoise_level(self, i: int, sigma: float, state: torch.Tensor | None = None) -> float:
        """sigma_r of eq. 9: the next sigma of the schedule (the paper's decreasing schedule, default),
        the current one, a log-uniform random draw (DreamFusion-style SDS), or a fixed level. The default
        stream's draw is keyed to `state`, the state the student was evaluated at (keyed_uniform). A flow
        level of s = 1 (pure noise) becomes the parametrization's fallback (renoise_at; plan warns)."""
        level = scheduled_level(self.run, self.renoise, i, sigma)
        if level is None:
            positive = [s for s in self.run.sigmas if s > 0]
            lo, hi = math.log(positive[-1]), math.log(positive[0])
            g = self.generator
            u = torch.rand((), generator=g, device=g.device) if g is not None else torch.rand(())
            if self.keyed and state is not None:
                u = keyed_uniform(u, state)
            level = math.exp(lo + (hi - lo) * float(u))  # a host-side level: one read per guided step
        return self.run.param.renoise_at(level)

    def refine(self, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor, extra_args: dict | None = None,
               *, active: bool = True) -> Refinement:
        """Refines the student's estimate `denoised` = Ds(x, sigma) at step i (paper eqs. 9 and 10).

        interpolate (eq. 9):  x_r = x0s + sigma_r * n,  x0h = x0s + w * (DT(x_r, sigma_r) - x0s)
        guidance   (eq. 10):  x0h = x0s + w * (DT(x, sigma) - x0s)
        eps (consistency students, authors' code): eps_h = eps_s + w * (eps_T - eps_s), i.e.
                              x0h = x0s - w * (sigma / sigma_r * (x_r - x0T) - (x - x0s))

        On an unguided step (w = 0, or active=False) the estimate passes through without touching
        the teacher or the RNG. A guided step's info holds 'student_denoised' and 'teacher_denoised'.
        """
        w = self.weights[i]
        if w == 0.0 or not active:
            return Refinement(denoised, denoised, None, {})
        refined, info = self._refined_estimate(i, x, sigma, denoised, w, extra_args)
        if self.direction == "refined":
            return Refinement(refined, refined, None, info)
        return Refinement(denoised, refined, refined - denoised, info, self.run.param)

    def _refined_estimate(self, i, x, sigma, denoised, w, extra_args):
        if self.form == "guidance":
            x_t, sigma_t = x, sigma
        else:
            sigma_t = self.renoise_level(i, sigma, x)
            x_t = self.run.param.noise_scaling(sigma_t, self._renoise_noise(i, x), denoised)
        teacher_args = self.teacher_extra_args if self.teacher_extra_args is not None else extra_args or {}
        name = getattr(self.teacher, "__name__", type(self.teacher).__name__)
        step_sigma = self.run.sigmas[i]
        evaluated = "" if math.isclose(sigma, step_sigma) else f", evaluated at sigma={sigma:.4g}"
        where = f"at step {i} (step sigma={step_sigma:.4g}{evaluated}, teacher called at sigma_r={sigma_t:.4g})"
        teacher_denoised = self.run.call(self.teacher, x_t, sigma_t, teacher_args, f"teacher {name}", where,
                                         TeacherOutputError)
        # The teacher may keep a reference to its input (hooks, caches): the renoised point is not
        # reused as the result's buffer.
        if self.form == "eps":
            # eps = (x - a x0) / sigma with a the state's weight on x0 (1 in VE, 1 - s in flow);
            # eps_h = eps_s + w (eps_T - eps_s), x0h = x0s - w sigma_ve (eps_T - eps_s)
            param = self.run.param
            k = param.ve_sigma(sigma) / sigma
            residual = torch.sub(x_t, teacher_denoised, alpha=param.clean_weight(sigma_t)).mul_(k * sigma / sigma_t)
            residual = residual.sub_(torch.sub(x, denoised, alpha=param.clean_weight(sigma)).mul_(k))
            refined = residual.mul_(-w).add_(denoised)
        else:
            refined = torch.lerp(denoised, teacher_denoised, w)  # exact at w = 0 and w = 1
        # A large w extrapolates past what the model's dtype holds: fail here, not as NaN steps later.
        # The run's checks so far (student, teacher, this one) are read once, here, per guided step.
        self.run.expect_finite(refined.to(self.run.x_in.dtype), ValueError,
                               f"w={w} made the refined estimate overflow {self.run.x_in.dtype} {where}; "
                               "the paper's weights are below 1: use a smaller w")
        self.run.check_outputs()
        return refined, {"student_denoised": denoised, "teacher_denoised": teacher_denoised}

    def _renoise_noise(self, i: int, state: torch.Tensor) -> torch.Tensor:
        """Step i's renoise noise n; the default stream's keyed to the state the student was evaluated at."""
        if self.renoise_sampler is not None:
            noise = self.renoise_sampler(self.run.sigmas_in[i], self.run.sigmas_in[i + 1])
            validation.check_noise("renoise_sampler", noise, self.run.x_in, i)
            return noise.to(self.run.dtype)
        x, g = self.run.x_in, self.generator
        if g is not None:
            noise = torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device, self.run.dtype)
            return keyed_to_x(noise, state) if self.keyed else noise
        return default_noise_sampler(x)(None, None).to(self.run.dtype)


def state_key(x: torch.Tensor) -> torch.Tensor:
    """x's values spread over [-1, 1] (its float bits, through a fast sine): the key of the default stream."""
    return torch.sin(x.to(torch.float32) * 12345.6789 + 0.5)


def keyed_to_x(noise: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The default stream's noise with each sign set by x's value there. The global RNG's state does not
    move when x comes from a torch.Generator (or the CPU, for a CUDA x) and the sampler draws nothing, so
    its seed alone would repeat the same renoise noise over a seed loop; keyed to x, each run gets its own,
    with no host read. Still N(0, 1) and independent of x: a symmetric draw times signs fixed by x."""
    return torch.where(state_key(x) < 0, -noise, noise)


def keyed_uniform(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The default stream's uniform draw u (renoise='random''s level) turned by a fraction set by x:
    (u + h(x)) mod 1, computed on x's device (no host read). For the reason keyed_to_x gives, another
    x gets another level; still U(0, 1), since turning the unit circle keeps the uniform measure and
    h(x) does not depend on u."""
    turn = torch.remainder(state_key(x).sum() * 0.6180339887, 1.0)  # h(x): x's key summed, spread over [0, 1)
    return torch.remainder(u.to(turn.device) + turn, 1.0)


def default_renoise_generator(x: torch.Tensor) -> torch.Generator:
    """The renoise stream when the caller names none: a generator of its own, seeded from the state of
    the global RNG that draws x's sampler noise, read without advancing it, its noise keyed to the
    state at the guided step (keyed_to_x). So the sampler's own (ancestral) noise stream is the same
    with and without guidance, a seeded w=0 vs w>0 A/B differs by the teacher alone, the same
    torch.manual_seed and x give the same renoise noise, another x (another seed) other noise, and a
    host's seed still controls it; a run that guides nothing does not create it."""
    cuda = x.device.type == "cuda"
    state = torch.cuda.get_rng_state(x.device) if cuda else torch.get_rng_state()
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8, person=b"kdistpp-renoise").digest()
    return torch.Generator(device=x.device if cuda else "cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def plan(
    run: Run,
    teacher,
    w,
    guidance_steps,
    form,
    renoise,
    renoise_sampler,
    teacher_extra_args,
    direction,
    renoise_generator=None,
    *,
    resolve_extra_args: bool = True,
    default_generator: bool = True,
) -> Guidance:
    """Validates the Distillation++ keyword arguments against the run's schedule.

    With no teacher and w None or 0 the plan guides nothing: the sampler is its plain baseline.
    """
    if teacher is not None:
        validation.check_callable("teacher", teacher)
        check_teacher(run.param, teacher)
    if teacher is not None and w is None:
        raise TypeError("w is required with a teacher: the teacher weight (the paper's lambda), e.g. w=0.1; "
                        "w=0 runs the plain sampler")
    validation.check_options("form", form, FORMS)
    validation.check_options("direction", direction, DIRECTIONS)
    validation.check_renoise(renoise)
    validation.check_optional_callable("renoise_sampler", renoise_sampler)
    validation.check_generator("renoise_generator", renoise_generator)
    validation.check_extra_args("teacher_extra_args", teacher_extra_args)
    weights = step_weights(w, guidance_steps, run.sigmas)
    if max(weights) > torch.finfo(run.dtype).max:
        raise ValueError(f"w={max(weights)} is beyond {run.dtype}'s range, in which the steps are computed; "
                         "the paper's weights are below 1: use a smaller w")
    if teacher is None and any(v > 0 for v in weights):
        raise TypeError("teacher is None but w asks for guidance: pass teacher=<the teacher denoiser>, "
                        "or leave w at 0 for the plain sampler")
    if form == "eps" and any(v > 0 and math.isinf(run.param.ve_sigma(s)) for v, s in zip(weights, run.sigmas)):
        raise ValueError("form='eps' cannot refine a step at s = 1 (sigma = infinity: the noise estimate fixes no x0); "
                         "guide from the next step on (guidance_steps=[1]), or use form='interpolate'")
    if form == "eps":
        warn_eps_scale(run, weights)
    if validation.is_real(renoise):
        run.param.check_renoise_level(float(renoise))
    ignored = [name for name, value in (("renoise", renoise != "next"), ("renoise_sampler", renoise_sampler is not None),
                                        ("renoise_generator", renoise_generator is not None)) if value]
    if form == "guidance" and ignored and any(v > 0 for v in weights):
        warnings.warn(f"form='guidance' calls the teacher at the student's own point: {' and '.join(ignored)} "
                      f"{'have' if len(ignored) > 1 else 'has'} no effect", GuidanceWarning, stacklevel=caller_stacklevel())
    elif renoise_sampler is not None and renoise_generator is not None and renoise != "random":
        warnings.warn("renoise_sampler draws the renoise noise, so renoise_generator, which would draw it otherwise "
                      "and only draws renoise='random''s level, has no effect", GuidanceWarning,
                      stacklevel=caller_stacklevel())
    if form != "guidance" and renoise == "next":
        last = [i for i, v in enumerate(weights) if v != 0.0 and run.sigmas[i + 1] == 0.0]
        if last:
            raise ValueError(
                f"step {last[0]} is guided with renoise='next', but its next sigma is 0: a teacher cannot "
                "denoise at sigma 0. Leave the last step unguided, or pass renoise='current' or a fixed sigma"
            )
    if form != "guidance":
        warn_pure_noise_renoise(run, weights, renoise)
    if teacher_extra_args is None and resolve_extra_args:
        teacher_extra_args = run.extra_args
    keyed = renoise_generator is None and default_generator and needs_generator(form, renoise, renoise_sampler,
                                                                                 weights)
    if keyed:
        renoise_generator = default_renoise_generator(run.x_in)
    return Guidance(teacher, weights, form, renoise, renoise_sampler, teacher_extra_args, run, direction,
                    renoise_generator, keyed)


# The eps form moves the estimate by w * sigma (eps_T - eps_s) (sigma in VE terms): the authors' eps-form
# weights (w ~ 0.01-0.03) are for VE consistency students, whose sigmas stop at ~15 (SD's 14.6). A flow
# run's VE sigma s / (1 - s) grows without bound towards s = 1 (999 at s = 0.999).
EPS_FORM_MAX_SIGMA = 20.0


def warn_eps_scale(run: Run, weights) -> None:
    """Warns when form='eps' guides a flow step whose VE sigma is far beyond the range its w values hold in."""
    if isinstance(run.param, VE):
        return
    far = [(i, s, run.param.ve_sigma(s)) for i, (v, s) in enumerate(zip(weights, run.sigmas))
           if v > 0 and EPS_FORM_MAX_SIGMA < run.param.ve_sigma(s) < math.inf]
    if far:
        i, s, ve = far[0]
        warnings.warn(f"form='eps' scales the teacher's shift by the VE sigma s / (1 - s) = {ve:.4g} at step {i} "
                      f"(s={s:.4g}): eps-form w values hold for VE sigmas up to ~{EPS_FORM_MAX_SIGMA:g} (s <= "
                      f"{EPS_FORM_MAX_SIGMA / (1 + EPS_FORM_MAX_SIGMA):.3f}); there use form='interpolate', guide a "
                      "later step, or scale w down by about that factor", GuidanceWarning, stacklevel=caller_stacklevel())


def scheduled_level(run: Run, renoise, i: int, sigma: float) -> float | None:
    """Step i's renoise level before the parametrization's fallback: the next sigma, the current one or the
    fixed level; None for 'random', which is drawn (Guidance.renoise_level)."""
    if renoise == "next":
        return run.sigmas[i + 1]
    if renoise == "current":
        return sigma
    return None if renoise == "random" else float(renoise)


def warn_pure_noise_renoise(run: Run, weights, renoise) -> None:
    """Warns when a guided step's renoise level is the parametrization's pure-noise level (a flow s = 1:
    'current' on a step from s = 1, such as a 1-step student's only step, or 'random' on a schedule whose
    only positive sigma is 1), which renoise_at replaces with its fallback."""
    positive = [s for s in run.sigmas if s > 0]

    def level(i):  # 'random' reaches 1 only when its lowest level does
        scheduled = scheduled_level(run, renoise, i, run.sigmas[i])
        return (positive[-1] if positive else 0.0) if scheduled is None else scheduled

    hit = [i for i, v in enumerate(weights) if v != 0.0 and run.param.renoise_at(level(i)) != level(i)]
    if hit:
        i = hit[0]
        warnings.warn(f"step {i} is guided with renoise={renoise!r}, whose level here is s = {level(i):g}: a "
                      "rectified-flow state there is pure noise, which holds nothing of the student's estimate; "
                      f"the teacher is handed it renoised at s = {run.param.renoise_at(level(i)):g} instead. To "
                      "choose otherwise: form 'guidance' (the teacher at the student's own point; the Form input "
                      "of the webui panel and of the ComfyUI nodes), or, calling a sampler directly, a fixed "
                      "renoise level in (0, 1)", GuidanceWarning, stacklevel=caller_stacklevel())


def needs_generator(form, renoise, renoise_sampler, weights) -> bool:
    """Whether a guided step draws from the renoise generator: the renoise noise (no renoise_sampler)
    or renoise='random''s level; form='guidance' draws nothing."""
    return form != "guidance" and (renoise_sampler is None or renoise == "random") and any(v > 0 for v in weights)


def unguided(run: Run) -> Guidance:
    """A plan that guides no step: the baseline sampler, with no teacher and no extra RNG draw."""
    return Guidance(None, (0.0,) * run.steps, "interpolate", "next", None, None, run)
