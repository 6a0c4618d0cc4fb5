"""Teachers of LoRA students in the real A1111 webui 1.10.1, with its default checkpoint settings.

A speed LoRA in the prompt (`<lora:speed:1>`, a kohya-format file in the webui's models/Lora) makes
the student; its teacher is the same checkpoint without it. Each UNet call of a generation is
compared with the UNet evaluated directly on the call's inputs with known weights (the checkpoint's,
or the checkpoint's plus the LoRA's deltas computed from the file), so which weights every student
and teacher call used is read from the numbers, not from the extension.

The webui runs with A1111's defaults for checkpoints: one in memory (`sd_checkpoints_limit` 1) and
"Only keep one model on device" on.
"""

from __future__ import annotations

import pytest
import torch

import a1111_host
import webui_lora
from webui_api import SCRIPT

STUDENT, TEACHER, WIDE = "lora_student", "lora_teacher", "lora_wide"
TEACHER2 = "lora_teacher2"
PROMPT = "a red cube <lora:speed:1>"


def post(webui, teacher, prompt=PROMPT, w=0.5, guided_steps=2, steps=4, settings=None, window=(0.0, 0.0), **request):
    body = {"prompt": prompt, "negative_prompt": "blur", "steps": steps, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler Distillation++", "cfg_scale": 2.0,
            "override_settings": {"sd_model_checkpoint": STUDENT, **(settings or {})},
            "alwayson_scripts": {SCRIPT: {"args": [teacher, w, guided_steps, 3.0, "interpolate", "student",
                                                   *window]}}, **request}
    return webui.client.post("/sdapi/v1/txt2img", json=body)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("a1111_lora")
    shared, app = a1111_host.start(tmp, {STUDENT: 11, TEACHER: 22})
    from fastapi.testclient import TestClient
    from modules import extra_networks, script_callbacks, sd_models

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as the webui's api_only() does: the Lora extension registers here
    models = a1111_host._started["models"]
    a1111_host.make_checkpoints(models, tmp / "clip48", {WIDE: 33}, context=48)  # another architecture
    a1111_host.make_checkpoints(models, a1111_host._started["clip"], {TEACHER2: 44})
    sd_models.list_models()
    lora_dir = __import__("pathlib").Path(shared.cmd_opts.lora_dir)
    deltas = webui_lora.make_lora(models / f"{STUDENT}.safetensors", lora_dir / "speed.safetensors")
    saved = {k: shared.opts.data.get(k) for k in ("sd_checkpoints_limit", "sd_checkpoints_keep_in_cpu")}
    shared.opts.data.update(sd_checkpoints_limit=1, sd_checkpoints_keep_in_cpu=True)  # A1111's defaults
    client = TestClient(app)

    def unet(name, deltas=None):
        config = a1111_host.model_config(tmp / "clip")["model"]["params"]["unet_config"]
        from ldm.util import instantiate_from_config

        module = instantiate_from_config(config).eval()
        module.load_state_dict(webui_lora.unet_state(models / f"{name}.safetensors", deltas))
        return module

    refs = {"student+lora": unet(STUDENT, deltas), "student": unet(STUDENT),
            "teacher": unet(TEACHER), "teacher+lora": unet(TEACHER, deltas)}  # the LoRA's deltas depend on shapes only
    yield type("Webui", (), {"shared": shared, "client": client, "sd_models": sd_models, "refs": refs})
    for key, value in saved.items():
        if value is None:
            shared.opts.data.pop(key, None)
        else:
            shared.opts.data[key] = value


def evaluate(unet, args, kwargs):
    return unet(*args, **kwargs)


class Moves:
    """send_model_to_cpu/device calls, recorded (the real ones run), with the UNet calls in between."""

    def __init__(self, webui, monkeypatch, unets):
        self.events = []
        for name in ("send_model_to_device", "send_model_to_cpu"):
            real = getattr(webui.sd_models, name)

            def record(m, real=real, name=name):
                self.events.append((name, m.sd_checkpoint_info.model_name))
                return real(m)

            monkeypatch.setattr(webui.sd_models, name, record)
        self.hooks = [u.register_forward_pre_hook(lambda *_, n=n: self.events.append(("unet", n)))
                      for n, u in unets.items()]

    def while_sampling(self):
        unet_calls = [i for i, e in enumerate(self.events) if e[0] == "unet"]
        return self.events[unet_calls[0]:unet_calls[-1] + 1]

    def remove(self):
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("choice", ["same", "own title"])
def test_the_student_checkpoint_as_teacher_runs_without_the_prompts_lora(webui, monkeypatch, choice):
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    teacher = SAME_CHECKPOINT if choice == "same" else STUDENT
    assert post(webui, "None", w=0.0).status_code == 200  # loads the student and the LoRA
    student = webui.shared.sd_model
    calls = webui_lora.Calls(student.model.diffusion_model)
    moves = Moves(webui, monkeypatch, {STUDENT: student.model.diffusion_model})
    try:
        response = post(webui, teacher)
    finally:
        calls.remove()
        moves.remove()
    assert response.status_code == 200, response.text[:2000]
    refs = {k: webui.refs[k] for k in ("student", "student+lora")}
    # Euler, 4 steps, 2 guided: each guided step is the student's call then the teacher's
    assert webui_lora.which_weights(calls.calls, refs, evaluate) == [
        "student+lora", "student", "student+lora", "student", "student+lora", "student+lora"]
    assert [e for e in moves.while_sampling() if e[0] != "unet"] == []  # the student never moved
    assert webui.shared.sd_model is student


