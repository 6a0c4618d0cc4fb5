"""ComfyUI node: a Distillation++ SAMPLER for SamplerCustom / SamplerCustomAdvanced.

The node takes the teacher MODEL, the teacher's positive/negative conditioning and CFG, and the
Distillation++ settings; it returns a SAMPLER. The student is the model SamplerCustom samples (with
its own conditioning, CFG, patches and memory management): when sampling starts, before any model
call, that model and the teacher are checked (same latent space, same parametrization), and an
error names the input to change. Rectified-flow models (ComfyUI's CONST model sampling: SD3/3.5,
Flux, ...) are sampled with kdistpp's parametrization='flow' in ComfyUI's own flow sigmas, the
others with 've', as ComfyUI's own samplers pick their *_RF variants.

The teacher is sampled through ComfyUI's own path at every guided call: a `CFGGuider` for the
teacher runs `sample` with a one-call sampler, so its LoRAs, model patches, wrappers, hooks,
`transformer_options` (with the student's `sample_sigmas`), conditioning (img2img latent, inpaint
mask) and model loading are ComfyUI's. Afterwards the student's patcher is loaded again, together
with the models its sampling loaded (ControlNets, adapters: the teacher's load may have evicted
them) and the memory estimate ComfyUI's `prepare_sampling` used: a LoRA student is a clone of its
teacher and shares its weights, and loading one patches the shared weights for it. At w = 0 or
with no guided step the teacher is never loaded.

Noise follows ComfyUI's seed: ancestral and consistency steps draw from ComfyUI's own
`default_noise_sampler(x, seed)`, so at w = 0 every base sampler equals ComfyUI's sampler of the
same name; the renoise noise and the renoise='random' level have their own generator seeded from
the same seed, so guiding shifts neither the ancestral noise nor the global RNG, and a teacher A/B
at a fixed seed differs by the teacher alone.

This module imports without ComfyUI; the node only needs it when it runs. Install: docs/comfyui.md.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch

from ..guided_steps import SigmaWindow
from ..refine import DIRECTIONS, FORMS
from ..registry import BY_NAME, REGISTRY

RENOISE = ("next", "current", "random")
CATEGORY = "sampling/custom_sampling/samplers"
RENOISE_SEED_OFFSET = 0x5EED  # the renoise generator's seed = ComfyUI's seed + this; its own stream
SEED_RANGE = 2**64  # ComfyUI's seeds are 0 ... 2**64 - 1; torch.Generator.manual_seed takes those (and negatives)


def comfy_modules():
    """ComfyUI's modules the node uses, or a clear error outside ComfyUI."""
    try:
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.model_management as management
        import comfy.model_sampling as model_sampling
        import comfy.sampler_helpers as sampler_helpers
        import comfy.samplers as samplers
    except ImportError as err:
        raise RuntimeError("the kdistpp Distillation++ node runs inside ComfyUI (comfy.samplers was not found); "
                           "install it into ComfyUI's custom_nodes as docs/comfyui.md describes") from err
    return SimpleNamespace(samplers=samplers, management=management, k_sampling=k_sampling,
                           model_sampling=model_sampling, sampler_helpers=sampler_helpers)


