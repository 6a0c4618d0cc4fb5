"""Flux, Chroma and SD3 students and teachers in the real Forge webui (dfdcbab): requests through its API route.

tests/forge_host.py starts the pinned Forge on tiny flow checkpoints that Forge's own loader builds into its
engines: FLUX.1-dev (guidance-distilled, `PredictionFlux` with the resolution shift), FLUX.1-schnell (no
guidance embedding, mu = 1), Chroma (`PredictionFlux`, real CFG) and SD3 (MMDiT, `PredictionDiscreteFlow`
with shift 3). Each model call is read where Forge makes it: a forward hook on the transformer sees its
input latent, timestep (the flow s; 1000 s for SD3), the guidance value Forge passes and the output.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import forge_host
import webui_lora
from kdistpp.integrations import webui as kdistpp_webui
from webui_api import SCRIPT, same_image

FLUX = {"schnell": ("schnell", 11), "dev": ("dev", 22), "dev2": ("dev", 33), "chroma": ("chroma", 44),
        "chroma2": ("chroma", 55), "sd3": ("sd3", 66), "sd35": ("sd3", 77)}
TIMESTEP = {"sd3": 1000.0, "sd35": 1000.0}  # the transformer's timestep per flow s (Flux and Chroma: s itself)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start_flow(tmp_path_factory.mktemp("forge_flow"), FLUX)
    from fastapi.testclient import TestClient

    return type("Forge", (), {"shared": shared, "client": TestClient(app)})


def post(forge, sampler, student="schnell", teacher=None, w=0.0, guided_steps=1, teacher_cfg=1.0, steps=4, seed=5,
         window=(0.0, 0.0), **request):
    body = {"prompt": "a red cube", "negative_prompt": "blur", "steps": steps, "width": 64, "height": 64,
            "sampler_name": sampler, "scheduler": "Simple", "seed": seed, "cfg_scale": request.pop("cfg_scale", 1.0),
            "override_settings": {"sd_model_checkpoint": student},
            "alwayson_scripts": {SCRIPT: {"args": ["None" if teacher is None else teacher, w, guided_steps,
                                                   teacher_cfg, "interpolate", "student", *window]}}, **request}
    return forge.client.post("/sdapi/v1/txt2img", json=body)


def images(response):
    assert response.status_code == 200, response.text[:3000]
    import base64
    import io

    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))).astype(np.int16) for b in response.json()["images"]]


def engine_model(name):
    """The transformer of the loaded student, or of the extension's held teacher engine."""
    from modules import sd_models

    from kdistpp.integrations import webui_teachers

    engine = (sd_models.model_data.sd_model if name == "student" else webui_teachers._forge_teacher["engine"])
    return engine.forge_objects.unet.model.diffusion_model


class Calls:
    """Each forward of a transformer: input latent, timestep, guidance (None without) and output."""

    def __init__(self, module, per_s=1.0):
        self.calls, self.per_s = [], per_s
        self.handle = module.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        guidance = kwargs.get("guidance")
        self.calls.append({"x": args[0].detach().clone(), "t": args[1].detach().clone() / self.per_s,
                           "guidance": None if guidance is None else guidance.detach().clone(),
                           "out": output.detach().clone()})

    def remove(self):
        self.handle.remove()


# Forge's own sampler of the same name is a correct flow sampler for Flux: its Euler and DPM++ 2M have the
# same form in flow coordinates, and its Euler a switches to the rectified-flow step for PredictionFlux.
# SD3's Euler a is not (test_euler_a_on_sd3_takes_the_rectified_flow_step).
@pytest.mark.parametrize("student, base", [(student, base) for student in ("schnell", "chroma", "sd3")
                                           for base in ("Euler", "Euler a", "DPM++ 2M")
                                           if (student, base) != ("sd3", "Euler a")])
