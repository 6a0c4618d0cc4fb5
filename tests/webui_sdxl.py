"""SDXL's conditioning in the webuis' CFG evaluations, recorded through their own callbacks and UNet hooks.

SDXL's UNet takes a dict of conditioning: `context`, the cross-attention states (CLIP-L and OpenCLIP-G
side by side, 2048 wide), and `y`, the vector (the pooled OpenCLIP-G embedding and the size and crop
embeddings, 2816 wide). Both webuis call the UNet with them as keyword arguments.
"""

from __future__ import annotations

import pytest
import torch


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
