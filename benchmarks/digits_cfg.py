"""A small real conditional model: class-conditional digits with a CFG teacher, SFD students, Distillation++.

The teacher is a class-conditional MLP denoiser trained here on sklearn's 8x8 digits by denoising
score matching with label dropout, so one network gives both CFG branches; it is sampled at CFG
scale SCALE (one batched cond+uncond call: 2 NFE). Two students, both SFD-distilled from it and
sampled at "CFG 1" (conditional only, 1 NFE a step):
- distilled at the teacher's CFG (the trajectory of the guided teacher), like CFG-distilled
  students (SDXL-Lightning, DMD2);
- distilled without CFG (the teacher's conditional branch alone), the common LCM/Lightning-LoRA
  situation where the student never learned the guidance the user's teacher runs with.
Distillation++ refines the first step with the teacher at its CFG.

Metrics against the converged CFG teacher (DPM++(3M), 100 steps), in a digit classifier's features:
per-class Fréchet distance (mean over the 10 classes) and the accuracy of the intended class.
"""

from __future__ import annotations

import time

import torch

import kdistpp
from common import Config, mean_std, pm, table
from kdistpp import metrics
from kdistpp.sfd import MLPDenoiser, SFDConfig, dpmpp_3m_trajectory, polynomial_sigmas, sample_sfd, train_dsm
from sfd import SIGMA_MAX, SIGMA_MIN, digit_classifier, distil

SCALE = 3.0
NFE = 3  # the students' steps
DISTPP = (("interpolate", 0.1, 1), ("interpolate", 0.3, 1), ("eps", 0.1, 1), ("eps", 0.3, 1),
          ("interpolate", 0.3, [1]), ("interpolate", 1.0, [1]))  # (form, w, guided steps): [1] = the second step


def sizes(cfg: Config) -> dict:
    if cfg.tiny:  # the smoke test
        return dict(dsm=60, sfd=4, hidden=32, n_eval=200, seeds=(0,), classifier=20)
    if cfg.quick:
        return dict(dsm=800, sfd=40, hidden=128, n_eval=500, seeds=(0, 1), classifier=200)
    return dict(dsm=5000, sfd=300, hidden=256, n_eval=2000, seeds=(0, 1, 2), classifier=600)


class GuidedTeacher:
    """The conditional network under CFG at `scale`, with labels from extra_args (k-diffusion style)."""

    def __init__(self, net: MLPDenoiser, scale: float):
        self.net, self.scale = net, scale

    def __call__(self, x, sigma, label, **_):
        cfg = kdistpp.CFGDenoiser(self.net, cond=label, uncond=torch.full_like(label, -1), cond_scale=self.scale,
                                  cond_key="label")
        return cfg(x, sigma.reshape(-1).expand(x.shape[0]))


