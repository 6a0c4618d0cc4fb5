"""The 2-D picture: samples of student, student++ and the teacher at the same NFE over the data
density, and the trajectories of a deterministic student with and without the guided step."""

from __future__ import annotations

import torch

import kdistpp
from kdistpp.demo import density_grid

from common import KINDS, Config, karras, noise, problem, pyplot, save_figure

STEPS, EXTENT = 4, 6.5


def estimate_paths(kind, student, teacher, x, sigmas, **distpp):
    """The denoised estimate of each step and the final sample, (N + 1, B, 2): where the sampler
    believes each sample is headed (x itself starts at radius ~sigma_max, off the plot)."""
    estimates = []
    out = kind.sample(student, teacher, x, sigmas, callback=lambda d: estimates.append(d["denoised"].clone()), **distpp)
    return torch.stack(estimates + [out])


def run(cfg: Config, settings: dict) -> str:
    plt = pyplot()
    mixture, sigmas = problem(2), karras(STEPS)
    density = density_grid(mixture, EXTENT, 300)
    seed = cfg.seeds[0]
    scatter_kind = KINDS["consistency"]
    form, w = settings[scatter_kind.name]
    student = scatter_kind.build(mixture, sigmas)
    panels = [
        ("data", mixture.sample(cfg.n, torch.Generator().manual_seed(seed))),
        (f"student ({STEPS} NFE)", scatter_kind.sample(student, mixture, noise(cfg, 2, seed), sigmas)),
        (f"student++ ({form}, w={w:g}; {STEPS + 1} NFE)",
         scatter_kind.sample(student, mixture, noise(cfg, 2, seed), sigmas, w=w, form=form)),
        (f"teacher, Euler ({STEPS + 1} NFE)",
         kdistpp.sample_euler_distpp(mixture, noise(cfg, 2, seed), karras(STEPS + 1), disable=True, teacher=mixture, w=0.0)),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(20, 4.2))
    for ax, (title, pts) in zip(axes, panels):
        ax.imshow(density, extent=(-EXTENT, EXTENT, -EXTENT, EXTENT), cmap="Greys", alpha=0.6)
        pts = pts[:1500].cpu()
        ax.scatter(pts[:, 0], pts[:, 1], s=1.5, alpha=0.5, color="tab:blue")
        ax.set_title(title, fontsize=9)
    traj_kind = KINDS["biased_2m"]
    form_t, w_t = settings[traj_kind.name]
    biased = traj_kind.build(mixture, sigmas)
    x = noise(cfg, 2, seed)[:30]
    ax = axes[4]
    ax.imshow(density, extent=(-EXTENT, EXTENT, -EXTENT, EXTENT), cmap="Greys", alpha=0.6)
    for label, color, kw in (("student", "tab:red", {}), (f"student++ ({form_t}, w={w_t:g})", "tab:green", dict(w=w_t, form=form_t))):
        torch.manual_seed(seed)
        path = estimate_paths(traj_kind, biased, mixture, x, sigmas, **kw).cpu()
        for j in range(path.shape[1]):
            ax.plot(path[:, j, 0], path[:, j, 1], "-", color=color, lw=0.7, alpha=0.7, label=label if j == 0 else None)
        ax.scatter(path[-1, :, 0], path[-1, :, 1], s=6, color=color)
    ax.set_title(f"{traj_kind.label}: denoised estimate per step", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    for a in axes:
        a.set_xlim(-EXTENT, EXTENT)
        a.set_ylim(-EXTENT, EXTENT)
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle("8-mode mixture (grey: data density; modes' weights grow counter-clockwise from +x)")
    path = save_figure(fig, "toy_2d.png")
    return "\n".join(["## The 2-D picture", "",
                      f"Consistency-like student (first four panels) and, last panel, the path of the denoised estimate "
                      f"of 30 samples through the {STEPS} steps of the mode-biased DPM++ 2M student, with and without "
                      f"the guided first step (same x_T; dots = final samples); seed {seed}.", "", f"![2-D samples and trajectories](img/{path.rsplit('/', 1)[-1]})"])
