"""SFD experiments: a trained MLP teacher on a 2-D mixture and on sklearn's 8x8 digits,
SFD students at NFE 2-5, one SFD-v student for all of them, and Distillation++ on top.

Every number comes from networks trained in this run: the teacher by denoising score matching,
the students by SFD from it, and (digits) the classifier whose features the Frechet distance uses.
"""

from __future__ import annotations

import time

import torch
from torch import nn

import kdistpp
from common import Config, mean_std, pyplot, save_figure, table
from kdistpp import metrics, toys
from kdistpp.sfd import MLPDenoiser, SFDConfig, SFDTrainer, dpmpp_3m_trajectory, polynomial_sigmas, sample_sfd, train_dsm

SIGMA_MIN, SIGMA_MAX = 0.006, 80.0  # the authors' pixel-space EDM range; both datasets are scaled to about [-1, 1]
NFES = (2, 3, 4, 5)
DISTPP = (("interpolate", 0.1), ("interpolate", 0.3), ("eps", 0.1))  # (form, w) of the one refined step


def sizes(cfg: Config) -> dict:
    if cfg.tiny:  # the smoke test
        return dict(dsm=60, sfd=4, sfd_v=8, hidden=32, n_eval=200, eval_seeds=(0,), nfes=(2, 3), classifier=20)
    if cfg.quick:
        return dict(dsm=500, sfd=40, sfd_v=80, hidden=64, n_eval=500, eval_seeds=(0, 1), nfes=NFES, classifier=200)
    return dict(dsm=3000, sfd=300, sfd_v=600, hidden=128, n_eval=4000, eval_seeds=(0, 1, 2, 3, 4), nfes=NFES, classifier=600)


class Dataset:
    """Training data, a held-out reference, and the distance used to score samples."""

    def __init__(self, name, train, reference, distance, metric_name, hidden_mult=1):
        self.name, self.train, self.reference, self.distance, self.metric_name = name, train, reference, distance, metric_name
        self.dim = train.shape[1]
        self.hidden_mult = hidden_mult


def mixture_dataset(n_eval):
    mix = toys.ring_mixture(n_modes=8, radius=1.0, std=0.08, dim=2, seed=2)
    train = mix.sample(20_000, torch.Generator().manual_seed(0))
    reference = mix.sample(n_eval, torch.Generator().manual_seed(1))
    return Dataset("2-D mixture (8 modes)", train, reference,
                   lambda x: metrics.sliced_wasserstein(x, reference), "sliced W2 to held-out data")


