"""SFD on diffusers networks: a class-conditional SD-architecture UNet2DConditionModel and an SD3-architecture
flow transformer, each trained here on sklearn's 8x8 digits (the class enters as a one-token "prompt
embedding", as text does in Stable Diffusion), distilled by SFD into full and LoRA students at NFE 2-4,
against the teacher's own solvers at the same NFE and its converged samples, and with Distillation++ on top.
"""

from __future__ import annotations

import copy
import math
import time

import torch

from common import Config, mean_std, table
from kdistpp.flow import to_flow
from kdistpp.sfd import (FlowAsVE, FlowTransformerStudent, LoRATeacher, SFDConfig, SFDTrainer, UNetStudent, add_lora,
                         dpmpp_3m_trajectory, sample_sfd)
from kdistpp.sfd.trajectory import euler_trajectory
from sfd import digits_dataset

NFES = (2, 3, 4)
CONTEXT = 32
BATCH = 64  # the teacher's training batch and SFD's trajectory batch


def sizes(cfg: Config) -> dict:
    if cfg.tiny:
        return dict(teacher=30, sfd=2, n_eval=100, eval_seeds=(0,), nfes=(2,), classifier=20, rank=4)
    if cfg.quick:
        return dict(teacher=300, sfd=15, n_eval=400, eval_seeds=(0,), nfes=NFES, classifier=200, rank=8)
    return dict(teacher=1000, sfd=40, n_eval=800, eval_seeds=(0,), nfes=NFES, classifier=600, rank=8)


def class_embeddings() -> torch.Tensor:
    """A fixed "prompt embedding" (one token of norm sqrt(CONTEXT)) per digit class."""
    emb = torch.randn(10, 1, CONTEXT, generator=torch.Generator().manual_seed(5))
    return emb / emb.norm(dim=-1, keepdim=True) * CONTEXT ** 0.5


def fit(net, iterations: int, loss_fn):
    """Adam 1e-3 with cosine decay over `iterations` batches of BATCH digits; `loss_fn(net, x0, labels, g)`."""
    x, y = digits()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / iterations)))
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(iterations):
        idx = torch.randint(len(x), (BATCH,), generator=g)
        loss = loss_fn(net, x[idx].reshape(-1, 1, 8, 8), y[idx], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 8.0 - 1.0, torch.tensor(d.target)


class UNetArch:
    """The SD-architecture UNet: epsilon prediction on DDPM's discrete schedule, distilled in VE sigma."""

    heading = "## SFD on an SD-architecture UNet (digits, class-conditional)"
    teacher_text = ("a diffusers `UNet2DConditionModel` (two levels, 32/64 channels, cross-attention on the class's "
                    "one-token embedding) trained here by epsilon prediction on DDPM's scaled-linear schedule")

    def __init__(self):
        import diffusers

        self.scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    def train_teacher(self, iterations):
        import diffusers

        torch.manual_seed(0)
        net = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=32)
        alphas = self.scheduler.alphas_cumprod.float()
        emb = class_embeddings()

        def loss(net, x0, labels, g):
            t = torch.randint(1000, (len(x0),), generator=g)
            a = alphas[t].reshape(-1, 1, 1, 1)
            eps = torch.randn(x0.shape, generator=g)
            pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=emb[labels]).sample
            return ((pred - eps) ** 2).mean()

        return fit(net, iterations, loss)

    def wrap(self, net):
        return UNetStudent(net, self.scheduler)

    def cond(self, emb):
        return {"cond": {"encoder_hidden_states": emb}}

    def sigma_range(self, teacher):
        return teacher.sigma_min, teacher.sigma_max

    def to_data(self, states, sigma_min):
        return states


class FlowArch:
    """An SD3-architecture flow transformer (MMDiT: joint attention of the class token and 2x2 image patches,
    the pooled class vector in its modulation), trained by rectified flow, distilled in VE through FlowAsVE."""

    heading = "## SFD on a flow transformer (digits, class-conditional)"
    teacher_text = ("a diffusers `SD3Transformer2DModel` (two joint blocks of width 32, 2x2 patches; the class's "
                    "one-token embedding as the text, its vector as the pooled embedding) trained here by rectified "
                    "flow (velocity target, logit-normal s)")

    def train_teacher(self, iterations):
        import diffusers

        torch.manual_seed(0)
        net = diffusers.SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, caption_projection_dim=32, joint_attention_dim=CONTEXT, pooled_projection_dim=CONTEXT)
        emb = class_embeddings()

        def loss(net, x0, labels, g):
            s = torch.sigmoid(torch.randn(len(x0), generator=g)).reshape(-1, 1, 1, 1)
            n = torch.randn(x0.shape, generator=g)
            v = net(hidden_states=(1 - s) * x0 + s * n, timestep=s.reshape(-1) * 1000, encoder_hidden_states=emb[labels],
                    pooled_projections=emb[labels, 0], return_dict=False)[0]
            return ((v - (n - x0)) ** 2).mean()

        return fit(net, iterations, loss)

    def wrap(self, net):
        return FlowAsVE(FlowTransformerStudent(net))

    def cond(self, emb):
        from kdistpp.integrations.diffusers import flow_cond

        return {"cond": flow_cond(emb, emb[:, 0])}

    def sigma_range(self, teacher):
        return 0.006, 80.0  # flow sigmas 0.006..0.988

    def to_data(self, states, sigma_min):
        return to_flow(states, sigma_min)  # the VE state at sigma_min as the flow state


