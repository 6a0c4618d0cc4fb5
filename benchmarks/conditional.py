"""Conditional generation with a CFG teacher, where the paper claims its gains (exact toys).

The problem: class-conditional ring mixtures (4 classes x 3 modes, neighbouring modes of different
classes) in 2-D and 16-D, whose conditional and unconditional denoisers are exact, so the CFG
teacher U + s (C - U) is exact at any scale s. The target is what the converged CFG teacher
samples per class (Heun, 100 steps, at the teacher's scale). Students imitate the guided teacher
imperfectly (kdistpp.conditional_toys.students): guidance distilled too weak or too strong, modes
dropped within a class, classes blurred into their neighbour, each distilled to the few-step
schedule it samples with (a progressive-style student of the imitated model, Euler sampler), and
consistency-style collapse (multistep consistency sampler). They run at "CFG 1" (one call a step);
the teacher's guided call costs 2 NFE (its cond+uncond batch).

Metrics, mean ± std over seeds: per-class sliced W2 to the converged teacher's samples of that
class (averaged over classes), class adherence (the exact posterior probability of the intended
class, averaged), and within-class spread relative to the target's (1 = same diversity; a student
that collapses a class to win on adherence shows < 1).

(form, w) per student are tuned on seeds 100+ and reported on seeds 0+.
"""

from __future__ import annotations

import dataclasses

import torch

import kdistpp
from common import SIGMA_MAX, SIGMA_MIN, Config, karras, mean_std, noise, pm, pyplot, sample_heun, save_figure, table
from kdistpp import metrics, toys
from kdistpp.guided_steps import guided_step_indices
from kdistpp.conditional_toys import class_rings, students, within_class_spread

SCALE = 3.0  # the teacher's CFG scale, as SDXL teachers run at 5-7.5 on their own scale
STEPS = 4
FORMS = ("interpolate", "guidance", "eps")
SAMPLERS = {"consistency collapse": kdistpp.sample_consistency_distpp}  # the rest: Euler (Lightning-style)
DISTILL_SUBSTEPS = 4  # teacher Euler substeps per student step when distilling: a small distillation error
RENOISE = ("next", "current", "random", 1.0, 10.0)
WINDOWS = ((5.0, SIGMA_MAX), (1.0, 5.0), (0.1, 1.0))  # sigma bands of the 8-step schedule (3, 2, 2 steps)


def sized(cfg: Config) -> Config:
    """This section's own sizes: its per-class metrics need fewer samples than the unconditional tables,
    and its sweeps are larger (5 students x 3 forms x w)."""
    if cfg.tiny:  # the smoke test
        return dataclasses.replace(cfg, n=100, seeds=(0, 1))
    if cfg.quick:
        return dataclasses.replace(cfg, n=300, seeds=(0, 1))
    return dataclasses.replace(cfg, n=2000)


def w_grid(cfg: Config):
    if cfg.tiny:
        return (0.0, 0.3)
    return (0.0, 0.1, 0.3, 1.0) if cfg.quick else (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)


class Setup:
    """One problem (dimension) with its labels, noise, targets and students."""

    def __init__(self, cfg: Config, dim: int):
        self.cfg, self.dim = cfg, dim
        self.problem = class_rings(n_classes=4, modes_per_class=3, dim=dim, seed=dim)
        self.labels = (torch.arange(cfg.n) % self.problem.n_classes).to(cfg.device)
        self.teacher = self.problem.cfg(SCALE)
        self.students = students(self.problem, SCALE)
        self._targets = {}

    def target(self, seed: int):
        """The converged CFG teacher's samples, from noise independent of the students'."""
        if seed not in self._targets:
            g = torch.Generator().manual_seed(40_000 + seed)
            x = torch.randn(self.cfg.n, self.dim, generator=g).to(self.cfg.device) * SIGMA_MAX
            model = lambda x, s: self.teacher(x, s, label=self.labels)  # noqa: E731
            self._targets[seed] = sample_heun(model, x, kdistpp.get_sigmas_karras(100, 0.002, SIGMA_MAX))
        return self._targets[seed]

    def student(self, name: str, sigmas):
        """The imitation, distilled to this schedule the way Lightning-style students are (a few-step flow of
        the imitated model); the consistency one predicts endpoints and needs no schedule."""
        model = self.students[name]
        return model if name in SAMPLERS else toys.ProgressiveStudent(model, sigmas[:-1], substeps=DISTILL_SUBSTEPS)

    def sample(self, name: str, seed: int, steps: int = STEPS, teacher=None, control=False, **distpp):
        """control=True: the same refinement with the student as its own teacher (what it gains is not
        the teacher's doing, e.g. the eps form's noise re-draw)."""
        sampler = SAMPLERS.get(name, kdistpp.sample_euler_distpp)
        sigmas = karras(steps)
        student = self.student(name, sigmas)
        distpp.setdefault("w", 0.0)
        return sampler(student, noise(self.cfg, self.dim, seed), sigmas, {"label": self.labels}, disable=True,
                       teacher=student if control else teacher or self.teacher, **distpp)

    def score(self, samples, seed: int) -> dict:
        ref, classes = self.target(seed), self.problem.n_classes
        w2 = [metrics.sliced_wasserstein(samples[self.labels == c], ref[self.labels == c]) for c in range(classes)]
        adherence = self.problem.class_posterior(samples).gather(1, self.labels.reshape(-1, 1)).mean()
        spread = within_class_spread(samples, self.labels, classes) / within_class_spread(ref, self.labels, classes)
        return {"w2": sum(w2) / classes, "adherence": float(adherence), "spread": float(spread.mean())}


