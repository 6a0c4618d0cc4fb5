"""The webui's teacher: which model evaluates the guided steps, where it lives, and how it is called.

A1111 holds a teacher checkpoint in its checkpoint cache; Forge, which keeps one checkpoint, gets it from
its own loader. The teacher is evaluated by a copy of the webui's CFG denoiser whose inner model wraps the
teacher, so it sees the same cond/uncond (the webui's prompt parsing) at its own CFG scale.

The teacher never carries the prompt's LoRAs (`<lora:...>`): the usual student is a speed LoRA on a
checkpoint, whose teacher is that checkpoint alone (SAME_CHECKPOINT, or the student's own title).

Imports without the webui; the functions need it.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import sys

# The teacher choice meaning "the student's own checkpoint, evaluated without the prompt's LoRAs" (the usual
# teacher of a speed LoRA: SDXL-Lightning, LCM, DMD2, Hyper-SD, TCD).
SAME_CHECKPOINT = "Same checkpoint, without the prompt's LoRAs"
FORGE_DISTILLED_CFG = 3.5  # Forge's default "Distilled CFG Scale" (Flux-dev's guidance value)

_MISSING = object()


def checkpoint_info(webui, title: str):
    info = webui.sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise ValueError(f"teacher checkpoint {title!r} not found; pick one from the webui's checkpoint list "
                         f"or {SAME_CHECKPOINT!r}")
    return info


def student_model(student_cfg):
    """The model object the webui's CFG denoiser samples (A1111: the LatentDiffusion/SDXL model; Forge: its engine)."""
    return student_cfg.inner_model.inner_model


def is_same_checkpoint(webui, title: str, student) -> bool:
    """SAME_CHECKPOINT, or a title naming the file the student was loaded from."""
    if title == SAME_CHECKPOINT:
        return True
    student_info = getattr(student, "sd_checkpoint_info", None)
    return student_info is not None and checkpoint_info(webui, title).filename == student_info.filename


@contextlib.contextmanager
def _setting(obj, attr, value, *, item=False):
    """Sets obj.attr (or obj[attr]) to value for the block, then restores it (removing it if it was absent)."""
    if item:
        old = obj.get(attr, _MISSING)
        obj[attr] = value
    else:
        old = getattr(obj, attr, _MISSING)
        setattr(obj, attr, value)
    try:
        yield
    finally:
        if old is not _MISSING:
            obj.__setitem__(attr, old) if item else setattr(obj, attr, old)
        elif item:
            obj.pop(attr, None)
        else:
            delattr(obj, attr)


def a1111_prompt_networks() -> list | None:
    """A1111's list of the prompt's active networks (its built-in Lora extension's `networks.loaded_networks`),
    None when that extension is not loaded. Its layers apply this list to every model they belong to."""
    networks = sys.modules.get("networks")
    loaded = getattr(networks, "loaded_networks", None)
    return loaded if isinstance(loaded, list) else None


@contextlib.contextmanager
def without_prompt_networks():
    """A1111: the prompt's LoRAs are inactive inside the block and active again after.

    The Lora extension patches each layer's weights when the active list changes (`network_apply_weights`):
    the first teacher forward restores every patched layer from its backup copy (one tensor copy per
    layer), and the student's next forward adds the LoRA deltas back (one up @ down product per layer).
    Nothing is read from disk and no model changes device."""
    loaded = a1111_prompt_networks()
    saved = list(loaded) if loaded else []
    if saved:
        loaded.clear()
    try:
        yield
    finally:
        if saved:
            loaded[:] = saved