def test_w0_and_no_teacher_give_forges_own_image(forge, student, base):
    own = images(post(forge, base, student=student, cfg_scale=2.0))[0]
    assert same_image(images(post(forge, f"{base} Distillation++", student=student, cfg_scale=2.0))[0], own)
    assert same_image(images(post(forge, f"{base} Distillation++", student=student, cfg_scale=2.0,
                                  teacher={"schnell": "dev"}.get(student, student), w=0.0))[0], own)
    assert not same_image(images(post(forge, base, student=student, cfg_scale=2.0, seed=6))[0], own)


@pytest.mark.parametrize("student, teacher, teacher_cfg", [("schnell", "dev", 1.0), ("chroma", "chroma2", 3.0),
                                                         ("sd3", "sd35", 3.0)])
def test_the_teacher_is_called_once_per_guided_step_at_the_renoised_point(forge, student, teacher, teacher_cfg):
    """Euler, 4 steps, 2 guided, student at CFG 1: after the student's call at s_i the teacher is called once at
    s_{i+1} on (1 - s_{i+1}) x0s + s_{i+1} n, x0s the student's estimate (x - s v, from the student's own
    output) and n the renoise noise (Forge's per-image generator at the seed plus 0x5EED). A teacher at its own
    CFG 3 evaluates cond and uncond (the negative prompt Forge skipped for the student) at that point."""
    from modules import rng

    post(forge, "Euler Distillation++", student=student, teacher=teacher, w=0.5)  # loads both
    per_s = TIMESTEP.get(student, 1.0)
    calls = Calls(engine_model("student"), per_s), Calls(engine_model("teacher"), per_s)
    try:
        guided = images(post(forge, "Euler Distillation++", student=student, teacher=teacher, w=0.5, guided_steps=2,
                             teacher_cfg=teacher_cfg))[0]
    finally:
        for c in calls:
            c.remove()
    student_calls, teacher_calls = calls[0].calls, calls[1].calls
    assert len(student_calls) == 4 and len(teacher_calls) == 2
    sigmas = [float(c["t"][0]) for c in student_calls] + [0.0]
    noise = rng.ImageRNG((16, 8, 8), [5 + kdistpp_webui.RENOISE_SEED_OFFSET])
    for i, call in enumerate(teacher_calls):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0s = student_calls[i]["x"] - s * student_calls[i]["out"]  # the flow models predict the velocity n - x0
        expected = (1 - s_next) * x0s + s_next * noise.next()
        assert call["x"].shape[0] == (1 if teacher_cfg == 1 else 2)
        assert call["t"].tolist() == pytest.approx([s_next] * call["x"].shape[0], abs=1e-5)
        for row in call["x"]:
            torch.testing.assert_close(row[None], expected.to(row.dtype), rtol=1e-4, atol=1e-4)
    assert not same_image(guided, images(post(forge, "Euler Distillation++", student=student))[0])


@pytest.mark.parametrize("distilled", [2.5, 5.0])
def test_a_dev_teacher_gets_its_distilled_guidance_and_a_schnell_student_none(forge, distilled):
    post(forge, "Euler Distillation++", teacher="dev", w=0.5)
    student, teacher = Calls(engine_model("student")), Calls(engine_model("teacher"))
    try:
        response = post(forge, "Euler Distillation++", teacher="dev", w=0.5, distilled_cfg_scale=distilled)
    finally:
        student.remove()
        teacher.remove()
    images(response)
    assert [c["guidance"] for c in student.calls] == [None] * 4
    assert [c["guidance"].tolist() for c in teacher.calls] == [[distilled]]
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert f"{kdistpp_webui.DISTILLED_CFG_KEY}: {distilled}" in infotext


@pytest.mark.parametrize("teacher_cfg", [1.0, 3.0])
def test_the_teachers_own_cfg_with_the_negative_prompt_at_student_cfg_1(forge, teacher_cfg):
    """At CFG 1 Forge computes no negative conditioning for the student; a teacher at CFG 3 gets cond and
    uncond (two rows of one call, different text), one at CFG 1 the prompt alone."""
    post(forge, "Euler Distillation++", teacher="dev", w=0.5)
    teacher = Calls(engine_model("teacher"))
    try:
        images(post(forge, "Euler Distillation++", teacher="dev", w=0.5, teacher_cfg=teacher_cfg))
    finally:
        teacher.remove()
    assert [c["x"].shape[0] for c in teacher.calls] == [1 if teacher_cfg == 1 else 2]


