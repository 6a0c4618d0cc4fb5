"""A1111 / Forge extension: Distillation++ samplers and their settings (teacher, w, guided steps).

Install this repository as an extension (Extensions > Install from URL, i.e. a clone in `extensions/`);
see docs/webui.md.
"""

import os
import sys

try:
    import kdistpp  # noqa: F401
except ImportError:  # use the checkout this extension lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import gradio as gr  # noqa: E402
from modules import scripts, sd_models  # noqa: E402

from kdistpp.integrations import webui  # noqa: E402

webui.register()


class DistillationPP(scripts.Script):
    def title(self):
        return "Distillation++ (kdistpp)"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion("Distillation++ (pick a '... Distillation++' sampler)", open=False):
            teacher = gr.Dropdown(label="Teacher checkpoint (the student's base model)",
                                  choices=["None"] + sd_models.checkpoint_tiles(), value="None")
            w = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Teacher weight w")
            steps = gr.Slider(0, 10, value=1, step=1, label="Guided steps (the first N)")
            cfg = gr.Slider(1.0, 15.0, value=5.0, step=0.5, label="Teacher CFG scale")
            form = gr.Dropdown(label="Form", choices=list(webui.FORMS), value="interpolate")
            direction = gr.Dropdown(label="Direction (student = the authors' update)", choices=list(webui.DIRECTIONS),
                                    value="student")
            with gr.Row():
                sigma_min = gr.Number(label="Guide sigma from (window, optional)", value=0.0)
                sigma_max = gr.Number(label="to (0 = use guided steps)", value=0.0)
        return [teacher, w, steps, cfg, form, direction, sigma_min, sigma_max]

    def process(self, p, teacher, w, steps, cfg, form, direction="student", sigma_min=0.0, sigma_max=0.0):
        webui.settings = webui.Settings(None if teacher in (None, "None") else teacher, float(w), int(steps), float(cfg),
                                        form, direction, float(sigma_min), float(sigma_max))
        if webui.settings.teacher and p.sampler_name in webui.LABELS.values():
            p.extra_generation_params.update({"Distillation++ teacher": teacher, "Distillation++ w": w,
                                              "Distillation++ steps": int(steps), "Distillation++ teacher CFG": cfg,
                                              "Distillation++ form": form, "Distillation++ direction": direction})
            if sigma_max > 0:
                p.extra_generation_params["Distillation++ sigma window"] = f"{sigma_min}-{sigma_max}"
