"""kdistpp: Distillation++ (inference-time distillation) samplers in k-diffusion convention.

Denoisers follow k-diffusion: D(x, sigma, **extra_args) -> x0 estimate, x = x0 + sigma * noise;
rectified-flow models (x = (1 - s) x0 + s noise: Flux, SD3, Wan...) run with parametrization='flow'.
A guided step renoises the student's estimate, has the teacher denoise it and moves the estimate
toward the teacher's; the solver then continues as usual.

Samplers (k-diffusion's arguments, then keyword-only teacher, w, guidance_steps, form, renoise,
direction, ...; help() on each lists them):
    sample_euler_distpp, sample_euler_ancestral_distpp, sample_dpmpp_2s_ancestral_distpp,
    sample_dpmpp_2m_distpp, sample_consistency_distpp, and the baseline sample_consistency.
    SAMPLERS and REGISTRY hold them by name.
Wrapper for any other k-diffusion-convention sampler:
    teacher_guided(student, teacher, sigmas, w=...) -> TeacherGuidedDenoiser
Schedules: get_sigmas_karras, get_sigmas_exponential, get_sigmas_flow (shifted flow schedules);
    SigmaWindow picks guided steps by sigma.
Parametrizations: VE, RectifiedFlow (a denoiser may declare its own as `parametrization`;
    ParametrizationWarning flags a flow-looking schedule run as VE); kdistpp.flow maps flow states, sigmas and denoisers to VE.
Denoisers: CFGDenoiser (cond and uncond in one batched call; keeps the unconditional estimate
    that cfg_pp=True reads).
The refinement: Guidance, FORMS, DIRECTIONS; ancestral_step.
Toys and metrics: kdistpp.toys (Gaussian mixtures with exact denoisers, imperfect students),
    kdistpp.metrics (sliced W2, energy and Frechet distances, mode weights).

Loaded on first access (`import kdistpp` does not import them):
    kdistpp.sfd: SFD / SFD-v distillation of few-step students (SFDTrainer, SFDConfig, sample_sfd).
    kdistpp.integrations: diffusers UNets as denoisers, the ComfyUI node, the A1111/Forge extension.
    kdistpp.conditional_toys: class-conditional mixtures with an exact CFG teacher.

Command line: python -m kdistpp demo (python -m kdistpp --help lists its options).
"""

from . import flow, metrics, toys
from .cfg import CFGDenoiser
from .guided_denoiser import TeacherGuidedDenoiser, teacher_guided
from .flow import get_sigmas_flow
from .guided_steps import GuidanceWarning, SigmaWindow
from .parametrization import VE, ParametrizationWarning, RectifiedFlow
from .refine import DIRECTIONS, FORMS, Guidance
from .validation import DenoiserOutputError, StudentOutputError, TeacherOutputError
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
    "DenoiserOutputError",
    "FORMS",
    "Guidance",
    "GuidanceWarning",
    "ParametrizationWarning",
    "REGISTRY",
    "RectifiedFlow",
    "SAMPLERS",
    "SigmaWindow",
    "StudentOutputError",
    "TeacherGuidedDenoiser",
    "TeacherOutputError",
    "VE",
    "ancestral_step",
    "get_sigmas_exponential",
    "get_sigmas_flow",
    "get_sigmas_karras",
    "sample_consistency",
    "sample_consistency_distpp",
    "sample_dpmpp_2m_distpp",
    "sample_dpmpp_2s_ancestral_distpp",
    "sample_euler_ancestral_distpp",
    "sample_euler_distpp",
    "teacher_guided",
]


_LAZY_MODULES = ("sfd", "integrations", "conditional_toys")


def __getattr__(name):
    """Imports kdistpp.sfd, kdistpp.integrations and kdistpp.conditional_toys on first access."""
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES))
