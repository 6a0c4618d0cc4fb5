"""The ComfyUI node without ComfyUI: it imports, describes itself, and fails clearly if run.

Everything about sampling is tested in the real program: tests/test_host_comfyui.py.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch

import kdistpp
from kdistpp.integrations import comfyui

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_repository_entry_point_imports_without_comfyui(monkeypatch):
    """The repository's __init__.py imports anywhere; its V3 entry point says it needs ComfyUI when awaited."""
    import asyncio

    monkeypatch.setitem(sys.modules, "comfy", None)
    spec = importlib.util.spec_from_file_location("custom_node_under_test", ROOT / "__init__.py")
    package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    assert package.comfy_entrypoint is comfyui.comfy_entrypoint
    assert not hasattr(package, "NODE_CLASS_MAPPINGS")  # ComfyUI would take the V1 mappings and skip the entry point
    with pytest.raises(RuntimeError, match="inside ComfyUI"):
        asyncio.run(package.comfy_entrypoint())


def test_sigma_window_option():
    assert comfyui.guided_steps_option(2) == 2
    assert comfyui.guided_steps_option(2, 0.5, 3.0) == kdistpp.SigmaWindow(0.5, 3.0)
    with pytest.raises(ValueError, match="SigmaWindow"):
        comfyui.guided_steps_option(2, 3.0, 0.5)


@pytest.mark.parametrize("seed", [0, 1, 2**64 - 1 - comfyui.RENOISE_SEED_OFFSET, 2**64 - 1])
def test_renoise_seed_stays_in_the_range_torch_generators_take(seed):
    """ComfyUI's seeds go up to 2**64 - 1; the renoise seed (seed + offset) wraps around, stays
    distinct from the seed, and seeds a generator."""
    wrapped = comfyui.renoise_seed(seed)
    assert 0 <= wrapped < 2**64 and wrapped != seed
    assert wrapped == (seed + comfyui.RENOISE_SEED_OFFSET) % 2**64
    torch.Generator().manual_seed(wrapped)
