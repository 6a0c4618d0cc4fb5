"""k-diffusion-style samplers with the Distillation++ refinement (Park et al. 2024).

Each `sample_*_distpp` is its k-diffusion baseline plus the refinement: `g = guide.refine(...)`
right after the student's denoiser call; the update reads `g.estimate`, and `g.carry(x)` adds the
refinement's shift to the new state (direction='student': the unguided update shifted by
x0h - x0s, as the authors' samplers do). Signatures keep k-diffusion's order, and the
Distillation++ parameters are keyword-only.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from . import validation
from .refine import plan, unguided
from .steps import cfg_pp_state, log_sigma_gap, prepare

_DISTPP_PARAMETERS = """
    Distillation++ keyword-only parameters (docs/samplers.md has each update with the math):
        teacher: the teacher denoiser, same convention as `model`: D(x, sigma, **extra) -> x0.
            None (default) with w None or 0: the plain sampler, with no teacher.
        w: teacher weight (the paper's lambda): a float for every guided step, or one value per
            step (a list, tuple, 1-D tensor or array; missing trailing values are 0). 0 = baseline.
            Required with a teacher.
        guidance_steps: which steps are guided. None (default): the first step for a float w (the
            paper's setting), the steps with w > 0 for a w list. int N = the first N steps;
            a collection of step indices; or kdistpp.SigmaWindow(lo, hi): every step with
            lo <= sigma_i <= hi. A w > 0 that reaches no step warns (kdistpp.GuidanceWarning);
            a w list positive on a step outside guidance_steps is an error.
        form: 'interpolate' (eq. 9, default), 'guidance' (eq. 10: teacher at the student's own
            point), or 'eps' (eps-mixing, as the authors use for consistency students).
        renoise: the renoise level sigma_r: 'next' = sigma_{i+1} (default), 'current', 'random'
            (log-uniform over the schedule) or a fixed sigma > 0. Ignored by form='guidance'.
        renoise_sampler: (sigma, sigma_next) -> unit noise for the renoised point
            x0s + sigma_r * noise; default: drawn from renoise_generator.
        renoise_generator: a torch.Generator for the renoise noise (when renoise_sampler is None)
            and renoise='random''s level. Default: a generator of its own, seeded from the global
            RNG's state at the start of the run without advancing it, its noise's signs and its
            'random' level keyed to the state at each guided step (another x, another noise and
            level; the level stays log-uniform); either way guiding leaves
            the global RNG, and with it the sampler's own noise, untouched (same seed, w=0 vs w>0
            differ by the teacher alone).
        teacher_extra_args: the teacher's keyword arguments (default: extra_args).
        direction: 'student' (default, the authors' update): the step keeps the student's noise
            direction and only the clean estimate is replaced, i.e. the unguided step shifted by
            x0h - x0s, so w means what it meant in the paper's runs. 'refined': x0h replaces the
            estimate everywhere (k-diffusion's reading of eq. 9; on Euler the shift is scaled by
            1 - sigma_{i+1}/sigma_i).
        parametrization: 've' (k-diffusion's x = x0 + sigma n) or 'flow' (rectified flow,
            x = (1 - s) x0 + s n, sigmas s in [0, 1] as the host gives them: Flux, SD3, Wan...).
            None (default): what the model declares as its `parametrization` attribute (kdistpp's
            flow adapters declare 'flow'), else 've'; a value contradicting the model's or the
            teacher's declaration is a ValueError, and a default VE run over sigmas that look
            like a flow schedule (1.0 down to 0) warns (kdistpp.ParametrizationWarning).
            With 'flow' the ancestral steps are ComfyUI's *_RF ones and the renoise is
            (1 - s_r) x0s + s_r n; docs/samplers.md has the derivation.
    The callback's 'denoised' is the refined estimate; guided steps add 'student_denoised' and
    'teacher_denoised'. A guided step costs one teacher call; unguided steps cost nothing extra.
    The student's and teacher's outputs are checked (a tensor of the latent's shape, finite):
    kdistpp.StudentOutputError / kdistpp.TeacherOutputError name the model, step and sigma. The
    finiteness is read from the device once at the end of the run and after each guided step.
"""

_CFG_PP_PARAMETER = """        cfg_pp: CFG++ (Chung et al. 2024): renoise along the student's unconditional estimate,
            which the model must expose as `last_uncond_denoised` (see kdistpp.CFGDenoiser).
"""


def _documented(cfg_pp: bool = True):
    def attach(fn):
        fn.__doc__ += _DISTPP_PARAMETERS + (_CFG_PP_PARAMETER if cfg_pp else "")
        return fn

    return attach


@_documented()
@torch.no_grad()
def sample_euler_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0.0, s_tmin=0.0,
                        s_tmax=float("inf"), s_noise=1.0, *, teacher=None, w=None, guidance_steps=None, form="interpolate",
                        renoise="next", renoise_sampler=None, teacher_extra_args=None, cfg_pp=False,
                        direction="student", renoise_generator=None, parametrization=None):
    """Euler steps (Karras et al. 2022, Algorithm 2) with the Distillation++ refinement (eq. 9).

    x_{i+1} = x0h + sigma_{i+1} * (x_i - x0s) / sigma_hat (direction='student'), or with x0h in
    place of x0s (direction='refined').
    """
    run = prepare(model, x, sigmas, extra_args, cfg_pp=cfg_pp, parametrization=parametrization, s_churn=s_churn,
                  s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    guide = plan(run, teacher, w, guidance_steps, form, renoise, renoise_sampler, teacher_extra_args, direction,
                 renoise_generator)
    x, sig = run.start(), run.sigmas
    for i in trange(run.steps, disable=disable):
        gamma = min(s_churn / run.steps, 2**0.5 - 1) if s_tmin <= sig[i] <= s_tmax else 0.0
        sigma_hat = sig[i] * (gamma + 1)
        if gamma > 0:
            eps = torch.randn_like(run.x_in).to(run.dtype) * s_noise
            x = x + eps * (sigma_hat**2 - sig[i] ** 2) ** 0.5
        denoised = run.denoise(x, sigma_hat)
        g = guide.refine(i, x, sigma_hat, denoised)
        run.report(callback, i, x, g, sigma_hat=run.sigmas_in[i] * (gamma + 1))
        # Euler method
        x = cfg_pp_state(run, x, g.estimate, cfg_pp)
        x = g.carry(x + (x - g.estimate) / sigma_hat * (sig[i + 1] - sigma_hat), sig[i + 1])
    return run.finish(x)


@_documented()
@torch.no_grad()
def sample_euler_ancestral_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                  s_noise=1.0, noise_sampler=None, *, teacher=None, w=None, guidance_steps=None,
                                  form="interpolate", renoise="next", renoise_sampler=None,
                                  teacher_extra_args=None, cfg_pp=False, direction="student",
                                  renoise_generator=None, parametrization=None):
    """Ancestral sampling with Euler steps, with the Distillation++ refinement (eq. 9).

    x_{i+1} = x0h + sigma_down * (x_i - x0s) / sigma_i + sigma_up * n (direction='student'; x0h in
    place of x0s for 'refined'). The default renoise level sigma_{i+1} is the total noise level
    the ancestral step lands on.
    """
    run = prepare(model, x, sigmas, extra_args, noise_sampler, cfg_pp=cfg_pp, parametrization=parametrization, eta=eta,
                  s_noise=s_noise)
    guide = plan(run, teacher, w, guidance_steps, form, renoise, renoise_sampler, teacher_extra_args, direction,
                 renoise_generator)
    x, sig = run.start(), run.sigmas
    for i in trange(run.steps, disable=disable):
        denoised = run.denoise(x, sig[i])
        g = guide.refine(i, x, sig[i], denoised)
        sigma_down, sigma_up, scale = run.param.ancestral_step(sig[i], sig[i + 1], eta)
        run.report(callback, i, x, g)
        # Euler method
        x = cfg_pp_state(run, x, g.estimate, cfg_pp)
        x = g.carry(x + (x - g.estimate) / sig[i] * (sigma_down - sig[i]), sigma_down)
        if sig[i + 1] > 0:
            x = scale * x + run.noise(i) * s_noise * sigma_up
    return run.finish(x)


@_documented()
@torch.no_grad()
def sample_dpmpp_2s_ancestral_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0,
                                     s_noise=1.0, noise_sampler=None, *, teacher=None, w=None, guidance_steps=None,
                                     form="interpolate", renoise="next", renoise_sampler=None,
                                     teacher_extra_args=None, cfg_pp=False, direction="student",
                                     guided_evaluation="midpoint", renoise_generator=None, parametrization=None):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022) with the Distillation++ refinement (paper eq. 12).

    guided_evaluation='midpoint' (default, the authors' choice): the midpoint is built from the
    student's raw first estimate and the midpoint estimate D_2, which the update reads, is refined
    (one teacher call per guided step). 'first': the first estimate is refined and moves the
    midpoint; it reaches the output only through the student's Jacobian there, so its effect is
    smaller and model-dependent (0.2-0.3x on the benchmark toy; docs/samplers.md). 'both': both evaluations are refined (two teacher calls per guided
    step) and the midpoint is built from the refined first estimate; this is not the authors' code
    path, which calls the teacher twice but uses the first result only when sigma_down = 0. A step
    with sigma_down = 0 has no midpoint: its one evaluation is refined.
    """
    validation.check_options("guided_evaluation", guided_evaluation, ("midpoint", "first", "both"))
    run = prepare(model, x, sigmas, extra_args, noise_sampler, cfg_pp=cfg_pp, parametrization=parametrization, eta=eta,
                  s_noise=s_noise)
    run.param.check_midpoint_eta(run.sigmas, float(eta))
    guide = plan(run, teacher, w, guidance_steps, form, renoise, renoise_sampler, teacher_extra_args, direction,
                 renoise_generator)
    x, sig = run.start(), run.sigmas
    for i in trange(run.steps, disable=disable):
        sigma_down, sigma_up, scale = run.param.ancestral_step(sig[i], sig[i + 1], eta)
        denoised = run.denoise(x, sig[i])
        g = guide.refine(i, x, sig[i], denoised, active=sigma_down == 0 or guided_evaluation != "midpoint")
        run.report(callback, i, x, g)
        if sigma_down == 0:
            # Euler method
            x_hat = cfg_pp_state(run, x, g.estimate, cfg_pp)
            x = g.carry(x_hat + (x_hat - g.estimate) / sig[i] * (sigma_down - sig[i]), sigma_down)
        else:
            # DPM-Solver++(2S)
            h = log_sigma_gap(sig[i], sigma_down)
            sigma_s, h_s = run.param.midpoint(sig[i], sigma_down)
            x_2 = g.carry((sigma_s / sig[i]) * cfg_pp_state(run, x, g.estimate, cfg_pp) - math.expm1(-h_s) * g.estimate,
                          sigma_s)
            denoised_2 = run.denoise(x_2, sigma_s)
            g_2 = guide.refine(i, x_2, sigma_s, denoised_2, active=guided_evaluation != "first")
            # CFG++ renoises along the midpoint's unconditional estimate here, as ComfyUI's 2S a CFG++ does
            x = g_2.carry((sigma_down / sig[i]) * cfg_pp_state(run, x, g.estimate, cfg_pp) - math.expm1(-h) * g_2.estimate,
                          sigma_down)
        # Noise addition
        if sig[i + 1] > 0:
            x = scale * x + run.noise(i) * s_noise * sigma_up
    return run.finish(x)


@_documented()
@torch.no_grad()
def sample_dpmpp_2m_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, teacher=None, w=None,
                           guidance_steps=None, form="interpolate", renoise="next", renoise_sampler=None,
                           teacher_extra_args=None, cfg_pp=False, direction="student", history="student",
                           renoise_generator=None, parametrization=None):
    """DPM-Solver++(2M) (Lu et al. 2022) with the Distillation++ refinement (eq. 9).

    direction='student' (default, the authors' 2M++): the unguided update from the student's raw
    estimate, shifted by x0h - x0s. 'refined': x0h is the anchor of the update. history='student'
    (default) keeps the student's raw estimate in the multistep history, so that the next step's
    correction (D_{i+1} - D_i) / (2r) stays a finite difference of one denoiser along the
    trajectory; history='refined' stores x0h instead. With cfg_pp the history is the student's
    unconditional estimate, as in CFG++ and ComfyUI's dpmpp_2m_cfg_pp.
    """
    validation.check_options("history", history, ("student", "refined"))
    run = prepare(model, x, sigmas, extra_args, cfg_pp=cfg_pp, parametrization=parametrization)
    guide = plan(run, teacher, w, guidance_steps, form, renoise, renoise_sampler, teacher_extra_args, direction,
                 renoise_generator)
    x, sig = run.start(), run.sigmas
    old_denoised = None
    for i in trange(run.steps, disable=disable):
        denoised = run.denoise(x, sig[i])
        g = guide.refine(i, x, sig[i], denoised)
        run.report(callback, i, x, g)
        x = cfg_pp_state(run, x, g.estimate, cfg_pp)
        h = log_sigma_gap(sig[i], sig[i + 1])
        h_last = log_sigma_gap(sig[i - 1], sig[i]) if i > 0 else 0.0
        # First order on the first and last steps, and next to a repeated sigma (a step of size 0
        # leaves x as it is, and the step ratio r = h_last / h is undefined beside it).
        if old_denoised is None or sig[i + 1] == 0 or h == 0 or h_last == 0:
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * g.estimate
        else:
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * g.estimate - (1 / (2 * r)) * old_denoised
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * denoised_d
        x = g.carry(x, sig[i + 1])
        old_denoised = run.uncond() if cfg_pp else denoised if history == "student" else g.denoised
    return run.finish(x)


@torch.no_grad()
def sample_consistency(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, *,
                       parametrization=None):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1; LCM, DMD2): denoise, then
    renoise the estimate to sigma_{i+1} with fresh noise. Returns the last estimate when the
    schedule ends at 0. parametrization='flow' renoises as (1 - s) x0 + s n (flow models' LCM)."""
    run = prepare(model, x, sigmas, extra_args, noise_sampler, parametrization=parametrization)
    return _consistency_loop(run, unguided(run), callback, disable)


@_documented(cfg_pp=False)
@torch.no_grad()
def sample_consistency_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None,
                              *, teacher=None, w=None, guidance_steps=None, form="interpolate", renoise="next",
                              renoise_sampler=None, teacher_extra_args=None, direction="student",
                              renoise_generator=None, parametrization=None):
    """Multistep consistency sampling with the Distillation++ refinement (paper Sec. 3.1, Remarks).

    x_{i+1} = x0h + sigma_{i+1} * n', with n' independent of the renoise noise. form='eps' is
    the authors' choice for LCM / DMD2 students (its w is about sigma_i / sigma_r larger in effect).
    """
    run = prepare(model, x, sigmas, extra_args, noise_sampler, parametrization=parametrization)
    guide = plan(run, teacher, w, guidance_steps, form, renoise, renoise_sampler, teacher_extra_args, direction,
                 renoise_generator)
    return _consistency_loop(run, guide, callback, disable)


def _consistency_loop(run, guide, callback, disable):
    x, sig = run.start(), run.sigmas
    for i in trange(run.steps, disable=disable):
        denoised = run.denoise(x, sig[i])
        g = guide.refine(i, x, sig[i], denoised)
        run.report(callback, i, x, g)
        # Denoise, then renoise to the next level with fresh noise (both directions give x0h)
        x = g.carry(g.estimate, 0.0)
        if sig[i + 1] > 0:
            x = run.param.noise_scaling(sig[i + 1], run.noise(i), x)
    return run.finish(x)