class ComfyTeacher:
    """The teacher as a kdistpp denoiser: one call = one ComfyUI `CFGGuider.sample` with a one-step sampler.

    `student` is the KSamplerX0Inpaint that ComfyUI hands the sampler function: it carries the
    student's guider (its patcher, for restoring its weights), latent image and noise.
    """

    def __init__(self, teacher_patcher, positive, negative, cfg: float, student, sigmas, extra_args: dict):
        self.comfy = comfy_modules()
        self.guider = self.comfy.samplers.CFGGuider(teacher_patcher)
        self.guider.set_conds(positive, negative)
        self.guider.set_cfg(cfg)
        self.student, self.sigmas = student, sigmas
        self.seed = extra_args.get("seed")
        mask = extra_args.get("denoise_mask")
        self.mask = mask[:, :1] if mask is not None and mask.ndim == 4 else mask  # as a user mask: one channel
        self.calls = 0
        self.student_memory = None  # (memory_required, minimum_memory_required) of the student's sampling

    def __call__(self, x, sigma, **_student_extra_args):
        result = {}

        def one_call(model, noise, sigmas, extra_args=None, callback=None, disable=None):
            result["denoised"] = model(x.to(noise), sigma.to(noise), **(extra_args or {}))
            return noise  # the guider post-processes this; the estimate is taken from `result`

        student_guider = self.student.inner_model
        inner = student_guider.inner_model  # the student's BaseModel: latent format of both (checked)
        latent = self.student.latent_image
        latent = inner.process_latent_out(latent) if torch.count_nonzero(latent) > 0 else latent
        current = getattr(inner, "current_patcher", None)
        try:
            self.guider.sample(self.student.noise, latent, self.comfy.samplers.KSAMPLER(one_call), self.sigmas,
                               denoise_mask=self.mask, disable_pbar=True, seed=self.seed)
        finally:
            # A LoRA student is a clone of its teacher: one BaseModel, whose weights the teacher's load
            # re-patched and whose current patcher the teacher's cleanup cleared. Give both back, and
            # load again what the student's sampling loaded (ControlNets, adapters) that the teacher's
            # load may have evicted.
            self.reload_student(student_guider)
            if current is not None:
                inner.current_patcher = current
        self.calls += 1
        return result["denoised"]

    def reload_student(self, guider) -> None:
        """Loads the student's patcher with the models its sampling loaded, as ComfyUI's
        `prepare_sampling` loaded them: the same list and the same memory estimate."""
        patcher, helpers = guider.model_patcher, self.comfy.sampler_helpers
        extra = list(getattr(guider, "loaded_models", None) or [])  # CFGGuider.outer_sample keeps them there
        conds = getattr(guider, "conds", None) or {}
        if self.student_memory is None:
            memory, minimum = helpers.estimate_memory(patcher, self.student.noise.shape, conds)
            _, inference = helpers.get_additional_models(conds, patcher.model_dtype())
            self.student_memory = memory + inference, minimum + inference
        memory, minimum = self.student_memory
        self.comfy.management.load_models_gpu([patcher] + extra, memory_required=memory,
                                              minimum_memory_required=minimum)


def comfy_noise_sampler(k_sampling, x, seed):
    """ComfyUI's noise for ancestral/consistency steps: a generator seeded from the sampling seed."""
    return k_sampling.default_noise_sampler(x, seed=seed)


def renoise_seed(seed: int) -> int:
    """The renoise stream's seed: ComfyUI's seed plus an offset, wrapped into ComfyUI's seed range
    (which torch.Generator.manual_seed takes), so the top seeds do not overflow."""
    return (int(seed) + RENOISE_SEED_OFFSET) % SEED_RANGE


def renoise_generator(x, seed) -> torch.Generator | None:
    """The renoise stream's own generator, on the latent's device: it draws the renoise noise and the
    renoise='random' level, so guiding leaves the global RNG alone. None (the global RNG) without a seed."""
    if seed is None:
        return None
    return torch.Generator(device=x.device).manual_seed(renoise_seed(seed))


