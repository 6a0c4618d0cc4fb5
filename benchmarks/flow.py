"""Distillation++ on rectified-flow students (parametrization='flow'), with an exact flow teacher.

The problem is the conditional section's (benchmarks/conditional.py): class-conditional ring mixtures
(4 classes x 3 modes) in 2-D and 16-D, CFG teacher at scale 3. Here every model is a flow model,
x = (1 - s) x0 + s n: the exact VE denoisers of kdistpp.conditional_toys seen in flow coordinates,
D_flow(x, s) = D_ve(x / (1 - s), s / (1 - s)) for s < 1, and at s = 1 (sigma = infinity) their exact
limit, the prior mean (per class for the conditional denoiser, combined at the model's CFG scale).
Sampling starts at s = 1 from unit noise on kdistpp.get_sigmas_flow(N, shift=3) schedules.

Students (each imitation is distilled to the schedule it samples with, see FlowDistilled):
- blurred classes: the teacher's denoiser with each class's estimate leaking into its neighbour's
  (conditional_toys.BlurredClasses);
- CFG-distilled: a guidance-distilled student run at CFG 1, i.e. the teacher at half its CFG scale;
- mode dropping: each class's small modes dropped and its modes narrowed (ClassMixture.within_class).
Each runs with three base samplers (Euler, Euler ancestral, multistep consistency), in flow coordinates.

Metrics are the conditional section's (Setup.score): per-class sliced W2 to the converged flow teacher's
samples of that class, class adherence, within-class spread relative to the target's.
"""

from __future__ import annotations

import dataclasses

import torch

import kdistpp
import conditional
from common import Counted, Config, mean_std, noise, pm, sample_heun, table, SIGMA_MAX
from kdistpp import flow as kflow
from kdistpp.conditional_toys import BlurredClasses, CFGTeacher, ClassMixture

SHIFT = 3.0  # SD3's time shift, the schedule most few-step flow students ship with
STEPS = 4
DISTILL_SUBSTEPS = 4  # teacher Euler substeps per student step when distilling
TARGET_STEPS = 100  # the converged teacher: Heun in flow coordinates
ADHERENCE_TOLERANCE = 0.02  # class adherence this much lower counts as worse
SAMPLERS = {
    "euler": kdistpp.sample_euler_distpp,
    "euler_ancestral": kdistpp.sample_euler_ancestral_distpp,
    "consistency": kdistpp.sample_consistency_distpp,
}
STUDENTS = {  # name here: (name in conditional_toys.students, what it stands for)
    "blurred classes": ("blurred classes", "teacher's denoiser blurred across neighbouring classes"),
    "CFG-distilled, run at CFG 1": ("weak guidance", "the teacher at half its CFG scale"),
    "mode dropping": ("mode dropping", "small modes of each class dropped"),
}


def guided_settings(cfg: Config):
    """(form, guided step index, w): interpolate on the first step (at s = 1, renoised at s_1) and on the
    second; eps only from the second step on (its VE scale s / (1 - s) is infinite at s = 1)."""
    if cfg.tiny:
        return (("interpolate", 0, 1.0), ("eps", 1, 0.2))
    if cfg.quick:
        return (("interpolate", 0, 1.0), ("interpolate", 1, 1.0), ("eps", 1, 0.2))
    return tuple((form, step, w) for form, step, ws in (("interpolate", 0, (0.3, 1.0)), ("interpolate", 1, (0.3, 1.0)),
                                                        ("eps", 1, (0.05, 0.2))) for w in ws)


def setting_label(setting) -> str:
    form, step, w = setting
    return f"{form}, step {step}, w {w:g}"


# --- flow models from the exact VE denoisers -------------------------------------------------------

def prior_means(problem: ClassMixture):
    """The data mean (dim,) and each class's mean (n_classes, dim): the exact denoisers at sigma = infinity."""
    weights, means = problem.mixture.weights, problem.mixture.means
    data = (weights[:, None] * means).sum(0)
    per_class = torch.stack([(weights[problem.classes == c, None] * means[problem.classes == c]).sum(0)
                             / weights[problem.classes == c].sum() for c in range(problem.n_classes)])
    return data, per_class


