"""Requests and page events of the Distillation++ settings in a webui (A1111 or Forge), shared by the
host tests of both: the API's generation route, and the Python functions the page's gradio Blocks call."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

from webui_api import SCRIPT

TITLE = "Distillation++ (kdistpp)"


def script(tab="txt2img", title=TITLE):
    from modules import scripts

    runner = scripts.scripts_txt2img if tab == "txt2img" else scripts.scripts_img2img
    return next(s for s in runner.scripts if s.title() == title)


def post(webui, args, route="txt2img", **request):
    body = {"prompt": "a red cube", "negative_prompt": "blur", "steps": 4, "width": 64, "height": 64,
            "sampler_name": "Euler Distillation++", "seed": 5, "cfg_scale": 2.0,
            "override_settings": {"sd_model_checkpoint": "student"}, "alwayson_scripts": {SCRIPT: {"args": args}},
            **request}
    response = webui.client.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 200, response.text[:2000]
    return response.json()


def pixels(image_b64):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB")).astype(np.int16)


def args(teacher="teacher", w=0.3, steps=1, cfg=3.0, form="interpolate", direction="student", lo=0.0, hi=0.0):
    return [teacher, w, steps, cfg, form, direction, lo, hi]


def check_teacher_cfg_slider(tab="txt2img"):
    """The panel's teacher CFG slider as the page builds it: it opens on Auto (0, its lowest value) and its
    label and hint say so, what Auto is (1 for Flux, dev and schnell, 5 for others) and that a set scale is 1 or
    more (0.5, a step of the slider, is refused)."""
    slider = script(tab).controls[3]
    assert (slider.minimum, slider.maximum, slider.value) == (0.0, 15.0, 0.0)
    assert "0 = Auto" in slider.label, slider.label
    assert "Auto: 1 for Flux (dev, schnell), 5 for others; a set scale is 1 or more" in slider.info, slider.info


def event_handlers(demo):
    """(Python function, [(target id, trigger)], output ids) of every event the Blocks wire (gradio 3.41 and 4)."""
    if isinstance(demo.fns, dict):  # gradio 4 (Forge): the functions hold their targets and outputs
        for block_fn in demo.fns.values():
            yield block_fn.fn, list(block_fn.targets), [block._id for block in block_fn.outputs]
    else:
        for dependency, block_fn in zip(demo.dependencies, demo.fns):
            yield block_fn.fn, [(t, dependency["trigger"]) for t in dependency["targets"]], dependency["outputs"]


def backend_fn(demo, trigger, target=None, output=None, name=None):
    """The Python function the page calls for an event of the built Blocks, and its output ids (None if none is
    wired)."""
    for fn, targets, outputs in event_handlers(demo):
        if fn is None or trigger not in [event for _, event in targets]:
            continue
        if target is not None and (target._id, trigger) not in targets:
            continue
        if output is not None and output._id not in outputs:
            continue
        if name is not None and fn.__name__ != name:
            continue
        return fn, outputs
    return None, None


def paste(webui, infotext, tab="txt2img"):
    """What the page's paste button (PNG Info's "Send to" uses the same function) sets on the panel's controls."""
    controls = script(tab).controls
    fn, outputs = backend_fn(webui.demo, "click", output=controls[0], name="paste_func")
    assert fn is not None, "the webui's paste function does not set the Distillation++ panel"
    updates = dict(zip(outputs, fn(infotext)))
    return [updates[control._id].get("value") for control in controls]


def xyz(webui, x_label, x_values, panel, y_label="Nothing", y_values="", x_dropdown=()):
    plot = script(title="X/Y/Z plot")
    labels = [option.label for option in plot.current_axis_options]
    script_args = [labels.index(x_label), x_values, list(x_dropdown), labels.index(y_label), y_values, [],
                   0, "", [], True, True, False, False, False, False, False, 0, False]
    response = post(webui, panel, script_name="x/y/z plot", script_args=script_args)
    return [pixels(image) for image in response["images"]], json.loads(response["info"])["infotexts"]
