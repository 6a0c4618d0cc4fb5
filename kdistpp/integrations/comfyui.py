"""What the ComfyUI nodes run: a Distillation++ SAMPLER for SamplerCustom / SamplerCustomAdvanced,
and a Distillation++ GUIDER that refines the student's estimate inside any ComfyUI sampler (the
nodes themselves, in ComfyUI's V3 schema, are in comfyui_nodes).

The SAMPLER node takes the teacher MODEL, the teacher's positive/negative conditioning and CFG, and the
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

The GUIDER is ComfyUI's CFGGuider for the student plus the teacher: `GuidedEvaluations` says which
model evaluation of the sampler's run is refined (one per guided step), `teacher_guided` refines it
(the refined estimate replaces the student's), the teacher and the seeds are as above.

This module imports without ComfyUI; the nodes only need it when they run. Install: docs/comfyui.md.
"""

from __future__ import annotations

import inspect
import warnings
from types import SimpleNamespace

import torch

from ..guided_denoiser import teacher_guided
from ..guided_steps import GuidanceWarning, SigmaWindow
from ..refine import DIRECTIONS, FORMS
from ..registry import BY_NAME, REGISTRY

RENOISE = ("next", "current", "random")
BASE_SAMPLERS = [e.name for e in REGISTRY]  # the SAMPLER node's base_sampler choices
CATEGORY = "sampling/custom_sampling/samplers"
RENOISE_SEED_OFFSET = 0x5EED  # the renoise generator's seed = ComfyUI's seed + this; its own stream
SEED_RANGE = 2**64  # ComfyUI's seeds are 0 ... 2**64 - 1; torch.Generator.manual_seed takes those (and negatives)


def comfy_modules():
    """ComfyUI's modules the node uses, or a clear error outside ComfyUI."""
    try:
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.model_management as management
        import comfy.model_patcher as model_patcher
        import comfy.model_sampling as model_sampling
        import comfy.nested_tensor as nested_tensor
        import comfy.sampler_helpers as sampler_helpers
        import comfy.samplers as samplers
        import comfy.utils as utils
    except ImportError as err:
        raise RuntimeError("the kdistpp Distillation++ node runs inside ComfyUI (comfy.samplers was not found); "
                           "install it into ComfyUI's custom_nodes as docs/comfyui.md describes") from err
    return SimpleNamespace(samplers=samplers, management=management, k_sampling=k_sampling, model_patcher=model_patcher,
                           model_sampling=model_sampling, sampler_helpers=sampler_helpers,
                           nested_tensor=nested_tensor, utils=utils)


