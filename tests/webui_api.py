"""Requests to a webui's API (A1111 or Forge) as a user's client sends them, and image comparison."""

from __future__ import annotations

import base64
import io

import numpy as np

SCRIPT = "distillation++ (kdistpp)"


def generate(webui, sampler, seed=5, teacher=None, w=0.0, steps=4, route="txt2img", settings=None, **request):
    args = ["None" if teacher is None else teacher, w, request.pop("guided_steps", 1), 3.0, "interpolate", "student",
            0.0, 0.0]
    body = {"prompt": "a red cube", "negative_prompt": "blur", "steps": steps, "width": 64, "height": 64,
            "sampler_name": sampler, "seed": seed, "cfg_scale": 2.0,
            "override_settings": {"sd_model_checkpoint": "student", **(settings or {})},
            "alwayson_scripts": {SCRIPT: {"args": args}}, **request}
    response = webui.client.post(f"/sdapi/v1/{route}", json=body)
    assert response.status_code == 200, response.text[:2000]
    from PIL import Image

    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(image)))).astype(np.int16)
            for image in response.json()["images"]]


def same_image(a, b):
    """Equal up to float rounding: kdistpp's step scalars are float64 where k-diffusion's are float32, which
    moves a handful of 8-bit values by one level (measured: 1 value in 12288, by 1)."""
    return a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3


def init_image(seed=3):
    from PIL import Image

    g = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()




def mask_image():
    """An inpainting mask: the central 32x32 square of a 64x64 image."""
    from PIL import Image

    mask = np.zeros((64, 64, 3), np.uint8)
    mask[16:48, 16:48] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
