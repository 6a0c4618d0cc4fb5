"""The SDXL tests of both webuis (SdxlWebuiTests, which tests/test_host_a1111_sdxl.py and
tests/test_host_forge_sdxl.py run with their webui), and SDXL's conditioning in the webuis' CFG
evaluations, recorded through their own callbacks and UNet hooks.

SDXL's UNet takes a dict of conditioning: `context`, the cross-attention states (CLIP-L and OpenCLIP-G
side by side, 2048 wide), and `y`, the vector (the pooled OpenCLIP-G embedding and the size and crop
embeddings, 2816 wide). Both webuis call the UNet with them as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import webui_lora
from kdistpp.registry import REGISTRY
from webui_api import SCRIPT, generate, init_image, same_image

STUDENT, TEACHER, REFINER = "xl_student", "xl_teacher", "xl_refiner"
REFINER_ARCH = "xl_refiner_arch"  # of SDXL's refiner architecture: context 1280, vector 2560
LORA_PROMPT = "a red cube <lora:xl_speed:1>"  # a kohya-format speed LoRA on the SDXL student's UNet
REFINER_CASES = [(TEACHER, REFINER), ("same", REFINER), (TEACHER, REFINER_ARCH)]


class CfgEvaluations:
    """Every CFG evaluation of a generation (the student's and the teacher's): its sigma, the inputs of its
    UNet call (context: cross-attention; y: vector), the UNet's outputs and the combined result, read
    through the webui's own CFG callbacks and forward hooks on the UNets."""

    def __init__(self, unets: dict):
        from modules import script_callbacks

        self.evaluations, self.unets = [], unets
        self.hooks = [unet.register_forward_hook(lambda m, a, k, out, name=name: self.unet(name, a, k, out),
                                                 with_kwargs=True) for name, unet in unets.items()]
        script_callbacks.on_cfg_denoiser(self.before)
        script_callbacks.on_cfg_after_cfg(self.after)

    def before(self, params):
        self.evaluations.append({"x": params.x.detach().clone(), "sigma": params.sigma.detach().clone(), "calls": []})

    def unet(self, name, args, kwargs, output):
        self.evaluations[-1]["calls"].append({"unet": name, "context": kwargs["context"].detach().clone(),
                                              "y": kwargs["y"].detach().clone(), "out": output.detach().clone()})

    def after(self, params):
        self.evaluations[-1]["denoised"] = params.x.detach().clone()

    def remove(self):
        from modules import script_callbacks

        for hook in self.hooks:
            hook.remove()
        script_callbacks.remove_callbacks_for_function(self.before)
        script_callbacks.remove_callbacks_for_function(self.after)


def cfg_scale(evaluation) -> tuple[float, float]:
    """The CFG scale of one evaluation, read from its numbers: its combined noise estimate (x - denoised) / sigma
    fitted on the UNet's outputs for the cond and the uncond (the larger coefficient: the scales here are
    above 1, and Forge orders its batch as it likes); and the fit's residual. An evaluation of the cond alone
    has scale 1."""
    n = evaluation["denoised"].shape[0]
    x, sigma = evaluation["x"][:n], evaluation["sigma"][:n].view(-1, 1, 1, 1)
    eps = ((x - evaluation["denoised"]) / sigma).double().flatten()
    out = torch.cat([call["out"] for call in evaluation["calls"]]).double()
    if out.shape[0] == n:
        return 1.0, (eps - out.flatten()).abs().max().item()
    basis = torch.stack([out[:n].flatten(), out[n:2 * n].flatten()], dim=1)
    coef = torch.linalg.lstsq(basis, eps[:, None]).solution.flatten()
    return coef.max().item(), (basis @ coef - eps).abs().max().item()