def load_teacher(webui, title: str):
    """The teacher's model object (A1111), loaded once and kept next to the student.

    Uses the webui's checkpoint cache: the teacher is loaded, then the student is reloaded from the
    cache, so both stay in memory and the student stays `shared.sd_model`. With the default of one
    checkpoint in memory (`sd_checkpoints_limit` = 1) the cache is let hold one more for this load
    only; the teacher then stays beside the student until `release_teacher` or until the webui loads
    another checkpoint (which evicts it under the user's limit). Nothing is written to the settings.
    """
    info = checkpoint_info(webui, title)
    if _a1111_teacher.get("filename") not in (None, info.filename):
        release_teacher(webui)  # another teacher was picked: at most one kept beyond the user's limit
    loaded = webui.sd_models.model_data.loaded_sd_models
    for model in loaded:
        if model.sd_checkpoint_info.filename == info.filename:  # the cache holds new info objects after a rescan
            return model
    opts = webui.shared.opts
    room = max(int(getattr(opts, "sd_checkpoints_limit", 1) or 1), len(loaded) + 1)
    student_info = webui.shared.sd_model.sd_checkpoint_info
    with webui.sd_models.SkipWritingToConfig(), _setting(opts.data, "sd_checkpoints_limit", room, item=True):
        webui.sd_models.reload_model_weights(info=info)
        teacher = webui.shared.sd_model
        webui.sd_models.reload_model_weights(info=student_info)
    _a1111_teacher.update(filename=info.filename)
    return teacher


_a1111_teacher: dict = {}


def load_forge_teacher(webui, title: str):
    """Forge: the teacher as a second ForgeDiffusionEngine from Forge's own loader, kept here between runs.

    Forge holds one checkpoint (no cache to put the teacher in); its memory manager moves each
    engine's UNet to the device when sampling asks for it, so two engines can share a GPU.
    `release_teacher` drops it.
    """
    info = checkpoint_info(webui, title)
    if _forge_teacher.get("filename") != info.filename:
        import torch
        from backend.loader import forge_loader

        release_teacher(webui)  # at most one teacher held
        with torch.inference_mode():  # as Forge loads its own checkpoints
            engine = forge_loader(info.filename)
        engine.sd_checkpoint_info = info
        _forge_teacher.update(filename=info.filename, engine=engine)
    return _forge_teacher["engine"]


_forge_teacher: dict = {}


def release_teacher(webui=None) -> bool:
    """Frees the teacher this module holds; returns whether one was held. Call it when the teacher is set
    back to None.

    Forge: drops the teacher engine and unloads its patchers from Forge's memory manager (RAM and
    device memory come back). A1111: evicts a teacher that was kept beside the student beyond the
    user's `sd_checkpoints_limit` (a teacher within the limit is the webui's cache and stays)."""
    engine = _forge_teacher.pop("engine", None)
    _forge_teacher.clear()
    released = engine is not None
    if engine is not None:
        from backend import memory_management

        objects = engine.forge_objects_original or engine.forge_objects
        patchers = [getattr(o, "patcher", o) for o in (objects.unet, objects.clip, objects.vae) if o is not None]
        models = memory_management.current_loaded_models
        for i in reversed(range(len(models))):
            if any(models[i].model is patcher for patcher in patchers):
                models.pop(i).model_unload()
        del engine, objects, patchers
        gc.collect()
        memory_management.soft_empty_cache()
    filename = _a1111_teacher.pop("filename", None)
    if filename is not None and webui is not None and not is_forge(webui):
        loaded = webui.sd_models.model_data.loaded_sd_models
        limit = int(getattr(webui.shared.opts, "sd_checkpoints_limit", 1) or 1)
        for model in list(loaded):
            if (len(loaded) > limit and model is not webui.shared.sd_model
                    and model.sd_checkpoint_info.filename == filename):
                loaded.remove(model)
                webui.sd_models.send_model_to_trash(model)
                released = True
        gc.collect()
    return released


def teacher_cfg_denoiser(student_cfg, model_wrap):
    """A copy of the webui's CFG denoiser (same sampler, prompts, callbacks) whose inner model is the teacher's."""
    teacher = copy.copy(student_cfg)
    for registry in ("_modules", "_parameters", "_buffers"):  # nn.Module: a shallow copy would share these dicts,
        if hasattr(student_cfg, registry):                     # and setting model_wrap would replace the student's
            setattr(teacher, registry, dict(getattr(student_cfg, registry)))
    teacher.model_wrap = model_wrap
    return teacher