def test_a_teacher_at_cfg_1_encodes_no_negative_prompt_and_one_at_3_encodes_and_uses_it(forge, monkeypatch):
    """Student at CFG 1 (Forge computes no negative conditioning for it), Flux-dev teacher: at Auto (CFG 1) Forge
    drops the uncond, so the negative prompt is never encoded (the text encoders' calls, read at the engine's
    get_learned_conditioning); at 3 it is encoded once and the teacher's uncond row gets its T5 encoding; at Auto
    with the model option by which Forge keeps the uncond at CFG 1 (`disable_cfg1_optimization`) it is encoded and
    evaluated too. Each run has its own negative prompt: Forge caches encodings across generations."""
    from modules import sd_models

    from kdistpp.integrations import webui_teachers

    post(forge, "Euler Distillation++", teacher="dev", w=0.5)  # loads both
    engine = sd_models.model_data.sd_model
    encoded, real = [], engine.get_learned_conditioning

    def get_learned_conditioning(prompts):
        out = real(prompts)
        encoded.append((list(prompts), getattr(prompts, "is_negative_prompt", False), out["crossattn"]))
        return out

    monkeypatch.setattr(engine, "get_learned_conditioning", get_learned_conditioning)
    contexts = []
    hook = engine_model("teacher").register_forward_pre_hook(
        lambda module, args, kwargs: contexts.append(kwargs["context"].detach().clone()), with_kwargs=True)
    try:
        options = webui_teachers._forge_teacher["engine"].forge_objects.unet.model_options
        for teacher_cfg, negative, keep_uncond in ((0.0, "blur at auto", False), (3.0, "blur at three", False),
                                                   (0.0, "blur kept", True)):
            encoded.clear()
            contexts.clear()
            if keep_uncond:
                monkeypatch.setitem(options, "disable_cfg1_optimization", True)
            images(post(forge, "Euler Distillation++", teacher="dev", w=0.5, teacher_cfg=teacher_cfg,
                        negative_prompt=negative))
            uncond = teacher_cfg != 0 or keep_uncond
            negatives = [(texts, crossattn) for texts, is_negative, crossattn in encoded if is_negative]
            assert [texts for texts, _ in negatives] == ([[negative]] if uncond else [])
            assert [context.shape[0] for context in contexts] == [2 if uncond else 1]
            if negatives:
                uncond = negatives[0][1].to(contexts[0])
                assert sum(torch.equal(row[None], uncond) for row in contexts[0]) == 1
    finally:
        hook.remove()


class CfgScales:
    """The CFG scale of each of Forge's CFG evaluations, read where Forge gets it (`sampling_function_inner`, which
    skips the unconditional pass at 1), tagged 'teacher' for the held teacher engine's model, and the number of
    rows of each teacher transformer call (1: the conditional pass alone)."""

    def __init__(self, monkeypatch):
        import backend.sampling.sampling_function as sampling

        from kdistpp.integrations import webui_teachers

        teacher_model = webui_teachers._forge_teacher["engine"].forge_objects.unet.model
        self.scales, self.rows = [], []
        real = sampling.sampling_function_inner

        def inner(model, x, timestep, uncond, cond, cond_scale, *args, **kwargs):
            self.scales.append(("teacher" if model is teacher_model else "student", cond_scale))
            return real(model, x, timestep, uncond, cond, cond_scale, *args, **kwargs)

        monkeypatch.setattr(sampling, "sampling_function_inner", inner)
        self.hook = teacher_model.diffusion_model.register_forward_pre_hook(
            lambda module, args: self.rows.append(args[0].shape[0]))

    def teacher(self):
        return [scale for model, scale in self.scales if model == "teacher"]

    def clear(self):
        self.scales.clear()
        self.rows.clear()


