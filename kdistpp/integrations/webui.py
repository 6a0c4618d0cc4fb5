"""A1111 / Forge webui: Distillation++ samplers in the sampler list, the teacher through the webui's CFG.

`register()` adds one sampler per kdistpp base sampler ("Euler Distillation++", ...) built like the
webui's own k-diffusion samplers (`KDiffusionSampler(fn, model)`), so the webui's CFG denoiser,
prompt scheduling, callbacks and progress bar stay in charge. The teacher is a second checkpoint
evaluated by a copy of the webui's CFG denoiser whose inner model wraps the teacher, so it sees the
same cond/uncond (the webui's prompt parsing) at its own CFG scale.

Imports without the webui; `register()` and the teacher need it. Install: docs/webui.md.
"""

from __future__ import annotations

import copy
import dataclasses

from .. import SAMPLERS, validation
from ..guided_steps import SigmaWindow
from ..refine import DIRECTIONS, FORMS
from ..registry import REGISTRY

LABELS = {entry.name: entry.label for entry in REGISTRY}


def webui_modules():
    try:
        from modules import sd_models, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion, shared
    except ImportError as err:
        raise RuntimeError("the kdistpp Distillation++ extension runs inside the A1111/Forge webui (modules.sd_samplers "
                           "was not found); install it under extensions/ as docs/webui.md describes") from err
    return dataclasses.make_dataclass("Webui", ["sd_models", "sd_samplers", "common", "kdiffusion", "shared"])(
        sd_models, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion, shared)


@dataclasses.dataclass
class Settings:
    """What the UI sets for the next generation (the extension's `process` fills it)."""

    teacher: str | None = None  # checkpoint title as in the webui's checkpoint list
    w: float = 0.3
    guided_steps: int = 1
    teacher_cfg: float = 5.0
    form: str = "interpolate"
    direction: str = "student"
    sigma_min: float = 0.0  # with sigma_max > 0: guide the steps whose sigma lies in [sigma_min, sigma_max]
    sigma_max: float = 0.0

    def __post_init__(self):
        validation.check_options("form", self.form, FORMS)
        validation.check_options("direction", self.direction, DIRECTIONS)
        if self.sigma_max > 0:
            SigmaWindow(self.sigma_min, self.sigma_max)  # refuses a bad window now, not at sampling time

    def guidance_steps(self, n_steps: int):
        if self.sigma_max > 0:
            return SigmaWindow(self.sigma_min, self.sigma_max)
        return min(self.guided_steps, n_steps)


settings = Settings()


def load_teacher(webui, title: str):
    """The teacher's model object, loaded once and kept next to the student.

    Uses the webui's checkpoint cache (`sd_checkpoints_limit` >= 2): the teacher is loaded, then the
    student is reloaded from the cache, so both stay in memory and the student stays `shared.sd_model`.
    """
    info = webui.sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise ValueError(f"teacher checkpoint {title!r} not found; pick one from the webui's checkpoint list")
    loaded = webui.sd_models.model_data.loaded_sd_models
    for model in loaded:
        if model.sd_checkpoint_info == info:
            return model
    if getattr(webui.shared.opts, "sd_checkpoints_limit", 1) < 2:
        raise ValueError("Distillation++ needs the student and teacher in memory together: set Settings > "
                         "Stable Diffusion > 'Maximum number of checkpoints loaded at the same time' to 2")
    student_info = webui.shared.sd_model.sd_checkpoint_info
    webui.sd_models.reload_model_weights(info=info)
    teacher = webui.shared.sd_model
    webui.sd_models.reload_model_weights(info=student_info)
    return teacher


def teacher_cfg_denoiser(student_cfg, teacher_model, denoiser_classes):
    """A copy of the webui's CFG denoiser (same sampler, prompts, callbacks) around the teacher's model."""
    eps_class, v_class = denoiser_classes
    teacher = copy.copy(student_cfg)
    for registry in ("_modules", "_parameters", "_buffers"):  # nn.Module: a shallow copy would share these dicts,
        if hasattr(student_cfg, registry):                     # and setting model_wrap would replace the student's
            setattr(teacher, registry, dict(getattr(student_cfg, registry)))
    wrap = v_class if getattr(teacher_model, "parameterization", "eps") == "v" else eps_class
    teacher.model_wrap = wrap(teacher_model)
    return teacher


def make_sampler_function(base: str, webui_factory=webui_modules, denoiser_classes=None):
    """The function the webui's KDiffusionSampler calls as `fn(model_wrap_cfg, x, sigmas=..., extra_args=...,
    disable=..., callback=...)`; it reads `settings` at call time."""
    sampler = SAMPLERS[base]

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        if settings.teacher is None or settings.w == 0:
            return sampler(model, x, sigmas, extra_args, callback, disable, teacher=model, w=0.0)
        webui = webui_factory()
        classes = denoiser_classes or k_diffusion_denoisers()
        teacher = teacher_cfg_denoiser(model, load_teacher(webui, settings.teacher), classes)
        return sampler(model, x, sigmas, extra_args, callback, disable, teacher=teacher, w=settings.w,
                       guidance_steps=settings.guidance_steps(len(sigmas) - 1), form=settings.form,
                       direction=settings.direction,
                       teacher_extra_args={**extra_args, "cond_scale": settings.teacher_cfg})

    sample.__name__ = f"sample_{base}_distpp"
    return sample


def k_diffusion_denoisers():
    import k_diffusion.external  # the webui's bundled k-diffusion, not a runtime dependency of kdistpp

    return k_diffusion.external.CompVisDenoiser, k_diffusion.external.CompVisVDenoiser


def register(webui=None, denoiser_classes=None) -> list[str]:
    """Adds the Distillation++ samplers to the webui's sampler list (idempotent); returns their names.

    `webui` and `denoiser_classes` (eps and v CompVis denoisers) default to the running webui's."""
    factory = webui_modules if webui is None else (lambda: webui)
    webui = factory()
    names = []
    for base, label in LABELS.items():
        fn = make_sampler_function(base, factory, denoiser_classes)
        data = webui.common.SamplerData(label, lambda model, fn=fn: webui.kdiffusion.KDiffusionSampler(fn, model),
                                        [f"k_{base}_distpp"], {})
        if label not in webui.sd_samplers.all_samplers_map:
            webui.sd_samplers.all_samplers.append(data)
        webui.sd_samplers.all_samplers_map[label] = data
        names.append(label)
    webui.sd_samplers.set_samplers()
    return names