class DigitClassifier(nn.Module):
    """64 -> 128 -> 64 (features) -> 10; the Frechet distance is computed on the 64 features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64), nn.SiLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.features(x))


def digit_classifier(iterations):
    """The 8x8 digits in [-1, 1], their labels, and a classifier trained on 1500 of them; returns
    (classifier, x, y, held-out accuracy). Seeded, so the metric never depends on what ran before."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0  # pixels 0..16 -> [-1, 1]
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1500], perm[1500:]
    torch.manual_seed(0)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        idx = train_idx[torch.randint(len(train_idx), (128,), generator=g)]
        noisy = x[idx] + 0.05 * torch.randn(x[idx].shape, generator=g)  # mild noise so features are smooth
        loss = nn.functional.cross_entropy(clf(noisy), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((clf(x[test_idx]).argmax(1) == y[test_idx]).float().mean())
    return clf.eval().requires_grad_(False), x, y, accuracy


def digits_dataset(iterations):
    clf, x, y, accuracy = digit_classifier(iterations)
    with torch.no_grad():
        reference = clf.features(x)

    def distance(samples):
        with torch.no_grad():
            return metrics.frechet_distance(clf.features(samples.float().clamp(-1, 1).cpu()), reference)

    data = Dataset("8x8 digits (sklearn, 1797 images)", x, x, distance,
                   f"Frechet distance in a digit classifier's features (held-out accuracy {accuracy:.3f})", hidden_mult=2)
    data.classifier_accuracy = accuracy
    return data


def teacher_euler(teacher, z, n):
    sigmas = polynomial_sigmas(n, SIGMA_MIN, SIGMA_MAX)
    return kdistpp.sample_euler_distpp(teacher, z * SIGMA_MAX, sigmas, disable=True, teacher=teacher, w=0.0)


def teacher_3m(teacher, z, n):
    return dpmpp_3m_trajectory(teacher, z * SIGMA_MAX, polynomial_sigmas(n, SIGMA_MIN, SIGMA_MAX))[-1]


def distil(teacher, dim, config, hidden, step_conditioned=False, *, target=None, condition=None):
    """An SFD student initialised from the `teacher` network; it imitates `target` (default: the teacher
    itself; e.g. the teacher under CFG), with extra_args from `condition`. Returns (student, seconds)."""
    student = MLPDenoiser(dim, hidden=hidden, depth=3, sigma_data=teacher.sigma_data, step_conditioned=step_conditioned,
                          n_classes=teacher.n_classes)
    student.load_teacher(teacher)
    trainer = SFDTrainer(student, target or teacher, config, shape=(dim,), condition=condition)
    start = time.perf_counter()
    trainer.fit(progress=False)
    return student.eval().requires_grad_(False), time.perf_counter() - start


def experiment(data: Dataset, s: dict) -> tuple[dict, dict]:
    hidden = s["hidden"] * data.hidden_mult
    torch.manual_seed(0)
    teacher = MLPDenoiser(data.dim, hidden=hidden, depth=3, sigma_data=float(data.train.std()))
    start = time.perf_counter()
    train_dsm(teacher, data.train, s["dsm"], batch_size=256, lr=2e-3)
    times = {"teacher (DSM)": time.perf_counter() - start}
    teacher.requires_grad_(False)
    base = dict(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, lr=1e-3, batch_size=128, seed=0)
    students = {}
    for nfe in s["nfes"]:
        students[nfe], times[f"SFD, NFE {nfe}"] = distil(teacher, data.dim, SFDConfig(num_steps=nfe + 1, iterations=s["sfd"], **base), hidden)
    choices = tuple(n + 1 for n in s["nfes"])
    sfd_v, times["SFD-v (all NFE)"] = distil(teacher, data.dim, SFDConfig(num_steps=choices, iterations=s["sfd_v"], **base), hidden, True)
    sfd_v_config = SFDConfig(num_steps=choices, **base)

    rows = {}  # (method, nfe) -> list of distances over evaluation seeds
    for seed in s["eval_seeds"]:
        z = torch.randn(s["n_eval"], data.dim, generator=torch.Generator().manual_seed(1000 + seed))
        torch.manual_seed(seed)
        rows.setdefault(("teacher, converged (3M, 100 steps)", 100), []).append(data.distance(teacher_3m(teacher, z, 101)))
        for nfe in s["nfes"]:
            n = nfe + 1
            config = SFDConfig(num_steps=n, **base)
            put = lambda name, x, k=nfe: rows.setdefault((name, k), []).append(data.distance(x))  # noqa: E731
            put("teacher, Euler", teacher_euler(teacher, z, n))
            put("teacher, DPM++(3M)", teacher_3m(teacher, z, n))
            put("SFD student", sample_sfd(students[nfe], z * SIGMA_MAX, config, disable=True))
            for form, w in DISTPP:
                put(distpp_name(form, w), sample_sfd(students[nfe], z * SIGMA_MAX, config, disable=True,
                                                     teacher=teacher, w=w, form=form), nfe + 1)
            put("SFD-v (one student)", sample_sfd(sfd_v, z * SIGMA_MAX, sfd_v_config, num_steps=n, disable=True))
    samples = {"teacher, DPM++(3M), NFE 3": teacher_3m(teacher, z[:64], 4),
               "SFD student, NFE 3": sample_sfd(students[3], z[:64] * SIGMA_MAX, SFDConfig(num_steps=4, **base), disable=True),
               "teacher, converged": teacher_3m(teacher, z[:64], 101)}
    return {"rows": rows, "times": times, "samples": samples}, students


def distpp_name(form, w):
    return f"SFD + Distillation++ ({form}, w={w:g}, 1 teacher step)"


def distpp_change(rows, form, w, nfe):
    """Relative change from one Distillation++ step on the SFD student of NFE - 1 (same student, one teacher call)."""
    base = mean_std(rows[("SFD student", nfe - 1)])[0]
    return mean_std(rows[(distpp_name(form, w), nfe)])[0] / base - 1


def gap_closed(rows, solver="teacher, DPM++(3M)", nfe=3):
    """Fraction of the distance from the teacher's `solver` at `nfe` to the converged teacher that the SFD student removes."""
    base = mean_std(rows[(solver, nfe)])[0]
    sfd = mean_std(rows[("SFD student", nfe)])[0]
    conv = mean_std(rows[("teacher, converged (3M, 100 steps)", 100)])[0]
    return (base - sfd) / (base - conv)


def render(data: Dataset, result: dict, s: dict) -> list[str]:
    rows, nfes = result["rows"], s["nfes"]
    methods = ["teacher, Euler", "teacher, DPM++(3M)", "SFD student", "SFD-v (one student)"] + \
              [distpp_name(form, w) for form, w in DISTPP]
    body = []
    for method in methods:
        cells = []
        for nfe in nfes:
            key = (method, nfe)
            cells.append(f"{mean_std(rows[key])[0]:.4f} ± {mean_std(rows[key])[1]:.4f}" if key in rows else "")
        body.append([method] + cells)
    conv = rows[("teacher, converged (3M, 100 steps)", 100)]
    body.append(["teacher, converged (3M, 100 steps)", f"{mean_std(conv)[0]:.4f} ± {mean_std(conv)[1]:.4f} (NFE 100)"] + [""] * (len(nfes) - 1))
    lines = [f"### {data.name}", "", f"Metric: {data.metric_name}; mean ± std over {len(s['eval_seeds'])} sampling seeds, "
             f"{s['n_eval']} samples each (one trained teacher and student per NFE). A Distillation++ cell is the SFD student of one step fewer "
             "plus one teacher call, so each column compares equal NFE.", "",
             table(["method"] + [f"NFE {n}" for n in nfes], body), ""]
    if 3 in nfes:
        lines += [f"SFD at NFE 3 closes **{100 * gap_closed(rows):.0f}%** of the gap between the teacher's DPM++(3M) at NFE 3 "
                  f"and the converged teacher (target: 70%); {100 * gap_closed(rows, 'teacher, Euler'):.0f}% of the gap from "
                  "the teacher's Euler at NFE 3.", ""]
    conv = mean_std(conv)[0]
    below = [n for n in nfes if mean_std(rows[("SFD student", n)])[0] < conv]
    if below:
        lines += [f"At NFE {', '.join(map(str, below))} the SFD student lands below the converged teacher. The distance is "
                  "to data, not to the teacher, and an L1-trained few-step student is not bound to reproduce every error "
                  "of its teacher's network; read it as 'as good as the teacher' rather than 'better'.", ""]
    lines += ["Distillation++ against the same SFD student without the teacher step (one NFE fewer), change in the "
              "metric per NFE (negative = better): " + "; ".join(
                  f"{form} w={w:g}: " + ", ".join(f"{100 * distpp_change(rows, form, w, n):+.1f}%" for n in nfes if n - 1 in nfes)
                  for form, w in DISTPP) + ".", ""]
    lines += ["Training time on this machine (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in result["times"].items()) + ".", ""]
    return lines


def plot_digits(result):
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, (title, x) in zip(axes, result["samples"].items()):
        grid = x[:64].clamp(-1, 1).reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64)
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return save_figure(fig, "sfd_digits.png")


def run(cfg: Config) -> str:
    s = sizes(cfg)
    toy_data = mixture_dataset(s["n_eval"])
    toy, _ = experiment(toy_data, s)
    digits_data = digits_dataset(s["classifier"])
    digits, _ = experiment(digits_data, s)
    path = plot_digits(digits)
    lines = ["## SFD: trajectory-distilled students, and Distillation++ on top", "",
             f"Teacher: an EDM-preconditioned MLP (depth 3) trained here by denoising score matching ({s['dsm']} iterations). "
             f"Students: copies of it distilled by SFD (sigma {SIGMA_MIN}..{SIGMA_MAX}, rho 7, K = 4, L1, {s['sfd']} trajectory "
             f"batches of 128, Adam lr 1e-3 / 10 after half; the authors' 5e-5 is for large U-Nets), one per NFE; SFD-v: "
             f"one step-conditioned student trained on N drawn from {[n + 1 for n in s['nfes']]} ({s['sfd_v']} batches). "
             "Students sample with Euler down to sigma_min as trained; Distillation++ adds one teacher-refined first "
             "step (form and w in the row name; the eps form's noise re-draw is scaled by the first step's sigma drop, "
             f"{SIGMA_MAX:g} to {float(polynomial_sigmas(4, SIGMA_MIN, SIGMA_MAX)[1]):.1f} at NFE 3, see forms.md). Timings are wall time on the machine named above.", ""]
    lines += render(toy_data, toy, s)
    lines += render(digits_data, digits, s)
    lines += [f"![digits samples](img/{path.rsplit('/', 1)[-1]})"]
    return "\n".join(lines)
