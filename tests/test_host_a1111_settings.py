"""What users do with the Distillation++ settings in the real A1111 webui 1.10.1: paste them back from an
image's infotext, compare them in an X/Y/Z plot, rely on the panel's defaults, and see the panel only
with a Distillation++ sampler.

tests/a1111_host.py starts the pinned webui with this repository cloned into extensions/; the page's
gradio Blocks are built by the webui's own `modules.ui.create_ui()`, whose event handlers (the paste
button's, the sampler menu's) are called here as the page would call them.
"""

from __future__ import annotations

import base64
import io
import json

import pytest

import a1111_host
from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT
from kdistpp.registry import REGISTRY
from webui_api import generate, same_image
from webui_settings import args, backend_fn, check_teacher_cfg_slider, paste, pixels, post, script, xyz

# Euler's 4 "Automatic" steps on these checkpoints start at sigmas 14.6, 2.9, 0.93, 0.029 (then 0)


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    shared, app = a1111_host.start(tmp_path_factory.mktemp("a1111"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient

    from modules import sd_models, ui

    demo = ui.create_ui()  # the page, as webui.py builds it (the API's script arguments keep their layout)
    return type("Webui", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models, "demo": demo})


class TeacherCalls:
    """Counts the teacher UNet's forward passes (the teacher is loaded into the cache first)."""

    def __init__(self, webui):
        post(webui, args(w=0.5))
        model = next(m for m in webui.sd_models.model_data.loaded_sd_models
                     if m.sd_checkpoint_info.model_name == "teacher")
        self.count = 0
        self.hook = model.model.diffusion_model.register_forward_pre_hook(lambda *_: setattr(self, "count",
                                                                                               self.count + 1))


@pytest.fixture
def teacher_calls(webui):
    made = []

    def make():
        made.append(TeacherCalls(webui))
        return made[-1]

    yield make
    for calls in made:
        calls.hook.remove()


# --- infotext --------------------------------------------------------------------------------------------------

def test_the_infotext_brings_every_setting_back_into_the_panel(webui):
    from modules import images, infotext_utils
    from PIL import Image

    sent = ["teacher", 0.25, 2, 4.5, "guidance", "refined", 1.0, 3.0]
    response = post(webui, sent)
    infotext, _ = images.read_info_from_image(Image.open(io.BytesIO(base64.b64decode(response["images"][0]))))
    assert "DistillationPP sigma window: 1.0-3.0" in infotext  # read from the PNG, as PNG Info does
    params = infotext_utils.parse_generation_parameters(infotext)  # the webui's own parser keeps every key
    assert {key: params.get(key) for key in ("DistillationPP teacher", "DistillationPP w", "DistillationPP form")} \
        == {"DistillationPP teacher": "teacher", "DistillationPP w": "0.25", "DistillationPP form": "guidance"}
    assert paste(webui, infotext) == sent
    assert paste(webui, infotext, "img2img") == sent
    # every control of the panel is restored by a field of its own
    assert [key for _, key in script().infotext_fields] == [
        "DistillationPP teacher", "DistillationPP w", "DistillationPP steps", "DistillationPP teacher CFG",
        "DistillationPP form", "DistillationPP direction", "DistillationPP sigma window-1",
        "DistillationPP sigma window-2"]
    without_window = post(webui, ["teacher", 0.25, 2, 4.5, "interpolate", "student", 0.0, 0.0])["info"]
    infotext = json.loads(without_window)["infotexts"][0]
    assert paste(webui, infotext)[-2:] == [0.0, 0.0]


def test_an_image_made_without_a_teacher_pastes_no_teacher(webui):
    infotext = json.loads(post(webui, args(teacher="None", w=0.5))["info"])["infotexts"][0]
    values = paste(webui, infotext)
    assert values[0] == "None"  # the image was made without one: pasting reproduces it
    assert values[1:] == [None] * 7  # the rest stays as the user set it


@pytest.mark.parametrize("request_args,sampler", [(args(teacher="None", w=0.5), "Euler Distillation++"),
                                                  (args(w=0.0), "Euler Distillation++"),
                                                  (args(w=0.5), "Euler a")], ids=["no-teacher", "w0", "plain-sampler"])
def test_nothing_is_written_when_no_teacher_guides(webui, request_args, sampler):
    info = json.loads(post(webui, request_args, sampler_name=sampler)["info"])
    assert "DistillationPP" not in info["infotexts"][0]
    assert "DistillationPP w: 0.5" in json.loads(post(webui, args(w=0.5))["info"])["infotexts"][0]


# --- X/Y/Z plot ------------------------------------------------------------------------------------------------

def test_an_xyz_plot_over_w_and_guided_steps(webui):
    images, infotexts = xyz(webui, "Distillation++ w", "0, 0.3, 0.8", args(w=0.5),
                            "Distillation++ guided steps", "1, 2")
    cells = images[1:]  # the grid, then each cell (x fastest)
    assert len(cells) == 6
    plain = generate(webui, "Euler")[0]
    for steps, row in zip((1, 2), (cells[:3], cells[3:])):
        assert same_image(row[0], plain)  # w = 0: the plain sampler, whatever the panel's w
        for w, cell in zip((0.3, 0.8), row[1:]):
            assert same_image(cell, generate(webui, "Euler Distillation++", teacher="teacher", w=w,
                                             guided_steps=steps)[0])
    for a in range(6):
        for b in range(a + 1, 6):
            if a % 3 or b % 3:  # the two w = 0 cells are the same image
                assert not same_image(cells[a], cells[b]), (a, b)
    assert "DistillationPP" not in infotexts[1] and "DistillationPP w: 0.3" in infotexts[2]
    assert "DistillationPP steps: 2" in infotexts[5]


def test_an_xyz_plot_over_teachers(webui):
    images, infotexts = xyz(webui, "Distillation++ teacher", "", args(w=0.5),
                            x_dropdown=["None", "teacher", SAME_CHECKPOINT])
    assert same_image(images[1], generate(webui, "Euler")[0])
    assert same_image(images[2], generate(webui, "Euler Distillation++", teacher="teacher", w=0.5)[0])
    assert same_image(images[3], generate(webui, "Euler Distillation++", teacher=SAME_CHECKPOINT, w=0.5)[0])
    assert not same_image(images[2], images[3])
    assert "DistillationPP" not in infotexts[1] and "DistillationPP teacher: teacher" in infotexts[2]
    assert paste(webui, infotexts[3])[0] == SAME_CHECKPOINT  # its comma is quoted in the infotext


# --- defaults that work ----------------------------------------------------------------------------------------

def test_a_window_down_to_sigma_0_guides_up_to_the_step_before_the_last(webui, teacher_calls):
    calls = teacher_calls()
    image = pixels(post(webui, args(w=0.5, lo=0.0, hi=1.0))["images"][0])  # steps 2 and 3 lie in the window
    assert calls.count == 1
    assert same_image(image, pixels(post(webui, args(w=0.5, lo=0.5, hi=1.0))["images"][0]))  # step 2 alone


def test_guiding_every_step_guides_all_but_the_last(webui, teacher_calls):
    calls = teacher_calls()
    image = pixels(post(webui, args(w=0.5, steps=4))["images"][0])
    assert calls.count == 3
    assert same_image(image, pixels(post(webui, args(w=0.5, steps=3))["images"][0]))


def test_the_guidance_form_guides_the_last_step_too(webui, teacher_calls):
    calls = teacher_calls()
    post(webui, args(w=0.5, form="guidance", lo=0.0, hi=1.0))
    assert calls.count == 2


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_a_1_step_student_is_guided_at_its_only_step(webui, entry, teacher_calls):
    calls = teacher_calls()
    guided = pixels(post(webui, args(w=0.5), steps=1, sampler_name=entry.label)["images"][0])
    assert calls.count == 1
    assert not same_image(guided, pixels(post(webui, args(w=0.0), steps=1, sampler_name=entry.label)["images"][0]))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_the_panel_defaults_with_a_teacher_run_at_any_step_count(webui, steps):
    defaults = [control.value for control in script().controls]
    assert defaults == ["None", 0.3, 1, 0.0, "interpolate", "student", 0.0, 0.0]  # teacher CFG: Auto
    for window_to in (0.0, 20.0):  # the window's "from" left at its default 0
        info = post(webui, ["teacher", *defaults[1:-1], window_to], steps=steps)["info"]
        # process() errors are only logged by the webui: the infotext shows the settings were taken
        assert "DistillationPP teacher: teacher" in info and "DistillationPP w: 0.3" in info
        assert "DistillationPP teacher CFG: 5.0" in info  # Auto, resolved for an SD1 teacher
        assert ("DistillationPP sigma window: 0.0-20.0" in info) == (window_to > 0)


def test_the_teacher_cfg_at_auto_is_5_for_an_sd1_teacher_and_a_set_value_wins(webui, monkeypatch):
    """The scale each CFG evaluation combines cond and uncond at, read where A1111's CFG denoiser applies it
    (its combine_denoised), with the checkpoint it evaluates: at Auto (0) the SD1 teacher runs at 5, the infotext
    records 5.0 and pasting it sets the panel's teacher CFG to 5; a set value (3) is the teacher's."""
    from modules.sd_samplers_cfg_denoiser import CFGDenoiser

    scales = []
    real = CFGDenoiser.combine_denoised

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        scales.append((self.inner_model.inner_model.sd_checkpoint_info.model_name, cond_scale))
        return real(self, x_out, conds_list, uncond, cond_scale)

    monkeypatch.setattr(CFGDenoiser, "combine_denoised", combine_denoised)
    for value, expected in ((0.0, 5.0), (3.0, 3.0)):
        scales.clear()
        infotext = json.loads(post(webui, args(w=0.5, cfg=value))["info"])["infotexts"][0]
        assert scales == [("student", 2.0), ("teacher", expected)] + [("student", 2.0)] * 3
        assert f"DistillationPP teacher CFG: {expected}" in infotext
        assert paste(webui, infotext)[3] == expected


def test_a_teacher_cfg_between_auto_and_1_is_refused(webui, monkeypatch):
    """0.5, the slider's step next to Auto (0), is refused by the panel's process (which the webui logs in its
    error records): the generation runs without the teacher, its infotext records none; 1 runs the teacher.
    Teacher evaluations are counted at kdistpp's teacher call: the webui's checkpoint cache may evict and
    reload the teacher's model between generations (it does after the SDXL tests' refiner runs)."""
    from modules import errors

    from kdistpp.integrations import webui_teachers

    scales = []
    evaluate = webui_teachers.TeacherCall.__call__

    def counted(self, x, sigma, **extra_args):
        scales.append(extra_args.get("cond_scale"))
        return evaluate(self, x, sigma, **extra_args)

    monkeypatch.setattr(webui_teachers.TeacherCall, "__call__", counted)
    monkeypatch.setattr(errors, "exception_records", [])
    info = post(webui, args(w=0.5, cfg=0.5))["info"]
    assert "DistillationPP teacher" not in info and scales == []
    assert [record["exception"] for record in errors.exception_records] == [
        "teacher_cfg must be 0 for Auto (1 for a Flux teacher, dev or schnell, 5 for others) or a CFG scale of 1 or "
        "more (1: the prompt alone); got 0.5"]
    assert "DistillationPP teacher CFG: 1.0" in post(webui, args(w=0.5, cfg=1.0))["info"] and scales == [1.0]


# --- the panel -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_the_teacher_cfg_slider_opens_on_auto_and_says_what_it_is(webui, tab):
    check_teacher_cfg_slider(tab)


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_the_panel_shows_with_a_distillation_sampler_only(webui, tab):
    panel = script(tab).panel
    sampler_menu = next(block for block in webui.demo.blocks.values()
                        if getattr(block, "elem_id", None) == f"{tab}_sampling")
    assert panel.visible is False  # the default sampler is the webui's own
    fn, outputs = backend_fn(webui.demo, "change", target=sampler_menu, output=panel)
    assert fn is not None, "the sampler menu's change does not update the panel"
    assert fn("Euler Distillation++")["visible"] is True
    assert fn("LCM Distillation++")["visible"] is True
    assert fn("Euler a")["visible"] is False