class ComfyTeacher:
    """The teacher as a kdistpp denoiser: one call = one ComfyUI `CFGGuider.sample` with a one-step sampler.

    `student_guider` is the guider sampling the student (its patcher, for restoring its weights); `noise`,
    `latent` (as `CFGGuider.sample` takes it), `sigmas`, `seed` and `denoise_mask` are the student's run's.

    Packed latents (several latents in one, e.g. LTX-2's video and audio): the student's run holds them
    packed, one flat tensor per batch item, with `latent_shapes` naming the parts. `CFGGuider.sample`
    packs a nested latent itself and hands the model the shapes to unpack it, so the teacher is given
    the noise, latent and mask as nested tensors again; the sample it evaluates stays packed, as the
    student's is.
    """

    def __init__(self, teacher_patcher, positive, negative, cfg: float, student_guider, noise, latent, sigmas, seed,
                 denoise_mask, latent_shapes=None):
        self.comfy = comfy_modules()
        self.guider = self.comfy.samplers.CFGGuider(teacher_patcher)
        self.guider.set_conds(positive, negative)
        self.guider.set_cfg(cfg)
        self.student_guider, self.packed_noise = student_guider, noise
        self.noise, self.latent = self.nested(noise, latent_shapes), self.nested(latent, latent_shapes)
        self.sigmas, self.seed = sigmas, seed
        self.mask = None if denoise_mask is None else self.nested(denoise_mask, latent_shapes, user_mask=True)
        self.calls = 0
        self.student_memory = None  # (memory_required, minimum_memory_required) of the student's sampling

    def nested(self, tensor, latent_shapes, user_mask=False):
        """`tensor` as the teacher's `CFGGuider.sample` takes it: a NestedTensor of its parts when it packs
        several latents, else itself. A mask becomes a user mask: one channel for an image latent, which
        `CFGGuider.sample` spreads over the channels again."""
        parts = [tensor] if not latent_shapes or len(latent_shapes) < 2 else \
            self.comfy.utils.unpack_latents(tensor, latent_shapes)
        if user_mask:
            parts = [part[:, :1] if part.ndim == 4 else part for part in parts]
        return parts[0] if len(parts) == 1 else self.comfy.nested_tensor.NestedTensor(parts)

    @classmethod
    def for_sampler(cls, teacher_patcher, positive, negative, cfg: float, student, sigmas, extra_args: dict):
        """The teacher of a SAMPLER's run: `student` is the KSamplerX0Inpaint that ComfyUI hands the sampler
        function (the student's guider, its noise, and its latent after `process_latent_in`)."""
        inner = student.inner_model.inner_model
        latent = student.latent_image
        latent = inner.process_latent_out(latent) if torch.count_nonzero(latent) > 0 else latent
        return cls(teacher_patcher, positive, negative, cfg, student.inner_model, student.noise, latent, sigmas,
                   extra_args.get("seed"), extra_args.get("denoise_mask"), latent_shapes_of(student.inner_model))

    def __call__(self, x, sigma, **_student_extra_args):
        result = {}

        def one_call(model, noise, sigmas, extra_args=None, callback=None, disable=None):
            result["denoised"] = model(x.to(noise), sigma.to(noise), **(extra_args or {}))
            return noise  # the guider post-processes this; the estimate is taken from `result`

        student_guider = self.student_guider
        inner = student_guider.inner_model  # the student's BaseModel: latent format of both (checked)
        current = getattr(inner, "current_patcher", None)
        try:
            self.guider.sample(self.noise, self.latent, self.comfy.samplers.KSAMPLER(one_call), self.sigmas,
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
            memory, minimum = helpers.estimate_memory(patcher, self.packed_noise.shape, conds)
            _, inference = helpers.get_additional_models(conds, patcher.model_dtype())
            self.student_memory = memory + inference, minimum + inference
        memory, minimum = self.student_memory
        self.comfy.management.load_models_gpu([patcher] + extra, memory_required=memory,
                                              minimum_memory_required=minimum)


def latent_shapes_of(guider):
    """The shapes of the latents a guider's run packs into one (`CFGGuider.sample` hands them to the
    model's `extra_conds`, which keeps them among the processed conds), or None for a plain latent."""
    for conds in (getattr(guider, "conds", None) or {}).values():
        for cond in conds:
            shapes = cond.get("model_conds", {}).get("latent_shapes")
            if shapes is not None:
                return shapes.cond
    return None


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


def check_guided_steps(guidance_steps, sigmas, node: str, runner: str) -> None:
    """guided_steps past the schedule fail with the node's input named (the core names its own argument)."""
    steps = len(sigmas) - 1
    if not isinstance(guidance_steps, SigmaWindow) and guidance_steps > steps:
        raise ValueError(f"guided_steps={guidance_steps} (an input of the {node} node) is beyond the {steps} "
                         f"steps this {runner} runs; use 0 to {steps}")


def sample_distpp(model, x, sigmas, extra_args=None, callback=None, disable=None, *, teacher_model, positive, negative,
                  teacher_cfg, base, w, guidance_steps, form, renoise, direction="student"):
    """The SAMPLER's function, called by ComfyUI's KSAMPLER.sample with the student wrapped as `model`."""
    comfy = comfy_modules()
    parametrization = check_models(comfy, sampled_patcher(model), teacher_model)
    check_guided_steps(guidance_steps, sigmas, NODE_NAME, "sampler")
    extra_args = {} if extra_args is None else extra_args
    seed = extra_args.get("seed")
    teacher = ComfyTeacher.for_sampler(teacher_model, positive, negative, teacher_cfg, model, sigmas, extra_args)
    takes_noise = "noise_sampler" in inspect.signature(BY_NAME[base].fn).parameters
    noise = {"noise_sampler": comfy_noise_sampler(comfy.k_sampling, x, seed)} if takes_noise else {}
    return BY_NAME[base].fn(model, x, sigmas, extra_args, callback, disable, teacher=teacher, w=w,
                            guidance_steps=guidance_steps, form=form, renoise=renoise, teacher_extra_args={},
                            direction=direction,
                            renoise_generator=None if form == "guidance" else renoise_generator(x, seed),  # no renoise
                            parametrization=parametrization, **noise)


class GuidedEvaluations:
    """Which model evaluations of a ComfyUI sampler's run the teacher refines: one per guided step.

    Guided step k is refined at the evaluation the sampler reports as step k: ComfyUI's samplers call
    their callback with i = k right after the evaluation their step-k update starts from (Euler, DPM++
    2M/3M SDE, res_multistep, er_sde, LCM, ...; the first, predictor, evaluation of Heun, DPM 2, SEEDS,
    sa_solver and sa_solver PECE), and UniPC right after its evaluation at t_k, which corrects its
    step-k state and is the next step's history. Which evaluation that is comes from a dry run of the
    same sampler on the same sigmas before the real one (`DryRunFirst`: a stand-in model returning
    zeros, no model call): the real run refines the same occurrence at sigma_k (to `teacher_guided`'s
    relative 1e-4). Other evaluations pass through unrefined: at other sigmas (midpoints, SEEDS'
    stages) and at sigma_k but belonging to another step (Heun's corrector of step k-1 lands on
    sigma_k, so does DPM 2 / DPM++ 2S ancestral's midpoint at eta 1) or repeating it (sa_solver PECE's
    re-evaluation). The refinement is `teacher_guided`'s: the refined estimate replaces the student's.
    """

    def __init__(self, guided, plain):
        self.guided, self.plain = guided, plain  # a TeacherGuidedDenoiser and the student it wraps
        self.chosen: dict[int, int] = {}  # guided step k -> which evaluation at sigma_k is refined (0 = the first)
        self.seen: dict[int, int] = {}  # guided step k -> the real run's evaluations at sigma_k so far
        self.refined: list[tuple[int, float]] = []  # (step, sigma) of each refined evaluation, in order

    @property
    def active(self) -> bool:
        return any(v != 0.0 for v in self.guided.guidance.weights)

    def choose(self, log: list[tuple[str, int | None]]) -> None:
        """Picks, per guided step k, the occurrence at sigma_k that the dry run's sampler reported as step k
        (the evaluation just before its callback with i = k), else the first at sigma_k."""
        for k, v in enumerate(self.guided.guidance.weights):
            if v == 0.0:
                continue
            at_k = [j for j, event in enumerate(log) if event == ("eval", k)]
            report = next((j for j, event in enumerate(log) if event == ("step", k)), None)
            if report is not None and report > 0 and log[report - 1] == ("eval", k):
                self.chosen[k] = at_k.index(report - 1)
            elif at_k:
                self.chosen[k] = 0

    def __call__(self, x, sigma, **extra_args):
        k = self.guided.step_of(sigma)
        if k is None:
            return self.plain(x, sigma, **extra_args)
        n = self.seen[k] = self.seen.get(k, -1) + 1
        if self.chosen.get(k) != n:
            return self.plain(x, sigma, **extra_args)
        self.refined.append((k, self.guided._schedule[k]))  # the schedule's sigma: no second device read
        return self.guided(x, sigma, **extra_args)

    def check_every_guided_step_was_refined(self, sampler_name: str) -> None:
        """Warns (GuidanceWarning) when a guided step was never refined, e.g. by a sampler choosing its own
        sigmas (dpm_fast, dpm_adaptive), which evaluates only the schedule's first sigma among them."""
        weights = self.guided.guidance.weights
        missed = [i for i, v in enumerate(weights) if v != 0.0 and all(j != i for j, _ in self.refined)]
        if missed:
            schedule = self.guided.guidance.run.sigmas
            warnings.warn(f"the {GUIDER_NAME}: sampler {sampler_name} never evaluated the student at guided step "
                          f"{missed[0]}'s sigma {schedule[missed[0]]:.4g} as that step, so that step was not "
                          "refined; pick a sampler that steps through the schedule's sigmas", GuidanceWarning,
                          stacklevel=2)


class StandIn:
    """The guider as the dry run's sampler sees it: zeros for an estimate, each evaluation's guided step
    (or None) and each reported step logged; anything else is the guider's."""

    def __init__(self, guider, evaluations: GuidedEvaluations, model_hooks=()):
        self.guider, self.evaluations, self.log = guider, evaluations, []
        self.model_hooks = {id(fn) for fn in model_hooks}

    def __call__(self, x, sigma, model_options=None, seed=None):
        self.log.append(("eval", self.evaluations.guided.step_of(sigma)))
        zeros = torch.zeros_like(x)
        # The CFG++ samplers read the unconditional estimate through ComfyUI's post-CFG hook: give them one.
        # The model's own hooks (PAG, SAG, SkipLayerGuidance...) evaluate the model, which the dry run has not.
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            if id(fn) in self.model_hooks:
                continue
            zeros = fn({"denoised": zeros, "cond": None, "uncond": None, "cond_scale": 1.0, "model": None,
                        "uncond_denoised": zeros, "cond_denoised": zeros, "sigma": sigma,
                        "model_options": model_options, "input": x})
        return zeros

    def report(self, i, denoised, x, total_steps):
        self.log.append(("step", int(i)))

    def __getattr__(self, name):
        return getattr(self.guider, name)


class DryRunFirst:
    """A ComfyUI SAMPLER that, asked to sample, first runs the wrapped sampler dry (on a `StandIn`, with
    copies of the arguments it may change: sigmas, extra_args and its model_options) so that
    `GuidedEvaluations` learns which evaluation each step reports, then runs it for real, unchanged.
    The samplers draw their noise from generators seeded by the run's seed, so the dry run leaves the
    real run's noise as it was."""

    def __init__(self, sampler, evaluations: GuidedEvaluations, clone_model_options):
        self.sampler, self.evaluations, self.clone_model_options = sampler, evaluations, clone_model_options

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        dry_args = {**extra_args, "model_options": self.clone_model_options(extra_args.get("model_options", {}))}
        # the hooks there before the sampler adds its own are the model's (a student patched by PAG, SAG...)
        stand_in = StandIn(model_wrap, self.evaluations,
                           dry_args["model_options"].get("sampler_post_cfg_function", []))
        self.sampler.sample(stand_in, sigmas.clone(), dry_args, stand_in.report, noise, latent_image, denoise_mask,
                            True)
        self.evaluations.choose(stand_in.log)
        return self.sampler.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask,
                                   disable_pbar)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def guided_evaluations(comfy, guider, teacher_model, positive, negative, teacher_cfg, noise, latent, sigmas,
                       denoise_mask, seed, *, w, guidance_steps, form, renoise, latent_shapes=None) -> GuidedEvaluations:
    """The Distillation++ guider's run: the models checked and the guidance planned before any model call,
    the teacher run through ComfyUI as in the SAMPLER node, the renoise noise from its seeded generator."""
    parametrization = check_models(comfy, guider.model_patcher, teacher_model, sampled=GUIDER_SAMPLED,
                                   teacher_input=GUIDER_TEACHER, node="Distillation++ Guider")
    check_guided_steps(guidance_steps, sigmas, GUIDER_NAME, "guider")
    teacher = ComfyTeacher(teacher_model, positive, negative, teacher_cfg, guider, noise, latent, sigmas, seed,
                           denoise_mask, latent_shapes)

    def plain(x, sigma, model_options=None, seed=None):
        return comfy.samplers.CFGGuider.predict_noise(guider, x, sigma, model_options or {}, seed)

    guided = teacher_guided(plain, teacher, sigmas, w=w, guidance_steps=guidance_steps, form=form, renoise=renoise,
                            teacher_extra_args={}, parametrization=parametrization,
                            renoise_generator=None if form == "guidance" else renoise_generator(noise, seed))
    return GuidedEvaluations(guided, plain)


