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