def tuning_seeds(cfg: Config):
    return tuple(100 + s for s in cfg.seeds)


def sweep(setups, cfg: Config):
    """results[(student, dim, form, w)] = per-class W2 over tuning seeds (the Fig. 6 analog)."""
    results = {}
    for setup in setups:
        for name in setup.students:
            for seed in tuning_seeds(cfg):
                for form in FORMS:
                    for w in w_grid(cfg):
                        out = setup.sample(name, seed, w=w, form=form)
                        results.setdefault((name, setup.dim, form, w), []).append(setup.score(out, seed)["w2"])
    return results


def best_settings(results, setups, cfg: Config):
    """Per student: the (form, w) with the lowest mean per-class W2 summed over dimensions."""
    best = {}
    for name in setups[0].students:
        candidates = {(form, w): sum(mean_std(results[(name, s.dim, form, w)])[0] for s in setups)
                      for form in FORMS for w in w_grid(cfg)}
        best[name] = min(candidates, key=candidates.get)
    return best


def collect(runs):
    """runs: list of score dicts -> 'w2 / adherence / spread' cells."""
    return [pm([r[k] for r in runs]) for k in ("w2", "adherence", "spread")]


def table_1(setups, cfg: Config, best):
    """Student vs student++ at the same steps, and the student given the guided run's NFE in steps."""
    rows = []
    for setup in setups:
        for name in setup.students:
            form, w = best[name]
            runs = {"student": [], "student++": [], "control: student as teacher": [], "student, +1 step": [],
                    "student, +2 steps": []}
            for seed in cfg.seeds:
                runs["student"].append(setup.score(setup.sample(name, seed), seed))
                runs["student++"].append(setup.score(setup.sample(name, seed, w=w, form=form), seed))
                runs["control: student as teacher"].append(
                    setup.score(setup.sample(name, seed, w=w, form=form, control=True), seed))
                runs["student, +1 step"].append(setup.score(setup.sample(name, seed, steps=STEPS + 1), seed))
                runs["student, +2 steps"].append(setup.score(setup.sample(name, seed, steps=STEPS + 2), seed))
            for label, scores in runs.items():
                nfe = {"student": STEPS, "student++": STEPS + 2, "control: student as teacher": STEPS + 1,
                       "student, +1 step": STEPS + 1, "student, +2 steps": STEPS + 2}[label]
                tuned = label in ("student++", "control: student as teacher")
                rows.append([name, setup.dim, label, nfe, f"{form}, {w:g}" if tuned else "–",
                             *collect(scores)])
    return rows


def window_rows(setups, cfg: Config, best):
    """Which sigma band to guide (8-step schedule, every step in the band guided)."""
    rows = []
    sigmas = karras(8)
    for setup in setups:
        for name in setup.students:
            form, w = best[name]
            if w == 0:
                continue
            cells = []
            for lo, hi in WINDOWS:
                guided = len(guided_step_indices(kdistpp.SigmaWindow(lo, hi), sigmas.tolist()))
                scores = [setup.score(setup.sample(name, seed, steps=8, w=w, form=form,
                                                   guidance_steps=kdistpp.SigmaWindow(lo, hi)), seed)["w2"]
                          for seed in cfg.seeds]
                cells.append(f"{pm(scores)} ({guided})")
            base = [setup.score(setup.sample(name, seed, steps=8), seed)["w2"] for seed in cfg.seeds]
            rows.append([name, setup.dim, f"{form}, {w:g}", pm(base), *cells])
    return rows


def renoise_rows(setups, cfg: Config, best):
    """The renoise level sigma_r of the one guided step (Table 3 analog), at each student's tuned (form, w)."""
    rows = []
    for setup in setups:
        for name in setup.students:
            form, w = best[name]
            if w == 0 or form == "guidance":  # eq. 10 evaluates the teacher at x itself: nothing is renoised
                continue
            cells = [pm([setup.score(setup.sample(name, seed, w=w, form=form, renoise=level), seed)["w2"]
                         for seed in cfg.seeds]) for level in RENOISE]
            rows.append([name, setup.dim, f"{form}, {w:g}", *cells])
    return rows


