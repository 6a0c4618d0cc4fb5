"""SDXL-Lightning 4-step (student) refined by SDXL base (teacher) with Distillation++, in diffusers.

    pip install -e ".[diffusers]"          # from the repository root
    python examples/sdxl_lightning_distpp.py --base /models/sdxl-base --lightning-unet /models/sdxl_lightning_4step_unet.safetensors \
        --prompt "a lighthouse at dusk, oil painting" --out lighthouse.png

--base is a local diffusers folder of stabilityai/stable-diffusion-xl-base-1.0 (text encoders, VAE,
UNet: the teacher); --lightning-unet is ByteDance/SDXL-Lightning's UNet checkpoint for the same
architecture (the student, distilled at cfg 1). Any SDXL-family student works the same way (DMD2,
Hyper-SD, or the base UNet with an LCM/Lightning LoRA fused). Meant for a GPU with room for two UNets
(float16); --device cpu runs in float32 and is slow.
"""

from __future__ import annotations

import argparse
import copy

import torch

import kdistpp
from kdistpp.integrations.diffusers import DiffusersUNetDenoiser, sdxl_time_ids, sigmas_at_timesteps, unet_denoiser


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True)
    p.add_argument("--lightning-unet", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--teacher-cfg", type=float, default=5.0)
    p.add_argument("--w", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--out", default="distpp.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda when available, else cpu; float16 on CUDA, float32 elsewhere)")
    args = p.parse_args()

    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(args.base, torch_dtype=dtype).to(device)
    teacher_unet = pipe.unet
    student_unet = copy.deepcopy(teacher_unet)
    student_unet.load_state_dict(load_file(args.lightning_unet, device=str(device)))
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)

    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            args.prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=args.negative_prompt)
    time_ids = sdxl_time_ids(args.size, args.size, 1, device=device, dtype=dtype)
    cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    uncond = {"encoder_hidden_states": neg_embeds, "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids}}

    student = unet_denoiser(student_unet, scheduler, cond=cond)  # Lightning: cfg 1, one UNet call per step
    teacher = unet_denoiser(teacher_unet, scheduler, cond=cond, uncond=uncond, cond_scale=args.teacher_cfg)
    sigmas = sigmas_at_timesteps(DiffusersUNetDenoiser(student_unet, scheduler), [999, 749, 499, 249]).to(device)

    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g, device=device, dtype=dtype)
    latents = kdistpp.sample_euler_distpp(student, noise * sigmas[0], sigmas, teacher=teacher, w=args.w)

    with torch.no_grad():
        vae = pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16
        image = vae.decode(latents.float() / vae.config.scaling_factor).sample
    pipe.image_processor.postprocess(image, output_type="pil")[0].save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
