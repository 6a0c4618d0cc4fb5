"""A1111 / Forge extension: Distillation++ samplers and their settings (teacher, w, guided steps).

Install this repository as an extension (Extensions > Install from URL, i.e. a clone in `extensions/`);
see docs/webui.md.

The panel shows while a '... Distillation++' sampler is picked; its settings go into the image's
infotext (when a teacher guides) and come back from it (PNG Info, "Send to txt2img"); the X/Y/Z plot
script gets axes for the teacher, w, guided steps and teacher CFG.
"""

import os
import re
import sys

try:
    import kdistpp  # noqa: F401
except ImportError:  # use the checkout this extension lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import gradio as gr  # noqa: E402
from modules import script_callbacks, scripts, sd_models  # noqa: E402

from kdistpp.integrations import webui, webui_teachers  # noqa: E402

webui.register()

# infotext keys, one per panel setting (the sigma window's two ends share one key). Not "Distillation++ ...":
# the webui's infotext parser takes keys of letters, digits, spaces, '-' and '/' only, so a '+' would lose them.
KEYS = {name: f"DistillationPP {label}" for name, label in (
    ("teacher", "teacher"), ("w", "w"), ("steps", "steps"), ("form", "form"), ("direction", "direction"),
    ("window", "sigma window"))}
KEYS["cfg"] = webui.TEACHER_CFG_KEY  # the scale the teacher ran at: Auto is written resolved (1 or 5)
KEYS["distilled_cfg"] = webui.DISTILLED_CFG_KEY  # written by the sampler, for a guidance-distilled teacher only
FORGE_DISTILLED_CFG = "Distilled CFG Scale"  # Forge's infotext key (written for a guidance-distilled student only)
# X/Y/Z plot values are set on the plot's copy of p here; process() lets them win over the panel's
XYZ_ATTRIBUTE = "kdistpp_xyz"
_NUMBER = r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?"  # a sigma as str(float) writes it (>= 0, maybe with an exponent)


def teacher_choices():
    """The teacher dropdown: none, the student's own checkpoint without its LoRAs, then every checkpoint."""
    return ["None", webui_teachers.SAME_CHECKPOINT] + sd_models.checkpoint_tiles()


def is_distpp_sampler(name) -> bool:
    return name in webui.LABELS.values()


def uses_distpp_sampler(p) -> bool:
    """A Distillation++ sampler runs this generation: the sampler, or the Hires fix pass's own sampler."""
    hires = getattr(p, "hr_sampler_name", None) if getattr(p, "enable_hr", False) else None
    return is_distpp_sampler(p.sampler_name) or is_distpp_sampler(hires)


