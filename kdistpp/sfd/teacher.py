"""The SFD command's teacher: a diffusers folder (`save_pretrained` layout), or a single-file checkpoint.

A single file is what A1111, Forge and ComfyUI load: an SD 1.x/2.x or SDXL checkpoint in the original
(ldm/sgm) key layout, usually with its text encoders and VAE; or a Flux/SD3 transformer alone, as
ComfyUI's `diffusion_models` hold. It has no diffusers configs, so it comes with a folder that gives
them offline (`config`): a `save_pretrained` folder of the same architecture, or a model repository's
configs and tokenizers. Without one, the configs are those of the model repository diffusers infers
from the file's keys, from the Hugging Face cache or downloaded (not offline). diffusers' own
single-file loading (`from_single_file(..., config=..., local_files_only=True)`) converts the weights;
what the file lacks (text encoders, VAE) is read from the folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

NETWORKS = ("UNet2DConditionModel", "FluxTransformer2DModel", "SD3Transformer2DModel")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class TeacherSource(NamedTuple):
    """Where the teacher's weights are: `file` (a single-file checkpoint, or None) and `folder` (the
    diffusers folder: the weights when `file` is None, else the configs, tokenizers and whatever the
    file lacks)."""

    file: Path | None
    folder: Path

    @property
    def spec(self) -> dict:
        return json.loads((self.folder / "model_index.json").read_text())

    @property
    def network_name(self) -> str:
        """'unet' or 'transformer': the pipeline's denoiser component."""
        return "unet" if self.spec.get("unet") else "transformer"

    @property
    def network_class(self) -> str:
        return self.spec[self.network_name][1]

    @property
    def network_config(self) -> dict:
        return json.loads((self.folder / self.network_name / "config.json").read_text())

    @property
    def identity(self) -> str:
        """What the prompt-embedding cache is keyed to: the text encoders are the file's or the folder's."""
        return " + ".join(str(p.resolve()) for p in (self.file, self.folder) if p is not None)


def check_folder(path: str, option: str = "--teacher") -> Path:
    """`path` as a diffusers pipeline folder whose denoiser the command trains, else a ValueError naming `option`."""
    folder = Path(path)
    if not folder.exists():
        raise ValueError(f"{option} {path!r} does not exist")
    index = folder / "model_index.json"
    if folder.is_file() or not index.is_file():
        raise ValueError(f"{option} {path!r} is not a diffusers model folder (no model_index.json): pass the folder "
                         "save_pretrained wrote")
    spec = json.loads(index.read_text())
    network = spec.get("unet") or spec.get("transformer")
    if not network or network[1] not in NETWORKS:
        raise ValueError(f"{option} {path!r} holds a {spec.get('_class_name', 'pipeline')} whose denoiser "
                         f"({network[1] if network else 'none'}) is not one the command trains: {sorted(NETWORKS)}")
    name = "unet" if spec.get("unet") else "transformer"
    if not (folder / name / "config.json").is_file():
        raise ValueError(f"{option} {path!r} has no {name}/config.json: the {network[1]}'s configuration is needed")
    return folder


