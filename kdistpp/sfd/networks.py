"""diffusers UNets and flow transformers as trainable SFD students (and, frozen, as teachers).

`UNetStudent` is a `UNet2DConditionModel` (SD 1.x, SDXL; epsilon or v prediction) as a VE-sigma
denoiser module, `D(x, sigma, cond=..., num_steps=None) -> x0`; `FlowTransformerStudent` is an SD3 or
Flux transformer as a flow denoiser module, `D(x, s, cond=...) -> x0`, trained in VE through
`FlowAsVE` like any flow network. Both call the network exactly as `kdistpp.integrations.diffusers`
does at sampling time, so the trained weights sample there unchanged.

With `step_conditioned=True` (SFD-v) a `StepEmbedding` of the timestamp count N is added to the
network's time embedding (the UNet's `time_embedding` output, the transformer's `time_text_embed`
output: what every block is modulated by). Its last layer starts at zero, so the student starts as
its teacher.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..integrations.diffusers import DiffusersFlowTransformerDenoiser, DiffusersUNetDenoiser
from .. import parametrization
from .conditioning import StepEmbedding


class _StepConditioned(nn.Module):
    """Adds SFD-v's step embedding to the output of `network.<time_module>` during the calls that
    pass `num_steps` (a forward hook: the network's own code is not changed)."""

    time_module: str

    def _setup_step_embedding(self, network: nn.Module, step_conditioned: bool) -> None:
        self._num_steps = None
        self.step_embedding = None
        if not step_conditioned:
            return
        target = network.get_submodule(self.time_module)
        dim = _output_width(target)
        self.step_embedding = StepEmbedding(dim)
        target.register_forward_hook(self._add_step_embedding)

    def _add_step_embedding(self, module, inputs, output):
        if self._num_steps is None:
            return output
        emb = self.step_embedding(self._num_steps.to(output.device).reshape(-1))
        return output + emb.to(output.dtype)

    @contextlib.contextmanager
    def _steps(self, num_steps, batch: int, device):
        if num_steps is not None and self.step_embedding is None:
            raise TypeError("this student is not step-conditioned: build it with step_conditioned=True to pass num_steps")
        if num_steps is not None and not torch.is_tensor(num_steps):
            num_steps = torch.full((batch,), int(num_steps), device=device)
        self._num_steps = num_steps
        try:
            yield
        finally:
            self._num_steps = None


def _output_width(module: nn.Module) -> int:
    """Width of a time-embedding module's output: its last Linear layer's out_features."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise TypeError(f"cannot find the output width of {type(module).__name__} (no Linear layer)")
    return linears[-1].out_features


class UNetStudent(_StepConditioned):
    """A diffusers `UNet2DConditionModel` as a trainable VE denoiser (its weights are `self.unet`'s).

    `cond` is the UNet's keyword arguments, e.g. {"encoder_hidden_states": ...}, plus SDXL's
    {"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}}; `scheduler_or_alphas` gives the
    discrete schedule (a diffusers scheduler or its alphas_cumprod). The preconditioning is
    `kdistpp.integrations.diffusers.DiffusersUNetDenoiser`'s.
    """

    time_module = "time_embedding"

    def __init__(self, unet: nn.Module, scheduler_or_alphas, prediction_type: str | None = None,
                 step_conditioned: bool = False):
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(f"unet must be a diffusers UNet2DConditionModel, got {type(unet).__name__}")
        self.unet = unet
        self.denoiser = DiffusersUNetDenoiser(unet, scheduler_or_alphas, prediction_type)
        self._setup_step_embedding(unet, step_conditioned)

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None, num_steps=None) -> torch.Tensor:
        with self._steps(num_steps, x.shape[0], x.device):
            return self.denoiser(x, sigma, cond)


class FlowTransformerStudent(_StepConditioned):
    """An SD3 or Flux transformer as a trainable flow denoiser D(x, s, cond) -> x0 (flow coordinates).

    Train it in VE through `FlowAsVE(FlowTransformerStudent(...))`; `cond` is
    `kdistpp.integrations.diffusers.flow_cond(prompt_embeds, pooled_prompt_embeds)`; `guidance` is
    Flux-dev's distilled guidance value (None for schnell and SD3).
    """

    time_module = "time_text_embed"

    def __init__(self, transformer: nn.Module, guidance: float | None = None, kind: str | None = None,
                 step_conditioned: bool = False):
        super().__init__()
        if not isinstance(transformer, nn.Module):
            raise TypeError(f"transformer must be a diffusers SD3 or Flux transformer, got {type(transformer).__name__}")
        self.transformer = transformer
        self.denoiser = DiffusersFlowTransformerDenoiser(transformer, kind=kind, guidance=guidance)
        self._setup_step_embedding(transformer, step_conditioned)

    def forward(self, x: torch.Tensor, s: torch.Tensor, cond: dict | None = None, num_steps=None) -> torch.Tensor:
        with self._steps(num_steps, x.shape[0], x.device):
            return self.denoiser(x, s, cond)


def _cat_cond(a, b):
    """Concatenates two conditioning dicts (nested, as SDXL's added_cond_kwargs) along the batch."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            raise ValueError(f"cond and uncond must have the same keys, got {sorted(a)} and "
                             f"{sorted(b) if isinstance(b, dict) else type(b).__name__}")
        return {k: _cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b.to(a.device, a.dtype).expand(a.shape[0], *b.shape[1:])])


class CFGTeacher:
    """A teacher denoiser D(x, sigma, cond) run with classifier-free guidance against a fixed `uncond`
    (the empty prompt's conditioning, batch 1): U + cond_scale (C - U), one call on a doubled batch.

    SFD distils at cond_scale 1 (the conditional branch alone, one call, `uncond` unused); the
    student is then sampled at any scale (SFD, Sec. 5).
    """

    def __init__(self, teacher, uncond: dict | None = None, cond_scale: float = 1.0):
        if not callable(teacher):
            raise TypeError(f"teacher must be a denoiser D(x, sigma, cond), got {type(teacher).__name__}")
        if cond_scale != 1.0 and uncond is None:
            raise ValueError(f"cond_scale={cond_scale} needs uncond (the empty prompt's conditioning) to guide against")
        self.teacher, self.uncond, self.cond_scale = teacher, uncond, float(cond_scale)

    def __call__(self, x, sigma, cond: dict | None = None, **extra_args):
        if self.cond_scale == 1.0:
            return self.teacher(x, sigma, cond=cond, **extra_args)
        b = x.shape[0]
        sigma = sigma.reshape(-1).expand(b)
        both = self.teacher(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=_cat_cond(cond, self.uncond),
                            **extra_args)
        c, u = both[:b].float(), both[b:].float()
        return (u + self.cond_scale * (c - u)).to(x.dtype)


def coordinates(denoiser) -> str | None:
    """'flow' for a flow network, 've' for a VE one (what the trainer calls: 'flow' in VE form for
    FlowAsVE / flow.VEDenoiser), None where it cannot tell; wrappers are looked through."""
    from ..flow import VEDenoiser
    from .flow import FlowAsVE
    from .lora import LoRATeacher

    if isinstance(denoiser, (CFGTeacher, LoRATeacher)):
        return coordinates(denoiser.teacher if isinstance(denoiser, CFGTeacher) else denoiser.student)
    if isinstance(denoiser, (FlowAsVE, VEDenoiser)):
        return "flow as ve"
    if isinstance(denoiser, FlowTransformerStudent):
        return "flow"
    if isinstance(denoiser, UNetStudent):
        return "ve"
    declared = getattr(parametrization.declared(denoiser), "name", None)  # e.g. kdistpp's diffusers flow adapter
    return "flow" if declared == "flow" else None


def check_pair(student, teacher) -> None:
    """Refuses what SFD cannot train: a flow network called in flow coordinates by the VE trainer, or a
    student and teacher of different parametrizations (a flow teacher with a VE student)."""
    kinds = {"student": coordinates(student), "teacher": coordinates(teacher)}
    for role, kind in kinds.items():
        if kind == "flow":
            raise TypeError(f"the {role} is a flow network: the trainer works in VE sigma, so wrap it: "
                            f"FlowAsVE(...) for the student, kdistpp.flow.VEDenoiser(...) or FlowAsVE(...) for the teacher")
    if None not in kinds.values() and kinds["student"] != kinds["teacher"]:
        names = {"ve": "a VE (UNet) network", "flow as ve": "a flow network"}
        raise ValueError(f"the teacher is {names[kinds['teacher']]} and the student {names[kinds['student']]}: SFD "
                         "trains a student of the teacher's own kind (a copy of it); use one of the same family")


__all__ = ["CFGTeacher", "FlowTransformerStudent", "UNetStudent", "check_pair", "coordinates"]