def infotext_pasted(infotext: str, params: dict) -> None:
    """The webui's hook on a pasted infotext (PNG Info, "Send to", the paste button), before the fields are set:
    an image made without a teacher resets the panel's teacher (so pasting reproduces it), and the sigma
    window "from-to" becomes its two ends (0 to 0 when a teacher guided without a window)."""
    if KEYS["teacher"] not in params:
        params[KEYS["teacher"]] = "None"
        return
    if KEYS["distilled_cfg"] in params and FORGE_DISTILLED_CFG not in params:
        # a guidance-distilled teacher beside a student without guidance (Flux-dev guiding schnell): the
        # teacher's value is Forge's Distilled CFG Scale, which Forge records for such a student only
        params[FORGE_DISTILLED_CFG] = params[KEYS["distilled_cfg"]]
    match = re.fullmatch(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*", str(params.get(KEYS["window"], "0-0")))
    if match:
        params[KEYS["window"] + "-1"], params[KEYS["window"] + "-2"] = match.group(1), match.group(2)


script_callbacks.on_infotext_pasted(infotext_pasted)


def panel_visibility(sampler_name):
    """The panel's update for the picked sampler: shown for the Distillation++ samplers only."""
    return gr.update(visible=is_distpp_sampler(sampler_name))


def xyz_grid_module():
    """The X/Y/Z plot script's module as the webui loaded it (None if that script is absent)."""
    for data in scripts.scripts_data:
        if os.path.basename(data.path) == "xyz_grid.py" and hasattr(data.module, "AxisOption"):
            return data.module
    return None


def xyz_setter(name):
    def apply(p, value, values):
        # the plot shallow-copies p per cell: a new dict, so one cell's value never leaks into another's
        setattr(p, XYZ_ATTRIBUTE, {**getattr(p, XYZ_ATTRIBUTE, {}), name: value})

    return apply


def confirm_teachers(p, values):
    for value in values:
        if value not in ("None", webui_teachers.SAME_CHECKPOINT) and sd_models.get_closet_checkpoint_match(value) is None:
            raise ValueError(f"X/Y/Z plot: teacher {value!r} is not a checkpoint of this webui; use 'None', "
                             f"{webui_teachers.SAME_CHECKPOINT!r} or a name from the checkpoint list")


def xyz_teacher_cfg_label(p, opt, x):
    """A teacher CFG axis cell's label: its scale, or "Auto" for 0 (the cell's infotext records the resolved scale)."""
    return f"{opt.label}: {'Auto' if float(x) == webui.AUTO_TEACHER_CFG else x}"


def add_xyz_axes():
    """Adds the Distillation++ axes to the X/Y/Z plot script (once); returns whether that script was found."""
    xyz = xyz_grid_module()
    if xyz is None:
        return False
    if any(option.label.startswith("Distillation++") for option in xyz.axis_options):
        return True
    xyz.axis_options.extend([
        xyz.AxisOption("Distillation++ w", float, xyz_setter("w")),
        xyz.AxisOption("Distillation++ teacher", str, xyz_setter("teacher"), format_value=xyz.format_value_add_label,
                       confirm=confirm_teachers, choices=teacher_choices),
        xyz.AxisOption("Distillation++ guided steps", int, xyz_setter("steps")),
        xyz.AxisOption("Distillation++ teacher CFG", float, xyz_setter("cfg"), format_value=xyz_teacher_cfg_label),
    ])
    return True


add_xyz_axes()  # the plot script is one of the webui's own, loaded before extensions' scripts
script_callbacks.on_before_ui(add_xyz_axes)  # in case another order loaded it later


TEACHER_CFG_LABEL = "Teacher CFG scale (0 = Auto)"
# the slider keeps its 0.5 steps from 0 (half scales such as 3.5 and 7.5 are common): 0.5 is refused, and this says so
TEACHER_CFG_INFO = "Auto: 1 for Flux (dev, schnell), 5 for others; a set scale is 1 or more"


class DistillationPP(scripts.Script):
    def __init__(self):
        self.sampler_dropdown = self.panel = None
        self.listening = False  # show() may be called more than once; the sampler menu's hook is added once

    def title(self):
        return "Distillation++ (kdistpp)"

    def show(self, is_img2img):
        if not self.listening:
            self.on_after_component(self.sampler_created, elem_id=f"{'img2img' if is_img2img else 'txt2img'}_sampling")
            self.listening = True
        return scripts.AlwaysVisible

    def sampler_created(self, on_component):
        self.sampler_dropdown = on_component.component
        self.connect_panel()

    def connect_panel(self):
        """Shows the panel while a Distillation++ sampler is picked (the sampler menu or the panel may be
        built first: the user can reorder the page's sections)."""
        if self.sampler_dropdown is None or self.panel is None:
            return
        self.panel.visible = is_distpp_sampler(self.sampler_dropdown.value)  # the page opens on the menu's value
        self.sampler_dropdown.change(fn=panel_visibility, inputs=[self.sampler_dropdown], outputs=[self.panel],
                                     queue=False)

    def ui(self, is_img2img):
        add_xyz_axes()
        with gr.Accordion("Distillation++ (kdistpp)", open=False, elem_id=self.elem_id("panel")) as panel:
            teacher = gr.Dropdown(label="Teacher checkpoint (the student's base model)", choices=teacher_choices(),
                                  value="None", elem_id=self.elem_id("teacher"))
            w = gr.Slider(0.0, 1.0, value=0.3, step=0.01, label="Teacher weight w", elem_id=self.elem_id("w"))
            steps = gr.Slider(0, 10, value=1, step=1, label="Guided steps (the first N)", elem_id=self.elem_id("steps"),
                              info="the last step is guided only when it is the only one (1-step models)")
            cfg = gr.Slider(0.0, 15.0, value=webui.AUTO_TEACHER_CFG, step=0.5, label=TEACHER_CFG_LABEL,
                            info=TEACHER_CFG_INFO, elem_id=self.elem_id("cfg"))
            form = gr.Dropdown(label="Form", choices=list(webui.FORMS), value="interpolate", elem_id=self.elem_id("form"))
            direction = gr.Dropdown(label="Direction (student = the authors' update)", choices=list(webui.DIRECTIONS),
                                    value="student", elem_id=self.elem_id("direction"))
            with gr.Row():
                sigma_min = gr.Number(label="Guide sigma from (window, optional)", value=0.0,
                                      elem_id=self.elem_id("sigma_min"))
                sigma_max = gr.Number(label="to (0 = use guided steps)", value=0.0, elem_id=self.elem_id("sigma_max"))
        self.panel = panel
        self.connect_panel()
        controls = [teacher, w, steps, cfg, form, direction, sigma_min, sigma_max]
        keys = [KEYS[name] for name in ("teacher", "w", "steps", "cfg", "form", "direction")]
        keys += [KEYS["window"] + "-1", KEYS["window"] + "-2"]  # infotext_pasted splits the window
        self.infotext_fields = list(zip(controls, keys))
        self.paste_field_names = keys  # "Send to img2img" and back carry the panel along
        return controls

    def process(self, p, teacher, w, steps, cfg, form, direction="student", sigma_min=0.0, sigma_max=0.0):
        values = {"teacher": teacher, "w": w, "steps": steps, "cfg": cfg}
        values.update(getattr(p, XYZ_ATTRIBUTE, {}))  # an X/Y/Z plot cell's value wins over the panel's
        teacher = None if values["teacher"] in (None, "None") else values["teacher"]
        # the webui logs and swallows an exception raised here: without this reset a refused setting would
        # leave the previous generation's teacher guiding this one, unrecorded
        webui.settings = webui.Settings()
        webui.settings = webui.Settings(teacher, float(values["w"]), int(values["steps"]), float(values["cfg"]),
                                        form, direction, float(sigma_min), float(sigma_max))
        for key in KEYS.values():  # an X/Y/Z plot's cells share one dict: drop the previous cell's values
            p.extra_generation_params.pop(key, None)
        settings = webui.settings
        if settings.teacher is None:  # also with the webui's own samplers, which never reach the sampler function
            webui_teachers.release_teacher(webui.webui_modules())
        if settings.teacher and settings.w > 0 and uses_distpp_sampler(p):
            # at Auto the teacher CFG is written by the sampler, which resolves it when the teacher is built
            cfg = {} if settings.teacher_cfg == webui.AUTO_TEACHER_CFG else {KEYS["cfg"]: settings.teacher_cfg}
            p.extra_generation_params.update({
                KEYS["teacher"]: settings.teacher, KEYS["w"]: settings.w, KEYS["steps"]: settings.guided_steps,
                **cfg, KEYS["form"]: form, KEYS["direction"]: direction})
            if settings.sigma_max > 0:
                p.extra_generation_params[KEYS["window"]] = f"{settings.sigma_min}-{settings.sigma_max}"