class _LazyCheckpoint(Mapping):
    """A .safetensors file as a read-only mapping that reads a tensor only when it is looked up."""

    def __init__(self, file: Path):
        from safetensors import safe_open

        self._file = safe_open(str(file), "pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key):
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys


def read_checkpoint(file: Path) -> Mapping:
    """A single-file checkpoint as a mapping of its tensors (lazy for .safetensors); a ValueError when it
    is not one."""
    try:
        if file.suffix == ".safetensors":
            state = _LazyCheckpoint(file)
        else:
            import zipfile

            import torch

            # weights only, as diffusers reads it; mmap where the format allows (zip-based files)
            state = torch.load(str(file), map_location="cpu", mmap=zipfile.is_zipfile(file), weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as err:  # safetensors and torch.load raise their own types for a file that is none
        raise ValueError(f"--teacher {str(file)!r} is not a checkpoint file ({type(err).__name__}: {err})") from None
    if not isinstance(state, Mapping) or not len(state):
        raise ValueError(f"--teacher {str(file)!r} is not a checkpoint file: it holds no tensors")
    return state


def checkpoint_keys(file: Path) -> list[str]:
    """The tensor names of a single-file checkpoint; a ValueError when it is not one."""
    return list(read_checkpoint(file))


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def inferred_config_folder(file: Path) -> Path:
    """The configs and tokenizers of the model repository diffusers infers from the file's keys
    (`fetch_diffusers_config`), from the Hugging Face cache, or downloaded unless offline."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config
    from huggingface_hub import snapshot_download

    repo = fetch_diffusers_config(read_checkpoint(file))
    try:
        folder = snapshot_download(repo["pretrained_model_name_or_path"], local_files_only=_offline(),
                                   allow_patterns=["*.json", "**/*.json", "*.txt", "**/*.txt", "**/*.model"])
    except Exception as err:  # offline and not cached, no network, a gated repository...
        raise ValueError(f"--teacher {str(file)!r} is a single file and the configs of "
                         f"{repo['pretrained_model_name_or_path']} (the repository diffusers infers from its keys) "
                         f"are not at hand ({type(err).__name__}): pass --teacher-config FOLDER, a diffusers folder "
                         "of the same architecture (save_pretrained's, or the model repository's model_index.json, "
                         "configs and tokenizers) that gives its configs offline") from None
    return Path(folder) / repo.get("subfolder", "")


def check_teacher(path: str, config: str | None = None) -> TeacherSource:
    """The teacher of `--teacher PATH [--teacher-config CONFIG]`, checked before any model is loaded."""
    target = Path(path)
    if not target.exists():
        raise ValueError(f"--teacher {path!r} does not exist")
    if target.is_dir():
        if config is not None:
            raise ValueError("--teacher-config is for a single-file --teacher; this teacher is a folder, which holds "
                             "its own configs")
        return TeacherSource(None, check_folder(path))
    if target.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"--teacher {path!r} is not a checkpoint file (expected one of {list(CHECKPOINT_SUFFIXES)})")
    checkpoint_keys(target)
    if config is None:
        return TeacherSource(target, check_folder(str(inferred_config_folder(target)), "the inferred configs"))
    return TeacherSource(target, check_folder(config, "--teacher-config"))


def _architecture_error(source: TeacherSource, what: str, err: Exception | str) -> ValueError:
    return ValueError(f"--teacher {str(source.file)!r} does not hold a {what} of the architecture its configs "
                      f"{str(source.folder)!r} describe ({err}): pass as --teacher-config the folder of the model this "
                      "file was saved from")


def _check_loaded(source: TeacherSource, module, what: str) -> None:
    """diffusers leaves weights the file lacks uninitialised (on the meta device) instead of failing."""
    missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing:
        raise _architecture_error(source, what, f"no weights for {len(missing)} tensors, e.g. {missing[0]}")


def load_network(source: TeacherSource):
    """The teacher's UNet or transformer (diffusers class), from the folder or converted from the file."""
    import diffusers

    cls = getattr(diffusers, source.network_class)
    if source.file is None:
        return cls.from_pretrained(str(source.folder / source.network_name))
    try:
        network = cls.from_single_file(str(source.file), config=str(source.folder), subfolder=source.network_name,
                                       local_files_only=True)
    except Exception as err:  # diffusers' converters fail by KeyError, shape errors, SingleFileComponentError...
        raise _architecture_error(source, source.network_class, f"{type(err).__name__}: {err}") from None
    _check_loaded(source, network, source.network_class)
    return network


def _in_file(keys: Mapping, library: str, class_name: str) -> bool:
    """Whether the checkpoint holds this pipeline component, by diffusers' own tests of a single file."""
    from diffusers.loaders import single_file_utils as sfu

    if class_name == "AutoencoderKL":
        return any(k.startswith(prefix) for k in keys for prefix in sfu.LDM_VAE_KEYS)
    if library == "transformers" and class_name.startswith("CLIPTextModel"):
        import transformers

        return sfu.is_clip_model_in_single_file(getattr(transformers, class_name), keys)
    if library == "transformers" and class_name.startswith("T5"):
        return sfu.is_t5_in_single_file(keys)
    return True


def load_pipeline(source: TeacherSource):
    """The teacher's diffusers pipeline. From a single file: `from_single_file` with the folder's configs,
    offline; the text encoders and VAE the file does not hold are read from the folder."""
    import diffusers

    spec = source.spec
    extra = {"safety_checker": None} if "safety_checker" in spec else {}
    if source.file is None:
        return diffusers.DiffusionPipeline.from_pretrained(str(source.folder), **extra)
    keys = read_checkpoint(source.file)
    for name, value in spec.items():
        if name.startswith("_") or name == source.network_name or not isinstance(value, list) or value[0] is None:
            continue
        library, class_name = value
        is_model = class_name == "AutoencoderKL" or (library == "transformers" and "Model" in class_name)
        if not is_model or _in_file(keys, library, class_name):
            continue
        module = __import__(library)
        try:
            extra[name] = getattr(module, class_name).from_pretrained(str(source.folder), subfolder=name)
        except (OSError, ValueError) as err:
            raise ValueError(f"--teacher {str(source.file)!r} holds no {name} ({class_name}) and its config folder "
                             f"{str(source.folder)!r} has no weights for it ({type(err).__name__}): pass as "
                             "--teacher-config a folder with them (save_pretrained's, or the model repository's)") from None
    pipeline_class = getattr(diffusers, spec["_class_name"])
    try:
        pipe = pipeline_class.from_single_file(str(source.file), config=str(source.folder), local_files_only=True,
                                               **extra)
    except Exception as err:  # as in load_network
        raise _architecture_error(source, spec["_class_name"], f"{type(err).__name__}: {err}") from None
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if name not in extra and getattr(pipe, name, None) is not None:
            _check_loaded(source, getattr(pipe, name), f"{spec[name][1]} ({name})")
    return pipe


__all__ = ["NETWORKS", "TeacherSource", "check_folder", "check_teacher", "checkpoint_keys", "inferred_config_folder",
           "load_network", "load_pipeline", "read_checkpoint"]
