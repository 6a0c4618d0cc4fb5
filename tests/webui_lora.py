"""LoRA files in the webuis' format, and each UNet call checked against the UNet evaluated with known weights.

A LoRA here is what kohya's trainer writes for an SD1 UNet: for each chosen Linear layer `L` of the
checkpoint (compvis names), `lora_unet_<L>.lora_down.weight` (rank x in), `.lora_up.weight`
(out x rank) and `.alpha`; the webuis add `multiplier * alpha / rank * up @ down` to the layer's weight.
The expected weights are computed here from the files alone, not by the webuis' code.
"""

from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "model.diffusion_model."
RANK = 4


def lora_layers(state: dict) -> list[str]:
    """The UNet's attention projections (Linear weights of its transformer blocks), as checkpoint keys."""
    return sorted(k for k, v in state.items() if k.startswith(PREFIX) and ".transformer_blocks." in k
                  and ".attn" in k and k.endswith(".weight") and v.ndim == 2)


def make_lora(checkpoint: Path, path: Path, seed: int = 7, strength: float = 1.5, layers=lora_layers) -> dict:
    """Writes a kohya-format LoRA for the checkpoint's UNet to `path`; returns {layer key: delta at multiplier 1}.
    `layers(state)` picks the checkpoint keys of the Linear weights it patches."""
    import safetensors.torch

    state = safetensors.torch.load_file(str(checkpoint))
    g = torch.Generator().manual_seed(seed)
    lora, deltas = {}, {}
    for key in layers(state):
        out_features, in_features = state[key].shape
        name = "lora_unet_" + key[len(PREFIX):-len(".weight")].replace(".", "_")
        down = torch.randn(RANK, in_features, generator=g) / in_features ** 0.5
        up = torch.randn(out_features, RANK, generator=g) * strength / RANK ** 0.5
        alpha = torch.tensor(float(RANK) / 2)
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha})
        deltas[key] = (alpha / RANK) * (up @ down)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in lora.items()}, str(path))
    return deltas


def unet_state(checkpoint: Path, deltas: dict | None = None) -> dict:
    """The checkpoint's UNet weights (float32, UNet-relative names), with the LoRA deltas added when given."""
    import safetensors.torch

    state = safetensors.torch.load_file(str(checkpoint))
    unet = {k[len(PREFIX):]: v.float() for k, v in state.items() if k.startswith(PREFIX)}
    for key, delta in (deltas or {}).items():
        unet[key[len(PREFIX):]] = unet[key[len(PREFIX):]] + delta
    return unet


class Calls:
    """Every forward of a UNet module: its inputs and output, in order."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output):
        self.calls.append(([a.detach().clone() if torch.is_tensor(a) else a for a in args],
                           {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()},
                           output.detach().clone()))

    def remove(self):
        self.handle.remove()


def which_weights(calls, references: dict, evaluate) -> list[str]:
    """For each recorded call, the name of the reference UNet that reproduces its output (or '?').

    `evaluate(unet, args, kwargs)` runs a reference UNet on a call's recorded inputs."""
    names = []
    with torch.no_grad():
        for args, kwargs, output in calls:
            errors = {name: (evaluate(unet, args, kwargs).float() - output.float()).abs().max().item()
                      for name, unet in references.items()}
            scale = output.float().abs().max().item()
            best = min(errors, key=errors.get)
            others = [e for n, e in errors.items() if n != best]
            # the match must be tight, and the other weights clearly off, or the call proves nothing
            names.append(best if errors[best] <= 1e-3 * scale and all(e > 1e-2 * scale for e in others) else "?")
    return names
