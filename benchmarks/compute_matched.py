"""Compute-matched comparison (paper Table 2 analog): N student steps + one guided step against
N+1 and N+2 plain student steps, N = 3..8, and against the same refinement with the student as
its own teacher (the control). Metric, NFE and wall time are measured side by side, interleaved
per seed. A progressive-like student is rebuilt for each step count (a student distilled for that
NFE, like SDXL-Lightning's 2/4/8-step checkpoints); the other students do not depend on it.
"""

from __future__ import annotations

from common import KINDS, Config, Counted, karras, mean_std, noise, problem, reference, save_figure, sliced_w2, table, panels, timed

ARMS = ("N + guided step", "N steps, control", "N+1 steps", "N+2 steps")


def one_arm(kind, mixture, arm, n_steps, form, w, x):
    """(samples, NFE, seconds) of one arm from x_T."""
    steps = n_steps + {"N+1 steps": 1, "N+2 steps": 2}.get(arm, 0)
    sigmas = karras(steps)
    student = Counted(kind.build(mixture, sigmas))
    teacher = Counted(mixture if arm == "N + guided step" else kind.build(mixture, sigmas))
    guided = arm in ("N + guided step", "N steps, control")
    out, seconds = timed(lambda: kind.sample(student, teacher, x, sigmas, w=w if guided else 0.0, form=form))
    return out, student.calls + (teacher.calls if guided else 0), seconds


def compare(a, b):
    """Mean paired difference a - b and a verdict at one standard error of that difference."""
    diff = [x - y for x, y in zip(a, b)]
    m, s = mean_std(diff)
    se = s / len(diff) ** 0.5
    return m, ("wins" if m + se < 0 else "loses" if m - se > 0 else "tie")


def run(cfg: Config, settings: dict) -> tuple[str, list]:
    """Markdown section, and per student kind the (wins, ties, losses) counts against N+1 steps and the control."""
    results = {}  # (kind, dim, N, arm) -> list of (sliced W2, NFE, seconds)
    for dim in cfg.dims:
        mixture = problem(dim)
        for kind in KINDS.values():
            form, w = settings[kind.name]
            for n_steps in cfg.step_counts:
                for seed in cfg.seeds:
                    ref = reference(cfg, mixture, seed)
                    for arm in ARMS:
                        out, nfe, seconds = one_arm(kind, mixture, arm, n_steps, form, w, noise(cfg, dim, seed))
                        results.setdefault((kind.name, dim, n_steps, arm), []).append((sliced_w2(out, ref), nfe, seconds))
    path = plot(results, cfg)
    lines = ["## Compute-matched: one teacher step vs one more student step (Table 2 analog)", "",
             f"Sliced W2 to data (mean ± std over {len(cfg.seeds)} seeds, {cfg.n} samples), NFE and median wall time per "
             "run, all arms interleaved per seed in one run. 'control' = the same refinement with the student as its own "
             "teacher (same NFE as the guided arm: the student's extra call replaces the teacher's). **wins** = the guided arm beats N+1 student steps "
             "by more than one standard error of the difference.", "",
             "Wall time on these toys is not the real-model ratio: each toy student calls the exact teacher "
             "several times internally, so a toy student step costs more than a teacher step; NFE is the "
             "comparable count. Real-size cost: the SDXL section below.", "",
             f"![compute matched](img/{path.rsplit('/', 1)[-1]})", ""]
    wins = {}
    for kind in KINDS.values():
        rows = []
        for dim in cfg.dims:
            for n_steps in cfg.step_counts:
                cells, sw = [], {}
                for arm in ARMS:
                    runs = results[(kind.name, dim, n_steps, arm)]
                    m, s = mean_std(r[0] for r in runs)
                    sw[arm] = [r[0] for r in runs]
                    cells.append(f"{m:.3f} ± {s:.3f} ({runs[0][1]} NFE, {sorted(r[2] for r in runs)[len(runs) // 2] * 1e3:.0f} ms)")
                dm, verdict = compare(sw["N + guided step"], sw["N+1 steps"])
                dc, verdict_c = compare(sw["N + guided step"], sw["N steps, control"])
                wins.setdefault(kind.name, []).append((verdict, verdict_c))
                rows.append([dim, n_steps] + cells + [f"{dm:+.2g} {verdict}", f"{dc:+.2g} {verdict_c}"])
        lines += [f"### {kind.label} (form={settings[kind.name][0]}, w={settings[kind.name][1]:g})", "",
                  table(["dim", "N"] + list(ARMS) + ["guided - (N+1)", "guided - control"], rows), ""]
    summary = [[KINDS[k].label] + [sum(1 for p in v if p[j] == word) for j in (0, 1) for word in ("wins", "tie", "loses")]
               for k, v in wins.items()]
    lines += ["### Summary over N and dimensions", "",
              "Left: the paper's claim (guided N+1 NFE vs N+1 plain student steps). Right: what the teacher itself "
              "adds (guided vs the control at equal NFE).", "",
              table(["student", "vs N+1: wins", "ties", "losses", "vs control: wins", "ties", "losses"], summary)]
    return "\n".join(lines), summary


def plot(results, cfg: Config):
    fig, grid = panels(cfg, "NFE")
    for ax, dim, kind in grid:
        for arm, style in zip(ARMS, ("o-", "x:", "s--", "^--")):
            pts = sorted((mean_std(x[1] for x in results[(kind.name, dim, n, arm)])[0],
                          mean_std(x[0] for x in results[(kind.name, dim, n, arm)])[0]) for n in cfg.step_counts)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, ms=4, label=arm)
    grid[0][0].legend(fontsize=7)
    fig.suptitle("Quality per NFE: N student steps + 1 guided step vs more student steps (N = 3..8)")
    return save_figure(fig, "compute_matched.png")
