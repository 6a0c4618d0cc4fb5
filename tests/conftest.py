"""Shared fixtures: the device is CUDA when present, else CPU; the same suite runs on both."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The webui harnesses chdir into the host tree, as the webuis expect: host paths given relative to the
# directory pytest started in are made absolute once, before any test reads them.
for _host in ("KDISTPP_COMFYUI", "KDISTPP_A1111", "KDISTPP_FORGE"):
    if os.environ.get(_host):
        os.environ[_host] = os.path.abspath(os.environ[_host])

# Tests compare two computations of the same thing; TF32 convolutions/matmuls on Ampere+ GPUs
# differ from float32 by ~1e-3, which no float32 tolerance should absorb.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

settings.register_profile(
    "kdistpp", max_examples=int(os.environ.get("KDISTPP_EXAMPLES", "50")), deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("kdistpp")


def append(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


class ElementwiseDenoiser:
    """A smooth nonlinear denoiser of any shape: a per-element Gaussian posterior mean bent by tanh.

    `bias` shifts its data mean, so two instances with different bias act as student and teacher.
    It counts calls, and records inputs, to check call budgets and arguments.
    """

    def __init__(self, bias: float = 0.0, scale: float = 1.0):
        self.bias, self.scale, self.calls, self.inputs = bias, scale, 0, []

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        self.inputs.append((x, sigma, extra))
        s = append(sigma, x)
        shrink = self.scale**2 / (self.scale**2 + s**2)
        return (self.bias + shrink * (x - self.bias) + 0.1 * torch.tanh(x) * shrink).to(x.dtype)


@pytest.fixture
def device():
    return DEVICE
