"""Teachers of LoRA students in the real Forge webui (dfdcbab).

A speed LoRA in the prompt (`<lora:speed:1>`, a kohya-format file in Forge's models/Lora) makes the
student: Forge's Lora extension clones the checkpoint's UNet patcher and adds the LoRA's patches,
which its memory manager merges into the weights when it loads the patcher. The teacher is the same
checkpoint without them. Each UNet call is compared with the UNet evaluated directly on the call's
inputs with known weights (the checkpoint's, or plus the LoRA's deltas computed from the file).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

import forge_host
import webui_lora
from webui_api import SCRIPT

STUDENT, TEACHER = "lora_student", "lora_teacher"
PROMPT = "a red cube <lora:speed:1>"


def post(forge, teacher, prompt=PROMPT, w=0.5, guided_steps=2, **request):
    body = {"prompt": prompt, "negative_prompt": "blur", "steps": 4, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler Distillation++", "cfg_scale": 2.0,
            "override_settings": {"sd_model_checkpoint": STUDENT},
            "alwayson_scripts": {SCRIPT: {"args": [teacher, w, guided_steps, 3.0, "interpolate", "student", 0.0,
                                                   0.0]}}, **request}
    return forge.client.post("/sdapi/v1/txt2img", json=body)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start(tmp_path_factory.mktemp("forge_lora"), {STUDENT: 11, TEACHER: 22})
    from fastapi.testclient import TestClient
    from modules import extra_networks, script_callbacks, sd_models

    from backend.nn.unet import IntegratedUNet2DConditionModel

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as Forge's api_only() does: the Lora extension registers here
    models = forge_host._started["models"]
    deltas = webui_lora.make_lora(models / f"{STUDENT}.safetensors",
                                  Path(shared.cmd_opts.lora_dir) / "speed.safetensors")

    def unet(name, deltas=None):
        module = IntegratedUNet2DConditionModel(**forge_host.UNET).eval()
        module.load_state_dict(webui_lora.unet_state(models / f"{name}.safetensors", deltas))
        return module

    refs = {"student+lora": unet(STUDENT, deltas), "student": unet(STUDENT)}
    return type("Forge", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models, "refs": refs})


def evaluate(unet, args, kwargs):
    return unet(args[0].float(), args[1].float(), context=kwargs["context"].float())


class Loads:
    """Checkpoint loads from disk and moves of the UNet's weights off the device (Forge's memory manager
    unpatching a patcher to its offload device), recorded while the real functions run. Reloading a
    patcher onto the device where its weights already are (`forge_patch_model(load_device)`) moves nothing."""

    def __init__(self, monkeypatch, unet_model):
        import backend.loader
        from backend.patcher.base import ModelPatcher

        self.events = []
        self.hook = unet_model.diffusion_model.register_forward_pre_hook(lambda *_: self.events.append("unet"))
        real_loader = backend.loader.forge_loader
        monkeypatch.setattr(backend.loader, "forge_loader",
                            lambda *a, **k: self.events.append("load from disk") or real_loader(*a, **k))
        real = ModelPatcher.forge_unpatch_model

        def record(patcher, target_device=None):
            if patcher.model is unet_model and target_device is not None:
                self.events.append(f"moved to {target_device}")
            return real(patcher, target_device)

        monkeypatch.setattr(ModelPatcher, "forge_unpatch_model", record)

    def while_sampling(self):
        calls = [i for i, e in enumerate(self.events) if e == "unet"]
        return self.events[calls[0]:calls[-1] + 1]


@pytest.mark.parametrize("choice", ["same", "own title"])
def test_the_student_checkpoint_as_teacher_runs_without_the_prompts_lora(forge, monkeypatch, choice):
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    assert post(forge, "None", w=0.0).status_code == 200  # loads the student and its LoRA
    engine = forge.sd_models.model_data.sd_model
    unet_model = engine.forge_objects_original.unet.model
    calls = webui_lora.Calls(unet_model.diffusion_model)
    loads = Loads(monkeypatch, unet_model)
    try:
        response = post(forge, SAME_CHECKPOINT if choice == "same" else STUDENT)
    finally:
        calls.remove()
        loads.hook.remove()
    assert response.status_code == 200, response.text[:2000]
    # Euler, 4 steps, 2 guided: each guided step is the student's call then the teacher's
    assert webui_lora.which_weights(calls.calls, forge.refs, evaluate) == [
        "student+lora", "student", "student+lora", "student", "student+lora", "student+lora"]
    assert "load from disk" not in loads.events  # the teacher is the loaded checkpoint
    assert [e for e in loads.while_sampling() if e != "unet"] == []  # no device move of the UNet's weights
    assert forge.sd_models.model_data.sd_model is engine


def test_the_teacher_keeps_its_own_cfg_where_the_student_skips_the_uncond(forge, monkeypatch):
    """Forge's 'skip early CFG' sets the student's scale to 1 (the uncond is then not evaluated): the
    teacher's guided evaluations keep its own scale, with cond and uncond."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    assert post(forge, "None", w=0.0).status_code == 200
    unet_model = forge.sd_models.model_data.sd_model.forge_objects_original.unet.model
    monkeypatch.setitem(forge.shared.opts.data, "skip_early_cond", 1.0)
    calls = webui_lora.Calls(unet_model.diffusion_model)
    try:
        assert post(forge, SAME_CHECKPOINT).status_code == 200
    finally:
        calls.remove()
    assert [args[0].shape[0] for args, _, _ in calls.calls] == [1, 2, 1, 2, 1, 1]


