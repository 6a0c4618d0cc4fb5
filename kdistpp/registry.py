"""The one list of kdistpp's samplers: every UI, test and doc that enumerates them reads it here.

Each entry names its Distillation++ sampler, the label the webui shows, and the host samplers it
must equal at w = 0 (ComfyUI's KSAMPLER name, the webui's label).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .samplers import (
    sample_consistency_distpp,
    sample_dpmpp_2m_distpp,
    sample_dpmpp_2s_ancestral_distpp,
    sample_euler_ancestral_distpp,
    sample_euler_distpp,
)


@dataclass(frozen=True)
class SamplerEntry:
    name: str  # kdistpp's key, e.g. 'euler'
    fn: Callable
    label: str  # the webui's sampler list
    comfy_base: str  # ComfyUI's own sampler of the same update
    webui_base: str  # the webui's own sampler of the same update
    cfg_pp: bool  # accepts cfg_pp=True


REGISTRY: tuple[SamplerEntry, ...] = (
    SamplerEntry("euler", sample_euler_distpp, "Euler Distillation++", "euler", "Euler", True),
    SamplerEntry("euler_ancestral", sample_euler_ancestral_distpp, "Euler a Distillation++", "euler_ancestral",
                 "Euler a", True),
    SamplerEntry("dpmpp_2s_ancestral", sample_dpmpp_2s_ancestral_distpp, "DPM++ 2S a Distillation++",
                 "dpmpp_2s_ancestral", "DPM++ 2S a", True),
    SamplerEntry("dpmpp_2m", sample_dpmpp_2m_distpp, "DPM++ 2M Distillation++", "dpmpp_2m", "DPM++ 2M", True),
    SamplerEntry("consistency", sample_consistency_distpp, "LCM Distillation++", "lcm", "LCM", False),
)

SAMPLERS: dict[str, Callable] = {entry.name: entry.fn for entry in REGISTRY}
BY_NAME: dict[str, SamplerEntry] = {entry.name: entry for entry in REGISTRY}
