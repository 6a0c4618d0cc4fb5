"""Class-conditional toys with exact answers, for Distillation++ with a CFG teacher.

A `ClassMixture` assigns each Gaussian-mixture component to a class. Its conditional denoiser
E[x0 | x, c] is the mixture restricted to class c's components, its unconditional one the whole
mixture, both exact at every sigma, so the CFG teacher U + s (C - U) (Ho & Salimans 2022) is exact
at any scale. Students imitate the *guided* teacher imperfectly, the ways distilled text-to-image
models do: distilled at another guidance scale, dropping modes within a class, blurring classes,
or collapsing their noise estimate (consistency-style). Metrics: the class posterior of a sample
(an exact classifier), and diversity within a class.

Denoisers take `label` (B,) long tensors in extra_args, the VE-sigma convention of kdistpp.toys.
"""

from __future__ import annotations

import torch

from .steps import step_dtype
from .toys import ConsistencyStudent, GaussianMixture


class ClassMixture:
    """Gaussian-mixture components grouped into classes: exact conditional and CFG denoisers."""

    def __init__(self, mixture: GaussianMixture, classes):
        classes = torch.as_tensor(classes, dtype=torch.long)
        if classes.shape != (mixture.n_components,) or int(classes.min()) < 0:
            raise ValueError(f"classes must give one class index >= 0 per component ({mixture.n_components}), "
                             f"got {tuple(classes.shape)}")
        self.mixture, self.classes = mixture, classes
        self.n_classes = int(classes.max()) + 1
        if set(classes.tolist()) != set(range(self.n_classes)):
            raise ValueError("every class index 0..n_classes-1 needs at least one component")

    @property
    def dim(self) -> int:
        return self.mixture.dim

    def _offsets(self, label: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Log-weight offsets (B, K): 0 on the label's components, -inf elsewhere."""
        member = self.classes.to(label.device)[None, :] == label.reshape(-1, 1)
        return torch.where(member, 0.0, float("-inf")).to(like.device, step_dtype(like.dtype))

    def conditional(self, x, sigma, label, **_):
        """E[x0 | x_sigma, class = label]."""
        return self.mixture(x, sigma, cond=self._offsets(label, x))

    def unconditional(self, x, sigma, **_):
        """E[x0 | x_sigma]."""
        return self.mixture(x, sigma)

    def cfg(self, scale: float) -> "CFGTeacher":
        """The CFG denoiser U + scale * (C - U) at this scale."""
        return CFGTeacher(self, scale)

    def class_posterior(self, samples: torch.Tensor) -> torch.Tensor:
        """P(class | x0) under the data distribution, (B, n_classes): an exact classifier."""
        flat = samples.reshape(samples.shape[0], -1).to(step_dtype(samples.dtype))
        r = self.mixture.responsibilities(flat, flat.new_zeros(flat.shape[0]))[0]
        out = flat.new_zeros(flat.shape[0], self.n_classes)
        return out.index_add_(1, self.classes.to(flat.device), r)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None, dtype=torch.float32):
        """Data samples of the given classes (the guidance-free conditional distribution)."""
        weights = self.mixture.weights[None, :] * (self.classes[None, :] == labels.cpu().reshape(-1, 1))
        idx = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        z = torch.randn(len(idx), self.dim, dtype=torch.float64, generator=generator)
        return (self.mixture.means[idx] + self.mixture.stds[idx] * z).to(labels.device, dtype)

    def within_class(self, temperature: float = 1.0, std_scale: float = 1.0) -> "ClassMixture":
        """The same classes with each class's component weights raised to `temperature` (renormalised
        within the class: > 1 drops the class's small modes) and stds scaled."""
        w = self.mixture.weights ** temperature
        for c in range(self.n_classes):
            members = self.classes == c
            w[members] *= self.mixture.weights[members].sum() / w[members].sum()
        return ClassMixture(GaussianMixture(self.mixture.means, self.mixture.stds * std_scale, w), self.classes)


class CFGTeacher:
    """D = U + s (C - U) from the exact denoisers; `last_uncond_denoised` as kdistpp's CFG++ protocol."""

    def __init__(self, problem: ClassMixture, scale: float):
        self.problem, self.scale = problem, float(scale)
        self.last_uncond_denoised = None

    def __call__(self, x, sigma, label, **_):
        u = self.problem.unconditional(x, sigma)
        c = self.problem.conditional(x, sigma, label)
        self.last_uncond_denoised = u
        return u + (c - u) * self.scale


class BlurredClasses:
    """A student that confuses neighbouring classes: its conditional estimate is
    (1 - leak) C(c) + leak C(c + 1), guided at the teacher's scale. (Leaking toward U instead would
    only be weaker guidance.)"""

    def __init__(self, problem: ClassMixture, scale: float, leak: float = 0.4):
        self.problem, self.scale, self.leak = problem, float(scale), float(leak)

    def __call__(self, x, sigma, label, **_):
        u = self.problem.unconditional(x, sigma)
        own = self.problem.conditional(x, sigma, label)
        other = self.problem.conditional(x, sigma, (label + 1) % self.problem.n_classes)
        return u + ((1 - self.leak) * own + self.leak * other - u) * self.scale


def students(problem: ClassMixture, scale: float) -> dict:
    """The imperfect imitations of the CFG teacher at `scale` that the conditional benchmarks use."""
    return {
        "weak guidance": problem.cfg(scale * 0.5),
        "strong guidance": problem.cfg(scale * 1.6),
        "mode dropping": problem.within_class(temperature=3.0, std_scale=0.8).cfg(scale),
        "blurred classes": BlurredClasses(problem, scale, leak=0.4),
        "consistency collapse": ConsistencyStudent(problem.cfg(scale), substeps=2),
    }


def within_class_spread(samples: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean per-class total variance (trace of the covariance) of samples, (n_classes,): diversity,
    so that a sharper student cannot win by collapsing a class."""
    flat = samples.reshape(samples.shape[0], -1).double()
    out = torch.zeros(n_classes, dtype=torch.float64)
    for c in range(n_classes):
        members = flat[labels.cpu() == c]
        if len(members) > 1:
            out[c] = members.var(0).sum()
    return out


def class_rings(n_classes: int = 4, modes_per_class: int = 3, dim: int = 2, radius: float = 4.0, std: float = 0.4,
                seed: int = 0) -> ClassMixture:
    """n_classes * modes_per_class modes on a ring, classes interleaved (neighbouring modes belong to
    different classes, so guidance matters), unequal weights within each class."""
    from .toys import ring_mixture

    base = ring_mixture(n_classes * modes_per_class, radius, std, dim, seed)
    classes = torch.arange(n_classes * modes_per_class) % n_classes
    return ClassMixture(base, classes)
