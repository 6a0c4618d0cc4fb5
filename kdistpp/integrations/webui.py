"""A1111 and Forge webuis: Distillation++ samplers in the sampler list, the teacher through the webui's CFG.

`register()` adds one sampler per kdistpp base sampler ("Euler Distillation++", ...) built like its
base sampler in the webui (same sampler class, options and extra parameters), so the webui's CFG
denoiser, prompt scheduling, per-image RNG, callbacks and progress bar stay in charge. The teacher
is a second checkpoint evaluated by a copy of the webui's CFG denoiser whose inner model wraps the
teacher, so it sees the same cond/uncond (the webui's prompt parsing) at its own CFG scale. A1111
holds it in its checkpoint cache; Forge, which keeps one checkpoint, gets it from its own loader.

Imports without the webui; `register()` and the teacher need it. Install: docs/webui.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

from .. import validation
from ..guided_steps import GuidanceWarning, SigmaWindow, guided_step_indices
from ..refine import DIRECTIONS, FORMS
from ..registry import REGISTRY
from .webui_teachers import FORGE_DISTILLED_CFG, build_teacher, is_flow_model, release_teacher, webui_parametrization

LABELS = {entry.name: entry.label for entry in REGISTRY}
RENOISE_SEED_OFFSET = 0x5EED  # the renoise generators: the image's seed plus this, as in the ComfyUI node
DISTILLED_CFG_KEY = "DistillationPP teacher distilled CFG"  # infotext key, written for a guidance-distilled teacher
TEACHER_CFG_KEY = "DistillationPP teacher CFG"  # infotext key: the CFG scale the teacher ran at (Auto resolved)
# The panel's teacher CFG meaning "Auto": each teacher runs at its own default (default_teacher_cfg), 1 for a
# Flux one (dev, schnell), 5 for the others; set scales are 1 or more. A value, not a separate switch, so that
# the X/Y/Z plot's teacher CFG axis and the API's script arguments take it as they take any scale.
AUTO_TEACHER_CFG = 0.0


def webui_modules():
    try:
        from modules import (rng, sd_models, sd_samplers, sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_lcm,
                             shared)
    except ImportError as err:
        raise RuntimeError("the kdistpp Distillation++ extension runs inside the A1111 or Forge webui (modules.sd_samplers "
                           "was not found); install it under extensions/ as docs/webui.md describes") from err
    names = ["sd_models", "sd_samplers", "common", "kdiffusion", "lcm", "rng", "shared"]
    return dataclasses.make_dataclass("Webui", names)(sd_models, sd_samplers, sd_samplers_common,
                                                      sd_samplers_kdiffusion, sd_samplers_lcm, rng, shared)


@dataclasses.dataclass
class Settings:
    """What the UI sets for the next generation (the extension's `process` fills it)."""

    teacher: str | None = None  # checkpoint title as in the webui's checkpoint list
    w: float = 0.3
    guided_steps: int = 1
    teacher_cfg: float = AUTO_TEACHER_CFG  # the teacher's CFG scale; AUTO_TEACHER_CFG: its own default
    form: str = "interpolate"
    direction: str = "student"
    sigma_min: float = 0.0  # with sigma_max > 0: guide the steps whose sigma lies in [sigma_min, sigma_max]
    sigma_max: float = 0.0

    def __post_init__(self):
        validation.check_options("form", self.form, FORMS)
        validation.check_options("direction", self.direction, DIRECTIONS)
        # a scale in (0, 1) sits on the panel's slider next to Auto (0) but weakens the prompt below its own
        # prediction: refused, as are negatives and NaN
        if not (self.teacher_cfg == AUTO_TEACHER_CFG or self.teacher_cfg >= 1):
            raise ValueError(f"teacher_cfg must be {AUTO_TEACHER_CFG:g} for Auto (1 for a Flux teacher, dev or "
                             f"schnell, 5 for others) or a CFG scale of 1 or more (1: the prompt alone); got "
                             f"{self.teacher_cfg}")
        if self.sigma_max > 0:
            SigmaWindow(self.sigma_min, self.sigma_max)  # refuses a bad window now, not at sampling time

    def plan(self, sigmas) -> tuple[list[int], str]:
        """The guided step indices and the renoise level ('next' or 'current') for the schedule `sigmas`.

        The teacher sees the student's estimate renoised to the next sigma (the paper's choice), which
        the final step (next sigma 0) does not have: it is left out of a guided set that holds other
        steps, and when it is the only step asked for (a 1-step schedule, or a window around the last
        sigma only) it is guided at its own sigma instead. The 'guidance' form renoises nothing and
        guides every step asked for."""
        sigmas = [float(s) for s in sigmas]
        n_steps = len(sigmas) - 1
        if self.sigma_max > 0:
            steps = guided_step_indices(SigmaWindow(self.sigma_min, self.sigma_max), sigmas)
        else:
            steps = list(range(min(self.guided_steps, n_steps)))
        final = n_steps - 1
        if self.form == "guidance" or not steps or sigmas[-1] != 0 or steps[-1] != final:
            return steps, "next"
        if len(steps) == 1:
            return steps, "current"
        return steps[:-1], "next"


settings = Settings()


def webui_noise(p):
    """The webui's per-image noise (`p.rng`), so batches match single seeds, as its own samplers do."""
    return lambda sigma, sigma_next: p.rng.next()


def renoise_noise(webui, p, x):
    """Renoise noise from per-image generators seeded like the image's (offset), so the teacher can be A/B'd
    at a fixed seed and a batch matches its seeds run alone."""
    rng = webui.rng.ImageRNG(x.shape[1:], [int(seed) + RENOISE_SEED_OFFSET for seed in p.seeds])
    return lambda sigma, sigma_next: rng.next()


def distilled_cfg_scale(p) -> float:
    """Forge's "Distilled CFG Scale" of this pass (its Hires one on the hires pass): a guidance-distilled
    teacher's guidance value (Flux-dev). Forge gives it to a guidance-distilled student too; a student without a
    guidance embedding (schnell) ignores it, so there it is the teacher's alone. 3.5 (Forge's default) without."""
    value = getattr(p, "hr_distilled_cfg" if getattr(p, "is_hr_pass", False) else "distilled_cfg_scale", None)
    return FORGE_DISTILLED_CFG if value is None else float(value)


def teacher_cfg_scale(value: float, teacher) -> float:
    """The CFG scale the teacher runs at: the panel's `value`, or at Auto (AUTO_TEACHER_CFG) the teacher's own
    default, resolved when it is built (`teacher.default_cfg`: 1 for a Flux teacher, dev or schnell, as Forge
    runs Flux; 5 for the others, real-CFG teachers)."""
    if float(value) != AUTO_TEACHER_CFG:
        return float(value)
    return float(teacher.default_cfg)


def flow_schedule(sigmas):
    """Forge's sigmas for a flow model, checked: its 'Automatic' schedule type gives Flux and Chroma their
    timestep indices (0 to 9999), refused here with the fix, and ends SD3's schedule with a step from s = 0
    to 0, which Forge's samplers take as a model call that changes nothing (a flow model's estimate at
    s = 0 is its input); that step is dropped."""
    if len(sigmas) and float(sigmas[0]) > 1:
        raise ValueError(f"the schedule starts at sigma {float(sigmas[0]):g}, not a flow sigma (0 to 1): Forge's "
                         "'Automatic' schedule type gives this flow model its timestep indices; pick the schedule "
                         "type 'Simple' (Forge's default for Flux) or another one")
    while len(sigmas) > 2 and float(sigmas[-1]) == 0 and float(sigmas[-2]) == 0:
        sigmas = sigmas[:-1]
    return sigmas


def make_sampler_function(entry, webui_factory=webui_modules, denoiser_classes=None):
    """The function the webui's sampler calls as `fn(model_wrap_cfg, x, sigmas=..., extra_args=..., disable=...,
    callback=..., eta=..., s_noise=...)` (the options its base sampler takes); it reads `settings` at call time."""
    sampler = entry.fn

    def sample(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        # Forge's flow models (Flux, Chroma, SD3/3.5) sample in flow coordinates on Forge's own flow sigmas
        flow = {"parametrization": "flow"} if webui_parametrization("model", getattr(model, "inner_model", None)) \
            == "flow" else {}
        if flow:
            sigmas = flow_schedule(sigmas)
        extra_args = extra_args or {}
        p = getattr(model, "p", None)
        if "noise_sampler" in parameters and options.get("noise_sampler") is None and hasattr(p, "rng"):
            options["noise_sampler"] = webui_noise(p)
        if settings.teacher is None:
            release_teacher(webui_factory())  # a teacher set back to None frees its memory (Forge's engine)
        steps, level = settings.plan(sigmas)
        if settings.teacher is not None and settings.w != 0 and not steps:
            warnings.warn("Distillation++: no step of this schedule is among the guided steps (guided steps 0, or a "
                          "sigma window holding no step): the teacher is not loaded and the image is the plain "
                          "sampler's", GuidanceWarning)
        if settings.teacher is None or settings.w == 0 or not steps:
            return sampler(model, x, sigmas, extra_args, callback, disable, **options, **flow)  # the plain sampler
        webui = webui_factory()
        teacher = build_teacher(webui, model, settings.teacher, denoiser_classes, distilled_cfg_scale(p))
        if getattr(teacher, "distilled_cfg", None) is not None and hasattr(p, "extra_generation_params"):
            p.extra_generation_params[DISTILLED_CFG_KEY] = teacher.distilled_cfg
        teacher_cfg = teacher_cfg_scale(settings.teacher_cfg, teacher)
        if hasattr(p, "extra_generation_params"):  # the resolved scale, so pasting the infotext reproduces the image
            p.extra_generation_params[TEACHER_CFG_KEY] = teacher_cfg
        renoise = renoise_noise(webui, p, x) if hasattr(p, "seeds") and settings.form != "guidance" else None
        return sampler(model, x, sigmas, extra_args, callback, disable, teacher=teacher, w=settings.w,
                       guidance_steps=steps, form=settings.form, renoise=level,
                       direction=settings.direction, renoise_sampler=renoise,
                       teacher_extra_args={**extra_args, "cond_scale": teacher_cfg}, **options, **flow)

    # the webui passes eta, s_noise, sigmas... only to functions whose signature names them
    parameters = {name: par for name, par in inspect.signature(sampler).parameters.items()
                  if par.kind is not inspect.Parameter.KEYWORD_ONLY}
    sample.__signature__ = inspect.Signature(list(parameters.values()))
    sample.__name__ = f"sample_{entry.name}_distpp"
    return sample


def is_flow_engine(model) -> bool:
    """A Forge engine whose model is a rectified-flow one (Flux, Chroma, SD3/3.5: 'const' prediction)."""
    return is_flow_model(getattr(getattr(getattr(model, "forge_objects", None), "unet", None), "model", None))


def flow_sampler_class(webui, model, cls):
    """The sampler class for `model`: the webui's LCM class wraps any model as an eps DDPM one, which a flow
    model is not, so on Forge's flow models 'LCM Distillation++' takes the k-diffusion class (Forge's own flow
    wrapper and flow sigmas) and renoises as flow models do ((1 - s) x0 + s n)."""
    if cls is webui.lcm.LCMSampler and is_flow_engine(model):
        return webui.kdiffusion.KDiffusionSampler
    return cls


def register(webui=None, denoiser_classes=None) -> list[str]:
    """Adds the Distillation++ samplers to the webui's sampler list (idempotent); returns their names.

    Each takes its base sampler's options (schedule type, second-order step count...), its extra
    parameters (eta, s_noise, churn) and its sampler class (LCM's denoiser for 'LCM Distillation++'),
    so at w = 0 it is that sampler. `webui` and `denoiser_classes` (eps and v CompVis denoisers)
    default to the running webui's."""
    factory = webui_modules if webui is None else (lambda: webui)
    webui = factory()
    names = []
    for entry in REGISTRY:
        base = webui.sd_samplers.all_samplers_map.get(entry.webui_base)
        options = dict(base.options) if base is not None else {}
        sampler_class = webui.lcm.LCMSampler if entry.name == "consistency" else webui.kdiffusion.KDiffusionSampler
        extra_params = webui.kdiffusion.sampler_extra_params.get(f"sample_{entry.name}", [])

        def constructor(model, fn=make_sampler_function(entry, factory, denoiser_classes), cls=sampler_class,
                        extra=extra_params):
            sampler = flow_sampler_class(webui, model, cls)(fn, model)
            sampler.extra_params = list(extra)  # keyed by function name in the webui, which a callable has not
            return sampler

        data = webui.common.SamplerData(entry.label, constructor, [f"k_{entry.name}_distpp"], options)
        if entry.label not in webui.sd_samplers.all_samplers_map:
            webui.sd_samplers.all_samplers.append(data)
        else:
            index = [d.name for d in webui.sd_samplers.all_samplers].index(entry.label)
            webui.sd_samplers.all_samplers[index] = data
        webui.sd_samplers.all_samplers_map[entry.label] = data
        names.append(entry.label)
    webui.sd_samplers.set_samplers()
    return names