NODE_NAME = "Distillation++ Sampler (kdistpp)"
GUIDER_NAME = "Distillation++ Guider (kdistpp)"
SAMPLED = "the student (SamplerCustom's `model` input, the model it samples)"
TEACHER = "the teacher (the `teacher` input of the Distillation++ Sampler node)"
GUIDER_SAMPLED = "the student (the `model` input of the Distillation++ Guider node)"
GUIDER_TEACHER = "the teacher (the `teacher` input of the Distillation++ Guider node)"


def sampled_patcher(model):
    """The ModelPatcher SamplerCustom samples: ComfyUI's KSAMPLER hands the sampler function a
    KSamplerX0Inpaint whose inner model is the guider (CFGGuider and its subclasses) of that patcher."""
    return model.inner_model.model_patcher


def same_latent_space(student, teacher, sampled=SAMPLED, teacher_input=TEACHER, node="Distillation++ Sampler") -> None:
    s = type(getattr(getattr(student, "model", None), "latent_format", None))
    t = type(getattr(getattr(teacher, "model", None), "latent_format", None))
    if s is not t:
        raise ValueError(f"the student and the teacher work in different latent spaces: {sampled} is {s.__name__}, "
                         f"{teacher_input} is {t.__name__}; connect a teacher of the student's family to the {node}'s "
                         "`teacher` input (e.g. SDXL base for SDXL-Lightning)")