class TeacherCall:
    """The teacher's CFG denoiser, called with the teacher on the webui's device.

    `enter(x)` puts the teacher where it must be before a guided evaluation and `leave(x)` restores
    the student's state after (A1111: its send_model_to_device/cpu; Forge: its memory manager).

    Per call: the prompt's LoRAs are off (A1111); the prompt-schedule step is that of the student
    evaluation being refined (the samplers call the teacher right after it, when the student's
    counter has already moved on); the teacher's CFG is its own scale with full cond/uncond, so the
    host's per-step CFG rules for the student (skip early CFG, NGMS `s_min_uncond`, Forge's hires
    CFG) do not replace it; the student's last latent (live preview) is kept.
    """

    def __init__(self, cfg_denoiser, student_cfg, enter, leave, webui=None, negative=None, conditioning=None,
                 skips_uncond=None):
        self.cfg, self.student_cfg, self.enter, self.leave, self.webui = cfg_denoiser, student_cfg, enter, leave, webui
        self.negative = negative  # () -> the negative conditioning where the host computed none, or None
        self.skips_uncond = skips_uncond  # cond_scale -> whether the host evaluates no uncond at it, or None
        self.conditioning = conditioning  # extra_args -> the teacher's (its distilled guidance), or None
        self.distilled_cfg = None  # the guidance value a guidance-distilled teacher gets (Forge, Flux-dev)
        self.default_cfg = default_teacher_cfg(None)  # its CFG scale when the panel's teacher CFG is Auto

    def __call__(self, x, sigma, **extra_args):
        if "s_min_uncond" in extra_args:
            extra_args = {**extra_args, "s_min_uncond": 0.0}  # NGMS: the student's rule
        if "uncond" in extra_args and extra_args["uncond"] is None:
            # Forge computes no negative conditioning for a student at CFG 1 (the usual setting of a
            # distilled model): the teacher gets it computed as Forge would, unless Forge drops the uncond
            # at the teacher's own scale too (CFG 1: a Flux teacher at Auto), where encoding the negative
            # prompt would run the text encoders for nothing; where it cannot be computed (the hires pass
            # at Hires CFG 1) there is nothing to guide against.
            wanted = self.skips_uncond is None or not self.skips_uncond(extra_args.get("cond_scale", 1.0))
            negative = self.negative() if self.negative is not None and wanted else None
            extra_args = {**extra_args, "uncond": negative} if negative is not None else {**extra_args,
                                                                                         "cond_scale": 1.0}
        if self.conditioning is not None:
            extra_args = self.conditioning(extra_args)
        self.cfg.step = max(int(self.student_cfg.step) - 1, 0)
        with without_prompt_networks(), self._own_cfg():
            try:
                self.enter(x)  # inside: a failed move (out of memory) still restores the student's state
                return self.cfg(x, sigma, **extra_args)
            finally:
                self.leave(x)

    @contextlib.contextmanager
    def _own_cfg(self):
        """Host state the CFG denoiser reads, set for the teacher's evaluation and restored after."""
        with contextlib.ExitStack() as stack:
            shared = getattr(self.webui, "shared", None)
            opts = getattr(shared, "opts", None)
            if opts is not None and getattr(opts, "skip_early_cond", 0):
                stack.enter_context(_setting(opts.data, "skip_early_cond", 0.0, item=True))
            p = getattr(self.student_cfg, "p", None)
            refuse_after_refiner_switch(self.webui, p)
            if getattr(p, "refiner_checkpoint_info", None) is not None:
                # the teacher is called at a lower sigma than the student: the refiner switch is the student's
                stack.enter_context(_setting(p, "refiner_checkpoint_info", None))
            if getattr(p, "is_hr_pass", False):  # Forge replaces the CFG scale by hr_cfg on the hires pass
                stack.enter_context(_setting(p, "is_hr_pass", False))
            sampler = getattr(self.student_cfg, "sampler", None)
            if sampler is not None and hasattr(sampler, "last_latent"):
                stack.enter_context(_setting(sampler, "last_latent", sampler.last_latent))
            state = getattr(shared, "state", None)
            if state is not None and hasattr(state, "current_latent"):
                stack.enter_context(_setting(state, "current_latent", state.current_latent))
            yield


