"""The real A1111 webui (the pinned tree), started in this process on tiny random `ldm` checkpoints.

What is real: every `modules.*` file of the webui, Stability's `ldm` (from PyPI's
stable-diffusion-sdkit wheel, the same package the webui's launcher clones), k-diffusion from PyPI,
the webui's checkpoint loader, hijacks, CFG denoiser, samplers, RNG, API routes, and this
repository installed as an extension the way "Install from URL" does (a clone in extensions/).

`sgm` (Stability's generative-models, SDXL's model code) is the webui's own clone in the host
tree's `repositories/generative-models`; only a tree without it gets an import stub (`SgmStub`),
and the SDXL tests skip there. The SD1 CLIP text encoder is a 1-layer random CLIP with the real SD1
tokenizer (Forge's offline copy of its files). SDXL checkpoints (`make_sdxl_checkpoints`) are real
`sgm` DiffusionEngines with a small UNet (SDXL's 2048-wide context and 2816-wide vector kept) and
small text encoders of the classes the webui hooks by name: `FrozenCLIPEmbedder` from a tiny HF
CLIP folder and `FrozenOpenCLIPEmbedder2` with a tiny open_clip architecture registered under its
own name (`OPEN_CLIP_ARCH`).

`.ci/run` builds `.venv-a1111` from the webui's requirements_versions.txt for these tests.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from hosts import SHARED_HOSTS, fill, require, webui_api, webui_argv, webui_data_dir

CONTEXT = 32
# the real SD1 tokenizer files, from the Forge tree (it ships them; A1111 downloads them at first use)
TOKENIZER = (Path(os.environ.get("KDISTPP_FORGE", SHARED_HOSTS / "forge-dfdcbab")).resolve()
             / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5" / "tokenizer")


def a1111_root() -> Path | None:
    root = Path(os.environ.get("KDISTPP_A1111", SHARED_HOSTS / "a1111-1.10.1")).resolve()  # start() changes directory
    return root if (root / "modules" / "sd_samplers_kdiffusion.py").is_file() else None


class _Placeholder(type):
    """A class whose every attribute is a do-nothing function (the webui saves and patches sgm's methods)."""

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *args, **kwargs: None


class SgmStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any `sgm.*` import gives a package whose every attribute is a placeholder class (SDXL only)."""

    def find_spec(self, name, path=None, target=None):
        if name == "sgm" or name.startswith("sgm."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        placeholders = {}

        def getattr_(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return placeholders.setdefault(attr, _Placeholder(attr, (), {"__module__": spec.name}))

        module.__getattr__ = getattr_
        return module

    def exec_module(self, module):
        pass


SDXL_CONTEXT, SDXL_VECTOR = 2048, 2816  # SDXL's cross-attention width (CLIP-L 768 + OpenCLIP-G 1280) and vector
REFINER_VECTOR = 2560  # the refiner's vector: pooled OpenCLIP-G 1280 + sizes and crop 4 x 256 + aesthetic score 256
CLIP_L_WIDTH, CLIP_G_WIDTH = 768, 1280
OPEN_CLIP_ARCH = "kdistpp-tiny-bigG"  # a 2-layer OpenCLIP text tower of bigG's width, registered with open_clip


def sgm_root() -> Path | None:
    """The webui's clone of Stability's generative-models (sgm), where its launcher puts it."""
    root = a1111_root()
    sgm = root / "repositories" / "generative-models" if root is not None else None
    return sgm if sgm is not None and (sgm / "sgm" / "models" / "diffusion.py").is_file() else None


def register_open_clip_arch(tmp: Path) -> None:
    """Registers OPEN_CLIP_ARCH with open_clip (its `add_model_config`), as a model of its own name: a
    small text tower 1280 wide with a 1280-wide projection (SDXL's pooled vector) and a minimal vision tower."""
    import json

    import open_clip

    config = {"embed_dim": CLIP_G_WIDTH,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": CLIP_G_WIDTH, "heads": 4, "layers": 2}}
    path = tmp / f"{OPEN_CLIP_ARCH}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)


def sdxl_config(clip_dir: Path, refiner: bool = False) -> dict:
    """SDXL's sd_xl_base.yaml with a small UNet (two levels, attention on the second and in the middle as SDXL
    has it on its deeper levels; context 2048 and vector 2816 kept), a small VAE and small text encoders.
    `clip_dir` holds the tiny HF CLIP-L (FrozenCLIPEmbedder's `version`). refiner=True: sd_xl_refiner.yaml's
    architecture instead (OpenCLIP-G alone: context 1280; its vector with the aesthetic score: 2560)."""
    unet = {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "adm_in_channels": REFINER_VECTOR if refiner else SDXL_VECTOR, "num_classes": "sequential",
        "use_checkpoint": False, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 64,
        "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": [0, 1],
        "context_dim": CLIP_G_WIDTH if refiner else SDXL_CONTEXT,
        "spatial_transformer_attn_type": "softmax", "legacy": False}}
    size = {"target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND", "params": {"outdim": 256}}
    embedders = [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"version": str(clip_dir), "device": "cpu", "layer": "hidden", "layer_idx": 1}},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": OPEN_CLIP_ARCH, "version": None, "device": "cpu", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
        {"is_trainable": False, "input_key": "original_size_as_tuple", **size},
        {"is_trainable": False, "input_key": "crop_coords_top_left", **size},
        {"is_trainable": False, "input_key": "target_size_as_tuple", **size}]
    if refiner:  # OpenCLIP-G, the original size, the crop and the aesthetic score
        embedders = [*embedders[1:4], {"is_trainable": False, "input_key": "aesthetic_score", **size}]
    vae = {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
        "embed_dim": 4, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": {
            "attn_type": "vanilla", "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3,
            "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
            "dropout": 0.0}}}
    denoiser = {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
        "num_idx": 1000, "weighting_config": {"target": "sgm.modules.diffusionmodules.denoiser_weighting.EpsWeighting"},
        "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
        "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True, "denoiser_config": denoiser,
        "network_config": unet, "conditioner_config": {"target": "sgm.modules.GeneralConditioner",
                                                       "params": {"emb_models": embedders}},
        "first_stage_config": vae}}}