@pytest.mark.parametrize("student, teacher, auto", [("schnell", "dev", 1.0), ("dev", "schnell", 1.0),
                                                    ("chroma", "chroma2", 5.0), ("sd3", "sd35", 5.0)])
def test_the_teacher_cfg_at_auto_is_1_for_flux_and_5_for_chroma_and_sd3(forge, monkeypatch, student, teacher, auto):
    """The panel's teacher CFG at Auto (0) gives a Flux teacher (dev, guidance-distilled, and schnell) CFG 1, as
    Forge's Flux preset runs them, so Forge evaluates its prompt alone (one row per call), and a real-CFG teacher
    (Chroma, SD3) 5 (cond and uncond); a set value (3) is the teacher's. The infotext records the scale the
    teacher ran at. Student at CFG 1."""
    post(forge, "Euler Distillation++", student=student, teacher=teacher, w=0.5)  # loads both
    recorded = CfgScales(monkeypatch)
    try:
        for value, expected in ((0.0, auto), (3.0, 3.0)):
            recorded.clear()
            response = post(forge, "Euler Distillation++", student=student, teacher=teacher, w=0.5,
                            teacher_cfg=value)
            images(response)
            assert recorded.teacher() == [expected] and recorded.rows == [1 if expected == 1 else 2]
            assert [scale for model, scale in recorded.scales if model == "student"] == [1.0] * 4
            infotext = json.loads(response.json()["info"])["infotexts"][0]
            assert f"DistillationPP teacher CFG: {expected}" in infotext
    finally:
        recorded.hook.remove()


def test_a_dev_student_with_a_dev_teacher(forge):
    """Both guidance-distilled: each gets Forge's Distilled CFG Scale (the student's own, in its conditioning)."""
    post(forge, "Euler Distillation++", student="dev2", teacher="dev", w=0.5)
    student, teacher = Calls(engine_model("student")), Calls(engine_model("teacher"))
    try:
        images(post(forge, "Euler Distillation++", student="dev2", teacher="dev", w=0.5, distilled_cfg_scale=3.0))
    finally:
        student.remove()
        teacher.remove()
    assert [c["guidance"].tolist() for c in student.calls] == [[3.0]] * 4
    assert [c["guidance"].tolist() for c in teacher.calls] == [[3.0]]


def student_calls(forge, sampler, **request):
    post(forge, sampler, **request)  # loads the student
    calls = Calls(engine_model("student"), TIMESTEP.get(request.get("student"), 1.0))
    try:
        images(post(forge, sampler, **request))
    finally:
        calls.remove()
    return calls.calls


def differing_values(forge, base, **request):
    """The fraction of 8-bit values in which Forge's own sampler's image and the Distillation++ one's differ."""
    own = images(post(forge, base, **request))[0]
    return float((images(post(forge, f"{base} Distillation++", **request))[0] != own).mean())


def rf_midpoint(s, s_next, eta=1.0):
    """ComfyUI's rectified-flow DPM++ 2S a (sample_dpmpp_2s_ancestral_RF), written out: the down step
    s_d = s' (1 + (s'/s - 1) eta), and the midpoint halfway in lambda = log((1 - s) / s), 0.9999 at s = 1."""
    s_down = s_next * (1 + (s_next / s - 1) * eta)
    if s_down == 0:
        return None
    if s == 1:
        return 0.9999
    lam = (np.log((1 - s) / s) + np.log((1 - s_down) / s_down)) / 2
    return 1 / (np.exp(lam) + 1)


def test_dpmpp_2s_a_takes_the_rectified_flow_step_where_forges_takes_a_ve_one(forge):
    """Forge's DPM++ 2S a has no flow variant: its midpoint and noise are VE ones on a flow state. The
    Distillation++ sampler evaluates the student at ComfyUI's rectified-flow midpoints instead."""
    euler = [float(c["t"][0]) for c in student_calls(forge, "Euler Distillation++")] + [0.0]
    calls = [float(c["t"][0]) for c in student_calls(forge, "DPM++ 2S a Distillation++", scheduler="Simple")]
    expected = []
    for s, s_next in zip(euler[:-1], euler[1:]):
        expected += [s] + ([] if rf_midpoint(s, s_next) is None else [rf_midpoint(s, s_next)])
    assert calls == pytest.approx(expected, abs=1e-5)
    own = [float(c["t"][0]) for c in student_calls(forge, "DPM++ 2S a", scheduler="Simple")]
    assert len(own) == len(calls) and own[1] != pytest.approx(calls[1], abs=1e-3)  # Forge's own: the VE midpoint
    assert differing_values(forge, "DPM++ 2S a") > 0.5