def test_release_teacher_frees_the_held_teacher(forge):
    from kdistpp.integrations import webui_teachers
    from backend import memory_management

    assert post(forge, TEACHER).status_code == 200
    engine = webui_teachers._forge_teacher["engine"]
    held = weakref.ref(engine)
    unet = weakref.ref(engine.forge_objects.unet)
    assert any(m.model is engine.forge_objects.unet for m in memory_management.current_loaded_models)
    del engine
    assert webui_teachers.release_teacher(forge)
    gc.collect()
    assert held() is None and unet() is None  # nothing holds it: its memory is back
    assert not webui_teachers.release_teacher(forge)
    assert post(forge, "None", w=0.0).status_code == 200
    assert forge.sd_models.model_data.sd_model.sd_checkpoint_info.model_name == STUDENT


def cfg_scales(events):
    """The CFG scale of each CFG evaluation, read from its numbers: the combined noise estimate
    (x - denoised) / sigma fitted on the UNet's cond and uncond outputs of that evaluation."""
    scales, current = [], None
    for event in events:
        if event[0] == "start":
            current = {"x": event[1], "sigma": event[2], "out": []}
        elif event[0] == "unet" and current is not None:
            current["out"].append(event[1])
        elif event[0] == "end":
            out = torch.cat(current["out"]).double()
            eps = ((current["x"] - event[1]) / current["sigma"].view(-1, 1, 1, 1)).double().flatten()
            if out.shape[0] == 1:
                scales.append((current["x"].shape[-1], 1.0, (eps - out.flatten()).abs().max().item()))
            else:
                basis = out.flatten(1).T  # the cond and uncond estimates, in Forge's batch order
                coef = torch.linalg.lstsq(basis, eps[:, None]).solution.flatten()
                residual = (basis @ coef - eps).abs().max().item()
                scales.append((current["x"].shape[-1], round(coef.max().item(), 4), residual))
            current = None
    return scales


def cfg_events(forge, teacher, **request):
    """Posts a generation and records, per CFG evaluation (student's or teacher's), its x, sigma, UNet
    outputs and combined result, for cfg_scales."""
    from modules import script_callbacks

    assert post(forge, "None", w=0.0).status_code == 200
    unet_model = forge.sd_models.model_data.sd_model.forge_objects_original.unet.model
    events = []

    def before(params):
        events.append(("start", params.x.detach().clone(), params.sigma.detach().clone()))

    def after(params):
        events.append(("end", params.x.detach().clone()))

    hook = unet_model.diffusion_model.register_forward_hook(
        lambda module, args, output: events.append(("unet", output.detach().clone())))
    script_callbacks.on_cfg_denoiser(before)
    script_callbacks.on_cfg_after_cfg(after)
    try:
        response = post(forge, teacher, **request)
    finally:
        hook.remove()
        script_callbacks.remove_callbacks_for_function(before)
        script_callbacks.remove_callbacks_for_function(after)
    assert response.status_code == 200, response.text[:2000]
    return events


def test_a_student_at_cfg_1_gets_a_teacher_at_its_own_cfg(forge):
    """Distilled students run at CFG 1, where Forge computes no negative conditioning: the teacher's
    guided evaluation still combines cond and uncond at the teacher's own scale (3 here)."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    scales = cfg_scales(cfg_events(forge, SAME_CHECKPOINT, prompt="a red cube", guided_steps=1, cfg_scale=1.0))
    assert all(residual < 1e-3 for _, _, residual in scales), scales
    assert [s for _, s, _ in scales] == [1.0, 3.0, 1.0, 1.0, 1.0]  # student, teacher at step 0, then the student


@pytest.mark.parametrize("hr_cfg", [1.5, 1.0])
def test_on_the_hires_pass_the_teacher_keeps_its_own_cfg(forge, hr_cfg):
    """Forge's hires pass replaces the CFG scale by *Hires CFG Scale*: for the student only. The teacher
    keeps its own (3 here); at Hires CFG 1 Forge computes no negative conditioning, and the teacher runs
    the prompt alone (scale 1) rather than guiding against nothing."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    events = cfg_events(forge, SAME_CHECKPOINT, prompt="a red cube", guided_steps=1, enable_hr=True, hr_scale=2,
                        hr_upscaler="Latent", hr_second_pass_steps=4, denoising_strength=0.6, hr_cfg=hr_cfg,
                        hr_additional_modules=["Use same choices"])  # what the UI sends
    scales = cfg_scales(events)
    assert all(residual < 1e-3 for _, _, residual in scales), scales  # each evaluation is such a combination
    first = [s for width, s, _ in scales if width == 8]
    hires = [s for width, s, _ in scales if width == 16]
    assert first[:2] == [2.0, 3.0]  # the first pass: student at the CFG scale 2, teacher at its own 3
    assert hires[:2] == [hr_cfg, 3.0 if hr_cfg != 1 else 1.0]
    assert set(hires[2:]) == {hr_cfg}
