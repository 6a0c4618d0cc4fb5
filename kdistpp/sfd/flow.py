"""SFD for a rectified-flow teacher: train in VE sigma through kdistpp.flow's maps, sample in flow coordinates.

SFD's range sigma_min..sigma_max (finite) is the flow range s_min = flow_sigma(sigma_min) to
s_max = flow_sigma(sigma_max) < 1. The teacher is handed to `SFDTrainer` as `kdistpp.flow.VEDenoiser`
(its DPM-Solver++(3M) trajectory is then solved in y = x / (1 - s)); the student, a flow network,
is wrapped in `FlowAsVE`, a trainable module that calls it on the converted states. The weights that
are trained are the flow network's own, so after training that network *is* the flow student: it
samples with `parametrization='flow'` on the flow timestamps `flow_timestamps(config)`, where a
flow Euler (DDIM) step is exactly the VE Euler step it was trained with, divided by 1 + sigma'.
"""

from __future__ import annotations

import torch
from torch import nn

from ..flow import call_as_ve, flow_sigma, to_ve
from ..samplers import sample_euler_distpp
from .sampling import step_conditioned
from .trainer import SFDConfig
from .trajectory import analytic_denoised


class FlowAsVE(nn.Module):
    """A flow network D(x, s) as a trainable VE denoiser: D(y / (1 + sigma), sigma / (1 + sigma)).

    Pass it as SFDTrainer's student; `flow_model` (its only submodule) holds the trained weights. It
    declares parametrization 've' (it takes VE states and sigmas, as `kdistpp.flow.VEDenoiser`), so the
    Distillation++ samplers run it as VE without being told and refuse a flow run of it.
    """

    parametrization = "ve"  # what the samplers read: a VE denoiser, whatever flow network it wraps

    def __init__(self, flow_model: nn.Module):
        super().__init__()
        self.flow_model = flow_model

    def forward(self, y: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        return call_as_ve(self.flow_model, y, sigma.to(y.dtype), **extra_args)


def flow_timestamps(config: SFDConfig, num_steps: int | None = None, device="cpu") -> torch.Tensor:
    """The student's flow schedule: flow_sigma of config.timestamps(n), from s_max < 1 down to s_min (no zero)."""
    return flow_sigma(config.timestamps(num_steps, device=device).double()).float()


def sfd_flow_denoiser(student, config: SFDConfig, num_steps: int | None = None):
    """The flow student as the samplers call it with parametrization='flow': SFD-v's `num_steps` bound
    in, and AFS's analytic estimate at s_max if trained with `afs=True`."""
    n = config.trained_steps(num_steps)
    model = step_conditioned(student, config, n)
    if not config.afs:
        return model
    s_max = float(flow_timestamps(config, n)[0])

    def first_step_analytic(x, s, **extra_args):  # reads s (a device sync) only when AFS needs it
        first = float(s.reshape(-1)[0]) if torch.is_tensor(s) else float(s)
        if abs(first - s_max) <= 1e-6:
            return analytic_denoised(to_ve(x, s_max), config.sigma_max, config.sigma_data)
        return model(x, s, **extra_args)

    return first_step_analytic


@torch.no_grad()
def sample_sfd_flow(student, x, config: SFDConfig, num_steps: int | None = None, extra_args=None, callback=None,
                    disable=None, *, teacher=None, w=None, **distpp):
    """Flow Euler (DDIM) through the flow student's timestamps, ending at s_min as trained. `x` is unit
    noise times flow_timestamps(config)[0]. With a flow `teacher` and w > 0 the first step is refined
    by Distillation++ (further keywords as in `kdistpp.sample_euler_distpp`). Returns the flow state at
    s_min, which is to_flow of what the VE view of the same student returns at sigma_min."""
    n = config.trained_steps(num_steps)
    s = flow_timestamps(config, n, device=x.device)
    return sample_euler_distpp(sfd_flow_denoiser(student, config, n), x, s, extra_args, callback, disable,
                               teacher=teacher, w=w, parametrization="flow", **distpp)


__all__ = ["FlowAsVE", "flow_timestamps", "sample_sfd_flow", "sfd_flow_denoiser"]
