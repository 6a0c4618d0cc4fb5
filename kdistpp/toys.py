"""Toy problems with exact answers: a Gaussian-mixture teacher and students with realistic errors.

All denoisers follow the VE-sigma convention D(x, sigma, **extra) -> E[x0 | x], take x of shape
(B, *event) with prod(event) = dim, work on any device and dtype (math in float32 or better), and
return x's dtype.
"""

from __future__ import annotations

import math

import torch

from .steps import append_dims, step_dtype


class GaussianMixture:
    """p0 = sum_k pi_k N(mu_k, diag(s_k^2)); its exact denoiser at every noise level sigma.

    Noised by sigma, the mixture stays a mixture with variances s_k^2 + sigma^2, so
    D(x, sigma) = sum_k r_k(x, sigma) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
    r_k = posterior responsibility of component k. An optional `cond` (B, K) adds per-sample
    log-weight offsets: a class-conditional denoiser for CFG tests and demos.
    """

    def __init__(self, means, stds, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be (K, dim), got shape {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 0:
            stds = stds.expand(k, d)
        elif stds.ndim == 1 and stds.shape[0] == k:
            stds = stds[:, None].expand(k, d)
        if stds.shape != (k, d) or not bool((stds > 0).all()):
            raise ValueError(f"stds must be positive, one per component (K,) or per dimension (K, dim); got {tuple(stds.shape)}")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not bool((weights > 0).all()):
            raise ValueError(f"weights must be K={k} positive numbers, got {weights}")
        self.means, self.stds, self.weights = means, stds.contiguous(), weights / weights.sum()
        self._cache: dict = {}

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def _params(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device, dtype) for t in (self.means, self.stds**2, self.weights.log()))
        return self._cache[key]

    def responsibilities(self, x, sigma, cond=None):
        """r_k(x, sigma) = P(component k | x) for flattened x (B, dim) and sigma (B,)."""
        means, var0, log_w = self._params(x.device, x.dtype)
        var = var0[None] + sigma.reshape(-1, 1, 1) ** 2  # (B, K, dim)
        diff = x[:, None, :] - means[None]
        logp = -0.5 * ((diff**2 / var) + var.log()).sum(-1) + log_w[None]
        if cond is not None:
            logp = logp + cond.to(logp.dtype)
        return torch.softmax(logp, dim=-1), var0, var, diff

    def __call__(self, x, sigma, cond=None, **_):
        """The exact denoiser E[x0 | x_sigma] (extra keyword arguments are accepted and ignored)."""
        flat = x.reshape(x.shape[0], -1).to(step_dtype(x.dtype))
        sigma = sigma.to(flat).reshape(-1).expand(flat.shape[0])
        r, var0, var, diff = self.responsibilities(flat, sigma, cond)
        means = self._params(flat.device, flat.dtype)[0]
        per_component = means[None] + var0[None] / var * diff
        return (r[..., None] * per_component).sum(1).reshape(x.shape).to(x.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None, device="cpu", dtype=torch.float32):
        """n samples of the data distribution (drawn on the CPU generator, then moved)."""
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self.means[idx] + self.stds[idx] * z).to(device, dtype)

    def mode_weights(self, samples: torch.Tensor) -> torch.Tensor:
        """Fraction of samples whose most likely component (at sigma 0) is each k."""
        flat = samples.reshape(samples.shape[0], -1).to(step_dtype(samples.dtype))
        r = self.responsibilities(flat, flat.new_zeros(flat.shape[0]))[0]
        counts = torch.bincount(r.argmax(-1).cpu(), minlength=self.n_components)
        return counts.double() / counts.sum()

    def biased(self, temperature: float = 2.0, std_scale: float = 0.7) -> "GaussianMixture":
        """The same modes with weights pi^temperature (renormalised) and stds shrunk: a mode-seeking
        student, as adversarial / distribution-matching distillation tends to produce."""
        return GaussianMixture(self.means, self.stds * std_scale, self.weights**temperature)


