"""Renoise ablation (paper Table 3 analog): the level sigma_r the student's estimate is renoised to
before the teacher denoises it, and which step is guided. Each student kind keeps the (form, w)
the forms sweep picked; 4-step students, one guided step unless stated.
"""

from __future__ import annotations

from common import KINDS, Config, karras, noise, pm, problem, reference, sliced_w2, table

STEPS = 4
LEVELS = ("next", "current", "random", 1.0, 10.0)
STEP_CHOICES = ([0], [1], [2], [0, 1])


def run(cfg: Config, settings: dict) -> str:
    sigmas = karras(STEPS)
    level_rows, step_rows = [], []
    for dim in cfg.dims:
        mixture = problem(dim)
        for kind in KINDS.values():
            form, w = settings[kind.name]
            student = kind.build(mixture, sigmas)
            by_level, by_step = {}, {}
            for seed in cfg.seeds:
                ref = reference(cfg, mixture, seed)
                for level in LEVELS:
                    # the guidance form calls the teacher at the student's own point: no level to set (same numbers)
                    renoise = {} if form == "guidance" else {"renoise": level}
                    out = kind.sample(student, mixture, noise(cfg, dim, seed), sigmas, w=w, form=form, **renoise)
                    by_level.setdefault(level, []).append(sliced_w2(out, ref))
                for steps in STEP_CHOICES:
                    out = kind.sample(student, mixture, noise(cfg, dim, seed), sigmas, w=w, form=form, guidance_steps=steps)
                    by_step.setdefault(str(steps), []).append(sliced_w2(out, ref))
                base = sliced_w2(kind.sample(student, mixture, noise(cfg, dim, seed), sigmas), ref)
                by_level.setdefault("student (no guidance)", []).append(base)
            level_rows.append([kind.label, dim, f"{form}, {w:g}"] + [pm(by_level[k]) for k in ("student (no guidance)",) + LEVELS])
            step_rows.append([kind.label, dim, f"{form}, {w:g}"] + [pm(v) for v in by_step.values()])
    levels = "sigma levels of this schedule: " + ", ".join(f"{s:.3g}" for s in sigmas.tolist())
    return "\n".join([
        "## Renoise level and guided step (Table 3 analog)", "",
        f"Sliced W2 to data, mean ± std over {len(cfg.seeds)} seeds, {cfg.n} samples; {STEPS}-step students ({levels}). "
        "'next' = sigma_{i+1} (the paper's decreasing schedule, default), 'current' = sigma_i, 'random' = "
        "log-uniform over the schedule, numbers = a fixed sigma_r.", "",
        table(["student", "dim", "form, w", "student", "next", "current", "random", "fixed 1.0", "fixed 10.0"], level_rows), "",
        "Which step is guided (renoise 'next'); steps are 0-based, [0, 1] costs two teacher calls:", "",
        table(["student", "dim", "form, w"] + [f"guided {s}" for s in STEP_CHOICES], step_rows),
    ])
