"""`python -m kdistpp demo`: student, student++ and teacher on a built-in 2-D toy problem.

The teacher is the exact denoiser of an 8-mode Gaussian mixture; the student is consistency-like
(LCM / DMD2 stand-in: it predicts the ODE endpoint with too few internal steps) and samples with the
4-step multistep consistency sampler. student++ adds one guided step (one teacher call) with the
authors' form for consistency students (eps-mixing).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from . import metrics, toys
from .png import density_legend, scatter_panel, side_by_side, titled, write_png
from .samplers import sample_consistency, sample_consistency_distpp, sample_dpmpp_2m_distpp, sample_euler_distpp
from .schedules import get_sigmas_karras

SIGMA_MAX, SIGMA_MIN = 20.0, 0.05
PANEL_SIZE, PANEL_GAP = 260, 6  # pixels of one scatter panel and of the white gap between panels


def build_runs(mixture, student, n_steps: int, w: float, form: str):
    """(name, NFE, sampler thunk) for each row of the table; every thunk takes x_T."""
    sig = get_sigmas_karras(n_steps, SIGMA_MIN, SIGMA_MAX)
    sig_matched = get_sigmas_karras(n_steps + 1, SIGMA_MIN, SIGMA_MAX)
    sig_converged = get_sigmas_karras(100, 0.002, SIGMA_MAX)
    quiet = dict(disable=True)
    return [
        ("student", n_steps, lambda x: sample_consistency(student, x, sig, **quiet)),
        (f"student++ ({form}, w={w:g})", n_steps + 1,
         lambda x: sample_consistency_distpp(student, x, sig, teacher=mixture, w=w, form=form, **quiet)),
        ("teacher, Euler, same NFE", n_steps + 1,
         lambda x: sample_euler_distpp(mixture, x, sig_matched, teacher=mixture, w=0.0, **quiet)),
        ("teacher, DPM++ 2M, converged", 100,
         lambda x: sample_dpmpp_2m_distpp(mixture, x, sig_converged, teacher=mixture, w=0.0, **quiet)),
    ]


def panel_titles(n_steps: int, w: float, form: str) -> list[list[str]]:
    """Two title lines for the student, student++ and teacher panels (the first three runs)."""
    return [["student", f"consistency, {n_steps} NFE"],
            ["student++", f"{form}, w={w:g}, {n_steps + 1} NFE"],
            ["teacher", f"Euler, {n_steps + 1} NFE"]]


def density_grid(mixture, extent: float, size: int) -> np.ndarray:
    axis = torch.linspace(-extent, extent, size, dtype=torch.float64)
    ys, xs = torch.meshgrid(-axis, axis, indexing="ij")  # row 0 = top = +extent
    grid = torch.stack([xs.flatten(), ys.flatten()], dim=1)
    zero = grid.new_zeros(grid.shape[0])
    r, var0, var, diff = mixture.responsibilities(grid, zero)
    logp = -0.5 * ((diff**2 / var) + var.log()).sum(-1) + mixture.weights.log()
    return torch.logsumexp(logp, dim=-1).exp().reshape(size, size).numpy()


def run_demo(n: int = 4000, seed: int = 0, steps: int = 4, w: float = 0.3, form: str = "eps", out_dir: str = "kdistpp-demo",
             device: str = "cpu") -> tuple[list[dict], str]:
    mixture = toys.ring_mixture(n_modes=8, radius=4.0, std=0.35, dim=2)
    student = toys.ConsistencyStudent(mixture, substeps=2)
    reference = mixture.sample(n, torch.Generator().manual_seed(seed + 1), device=device)
    floor = metrics.all_metrics(mixture.sample(n, torch.Generator().manual_seed(seed + 2), device=device), reference, mixture)
    rows, samples = [], {}
    runs = build_runs(mixture, student, steps, w, form)
    for name, nfe, sample in tqdm(runs, desc="kdistpp demo", unit="run"):
        torch.manual_seed(seed)
        x_T = torch.randn(n, 2, device=device) * SIGMA_MAX
        start = time.perf_counter()
        out = sample(x_T)
        seconds = time.perf_counter() - start
        samples[name] = out.cpu()
        rows.append({"method": name, "nfe": nfe, **metrics.all_metrics(out, reference, mixture), "seconds": seconds})
    rows.append({"method": "data vs data (noise floor)", "nfe": 0, **floor, "seconds": 0.0})
    os.makedirs(out_dir, exist_ok=True)
    extent = 6.5
    density = density_grid(mixture, extent, PANEL_SIZE)
    panels = [titled(scatter_panel(reference.cpu().numpy()[:1500], density, extent, color=(60, 60, 60)),
                     ["data", "exact samples"])]
    panels += [titled(scatter_panel(samples[name].numpy()[:1500], density, extent), title)
               for (name, _, _), title in zip(runs[:3], panel_titles(steps, w, form))]
    path = os.path.join(out_dir, "demo_scatter.png")
    image = side_by_side(panels, gap=PANEL_GAP)
    write_png(path, np.concatenate([image, density_legend(image.shape[1])], axis=0))
    return rows, path


def format_table(rows: list[dict]) -> str:
    head = f"{'method':<34} {'NFE':>4} {'sliced W2':>10} {'energy':>8} {'Frechet':>8} {'mode TV':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:<34} {r['nfe']:>4} {r['sliced_w2']:>10.4f} {r['energy']:>8.4f} "
                     f"{r['frechet']:>8.4f} {r['mode_tv']:>8.4f}")
    return "\n".join(lines)


def _at_least(low: int, why: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}: {why}")
        return value

    return parse


def _weight(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite weight >= 0 (0 = no teacher)")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch sees no CUDA device; use --device cpu")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kdistpp demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=_at_least(1, "the demo needs at least one sample"), default=4000,
                        help="samples per method (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the start noise (default 0)")
    parser.add_argument("--steps", type=_at_least(2, "the guided first step renoises to the next sigma, which the "
                                                    "last step does not have"), default=4,
                        help="student steps, at least 2 (default 4)")
    parser.add_argument("--w", type=_weight, default=0.3, help="teacher weight of the guided step (default 0.3)")
    parser.add_argument("--form", default="eps", choices=["interpolate", "guidance", "eps"],
                        help="form of the refinement (default eps, the authors' choice for consistency students)")
    parser.add_argument("--out", default="kdistpp-demo", help="folder for the PNG (default ./kdistpp-demo)")
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default cuda when available, else cpu)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    rows, path = run_demo(args.n, args.seed, args.steps, args.w, args.form, args.out, args.device)
    print(f"\n8-mode 2-D Gaussian mixture, {args.n} samples each; distances to fresh data samples (lower is better)\n")
    print(format_table(rows))
    print(f"\nscatter (data | student | student++ | teacher same NFE) over the data density: {path}")
