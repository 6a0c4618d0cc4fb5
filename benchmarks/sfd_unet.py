"""SFD on an SD-architecture UNet: a class-conditional diffusers UNet2DConditionModel teacher trained here on
sklearn's 8x8 digits (the class enters as a one-token "prompt embedding" through cross-attention, as text
does in Stable Diffusion), distilled by SFD into full and LoRA students at NFE 2-4, against the teacher's
own solvers at the same NFE and its converged samples, and with Distillation++ on top.
"""

from __future__ import annotations

import time

import torch

from common import Config, mean_std, table
from kdistpp.sfd import LoRATeacher, SFDConfig, SFDTrainer, UNetStudent, add_lora, dpmpp_3m_trajectory, sample_sfd
from kdistpp.sfd.trajectory import euler_trajectory
from sfd import digits_dataset

NFES = (2, 3, 4)
CONTEXT = 32
BATCH = 64  # the teacher's training batch and SFD's trajectory batch


def sizes(cfg: Config) -> dict:
    if cfg.tiny:
        return dict(ddpm=30, sfd=2, n_eval=100, eval_seeds=(0,), nfes=(2,), classifier=20, rank=4)
    if cfg.quick:
        return dict(ddpm=300, sfd=15, n_eval=400, eval_seeds=(0,), nfes=NFES, classifier=200, rank=8)
    return dict(ddpm=1500, sfd=60, n_eval=1000, eval_seeds=(0, 1), nfes=NFES, classifier=600, rank=8)


def unet():
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=32)


def class_embeddings() -> torch.Tensor:
    """A fixed unit-norm "prompt embedding" (one token) per digit class."""
    table_ = torch.randn(10, 1, CONTEXT, generator=torch.Generator().manual_seed(5))
    return table_ / table_.norm(dim=-1, keepdim=True) * CONTEXT ** 0.5


def train_teacher(x, y, iterations, scheduler):
    """Epsilon prediction on DDPM's discrete timesteps (the usual SD objective), Adam 1e-3, cosine decay."""
    import math

    net = unet()
    emb = class_embeddings()
    alphas = scheduler.alphas_cumprod.float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / iterations)))
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(iterations):
        idx = torch.randint(len(x), (BATCH,), generator=g)
        x0 = x[idx].reshape(-1, 1, 8, 8)
        t = torch.randint(1000, (BATCH,), generator=g)
        a = alphas[t].reshape(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        pred = net(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=emb[y[idx]]).sample
        loss = ((pred - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def run(cfg: Config) -> str:
    import copy

    import diffusers

    s = sizes(cfg)
    data = digits_dataset(s["classifier"])
    x, y = data.train, torch.tensor(__import__("sklearn.datasets", fromlist=["load_digits"]).load_digits().target)
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    start = time.perf_counter()
    teacher_net = train_teacher(x, y, s["ddpm"], scheduler)
    times = {"teacher (DDPM)": time.perf_counter() - start}
    teacher = UNetStudent(teacher_net, scheduler)
    emb = class_embeddings()
    sigma_min, sigma_max = teacher.sigma_min, teacher.sigma_max
    base = dict(sigma_min=sigma_min, sigma_max=sigma_max, batch_size=BATCH, seed=0)

    def condition(generator, batch):
        return {"cond": {"encoder_hidden_states": emb[torch.randint(10, (batch,), generator=generator)]}}

    students = {}
    for nfe in s["nfes"]:
        for kind in ("full", "LoRA"):
            net = copy.deepcopy(teacher_net)
            if kind == "LoRA":
                student = UNetStudent(add_lora(net, rank=s["rank"]), scheduler)
                target, lr = LoRATeacher(student), 2e-3
            else:
                student, target, lr = UNetStudent(net.requires_grad_(True), scheduler), teacher, 5e-4
            config = SFDConfig(num_steps=nfe + 1, iterations=s["sfd"], lr=lr, **base)
            start = time.perf_counter()
            SFDTrainer(student, target, config, shape=(1, 8, 8), condition=condition).fit(progress=False)
            times[f"SFD {kind}, NFE {nfe}"] = time.perf_counter() - start
            students[kind, nfe] = student.eval().requires_grad_(False)

    rows, converged = {}, []
    for seed in s["eval_seeds"]:
        g = torch.Generator().manual_seed(1000 + seed)
        z = torch.randn(s["n_eval"], 1, 8, 8, generator=g)
        labels = torch.randint(10, (s["n_eval"],), generator=g)
        extra = {"cond": {"encoder_hidden_states": emb[labels]}}
        score = lambda samples: data.distance(samples.reshape(len(samples), 64))  # noqa: E731

        def put(name, nfe, samples):
            rows.setdefault((name, nfe), []).append(score(samples))

        with torch.no_grad():
            fine = SFDConfig(num_steps=101, **base).timestamps()
            converged.append(score(dpmpp_3m_trajectory(teacher, z * sigma_max, fine, extra)[-1]))
            for nfe in s["nfes"]:
                config = SFDConfig(num_steps=nfe + 1, **base)
                ts = config.timestamps()
                put("teacher, Euler", nfe, euler_trajectory(teacher, z * sigma_max, ts, extra)[-1])
                put("teacher, DPM++(3M)", nfe, dpmpp_3m_trajectory(teacher, z * sigma_max, ts, extra)[-1])
                for kind in ("full", "LoRA"):
                    put(f"SFD {kind} student", nfe, sample_sfd(students[kind, nfe], z * sigma_max, config, extra_args=extra,
                                                               disable=True))
                    put(f"SFD {kind} + Distillation++ (interpolate, w 0.3; one more teacher call)", nfe,
                        sample_sfd(students[kind, nfe], z * sigma_max, config, extra_args=extra, disable=True,
                                   teacher=teacher, w=0.3))
    return render(rows, converged, times, s, data, sigma_min, sigma_max)


def render(rows, converged, times, s, data, sigma_min, sigma_max) -> str:
    nfes = sorted({nfe for _, nfe in rows})
    names = list(dict.fromkeys(name for name, _ in rows))
    body = []
    for name in names:
        cells = []
        for nfe in nfes:
            values = rows.get((name, nfe))
            if values is None:
                cells.append("")
            else:
                mean, std = mean_std(values)
                cells.append(f"{mean:.2f}" + (f" ± {std:.2f}" if len(values) > 1 else ""))
        body.append([name, *cells])
    lines = ["## SFD on an SD-architecture UNet (digits, class-conditional)", "",
             "Teacher: a diffusers `UNet2DConditionModel` (two levels, 32/64 channels, cross-attention on the class's "
             f"one-token embedding) trained here by epsilon prediction on DDPM's scaled-linear schedule ({s['ddpm']} "
             "iterations of 128) on sklearn's 8x8 digits in [-1, 1]. Students: SFD from it at its own sigma range "
             f"({sigma_min:.3g}..{sigma_max:.3g}, rho 7, K = 4), {s['sfd']} trajectory batches of {BATCH} each, full fine-tuning "
             f"(Adam 5e-4) or LoRA rank {s['rank']} on the attention projections (Adam 2e-3), one per NFE; the teacher at "
             "guidance 1. Distillation++ adds one teacher-refined first step (its NFE counts the teacher call). "
             f"{data.metric_name}, over {len(s['eval_seeds'])} evaluation seed(s) of {s['n_eval']} samples, random "
             "classes; lower is better. Columns: NFE of the student (the teacher's solvers run on the same timestamps). "
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
    print(run(Config.make(args.quick, "cpu", args.tiny)))