def at_infinity(model, label: torch.Tensor) -> torch.Tensor:
    """What a conditional_toys CFG-style denoiser returns at sigma = infinity, exactly: its unconditional
    and conditional parts both become prior means, combined as the model combines them."""
    if isinstance(model, CFGTeacher):
        data, per_class = prior_means(model.problem)
        return data + (per_class[label.cpu()] - data) * model.scale
    if isinstance(model, BlurredClasses):
        data, per_class = prior_means(model.problem)
        other = (label.cpu() + 1) % model.problem.n_classes
        mixed = (1 - model.leak) * per_class[label.cpu()] + model.leak * per_class[other]
        return data + (mixed - data) * model.scale
    raise TypeError(f"no exact s = 1 value for {type(model).__name__}")


def shared_level(s: torch.Tensor) -> float:
    levels = s.reshape(-1)
    if bool((levels != levels[0]).any()):
        raise ValueError("the batch must share one flow sigma")
    return float(levels[0])


class FlowDenoiser:
    """A VE denoiser D_ve(y, sigma) as the flow model D_flow(x, s) = D_ve(x / (1 - s), s / (1 - s));
    at s = 1 it returns the exact limit (at_infinity) instead of dividing by zero."""

    def __init__(self, ve_model):
        self.ve_model = ve_model

    def __call__(self, x, s, label, **_):
        level = shared_level(s)
        if level >= 1:
            return at_infinity(self.ve_model, label).to(x.device, x.dtype)
        sigma = kflow.ve_sigma(s.to(torch.float64)).to(s.dtype)
        return self.ve_model(kflow.to_ve(x, level), sigma, label=label)


class FlowDistilled:
    """A few-step flow student distilled from `model`: at s it returns the estimate whose flow Euler step
    x' = (s'/s) x + (1 - s'/s) D lands where `model`'s ODE, integrated in `substeps` Euler steps evenly
    spaced in s, lands at s' (the next level of `schedule` below s). Without a schedule s' = 0: an
    endpoint predictor, as a consistency student is. The substeps are the distillation error."""

    def __init__(self, model, schedule=None, substeps: int = DISTILL_SUBSTEPS):
        self.model, self.substeps = model, substeps
        self.levels = sorted(float(v) for v in schedule) if schedule is not None else [0.0]

    def __call__(self, x, s, **extra):
        start = shared_level(s)
        end = max([v for v in self.levels if v < start - 1e-9], default=0.0)
        y = x
        for k in range(self.substeps):
            a = start + (end - start) * k / self.substeps
            b = start + (end - start) * (k + 1) / self.substeps
            d = (y - self.model(y, y.new_full((y.shape[0],), a), **extra)) / a
            y = y + d * (b - a)
        if end == 0:
            return y
        r = end / start
        return (y - r * x) / (1 - r)


def sized(cfg: Config) -> Config:
    """The conditional section's sizes, with 3 samplers to run: quick keeps 2-D alone, full 1000 samples."""
    cfg = conditional.sized(cfg)
    if cfg.quick:
        return dataclasses.replace(cfg, dims=cfg.dims[:1])
    return dataclasses.replace(cfg, n=1000)


def flow_sigmas(steps: int, device):
    return kdistpp.get_sigmas_flow(steps, shift=SHIFT, device=device)