def check_teacher_evaluations(evaluations, student: str, teacher: str, student_cfg=2.0, teacher_cfg=3.0) -> list:
    """Each evaluation runs the prompt and the negative prompt with SDXL's full conditioning (the UNet's
    calls of an evaluation together: context (2, 77, 2048), y (2, 2816)); each teacher evaluation directly
    follows a student evaluation, gets that evaluation's conditioning and combines it at the teacher's own
    CFG scale (the student's at its own). Returns the evaluations' models in order."""
    order = []
    for i, e in enumerate(evaluations):
        names = {c["unet"] for c in e["calls"]}
        assert len(names) == 1, names
        order.append(names.pop())
        context = torch.cat([c["context"] for c in e["calls"]])
        y = torch.cat([c["y"] for c in e["calls"]])
        assert context.shape == (2, 77, 2048) and y.shape == (2, 2816)  # prompt and negative prompt
        assert not torch.equal(y[0], y[1])  # the pooled text embedding is in the vector
        scale, residual = cfg_scale(e)
        assert residual < 1e-3 and scale == pytest.approx(teacher_cfg if order[-1] == teacher else student_cfg,
                                                           abs=1e-2), (i, scale, residual)
        if order[-1] == teacher:
            assert i > 0 and order[i - 1] == student
            for key in ("context", "y"):
                assert torch.equal(torch.cat([c[key] for c in e["calls"]]),
                                   torch.cat([c[key] for c in evaluations[i - 1]["calls"]]))
    return order


def check_guided_evaluations(evaluations, student: str, teacher: str) -> None:
    """Euler, 4 steps, the first 2 guided: student 0, teacher 0, student 1, teacher 1, student 2, student 3,
    each as check_teacher_evaluations requires."""
    assert check_teacher_evaluations(evaluations, student, teacher) == [student, teacher, student, teacher,
                                                                         student, student]