def run(cfg: Config) -> str:
    return section(UNetArch(), cfg)


def run_flow(cfg: Config) -> str:
    return section(FlowArch(), cfg)


def section(arch, cfg: Config) -> str:
    s = sizes(cfg)
    data = digits_dataset(s["classifier"])
    start = time.perf_counter()
    teacher_net = arch.train_teacher(s["teacher"])
    times = {"teacher": time.perf_counter() - start}
    teacher = arch.wrap(teacher_net)
    emb = class_embeddings()
    sigma_min, sigma_max = arch.sigma_range(teacher)
    base = dict(sigma_min=sigma_min, sigma_max=sigma_max, batch_size=BATCH, seed=0)

    def condition(generator, batch):
        return arch.cond(emb[torch.randint(10, (batch,), generator=generator)])

    students = {}
    for nfe in s["nfes"]:
        for kind in ("full", "LoRA"):
            net = copy.deepcopy(teacher_net)
            if kind == "LoRA":
                student = arch.wrap(add_lora(net, rank=s["rank"]))
                target, lr = LoRATeacher(student), 2e-3
            else:
                student, target, lr = arch.wrap(net.requires_grad_(True)), teacher, 5e-4
            config = SFDConfig(num_steps=nfe + 1, iterations=s["sfd"], lr=lr, **base)
            start = time.perf_counter()
            SFDTrainer(student, target, config, shape=(1, 8, 8), condition=condition).fit(progress=False)
            times[f"SFD {kind}, NFE {nfe}"] = time.perf_counter() - start
            students[kind, nfe] = student.eval().requires_grad_(False)

    rows, converged = {}, []
    for seed in s["eval_seeds"]:
        g = torch.Generator().manual_seed(1000 + seed)
        z = torch.randn(s["n_eval"], 1, 8, 8, generator=g)
        extra = arch.cond(emb[torch.randint(10, (s["n_eval"],), generator=g)])

        def score(states):
            samples = arch.to_data(states, sigma_min)
            return data.distance(samples.reshape(len(samples), 64))

        def put(name, nfe, states):
            rows.setdefault((name, nfe), []).append(score(states))

        with torch.no_grad():
            fine = SFDConfig(num_steps=101, **base).timestamps()
            converged.append(score(dpmpp_3m_trajectory(teacher, z * sigma_max, fine, extra)[-1]))
            for nfe in s["nfes"]:
                config = SFDConfig(num_steps=nfe + 1, **base)
                ts = config.timestamps()
                put("teacher, Euler", nfe, euler_trajectory(teacher, z * sigma_max, ts, extra)[-1])
                put("teacher, DPM++(3M)", nfe, dpmpp_3m_trajectory(teacher, z * sigma_max, ts, extra)[-1])
                for kind in ("full", "LoRA"):
                    put(f"SFD {kind} student", nfe,
                        sample_sfd(students[kind, nfe], z * sigma_max, config, extra_args=extra, disable=True))
                    put(f"SFD {kind} + Distillation++ (interpolate, w 0.3; one more teacher call)", nfe,
                        sample_sfd(students[kind, nfe], z * sigma_max, config, extra_args=extra, disable=True,
                                   teacher=teacher, w=0.3))
    return render(arch, rows, converged, times, s, data, sigma_min, sigma_max)


def render(arch, rows, converged, times, s, data, sigma_min, sigma_max) -> str:
    nfes = sorted({nfe for _, nfe in rows})
    body = []
    for name in dict.fromkeys(name for name, _ in rows):
        cells = []
        for nfe in nfes:
            mean, std = mean_std(rows[name, nfe])
            cells.append(f"{mean:.2f}" + (f" ± {std:.2f}" if len(rows[name, nfe]) > 1 else ""))
        body.append([name, *cells])
    lines = [arch.heading, "",
             f"Teacher: {arch.teacher_text} ({s['teacher']} iterations of {BATCH}) on sklearn's 8x8 digits in "
             f"[-1, 1]. Students: SFD from it on VE sigmas {sigma_min:.3g}..{sigma_max:.3g} (rho 7, K = 4), "
             f"{s['sfd']} trajectory batches of {BATCH} each, full fine-tuning (Adam 5e-4) or LoRA rank {s['rank']} "
             "on the attention projections (Adam 2e-3), one per NFE, the teacher at guidance 1. Distillation++ adds "
             "one teacher-refined first step (one more network call than the column's NFE). "
             f"{data.metric_name}, over {len(s['eval_seeds'])} evaluation seed(s) of {s['n_eval']} samples of random "
             "classes; lower is better. Columns: the student's NFE; the teacher's solvers run on the same timestamps. "
             f"The teacher's converged samples (DPM++(3M), 100 steps) score {mean_std(converged)[0]:.2f}.", "",
             table(["method", *[f"NFE {n}" for n in nfes]], body), "",
             "Training time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    setting = Config.make(args.quick, "cpu", args.tiny)
    print(run(setting))
    print(run_flow(setting))
