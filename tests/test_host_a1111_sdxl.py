"""SDXL students and teachers in the real A1111 webui 1.10.1, on tiny SDXL checkpoints.

tests/a1111_host.py builds real `sgm` DiffusionEngines (SDXL's model code, from the webui's own
clone) with a small UNet that keeps SDXL's conditioning: a dict of a 2048-wide cross-attention
context (CLIP-L and OpenCLIP-G hidden states side by side) and a 2816-wide vector (the pooled
OpenCLIP-G embedding and the size/crop embeddings). Each check compares with the webui's own
sampler, or with the UNet evaluated directly on a call's inputs.
"""

from __future__ import annotations

import pytest
import torch

import a1111_host
from kdistpp.registry import REGISTRY
from webui_api import generate, same_image

STUDENT, TEACHER = "xl_student", "xl_teacher"


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    shared, app = a1111_host.start(tmp_path_factory.mktemp("a1111_sdxl"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient
    from modules import sd_models

    a1111_host.add_sdxl_checkpoints({STUDENT: 11, TEACHER: 22})
    return type("Webui", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models})


def xl(webui, sampler, **kwargs):
    settings = {"sd_model_checkpoint": STUDENT, **kwargs.pop("settings", {})}
    return generate(webui, sampler, settings=settings, **kwargs)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_w0_and_no_teacher_give_the_webuis_own_sdxl_image(webui, entry):
    base = xl(webui, entry.webui_base)[0]
    assert webui.shared.sd_model.is_sdxl
    assert same_image(xl(webui, entry.label)[0], base)
    assert same_image(xl(webui, entry.label, teacher=TEACHER, w=0.0)[0], base)
    assert not same_image(xl(webui, entry.webui_base, seed=6)[0], base)


def model_named(webui, name):
    for model in webui.sd_models.model_data.loaded_sd_models:
        if model.sd_checkpoint_info.model_name == name:
            return model
    raise AssertionError(f"{name} is not in the webui's checkpoint cache")


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
    fitted on the UNet's cond and uncond outputs (the webui's batch order: conds, then unconds); and the
    fit's residual. An evaluation of the cond alone has scale 1."""
    n = evaluation["denoised"].shape[0]
    x, sigma = evaluation["x"][:n], evaluation["sigma"][:n].view(-1, 1, 1, 1)
    eps = ((x - evaluation["denoised"]) / sigma).double().flatten()
    out = torch.cat([call["out"] for call in evaluation["calls"]]).double()
    if out.shape[0] == n:
        return 1.0, (eps - out.flatten()).abs().max().item()
    basis = torch.stack([out[:n].flatten(), out[n:2 * n].flatten()], dim=1)
    coef = torch.linalg.lstsq(basis, eps[:, None]).solution.flatten()
    return coef[0].item(), (basis @ coef - eps).abs().max().item()


def test_each_teacher_call_gets_sdxls_full_conditioning_at_the_teachers_cfg(webui):
    """The teacher, another SDXL checkpoint, is evaluated once per guided step on the student's conditioning
    dict: the 2048-wide cross-attention context and the 2816-wide vector of the prompt and of the negative
    prompt, combined at the teacher's CFG scale (3; the student's is 2)."""
    plain = xl(webui, "Euler Distillation++")[0]
    xl(webui, "Euler Distillation++", teacher=TEACHER, w=0.5)  # loads the teacher into the cache
    unets = {name: model_named(webui, name).model.diffusion_model for name in (STUDENT, TEACHER)}
    recorded = CfgEvaluations(unets)
    try:
        guided = xl(webui, "Euler Distillation++", teacher=TEACHER, w=0.5, guided_steps=2)[0]
    finally:
        recorded.remove()
    evaluations = recorded.evaluations
    # Euler, 4 steps, 2 guided: student 0, teacher 0, student 1, teacher 1, student 2, student 3
    assert [[c["unet"] for c in e["calls"]] for e in evaluations] == [
        [STUDENT], [TEACHER], [STUDENT], [TEACHER], [STUDENT], [STUDENT]]
    for e in evaluations:
        call = e["calls"][0]
        assert call["context"].shape == (2, 77, 2048) and call["y"].shape == (2, 2816)  # prompt and negative prompt
        assert not torch.equal(call["y"][0], call["y"][1])  # the pooled text embedding is in the vector
    for student, teacher in ((evaluations[0], evaluations[1]), (evaluations[2], evaluations[3])):
        assert torch.equal(teacher["calls"][0]["context"], student["calls"][0]["context"])
        assert torch.equal(teacher["calls"][0]["y"], student["calls"][0]["y"])
    scales = [cfg_scale(e) for e in evaluations]
    assert all(residual < 1e-3 for _, residual in scales), scales
    assert [s for s, _ in scales] == pytest.approx([2.0, 3.0, 2.0, 3.0, 2.0, 2.0], abs=1e-2)
    assert not same_image(guided, plain)
    assert webui.shared.sd_model.sd_checkpoint_info.model_name == STUDENT