class FlowSetup(conditional.Setup):
    """The conditional section's problem and metrics, with flow models, flow schedules and a flow target."""

    def __init__(self, cfg: Config, dim: int):
        super().__init__(cfg, dim)
        self.flow_teacher = FlowDenoiser(self.teacher)
        self.flow_students = {name: FlowDenoiser(self.students[key]) for name, (key, _) in STUDENTS.items()}
        self.target_nfe = None

    def target(self, seed: int):
        """The converged CFG flow teacher (Heun from s = 1, TARGET_STEPS steps), from independent noise."""
        if seed not in self._targets:
            g = torch.Generator().manual_seed(40_000 + seed)
            x = torch.randn(self.cfg.n, self.dim, generator=g).to(self.cfg.device)
            model = Counted(lambda x, s: self.flow_teacher(x, s, label=self.labels))
            self._targets[seed] = sample_heun(model, x, flow_sigmas(TARGET_STEPS, self.cfg.device))
            self.target_nfe = 2 * model.calls  # the CFG teacher's cond+uncond batch
        return self._targets[seed]

    def converged(self, seed: int):
        """The converged teacher from the students' noise: the metric's floor."""
        model = lambda x, s: self.flow_teacher(x, s, label=self.labels)  # noqa: E731
        return sample_heun(model, self.start(seed), flow_sigmas(TARGET_STEPS, self.cfg.device))

    def start(self, seed: int):
        """Unit noise at s = 1 (the conditional section's x_T over its sigma_max); seeds the global RNG."""
        return noise(self.cfg, self.dim, seed) / SIGMA_MAX

    def run(self, name: str, sampler: str, seed: int, steps: int = STEPS, setting=None, control=False):
        """The student `name` distilled to this schedule (an endpoint predictor for the consistency sampler);
        name None runs the teacher itself."""
        sigmas = flow_sigmas(steps, self.cfg.device)
        if name is None:
            model = self.flow_teacher
        else:
            schedule = None if sampler == "consistency" else sigmas[:-1]
            model = FlowDistilled(self.flow_students[name], schedule)
        kwargs = {}
        if setting is not None:
            form, step, w = setting
            kwargs = dict(teacher=model if control else self.flow_teacher, w=w, form=form, guidance_steps=[step])
        x = self.start(seed)
        out = SAMPLERS[sampler](model, x, sigmas, {"label": self.labels}, disable=True, parametrization="flow",
                                **kwargs)
        return self.score(out, seed)


def tune(setups, cfg: Config):
    """Per (student, sampler): the guided setting with the lowest per-class W2 on the tuning seeds, summed
    over dimensions."""
    best = {}
    for name in STUDENTS:
        for sampler in SAMPLERS:
            totals = {}
            for setting in guided_settings(cfg):
                totals[setting] = sum(mean_std(setup.run(name, sampler, seed, setting=setting)["w2"]
                                               for seed in conditional.tuning_seeds(cfg))[0] for setup in setups)
            best[(name, sampler)] = min(totals, key=totals.get)
    return best


