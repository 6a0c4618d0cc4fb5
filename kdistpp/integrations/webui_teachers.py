"""The webui's teacher: which model evaluates the guided steps, where it lives, and how it is called.

A1111 holds a teacher checkpoint in its checkpoint cache; Forge, which keeps one checkpoint, gets it from
its own loader. The teacher is evaluated by a copy of the webui's CFG denoiser whose inner model wraps the
teacher, so it sees the same cond/uncond (the webui's prompt parsing) at its own CFG scale.

Imports without the webui; the functions need it.
"""

from __future__ import annotations

import copy

# The teacher choice meaning "the student's own checkpoint, evaluated without the prompt's LoRAs" (the usual
# teacher of a speed LoRA: SDXL-Lightning, LCM, DMD2, Hyper-SD, TCD).
SAME_CHECKPOINT = "Same checkpoint, without the prompt's LoRAs"

def checkpoint_info(webui, title: str):
    info = webui.sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise ValueError(f"teacher checkpoint {title!r} not found; pick one from the webui's checkpoint list")
    return info


def load_teacher(webui, title: str):
    """The teacher's model object, loaded once and kept next to the student.

    Uses the webui's checkpoint cache (`sd_checkpoints_limit` >= 2): the teacher is loaded, then the
    student is reloaded from the cache, so both stay in memory and the student stays `shared.sd_model`.
    Neither load is written into the user's settings.
    """
    info = checkpoint_info(webui, title)
    for model in webui.sd_models.model_data.loaded_sd_models:
        if model.sd_checkpoint_info.filename == info.filename:  # the cache holds new info objects after a rescan
            return model
    if getattr(webui.shared.opts, "sd_checkpoints_limit", 1) < 2:
        raise ValueError("Distillation++ needs the student and teacher in memory together: set Settings > "
                         "Stable Diffusion > 'Maximum number of checkpoints loaded at the same time' to 2")
    student_info = webui.shared.sd_model.sd_checkpoint_info
    with webui.sd_models.SkipWritingToConfig():
        webui.sd_models.reload_model_weights(info=info)
        teacher = webui.shared.sd_model
        webui.sd_models.reload_model_weights(info=student_info)
    return teacher


def load_forge_teacher(webui, title: str):
    """Forge: the teacher as a second ForgeDiffusionEngine from Forge's own loader, kept here between runs.

    Forge holds one checkpoint (no cache to put the teacher in); its memory manager moves each
    engine's UNet to the device when sampling asks for it, so two engines can share a GPU.
    """
    info = checkpoint_info(webui, title)
    if _forge_teacher.get("filename") != info.filename:
        import torch
        from backend.loader import forge_loader

        _forge_teacher.clear()  # at most one teacher held
        with torch.inference_mode():  # as Forge loads its own checkpoints
            engine = forge_loader(info.filename)
        engine.sd_checkpoint_info = info
        _forge_teacher.update(filename=info.filename, engine=engine)
    return _forge_teacher["engine"]


_forge_teacher: dict = {}


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
    the student's state after (A1111: its send_model_to_device/cpu; Forge: its memory manager). The
    copy's prompt-schedule step follows the student's, since it is called only on guided steps.
    """

    def __init__(self, cfg_denoiser, student_cfg, enter, leave):
        self.cfg, self.student_cfg, self.enter, self.leave = cfg_denoiser, student_cfg, enter, leave

    def __call__(self, x, sigma, **extra_args):
        self.enter(x)
        self.cfg.step = self.student_cfg.step
        try:
            return self.cfg(x, sigma, **extra_args)
        finally:
            self.leave(x)


def a1111_teacher(webui, student_cfg, title: str, denoiser_classes):
    """A1111 keeps cached checkpoints but the active one on the CPU ("Only keep one model on device", on by
    default), the teacher included: each guided evaluation moves it in through the webui's own
    `send_model_to_device` (lowvram/medvram hooks included) and, under that setting, back out after."""
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

    refuse_flow_model("teacher", wrap)
    return TeacherCall(teacher_cfg_denoiser(student_cfg, wrap), student_cfg,
                       lambda x: webui.sd_models.send_model_to_device(model), leave)


def forge_teacher(webui, student_cfg, title: str):
    """Forge evaluates models through UNet patchers its memory manager loads (`sampling_prepare`): the
    teacher's is prepared before each guided evaluation and the student's again after, so a teacher
    that pushed the student off the device does not leave it there."""
    import k_diffusion.external  # Forge's bundled k-diffusion
    from backend.sampling.sampling_function import sampling_prepare

    engine = load_forge_teacher(webui, title)
    wrap = k_diffusion.external.ForgeScheduleLinker(engine.forge_objects.unet.model.predictor)
    wrap.inner_model = engine
    refuse_flow_model("teacher", wrap)
    student_unet = student_cfg.inner_model.inner_model.forge_objects.unet
    return TeacherCall(teacher_cfg_denoiser(student_cfg, wrap), student_cfg,
                       lambda x: sampling_prepare(engine.forge_objects.unet, x),
                       lambda x: sampling_prepare(student_unet, x))


def is_flow_model(model_wrap) -> bool:
    """A rectified-flow model as the webui wraps it: Forge's 'const' prediction (Flux, SD3, Chroma),
    A1111 1.10.1's SD3Denoiser."""
    prediction = getattr(getattr(model_wrap, "predictor", None), "prediction_type", None)
    return prediction == "const" or type(model_wrap).__name__ == "SD3Denoiser"


def refuse_flow_model(which: str, model_wrap) -> None:
    """The webui's flow models are refused before any model call: the host's own samplers switch to
    rectified-flow steps for them per sampler (Forge: Euler a and DPM2 a only), which this extension
    does not follow yet, and a VE step would sample them wrong."""
    if is_flow_model(model_wrap):
        raise ValueError(f"the {which} is a flow-matching model (Flux, SD3, Chroma): the Distillation++ samplers do "
                         "not run flow models in A1111/Forge yet and would sample it wrong; pick the webui's own "
                         "sampler for it (kdistpp runs flow models in ComfyUI and from Python)")


def is_forge(webui) -> bool:
    return not hasattr(webui.sd_models.model_data, "loaded_sd_models")


def k_diffusion_denoisers():
    import k_diffusion.external  # the webui's bundled k-diffusion, not a runtime dependency of kdistpp

    return k_diffusion.external.CompVisDenoiser, k_diffusion.external.CompVisVDenoiser


def build_teacher(webui, student_cfg, title: str, denoiser_classes=None):
    """The teacher callable for one generation: `student_cfg` is the webui's CFG denoiser of the student."""
    if is_forge(webui):
        return forge_teacher(webui, student_cfg, title)
    return a1111_teacher(webui, student_cfg, title, denoiser_classes)