def test_lcm_renoises_as_a_flow_model(forge):
    """LCM Distillation++ on Flux: Forge's flow wrapper and sigmas (those Euler uses), and each step renoises the
    estimate as (1 - s') x0 + s' n, n the next draw of Forge's per-image RNG. (Forge's own LCM wraps the model
    as an eps DDPM one, which a flow model is not.)"""
    from modules import rng

    euler = [float(c["t"][0]) for c in student_calls(forge, "Euler Distillation++")]
    calls = student_calls(forge, "LCM Distillation++", scheduler="Simple")
    assert [float(c["t"][0]) for c in calls] == pytest.approx(euler, abs=1e-6)
    noise = rng.ImageRNG((16, 8, 8), [5])
    torch.testing.assert_close(calls[0]["x"], (euler[0] * noise.next()).to(calls[0]["x"].dtype))
    for before, after in zip(calls[:-1], calls[1:]):
        s, s_next = float(before["t"][0]), float(after["t"][0])
        x0 = before["x"] - s * before["out"]
        torch.testing.assert_close(after["x"], ((1 - s_next) * x0 + s_next * noise.next()).to(after["x"].dtype),
                                   rtol=1e-4, atol=1e-4)
    assert differing_values(forge, "LCM") > 0.5


def test_no_teacher_is_loaded_when_the_window_holds_no_step(forge, monkeypatch):
    import backend.loader

    from kdistpp.guided_steps import GuidanceWarning
    from kdistpp.integrations import webui_teachers

    webui_teachers.release_teacher(None)
    loads = []
    real = backend.loader.forge_loader
    monkeypatch.setattr(backend.loader, "forge_loader", lambda *a, **k: loads.append(a) or real(*a, **k))
    plain = images(post(forge, "Euler Distillation++"))[0]
    loads.clear()
    with pytest.warns(GuidanceWarning, match="no step"):
        image = images(post(forge, "Euler Distillation++", teacher="dev", w=0.5, window=(0.001, 0.002)))[0]
    assert loads == [] and "engine" not in webui_teachers._forge_teacher
    assert same_image(image, plain)


HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 3,
         "denoising_strength": 0.6, "hr_cfg": 1.0, "hr_additional_modules": ["Use same choices"]}


def test_hires_fix_with_a_distillation_sampler_on_its_pass_only(forge):
    """The first pass with Forge's Euler, the hires pass with Euler Distillation++ (a start below s = 1): the
    teacher guides the hires pass once, at the hires latent's size, and the infotext records it."""
    post(forge, "Euler Distillation++", teacher="dev", w=0.5)
    student, teacher = Calls(engine_model("student")), Calls(engine_model("teacher"))
    try:
        response = post(forge, "Euler", teacher="dev", w=0.5, hr_sampler_name="Euler Distillation++", **HIRES)
    finally:
        student.remove()
        teacher.remove()
    images(response)
    hires = [float(c["t"][0]) for c in student.calls if c["x"].shape[-1] == 16]
    assert hires[0] < 1 and len(hires) == 3  # Forge's hires pass (3 steps, denoising 0.6) starts below s = 1
    assert [(tuple(c["x"].shape[-2:]), float(c["t"][0])) for c in teacher.calls] == [((16, 16), hires[1])]
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "DistillationPP teacher: dev" in infotext and "Hires sampler: Euler Distillation++" in infotext


