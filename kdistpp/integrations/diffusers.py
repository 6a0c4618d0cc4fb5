"""diffusers UNets (VE-sigma form) and flow transformers (SD3/3.5, Flux; flow form) as kdistpp
denoisers, with CFG in one batched call.

    student = unet_denoiser(lightning_unet, scheduler, cond=c)                      # cfg 1, one call
    teacher = unet_denoiser(base_unet, scheduler, cond=c, uncond=u, cond_scale=5.0)  # CFG, one call
    x = kdistpp.sample_euler_distpp(student, noise * sigmas[0], sigmas, teacher=teacher, w=0.3)

A discrete-time DDPM model sees x_t = sqrt(a) x0 + sqrt(1 - a) eps; in VE form x = x_t / sqrt(a),
sigma = sqrt((1 - a) / a) (Karras et al. 2022, Table 1, "VP" column). diffusers itself is not
imported here: only the UNet's call convention and the scheduler's `alphas_cumprod` are used.

Flow transformers (`flow_transformer_denoiser`, `flow_sigmas`) predict a velocity v = n - x0 on the
state x = (1 - s) x0 + s n, so x0 = x - s v; they run with `parametrization='flow'` on the pipeline's
own flow sigmas. See docs/diffusers.md.
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

    parametrization = "ve"

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


# ---------------------------------------------------------------------------------------------------
# Flow transformers: SD3 / SD3.5 (SD3Transformer2DModel) and Flux (FluxTransformer2DModel)

FLOW_KINDS = ("sd3", "flux")
_COND_KEYS = ("encoder_hidden_states", "pooled_projections")


def flow_transformer_kind(transformer) -> str:
    """'flux' or 'sd3', read from the transformer's config (Flux's has `guidance_embeds`, SD3's
    `caption_projection_dim`)."""
    config = getattr(transformer, "config", None)
    if config is None:
        raise TypeError(f"transformer must be a diffusers SD3Transformer2DModel or FluxTransformer2DModel (with a "
                        f".config), got {type(transformer).__name__}")
    if "guidance_embeds" in config:
        return "flux"
    if "caption_projection_dim" in config:
        return "sd3"
    raise TypeError(f"cannot tell whether {type(transformer).__name__} is an SD3 or a Flux transformer; "
                    f"pass kind='sd3' or kind='flux'")


def flow_cond(prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor) -> dict:
    """The `cond` (or `uncond`) dict of a flow transformer from a pipeline's `encode_prompt` outputs."""
    return {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}


def _check_cond(name: str, cond) -> None:
    if not isinstance(cond, dict) or set(cond) != set(_COND_KEYS):
        got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
        raise TypeError(f"{name} must be a dict with exactly the keys {list(_COND_KEYS)} (the pipeline's "
                        f"prompt_embeds and pooled_prompt_embeds; build it with flow_cond), got {got}")
    for key in _COND_KEYS:
        if not torch.is_tensor(cond[key]):
            raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(cond[key]).__name__}")
    if cond["encoder_hidden_states"].ndim != 3 or cond["pooled_projections"].ndim != 2:
        raise ValueError(f"{name}: encoder_hidden_states must be (batch, tokens, dim) and pooled_projections "
                         f"(batch, dim), got {tuple(cond['encoder_hidden_states'].shape)} and "
                         f"{tuple(cond['pooled_projections'].shape)}")
    if cond["encoder_hidden_states"].shape[0] != cond["pooled_projections"].shape[0]:
        raise ValueError(f"{name}: encoder_hidden_states and pooled_projections have different batch sizes")


def pack_flux_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as Flux's token sequence (B, H/2 * W/2, 4C): each 2x2 patch is one token,
    its features ordered channel-major, then row, then column within the patch."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_flux_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_flux_latents` for latents of height x width (the latent's own size)."""
    b, _, features = tokens.shape
    c = features // 4
    patches = tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, c, height, width)


