"""Forms and w (paper Fig. 6 analog): interpolate vs guidance vs eps over a w sweep, per student
kind and dimension, one guided step; and the gap between interpolate and guidance outputs.

Tuning seeds (100+) are kept apart from the quality table's evaluation seeds (0+), so the
defaults chosen here are checked on fresh seeds there.
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from common import KINDS, Config, karras, noise, pm, problem, reference, save_figure, sliced_w2, table, panels, mean_std

FORMS = ("interpolate", "guidance", "eps")
STEPS = 4


def w_grid(cfg: Config):
    return (0.0, 0.05, 0.1, 0.3, 0.5, 1.0) if cfg.quick else (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


def sweep_size(cfg: Config) -> int:
    """Sampler runs in one sweep."""
    return len(cfg.dims) * len(KINDS) * len(cfg.seeds) * len(FORMS) * len(w_grid(cfg))


def sweep(cfg: Config, progress: bool = True):
    """results[(kind, dim, form, w)] = list of sliced W2 over seeds."""
    seeds = tuple(100 + s for s in cfg.seeds)
    results = {}
    sigmas = karras(STEPS)
    bar = tqdm(total=sweep_size(cfg), desc="forms sweep", unit="run", file=sys.stdout, disable=not progress)
    for dim in cfg.dims:
        mixture = problem(dim)
        for kind in KINDS.values():
            student = kind.build(mixture, sigmas)
            for seed in seeds:
                ref = reference(cfg, mixture, seed)
                for form in FORMS:
                    for w in w_grid(cfg):
                        x = noise(cfg, dim, seed)
                        out = kind.sample(student, mixture, x, sigmas, w=w, form=form)
                        results.setdefault((kind.name, dim, form, w), []).append(sliced_w2(out, ref))
                        bar.update()
    bar.close()
    return results


def best_settings(results, cfg: Config):
    """Per kind: the (form, w) with the lowest mean sliced W2 summed over dimensions."""
    best = {}
    for kind in KINDS:
        candidates = {(form, w): sum(mean_std(results[(kind, d, form, w)])[0] for d in cfg.dims)
                      for form in FORMS for w in w_grid(cfg)}
        best[kind] = min(candidates, key=candidates.get)
    return best


def interpolate_guidance_gap(cfg: Config):
    """Mean per-sample distance between interpolate and guidance outputs from the same noise, next
    to the student-teacher distance (progressive student, 2-D)."""
    mixture, sigmas = problem(2), karras(STEPS)
    kind = KINDS["progressive"]
    student = kind.build(mixture, sigmas)
    rows = []
    for w in w_grid(cfg)[1:]:
        gaps = []
        for seed in cfg.seeds:
            outs = {}
            for form in ("interpolate", "guidance"):
                outs[form] = kind.sample(student, mixture, noise(cfg, 2, seed), sigmas, w=w, form=form)
            gaps.append(float((outs["interpolate"] - outs["guidance"]).norm(dim=-1).mean()))
        rows.append([w, pm(gaps)])
    base = []
    for seed in cfg.seeds:
        s = kind.sample(student, mixture, noise(cfg, 2, seed), sigmas)
        t = kind.sample(mixture, mixture, noise(cfg, 2, seed), sigmas)
        base.append(float((s - t).norm(dim=-1).mean()))
    return rows, pm(base)


def plot(results, cfg: Config):
    fig, grid = panels(cfg, "w")
    ws = w_grid(cfg)
    for ax, dim, kind in grid:
        for form in FORMS:
            stats = [mean_std(results[(kind.name, dim, form, w)]) for w in ws]
            ax.errorbar(ws, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", ms=3, capsize=2, label=form)
    grid[0][0].legend(fontsize=8)
    fig.suptitle(f"One guided step, {STEPS}-step students: distance to data vs w (lower is better)")
    return save_figure(fig, "forms_w.png")


def run(cfg: Config) -> tuple[str, dict]:
    results = sweep(cfg)
    best = best_settings(results, cfg)
    path = plot(results, cfg)
    ws = w_grid(cfg)
    rows = []
    for kind in KINDS.values():
        for dim in cfg.dims:
            for form in FORMS:
                rows.append([kind.label, dim, form] + [f"{mean_std(results[(kind.name, dim, form, w)])[0]:.3f}" for w in ws])
    gap_rows, base = interpolate_guidance_gap(cfg)
    lines = [
        "## Forms and w (Fig. 6 analog)", "",
        f"One guided step on {STEPS}-step students; sliced W2 to data samples, mean over {len(cfg.seeds)} tuning seeds "
        f"(100-{99 + len(cfg.seeds)}), {cfg.n} samples each. w = 0 is the plain student.", "",
        f"![forms vs w](img/{path.rsplit('/', 1)[-1]})", "",
        table(["student", "dim", "form"] + [f"w={w:g}" for w in ws], rows), "",
        "Best (form, w) per student kind on these seeds (lowest sliced W2 summed over dimensions):", "",
        table(["student", "form", "w"], [[KINDS[k].label, f, w] for k, (f, w) in best.items()]), "",
        "Interpolate vs guidance outputs from the same noise (progressive student, 2-D): mean per-sample distance "
        f"between the two forms' samples, next to the student-teacher distance ({base}).", "",
        table(["w", "mean distance interpolate to guidance"], gap_rows),
    ]
    return "\n".join(lines), best