def test_img2img_at_w0_is_forges_and_guided_calls_the_teacher_once(forge):
    from webui_api import init_image

    request = {"init_images": [init_image()], "denoising_strength": 0.6}

    def img2img(sampler, **kwargs):
        return post_route(forge, "img2img", sampler, **kwargs, **request)

    img2img("Euler")  # as in test_host_forge.py: the first img2img after a model change differs slightly
    own = images(img2img("Euler"))[0]
    assert same_image(images(img2img("Euler Distillation++"))[0], own)
    images(img2img("Euler Distillation++", teacher="dev", w=0.5))
    student, teacher = Calls(engine_model("student")), Calls(engine_model("teacher"))
    try:
        guided = images(img2img("Euler Distillation++", teacher="dev", w=0.5))[0]
    finally:
        student.remove()
        teacher.remove()
    sigmas = [float(c["t"][0]) for c in student.calls]
    assert sigmas[0] < 1 and [float(c["t"][0]) for c in teacher.calls] == [sigmas[1]]
    assert not same_image(guided, own)


def post_route(forge, route, sampler, **kwargs):
    original = forge.client.post
    try:
        forge.client.post = lambda url, json: original(url.replace("txt2img", route), json=json)
        return post(forge, sampler, **kwargs)
    finally:
        forge.client.post = original


def test_show_hooks_the_sampler_menu_once(forge):  # forge: the started webui (skips without one)
    from modules import scripts

    data = next(d for d in scripts.scripts_data if d.path.endswith("kdistpp_distillation_pp.py"))
    script = data.script_class()
    for _ in range(3):
        script.show(False)
    assert [elem_id for elem_id, _ in script.on_after_component_elem_id] == ["txt2img_sampling"]


def test_euler_a_on_sd3_takes_the_rectified_flow_step(forge):
    """Forge's Euler a takes the rectified-flow step for PredictionFlux only: on SD3 (PredictionDiscreteFlow) it
    adds VE ancestral noise to a flow state. Euler a Distillation++ takes ComfyUI's rectified-flow step on both:
    x_d = (s_d / s) x + (1 - s_d / s) x0 with s_d = s'^2 / s (eta 1), then x' = (1 - s') / (1 - s_d) x_d + c n,
    c^2 = s'^2 - s_d^2 (1 - s')^2 / (1 - s_d)^2, n the next draw of Forge's per-image RNG."""
    from modules import rng

    calls = student_calls(forge, "Euler a Distillation++", student="sd3")
    noise = rng.ImageRNG((16, 8, 8), [5])
    torch.testing.assert_close(calls[0]["x"], (float(calls[0]["t"][0]) * noise.next()).to(calls[0]["x"].dtype))
    for before, after in zip(calls[:-1], calls[1:]):
        s, s_next = float(before["t"][0]), float(after["t"][0])
        x, x0 = before["x"].double(), (before["x"] - s * before["out"]).double()
        s_down = s_next ** 2 / s
        x_down = (s_down / s) * x + (1 - s_down / s) * x0
        c = (s_next ** 2 - s_down ** 2 * (1 - s_next) ** 2 / (1 - s_down) ** 2) ** 0.5
        expected = (1 - s_next) / (1 - s_down) * x_down + c * noise.next().double()
        torch.testing.assert_close(after["x"].double(), expected, rtol=1e-4, atol=1e-4)
    assert differing_values(forge, "Euler a", student="sd3") > 0.5


def transformer_linears(state: dict) -> list[str]:
    """A flow transformer's attention and MLP Linear weights (those speed LoRAs train), as checkpoint keys."""
    return sorted(k for k, v in state.items() if k.startswith(webui_lora.PREFIX) and k.endswith(".weight")
                  and v.ndim == 2 and any(part in k for part in ("_attn.", "_mlp.", "linear1", "linear2", ".attn.",
                                                                   ".mlp.")))