def sample_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, teacher_model, positive, negative,
                  teacher_cfg, base, w, guidance_steps, form, renoise, direction="student"):
    """The SAMPLER's function, called by ComfyUI's KSAMPLER.sample with the student wrapped as `model`."""
    comfy = comfy_modules()
    parametrization = check_models(comfy, sampled_patcher(model), teacher_model)
    steps = len(sigmas) - 1
    if not isinstance(guidance_steps, SigmaWindow) and guidance_steps > steps:  # named as the node names it
        raise ValueError(f"guided_steps={guidance_steps} (an input of the {NODE_NAME} node) is beyond the {steps} "
                         f"steps this sampler runs; use 0 to {steps}")
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed")
    teacher = ComfyTeacher(teacher_model, positive, negative, teacher_cfg, model, sigmas, extra_args)
    takes_noise = "noise_sampler" in inspect.signature(BY_NAME[base].fn).parameters
    noise = {"noise_sampler": comfy_noise_sampler(comfy.k_sampling, x, seed)} if takes_noise else {}
    return BY_NAME[base].fn(model, x, sigmas, extra_args, callback, disable, teacher=teacher, w=w,
                            guidance_steps=guidance_steps, form=form, renoise=renoise, teacher_extra_args={},
                            direction=direction,
                            renoise_generator=None if form == "guidance" else renoise_generator(x, seed),  # no renoise
                            parametrization=parametrization, **noise)


NODE_NAME = "Distillation++ Sampler (kdistpp)"
SAMPLED = "the student (SamplerCustom's `model` input, the model it samples)"
TEACHER = "the teacher (the `teacher` input of the Distillation++ Sampler node)"


def sampled_patcher(model):
    """The ModelPatcher SamplerCustom samples: ComfyUI's KSAMPLER hands the sampler function a
    KSamplerX0Inpaint whose inner model is the guider (CFGGuider and its subclasses) of that patcher."""
    return model.inner_model.model_patcher


def same_latent_space(student, teacher) -> None:
    s = type(getattr(getattr(student, "model", None), "latent_format", None))
    t = type(getattr(getattr(teacher, "model", None), "latent_format", None))
    if s is not t:
        raise ValueError(f"the student and the teacher work in different latent spaces: {SAMPLED} is {s.__name__}, "
                         f"{TEACHER} is {t.__name__}; connect a teacher of the student's family to the Distillation++ "
                         "Sampler's `teacher` input (e.g. SDXL base for SDXL-Lightning)")


def parametrization_of(model_sampling_module, patcher) -> str:
    """'flow' for a rectified-flow model (ComfyUI's CONST model sampling: SD3/3.5, Flux, ...), else 've'
    (ComfyUI's eps/v/EDM models, which its samplers, like kdistpp's default, run in VE sigma)."""
    sampling = patcher.get_model_object("model_sampling")
    return "flow" if isinstance(sampling, model_sampling_module.CONST) else "ve"


PARAMETRIZATION_NAMES = {"flow": "a rectified-flow model (CONST model sampling: SD3, Flux, ...)",
                         "ve": "a VE/epsilon/v model (SD 1.x, SDXL, ...)"}


def same_parametrization(model_sampling_module, student, teacher) -> str:
    """The parametrization both models share, or a ValueError naming the inputs: the refinement
    renoises the student's estimate at the teacher's sigma, which means one thing in both only when
    both build their state from x0 and noise the same way."""
    s, t = parametrization_of(model_sampling_module, student), parametrization_of(model_sampling_module, teacher)
    if s != t:
        raise ValueError(f"the student and the teacher are parametrized differently: {SAMPLED} is "
                         f"{PARAMETRIZATION_NAMES[s]} ({type(student.model).__name__}), {TEACHER} is "
                         f"{PARAMETRIZATION_NAMES[t]} ({type(teacher.model).__name__}); connect a teacher of the "
                         "student's family to the Distillation++ Sampler's `teacher` input (e.g. Flux dev for a "
                         "Flux schnell-style student, SDXL base for SDXL-Lightning)")
    return s


def check_models(comfy, student, teacher) -> str:
    """The checks on the model actually sampled and the teacher, before any model call; returns the
    parametrization ('ve' or 'flow') to sample them with."""
    parametrization = same_parametrization(comfy.model_sampling, student, teacher)
    same_latent_space(student, teacher)
    return parametrization


def guided_steps_option(guided_steps: int, sigma_min: float = 0.0, sigma_max: float = 0.0):
    """The node's choice of guided steps: a sigma window when its upper end is set, else the first N."""
    return SigmaWindow(sigma_min, sigma_max) if sigma_max > 0 else guided_steps