def _flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Flux's position ids of the packed image tokens: (0, row, column) of each 2x2 patch, row-major."""
    rows = torch.arange(height // 2, device=device).repeat_interleave(width // 2)
    cols = torch.arange(width // 2, device=device).repeat(height // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class DiffusersFlowTransformerDenoiser:
    """D(x, s, cond) -> x0 for an SD3/SD3.5 or Flux transformer, in flow coordinates.

    x is the (B, C, H, W) latent at flow sigma s (Flux latents unpacked, as the VAE sees them: this
    packs them into tokens and adds the position ids itself); `cond` is `flow_cond(prompt_embeds,
    pooled_prompt_embeds)`. The transformer gets what its diffusers pipeline passes at that sigma:
    SD3 the timestep s * num_train_timesteps, Flux that timestep rounded to the model dtype and
    divided by 1000, and Flux-dev's distilled `guidance` as a per-sample vector. Its velocity v
    gives x0 = x - s v, computed and returned in float32 (x's dtype when wider), so that CFG on two
    estimates combines in float32 for a bf16/fp16 latent; the transformer runs in its own dtype.
    """

    parametrization = "flow"  # the samplers run it in flow coordinates without being told

    def __init__(self, transformer, kind: str | None = None, guidance: float | None = None,
                 num_train_timesteps: int = 1000):
        if not callable(transformer):
            raise TypeError(f"transformer must be callable (a diffusers SD3Transformer2DModel or "
                            f"FluxTransformer2DModel), got {type(transformer).__name__}")
        kind = flow_transformer_kind(transformer) if kind is None else kind
        if kind not in FLOW_KINDS:
            raise ValueError(f"kind must be one of {FLOW_KINDS}, got {kind!r}")
        config = getattr(transformer, "config", None)
        guidance_embeds = bool(getattr(config, "guidance_embeds", False)) if config is not None else False
        if kind == "sd3" and guidance is not None:
            raise ValueError("SD3 transformers have no guidance input: guide them with uncond and cond_scale (CFG)")
        if kind == "flux" and guidance_embeds and guidance is None:
            raise ValueError("this Flux transformer is guidance-distilled (config.guidance_embeds, e.g. FLUX.1-dev): "
                             "pass its distilled guidance, e.g. guidance=3.5")
        if kind == "flux" and not guidance_embeds and guidance is not None:
            raise ValueError("this Flux transformer has no guidance input (config.guidance_embeds is False, e.g. "
                             "FLUX.1-schnell): pass guidance=None")
        if not num_train_timesteps > 0:
            raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}")
        self.transformer, self.kind, self.guidance = transformer, kind, guidance
        self.num_train_timesteps = num_train_timesteps
        self.in_channels = getattr(config, "in_channels", None) if config is not None else None

    def _check_latent(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            hint = " (unpack Flux token latents with unpack_flux_latents)" if x.ndim == 3 else ""
            raise ValueError(f"x must be a (batch, channels, height, width) latent{hint}, got shape {tuple(x.shape)}")
        channels = x.shape[1] * (4 if self.kind == "flux" else 1)
        if self.in_channels is not None and channels != self.in_channels:
            raise ValueError(f"the {self.kind} transformer takes {self.in_channels} input channels, but a latent "
                             f"of shape {tuple(x.shape)} gives it {channels}")
        if self.kind == "flux" and (x.shape[2] % 2 or x.shape[3] % 2):
            raise ValueError(f"Flux latents need an even height and width (2x2 patches), got {tuple(x.shape)}")

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict | None = None,
                 **transformer_kwargs) -> torch.Tensor:
        self._check_latent(x)
        _check_cond("cond", cond)
        if cond["encoder_hidden_states"].shape[0] != x.shape[0]:
            raise ValueError(f"cond has batch {cond['encoder_hidden_states'].shape[0]}, the latent "
                             f"{x.shape[0]}: encode one prompt per sample")
        b, _, h, w = x.shape
        dtype = getattr(self.transformer, "dtype", x.dtype)
        sigma = sigma.reshape(-1).to(x.device, torch.float32).expand(b)
        x32 = x.float()
        timestep = sigma * self.num_train_timesteps
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype),
                  "pooled_projections": cond["pooled_projections"].to(dtype), **transformer_kwargs}
        if self.kind == "flux":
            kwargs["txt_ids"] = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=dtype)
            kwargs["img_ids"] = _flux_image_ids(h, w, x.device, dtype)
            kwargs["guidance"] = (None if self.guidance is None else
                                  torch.full((b,), float(self.guidance), device=x.device, dtype=torch.float32))
            hidden = pack_flux_latents(x.to(dtype))  # no copy when x is already in the model's dtype
            timestep = timestep.to(dtype) / 1000  # as FluxPipeline rounds it: in the latents' dtype
        else:
            hidden = x.to(dtype)
        out = self.transformer(hidden_states=hidden, timestep=timestep, return_dict=False, **kwargs)[0]
        if self.kind == "flux":
            out = unpack_flux_latents(out, h, w)
        v = out.float()
        # x0 stays in float32 (or x's dtype when wider): the CFG that combines two of these, and the
        # sampler's step, then run in float32 too; rounding x0 to a bf16 latent's dtype here would
        # put a bf16 rounding on every estimate on top of the transformer's own.
        return (x32 - sigma.reshape(-1, 1, 1, 1) * v).to(torch.promote_types(x.dtype, torch.float32))