def make_sdxl_checkpoints(models_dir: Path, clip_dir: Path, seeds: dict[str, int], refiner: bool = False) -> None:
    """One SDXL .safetensors + .yaml per name; all share the VAE and text encoders, their UNets differ by seed.
    refiner=True: of the refiner's architecture (`sdxl_config`)."""
    from omegaconf import OmegaConf
    from sgm.util import instantiate_from_config

    models_dir.mkdir(parents=True, exist_ok=True)
    if not (clip_dir / "config.json").is_file():
        tiny_clip(clip_dir, CLIP_L_WIDTH, layers=2)
    config = OmegaConf.create(sdxl_config(clip_dir, refiner))
    model = instantiate_from_config(config.model)
    fill(model.first_stage_model, 1)
    fill(model.conditioner, 3)
    save_checkpoints(model, config, models_dir, seeds)


def model_config(clip_dir: Path, context: int = CONTEXT) -> dict:
    """An SD1-style LatentDiffusion config with a small UNet, VAE and CLIP (8x downsampling, as the webui assumes);
    `context` is the CLIP width the UNet attends to."""
    unet = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": context, "use_checkpoint": False, "legacy": False}}
    vae = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}
    clip = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": str(clip_dir), "device": "cpu"}}
    return {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": 1000,
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": 8, "channels": 4, "cond_stage_trainable": False,
        "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
        "unet_config": unet, "first_stage_config": vae, "cond_stage_config": clip}}}


