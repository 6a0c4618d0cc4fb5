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


# SDXL: Forge recognises a checkpoint by its UNet's shape (huggingface_guess's model list) and builds its text
# encoders and VAE from the configs of the matched entry's folder. A tiny SDXL is registered there as an
# entry of its own (a subclass of huggingface_guess's SDXL, so Forge's loader picks its StableDiffusionXL
# engine), whose folder holds SDXL's tokenizers and scheduler with small text-encoder and VAE configs.
SDXL_UNET = {"in_channels": 4, "model_channels": 32, "out_channels": 4, "num_res_blocks": [1, 1],
             "channel_mult": [1, 2], "num_classes": "sequential", "num_heads": -1, "num_head_channels": 64,
             "use_spatial_transformer": True, "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1],
             "transformer_depth_middle": 1, "context_dim": 2048, "use_linear_in_transformer": True,
             "adm_in_channels": 2816}  # SDXL's context (CLIP-L 768 + CLIP-G 1280) and vector (pooled 1280 + sizes)
# (64-channel attention heads: what Forge gives every SDXL-family UNet it recognises)
# the refiner's architecture: CLIP-G alone (context 1280), its vector with the aesthetic score (2560)
SDXL_REFINER_UNET = {**SDXL_UNET, "context_dim": 1280, "adm_in_channels": 2560}
SDXL_REPOS = {False: "stabilityai/stable-diffusion-xl-base-1.0", True: "stabilityai/stable-diffusion-xl-refiner-1.0"}
TINY_TEXT_ENCODER = {"num_hidden_layers": 2, "intermediate_size": 64, "num_attention_heads": 4}


def sdxl_repo(root: Path, folder: Path, refiner: bool = False) -> Path:
    """Forge's SDXL (or SDXL refiner) folder of backend/huggingface, with 2-layer text encoders of SDXL's widths
    and a small VAE."""
    import json
    import shutil

    source = root / "backend" / "huggingface" / SDXL_REPOS[refiner]
    folder.mkdir(parents=True, exist_ok=True)
    encoders = [p.name for p in source.iterdir() if p.name.startswith("text_encoder")]
    for path in source.iterdir():
        if path.name not in (*encoders, "vae"):
            (shutil.copytree if path.is_dir() else shutil.copy)(path, folder / path.name)
    for name, changes in ([(e, TINY_TEXT_ENCODER) for e in encoders]
                          + [("vae", {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1})]):
        config = json.loads((source / name / "config.json").read_text())
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def register_tiny_sdxl(root: Path, folder: Path, refiner: bool = False):
    """Adds the tiny SDXL (or SDXL refiner) to huggingface_guess's model list (first, once); returns its entry
    class, a subclass of huggingface_guess's SDXL (SDXLRefiner) so that Forge's loader builds its engine."""
    from huggingface_guess import model_list

    for entry in model_list.models:
        if getattr(entry, "kdistpp_tiny", None) == ("refiner" if refiner else "base"):
            return entry
    repo = sdxl_repo(root, folder, refiner)
    unet = SDXL_REFINER_UNET if refiner else SDXL_UNET
    unet_config = {"model_channels": unet["model_channels"], "use_linear_in_transformer": True,
                   "transformer_depth": unet["transformer_depth"], "context_dim": unet["context_dim"],
                   "adm_in_channels": unet["adm_in_channels"], "use_temporal_attention": False}
    base = model_list.SDXLRefiner if refiner else model_list.SDXL
    entry = type(f"Tiny{base.__name__}", (base,), {"huggingface_repo": str(repo), "unet_config": unet_config,
                                                     "kdistpp_tiny": "refiner" if refiner else "base"})
    model_list.models.insert(0, entry)
    return entry


def make_sdxl_checkpoints(root: Path, models_dir: Path, seeds: dict[str, int], folder: Path,
                          refiner: bool = False) -> None:
    """SDXL-format checkpoints (sgm key names, as Forge saves an SDXL engine) built from Forge's own classes:
    its UNet with SDXL_UNET, its VAE and the text encoders from the tiny folder's configs. refiner=True: of
    the refiner's architecture (SDXL_REFINER_UNET, CLIP-G alone)."""
    import safetensors.torch
    from huggingface_guess import model_list
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.nn.vae import IntegratedAutoencoderKL

    repo = Path(register_tiny_sdxl(root, folder, refiner).huggingface_repo)
    models_dir.mkdir(parents=True, exist_ok=True)
    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(repo / "vae"))
    fill(vae, 1)
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
        repo / ("text_encoder" if refiner else "text_encoder_2")))
    fill(clip_g, 3)
    text = {f"clip_g.transformer.{k}": v for k, v in clip_g.state_dict().items()}
    if not refiner:
        clip_l = CLIPTextModel(CLIPTextConfig.from_pretrained(repo / "text_encoder"))
        fill(clip_l, 2)
        text.update({f"clip_l.transformer.{k}": v for k, v in clip_l.state_dict().items()})
    save_format = model_list.SDXLRefiner if refiner else model_list.SDXL  # Forge's own SDXL save formats
    shared = {**{f"first_stage_model.{k}": v for k, v in vae.state_dict().items()},
              **save_format.process_clip_state_dict_for_saving(None, text)}
    for name, seed in seeds.items():
        unet = IntegratedUNet2DConditionModel(**(SDXL_REFINER_UNET if refiner else SDXL_UNET))
        fill(unet, seed)
        state = {**shared, **{f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}}
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        safetensors.torch.save_file(state, str(models_dir / f"{name}.safetensors"))


def add_sdxl_checkpoints(seeds: dict[str, int], refiner: bool = False) -> Path:
    """Tiny SDXL checkpoints (refiner=True: of the refiner's architecture) added to the started Forge's models
    folder, which is rescanned; returns the folder."""
    from modules import sd_models

    folder = _started["models"].parent / ("tiny-sdxl-refiner" if refiner else "tiny-sdxl")
    make_sdxl_checkpoints(_started["root"], _started["models"], seeds, folder, refiner)
    sd_models.list_models()
    return _started["models"]