def test_a_separate_teacher_with_the_default_settings_runs_without_the_prompts_lora(webui, monkeypatch):
    first = post(webui, TEACHER)  # loads the teacher: one checkpoint in memory is A1111's default
    assert first.status_code == 200, first.text[:2000]
    assert webui.shared.opts.sd_checkpoints_limit == 1  # the user's setting is left as it was
    student, teacher = webui.shared.sd_model, a1111_host.model_named(webui, TEACHER)
    assert student.sd_checkpoint_info.model_name == STUDENT
    student_calls = webui_lora.Calls(student.model.diffusion_model)
    teacher_calls = webui_lora.Calls(teacher.model.diffusion_model)
    moves = Moves(webui, monkeypatch, {STUDENT: student.model.diffusion_model, TEACHER: teacher.model.diffusion_model})
    try:
        assert post(webui, TEACHER).status_code == 200
    finally:
        student_calls.remove()
        teacher_calls.remove()
        moves.remove()
    assert webui_lora.which_weights(student_calls.calls, webui.refs, evaluate) == ["student+lora"] * 4
    assert webui_lora.which_weights(teacher_calls.calls, webui.refs, evaluate) == ["teacher"] * 2
    # keep-in-cpu on: the teacher comes in for each guided call and goes back; the student stays
    assert [e for e in moves.while_sampling() if e[0] != "unet" or e[1] == TEACHER] == [
        ("send_model_to_device", TEACHER), ("unet", TEACHER), ("send_model_to_cpu", TEACHER)] * 2


def test_release_teacher_evicts_a_teacher_kept_beyond_the_limit(webui):
    from kdistpp.integrations import webui_teachers
    from kdistpp.integrations.webui import webui_modules

    assert post(webui, TEACHER).status_code == 200
    a1111_host.model_named(webui, TEACHER)
    assert webui_teachers.release_teacher(webui_modules())
    names = [m.sd_checkpoint_info.model_name for m in webui.sd_models.model_data.loaded_sd_models]
    assert names == [STUDENT] and webui.shared.sd_model.sd_checkpoint_info.model_name == STUDENT


def test_a_generation_with_the_webuis_own_sampler_and_no_teacher_evicts_the_kept_teacher(webui):
    """The webui's own samplers never reach the extension's sampler function: the panel's None is acted on
    in the script's process()."""
    assert post(webui, TEACHER).status_code == 200
    a1111_host.model_named(webui, TEACHER)
    assert post(webui, "None", w=0.0, sampler_name="Euler").status_code == 200
    names = [m.sd_checkpoint_info.model_name for m in webui.sd_models.model_data.loaded_sd_models]
    assert names == [STUDENT]


def loaded_names(webui):
    return sorted(m.sd_checkpoint_info.model_name for m in webui.sd_models.model_data.loaded_sd_models)


def test_picking_another_teacher_releases_the_one_kept_before(webui):
    """With one checkpoint allowed, a teacher is kept beside the student: switching teachers (by hand or
    along an X/Y/Z plot axis) must not keep each of them."""
    assert post(webui, TEACHER).status_code == 200
    assert post(webui, TEACHER2).status_code == 200
    assert loaded_names(webui) == sorted([STUDENT, TEACHER2])
    assert post(webui, "None", w=0.0).status_code == 200
    assert loaded_names(webui) == [STUDENT]


def test_a_refused_setting_leaves_no_teacher_from_the_generation_before(webui):
    """The webui only logs an exception raised in a script's process(): a refused panel setting (a sigma
    window from 3 to 1) must leave this generation unguided, not guided by the previous one's teacher."""
    assert post(webui, TEACHER).status_code == 200
    calls = webui_lora.Calls(a1111_host.model_named(webui, TEACHER).model.diffusion_model)
    try:
        response = post(webui, TEACHER, window=(3.0, 1.0))
    finally:
        calls.remove()
    assert response.status_code == 200
    assert calls.calls == [] and "DistillationPP" not in response.json()["info"]


