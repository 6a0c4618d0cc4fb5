"""How far one guided step moves the sampler's state, per unit of the refinement w (x0T - x0s).

The paper's w was tuned with the authors' update, which keeps the student's noise direction and
shifts the step by the whole refinement: displacement / (w |x0T - x0s|) = 1. Recomputing the
direction from the refined estimate (direction='refined', and what `teacher_guided` does) scales it
by the update's weight on the estimate. Measured on SDXL-Lightning's 4-step schedule (trailing
timesteps 999/749/499/249 of SD's scaled-linear betas) with a mode-biased 16-D toy student and
its exact teacher, first step guided, w = 0.1; the ratio is the mean over samples of
|x1 guided - x1 unguided| / (w |x0T - x0s|), x0s being the estimate the teacher refined.
"""

from __future__ import annotations

import math

import torch

import common
import kdistpp
from kdistpp import toys

W = 0.1


def lightning_sigmas() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    sigmas = ((1 - alphas) / alphas).sqrt()
    return torch.cat([sigmas[[999, 749, 499, 249]], sigmas.new_zeros(1)]).float()


class Recorder:
    def __init__(self, model):
        self.model, self.inputs = model, []

    def __call__(self, x, sigma, **kw):
        self.inputs.append((x.clone(), float(sigma.reshape(-1)[0])))
        return self.model(x, sigma, **kw)


def renoise(seed, shape, device):
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, device=device)


def displacement(name, options, n, device) -> float:
    mixture = common.problem(16)
    student = toys.mode_biased_student(mixture)
    sigmas = lightning_sigmas()
    x = torch.randn(n, 16, generator=torch.Generator().manual_seed(0)).to(device) * float(sigmas[0])
    fn = kdistpp.SAMPLERS[name]

    def first_state(w, teacher):
        seen = []
        torch.manual_seed(1)
        fn(student, x, sigmas, teacher=teacher, w=w, renoise_sampler=renoise(2, x.shape, device),
           callback=lambda d: seen.append(d["x"]), disable=True, **options)
        return seen[1]

    plain = first_state(0.0, mixture)
    teacher = Recorder(mixture)
    guided = first_state(W, teacher)
    noise = renoise(2, x.shape, device)
    refinements = []
    for x_r, sigma_r in teacher.inputs:  # x_r = x0s + sigma_r n: recover the x0s each call refined
        x0s = x_r - sigma_r * noise(None, None)
        refinements.append(mixture(x_r, torch.full((n,), sigma_r, device=device)) - x0s)
    delta = refinements[-1]  # 2S a 'both': the midpoint's, which the update reads
    return float(((guided - plain).norm(dim=1) / (W * delta.norm(dim=1))).mean())


def rows(n, device):
    cases = [("euler", {}), ("euler_ancestral", {}), ("dpmpp_2m", {}), ("consistency", {}),
             ("dpmpp_2s_ancestral", {"guided_evaluation": "midpoint"}),
             ("dpmpp_2s_ancestral", {"guided_evaluation": "first"}),
             ("dpmpp_2s_ancestral", {"guided_evaluation": "both"})]
    out = []
    for name, options in cases:
        label = name + (f" ({options['guided_evaluation']})" if options else "")
        ratios = [displacement(name, {**options, "direction": d}, n, device) for d in kdistpp.DIRECTIONS]
        out.append([label] + [f"{r:.3f}" for r in ratios])
    return out


def run(cfg) -> str:
    sig = [float(s) for s in lightning_sigmas()]
    body = common.table(["sampler", "direction='student' (default)", "direction='refined'"], rows(cfg.n, cfg.device))
    return "\n".join([
        "## One guided step: displacement per unit w", "",
        __doc__.split("\n\n")[1].replace("\n", " "), "",
        f"Schedule sigmas: {', '.join(f'{s:.3f}' for s in sig)}; Euler's 'refined' factor 1 - sigma_1/sigma_0 = "
        f"{1 - sig[1] / sig[0]:.3f}.", "", body, "",
        "2S a 'first' refines the first estimate, which reaches the output only through the student's "
        "response at the midpoint; 'midpoint' (default) and 'both' refine the estimate the update reads.",
    ])
