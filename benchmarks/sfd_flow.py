"""SFD distilling a flow teacher: the digits teacher of sfd.py seen as a rectified-flow model.

The teacher is sfd.py's digits MLP (trained here by denoising score matching, same sizes and seed),
seen as a flow model through kdistpp.flow's maps: D_flow(x, s) = D(x / (1 - s), s / (1 - s)). SFD
trains a flow copy of it in VE sigma (kdistpp.sfd.FlowAsVE, the teacher as flow.VEDenoiser), and the
students sample as flow models with parametrization='flow' on the flow timestamps s = sigma / (1 + sigma).
"""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

import kdistpp
from common import Config, mean_std, table
from kdistpp import flow
from kdistpp.sfd import (FlowAsVE, MLPDenoiser, SFDConfig, SFDTrainer, dpmpp_3m_trajectory, flow_timestamps,
                         polynomial_sigmas, sample_sfd_flow, train_dsm)
from sfd import NFES, SIGMA_MAX, SIGMA_MIN, digits_dataset

SHIFT = 3.0  # the shifted schedule flow users run (SD3's shift), here from s_max down to s = 0
DISTPP = (("interpolate", 0.1, 1), ("interpolate", 0.3, 1), ("interpolate", 0.3, [1]))  # (form, w, guided steps)
CONVERGED = "teacher, converged (3M, 100 steps)"


def sizes(cfg: Config) -> dict:
    if cfg.tiny:  # the smoke test
        return dict(dsm=60, sfd=4, hidden=32, n_eval=200, eval_seeds=(0,), nfes=(2, 3), classifier=20)
    if cfg.quick:  # well under a minute on 2 CPU cores
        return dict(dsm=400, sfd=30, hidden=64, n_eval=500, eval_seeds=(0, 1), nfes=NFES, classifier=200)
    return dict(dsm=3000, sfd=300, hidden=128, n_eval=4000, eval_seeds=(0, 1, 2, 3, 4), nfes=NFES, classifier=600)


class FlowView(nn.Module):
    """A VE network as a flow model, D_flow(x, s) = D(x / (1 - s), s / (1 - s)); defined for s < 1."""

    def __init__(self, ve_model: nn.Module):
        super().__init__()
        self.ve_model = ve_model

    def forward(self, x, s, **extra_args):
        s = s.to(x.dtype)
        scale = (1 - s).reshape(-1, *([1] * (x.ndim - 1)))
        return self.ve_model(x / scale, flow.ve_sigma(s), **extra_args)


def shifted_schedule(nfe: int) -> torch.Tensor:
    """nfe flow steps from s_max to 0, t uniform, s = time_snr_shift(SHIFT, t), t_0 chosen so that s_0 = s_max."""
    s_max = flow.flow_sigma(SIGMA_MAX)
    t0 = s_max / (SHIFT - (SHIFT - 1) * s_max)
    s = flow.time_snr_shift(SHIFT, torch.linspace(t0, 0, nfe + 1, dtype=torch.float64))
    s[0] = s_max
    return s.float()


def distil(flow_teacher: FlowView, config: SFDConfig, dim: int):
    """An SFD flow student: a copy of the flow teacher, trained as a VE denoiser of the converted states."""
    student = copy.deepcopy(flow_teacher).requires_grad_(True)
    trainer = SFDTrainer(FlowAsVE(student), flow.VEDenoiser(flow_teacher), config, shape=(dim,))
    start = time.perf_counter()
    trainer.fit(progress=False)
    return student.eval().requires_grad_(False), time.perf_counter() - start


def distpp_name(form, w, steps):
    where = "first step" if steps == 1 else f"step {steps[0] + 1}"
    return f"SFD + Distillation++ ({form}, w={w:g}, {where})"


