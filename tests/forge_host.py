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
    if not seeds:
        return
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


# Flow models (Flux, Chroma, SD3/3.5). Forge builds a checkpoint's text encoders and VAE from the config files in
# its backend/huggingface/ (T5-XXL alone is 4.7B parameters), and its model guess (huggingface_guess) hard-codes
# the full-size Flux transformer (12B). The harness copies that folder with the flow models' text-encoder and
# VAE configs made small, points Forge's loader at the copy, and has the guess read the Flux transformer's
# sizes from the checkpoint. Everything else is Forge's: its loader, engines, predictors, model classes.
FLUX = {"in_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0,
        "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 14, 14], "theta": 10000,
        "qkv_bias": True}
TINY_CONFIGS = {  # config.json keys, per model class the config builds
    "CLIPTextModel": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
                      "projection_dim": 32},
    "T5EncoderModel": {"d_model": 32, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 2,  # Forge wants > 16 tensors
                       "num_decoder_layers": 2},
    "AutoencoderKL": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
}
FLOW_REPOS = ["black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell", "Chroma",
              "stabilityai/stable-diffusion-3-medium-diffusers"]


def small_flow_configs(root: Path, target: Path) -> Path:
    """A copy of Forge's backend/huggingface/ whose flow models' text encoders and VAE are small."""
    import json
    import shutil

    if not target.exists():
        shutil.copytree(root / "backend" / "huggingface", target / "huggingface")
    for repo in FLOW_REPOS:
        index = json.loads((target / "huggingface" / repo / "model_index.json").read_text())
        for component, spec in index.items():
            if isinstance(spec, list) and spec[1] in ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel",
                                                      "AutoencoderKL"):
                path = target / "huggingface" / repo / component / "config.json"
                config = json.loads(path.read_text())
                config.update(TINY_CONFIGS["CLIPTextModel" if spec[1].startswith("CLIP") else spec[1]])
                path.write_text(json.dumps(config))
    # SD3's T5 tokenizer sets add_prefix_space, for which transformers rebuilds it from the slow tokenizer through
    # sentencepiece's protobuf module, which Forge's pinned protobuf (3.20) cannot import. Forge runs SD3 without
    # T5 by default (option sd3_enable_t5), so this tokenizer encodes nothing here; it is loaded without the flag.
    path = target / "huggingface" / FLOW_REPOS[3] / "tokenizer_3" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.pop("add_prefix_space", None)
    path.write_text(json.dumps(config))
    return target


