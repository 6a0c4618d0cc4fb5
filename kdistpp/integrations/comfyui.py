"""ComfyUI node: a Distillation++ SAMPLER for SamplerCustom / SamplerCustomAdvanced.

The node takes the student and teacher MODELs, the teacher's positive/negative conditioning and
CFG, and the Distillation++ settings; it returns a SAMPLER. At sampling time the student is the
model SamplerCustom passes in (with its own conditioning and CFG); the teacher is prepared and
evaluated through ComfyUI's own path (`prepare_sampling`, `process_conds`, `sampling_function`),
so its LoRAs, patches and conditioning behave as in any ComfyUI sampler.

This module imports without ComfyUI; the node only needs it when it runs. Install: docs/comfyui.md.
"""

from __future__ import annotations

import torch

from .. import SAMPLERS
from ..refine import FORMS

RENOISE = ("next", "current", "random")
CATEGORY = "sampling/custom_sampling/samplers"


def comfy_modules():
    """ComfyUI's sampler modules, or a clear error outside ComfyUI."""
    try:
        import comfy.sampler_helpers as helpers
        import comfy.samplers as samplers
    except ImportError as err:
        raise RuntimeError("the kdistpp Distillation++ node runs inside ComfyUI (comfy.samplers was not found); "
                           "install it into ComfyUI's custom_nodes as docs/comfyui.md describes") from err
    return samplers, helpers


class ComfyTeacher:
    """The teacher as a kdistpp denoiser, D(x, sigma) = CFG of its positive/negative conditioning.

    A context manager: entering loads the teacher and prepares its conditioning for this latent
    (ComfyUI's `prepare_sampling` + `process_conds`); leaving unloads what it loaded.
    """

    def __init__(self, model_patcher, positive, negative, cfg: float, seed=None, modules=None):
        self.patcher, self.positive, self.negative, self.cfg, self.seed = model_patcher, positive, negative, cfg, seed
        self.samplers, self.helpers = modules or comfy_modules()
        self.inner = self.conds = self.loaded = None

    def prepare(self, x: torch.Tensor) -> "ComfyTeacher":
        conds = {"positive": self.helpers.convert_cond(self.positive), "negative": self.helpers.convert_cond(self.negative)}
        self.inner, conds, self.loaded = self.helpers.prepare_sampling(self.patcher, x.shape, conds, self.patcher.model_options)
        self.patcher.pre_run()
        self.conds = self.samplers.process_conds(self.inner, x, conds, x.device, torch.zeros_like(x), None, self.seed)
        return self

    def __call__(self, x, sigma, **_ignored):
        # extra_args of the student (its denoise mask, model_options) are not the teacher's: dropped
        return self.samplers.sampling_function(self.inner, x, sigma, self.conds.get("negative"), self.conds.get("positive"),
                                               self.cfg, model_options=self.patcher.model_options, seed=self.seed)

    def release(self) -> None:
        if self.inner is not None:
            self.patcher.cleanup()
            self.helpers.cleanup_models(self.conds, self.loaded)
            self.inner = None


def sample_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, teacher_model, positive, negative,
                  teacher_cfg, base, w, guidance_steps, form, renoise):
    """The SAMPLER's function, called by ComfyUI's KSAMPLER.sample with the student wrapped as `model`."""
    extra_args = extra_args or {}
    teacher = ComfyTeacher(teacher_model, positive, negative, teacher_cfg, extra_args.get("seed")).prepare(x)
    try:
        return SAMPLERS[base](model, x, sigmas, extra_args, callback, disable, teacher=teacher, w=w,
                              guidance_steps=guidance_steps, form=form, renoise=renoise, teacher_extra_args={})
    finally:
        teacher.release()


def same_latent_space(student, teacher) -> None:
    s = type(getattr(getattr(student, "model", None), "latent_format", None))
    t = type(getattr(getattr(teacher, "model", None), "latent_format", None))
    if s is not t:
        raise ValueError(f"student and teacher work in different latent spaces ({s.__name__} vs {t.__name__}): "
                         "pick a teacher of the student's family (e.g. SDXL base for SDXL-Lightning)")


class DistillationPPSampler:
    """Distillation++ (Park et al. 2024): the teacher refines the student's first step(s)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "student": ("MODEL", {"tooltip": "the distilled model SamplerCustom samples (checked for latent-space match)"}),
            "teacher": ("MODEL", {"tooltip": "its base model"}),
            "teacher_positive": ("CONDITIONING",),
            "teacher_negative": ("CONDITIONING",),
            "teacher_cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1}),
            "base_sampler": (list(SAMPLERS), {"default": "euler"}),
            "w": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": "teacher weight (lambda)"}),
            "guided_steps": ("INT", {"default": 1, "min": 0, "max": 100, "tooltip": "the first N steps are refined"}),
            "form": (list(FORMS), {"default": "interpolate"}),
            "renoise": (list(RENOISE), {"default": "next"}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, student, teacher, teacher_positive, teacher_negative, teacher_cfg, base_sampler, w, guided_steps,
              form, renoise):
        samplers, _ = comfy_modules()
        same_latent_space(student, teacher)
        options = dict(teacher_model=teacher, positive=teacher_positive, negative=teacher_negative, teacher_cfg=teacher_cfg,
                       base=base_sampler, w=w, guidance_steps=guided_steps, form=form, renoise=renoise)
        return (samplers.KSAMPLER(sample_distpp, extra_options=options),)


NODE_CLASS_MAPPINGS = {"KdistppDistillationPPSampler": DistillationPPSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"KdistppDistillationPPSampler": "Distillation++ Sampler (kdistpp)"}
