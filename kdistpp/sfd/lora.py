"""LoRA students (peft): the teacher's weights frozen, low-rank adapters trained, and the teacher
recovered from the same network with its adapters switched off (one copy of the weights in memory).

peft initialises each adapter's up-projection (lora_B) at zero, so a fresh LoRA student is its
teacher exactly; only the adapters' weights (and an SFD-v step embedding) are trained.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

# The attention projections, as diffusers' own LoRA training scripts target them: the same names in
# SD 1.x/SDXL UNets, SD3's and Flux's transformers.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _peft():
    try:
        import peft
    except ImportError as err:  # the runtime dependency is optional: pip install kdistpp[sfd]
        raise ImportError("LoRA students need peft: pip install 'kdistpp[sfd]' (or pip install peft)") from err
    return peft


def add_lora(network: nn.Module, rank: int, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS) -> nn.Module:
    """Adds LoRA adapters of `rank` to `network` (in place) and freezes everything else.

    alpha: peft's lora_alpha (default: rank, so the adapter's scale alpha / rank is 1). Returns the
    network, whose trainable parameters are now the adapters' only.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1 (the LoRA rank), got {rank!r}")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    peft = _peft()
    network.requires_grad_(False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    peft.inject_adapter_in_model(config, network)
    if not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in network.modules()):
        raise ValueError(f"no module of {type(network).__name__} matches target_modules={list(target_modules)}")
    for name, p in network.named_parameters():
        p.requires_grad_("lora_" in name)
    return network


def targeted_paths(network: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS) -> list[str]:
    """The module paths of `network` that `add_lora(..., target_modules)` puts adapters on (peft's rule for a
    list: the name itself or its last dotted parts), without adding any: `network` may be an empty
    skeleton on the meta device."""
    return [name for name, _ in network.named_modules()
            if any(name == t or name.endswith("." + t) for t in target_modules)]


def lora_layers(network: nn.Module) -> list:
    peft = _peft()
    return [m for m in network.modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)]


@contextlib.contextmanager
def adapters_disabled(network: nn.Module):
    """Within the block, `network` runs without its LoRA adapters: the teacher it was made from."""
    layers = lora_layers(network)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield network
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class LoRATeacher:
    """The teacher of a LoRA student: the student's module called with its adapters off (and no SFD-v
    step count), under no_grad. Pass it as `SFDTrainer`'s teacher; it holds no weights of its own."""

    def __init__(self, student: nn.Module):
        if not lora_layers(student):
            raise ValueError("the student has no LoRA adapters (add them with add_lora): its teacher would be itself")
        self.student = student

    @torch.no_grad()
    def __call__(self, x, sigma, **extra_args):
        extra_args.pop("num_steps", None)
        with adapters_disabled(self.student):
            return self.student(x, sigma, **extra_args)


__all__ = ["DEFAULT_TARGETS", "LoRATeacher", "adapters_disabled", "add_lora", "lora_layers",
           "targeted_paths"]
