"""What every toy benchmark shares: the problems, the student kinds, NFE counting, the converged
teacher, metrics over seeds, and markdown/plot output.

A *problem* is an 8-mode ring mixture (unequal weights) in `dim` dimensions whose exact denoiser
is the teacher. A *student kind* says how the student is built from the teacher for a schedule
and which kdistpp sampler it uses (see docs/toys.md for the error each stand-in models).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Callable

import torch

import kdistpp
from kdistpp import metrics, toys

SIGMA_MAX, SIGMA_MIN = 20.0, 0.05
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
SECTIONS = os.path.join(DOCS, "bench")  # one generated markdown fragment per benchmark
IMG = os.path.join(DOCS, "img")


@dataclasses.dataclass
class Config:
    """Sizes of one benchmark run: --quick shrinks samples, seeds and sweeps."""

    quick: bool = False
    device: str = "cpu"
    tiny: bool = False
    n: int = 4000
    seeds: tuple = (0, 1, 2, 3, 4)
    dims: tuple = (2, 16)
    step_counts: tuple = (3, 4, 5, 6, 7, 8)

    @classmethod
    def make(cls, quick: bool, device: str, tiny: bool = False):
        if tiny:  # the smoke test's setting
            return cls(quick=True, device=device, tiny=True, n=200, seeds=(0, 1), dims=(2,), step_counts=(3, 4))
        if quick:  # < 5 min and < 4 GB for every section on 2 CPU cores
            return cls(quick=True, device=device, n=500, seeds=(0, 1, 2), dims=(2, 16), step_counts=(3, 4, 5, 6))
        return cls(quick=False, device=device)


def problem(dim: int):
    return toys.ring_mixture(n_modes=8, radius=4.0, std=0.35, dim=dim, seed=dim)


def karras(n: int):
    return kdistpp.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX)


@dataclasses.dataclass(frozen=True)
class StudentKind:
    """A toy student and the sampler it ships with."""

    name: str
    label: str
    sampler: Callable
    build: Callable  # (mixture, sigmas) -> student denoiser
    sampler_kwargs: dict = dataclasses.field(default_factory=dict)

    def sample(self, student, teacher, x, sigmas, **distpp):
        distpp.setdefault("w", 0.0)
        return self.sampler(student, x, sigmas, disable=True, teacher=teacher, **self.sampler_kwargs, **distpp)


KINDS = {
    k.name: k
    for k in (
        StudentKind("progressive", "progressive-like, Euler", kdistpp.sample_euler_distpp,
                    lambda m, s: toys.ProgressiveStudent(m, s[:-1], substeps=2)),
        StudentKind("consistency", "consistency-like, multistep consistency", kdistpp.sample_consistency_distpp,
                    lambda m, s: toys.ConsistencyStudent(m, substeps=2)),
        StudentKind("biased_2s", "mode-biased, DPM++ 2S a", kdistpp.sample_dpmpp_2s_ancestral_distpp,
                    lambda m, s: toys.mode_biased_student(m)),
        StudentKind("biased_2m", "mode-biased, DPM++ 2M", kdistpp.sample_dpmpp_2m_distpp,
                    lambda m, s: toys.mode_biased_student(m)),
    )
}


class Counted:
    """Counts denoiser calls (NFE): one call of a batch is one function evaluation."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


@torch.no_grad()
def sample_heun(model, x, sigmas):
    """Heun's 2nd-order ODE sampler (Karras et al. 2022, Algorithm 1, no churn): the converged teacher."""
    sig = [float(s) for s in sigmas]
    x = x.double()
    for i in range(len(sig) - 1):
        d = (x - model(x, x.new_tensor(sig[i]))) / sig[i]
        x_next = x + d * (sig[i + 1] - sig[i])
        if sig[i + 1] > 0:
            d2 = (x_next - model(x_next, x.new_tensor(sig[i + 1]))) / sig[i + 1]
            x_next = x + (d + d2) / 2 * (sig[i + 1] - sig[i])
        x = x_next
    return x.float()


def converged_teacher(mixture, x):
    return sample_heun(mixture, x, kdistpp.get_sigmas_karras(100, 0.002, SIGMA_MAX))


def noise(cfg: Config, dim: int, seed: int):
    """x_T for one seed; the global RNG is then seeded for the samplers' own noise."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x = torch.randn(cfg.n, dim, generator=g).to(cfg.device) * SIGMA_MAX
    torch.manual_seed(seed)
    return x


def reference(cfg: Config, mixture, seed: int):
    return mixture.sample(cfg.n, torch.Generator().manual_seed(20_000 + seed), device=cfg.device)


def sliced_w2(samples, ref) -> float:
    """The sliced W2 column alone (what score() reports as sliced_w2), for sweeps that need no other metric."""
    return metrics.sliced_wasserstein(samples, ref)


def score(samples, ref, mixture) -> dict:
    m = metrics.all_metrics(samples, ref, mixture)
    return {"sliced_w2": m["sliced_w2"], "energy": m["energy"], "mode_tv": m["mode_tv"]}


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pm(values, digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = torch.get_num_threads()
    return f"{platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}, torch {torch.__version__}"


def set_docs_dir(path: str) -> None:
    """Send generated markdown and plots under `path` instead of the repository's docs/ (the smoke test)."""
    global DOCS, SECTIONS, IMG
    DOCS, SECTIONS, IMG = path, os.path.join(path, "bench"), os.path.join(path, "img")


def write_section(name: str, text: str, out_dir: str | None = None) -> str:
    out_dir = out_dir or SECTIONS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.md")
    with open(path, "w") as f:
        f.write(text.rstrip() + "\n")
    return path


def save_figure(fig, name: str, img_dir: str | None = None) -> str:
    img_dir = img_dir or IMG
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(img_dir, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path


def panels(cfg: Config, xlabel: str):
    """A figure with one panel per (dimension, student kind), titled and labelled; returns fig, [(ax, dim, kind)]."""
    plt = pyplot()
    fig, axes = plt.subplots(len(cfg.dims), len(KINDS), figsize=(4 * len(KINDS), 3.2 * len(cfg.dims)), squeeze=False)
    out = []
    for r, dim in enumerate(cfg.dims):
        for c, kind in enumerate(KINDS.values()):
            ax = axes[r][c]
            ax.set_title(f"{kind.label}, {dim}-D", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("sliced W2 to data")
            ax.grid(alpha=0.3)
            out.append((ax, dim, kind))
    return fig, out


def pyplot():
    import matplotlib  # the `bench` extra; imported here so the tables need nothing beyond kdistpp

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

