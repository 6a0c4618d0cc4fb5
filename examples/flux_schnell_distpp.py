"""FLUX.1-schnell (student, 4 steps) refined by FLUX.1-dev (teacher) with Distillation++, in diffusers.

    pip install -e ".[diffusers]"          # from the repository root
    python examples/flux_schnell_distpp.py --prompt "a lighthouse at dusk, oil painting" --out lighthouse.png

The weights are not in this repository: they are downloaded from the Hugging Face hub
(black-forest-labs/FLUX.1-schnell and black-forest-labs/FLUX.1-dev; FLUX.1-dev is gated, so accept
its license on the hub and log in with `hf auth login` first), or read from local diffusers folders
given as --schnell / --dev. This project's CI cannot fetch them: its tests
(tests/test_integration_diffusers_flow.py) run this script's sampling code, `distpp_latents`, on
tiny random transformers and check it against FluxPipeline. schnell's pipeline (text encoders, VAE,
the student transformer) is loaded whole; from dev only the transformer (the teacher, called with
its distilled guidance, one call per guided step). Two 12B transformers in bfloat16 need a GPU with
about 60 GB; --device cpu runs in float32 and needs far more memory and time.
"""

from __future__ import annotations

import argparse

import torch

import kdistpp
from kdistpp.integrations.diffusers import flow_cond, flow_sigmas, flow_transformer_denoiser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schnell", default="black-forest-labs/FLUX.1-schnell", help="hub id or local folder (student)")
    p.add_argument("--dev", default="black-forest-labs/FLUX.1-dev", help="hub id or local folder (teacher)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--teacher-guidance", type=float, default=3.5, help="FLUX.1-dev's distilled guidance")
    p.add_argument("--w", type=float, default=0.3, help="Distillation++ weight (0: plain schnell)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=1024, help="image height and width in pixels (a multiple of 16)")
    p.add_argument("--out", default="distpp.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default cuda when available, else cpu; bfloat16 on CUDA, float32 elsewhere)")
    return p


def distpp_latents(student_transformer, teacher_transformer, scheduler, prompt_embeds, pooled_prompt_embeds,
                   noise, *, steps: int = 4, w: float = 0.3, teacher_guidance: float = 3.5, disable=None):
    """Unpacked (B, C, H, W) Flux latents from `noise` (the state at s = 1) in `steps` Euler steps of
    the student on FluxPipeline's own sigmas, the first guided by the teacher. w = 0 is schnell's
    pipeline output (unpacked)."""
    cond = flow_cond(prompt_embeds, pooled_prompt_embeds)
    student = flow_transformer_denoiser(student_transformer, cond=cond)  # schnell: no guidance input
    teacher = flow_transformer_denoiser(teacher_transformer, cond=cond, guidance=teacher_guidance)
    height, width = noise.shape[-2:]
    sigmas = flow_sigmas(scheduler, steps, "flux", image_seq_len=(height // 2) * (width // 2), device=noise.device)
    return kdistpp.sample_euler_distpp(student, noise, sigmas, teacher=teacher, w=w, parametrization="flow",
                                       disable=disable)


def main(argv=None):
    args = build_parser().parse_args(argv)

    from diffusers import FluxPipeline, FluxTransformer2DModel

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = FluxPipeline.from_pretrained(args.schnell, torch_dtype=dtype).to(device)
    teacher_transformer = FluxTransformer2DModel.from_pretrained(args.dev, subfolder="transformer",
                                                                 torch_dtype=dtype).to(device)
    with torch.no_grad():
        prompt_embeds, pooled, _ = pipe.encode_prompt(args.prompt, prompt_2=None, device=device,
                                                      max_sequence_length=256)

    side = 2 * (args.size // (pipe.vae_scale_factor * 2))  # the latent's height and width, as FluxPipeline
    channels = pipe.transformer.config.in_channels // 4
    g = torch.Generator(device).manual_seed(args.seed)
    noise = torch.randn(1, channels, side, side, generator=g, device=device, dtype=dtype)
    with torch.no_grad():
        latents = distpp_latents(pipe.transformer, teacher_transformer, pipe.scheduler, prompt_embeds, pooled, noise,
                                 steps=args.steps, w=args.w, teacher_guidance=args.teacher_guidance)
        vae = pipe.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents).sample
    pipe.image_processor.postprocess(image, output_type="pil")[0].save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