def flux_sizes_from_checkpoint(detect):
    """huggingface_guess's detect_unet_config, with a Flux (or Chroma) transformer's sizes read from its weights
    (the guess writes the full-size numbers whatever the checkpoint holds; Forge's loader then adds Chroma's
    full-size guidance-layer sizes, GuessChroma). A full-size Flux is left as guessed."""
    import backend.loader

    def count(keys, prefix):
        return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})

    def detect_sizes(state_dict, key_prefix):
        config = detect(state_dict, key_prefix)
        if not config or config.get("image_model") != "flux":
            return config
        p, keys = key_prefix, list(state_dict.keys())
        hidden = state_dict[f"{p}img_in.weight"].shape[0]
        if hidden == 3072:
            return config
        head = state_dict[f"{p}double_blocks.0.img_attn.norm.key_norm.scale"].shape[0]
        vector = state_dict.get(f"{p}vector_in.in_layer.weight")  # Chroma has none
        config.update(in_channels=state_dict[f"{p}img_in.weight"].shape[1] // 4, hidden_size=hidden,
                      vec_in_dim=vector.shape[1] if vector is not None else hidden,
                      context_in_dim=state_dict[f"{p}txt_in.weight"].shape[1], num_heads=hidden // head,
                      mlp_ratio=state_dict[f"{p}double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
                      depth=count(keys, f"{p}double_blocks."), depth_single_blocks=count(keys, f"{p}single_blocks."),
                      axes_dim=[head // 8, head * 7 // 16, head * 7 // 16])  # Flux's 16/56/56 split of 128
        guidance = f"{p}distilled_guidance_layer."
        if f"{guidance}in_proj.weight" in state_dict and hasattr(backend.loader, "GuessChroma"):
            backend.loader.GuessChroma.unet_extra_config = {
                "guidance_out_dim": state_dict[f"{guidance}out_proj.weight"].shape[0],
                "guidance_hidden_dim": state_dict[f"{guidance}in_proj.weight"].shape[0],
                "guidance_n_layers": count(keys, f"{guidance}layers.")}
        return config

    return detect_sizes


def use_small_flow_configs(tmp: Path) -> Path:
    """Points Forge's loader at small_flow_configs and its model guess at flux_sizes_from_checkpoint (once);
    returns the configs' folder."""
    import backend.loader
    import huggingface_guess.detection as detection

    if not _started.get("flow"):
        backend.loader.dir_path = str(small_flow_configs(_started["root"], tmp / "forge_configs"))
        detection.detect_unet_config = flux_sizes_from_checkpoint(detection.detect_unet_config)
        _started["flow"] = True
    return Path(backend.loader.dir_path)


def _prefixed(prefix: str, module) -> dict:
    return {f"{prefix}{k}": v for k, v in module.state_dict().items()}


def text_encoders_and_vae(folder: Path, vae_prefix: str, clips: tuple[str, ...], t5: str) -> dict:
    """A flow checkpoint's small text encoders and VAE (built from the configs in `folder`, seeded), in the
    single-file keys Forge reads: `text_encoders.<name>.` for each CLIP and the T5, `vae_prefix` for the VAE."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from backend.nn.clip import IntegratedCLIP
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.utils import read_arbitrary_config

    vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(folder / "vae"))
    fill(vae, 1)
    state = _prefixed(vae_prefix, vae)
    for i, name in enumerate(clips):
        clip = IntegratedCLIP(CLIPTextModel, CLIPTextConfig.from_pretrained(folder / f"text_encoder{'_2' * i}"),
                              add_text_projection=True)
        fill(clip.transformer, 2 + i)  # its 0-d logit_scale stays as built
        state.update(_prefixed(f"text_encoders.{name}.", clip))
    model = IntegratedT5(read_arbitrary_config(folder / t5))
    fill(model.transformer, 4)
    state.update(_prefixed("text_encoders.t5xxl.", model))
    return state


MMDIT = {"in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 1, "adm_in_channels": 64,
         "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 64}},
         "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None, "input_size": None}
CHROMA_GUIDANCE = {"guidance_out_dim": 64, "guidance_hidden_dim": 32, "guidance_n_layers": 1}


def flow_transformer(family: str):
    """A tiny transformer of Forge's own class: 'dev' (Flux with a guidance embedding), 'schnell', 'chroma',
    'sd3' (SD3/3.5's MMDiT)."""
    if family in ("dev", "schnell"):
        from backend.nn.flux import IntegratedFluxTransformer2DModel

        return IntegratedFluxTransformer2DModel(**FLUX, guidance_embed=family == "dev")
    if family == "chroma":
        from backend.nn.chroma import IntegratedChromaTransformer2DModel

        return IntegratedChromaTransformer2DModel(**FLUX, **CHROMA_GUIDANCE)
    from backend.nn.mmditx import MMDiTX

    return MMDiTX(**MMDIT)


FAMILY_FILES = {  # Forge's config folder, VAE key prefix and CLIP text encoders of each family's checkpoint
    "dev": ("black-forest-labs/FLUX.1-dev", "vae.", ("clip_l",), "text_encoder_2"),
    "schnell": ("black-forest-labs/FLUX.1-dev", "vae.", ("clip_l",), "text_encoder_2"),
    "chroma": ("Chroma", "vae.", (), "text_encoder"),
    "sd3": ("stabilityai/stable-diffusion-3-medium-diffusers", "first_stage_model.", ("clip_l", "clip_g"),
            "text_encoder_3"),
}


def make_flow_checkpoints(tmp: Path, checkpoints: dict[str, tuple[str, int]]) -> None:
    """Flow checkpoints {name: (family, seed)} (families: flow_transformer), each a tiny transformer beside small
    text encoders and VAE in one file, as Forge loads single-file checkpoints; then Forge rescans its models."""
    import safetensors.torch

    from modules import sd_models

    configs = use_small_flow_configs(tmp)
    shared = {}
    for name, (family, seed) in checkpoints.items():
        repo, vae_prefix, clips, t5 = FAMILY_FILES[family]
        if family not in shared:
            shared[family] = text_encoders_and_vae(configs / "huggingface" / repo, vae_prefix, clips, t5)
        model = flow_transformer(family)
        fill(model, seed)
        state = {**shared[family], **_prefixed("model.diffusion_model.", model)}
        state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
        safetensors.torch.save_file(state, str(_started["models"] / f"{name}.safetensors"))
    sd_models.list_models()


def start_flow(tmp: Path, checkpoints: dict[str, tuple[str, int]], sd15: dict[str, int] | None = None):
    """Forge started (start) with the flow checkpoints of make_flow_checkpoints, and SD1.5 ones (make_checkpoints)
    if asked; returns (modules.shared, FastAPI app)."""
    api = start(tmp, sd15 or {})
    make_flow_checkpoints(tmp, checkpoints)
    return api
