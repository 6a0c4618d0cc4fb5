"""The Distillation++ settings in the real Forge (dfdcbab, gradio 4): pasted back from an infotext, an X/Y/Z
plot over w, the last step and 1-step runs, and the panel shown only with a Distillation++ sampler.

tests/forge_host.py starts the pinned Forge with this repository cloned into extensions/; the page's
Blocks are built by Forge's own `modules.ui.create_ui()`, whose event handlers are called here as the
page would call them. tests/test_host_a1111_settings.py checks the same and more in A1111.
"""

from __future__ import annotations

import json

import pytest

import forge_host
from webui_api import generate, same_image
from webui_settings import args, backend_fn, check_teacher_cfg_slider, paste, pixels, post, script, xyz


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start(tmp_path_factory.mktemp("forge"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient

    from modules import ui

    demo = ui.create_ui()  # the page, as Forge's webui.py builds it
    return type("Forge", (), {"shared": shared, "client": TestClient(app), "demo": demo})


@pytest.fixture
def teacher_calls(forge):
    """Counts the teacher UNet's forward passes (the teacher is loaded first)."""
    from kdistpp.integrations import webui_teachers

    post(forge, args(w=0.5))
    counter = type("Calls", (), {"count": 0})()
    unet = webui_teachers._forge_teacher["engine"].forge_objects.unet.model.diffusion_model
    hook = unet.register_forward_pre_hook(lambda *_: setattr(counter, "count", counter.count + 1))
    yield counter
    hook.remove()


def test_the_infotext_brings_every_setting_back_into_the_panel(forge):
    from modules import infotext_utils

    sent = ["teacher", 0.25, 2, 4.5, "guidance", "refined", 1.0, 3.0]
    infotext = json.loads(post(forge, sent)["info"])["infotexts"][0]
    assert infotext_utils.parse_generation_parameters(infotext)["DistillationPP teacher"] == "teacher"
    assert paste(forge, infotext) == sent
    plain = json.loads(post(forge, args(w=0.0))["info"])["infotexts"][0]
    assert "DistillationPP" not in plain  # w = 0: nothing written
    assert paste(forge, plain)[0] == "None"


def test_an_xyz_plot_over_w(forge):
    images, infotexts = xyz(forge, "Distillation++ w", "0, 0.3, 0.8", args(w=0.5))
    cells = images[1:]
    assert len(cells) == 3
    assert same_image(cells[0], generate(forge, "Euler")[0])
    assert same_image(cells[1], generate(forge, "Euler Distillation++", teacher="teacher", w=0.3)[0])
    assert not same_image(cells[1], cells[2]) and not same_image(cells[0], cells[2])
    assert "DistillationPP" not in infotexts[1] and "DistillationPP w: 0.8" in infotexts[3]


def test_guiding_every_step_guides_all_but_the_last(forge, teacher_calls):
    image = pixels(post(forge, args(w=0.5, steps=4))["images"][0])
    assert teacher_calls.count == 3
    assert same_image(image, pixels(post(forge, args(w=0.5, steps=3))["images"][0]))


def test_a_1_step_student_is_guided_at_its_only_step(forge, teacher_calls):
    guided = pixels(post(forge, args(w=0.5), steps=1)["images"][0])
    assert teacher_calls.count == 1
    assert not same_image(guided, pixels(post(forge, args(w=0.0), steps=1)["images"][0]))


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_the_panel_shows_with_a_distillation_sampler_only(forge, tab):
    panel = script(tab).panel
    sampler_menu = next(block for block in forge.demo.blocks.values()
                        if getattr(block, "elem_id", None) == f"{tab}_sampling")
    assert panel.visible is False
    fn, _ = backend_fn(forge.demo, "change", target=sampler_menu, output=panel)
    assert fn is not None, "the sampler menu's change does not update the panel"
    assert fn("Euler a Distillation++")["visible"] is True
    assert fn("Euler a")["visible"] is False


def test_the_teacher_cfg_slider_opens_on_auto_and_says_what_it_is(forge):
    check_teacher_cfg_slider()
