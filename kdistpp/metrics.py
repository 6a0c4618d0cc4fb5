"""Distribution distances between two sample sets (N, ...) flattened to (N, dim)."""

from __future__ import annotations

import numpy as np
import torch


def _flat(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1).double()


def sliced_wasserstein(a, b, n_projections: int = 256, p: int = 2, seed: int = 0) -> float:
    """Sliced Wasserstein-p distance (Rabin et al. 2011): the 1-D W_p over random unit directions,
    averaged in the p-th power, then the p-th root. Unequal sample counts compare quantiles."""
    a, b = _flat(a), _flat(b).to(_flat(a).device)
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], n_projections, generator=g, dtype=torch.float64).to(a.device)
    directions /= directions.norm(dim=0, keepdim=True)
    pa, pb = (a @ directions).sort(0).values, (b @ directions).sort(0).values
    if pa.shape[0] != pb.shape[0]:
        q = torch.linspace(0, 1, max(pa.shape[0], pb.shape[0]), dtype=torch.float64, device=a.device)
        pa, pb = torch.quantile(pa, q, dim=0), torch.quantile(pb, q, dim=0)
    return float(((pa - pb).abs() ** p).mean() ** (1 / p))


def energy_distance(a, b, max_samples: int = 4000) -> float:
    """Energy distance (Székely & Rizzo 2013) 2E|X-Y| - E|X-X'| - E|Y-Y'|, V-statistic form
    (zero iff the samples coincide). Uses at most `max_samples` of each set."""
    a, b = _flat(a)[:max_samples], _flat(b)[:max_samples]
    b = b.to(a.device)
    return float(2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean())


def frechet_distance(a, b) -> float:
    """Fréchet distance between Gaussian fits (the FID formula, Heusel et al. 2017):
    |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    import scipy.linalg  # here, not at import: keeps `import kdistpp` light

    a, b = _flat(a).cpu().numpy(), _flat(b).cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def mode_weight_error(samples, mixture) -> float:
    """Total variation between the mixture's weights and the fraction of samples nearest each mode."""
    return float(0.5 * (mixture.mode_weights(samples) - mixture.weights).abs().sum())


def all_metrics(samples, reference, mixture=None) -> dict[str, float]:
    """The table columns: sliced W2, energy distance, Fréchet distance, and mode-weight TV."""
    out = {
        "sliced_w2": sliced_wasserstein(samples, reference),
        "energy": energy_distance(samples, reference),
        "frechet": frechet_distance(samples, reference),
    }
    if mixture is not None:
        out["mode_tv"] = mode_weight_error(samples, mixture)
    return out
