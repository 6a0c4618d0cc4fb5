"""SFD with a rectified-flow teacher (kdistpp.sfd.flow): trained in VE sigma, sampled in flow coordinates.

The teacher is the exact flow denoiser of Gaussian data, whose probability-flow ODE has a closed-form
solution, so the converted DPM-Solver++(3M) trajectory can be checked against the flow ODE itself and
against flow-native DDIM (Euler) steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kdistpp
from conftest import DEVICE
from kdistpp import flow
from kdistpp.sfd import (FlowAsVE, SFDConfig, SFDTrainer, dpmpp_3m_trajectory, flow_timestamps, nested_grid, sample_sfd,
                         sample_sfd_flow)

MU = torch.tensor([0.5, -1.0, 0.3, 0.8])
STD = 0.5


def posterior_weight(s, c):
    return (1 - s) * c**2 / ((1 - s) ** 2 * c**2 + s**2)


class GaussianFlow(nn.Module):
    """Exact flow denoiser of x0 ~ N(MU, STD^2 I): D(x, s) = mu + a(s) (x - (1 - s) mu).

    `trainable=True` adds a per-element mean offset and a small MLP g(s) scaling a(s) by exp(g(s)), both
    starting at zero, so the student starts as the teacher (as SFD's copies do) and can learn to
    absorb its own Euler steps' error.
    """

    def __init__(self, trainable: bool = False):
        super().__init__()
        self.trainable = trainable
        if trainable:
            self.offset = nn.Parameter(torch.zeros(len(MU)))
            self.g = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1))
            nn.init.zeros_(self.g[-1].weight)
            nn.init.zeros_(self.g[-1].bias)

    def forward(self, x, s, **extra):
        s = s.to(x.dtype).reshape(-1, 1)
        mu = MU.to(x)
        a = posterior_weight(s, STD)
        if self.trainable:
            mu = mu + self.offset.to(x.dtype)
            a = a * self.g(torch.log(s / (1 - s)).to(self.g[0].weight.dtype)).to(x.dtype).exp()
        return mu + a * (x - (1 - s) * mu)


def exact_flow_ode(x, s_from, s_to):
    """The flow PF-ODE for Gaussian data: (x - (1 - s) mu) / sqrt((1 - s)^2 c^2 + s^2) is constant."""
    mu = MU.to(x)
    r = lambda s: math.sqrt((1 - s) ** 2 * STD**2 + s**2)  # noqa: E731
    return (1 - s_to) * mu + (x - (1 - s_from) * mu) * (r(s_to) / r(s_from))


def flow_ddim(model, x, s_from, s_to, steps):
    """Flow-native DDIM (Euler in flow coordinates) on a fine grid uniform in log(s / (1 - s))."""
    lam = torch.linspace(math.log(s_from / (1 - s_from)), math.log(s_to / (1 - s_to)), steps + 1, dtype=torch.float64)
    s = (lam.exp() / (1 + lam.exp())).to(x.device)
    s[0], s[-1] = s_from, s_to
    return kdistpp.sample_euler_distpp(model, x, s, disable=True, parametrization="flow")


def states_of(sampler, *args, **kwargs):
    """The state at every student timestamp: the callback's x at each step, then the returned state."""
    states = []
    out = sampler(*args, callback=lambda d: states.append(d["x"].clone()), disable=True, **kwargs)
    return states + [out]


def teacher_flow_targets(teacher, z, config):
    """SFD's targets for a flow teacher: the VE 3M trajectory of VEDenoiser(teacher), mapped to flow states."""
    ts = config.timestamps(device=z.device).to(z.dtype)
    ve = dpmpp_3m_trajectory(flow.VEDenoiser(teacher), z * config.sigma_max, nested_grid(ts, config.substeps))
    return [flow.to_flow(y, float(t)) for y, t in zip(ve[:: config.substeps], ts)]


def test_the_converted_teacher_trajectory_is_the_flow_ode_and_flow_ddim_at_the_student_timestamps():
    teacher = GaussianFlow().to(DEVICE)
    z = torch.randn(256, len(MU), generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(DEVICE)
    config = SFDConfig(num_steps=5, substeps=16)
    s = [float(t) / (1 + float(t)) for t in config.timestamps().double()]  # flow s = sigma / (1 + sigma), exact
    assert torch.allclose(flow_timestamps(config).double(), torch.tensor(s, dtype=torch.float64), rtol=1e-6)
    x0 = z * s[0]  # the flow state SFD starts from: unit noise times s_max (sigma_max in VE)
    exact = [exact_flow_ode(x0, s[0], v) for v in s]
    errors = {}
    for k in (16, 32):  # the converted 3M trajectory converges to the flow ODE as the nested grid refines
        targets = teacher_flow_targets(teacher, z, SFDConfig(num_steps=5, substeps=k))
        assert torch.allclose(targets[0], x0, atol=1e-12)
        errors[k] = max(float((t - e).abs().max()) for t, e in zip(targets, exact))
    assert errors[16] < 2e-3 and errors[32] < errors[16] / 4, errors
    targets = teacher_flow_targets(teacher, z, config)
    ddim = x0
    for i in range(1, len(s)):
        ddim = flow_ddim(teacher, ddim, s[i - 1], s[i], 2000)  # first order: 2000 steps per interval
        assert (ddim - exact[i]).abs().max() < 2e-3, i
        assert (targets[i] - ddim).abs().max() < 3e-3, i


@pytest.mark.filterwarnings("ignore:form='eps' scales")  # an identity of the maps, at SFD's first flow step
def test_the_flow_students_ddim_steps_are_its_ve_euler_steps_converted():
    """sample_sfd_flow on the flow network = sample_sfd on FlowAsVE(network), state by state, also with
    Distillation++ (the flow teacher in flow coordinates vs VEDenoiser(teacher) in VE)."""
    torch.manual_seed(0)
    student = GaussianFlow(trainable=True).double().to(DEVICE)
    nn.init.normal_(student.g[-1].weight, std=0.3)
    teacher = GaussianFlow().to(DEVICE)
    config = SFDConfig(num_steps=4)
    z = torch.randn(64, len(MU), generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    ts = config.timestamps().double()
    for guide in ({}, {"w": 0.3}, {"w": 0.3, "form": "eps"}):
        ve_guide, fl_guide = dict(guide), dict(guide)
        if guide:  # the same renoise draw in both runs
            ve_guide.update(teacher=flow.VEDenoiser(teacher), renoise_generator=torch.Generator(DEVICE).manual_seed(5))
            fl_guide.update(teacher=teacher, renoise_generator=torch.Generator(DEVICE).manual_seed(5))
        ve = states_of(sample_sfd, FlowAsVE(student), z * config.sigma_max, config, **ve_guide)
        fl = states_of(sample_sfd_flow, student, z * float(flow_timestamps(config)[0]), config, **fl_guide)
        assert len(ve) == len(fl) == config.num_steps
        for y, x, t in zip(ve, fl, ts):
            torch.testing.assert_close(flow.to_flow(y, float(t)), x, rtol=1e-5, atol=1e-6)


def student_error(student, teacher, config, z):
    targets = teacher_flow_targets(teacher, z, config)
    with torch.no_grad():
        states = states_of(sample_sfd_flow, student, z * float(flow_timestamps(config)[0]), config)
    return sum(float((x - t).abs().mean()) for x, t in zip(states[1:], targets[1:])) / (len(states) - 1)


def test_a_tiny_sfd_run_on_a_flow_teacher_reduces_the_students_error_at_its_timestamps():
    torch.manual_seed(0)
    teacher = GaussianFlow().to(DEVICE)
    student = GaussianFlow(trainable=True).to(DEVICE)  # starts as the teacher, as SFD's copy does
    config = SFDConfig(num_steps=4, lr=1e-2, iterations=60, batch_size=64)
    z = torch.randn(2000, len(MU), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    before = student_error(student, teacher, config, z)
    SFDTrainer(FlowAsVE(student), flow.VEDenoiser(teacher), config, shape=(len(MU),)).fit(progress=False)
    after = student_error(student, teacher, config, z)
    assert after < 0.1 * before, (before, after)  # about 100x smaller on this run


def test_flow_as_ve_declares_ve_to_the_distillation_pp_samplers():
    """FlowAsVE takes VE states and sigmas, so it declares parametrization 've': over a VE schedule that looks
    like a flow one (1.0 down to 0, where an undeclared model warns), a Distillation++ run given no
    parametrization neither warns nor runs as flow, and equals the run told 've'; a flow run of it, or with it
    as the teacher, is refused as for kdistpp.flow.VEDenoiser."""
    import warnings

    torch.manual_seed(0)
    student = GaussianFlow(trainable=True).double().to(DEVICE)
    nn.init.normal_(student.g[-1].weight, std=0.3)
    teacher = GaussianFlow().double().to(DEVICE)
    config = SFDConfig(num_steps=4, sigma_min=0.02, sigma_max=1.0)
    sigmas = torch.cat([config.timestamps().double(), torch.zeros(1, dtype=torch.float64)]).to(DEVICE)
    sigmas[0] = 1.0  # exactly, as flow schedules start
    assert kdistpp.parametrization.looks_like_flow(sigmas.tolist())
    z = torch.randn(16, len(MU), generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    wrapped = FlowAsVE(student)

    def run(model, teacher=flow.VEDenoiser(teacher), **kwargs):
        return kdistpp.sample_euler_distpp(model, z, sigmas, disable=True, teacher=teacher, w=0.3,
                                           renoise_generator=torch.Generator(DEVICE).manual_seed(5), **kwargs)

    def undeclared(model):
        return lambda x, sigma, **extra: model(x, sigma, **extra)

    with pytest.warns(kdistpp.ParametrizationWarning):  # the schedule is one an undeclared model warns on
        run(undeclared(wrapped))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = run(wrapped)
    torch.testing.assert_close(got, run(wrapped, parametrization="ve"), rtol=0, atol=0)
    # what running it as flow (the misreading the declaration prevents) would give instead
    assert not torch.allclose(got, run(undeclared(wrapped), undeclared(flow.VEDenoiser(teacher)), parametrization="flow"))
    with pytest.raises(ValueError, match="parametrization='flow'.*declares parametrization='ve'"):
        run(wrapped, parametrization="flow")
    with pytest.raises(ValueError, match="teacher declares parametrization='ve'.*'flow'"):
        kdistpp.sample_euler_distpp(student, z, flow_timestamps(config).double().to(DEVICE), disable=True,
                                    teacher=FlowAsVE(teacher), w=0.3, parametrization="flow")