def run(cfg: Config) -> str:
    s = sizes(cfg)
    data = digits_dataset(s["classifier"])
    hidden = 2 * s["hidden"]  # sfd.py's digits width
    torch.manual_seed(0)
    net = MLPDenoiser(data.dim, hidden=hidden, depth=3, sigma_data=float(data.train.std()))
    start = time.perf_counter()
    train_dsm(net, data.train, s["dsm"], batch_size=256, lr=2e-3, progress=False)
    times = {"teacher (DSM)": time.perf_counter() - start}
    teacher = FlowView(net.requires_grad_(False)).eval()
    ve_teacher = flow.VEDenoiser(teacher)
    base = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, lr=1e-3, batch_size=128, seed=0)
    students = {}
    for nfe in s["nfes"]:
        students[nfe], times[f"SFD, NFE {nfe}"] = distil(teacher, SFDConfig(num_steps=nfe + 1, iterations=s["sfd"], **base),
                                                         data.dim)
    s_max, s_min = flow.flow_sigma(SIGMA_MAX), flow.flow_sigma(SIGMA_MIN)

    def to_state(y, sigma=SIGMA_MIN):  # a VE solver's result as the flow state at s_min
        return flow.to_flow(y, sigma)

    rows = {}
    for seed in s["eval_seeds"]:
        z = torch.randn(s["n_eval"], data.dim, generator=torch.Generator().manual_seed(1000 + seed))
        x = z * float(flow_timestamps(SFDConfig(**base))[0])  # the flow state at s_max (pure noise)
        torch.manual_seed(seed)
        put = lambda name, k, out: rows.setdefault((name, k), []).append(data.distance(out))  # noqa: E731
        put(CONVERGED, 100, to_state(dpmpp_3m_trajectory(ve_teacher, z * SIGMA_MAX,
                                                         polynomial_sigmas(101, SIGMA_MIN, SIGMA_MAX))[-1]))
        for nfe in s["nfes"]:
            config = SFDConfig(num_steps=nfe + 1, **base)
            ts = flow_timestamps(config)
            put("teacher, flow Euler (DDIM)", nfe, kdistpp.sample_euler_distpp(teacher, x, ts, disable=True,
                                                                               parametrization="flow"))
            put("teacher, flow DPM++(2M)", nfe, kdistpp.sample_dpmpp_2m_distpp(teacher, x, ts, disable=True,
                                                                               parametrization="flow"))
            put("teacher, DPM++(3M) (SFD's solver)", nfe,
                to_state(dpmpp_3m_trajectory(ve_teacher, z * SIGMA_MAX, config.timestamps())[-1]))
            put(f"teacher, flow Euler, shift-{SHIFT:g} schedule to s = 0", nfe,
                kdistpp.sample_euler_distpp(teacher, x, shifted_schedule(nfe), disable=True, parametrization="flow"))
            put("SFD flow student", nfe, sample_sfd_flow(students[nfe], x, config, disable=True))
            if nfe + 1 in s["nfes"]:
                for form, w, steps in DISTPP:
                    if steps != 1 and nfe < 3:
                        continue
                    put(distpp_name(form, w, steps), nfe + 1,
                        sample_sfd_flow(students[nfe], x, config, disable=True, teacher=teacher, w=w, form=form,
                                        guidance_steps=steps))
    return render(data, rows, times, s, s_max, s_min)


def value(rows, key):
    return mean_std(rows[key])[0]


