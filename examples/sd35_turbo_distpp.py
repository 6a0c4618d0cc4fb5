"""SD3.5 Large Turbo (student, 4 steps) refined by SD3.5 Large (teacher, CFG) with Distillation++, in diffusers.

    pip install -e ".[diffusers]"          # from the repository root
    python examples/sd35_turbo_distpp.py --prompt "a lighthouse at dusk, oil painting" --out lighthouse.png

The weights are not in this repository: they are downloaded from the Hugging Face hub
(stabilityai/stable-diffusion-3.5-large-turbo and stabilityai/stable-diffusion-3.5-large, both
gated: accept their license on the hub and log in with `hf auth login` first), or read from local
diffusers folders given as --turbo / --large. This project's CI cannot fetch them: its tests
(tests/test_integration_diffusers_flow.py) run this script's sampling code, `distpp_latents`, on
tiny random transformers and check it against StableDiffusion3Pipeline. The Turbo pipeline (text
encoders, VAE, the student transformer, distilled to run without CFG) is loaded whole; from Large
only the transformer (the teacher, with CFG as one call on a doubled batch per guided step). Two 8B
transformers in bfloat16 need a GPU with about 48 GB; --device cpu runs in float32 and is slow.
"""

from __future__ import annotations

import argparse

import torch

import kdistpp
from kdistpp.integrations.diffusers import flow_cond, flow_sigmas, flow_transformer_denoiser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--turbo", default="stabilityai/stable-diffusion-3.5-large-turbo",
                   help="hub id or local folder (student)")
    p.add_argument("--large", default="stabilityai/stable-diffusion-3.5-large", help="hub id or local folder (teacher)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--teacher-cfg", type=float, default=4.0, help="the teacher's classifier-free guidance scale")
    p.add_argument("--w", type=float, default=0.3, help="Distillation++ weight (0: plain Turbo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=1024, help="image height and width in pixels (a multiple of 16)")
    p.add_argument("--out", default="distpp.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda when available, else cpu; bfloat16 on CUDA, float32 elsewhere)")
    return p


def distpp_latents(student_transformer, teacher_transformer, scheduler, prompt_embeds, pooled_prompt_embeds,
                   negative_prompt_embeds, negative_pooled_prompt_embeds, noise, *, steps: int = 4, w: float = 0.3,
                   teacher_cfg: float = 4.0, disable=None):
    """(B, 16, H, W) SD3 latents from `noise` (the state at s = 1) in `steps` Euler steps of the
    student on StableDiffusion3Pipeline's own sigmas, the first guided by the CFG teacher. w = 0 is
    the Turbo pipeline's output at guidance_scale 0 (no CFG)."""
    cond = flow_cond(prompt_embeds, pooled_prompt_embeds)
    uncond = flow_cond(negative_prompt_embeds, negative_pooled_prompt_embeds)
    student = flow_transformer_denoiser(student_transformer, cond=cond)  # Turbo: no CFG, one call per step
    teacher = flow_transformer_denoiser(teacher_transformer, cond=cond, uncond=uncond, cond_scale=teacher_cfg)
    height, width = noise.shape[-2:]
    sigmas = flow_sigmas(scheduler, steps, "sd3", image_seq_len=(height // 2) * (width // 2), device=noise.device)
    return kdistpp.sample_euler_distpp(student, noise, sigmas, teacher=teacher, w=w, parametrization="flow",
                                       disable=disable)


def main(argv=None):
    args = build_parser().parse_args(argv)

    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusion3Pipeline.from_pretrained(args.turbo, torch_dtype=dtype).to(device)
    teacher_transformer = SD3Transformer2DModel.from_pretrained(args.large, subfolder="transformer",
                                                                torch_dtype=dtype).to(device)
    with torch.no_grad():
        embeds, neg_embeds, pooled, neg_pooled = pipe.encode_prompt(
            args.prompt, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
            negative_prompt=args.negative_prompt)

    side = args.size // pipe.vae_scale_factor
    channels = pipe.transformer.config.in_channels
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(1, channels, side, side, generator=g, device=device, dtype=dtype)
    with torch.no_grad():
        latents = distpp_latents(pipe.transformer, teacher_transformer, pipe.scheduler, embeds, pooled, neg_embeds,
                                 neg_pooled, noise, steps=args.steps, w=args.w, teacher_cfg=args.teacher_cfg)
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents).sample
    pipe.image_processor.postprocess(image, output_type="pil")[0].save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
