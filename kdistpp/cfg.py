"""Classifier-free guidance in one batched call, keeping the unconditional estimate for CFG++.

The CFG++ protocol is one attribute: after each call, a student exposes `last_uncond_denoised`,
its unconditional estimate for that call's batch, in the same VE-sigma convention. CFGDenoiser is
the reference implementation; docs/cfg_pp.md shows how A1111's and ComfyUI's CFG adapt to it.
"""

from __future__ import annotations

import torch


def _concat(uncond, cond):
    if isinstance(uncond, torch.Tensor):
        return torch.cat([uncond, cond])
    if isinstance(uncond, dict):
        return {k: _concat(uncond[k], cond[k]) for k in cond}
    raise TypeError(f"cond and uncond must be tensors or dicts of tensors, got {type(uncond).__name__}")


class CFGDenoiser:
    """D = U + scale * (C - U) (Ho & Salimans 2022) with C and U from ONE call on a doubled batch.

    `model(x, sigma, **{cond_key: c}, **extra)` is the conditional denoiser; cond/uncond are
    tensors or dicts of tensors (e.g. SDXL's added conditions) batched along dim 0. cond, uncond
    and cond_scale may also arrive per call as keyword arguments (k-diffusion's extra_args style).
    With uncond None the model is called once and that estimate is also the unconditional one.
    """

    def __init__(self, model, cond=None, uncond=None, cond_scale: float = 1.0, cond_key: str = "cond"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.model, self.cond, self.uncond, self.cond_scale, self.cond_key = model, cond, uncond, cond_scale, cond_key
        self.last_uncond_denoised: torch.Tensor | None = None

    @property
    def parametrization(self):
        """The wrapped model's declared parametrization ('flow' for kdistpp's flow adapters), or None."""
        return getattr(self.model, "parametrization", None)

    def __call__(self, x, sigma, cond=None, uncond=None, cond_scale=None, **extra_args):
        cond = self.cond if cond is None else cond
        uncond = self.uncond if uncond is None else uncond
        scale = self.cond_scale if cond_scale is None else cond_scale
        if uncond is None:
            out = self.model(x, sigma, **{self.cond_key: cond}, **extra_args)
            self.last_uncond_denoised = out
            return out
        both = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), **{self.cond_key: _concat(uncond, cond)},
                          **extra_args)
        u, c = both.chunk(2)
        self.last_uncond_denoised = u
        return u + (c - u) * scale