class DistillationPPSampler:
    """Distillation++ (Park et al. 2024): the teacher refines the student's first step(s)."""

    DESCRIPTION = ("Distillation++ (Park et al. 2024): on the first step(s) the distilled student's estimate is "
                   "renoised, denoised by its teacher at the teacher's CFG, and moved a fraction w toward it; the "
                   "sampler then continues. Feed the SAMPLER to SamplerCustom with the student model: the student "
                   "is the model SamplerCustom samples (checked against the teacher when sampling starts). One "
                   "teacher call per guided step; at w = 0 it is ComfyUI's own sampler of the same name, same seed.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "teacher": ("MODEL", {"tooltip": "the base model of the student SamplerCustom samples (e.g. SDXL base "
                                             "for SDXL-Lightning / DMD2 / LCM); checked against it when sampling "
                                             "starts"}),
            "teacher_positive": ("CONDITIONING", {"tooltip": "the teacher's prompt (encode with the teacher's CLIP)"}),
            "teacher_negative": ("CONDITIONING", {"tooltip": "the teacher's negative prompt"}),
            "teacher_cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                      "tooltip": "the teacher's CFG scale (the paper: 7.5 for SDXL)"}),
            "base_sampler": ([e.name for e in REGISTRY], {"default": "euler", "tooltip": "the solver the refinement "
                             "is inserted into; 'consistency' is ComfyUI's lcm (LCM, DMD2)"}),
            "w": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                            "tooltip": "teacher weight (the paper's lambda): Lightning 0.1, Turbo 0.02-0.1, "
                                       "DMD2 0.01 and LCM 0.01-0.02 with form eps; 0 = the plain sampler"}),
            "guided_steps": ("INT", {"default": 1, "min": 0, "max": 100,
                                     "tooltip": "the first N steps are refined (the paper: 1); more than the "
                                                "schedule's steps fails when sampling starts"}),
            "form": (list(FORMS), {"default": "interpolate", "tooltip": "interpolate = eq. 9 (renoise, teacher, "
                                   "lerp); guidance = eq. 10 (teacher at the student's point); eps = the authors' "
                                   "mixing for consistency students (LCM, DMD2)"}),
            "renoise": (list(RENOISE), {"default": "next", "tooltip": "the teacher's noise level: the next sigma "
                                        "(the paper's decreasing schedule), the current one, or random"}),
        }, "optional": {
            "direction": (list(DIRECTIONS), {"default": "student", "tooltip": "student = the authors' update (keep "
                                             "the student's noise, replace its clean estimate); refined = the refined "
                                             "estimate everywhere (a smaller step for the same w)"}),
            "guide_sigma_min": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                          "tooltip": "with guide_sigma_max > 0: guide every step whose sigma lies in "
                                                     "[min, max] instead of the first N steps"}),
            "guide_sigma_max": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.01,
                                          "tooltip": "0 = off (use guided_steps); else the upper end of the sigma "
                                                     "window to guide"}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "build"
    CATEGORY = CATEGORY

    def build(self, teacher, teacher_positive, teacher_negative, teacher_cfg, base_sampler, w, guided_steps,
              form, renoise, direction="student", guide_sigma_min=0.0, guide_sigma_max=0.0):
        comfy = comfy_modules()
        steps = guided_steps_option(guided_steps, guide_sigma_min, guide_sigma_max)
        options = dict(teacher_model=teacher, positive=teacher_positive, negative=teacher_negative, teacher_cfg=teacher_cfg,
                       base=base_sampler, w=w, guidance_steps=steps, form=form, renoise=renoise, direction=direction)
        return (comfy.samplers.KSAMPLER(sample_distpp, extra_options=options),)


NODE_CLASS_MAPPINGS = {"KdistppDistillationPPSampler": DistillationPPSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"KdistppDistillationPPSampler": NODE_NAME}