def tradeoff(setups, cfg: Config, best):
    """Adherence vs spread as the teacher's CFG scale in the refinement varies (2-D, the tuned (form, w))."""
    setup = setups[0]
    scales = (1.0, 2.0, 3.0, 5.0, 8.0)
    curves = {}
    for name in setup.students:
        form, w = best[name]
        w = w or 0.3  # a student whose tuned w is 0 is shown at 0.3, to see what the teacher would do
        for scale in scales:
            runs = [setup.score(setup.sample(name, seed, teacher=setup.problem.cfg(scale), w=w, form=form), seed)
                    for seed in cfg.seeds]
            curves.setdefault(name, []).append((scale, mean_std(r["adherence"] for r in runs)[0],
                                                mean_std(r["spread"] for r in runs)[0]))
    return curves


def plots(results, setups, cfg: Config, curves) -> list[str]:
    plt = pyplot()
    names = list(setups[0].students)
    fig, axes = plt.subplots(len(setups), len(names), figsize=(3.6 * len(names), 3.0 * len(setups)), squeeze=False)
    for r, setup in enumerate(setups):
        for c, name in enumerate(names):
            ax = axes[r][c]
            for form in FORMS:
                means = [mean_std(results[(name, setup.dim, form, w)])[0] for w in w_grid(cfg)]
                ax.plot(w_grid(cfg), means, marker="o", label=form)
            ax.set_title(f"{name}, {setup.dim}-D", fontsize=9)
            ax.set_xlabel("w")
            ax.set_ylabel("per-class sliced W2")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    first = save_figure(fig, "conditional_forms.png")
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, points in curves.items():
        ax.plot([p[2] for p in points], [p[1] for p in points], marker="o", label=name)
        for scale, adherence, spread in points:
            ax.annotate(f"{scale:g}", (spread, adherence), fontsize=7)
    ax.set_xlabel("within-class spread / target's")
    ax.set_ylabel("class adherence")
    ax.set_title("teacher CFG scale in the refinement (2-D)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return [first, save_figure(fig, "conditional_tradeoff.png")]


def run(cfg: Config):
    cfg = sized(cfg)
    setups = [Setup(cfg, dim) for dim in cfg.dims]
    results = sweep(setups, cfg)
    best = best_settings(results, setups, cfg)
    rows = table_1(setups, cfg, best)
    windows = window_rows(setups, cfg, best)
    renoise = renoise_rows(setups, cfg, best)
    curves = tradeoff(setups, cfg, best)
    plots(results, setups, cfg, curves)
    sweep_rows = [[name, dim, form] + [pm(results[(name, dim, form, w)]) for w in w_grid(cfg)]
                  for dim in cfg.dims for name in setups[0].students for form in FORMS]
    curve_rows = [[name] + [f"{a:.3f} / {s:.2f}" for _, a, s in points] for name, points in curves.items()]
    band = ", ".join(f"[{lo:g}, {hi:g}]" for lo, hi in WINDOWS)
    text = "\n".join([
        "## Conditional generation with a CFG teacher", "",
        f"Class-conditional ring mixtures (4 classes x 3 modes), exact CFG teacher at scale {SCALE:g}, students at "
        f"CFG 1; {STEPS}-step Karras schedule; {cfg.n} samples, seeds {list(cfg.seeds)} (tuning seeds "
        f"{list(tuning_seeds(cfg))}). Cells: per-class sliced W2 to the converged CFG teacher / class adherence / "
        "within-class spread relative to the target (see the module docstring of benchmarks/conditional.py). "
        "NFE counts the teacher's guided call as 2 (its cond+uncond batch).", "",
        "### Student vs student++ (Table 1 analog) and equal NFE (Table 2 analog)", "",
        table(["student", "dim", "run", "NFE", "form, w (tuned)", "per-class W2", "adherence", "spread"], rows), "",
        "### Forms over w (Fig. 6 analog), tuning seeds", "",
        "Per-class sliced W2, one guided step; ![forms over w](img/conditional_forms.png)", "",
        table(["student", "dim", "form"] + [f"w={w:g}" for w in w_grid(cfg)], sweep_rows), "",
        "### Renoise level of the guided step (Table 3 analog)", "",
        "Per-class sliced W2 at the tuned (form, w); 'next' = sigma_{i+1} (the paper's default), 'current' = "
        "sigma_i, 'random' = log-uniform over the schedule, numbers = a fixed sigma_r. Students tuned to w = 0 or "
        "to the guidance form (eq. 10 evaluates the teacher at x, with no renoising) are left out.", "",
        table(["student", "dim", "form, w", "next", "current", "random", "fixed 1", "fixed 10"], renoise), "",
        f"### Which sigma band to guide (8-step schedule; bands {band})", "",
        "Per-class sliced W2 with every step in the band guided (the count in brackets) at the tuned (form, w); "
        "students whose tuned w is 0 are left out.", "",
        table(["student", "dim", "form, w", "unguided"] + [f"[{lo:g}, {hi:g}]" for lo, hi in WINDOWS], windows), "",
        "### Teacher CFG scale in the refinement: adherence / spread (2-D)", "",
        "![trade-off](img/conditional_tradeoff.png)", "",
        table(["student"] + [f"teacher scale {p[0]:g}" for p in next(iter(curves.values()))], curve_rows),
    ])
    return text, best