def tiny_clip(clip_dir: Path, width: int = CONTEXT, layers: int = 1) -> None:
    """A random CLIP text model (`layers` layers) with the real SD1 tokenizer, saved where from_pretrained finds it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip_dir.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, clip_dir / name)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=64, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=width)
    CLIPTextModel(config).save_pretrained(clip_dir, safe_serialization=True)


def make_checkpoints(models_dir: Path, clip_dir: Path, seeds: dict[str, int], context: int = CONTEXT) -> None:
    """One .safetensors + .yaml per name; all share the VAE and CLIP, their UNets differ by seed. `context`:
    the CLIP width (another width is another architecture: its own CLIP, in clip_dir, is made here)."""
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    models_dir.mkdir(parents=True, exist_ok=True)
    if context != CONTEXT:
        tiny_clip(clip_dir, context)
    config = OmegaConf.create(model_config(clip_dir, context))
    model = instantiate_from_config(config.model)
    fill(model.first_stage_model, 1)
    save_checkpoints(model, config, models_dir, seeds)


_started: dict = {}


def start(tmp: Path, seeds: dict[str, int]):
    """Imports and initialises the webui as `webui.py --nowebui` does; returns (modules.shared, FastAPI app).

    The webui can start once per process (its options are parsed at import): a later call adds its
    checkpoints to the running webui's models folder and rescans it, and returns the same objects."""
    if _started:  # before the root check: the relative KDISTPP_A1111 no longer resolves from the new directory
        from modules import sd_models

        make_checkpoints(_started["models"], _started["clip"], seeds)
        sd_models.list_models()
        return _started["api"]
    root = a1111_root()
    if root is None:
        pytest.skip("A1111 not found: set KDISTPP_A1111 or put it in ../shared/hosts/a1111-1.10.1")
    require("A1111", ".venv-a1111", "gradio", "ldm.models.diffusion.ddpm", "transformers")
    data = webui_data_dir(tmp, {"sd_checkpoints_limit": 2, "sd_checkpoint_cache": 0})
    clip_dir = tmp / "clip"
    tiny_clip(clip_dir)
    make_checkpoints(data / "models" / "Stable-diffusion", clip_dir, seeds)
    # the webui finds `ldm` in its repositories/ or the working directory: point it at the installed package
    stage = tmp / "stage"
    stage.mkdir()
    import ldm

    (stage / "ldm").symlink_to(Path(ldm.__file__).parent)
    if sgm_root() is None:  # a tree without the launcher's clones: SD1 only
        (tmp / "generative-models" / "sgm").mkdir(parents=True)  # where the webui looks for sgm; SgmStub answers
        sys.meta_path.insert(0, SgmStub())
    else:
        require("A1111", ".venv-a1111", "open_clip", "kornia")  # sgm's encoders import them
        register_open_clip_arch(tmp)
    os.chdir(stage)
    sys.path.insert(0, str(root))
    sys.argv = webui_argv(root, data, "--no-half", "--skip-load-model-at-start",
                          *(["--use-cpu", "all"] if not torch.cuda.is_available() else []))
    _started.update(models=data / "models" / "Stable-diffusion", clip=clip_dir, data=data, api=webui_api(), tmp=tmp)
    return _started["api"]


def add_sdxl_checkpoints(seeds: dict[str, int], refiner: bool = False) -> Path:
    """SDXL checkpoints (`make_sdxl_checkpoints`) added to the started webui's models folder, which is
    rescanned; returns the folder. Skips where the webui runs without its sgm clone."""
    if sgm_root() is None or any(isinstance(finder, SgmStub) for finder in sys.meta_path):
        pytest.skip("A1111's repositories/generative-models (sgm, SDXL's model code) is not in the host tree")
    from modules import sd_models

    models, clip_dir = _started["models"], _started["tmp"] / "clip_sdxl"
    make_sdxl_checkpoints(models, clip_dir, seeds, refiner)
    sd_models.list_models()
    return models


def model_named(webui, name):
    """The model of checkpoint `name` in the started webui's checkpoint cache (`webui.sd_models`)."""
    for model in webui.sd_models.model_data.loaded_sd_models:
        if model.sd_checkpoint_info.model_name == name:
            return model
    raise AssertionError(f"{name} is not in the webui's checkpoint cache")


def save_checkpoints(model, config, models_dir, seeds):
    """One checkpoint (and its config yaml) per name of `seeds`, the model's UNet filled from that seed."""
    from omegaconf import OmegaConf
    import safetensors.torch

    for name, seed in seeds.items():
        fill(model.model, seed)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state, str(models_dir / f"{name}.safetensors"))
        OmegaConf.save(config, models_dir / f"{name}.yaml")
