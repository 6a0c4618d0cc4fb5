"""Real-size cost (paper Table 2's wall-time column): an SDXL UNet built from its published config
with random weights has the compute of the real checkpoint. Timed side by side, interleaved per
repeat: one student step (cfg 1), one teacher step (CFG, cond and uncond in one batched call), and
whole runs of 4 student steps + 1 Distillation++ teacher step against 5 plain student steps.

On CUDA: fp16, 1024x1024 images (128x128 latents), student and teacher as two resident UNets.
On a CPU: fp32 at smaller latents, one UNet serving as both (the same compute); the seconds
are this CPU's, the ratios are the point. `tiny=True` (run.py's --quick and --tiny, unless
--real-sdxl) builds a tiny UNet of the same architecture instead: it checks the code path in
seconds and little memory, and its timings say nothing about the real size.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import kdistpp
from common import table
from kdistpp.integrations.diffusers import DiffusersUNetDenoiser, sdxl_time_ids, sigmas_at_timesteps, unet_denoiser

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the architecture SDXL-Lightning,
# DMD2, Hyper-SD and SDXL-Turbo share); entries left at diffusers' defaults are omitted.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled text (1280) + 6 time ids x 256
)
TEXT_TOKENS, POOLED_DIM = 77, 1280
TINY_UNET = dict(SDXL_UNET, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
                 attention_head_dim=(2, 4, 4), cross_attention_dim=32, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8)
LIGHTNING_4 = (999, 749, 499, 249)  # SDXL-Lightning's trailing timesteps
PLAIN_5 = (999, 799, 599, 399, 199)
PAPER = "Park et al. 2024, Table 2 (LCM-SDXL, RTX 4090): 4+1 steps 1.987 s vs 5 student steps 1.996 s"


def setting(device: torch.device, tiny: bool, quick: bool) -> dict:
    if tiny:
        return dict(unet=TINY_UNET, pooled=16, latent=16, dtype=torch.float32, repeats=2)
    if device.type == "cuda":
        return dict(unet=SDXL_UNET, pooled=POOLED_DIM, latent=128, dtype=torch.float16, repeats=5 if quick else 10)
    return dict(unet=SDXL_UNET, pooled=POOLED_DIM, latent=16 if quick else 32, dtype=torch.float32, repeats=2 if quick else 3)


def build(s: dict, device: torch.device):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.utils import logging

    logging.set_verbosity_error()  # its dtype-cast advice is about from_pretrained checkpoints, not this random UNet
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**s["unet"]).to(device, s["dtype"]).eval().requires_grad_(False)
    # Two resident UNets where memory allows (as in use); on CPU one serves as both: same compute.
    teacher_unet = copy.deepcopy(unet) if device.type == "cuda" else unet
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ctx_dim = s["unet"]["cross_attention_dim"]
    px = s["latent"] * 8

    def cond(seed):
        g = torch.Generator().manual_seed(seed)
        return {"encoder_hidden_states": torch.randn(1, TEXT_TOKENS, ctx_dim, generator=g).to(device, s["dtype"]),
                "added_cond_kwargs": {"text_embeds": torch.randn(1, s["pooled"], generator=g).to(device, s["dtype"]),
                                      "time_ids": sdxl_time_ids(px, px, 1, device=device, dtype=s["dtype"])}}

    student = unet_denoiser(unet, scheduler, cond=cond(1))
    teacher = unet_denoiser(teacher_unet, scheduler, cond=cond(1), uncond=cond(2), cond_scale=5.0)
    plain = DiffusersUNetDenoiser(unet, scheduler)
    n_params = sum(p.numel() for p in unet.parameters())
    return student, teacher, sigmas_at_timesteps(plain, LIGHTNING_4), sigmas_at_timesteps(plain, PLAIN_5), n_params


def run(device: torch.device, tiny: bool = False, quick: bool = False) -> str:
    s = setting(device, tiny, quick)
    student, teacher, sig4, sig5, n_params = build(s, device)
    x = torch.randn(1, 4, s["latent"], s["latent"], generator=torch.Generator().manual_seed(0)).to(device, s["dtype"])
    sigma = sig4[:1]
    step, run_5 = "student step (cfg 1, batch 1)", "5 student steps"
    arms = {  # name: (thunk, the arm its ratio is taken against)
        step: (lambda: student(x, sigma), step),
        "teacher step (CFG, batch 2)": (lambda: teacher(x, sigma), step),
        "4 student steps + 1 teacher step (Distillation++)":
            (lambda: kdistpp.sample_euler_distpp(student, x * sig4[0], sig4, disable=True, teacher=teacher, w=0.3), run_5),
        run_5: (lambda: kdistpp.sample_euler_distpp(student, x * sig5[0], sig5, disable=True, teacher=teacher, w=0.0),
                run_5),
    }
    times = {name: [] for name in arms}
    peaks = {}
    for fn, _ in arms.values():  # warm-up (kernel selection, allocator) outside the timings
        fn()
    for _ in range(s["repeats"]):
        for name, (fn, _) in arms.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, t in times.items():
        row = [name, f"{med[name]:.3f}", f"{min(t):.3f}-{max(t):.3f}", f"{med[name] / med[arms[name][1]]:.3f}"]
        rows.append(row + ([f"{peaks[name]:.2f}"] if peaks else []))
    header = ["arm", "median s", "range s", "ratio"] + (["peak GiB"] if peaks else [])
    where = (f"{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "CPU") + \
        f", {str(s['dtype']).replace('torch.', '')}, {s['latent']}x{s['latent']} latents ({s['latent'] * 8} px), " \
        f"UNet with " + (f"{n_params / 1e9:.3f} B" if n_params > 1e8 else f"{n_params / 1e6:.2f} M") + " parameters"
    size = ("**Tiny UNet** (the SDXL architecture with narrow blocks), not the real size: this setting checks the "
            "code path only, and its seconds and ratios say nothing about a real-size step. The full run, or "
            "`--real-sdxl` with `--quick`, times the real-size UNet." if tiny else
            "Real-size SDXL UNet (random weights, the published config).")
    note = ("" if device.type == "cuda" else
            "Measured on the CPU: the UNet runs in fp32 at smaller latents than the paper's 1024x1024; one UNet "
            "serves as both student and teacher (identical compute). Seconds are this CPU's; the ratios show what "
            "the teacher's doubled batch costs relative to a student step. On CUDA the same command uses fp16 at "
            "128x128 latents.")
    return "\n".join([
        "## Real-size cost: SDXL UNet (Table 2 wall time)", "",
        size, "",
        f"{where}; {s['repeats']} interleaved repeats after one warm-up. Ratios: single steps against one student "
        "step, whole runs against 5 student steps. Both runs make 5 UNet calls; the Distillation++ run's teacher "
        f"call carries the batch of 2 that CFG needs. Paper: {PAPER}; it credits the parity to running student and "
        "teacher in parallel and batching CFG. In the default interpolate form the teacher needs the student's "
        "estimate first, so kdistpp makes the calls in sequence: the extra cost is the teacher call's excess over "
        "a student call.", "",
        table(header, rows), "", note.strip(),
    ]).rstrip()