def render(data, rows, times, s, s_max, s_min) -> str:
    nfes = s["nfes"]
    methods = ["teacher, flow Euler (DDIM)", "teacher, flow DPM++(2M)", "teacher, DPM++(3M) (SFD's solver)",
               f"teacher, flow Euler, shift-{SHIFT:g} schedule to s = 0", "SFD flow student"]
    methods += [distpp_name(*d) for d in DISTPP if any((distpp_name(*d), n) in rows for n in nfes)]
    body = []
    for method in methods:
        body.append([method] + [f"{mean_std(rows[(method, n)])[0]:.3f} ± {mean_std(rows[(method, n)])[1]:.3f}"
                                if (method, n) in rows else "" for n in nfes])
    conv = mean_std(rows[(CONVERGED, 100)])
    body.append([CONVERGED, f"{conv[0]:.3f} ± {conv[1]:.3f} (NFE 100)"] + [""] * (len(nfes) - 1))
    teachers = methods[:4]
    verdicts = []
    for n in nfes:
        best_name = min(teachers, key=lambda m: value(rows, (m, n)))
        verdicts.append(f"NFE {n}: student {value(rows, ('SFD flow student', n)):.2f} vs the best teacher run "
                        f"({best_name[len('teacher, '):]}) {value(rows, (best_name, n)):.2f}")
    changes = []
    for d in DISTPP:
        cells = [f"NFE {n} {100 * (value(rows, (distpp_name(*d), n)) / value(rows, ('SFD flow student', n - 1)) - 1):+.1f}%"
                 for n in nfes if (distpp_name(*d), n) in rows]
        if cells:
            changes.append(f"{d[0]} w={d[1]:g} on {'the first step' if d[2] == 1 else f'step {d[2][0] + 1}'}: " + ", ".join(cells))
    se = lambda key: mean_std(rows[key])[1] / max(1, len(rows[key]) - 1) ** 0.5 + 1e-12  # noqa: E731
    helped = [(d, n) for d in DISTPP for n in nfes if (distpp_name(*d), n) in rows
              and value(rows, (distpp_name(*d), n)) < value(rows, ("SFD flow student", n - 1)) - se(("SFD flow student", n - 1))]
    worse_than_more_steps = [n for n in nfes if n - 1 in nfes and all(
        value(rows, (distpp_name(*d), n)) >= value(rows, ("SFD flow student", n)) for d in DISTPP if (distpp_name(*d), n) in rows)]
    lines = [
        "## SFD on a flow teacher: digits as a rectified-flow model", "",
        f"The digits teacher of the SFD section (EDM MLP, hidden {2 * s['hidden']}, {s['dsm']} DSM iterations) seen as a "
        "rectified-flow model, D_flow(x, s) = D(x / (1 - s), s / (1 - s)). SFD trains a flow copy of it in VE sigma "
        f"{SIGMA_MIN}..{SIGMA_MAX:g} (`kdistpp.sfd.FlowAsVE`, the teacher as `kdistpp.flow.VEDenoiser`; rho 7, K = 4, L1, "
        f"{s['sfd']} trajectory batches of 128, lr 1e-3), which is the flow range s = {s_max:.4f} down to {s_min:.5f}; the "
        "students then sample as flow models: flow Euler (DDIM) with `parametrization='flow'` on s = sigma / (1 + sigma) "
        "(`sample_sfd_flow`). Every run starts from the same flow state, unit noise times s_max, and every cell scores "
        "the flow state the run ends at (s_min, or 0 for the shift-3 schedule), converted from VE where the solver runs "
        f"in VE. Metric: {data.metric_name}; mean ± std over {len(s['eval_seeds'])} sampling seeds, {s['n_eval']} samples "
        "each. A Distillation++ cell is the SFD student of one step fewer plus one teacher call (the flow teacher, in "
        "flow coordinates), so each column compares equal NFE.", "",
        table(["method"] + [f"NFE {n}" for n in nfes], body), "",
        "SFD flow student against the teacher at the same NFE: " + "; ".join(verdicts) + ".", "",
        "Distillation++ against the same student without the teacher step (negative = better): " + "; ".join(changes) + ".", "",
    ]
    if helped:
        lines += ["Distillation++ lowered the distance by more than one standard error for: " + ", ".join(
            f"{distpp_name(*d)} at NFE {n}" for d, n in helped) + ".", ""]
    beaten = [(n, min(teachers, key=lambda m: value(rows, (m, n)))) for n in nfes
              if min(value(rows, (m, n)) for m in teachers) < value(rows, ("SFD flow student", n))]
    lines += ["**Where it does not help.** " + (
        "No Distillation++ setting lowered the distance by more than one standard error against the student it refines"
        if not helped else "Every other Distillation++ cell is within one standard error of its student, or worse") +
        (f"; at NFE {', '.join(map(str, worse_than_more_steps))} every refined run is no better than simply training "
         "an SFD student for that many steps" if worse_than_more_steps else "") +
        "".join(f"; at NFE {n} the teacher's own {m[len('teacher, '):]} beats the SFD student at the same NFE"
                for n, m in beaten) +
        ". A flow Euler step on s = sigma / (1 + sigma) is the VE Euler step the student was trained with, divided by "
        "1 + sigma', so this is the SFD section's digits problem reached through the maps (same teacher network and "
        "targets, up to float rounding): the flow view neither adds nor removes anything.", "",
        "Training time on this machine (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "."]
    return "\n".join(lines)
