"""Where the real host programs are: tests that run their code skip with a reason when absent.

KDISTPP_COMFYUI may point at a ComfyUI checkout; by default the pinned snapshot in
../shared/hosts/ beside this repository is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SHARED_HOSTS = Path(__file__).resolve().parents[2] / "shared" / "hosts"


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