@pytest.mark.parametrize("student", ["dev", "chroma", "sd35"])
def test_a_lora_student_with_its_own_checkpoint_as_teacher(forge, student):
    """A speed LoRA (kohya format, in Forge's models/Lora) on a Flux-dev, Chroma or SD3 checkpoint, teacher "Same
    checkpoint, without the prompt's LoRAs": each transformer call is matched against the transformer of Forge's
    own class evaluated directly on that call's inputs, with the checkpoint's weights or those plus the LoRA's
    deltas computed from the file. Euler, 4 steps, 2 guided: student, teacher, student, teacher, student, student."""
    from pathlib import Path

    from modules import extra_networks, script_callbacks, sd_models

    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as Forge's api_only() does: the Lora extension registers here
    checkpoint = forge_host._started["models"] / f"{student}.safetensors"
    deltas = webui_lora.make_lora(checkpoint, Path(forge.shared.cmd_opts.lora_dir) / f"speed_{student}.safetensors",
                                  layers=transformer_linears)
    family = FLUX[student][0]

    def reference(with_lora):
        model = forge_host.flow_transformer(family).eval()
        model.load_state_dict(webui_lora.unet_state(checkpoint, deltas if with_lora else None))
        return model

    refs = {"lora": reference(True), "base": reference(False)}
    prompt = f"a red cube <lora:speed_{student}:1>"
    images(post(forge, "Euler", student=student, prompt=prompt))  # loads the student and its LoRA
    module = sd_models.model_data.sd_model.forge_objects_original.unet.model.diffusion_model
    calls = webui_lora.Calls(module)
    try:
        images(post(forge, "Euler Distillation++", student=student, prompt=prompt, teacher=SAME_CHECKPOINT, w=0.5,
                    guided_steps=2))
    finally:
        calls.remove()

    def evaluate(model, args, kwargs):
        return model(*[a.float() if torch.is_tensor(a) else a for a in args],
                     **{k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in kwargs.items()})

    assert webui_lora.which_weights(calls.calls, refs, evaluate) == ["lora", "base", "lora", "base", "lora", "lora"]


def test_the_teachers_distilled_cfg_comes_back_from_the_infotext(forge):
    """A schnell student records no Distilled CFG Scale (Forge writes it for a guidance-distilled student only);
    the teacher's value, written under its own key, is pasted back into Forge's Distilled CFG Scale field."""
    from modules import infotext_utils, script_callbacks

    response = post(forge, "Euler Distillation++", teacher="dev", w=0.5, distilled_cfg_scale=4.5)
    infotext = json.loads(response.json()["info"])["infotexts"][0]
    assert "Distilled CFG Scale:" not in infotext.replace(kdistpp_webui.DISTILLED_CFG_KEY, "")
    params = infotext_utils.parse_generation_parameters(infotext)  # what the page's paste function does
    script_callbacks.infotext_pasted_callback(infotext, params)
    assert float(params["Distilled CFG Scale"]) == 4.5 and params["DistillationPP teacher"] == "dev"


def test_an_xyz_plot_over_w_on_flux(forge):
    """X = Distillation++ w: the w = 0 cell is Forge's Euler image, the other equals a single guided generation
    and records its w and the teacher's distilled CFG."""
    from modules import scripts

    plot = next(s for s in scripts.scripts_txt2img.scripts if s.title() == "X/Y/Z plot")
    labels = [option.label for option in plot.current_axis_options]
    script_args = [labels.index("Distillation++ w"), "0, 0.5", [], labels.index("Nothing"), "", [], 0, "", [],
                   True, True, False, False, False, False, False, 0, False]
    response = post(forge, "Euler Distillation++", teacher="dev", w=0.3, script_name="x/y/z plot",
                    script_args=script_args)
    cells, infotexts = images(response)[1:], json.loads(response.json()["info"])["infotexts"]
    assert len(cells) == 2
    assert same_image(cells[0], images(post(forge, "Euler"))[0])
    assert same_image(cells[1], images(post(forge, "Euler Distillation++", teacher="dev", w=0.5))[0])
    assert "DistillationPP" not in infotexts[1]
    assert "DistillationPP w: 0.5" in infotexts[2] and f"{kdistpp_webui.DISTILLED_CFG_KEY}: 3.5" in infotexts[2]