def parametrization_of(model_sampling_module, patcher) -> str:
    """'flow' for a rectified-flow model (ComfyUI's CONST model sampling: SD3/3.5, Flux, ...), else 've'
    (ComfyUI's eps/v/EDM models, which its samplers, like kdistpp's default, run in VE sigma)."""
    sampling = patcher.get_model_object("model_sampling")
    return "flow" if isinstance(sampling, model_sampling_module.CONST) else "ve"


PARAMETRIZATION_NAMES = {"flow": "a rectified-flow model (CONST model sampling: SD3, Flux, ...)",
                         "ve": "a VE/epsilon/v model (SD 1.x, SDXL, ...)"}


def same_parametrization(model_sampling_module, student, teacher, sampled=SAMPLED, teacher_input=TEACHER,
                         node="Distillation++ Sampler") -> str:
    """The parametrization both models share, or a ValueError naming the inputs: the refinement
    renoises the student's estimate at the teacher's sigma, which means one thing in both only when
    both build their state from x0 and noise the same way."""
    s, t = parametrization_of(model_sampling_module, student), parametrization_of(model_sampling_module, teacher)
    if s != t:
        raise ValueError(f"the student and the teacher are parametrized differently: {sampled} is "
                         f"{PARAMETRIZATION_NAMES[s]} ({type(student.model).__name__}), {teacher_input} is "
                         f"{PARAMETRIZATION_NAMES[t]} ({type(teacher.model).__name__}); connect a teacher of the "
                         f"student's family to the {node}'s `teacher` input (e.g. Flux dev for a "
                         "Flux schnell-style student, SDXL base for SDXL-Lightning)")
    return s


def check_models(comfy, student, teacher, **names) -> str:
    """The checks on the model actually sampled and the teacher, before any model call; returns the
    parametrization ('ve' or 'flow') to sample them with. `names`: how the error names the inputs
    (sampled, teacher_input, node), the SAMPLER node's by default."""
    parametrization = same_parametrization(comfy.model_sampling, student, teacher, **names)
    same_latent_space(student, teacher, **names)
    return parametrization


def guided_steps_option(guided_steps: int, sigma_min: float = 0.0, sigma_max: float = 0.0):
    """The node's choice of guided steps: a sigma window when its upper end is set, else the first N."""
    return SigmaWindow(sigma_min, sigma_max) if sigma_max > 0 else guided_steps


async def comfy_entrypoint():
    """ComfyUI's V3 entry point: the extension holding both nodes (kdistpp.integrations.comfyui_nodes,
    which needs ComfyUI's comfy_api), or a clear error outside ComfyUI."""
    comfy_modules()
    from .comfyui_nodes import KdistppExtension

    return KdistppExtension()
