"""kdistpp: Distillation++ (inference-time distillation) samplers in k-diffusion convention.

Denoisers follow k-diffusion: D(x, sigma, **extra_args) -> x0 estimate, x = x0 + sigma * noise.
"""

from . import metrics, toys
from .cfg import CFGDenoiser
from .guided_denoiser import TeacherGuidedDenoiser, teacher_guided
from .guided_steps import SigmaWindow
from .refine import DIRECTIONS, FORMS, Guidance, TeacherOutputError
from .registry import REGISTRY, SAMPLERS
from .samplers import (
    sample_consistency,
    sample_consistency_distpp,
    sample_dpmpp_2m_distpp,
    sample_dpmpp_2s_ancestral_distpp,
    sample_euler_ancestral_distpp,
    sample_euler_distpp,
)
from .schedules import get_sigmas_exponential, get_sigmas_karras
from .steps import ancestral_step

__version__ = "0.1.0"

__all__ = [
    "CFGDenoiser",
    "DIRECTIONS",
    "FORMS",
    "Guidance",
    "REGISTRY",
    "SAMPLERS",
    "SigmaWindow",
    "TeacherGuidedDenoiser",
    "TeacherOutputError",
    "ancestral_step",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "sample_consistency",
    "sample_consistency_distpp",
    "sample_dpmpp_2m_distpp",
    "sample_dpmpp_2s_ancestral_distpp",
    "sample_euler_ancestral_distpp",
    "sample_euler_distpp",
    "teacher_guided",
]