def refuse_after_refiner_switch(webui, p) -> None:
    """A guided step after the webui's refiner switch is refused (ValueError) before the teacher runs.

    At the switch the webui makes the refiner the sampled model (and may reuse or evict the cached
    checkpoints the teacher lives in): the teacher guides the base checkpoint's steps, so guided steps
    must come before the switch. The switch has happened when the active checkpoint is the refiner
    and the generation started on another (`p.sd_model_name`, set by the webui at the start)."""
    refiner = getattr(p, "refiner_checkpoint_info", None)
    model_data = getattr(getattr(webui, "sd_models", None), "model_data", None)
    active = getattr(getattr(model_data, "sd_model", None), "sd_checkpoint_info", None)
    if refiner is None or active is None or active.filename != refiner.filename:
        return
    if refiner.name_for_extra == getattr(p, "sd_model_name", None):  # the refiner is the base checkpoint itself
        return
    raise ValueError(f"Distillation++: a guided step comes after the refiner switch (Refiner {refiner.short_title!r}, "
                     f"switch at {p.refiner_switch_at}): the teacher guides the base checkpoint's steps only; guide "
                     "fewer steps, or a sigma window above the switch, or switch to the refiner later")


def a1111_teacher(webui, student_cfg, title: str, denoiser_classes):
    """A1111 keeps cached checkpoints but the active one on the CPU ("Only keep one model on device", on by
    default), the teacher included: each guided evaluation moves it in through the webui's own
    `send_model_to_device` (lowvram/medvram hooks included) and, under that setting, back out after.
    The student's own checkpoint (SAME_CHECKPOINT) is the student's model, never moved."""
    student = student_model(student_cfg)
    if is_same_checkpoint(webui, title, student):
        return TeacherCall(teacher_cfg_denoiser(student_cfg, student_cfg.inner_model), student_cfg,
                           lambda x: None, lambda x: None, webui)
    model = load_teacher(webui, title)
    constructor = getattr(model, "create_denoiser", None)  # SDXL models build their own, as in the webui
    if constructor is not None:
        wrap = constructor()
    else:
        eps_class, v_class = denoiser_classes or k_diffusion_denoisers()
        wrap_class = v_class if getattr(model, "parameterization", "eps") == "v" else eps_class
        wrap = wrap_class(model, quantize=bool(getattr(webui.shared.opts, "enable_quantization", False)))

    def leave(x):
        if getattr(webui.shared.opts, "sd_checkpoints_keep_in_cpu", True):
            webui.sd_models.send_model_to_cpu(model)

    _check_or_release(webui, title, model, student, wrap)
    return TeacherCall(teacher_cfg_denoiser(student_cfg, wrap), student_cfg,
                       lambda x: webui.sd_models.send_model_to_device(model), leave, webui)