def flow_transformer_denoiser(transformer, cond: dict, uncond: dict | None = None, cond_scale: float = 1.0,
                              guidance: float | None = None, kind: str | None = None,
                              num_train_timesteps: int = 1000) -> CFGDenoiser:
    """An SD3/SD3.5 or Flux transformer as a kdistpp student or teacher, D(x, s) -> x0 in flow coordinates
    (sample with `parametrization='flow'` on `flow_sigmas`).

    cond/uncond: `flow_cond(prompt_embeds, pooled_prompt_embeds)`. With `uncond`, CFG `U + scale (C - U)`
    runs as one call on a doubled batch (the SD3.5 teacher; CFG on x0 equals the pipeline's CFG on v).
    `guidance` is Flux-dev's distilled guidance (an input of the model, no second batch); schnell and
    SD3 take None. A student distilled without CFG (SD3.5 Turbo, schnell) takes uncond=None: one call.
    """
    denoiser = DiffusersFlowTransformerDenoiser(transformer, kind=kind, guidance=guidance,
                                                num_train_timesteps=num_train_timesteps)
    _check_cond("cond", cond)
    if uncond is None:
        if cond_scale != 1.0:
            raise ValueError(f"cond_scale={cond_scale} needs an uncond (negative prompt) to guide against; "
                             "pass uncond=flow_cond(negative_prompt_embeds, negative_pooled_prompt_embeds)")
    else:
        _check_cond("uncond", uncond)
        for key in _COND_KEYS:
            if uncond[key].shape != cond[key].shape:
                raise ValueError(f"cond and uncond must have the same shapes to share one batched call; "
                                 f"{key}: {tuple(cond[key].shape)} vs {tuple(uncond[key].shape)} (pad or encode "
                                 f"both prompts to the same max_sequence_length)")
    return CFGDenoiser(denoiser, cond=cond, uncond=uncond, cond_scale=cond_scale)


def flow_sigmas(scheduler, num_inference_steps: int, kind: str, image_seq_len: int | None = None,
                mu: float | None = None, device="cpu") -> torch.Tensor:
    """The flow sigmas the SD3 or Flux pipeline runs with `num_inference_steps`, ending in 0, as a kdistpp schedule.

    Calls `set_timesteps` on a copy of `scheduler` (a FlowMatchEulerDiscreteScheduler; the caller's is not
    changed) with what the pipeline passes: Flux asks for t = 1, (n-1)/n, ..., 1/n and always passes
    its resolution shift mu; SD3 asks for n steps and passes mu only for a scheduler with dynamic
    shifting. mu, when needed and not given, comes from `image_seq_len`, the image's token count:
    (latent height / 2) * (latent width / 2) for both (`kdistpp.flow.flux_mu`, with the scheduler's
    base/max shift and sequence lengths; the defaults differ: max_shift 1.15 for Flux, 1.16 for SD3).
    The scheduler's static shift, shift_terminal and karras/exponential/beta options apply as in the pipeline.
    """
    import copy

    import numpy as np

    from ..flow import flux_mu

    if kind not in FLOW_KINDS:
        raise ValueError(f"kind must be one of {FLOW_KINDS}, got {kind!r}")
    if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
    config = getattr(scheduler, "config", None)
    if config is None or not hasattr(scheduler, "set_timesteps"):
        raise TypeError(f"scheduler must be a diffusers FlowMatchEulerDiscreteScheduler, "
                        f"got {type(scheduler).__name__}")
    if config.get("invert_sigmas", False):
        raise ValueError("a scheduler with invert_sigmas runs from s = 0 to 1; kdistpp's flow samplers need "
                         "sigmas descending to 0")
    n = int(num_inference_steps)
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if mu is None and (kind == "flux" or dynamic):
        if image_seq_len is None:
            raise ValueError(f"the {kind} pipeline shifts its schedule by the image size: pass image_seq_len "
                             "((latent height / 2) * (latent width / 2)) or mu")
        mu = flux_mu(image_seq_len, base_shift=config.get("base_shift", 0.5),
                     max_shift=config.get("max_shift", 1.15 if kind == "flux" else 1.16),
                     base_seq_len=config.get("base_image_seq_len", 256),
                     max_seq_len=config.get("max_image_seq_len", 4096))
    scheduler = copy.deepcopy(scheduler)
    kwargs = {} if mu is None else {"mu": mu}
    if kind == "flux" and not config.get("use_flow_sigmas", False):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), **kwargs)
    else:
        scheduler.set_timesteps(n, **kwargs)
    sigmas = torch.as_tensor(scheduler.sigmas).float()
    if sigmas[-1] != 0 or not bool((sigmas[:-1] > 0).all()):
        raise ValueError(f"the scheduler gave sigmas {sigmas.tolist()}, not a schedule descending to 0")
    return sigmas.to(device)
