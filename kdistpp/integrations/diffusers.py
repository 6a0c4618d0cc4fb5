"""diffusers UNets as kdistpp denoisers (VE-sigma form), with CFG in one batched call.

    student = unet_denoiser(lightning_unet, scheduler, cond=c)                      # cfg 1, one call
    teacher = unet_denoiser(base_unet, scheduler, cond=c, uncond=u, cond_scale=5.0)  # CFG, one call
    x = kdistpp.sample_euler_distpp(student, noise * sigmas[0], sigmas, teacher=teacher, w=0.3)

A discrete-time DDPM model sees x_t = sqrt(a) x0 + sqrt(1 - a) eps; in VE form x = x_t / sqrt(a),
sigma = sqrt((1 - a) / a) (Karras et al. 2022, Table 1, "VP" column). diffusers itself is not
imported here: only the UNet's call convention and the scheduler's `alphas_cumprod` are used.
"""

from __future__ import annotations

import torch

from ..cfg import CFGDenoiser

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _alphas_cumprod(scheduler_or_alphas) -> torch.Tensor:
    if torch.is_tensor(scheduler_or_alphas):
        return scheduler_or_alphas.detach().double().cpu()
    alphas = getattr(scheduler_or_alphas, "alphas_cumprod", None)
    if alphas is None:
        raise TypeError("pass a diffusers scheduler (with .alphas_cumprod) or the alphas_cumprod tensor itself")
    return torch.as_tensor(alphas).double().cpu()


class DiffusersUNetDenoiser:
    """D(x, sigma, cond) for a diffusers UNet2DConditionModel trained on discrete DDPM timesteps.

    `cond` is a dict of the UNet's keyword arguments, e.g. {"encoder_hidden_states": ...} for SD 1.x
    or additionally {"added_cond_kwargs": {"text_embeds": ..., "time_ids": ...}} for SDXL (see
    `sdxl_time_ids`). sigma maps to a fractional timestep by linear interpolation in log sigma,
    which is exact at the training timesteps. Step arithmetic is float32; the UNet runs in its dtype.
    """

    def __init__(self, unet, scheduler_or_alphas, prediction_type: str | None = None):
        if not callable(unet):
            raise TypeError(f"unet must be callable (a diffusers UNet2DConditionModel), got {type(unet).__name__}")
        self.unet = unet
        alphas = _alphas_cumprod(scheduler_or_alphas)
        self.sigmas = ((1 - alphas) / alphas).sqrt()  # ascending in t
        self.log_sigmas = self.sigmas.log()
        config = getattr(scheduler_or_alphas, "config", None)
        prediction_type = prediction_type or getattr(config, "prediction_type", None) or "epsilon"
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional DDPM timestep of each sigma (log-sigma interpolation between training timesteps)."""
        log_sigma = sigma.detach().double().cpu().clamp(self.sigma_min, self.sigma_max).log()
        idx = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)
        lo, hi = self.log_sigmas[idx - 1], self.log_sigmas[idx]
        frac = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1 + frac).to(sigma.device, torch.float32)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).cpu()
        lo = t.floor().long().clamp(0, len(self.sigmas) - 1)
        hi = (lo + 1).clamp(max=len(self.sigmas) - 1)
        frac = t - lo
        return ((1 - frac) * self.log_sigmas[lo] + frac * self.log_sigmas[hi]).exp().float()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None, **unet_kwargs) -> torch.Tensor:
        sigma = sigma.reshape(-1).to(x.device, torch.float32)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        x32 = x.float()
        dtype = getattr(self.unet, "dtype", x.dtype)
        model_in = (x32 / (s**2 + 1).sqrt()).to(dtype)
        kwargs = {**(cond or {}), **unet_kwargs}
        out = self.unet(model_in, self.sigma_to_t(sigma), **kwargs)
        out = (out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out).float()
        if self.prediction_type == "epsilon":
            denoised = x32 - s * out
        elif self.prediction_type == "v_prediction":
            denoised = x32 / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
        else:
            denoised = out
        return denoised.to(x.dtype)


def unet_denoiser(unet, scheduler_or_alphas, cond: dict | None = None, uncond: dict | None = None,
                  cond_scale: float = 1.0, prediction_type: str | None = None) -> CFGDenoiser:
    """A UNet as a kdistpp student or teacher: CFG `U + scale (C - U)` from one call on a doubled batch.

    Students distilled at cfg 1 (Lightning, DMD2, LCM, Hyper-SD) take `uncond=None`: one call per
    step. The result keeps `last_uncond_denoised`, so it also works with `cfg_pp=True`.
    """
    return CFGDenoiser(DiffusersUNetDenoiser(unet, scheduler_or_alphas, prediction_type), cond=cond, uncond=uncond,
                       cond_scale=cond_scale)


def sdxl_time_ids(height: int, width: int, batch: int, crop_top_left=(0, 0), original_size=None, device="cpu",
                  dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, Sec. 2.2): original size, crop corner, target size."""
    original = original_size or (height, width)
    ids = torch.tensor([[*original, *crop_top_left, height, width]], device=device, dtype=dtype)
    return ids.expand(batch, 6)


def sigmas_at_timesteps(denoiser: DiffusersUNetDenoiser, timesteps) -> torch.Tensor:
    """A k-diffusion schedule (with the final zero) through given DDPM timesteps, e.g. SDXL-Lightning's
    trailing 4-step [999, 749, 499, 249]."""
    sig = denoiser.t_to_sigma(torch.as_tensor(timesteps, dtype=torch.float64))
    return torch.cat([sig, sig.new_zeros(1)])
