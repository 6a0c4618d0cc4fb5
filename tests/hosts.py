"""Where the real host programs are: tests that run their code skip with a reason when absent.

KDISTPP_COMFYUI may point at a ComfyUI checkout; by default the pinned snapshot in
../shared/hosts/ beside this repository is used.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_HOSTS = REPO.parent / "shared" / "hosts"


def fill(module, seed: int) -> None:
    """Seeded weights of a sensible scale: hosts skip weight init (ComfyUI, Forge) or zero the UNet's
    output layers (ldm), and a zero or unscaled network would hide what the tests look for."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            elif p.ndim <= 1:  # norm scales (and scalars: OpenCLIP's logit scale)
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


def require(host: str, venv: str, *modules: str) -> None:
    """Skips unless the host's own requirements import here."""
    try:
        for name in modules:
            importlib.import_module(name)
    except ImportError as err:
        pytest.skip(f"{host}'s requirements are not installed here (.ci/run builds {venv}): {err}")


def webui_data_dir(tmp: Path, settings: dict) -> Path:
    """A webui --data-dir with this repository in extensions/ as "Install from URL" clones it, and settings."""
    data = tmp / "data"
    (data / "extensions").mkdir(parents=True)
    shutil.copytree(REPO, data / "extensions" / "kdistpp", ignore=shutil.ignore_patterns(
        ".venv*", ".git", "__pycache__", "*.egg-info", "docs", "benchmarks"))
    (data / "config.json").write_text(json.dumps({"live_previews_enable": False, **settings}))
    return data


def webui_argv(root: Path, data: Path, *flags: str) -> list[str]:
    """The command line both webuis parse at import, as their launcher would pass it."""
    return [str(root / "webui.py"), "--skip-torch-cuda-test", "--no-download-sd-model", "--skip-prepare-environment",
            "--skip-version-check", "--disable-safe-unpickle", "--data-dir", str(data), *flags]


def webui_api():
    """Initialises the imported webui and mounts its own API routes; returns (modules.shared, FastAPI app)."""
    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"
    from fastapi import FastAPI
    from modules import initialize

    initialize.imports()
    initialize.initialize()
    from modules import shared
    from modules.api.api import Api
    from modules.call_queue import queue_lock

    app = FastAPI()
    Api(app, queue_lock)
    return shared, app


def comfyui_root() -> Path | None:
    root = Path(os.environ.get("KDISTPP_COMFYUI", SHARED_HOSTS / "comfyui-0.8.0"))
    return root if (root / "comfy" / "k_diffusion" / "sampling.py").is_file() else None


def import_comfy(full: bool = False):
    """ComfyUI's `comfy` package from the host tree, set up for CPU as `main.py --cpu` would.

    full=True also imports its model definitions and nodes (they need ComfyUI's requirements:
    `.ci/run` builds .venv-comfyui for them); the k-diffusion functions alone need only torchsde."""
    root = comfyui_root()
    if root is None:
        pytest.skip("ComfyUI not found: set KDISTPP_COMFYUI or put it in ../shared/hosts/comfyui-0.8.0")
    if str(root) not in sys.path:
        sys.path.append(str(root))  # appended: its top-level names must not shadow the tests'
    argv = sys.argv
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        sys.argv = [argv[0], "--cpu"] if not _has_cuda() else [argv[0]]
        import comfy.k_diffusion.sampling
        import comfy.model_management
        import comfy.model_patcher
        import comfy.model_sampling
        import comfy.samplers
        if full:
            import comfy.sd  # noqa: F401
            import comfy.supported_models  # noqa: F401
            import comfy_extras.nodes_custom_sampler  # noqa: F401
            import nodes  # noqa: F401
    except ImportError as err:
        pytest.skip(f"ComfyUI's dependencies are not installed here: {err}")
    finally:
        sys.argv = argv
    return comfy


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
