"""The real Forge webui (the pinned tree), started in this process on small random SD1.5 checkpoints.

Forge loads checkpoints through its own backend (`backend.loader.forge_loader`), which recognises
the model from the state dict (huggingface_guess: an SD1.5 UNet has 320 base channels and a 768-wide
context) and builds the text encoder and VAE from the full-size configs in its
`backend/huggingface/`. So the checkpoints here have a full-size random CLIP-L and VAE and a
one-level SD1.5-shaped UNet, stored in fp16 (~330 MB each). Everything run is Forge's code, with
this repository cloned into extensions/. `.ci/run` builds `.venv-forge` for these tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from hosts import SHARED_HOSTS, fill, require, webui_api, webui_argv, webui_data_dir

UNET = {"in_channels": 4, "model_channels": 320, "out_channels": 4, "num_res_blocks": [1], "channel_mult": [1],
        "num_heads": 8, "num_head_channels": -1, "use_spatial_transformer": True, "transformer_depth": [1],
        "transformer_depth_output": [1, 1], "transformer_depth_middle": 1, "context_dim": 768,
        "use_linear_in_transformer": False, "adm_in_channels": None}


def forge_root() -> Path | None:
    root = Path(os.environ.get("KDISTPP_FORGE", SHARED_HOSTS / "forge-dfdcbab")).resolve()  # start() changes directory
    return root if (root / "backend" / "loader.py").is_file() else None


def make_checkpoints(root: Path, models_dir: Path, seeds: dict[str, int]) -> None:
    """SD1.5-format checkpoints (ldm key names) built from Forge's own module classes."""
    import safetensors.torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL

    repo = root / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5"
    models_dir.mkdir(parents=True, exist_ok=True)
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(repo / "vae"))
    fill(vae, 1)
    clip = CLIPTextModel(CLIPTextConfig.from_pretrained(repo / "text_encoder"))
    fill(clip, 2)
    shared = {**{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
              **{f"cond_stage_model.transformer.{k}": v for k, v in clip.state_dict().items()}}
    for name, seed in seeds.items():
        unet = IntegratedUNet2DConditionModel(**UNET)
        fill(unet, seed)
        state = {**shared, **{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}}
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        safetensors.torch.save_file(state, str(models_dir / f"{name}.safetensors"))


_started: dict = {}


def start(tmp: Path, seeds: dict[str, int]):
    """Imports and initialises Forge as its webui.py does (API only); returns (modules.shared, FastAPI app).

    Forge can start once per process (its options are parsed at import): a later call adds its
    checkpoints to the running Forge's models folder and rescans it, and returns the same objects."""
    if _started:  # before the root check: the relative KDISTPP_FORGE no longer resolves from the new directory
        from modules import sd_models

        make_checkpoints(_started["root"], _started["models"], seeds)
        sd_models.list_models()
        return _started["api"]
    root = forge_root()
    if root is None:
        pytest.skip("Forge not found: set KDISTPP_FORGE or put it in ../shared/hosts/forge-dfdcbab")
    require("Forge", ".venv-forge", "diffusers", "gradio", "huggingface_guess")
    data = webui_data_dir(tmp, {})
    os.chdir(root)
    sys.path.insert(0, str(root))
    sys.argv = webui_argv(root, data, "--nowebui", *(["--always-cpu"] if not torch.cuda.is_available() else []))
    from modules_forge.initialization import initialize_forge

    initialize_forge()  # Forge's backend must be set up before its module classes build the checkpoints
    make_checkpoints(root, data / "models" / "Stable-diffusion", seeds)
    _started.update(root=root, models=data / "models" / "Stable-diffusion", api=webui_api())
    return _started["api"]