def run(cfg: Config) -> str:
    s = sizes(cfg)
    clf, x, y, accuracy = digit_classifier(s["classifier"])
    torch.manual_seed(0)
    net = MLPDenoiser(64, hidden=s["hidden"], depth=3, sigma_data=float(x.std()), n_classes=10)
    start = time.perf_counter()
    train_dsm(net, x, s["dsm"], batch_size=256, lr=2e-3, labels=y, label_dropout=0.15)
    times = {"teacher (DSM)": time.perf_counter() - start}
    net.requires_grad_(False)
    guided = GuidedTeacher(net, SCALE)
    students = {}
    condition = lambda g, b: {"label": torch.randint(10, (b,), generator=g)}  # noqa: E731
    for name, target, steps in (("SFD at the teacher's CFG", guided, NFE + 1),
                                ("SFD at the teacher's CFG, NFE 5", guided, 6),
                                ("SFD without CFG", GuidedTeacher(net, 1.0), NFE + 1)):
        config = SFDConfig(num_steps=steps, iterations=s["sfd"], sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, lr=1e-3,
                           batch_size=128, seed=0)
        student, times[name] = distil(net, 64, config, s["hidden"], target=target, condition=condition)
        students[name] = (student, steps)

    def features(samples):
        with torch.no_grad():
            return clf.features(samples.float().clamp(-1, 1))

    def score(samples, target, labels):
        f, ft = features(samples), features(target)
        fd = [metrics.frechet_distance(f[labels == c], ft[labels == c]) for c in range(10)]
        with torch.no_grad():
            acc = float((clf(samples.float().clamp(-1, 1)).argmax(1) == labels).float().mean())
        return sum(fd) / 10, acc

    rows = {}
    for seed in s["seeds"]:
        labels = torch.arange(s["n_eval"]) % 10
        extra = {"label": labels}
        z = torch.randn(s["n_eval"], 64, generator=torch.Generator().manual_seed(1000 + seed)) * SIGMA_MAX
        target = dpmpp_3m_trajectory(guided, torch.randn(z.shape, generator=torch.Generator().manual_seed(2000 + seed))
                                     * SIGMA_MAX, polynomial_sigmas(101, SIGMA_MIN, SIGMA_MAX), extra)[-1]
        torch.manual_seed(seed)
        put = lambda name, nfe, out: rows.setdefault((name, nfe), []).append(score(out, target, labels))  # noqa: E731
        put("teacher at CFG, DPM++(3M)", 2 * NFE,
            dpmpp_3m_trajectory(guided, z, polynomial_sigmas(NFE + 1, SIGMA_MIN, SIGMA_MAX), extra)[-1])
        for name, (student, steps) in students.items():
            config = SFDConfig(num_steps=steps, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
            put(name, steps - 1, sample_sfd(student, z, config, extra_args=extra, disable=True))
            if steps != NFE + 1:
                continue
            for form, w, guided_steps in DISTPP:
                out = sample_sfd(student, z, config, extra_args=extra, disable=True, teacher=guided, w=w, form=form,
                                 guidance_steps=guided_steps)
                where = "" if guided_steps == 1 else f", step {guided_steps[0] + 1} of {steps - 1}"
                put(f"{name} + Distillation++ ({form}, w={w:g}{where})", steps - 1 + 2, out)
        put("converged teacher, other noise (floor)", 200,
            dpmpp_3m_trajectory(guided, z, polynomial_sigmas(101, SIGMA_MIN, SIGMA_MAX), extra)[-1])

    body = [[name, nfe, pm([r[0] for r in runs], 2), pm([r[1] for r in runs])] for (name, nfe), runs in rows.items()]
    best = {}
    for base in ("SFD at the teacher's CFG", "SFD without CFG"):
        plain = mean_std(r[0] for r in rows[(base, NFE)])[0]
        guided_rows = {k: mean_std(r[0] for r in v)[0] for k, v in rows.items() if k[0].startswith(base + " +")}
        name, value = min(guided_rows.items(), key=lambda kv: kv[1])
        best[base] = f"{base}: best {name[0][len(base) + 3:]} {value:.2f} vs {plain:.2f} without ({100 * (value / plain - 1):+.0f}%)"
    return "\n".join([
        "## Digits with a CFG teacher: SFD students and Distillation++", "",
        f"Class-conditional MLP teacher (hidden {s['hidden']}, DSM {s['dsm']} iterations, label dropout 0.15) at CFG "
        f"{SCALE:g}; SFD students ({s['sfd']} trajectory batches of 128) sampled conditionally at CFG 1. Target: the "
        f"converged CFG teacher (DPM++(3M), 100 steps). Per-class Fréchet distance in a digit classifier's features "
        f"(held-out accuracy {accuracy:.3f}) / accuracy of the intended class, mean ± std over seeds {list(s['seeds'])}, "
        f"{s['n_eval']} samples ({s['n_eval'] // 10} per class). NFE counts a CFG call as 2. The Distillation++ rows were "
        "not tuned: every (form, w) tried is shown; the 'step 2 of 3' rows guide the second step instead of the first "
        "(the conditional toys' sigma-band result) and are reported on the same seeds.", "",
        table(["method", "NFE", "per-class FD", "class accuracy"], body), "",
        "In short: " + "; ".join(best.values()) + ".", "",
        "Training time on this machine (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + ".",
    ])