def test_a_teacher_of_another_architecture_is_refused_before_any_model_call(webui):
    assert post(webui, "None", w=0.0).status_code == 200
    student = webui.shared.sd_model
    calls = webui_lora.Calls(student.model.diffusion_model)
    try:
        response = post(webui, WIDE)
    finally:
        calls.remove()
    assert response.status_code == 500
    assert "teacher 'lora_wide' is an SD1 (text context 48) model but the student is an SD1 (text context 32)" \
        in response.text
    assert calls.calls == []
    names = [m.sd_checkpoint_info.model_name for m in webui.sd_models.model_data.loaded_sd_models]
    assert names == [STUDENT] and webui.shared.sd_model is student  # the refused teacher is not kept


@pytest.mark.parametrize("rule", ["skip_early_cond", "s_min_uncond"])
def test_the_teacher_keeps_its_own_cfg_on_steps_where_the_student_skips_the_uncond(webui, rule, monkeypatch):
    """A1111's per-step CFG rules are the student's: on guided steps the teacher runs cond and uncond."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    assert post(webui, "None", w=0.0, prompt="a red cube").status_code == 200
    if rule == "skip_early_cond":
        monkeypatch.setitem(webui.shared.opts.data, "skip_early_cond", 1.0)  # every step: cond only
        request = {}
    else:
        monkeypatch.setitem(webui.shared.opts.data, "s_min_uncond_all", True)
        request = {"s_min_uncond": 100.0}  # NGMS below sigma 100 (all of these steps)
    calls = webui_lora.Calls(webui.shared.sd_model.model.diffusion_model)
    try:
        assert post(webui, SAME_CHECKPOINT, prompt="a red cube", **request).status_code == 200
    finally:
        calls.remove()
    # batch of the UNet input: 1 = cond only (the rule), 2 = cond and uncond (the teacher's own CFG)
    assert [args[0].shape[0] for args, _, _ in calls.calls] == [1, 2, 1, 2, 1, 1]


def test_the_teacher_sees_the_prompt_of_the_step_it_guides_at_a_schedule_switch(webui):
    """The prompt switches between step 1 (guided) and step 2: the teacher's call at step 1 must use
    the step-1 prompt, as the student's call it refines."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    model = webui.shared.sd_model
    calls = webui_lora.Calls(model.model.diffusion_model)
    try:
        assert post(webui, "None", w=0.0, prompt="a red cube").status_code == 200
        timestep = calls.calls[1][0][1][0].long()  # the schedule's step 1, as the UNet received it
        alpha = model.alphas_cumprod[timestep].item()
        sigma = ((1 - alpha) / alpha) ** 0.5
        calls.calls.clear()
        # a sigma window around step 1's sigma guides step 1 only
        assert post(webui, SAME_CHECKPOINT, prompt="[a red cube:a green ball:1]",
                    window=(sigma * 0.99, sigma * 1.01)).status_code == 200
    finally:
        calls.remove()
    contexts = [kwargs["context"] for _, kwargs, _ in calls.calls]
    assert len(contexts) == 5  # student 0, student 1, teacher 1, student 2, 3
    assert torch.equal(contexts[0], contexts[1]) and not torch.equal(contexts[1], contexts[3])  # switch: 1 -> 2
    assert torch.equal(contexts[2], contexts[1])


def test_the_live_preview_and_last_latent_stay_the_students(webui):
    """The teacher's CFG evaluation must not replace the student's latest prediction (live preview,
    the image an interrupted generation returns)."""
    from modules import script_callbacks

    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    events = []

    def before(params):  # at the start of each CFG evaluation: what the webui holds as the latest latent
        events.append(("start", params.denoiser.sampler.last_latent, webui.shared.state.current_latent))

    def after(params):
        events.append(("end", webui.shared.state.current_latent))

    script_callbacks.on_cfg_denoiser(before)
    script_callbacks.on_cfg_after_cfg(after)
    try:
        assert post(webui, SAME_CHECKPOINT, guided_steps=1).status_code == 200
    finally:
        script_callbacks.remove_callbacks_for_function(before)
        script_callbacks.remove_callbacks_for_function(after)
    # CFG evaluations: student 0, teacher 0, student 1...: at student 1's start the latest latent is student 0's
    student0_end, teacher0_end, student1_start = events[1], events[3], events[4]
    assert student1_start[0] == "start" and teacher0_end[0] == "end"
    assert not torch.equal(student0_end[1], teacher0_end[1])  # the teacher's own preview differs (no LoRA)
    assert torch.equal(student1_start[2], student0_end[1])
    assert torch.equal(student1_start[1], student0_end[1])