def forge_teacher(webui, student_cfg, title: str, distilled_cfg: float = FORGE_DISTILLED_CFG):
    """Forge evaluates models through UNet patchers its memory manager loads (`sampling_prepare`): the
    teacher's is prepared before each guided evaluation and the student's again after, so a teacher
    that pushed the student off the device does not leave it there.

    The student's own checkpoint (SAME_CHECKPOINT) is its engine seen through its original UNet
    patcher (`forge_objects_original`: no LoRA patches). It shares the student's weights: Forge's
    memory manager unloads the LoRA clone without moving it and restores the patched layers from
    their backups, and the student's preparation patches them again (no disk read, no device move).

    Flow models (Flux, Chroma, SD3/3.5) are wrapped as Forge wraps them (its ForgeScheduleLinker on the
    model's own flow predictor), so the teacher is called at a flow sigma s on a flow state. A guidance-distilled
    teacher (Flux-dev) gets `distilled_cfg` as its guidance value (teacher_guidance)."""
    import k_diffusion.external  # Forge's bundled k-diffusion
    from backend.sampling.sampling_function import sampling_prepare

    student = student_model(student_cfg)
    same = is_same_checkpoint(webui, title, student)
    if same:
        engine = copy.copy(student)  # the student's engine, seen with its LoRA-free objects
        engine.forge_objects = student.forge_objects_original.shallow_copy()
    else:
        engine = load_forge_teacher(webui, title)
    wrap = k_diffusion.external.ForgeScheduleLinker(engine.forge_objects.unet.model.predictor)
    wrap.inner_model = engine
    if not same:
        _check_or_release(webui, title, engine, student, wrap, student_wrap=student_cfg.inner_model)
    student_unet = student.forge_objects.unet
    call = TeacherCall(teacher_cfg_denoiser(student_cfg, wrap), student_cfg,
                       lambda x: sampling_prepare(engine.forge_objects.unet, x),
                       lambda x: sampling_prepare(student_unet, x), webui,
                       negative=forge_negative_conditioning(getattr(student_cfg, "p", None)),
                       conditioning=teacher_guidance(engine, student, distilled_cfg),
                       skips_uncond=lambda scale: forge_skips_uncond(engine.forge_objects.unet, scale))
    call.distilled_cfg = float(distilled_cfg) if is_guidance_distilled(engine) else None
    call.default_cfg = default_teacher_cfg(engine)
    return call


def forge_negative_conditioning(p):
    """Forge skips the negative prompt when the CFG scale is 1 (`p.uc` None), the setting distilled students
    run at; the teacher guides at its own scale, so it needs it. Returns a function computing it once per
    generation the way Forge's `setup_conds` does at any other scale (same cache, prompt schedule, LoRA
    text-encoder weights); it gives None on the hires pass, whose conditioning Forge builds differently."""
    held = {}

    def negative():
        if p is None or getattr(p, "is_hr_pass", False) or not hasattr(p, "get_conds_with_caching"):
            return None
        if "uc" not in held:
            from modules import prompt_parser

            prompts = prompt_parser.SdConditioning(p.negative_prompts, width=p.width, height=p.height,
                                                   is_negative_prompt=True,
                                                   distilled_cfg_scale=getattr(p, "distilled_cfg_scale", None))
            held["uc"] = p.get_conds_with_caching(prompt_parser.get_learned_conditioning, prompts,
                                                  p.firstpass_steps, [p.cached_uc], p.extra_network_data)
        return held["uc"]

    return negative


def forge_skips_uncond(unet_patcher, cond_scale) -> bool:
    """Whether Forge evaluates no unconditional pass for this UNet patcher at `cond_scale`: its
    `sampling_function_inner` drops the uncond at CFG 1 unless the model options set
    `disable_cfg1_optimization`. Conditioning modifiers in the model options may change the scale before
    that test, so with any the uncond is taken as needed."""
    options = unet_patcher.model_options
    return (math.isclose(float(cond_scale), 1.0) and not options.get("disable_cfg1_optimization", False)
            and not options.get("conditioning_modifiers"))


def _unet(model):
    forge_objects = getattr(model, "forge_objects", None)
    if forge_objects is not None:
        return forge_objects.unet.model.diffusion_model
    return model.model.diffusion_model


def architecture(model) -> str:
    """The family of a webui model and the width of the text conditioning its UNet attends to."""
    family = next((name for flag, name in (("is_sd3", "SD3"), ("is_sdxl", "SDXL"), ("is_sd2", "SD2"),
                                            ("is_sd1", "SD1")) if getattr(model, flag, False) is True),
                  type(model).__name__)
    try:
        widths = [m.in_features for name, m in _unet(model).named_modules() if name.endswith("attn2.to_k")]
    except AttributeError:
        widths = []
    return f"{family} (text context {widths[0]})" if widths else family