def ring_mixture(n_modes: int = 8, radius: float = 4.0, std: float = 0.35, dim: int = 2, seed: int = 0):
    """n_modes on a circle in the first two coordinates (random directions above 2-D), unequal weights."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    means = torch.zeros(n_modes, dim, dtype=torch.float64)
    means[:, 0], means[:, 1] = radius * angles.cos(), radius * angles.sin()
    if dim > 2:
        rotation, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=g))
        means = means @ rotation.T
    weights = torch.linspace(1.0, 3.0, n_modes, dtype=torch.float64)
    return GaussianMixture(means, std, weights)


def _karras_ramp(sigma_hi, sigma_lo, n: int, rho: float = 7.0):
    """n + 1 sigmas from sigma_hi down to sigma_lo (per batch element), evenly spaced in sigma**(1/rho)."""
    hi, lo = sigma_hi ** (1 / rho), sigma_lo ** (1 / rho)
    return [(hi + (lo - hi) * (k / n)) ** rho for k in range(n + 1)]


def _euler_flow(teacher, x, sigma, target, substeps: int, extra):
    """The teacher's probability-flow ODE from sigma to target (per-sample) in `substeps` Euler steps."""
    levels = _karras_ramp(sigma, target, substeps)
    for s, s_next in zip(levels, levels[1:]):
        d = (x - teacher(x, s, **extra)) / append_dims(s, x.ndim)
        x = x + d * append_dims(s_next - s, x.ndim)
    return x


class ProgressiveStudent:
    """Progressive-distillation-like student (Salimans & Ho 2022; SDXL-Lightning).

    At sigma it targets the teacher's ODE flow to the next sigma of its own schedule, as an Euler
    step would take it: D_s = x - sigma * (x_next - x) / (sigma_next - sigma). The flow is
    computed with `substeps` Euler steps of the teacher, too few to be exact: that is the
    student's distillation error. sigma_next is the largest schedule sigma below sigma (or 0).
    """

    def __init__(self, teacher, schedule: torch.Tensor, substeps: int = 2):
        self.teacher, self.substeps = teacher, substeps
        self.schedule = torch.as_tensor(schedule, dtype=torch.float64).flatten().sort().values

    def __call__(self, x, sigma, **extra):
        xs = x.to(step_dtype(x.dtype))
        sigma = sigma.to(xs).reshape(-1).expand(xs.shape[0])
        sched = self.schedule.to(xs)
        below = torch.searchsorted(sched, sigma, right=False) - 1  # largest schedule sigma < sigma
        target = torch.where(below >= 0, sched[below.clamp(min=0)], torch.zeros_like(sigma))
        x_next = _euler_flow(self.teacher, xs, sigma, target, self.substeps, extra)
        out = xs - append_dims(sigma / (target - sigma), xs.ndim) * (x_next - xs)
        return out.to(x.dtype)


class ConsistencyStudent:
    """Consistency-model-like student (Song et al. 2023; LCM, DMD2): predicts the ODE endpoint
    directly, from the teacher's flow to sigma_min in `substeps` Euler steps. Its error grows with
    sigma and compounds over multistep sampling, like a real consistency model's."""

    def __init__(self, teacher, substeps: int = 2, sigma_min: float = 0.002):
        self.teacher, self.substeps, self.sigma_min = teacher, substeps, sigma_min

    def __call__(self, x, sigma, **extra):
        xs = x.to(step_dtype(x.dtype))
        sigma = sigma.to(xs).reshape(-1).expand(xs.shape[0])
        target = torch.minimum(sigma, torch.full_like(sigma, self.sigma_min))
        end = _euler_flow(self.teacher, xs, sigma, target, self.substeps, extra)
        return self.teacher(end, target, **extra).to(x.dtype)  # last tiny denoise to sigma 0


def mode_biased_student(mixture: GaussianMixture, temperature: float = 2.0, std_scale: float = 0.7):
    """A mis-specified student: the exact denoiser of mixture.biased(...) (over-weights big modes)."""
    return mixture.biased(temperature, std_scale)