def measure(setups, cfg: Config):
    """results[(name, sampler, dim, run)] = score dicts over the reported seeds, and each run's NFE."""
    results, nfe = {}, {}

    def add(key, score, count):
        results.setdefault(key, []).append(score)
        nfe[key[-1]] = count

    for setup in setups:
        for seed in cfg.seeds:
            floor = setup.score(setup.converged(seed), seed)
            for sampler in SAMPLERS:
                teacher = setup.run(None, sampler, seed, steps=(STEPS + 2) // 2)
                for name in STUDENTS:
                    key = (name, sampler, setup.dim)
                    add(key + ("student",), setup.run(name, sampler, seed), STEPS)
                    for setting in guided_settings(cfg):
                        add(key + (setting_label(setting),), setup.run(name, sampler, seed, setting=setting), STEPS + 2)
                        add(key + ("control: " + setting_label(setting),),
                            setup.run(name, sampler, seed, setting=setting, control=True), STEPS + 1)
                    add(key + ("student, +1 step",), setup.run(name, sampler, seed, steps=STEPS + 1), STEPS + 1)
                    add(key + ("student, +2 steps",), setup.run(name, sampler, seed, steps=STEPS + 2), STEPS + 2)
                    add(key + ("teacher, same NFE",), teacher, 2 * ((STEPS + 2) // 2))
                    add(key + ("converged teacher",), floor, setup.target_nfe)
    return results, nfe


def cell(scores) -> str:
    w2 = pm([r["w2"] for r in scores])
    return f"{w2} / {mean_std(r['adherence'] for r in scores)[0]:.3f} / {mean_std(r['spread'] for r in scores)[0]:.2f}"


def verdict(results, key, setting):
    """Whether the tuned guided run beats the student given its NFE in steps, and its own control, by more
    than the larger standard deviation over seeds (per-class W2); class adherence is checked beside it."""
    def stats(run, metric="w2"):
        return mean_std(r[metric] for r in results[key + (run,)])

    guided = stats(setting_label(setting))
    runs = ("student", "student, +1 step", "student, +2 steps")
    best_run = min(runs, key=lambda r: stats(r)[0])
    steps = stats(best_run)
    control = stats("control: " + setting_label(setting))
    teacher = stats("teacher, same NFE")
    adherence = {"guided": stats(setting_label(setting), "adherence")[0], "steps": stats(best_run, "adherence")[0],
                 "teacher": stats("teacher, same NFE", "adherence")[0]}
    beats_steps = guided[0] < steps[0] - max(guided[1], steps[1])
    beats_control = guided[0] < control[0] - max(guided[1], control[1])
    if not beats_steps:
        text = "does not help: no better than the student's own extra steps"
    elif not beats_control:
        text = "helps, but not clearly more than its control (the student as its own teacher)"
    else:
        text = "helps, and beats its control"
    if adherence["guided"] < adherence["steps"] - ADHERENCE_TOLERANCE:
        text += f"; class adherence drops ({adherence['steps']:.3f} to {adherence['guided']:.3f})"
    teacher_better = False
    if teacher[0] < guided[0] - max(guided[1], teacher[1]):
        if adherence["teacher"] >= adherence["guided"] - ADHERENCE_TOLERANCE:
            teacher_better = True
            text += "; the teacher alone at the same NFE is better still"
        else:
            text += (f"; the teacher alone at the same NFE has lower per-class W2 but class adherence "
                     f"{adherence['teacher']:.3f} (guided: {adherence['guided']:.3f})")
    return beats_steps and beats_control, text, guided, steps, control, teacher, teacher_better


def run(cfg: Config):
    cfg = sized(cfg)
    setups = [FlowSetup(cfg, dim) for dim in cfg.dims]
    best = tune(setups, cfg)
    results, nfe = measure(setups, cfg)
    runs = ["student"] + [p + setting_label(s) for s in guided_settings(cfg) for p in ("", "control: ")]
    runs += ["student, +1 step", "student, +2 steps", "teacher, same NFE", "converged teacher"]

    summary, misses = [], {"steps": [], "control": [], "teacher": []}
    for name in STUDENTS:
        for sampler in SAMPLERS:
            setting = best[(name, sampler)]
            for setup in setups:
                key = (name, sampler, setup.dim)
                helps, text, guided, steps, control, teacher, teacher_better = verdict(results, key, setting)
                summary.append([name, sampler, setup.dim, setting_label(setting),
                                f"{mean_std(r['w2'] for r in results[key + ('student',)])[0]:.3f}",
                                f"{guided[0]:.3f}", f"{steps[0]:.3f}", f"{control[0]:.3f}", f"{teacher[0]:.3f}", text])
                where = f"{name} with {sampler}, {setup.dim}-D"
                if not helps:
                    misses["steps" if text.startswith("does not") else "control"].append(where)
                if teacher_better:
                    misses["teacher"].append(where)

    parts = [
        "## Flow-matching students (parametrization='flow')", "",
        f"The conditional section's class-conditional ring mixtures as rectified-flow models, x = (1 - s) x0 + s n: "
        "the exact VE denoisers in flow coordinates, D_flow(x, s) = D_ve(x / (1 - s), s / (1 - s)), and at s = 1 "
        f"their exact limit (the prior mean, per class, combined at the model's CFG scale). Exact CFG teacher at "
        f"scale {conditional.SCALE:g}; {STEPS}-step students on get_sigmas_flow({STEPS}, shift={SHIFT:g}) from s = 1, "
        f"each imitation distilled to its schedule ({DISTILL_SUBSTEPS} teacher Euler substeps per step; for the "
        "consistency sampler, to the endpoint s = 0); sampled with kdistpp's samplers and parametrization='flow'. "
        f"{cfg.n} samples, seeds {list(cfg.seeds)} (tuning seeds {list(conditional.tuning_seeds(cfg))}), dimensions "
        f"{list(cfg.dims)}. Target: the converged CFG flow teacher (Heun, {TARGET_STEPS} steps from s = 1, "
        f"{setups[0].target_nfe} NFE) from independent noise. NFE counts the teacher's guided call as 2.", "",
        "Students: " + "; ".join(f"**{n}**: {d}" for n, (_, d) in STUDENTS.items()) + ". Guided settings: one "
        "guided step; `interpolate` on step 0 (the step from s = 1, the teacher called at the renoised s_1) or "
        "step 1; `eps` on step 1 only: its noise scale s / (1 - s) is infinite at s = 1, so a guided eps step "
        "from s = 1 is not applicable. A control row applies the same refinement with the student as its own "
        "teacher.", "",
        "### Summary: the guided setting tuned on the tuning seeds, reported on the others", "",
        "Per-class sliced W2 (means over seeds). 'best student steps' is the best of the student at N, N+1 and "
        f"N+2 steps (NFE {STEPS}..{STEPS + 2}, the guided run costs {STEPS + 2}); 'helps' means better by more "
        "than the larger standard deviation over seeds, and the verdict notes where class adherence disagrees "
        f"(lower by more than {ADHERENCE_TOLERANCE:g}).", "",
        table(["student", "sampler", "dim", "tuned setting", "student", "student++", "best student steps",
               "control", "teacher, same NFE", "verdict"], summary), "",
    ]
    plain = []
    if misses["steps"]:
        plain.append("no better than the student given the same NFE in its own steps: " + "; ".join(misses["steps"]))
    if misses["control"]:
        plain.append("better than the student's extra steps, but not clearly better than the control (the same "
                     "refinement with the student as its own teacher), so the gain cannot be credited to the teacher: "
                     + "; ".join(misses["control"]))
    if misses["teacher"]:
        plain.append("the teacher alone at the same NFE does better than the guided student: "
                     + "; ".join(misses["teacher"]))
    teacher_adherence = [mean_std(r["adherence"] for r in results[(name, sampler, setup.dim, "teacher, same NFE")])[0]
                         for name in STUDENTS for sampler in SAMPLERS for setup in setups]
    converged_adherence = [mean_std(r["adherence"] for r in results[(name, sampler, setup.dim, "converged teacher")])[0]
                           for name in STUDENTS for sampler in SAMPLERS for setup in setups]
    parts += [f"The teacher run alone at the guided run's NFE ({(STEPS + 2) // 2} CFG steps) has class adherence "
              f"{min(teacher_adherence):.3f} to {max(teacher_adherence):.3f} over samplers and dimensions, the "
              f"converged teacher {min(converged_adherence):.3f}"
              + (": at this NFE the teacher is no substitute for the student, whichever has the lower per-class W2."
                 if max(teacher_adherence) < min(converged_adherence) - 0.1 else "."), ""]
    if plain:
        parts += ["**Where Distillation++ does not help.** " + ". ".join(p[0].upper() + p[1:] for p in plain) + ".", ""]
    else:
        parts += ["Distillation++ helped every student and sampler here, beyond its control.", ""]
    parts += ["### Every run (Table 1 and Table 2 analogs)", "",
              "Cells: per-class sliced W2 (mean ± std over seeds) / class adherence / within-class spread relative "
              "to the target.", ""]
    for name in STUDENTS:
        rows = [[setup.dim, r, nfe[r]] + [cell(results[(name, sampler, setup.dim, r)]) for sampler in SAMPLERS]
                for setup in setups for r in runs]
        parts += [f"#### {name}", "", table(["dim", "run", "NFE"] + list(SAMPLERS), rows), ""]
    return "\n".join(parts), best