def sdxl_host(host_module, tmp, label: str, build_unet):
    """Starts the webui (`host_module`: a1111_host or forge_host) with its SD1 'student' and 'teacher', adds
    the SDXL student, teacher and refiners and the student's speed LoRA, and returns its handle: `shared`,
    `client` (a TestClient of its API), `sd_models` and `refs`, the SDXL UNets evaluated directly with known
    weights (`build_unet(refiner)`: an empty UNet of the webui's own class)."""
    shared, app = host_module.start(tmp, {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient
    from modules import extra_networks, script_callbacks, sd_models

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as the webui's api_only() does: the Lora extension registers here
    models = host_module.add_sdxl_checkpoints({STUDENT: 11, TEACHER: 22, REFINER: 33})
    host_module.add_sdxl_checkpoints({REFINER_ARCH: 44}, refiner=True)
    deltas = webui_lora.make_lora(models / f"{STUDENT}.safetensors",
                                  Path(shared.cmd_opts.lora_dir) / "xl_speed.safetensors")

    def unet(name, deltas=None, refiner=False):
        module = build_unet(refiner).eval()
        module.load_state_dict(webui_lora.unet_state(models / f"{name}.safetensors", deltas))
        return module

    refs = {"student+lora": unet(STUDENT, deltas), "student": unet(STUDENT), "teacher": unet(TEACHER),
            "refiner": unet(REFINER), REFINER_ARCH: unet(REFINER_ARCH, refiner=True)}
    return type(label, (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models, "refs": refs})


def xl(host, sampler, **kwargs):
    """A generation with the SDXL student loaded (webui_api.generate's arguments)."""
    settings = {"sd_model_checkpoint": STUDENT, **kwargs.pop("settings", {})}
    return generate(host, sampler, settings=settings, **kwargs)


def request(student, teacher, guided_steps=1, **body):
    """A txt2img request (Euler Distillation++, 4 steps at 64 x 64, CFG 2, the teacher's at 3, w = 0.5)."""
    return {"prompt": "a red cube", "steps": 4, "width": 64, "height": 64, "seed": 5, "cfg_scale": 2.0,
            "sampler_name": "Euler Distillation++", "override_settings": {"sd_model_checkpoint": student},
            "alwayson_scripts": {SCRIPT: {"args": [teacher, 0.5, guided_steps, 3.0, "interpolate", "student", 0.0,
                                                   0.0]}}, **body}


def refiner_request(teacher, guided_steps, refiner):
    return request(STUDENT, teacher, guided_steps=guided_steps, refiner_checkpoint=refiner, refiner_switch_at=0.5)


def which_weights(calls, refs, evaluate):
    """For each UNet call, the checkpoint whose UNet reproduces it (`evaluate(unet, args, kwargs)`, the webui's
    way of calling it): among the base-architecture checkpoints for calls with SDXL's 2048-wide context, the
    refiner-architecture one for the others (1280 wide)."""
    base = {k: refs[k] for k in ("student", "teacher", "refiner")}
    names = []
    for call in calls:
        wide = call[1]["context"].shape[-1] == 2048
        names += webui_lora.which_weights([call], base if wide else {"refiner": refs[REFINER_ARCH]}, evaluate)
    return names


@dataclass
class SdxlWebui:
    """What the shared tests below need to know of one webui: each test file's `sdxl` fixture returns one."""

    host: object  # the started webui (sdxl_host)
    current_model: Callable  # host -> the webui's loaded model object (its sd_checkpoint_info names it)
    unet_of: Callable  # model -> the UNet module its generations call (the student's own, LoRAs patched in)
    unets: Callable  # host -> {STUDENT: UNet, TEACHER: UNet} once both are loaded
    evaluate: Callable  # (unet, args, kwargs) -> the UNet evaluated directly as the webui calls it
    all_unet_calls: type  # a webui_lora.Calls recording every SDXL UNet's forwards, whichever model runs it
    refused: Callable  # (host, body, message): the txt2img request is refused with the message
    is_sdxl_student: Callable  # host -> whether the loaded model is the SDXL student
    sd1_context: int  # the width of the SD1 checkpoints' text context (as the refusal names it)
    hires: dict  # the Hires fix request
    teacher_kept: Callable | None = None  # host -> whether a refused teacher stayed loaded (where it can)


def recorded_generation(sdxl, **request):
    """A generation with the teacher (loaded before), its CFG evaluations recorded; returns (image, evaluations)."""
    xl(sdxl.host, "Euler a Distillation++", teacher=TEACHER, w=0.5, **request)  # loads the teacher
    recorded = CfgEvaluations(sdxl.unets(sdxl.host))
    try:
        image = xl(sdxl.host, "Euler a Distillation++", teacher=TEACHER, w=0.5, **request)[0]
    finally:
        recorded.remove()
    return image, recorded.evaluations


# The tests below run in both webuis: tests/test_host_a1111_sdxl.py and tests/test_host_forge_sdxl.py each
# subclass SdxlWebuiTests as a Test class, which pytest collects there, and give it their webui through their
# `sdxl` fixture.


class SdxlWebuiTests:
    """The SDXL tests, for a webui given by an `sdxl` fixture (SdxlWebui)."""

    @pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
    def test_w0_and_no_teacher_give_the_webuis_own_sdxl_image(self, sdxl, entry):
        """With no teacher and at w = 0 each Distillation++ sampler gives the webui's own sampler's SDXL image."""
        base = xl(sdxl.host, entry.webui_base)[0]
        assert sdxl.is_sdxl_student(sdxl.host)
        assert same_image(xl(sdxl.host, entry.label)[0], base)
        assert same_image(xl(sdxl.host, entry.label, teacher=TEACHER, w=0.0)[0], base)
        assert not same_image(xl(sdxl.host, entry.webui_base, seed=6)[0], base)

    def test_each_teacher_call_gets_sdxls_full_conditioning_at_the_teachers_cfg(self, sdxl):
        """The teacher, another SDXL checkpoint, is evaluated once per guided step on the student's conditioning
        dict: the 2048-wide cross-attention context and the 2816-wide vector of the prompt and of the negative
        prompt, combined at the teacher's CFG scale (3; the student's is 2)."""
        host = sdxl.host
        plain = xl(host, "Euler Distillation++")[0]
        xl(host, "Euler Distillation++", teacher=TEACHER, w=0.5)  # loads the teacher
        recorded = CfgEvaluations(sdxl.unets(host))
        try:
            guided = xl(host, "Euler Distillation++", teacher=TEACHER, w=0.5, guided_steps=2)[0]
        finally:
            recorded.remove()
        check_guided_evaluations(recorded.evaluations, STUDENT, TEACHER)
        assert not same_image(guided, plain)
        assert sdxl.current_model(host).sd_checkpoint_info.model_name == STUDENT

    def test_a_speed_lora_student_with_its_checkpoint_as_teacher(self, sdxl):
        """An SDXL speed LoRA in the prompt is the student; "Same checkpoint, without the prompt's LoRAs" is its
        teacher: each call's output is reproduced by the SDXL UNet evaluated directly with the checkpoint's
        weights (teacher calls) or the checkpoint's plus the LoRA's deltas computed from the file (student calls)."""
        from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

        host = sdxl.host
        plain = xl(host, "Euler Distillation++", prompt=LORA_PROMPT)[0]  # loads the student and the LoRA
        student = sdxl.current_model(host)
        calls = webui_lora.Calls(sdxl.unet_of(student))
        try:
            guided = xl(host, "Euler Distillation++", prompt=LORA_PROMPT, teacher=SAME_CHECKPOINT, w=0.5,
                        guided_steps=2)[0]
        finally:
            calls.remove()
        refs = {k: host.refs[k] for k in ("student", "student+lora")}
        assert webui_lora.which_weights(calls.calls, refs, sdxl.evaluate) == [
            "student+lora", "student", "student+lora", "student", "student+lora", "student+lora"]
        assert all(k["context"].shape[-1] == 2048 and k["y"].shape[-1] == 2816 for _, k, _ in calls.calls)
        assert not same_image(guided, plain) and sdxl.current_model(host) is student

    @pytest.mark.parametrize("student, teacher", [(STUDENT, "teacher"), ("student", TEACHER)], ids=["sd1-teacher",
                                                                                                      "sdxl-teacher"])
    def test_a_teacher_of_the_other_family_is_refused_before_any_model_call(self, sdxl, student, teacher):
        """SD1 and SDXL differ in latents' meaning, text conditioning (a tensor against SDXL's dict) and UNet:
        either way round the teacher is refused, naming both families, before any call of the student's UNet;
        the webui's model stays the student's, and the teacher is not kept (where the webui keeps one)."""
        host = sdxl.host
        xl(host, "Euler", settings={"sd_model_checkpoint": student})
        model = sdxl.current_model(host)
        calls = webui_lora.Calls(sdxl.unet_of(model))
        sd1 = f"SD1 (text context {sdxl.sd1_context})"
        families = {STUDENT: "SDXL (text context 2048)", "student": sd1, TEACHER: "SDXL (text context 2048)",
                    "teacher": sd1}
        try:
            sdxl.refused(host, request(student, teacher),
                         f"teacher {teacher!r} is an {families[teacher]} model but the student is an "
                         f"{families[student]} model")
        finally:
            calls.remove()
        assert calls.calls == []
        assert sdxl.current_model(host) is model
        if sdxl.teacher_kept is not None:
            assert not sdxl.teacher_kept(host)

    @pytest.mark.parametrize("teacher, refiner", REFINER_CASES, ids=["teacher", "same", "refiner-architecture"])
    def test_guided_steps_before_the_refiner_switch_are_the_teachers(self, sdxl, teacher, refiner):
        """Two guided steps, then the refiner takes over halfway (Euler, 4 steps): the guided steps call the
        teacher's weights (the base's with the same-checkpoint teacher); a refiner of SDXL's refiner architecture
        runs on its own conditioning (context 1280, vector 2560), the teacher on the base's."""
        from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

        host = sdxl.host
        same_checkpoint, refiner_arch = teacher == "same", refiner == REFINER_ARCH
        body = refiner_request(SAME_CHECKPOINT if same_checkpoint else teacher, 2, refiner)
        assert host.client.post("/sdapi/v1/txt2img", json=body).status_code == 200  # loads every model
        calls = sdxl.all_unet_calls()
        try:
            response = host.client.post("/sdapi/v1/txt2img", json=body)
        finally:
            calls.remove()
        assert response.status_code == 200, response.text[:2000]
        expected_teacher = "student" if same_checkpoint else "teacher"
        assert which_weights(calls.calls, host.refs, sdxl.evaluate) == [
            "student", expected_teacher, "student", expected_teacher, "refiner", "refiner"]
        widths = [(k["context"].shape[-1], k["y"].shape[-1]) for _, k, _ in calls.calls]
        assert widths == [(2048, 2816)] * 4 + [(1280, 2560) if refiner_arch else (2048, 2816)] * 2
        assert f"Refiner: {refiner}" in response.json()["info"]

    @pytest.mark.parametrize("teacher, refiner", REFINER_CASES, ids=["teacher", "same", "refiner-architecture"])
    def test_a_guided_step_after_the_refiner_switch_is_refused(self, sdxl, teacher, refiner):
        """A third guided step would come after the switch, where the sampled model is the refiner: it is refused
        with the reason, before the teacher runs."""
        from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

        teacher = SAME_CHECKPOINT if teacher == "same" else teacher
        calls = sdxl.all_unet_calls()
        try:
            sdxl.refused(sdxl.host, refiner_request(teacher, 3, refiner),
                         "a guided step comes after the refiner switch")
        finally:
            calls.remove()
        expected_teacher = "student" if teacher == SAME_CHECKPOINT else "teacher"
        assert which_weights(calls.calls, sdxl.host.refs, sdxl.evaluate) == [
            "student", expected_teacher, "student", expected_teacher, "refiner"]

    def test_hires_fix(self, sdxl):
        """At w = 0 the webui's own Hires fix image; guided, the teacher guides the first step of each pass, with
        that pass's SDXL conditioning (the hires pass's vector carries the upscaled size)."""
        host, hires = sdxl.host, sdxl.hires
        base = xl(host, "Euler a", **hires)[0]
        assert base.shape == (128, 128, 3)
        assert same_image(xl(host, "Euler a Distillation++", **hires)[0], base)
        guided, evaluations = recorded_generation(sdxl, **hires)
        order = check_teacher_evaluations(evaluations, STUDENT, TEACHER)
        widths = [e["x"].shape[-1] for e in evaluations]
        assert [(w, name) for w, name in zip(widths, order) if name == TEACHER] == [(8, TEACHER), (16, TEACHER)]
        first, last = evaluations[order.index(TEACHER)], evaluations[len(order) - 1 - order[::-1].index(TEACHER)]
        assert not torch.equal(first["calls"][0]["y"], last["calls"][0]["y"])  # the size embedding differs per pass
        assert not same_image(guided, base)

    def test_img2img(self, sdxl):
        """img2img at w = 0 is the webui's own; guided, one teacher evaluation with the student's conditioning."""
        host = sdxl.host
        request = {"init_images": [init_image()], "denoising_strength": 0.6, "route": "img2img"}
        xl(host, "Euler a", **request)  # the webui's first img2img differs from later ones
        base = xl(host, "Euler a", **request)[0]
        assert same_image(xl(host, "Euler a Distillation++", **request)[0], base)
        guided, evaluations = recorded_generation(sdxl, **request)
        assert check_teacher_evaluations(evaluations, STUDENT, TEACHER).count(TEACHER) == 1
        assert not same_image(guided, base)