def check_architecture(title: str, teacher, student) -> None:
    """A teacher is called on the student's latents and text conditioning: another family (SD1.5 and
    SDXL) or context width fails inside its UNet, so it is refused before any model call."""
    teacher_arch, student_arch = architecture(teacher), architecture(student)
    if teacher_arch != student_arch:
        raise ValueError(f"teacher {title!r} is an {teacher_arch} model but the student is an {student_arch} model: "
                         "the teacher is evaluated on the student's latents and prompt conditioning, so it must be "
                         "of the student's architecture; pick a teacher checkpoint of the student's family")


def _check_or_release(webui, title, teacher, student, wrap, student_wrap=None) -> None:
    """check_parametrizations (refuse_flow_model without the student's wrap) and check_architecture; a refused
    teacher is not kept in memory."""
    try:
        if student_wrap is None:
            refuse_flow_model("teacher", wrap)
        else:
            check_parametrizations(title, wrap, student_wrap)
        check_architecture(title, teacher, student)
    except ValueError:
        release_teacher(webui)
        raise


def is_flow_model(model_wrap) -> bool:
    """A rectified-flow model as the webui wraps it: Forge's 'const' prediction (Flux, SD3, Chroma),
    A1111 1.10.1's SD3Denoiser."""
    prediction = getattr(getattr(model_wrap, "predictor", None), "prediction_type", None)
    return prediction == "const" or type(model_wrap).__name__ == "SD3Denoiser"


def refuse_flow_model(which: str, model_wrap) -> None:
    """A1111 1.10.1's flow model (SD3 medium, through its SD3Denoiser) is refused before any model call:
    A1111's own samplers run it with VE steps, so there is no host sampler of the same name to equal."""
    if is_flow_model(model_wrap):
        raise ValueError(f"the {which} is a flow-matching model (SD3 in A1111): the Distillation++ samplers run flow "
                         "models (Flux, Chroma, SD3/3.5) in Forge, not in A1111, whose own samplers take VE steps on "
                         "them; pick the webui's own sampler for it, or use Forge or ComfyUI")


def webui_parametrization(which: str, model_wrap) -> str:
    """How the webui's wrapped model builds its state: 'flow' for Forge's rectified-flow models (its 'const'
    prediction: Flux, Chroma, SD3/3.5, whose sigmas are the flow s in [0, 1]), 've' for the others. A1111's
    SD3 is refused (refuse_flow_model)."""
    if type(model_wrap).__name__ == "SD3Denoiser":
        refuse_flow_model(which, model_wrap)
    return "flow" if is_flow_model(model_wrap) else "ve"


def check_parametrizations(title: str, teacher_wrap, student_wrap) -> None:
    """A flow teacher with a VE student, or the reverse, is refused before any model call: the teacher is
    called on the student's state, whose meaning ((1 - s) x0 + s n or x0 + sigma n) it must share."""
    kinds = {"flow": "a rectified-flow model (Flux, Chroma, SD3/3.5)", "ve": "a VE/eps/v model (SD1, SD2, SDXL)"}
    teacher = webui_parametrization("teacher", teacher_wrap)
    student = webui_parametrization("model", student_wrap)
    if teacher != student:
        raise ValueError(f"teacher {title!r} is {kinds[teacher]} but the student is {kinds[student]}: the teacher is "
                         "evaluated on the student's latents and noise levels, so both must be flow models or both VE "
                         "models; pick a teacher of the student's family")


def is_guidance_distilled(engine) -> bool:
    """Forge's guidance-distilled engines (Flux-dev): their model takes the distilled guidance value in the
    conditioning (cond['guidance'], Forge's "Distilled CFG Scale") and fails without it."""
    return getattr(engine, "use_distilled_cfg_scale", False) is True


