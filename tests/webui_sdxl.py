"""SDXL's conditioning in the webuis' CFG evaluations, recorded through their own callbacks and UNet hooks.

SDXL's UNet takes a dict of conditioning: `context`, the cross-attention states (CLIP-L and OpenCLIP-G
side by side, 2048 wide), and `y`, the vector (the pooled OpenCLIP-G embedding and the size and crop
embeddings, 2816 wide). Both webuis call the UNet with them as keyword arguments.
"""

from __future__ import annotations

import pytest
import torch

from webui_api import init_image, same_image


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


# The checks below run the same way in both webuis; each test file passes its webui's handle (`host`: client,
# refs), its `xl` generation helper, its recorded_generation and its UNet-call recorder.

def check_guided_steps_before_the_refiner_switch(host, request, all_unet_calls, which_weights, same_checkpoint: bool,
                                                 refiner_arch: bool, refiner: str) -> None:
    """Two guided steps, then the refiner takes over halfway (Euler, 4 steps): the guided steps call the
    teacher's weights (the base's with the same-checkpoint teacher); a refiner of SDXL's refiner architecture
    runs on its own conditioning (context 1280, vector 2560), the teacher on the base's."""
    assert host.client.post("/sdapi/v1/txt2img", json=request).status_code == 200  # loads every model
    calls = all_unet_calls()
    try:
        response = host.client.post("/sdapi/v1/txt2img", json=request)
    finally:
        calls.remove()
    assert response.status_code == 200, response.text[:2000]
    expected_teacher = "student" if same_checkpoint else "teacher"
    assert which_weights(calls.calls, host.refs) == [
        "student", expected_teacher, "student", expected_teacher, "refiner", "refiner"]
    widths = [(k["context"].shape[-1], k["y"].shape[-1]) for _, k, _ in calls.calls]
    assert widths == [(2048, 2816)] * 4 + [(1280, 2560) if refiner_arch else (2048, 2816)] * 2
    assert f"Refiner: {refiner}" in response.json()["info"]


def check_hires_fix(host, xl, recorded_generation, hires: dict, student: str, teacher: str) -> None:
    """At w = 0 the webui's own Hires fix image; guided, the teacher guides the first step of each pass, with
    that pass's SDXL conditioning (the hires pass's vector carries the upscaled size)."""
    base = xl(host, "Euler a", **hires)[0]
    assert base.shape == (128, 128, 3)
    assert same_image(xl(host, "Euler a Distillation++", **hires)[0], base)
    guided, evaluations = recorded_generation(host, **hires)
    order = check_teacher_evaluations(evaluations, student, teacher)
    widths = [e["x"].shape[-1] for e in evaluations]
    assert [(w, name) for w, name in zip(widths, order) if name == teacher] == [(8, teacher), (16, teacher)]
    first, last = evaluations[order.index(teacher)], evaluations[len(order) - 1 - order[::-1].index(teacher)]
    assert not torch.equal(first["calls"][0]["y"], last["calls"][0]["y"])  # the size embedding differs per pass
    assert not same_image(guided, base)


def check_img2img(host, xl, recorded_generation, student: str, teacher: str) -> None:
    """img2img at w = 0 is the webui's own; guided, one teacher evaluation with the student's conditioning."""
    request = {"init_images": [init_image()], "denoising_strength": 0.6, "route": "img2img"}
    xl(host, "Euler a", **request)  # the webui's first img2img differs from later ones
    base = xl(host, "Euler a", **request)[0]
    assert same_image(xl(host, "Euler a Distillation++", **request)[0], base)
    guided, evaluations = recorded_generation(host, **request)
    assert check_teacher_evaluations(evaluations, student, teacher).count(teacher) == 1
    assert not same_image(guided, base)
