"""Quality table (paper Table 1 analog): student, student++ (one guided step), the same refinement
with the student as its own teacher (a control: what the teacher adds beyond the refinement's
own noise), the teacher at the same NFE, and the converged teacher; per student kind and
dimension, mean ± std over the evaluation seeds.
"""

from __future__ import annotations

import torch

import kdistpp

from common import (KINDS, SIGMA_MAX, Config, Counted, converged_teacher, karras, noise, pm, problem, reference, score,
                    table)

STEPS = 4
METRICS = ("sliced_w2", "energy", "mode_tv")


def methods(kind, mixture, sigmas, form, w, converged):
    """(name, thunk(x) -> (samples, NFE)) for each row; `converged(x)` is the converged teacher's output."""
    student = kind.build(mixture, sigmas)

    def counted(fn):
        def go(x):
            s, t = Counted(student), Counted(mixture)
            out = fn(x, s, t)
            return out, s.calls + t.calls

        return go

    def teacher_same_nfe(sampler, nfe):
        def go(x):
            t = Counted(mixture)
            return sampler(t, x, karras(nfe), disable=True, teacher=t, w=0.0), t.calls

        return go

    guided = counted(lambda x, s, t: kind.sample(s, t, x, sigmas, w=w, form=form))
    nfe_pp = guided(torch.zeros(2, mixture.dim) + SIGMA_MAX)[1]  # the teacher rows get exactly this budget
    return [
        ("student", counted(lambda x, s, t: kind.sample(s, t, x, sigmas))),
        (f"student++ ({form}, w={w:g})", guided),
        ("control: same refinement, student as teacher",
         counted(lambda x, s, t: kind.sample(s, s, x, sigmas, w=w, form=form))),  # s counts its teacher calls too
        ("teacher, Euler, same NFE", teacher_same_nfe(kdistpp.sample_euler_distpp, nfe_pp)),
        ("teacher, DPM++ 2M, same NFE", teacher_same_nfe(kdistpp.sample_dpmpp_2m_distpp, nfe_pp)),
        ("teacher, Heun, 100 steps (converged)", lambda x: (converged(x), 199)),
    ]


def fresh_data(cfg, mixture, seed):
    return mixture.sample(cfg.n, torch.Generator().manual_seed(30_000 + seed), device=cfg.device)


def run(cfg: Config, settings: dict) -> str:
    sigmas = karras(STEPS)
    sections = ["## Quality (Table 1 analog)", "",
                f"{STEPS}-step students, one guided step with the (form, w) the forms sweep picked on its tuning seeds; "
                f"evaluation seeds {cfg.seeds[0]}-{cfg.seeds[-1]}, {cfg.n} samples each, distances to fresh data samples "
                "(lower is better; mode TV = total variation between mode weights). NFE counts student and teacher "
                "calls. The control row applies the same refinement with the student in the teacher's place: "
                "whatever it gains is not the teacher's doing.", ""]
    converged = {dim: [] for dim in cfg.dims}  # (x_T, samples): the converged teacher's row is the same for every kind

    def converged_for(dim, mixture):
        def go(x):
            for x_seen, out in converged[dim]:
                if torch.equal(x_seen, x):
                    return out
            converged[dim].append((x, converged_teacher(mixture, x)))
            return converged[dim][-1][1]
        return go

    for kind in KINDS.values():
        form, w = settings[kind.name]
        rows = []
        for dim in cfg.dims:
            mixture = problem(dim)
            scores = {}
            for name, fn in methods(kind, mixture, sigmas, form, w, converged_for(dim, mixture)):
                for seed in cfg.seeds:
                    out, nfe = fn(noise(cfg, dim, seed))
                    scores.setdefault((name, nfe), []).append(score(out, reference(cfg, mixture, seed), mixture))
            scores[("data vs data (noise floor)", 0)] = [score(fresh_data(cfg, mixture, s), reference(cfg, mixture, s), mixture)
                                                           for s in cfg.seeds]
            for (name, nfe), runs in scores.items():
                rows.append([dim, name, nfe] + [pm(r[m] for r in runs) for m in METRICS])
        sections += [f"### {kind.label}", "", table(["dim", "method", "NFE", "sliced W2", "energy", "mode TV"], rows), ""]
    return "\n".join(sections)