def is_flux_engine(engine) -> bool:
    """Forge's Flux engines, FLUX.1-dev and schnell (its `Flux` class; Chroma is an engine of its own)."""
    flux = sys.modules.get("backend.diffusion_engine.flux")  # not imported: no engine can be one
    return flux is not None and isinstance(engine, flux.Flux)


def default_teacher_cfg(engine) -> float:
    """A teacher's CFG scale when the panel's is Auto: 1 for a Flux engine (dev and schnell, which Forge's Flux
    preset runs at CFG 1: dev's guidance is the distilled value in its conditioning, schnell is step-distilled
    without CFG; at CFG 1 Forge skips the negative prompt's evaluation), 5 for a real-CFG teacher (SD1, SDXL,
    SD3/3.5, Chroma; None: any A1111 model)."""
    return 1.0 if is_flux_engine(engine) else 5.0


def with_distilled_guidance(cond, value):
    """The webui's conditioning (the cond's MulticondLearnedConditioning or the uncond's schedules) with each
    prompt's 'guidance' set to `value`, or removed for None. Dict conditionings only (Flux's); others and
    None are returned as they are. Tensors are shared, not copied."""
    if cond is None:
        return None

    def entry(scheduled):
        if not isinstance(scheduled.cond, dict):
            return scheduled
        old = scheduled.cond.get("guidance")
        c = {k: v for k, v in scheduled.cond.items() if k != "guidance"}
        if value is not None:
            import torch

            like = old if isinstance(old, torch.Tensor) else torch.zeros((), dtype=torch.float32)
            c["guidance"] = torch.full(like.shape, float(value), dtype=like.dtype, device=like.device)
        return scheduled._replace(cond=c)

    if hasattr(cond, "batch"):  # prompt_parser.MulticondLearnedConditioning
        out = copy.copy(cond)
        out.batch = []
        for prompts in cond.batch:
            composables = []
            for composable in prompts:
                c = copy.copy(composable)
                c.schedules = [entry(s) for s in composable.schedules]
                composables.append(c)
            out.batch.append(composables)
        return out
    return [[entry(s) for s in schedule] for schedule in cond]


def teacher_guidance(teacher_engine, student_engine, distilled_cfg: float):
    """The teacher's conditioning rule for Forge's guidance-distilled models, or None where neither model is one:
    a guidance-distilled teacher gets `distilled_cfg` as its guidance (also beside a schnell student, whose
    conditioning has none); a teacher without a guidance embedding gets none."""
    if not (is_guidance_distilled(teacher_engine) or is_guidance_distilled(student_engine)):
        return None
    value = float(distilled_cfg) if is_guidance_distilled(teacher_engine) else None

    def conditioning(extra_args):
        return {**extra_args, "cond": with_distilled_guidance(extra_args.get("cond"), value),
                "uncond": with_distilled_guidance(extra_args.get("uncond"), value)}

    return conditioning


def is_forge(webui) -> bool:
    return not hasattr(webui.sd_models.model_data, "loaded_sd_models")


def k_diffusion_denoisers():
    import k_diffusion.external  # the webui's bundled k-diffusion, not a runtime dependency of kdistpp

    return k_diffusion.external.CompVisDenoiser, k_diffusion.external.CompVisVDenoiser


def build_teacher(webui, student_cfg, title: str, denoiser_classes=None, distilled_cfg: float = FORGE_DISTILLED_CFG):
    """The teacher callable for one generation: `student_cfg` is the webui's CFG denoiser of the student.

    `title` is a checkpoint title, or SAME_CHECKPOINT (the student's checkpoint without the prompt's
    LoRAs, as is the student's own title). A teacher of another architecture is refused (ValueError).
    `distilled_cfg` is a guidance-distilled Forge teacher's guidance value (Flux-dev)."""
    if is_forge(webui):
        return forge_teacher(webui, student_cfg, title, distilled_cfg)
    return a1111_teacher(webui, student_cfg, title, denoiser_classes)