def test_an_xyz_plot_over_the_teacher_cfg_on_flux_with_auto(forge, monkeypatch):
    """X = Distillation++ teacher CFG `0, 3` with a Flux-dev teacher: the Auto cell (labelled so) runs the teacher
    at CFG 1 and records 1.0, the other at 3."""
    from modules import scripts

    plot = next(s for s in scripts.scripts_txt2img.scripts if s.title() == "X/Y/Z plot")
    labels = [option.label for option in plot.current_axis_options]
    axis = plot.current_axis_options[labels.index("Distillation++ teacher CFG")]
    assert [axis.format_value(None, axis, value) for value in (0.0, 3.0)] == [
        "Distillation++ teacher CFG: Auto", "Distillation++ teacher CFG: 3.0"]
    post(forge, "Euler Distillation++", teacher="dev", w=0.5)  # loads the teacher
    recorded = CfgScales(monkeypatch)
    script_args = [labels.index("Distillation++ teacher CFG"), "0, 3", [], labels.index("Nothing"), "", [], 0, "",
                   [], True, True, False, False, False, False, False, 0, False]
    try:
        response = post(forge, "Euler Distillation++", teacher="dev", w=0.5, teacher_cfg=5.0,
                        script_name="x/y/z plot", script_args=script_args)
    finally:
        recorded.hook.remove()
    images(response)
    assert recorded.teacher() == [1.0, 3.0] and recorded.rows == [1, 2]
    infotexts = json.loads(response.json()["info"])["infotexts"]
    assert "DistillationPP teacher CFG: 1.0" in infotexts[1] and "DistillationPP teacher CFG: 3.0" in infotexts[2]


def test_forges_memory_manager_prepares_the_flux_teacher_then_the_student_again(forge, monkeypatch):
    """A separate teacher (FLUX.1-dev for schnell): each guided evaluation asks Forge's memory manager for the
    teacher's transformer (which may push the student off a small GPU) and for the student's right after."""
    import backend.sampling.sampling_function as sampling

    from kdistpp.integrations import webui_teachers

    post(forge, "Euler Distillation++", teacher="dev", w=0.5)
    teacher_unet = webui_teachers._forge_teacher["engine"].forge_objects.unet
    events = []
    real = sampling.sampling_prepare
    monkeypatch.setattr(sampling, "sampling_prepare", lambda unet, x: events.append(
        "prepare teacher" if unet is teacher_unet else "prepare student") or real(unet, x))
    hook = teacher_unet.model.diffusion_model.register_forward_pre_hook(lambda *_: events.append("teacher call"))
    try:
        images(post(forge, "Euler Distillation++", teacher="dev", w=0.5, guided_steps=2))
    finally:
        hook.remove()
    assert events == ["prepare teacher", "teacher call", "prepare student"] * 2


def test_forges_automatic_schedule_on_flow_models(forge):
    """Forge's 'Automatic' schedule type: on SD3 it ends with a step from s = 0 to 0, where Forge's Euler divides
    0 by 0 (a black image); the Distillation++ sampler drops that step and takes the others, at Forge's sigmas.
    On Flux it gives the timestep indices (9999, 6666, ...) as sigmas: refused before any model call, naming
    the fix."""
    own = student_calls(forge, "Euler", student="sd3", scheduler="Automatic")
    assert float(own[-1]["t"][0]) == 0 and not images(post(forge, "Euler", student="sd3", scheduler="Automatic"))[0].any()
    calls = student_calls(forge, "Euler Distillation++", student="sd3", scheduler="Automatic")
    assert [float(c["t"][0]) for c in calls] == pytest.approx([float(c["t"][0]) for c in own[:-1]], abs=1e-6)
    assert images(post(forge, "Euler Distillation++", student="sd3", scheduler="Automatic"))[0].std() > 10
    post(forge, "Euler")  # loads schnell
    calls = Calls(engine_model("student"))
    try:
        with pytest.raises(ValueError, match="pick the schedule type 'Simple'"):
            post(forge, "Euler Distillation++", scheduler="Automatic")
    finally:
        calls.remove()
    assert calls.calls == []
