"""A trained LoRA student as a file the hosts load: kohya-named `.safetensors` for SD 1.x/SDXL UNets
(ComfyUI's LoRA loaders, A1111/Forge's `<lora:name:1>`, diffusers' `load_lora_weights`), peft-named
for Flux/SD3 transformers; or the merged weights as a full diffusers-format UNet/transformer.

Kohya names use the original (ldm) UNet's module paths, `lora_unet_<path with _>`, with
`.lora_down.weight` (peft's lora_A), `.lora_up.weight` (lora_B) and a float `.alpha`: every host
scales the product by alpha / rank, as peft does with lora_alpha / r. ldm paths, not diffusers',
because A1111 maps only those for every layer. SD3 files carry no alpha (diffusers' SD3 loader refuses
one): their lora_B holds the alpha / rank scale.

Forge maps no diffusers SD3 names: for it (and ComfyUI) an SD3 student is written in kohya's SD3 format
(`format="kohya"`), under the original MMDiT's module names, `lora_unet_joint_blocks_0_x_block_attn_qkv`,
where q, k and v are one fused Linear: its LoRA stacks the three lora_A and puts the three lora_B on the
diagonal, rank 3r with alpha 3 alpha, so the scale stays alpha / r.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .lora import lora_layers

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0", "conv_out": "out.2"}


def _per_block(value, n: int) -> list[int]:
    return [int(value)] * n if isinstance(value, int) else [int(v) for v in value]


def ldm_unet_path(path: str, config) -> str:
    """The original Stable Diffusion (ldm) path of a diffusers UNet2DConditionModel module `path`,
    e.g. down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q -> input_blocks.2.1.transformer_blocks.0.attn1.to_q.

    ldm numbers the down path's resnets (with their attention) and downsamplers in one sequence
    after conv_in, and the up path's resnets (one more per level) likewise, upsamplers sitting in the
    last resnet's slot after its attention."""
    layers = _per_block(config.layers_per_block, len(config.down_block_types))
    up_layers = list(reversed(layers))
    up_attention = [t.startswith("CrossAttn") for t in config.up_block_types]
    parts = path.split(".")
    for prefix, target in _TOP.items():
        if path == prefix or path.startswith(prefix + "."):
            return target + path[len(prefix):]
    if parts[0] == "down_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = 1 + sum(n + 1 for n in layers[:i])
        if kind == "downsamplers":
            return ".".join([f"input_blocks.{start + layers[i]}.0.op", *rest[1:]])  # rest[0] is "conv"
        return _inner(f"input_blocks.{start + j}", kind, rest)
    if parts[0] == "up_blocks":
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        start = sum(n + 1 for n in up_layers[:i])
        if kind == "upsamplers":
            return ".".join([f"output_blocks.{start + up_layers[i]}.{2 if up_attention[i] else 1}.conv", *rest[1:]])
        return _inner(f"output_blocks.{start + j}", kind, rest)
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), parts[3:]
        if kind == "attentions":
            return ".".join(["middle_block.1", *rest])
        return _resnet(f"middle_block.{2 * j}", rest)
    raise ValueError(f"no ldm path for the UNet module {path!r}")


def _inner(block: str, kind: str, rest: list[str]) -> str:
    if kind == "attentions":
        return ".".join([f"{block}.1", *rest])
    return _resnet(f"{block}.0", rest)


def _resnet(block: str, rest: list[str]) -> str:
    name = rest[0]
    if name not in _RESNET:
        raise ValueError(f"no ldm name for the resnet module {name!r}")
    return ".".join([block, _RESNET[name], *rest[1:]])


# diffusers SD3 module (within transformer_blocks.i) -> (MMDiT module within joint_blocks.i, slot in a fused qkv)
_MMDIT_BLOCK = {"attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
                "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
                "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
                "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
                "attn2.to_v": ("x_block.attn2.qkv", 2), "attn.to_out.0": ("x_block.attn.proj", None),
                "attn.to_add_out": ("context_block.attn.proj", None), "attn2.to_out.0": ("x_block.attn2.proj", None),
                "ff.net.0.proj": ("x_block.mlp.fc1", None), "ff.net.2": ("x_block.mlp.fc2", None),
                "ff_context.net.0.proj": ("context_block.mlp.fc1", None),
                "ff_context.net.2": ("context_block.mlp.fc2", None),
                "norm1.linear": ("x_block.adaLN_modulation.1", None),
                "norm1_context.linear": ("context_block.adaLN_modulation.1", None)}
_MMDIT_TOP = {"context_embedder": "context_embedder", "proj_out": "final_layer.linear",
              "norm_out.linear": "final_layer.adaLN_modulation.1",
              "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
              "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
              "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2"}


def mmdit_path(path: str, network: nn.Module) -> tuple[str, int | None, bool]:
    """The original SD3 (MMDiT) module of a diffusers SD3Transformer2DModel module `path`: (its path, the
    slot (q 0, k 1, v 2) it fills in a fused qkv Linear or None, whether the output halves are swapped).
    diffusers orders a two-way modulation (the last block's context norm, the output norm) scale then
    shift, MMDiT shift then scale."""
    parts = path.split(".")
    if parts[0] == "transformer_blocks" and len(parts) > 2:
        inner = ".".join(parts[2:])
        if inner in _MMDIT_BLOCK:
            target, slot = _MMDIT_BLOCK[inner]
            block = network.transformer_blocks[int(parts[1])]
            swap = inner == "norm1_context.linear" and getattr(block, "context_pre_only", False)
            return f"joint_blocks.{parts[1]}.{target}", slot, swap
    if path in _MMDIT_TOP:
        return _MMDIT_TOP[path], None, path == "norm_out.linear"
    raise ValueError(f"no MMDiT module for the SD3 module {path!r}: kohya's SD3 format holds the attention, MLP, "
                     "modulation, embedding and output Linears; leave it out of the LoRA targets, or write the "
                     "diffusers format (diffusers, ComfyUI)")


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    return torch.cat(up.chunk(2, dim=0)[::-1])


def _kohya_mmdit_state_dict(network: nn.Module, adapters) -> dict[str, torch.Tensor]:
    """kohya SD3 keys: q, k, v of one attention as one LoRA on its fused qkv (lora_A stacked, lora_B
    block-diagonal; missing parts zero)."""
    fused, out = {}, {}
    for path, down, up, alpha, rank in adapters:
        target, slot, swap = mmdit_path(path, network)
        down, up = down.detach().float().cpu(), up.detach().float().cpu()
        if swap:
            up = _swap_halves(up)
        if slot is None:
            key = "lora_unet_" + target.replace(".", "_")
            out.update({f"{key}.lora_down.weight": down.contiguous(), f"{key}.lora_up.weight": up.contiguous(),
                        f"{key}.alpha": torch.tensor(alpha)})
        else:
            fused.setdefault(target, {})[slot] = (down, up, alpha, rank)
    for target, parts in fused.items():
        if len({(a, r) for _, _, a, r in parts.values()}) != 1:
            raise ValueError(f"q, k and v of {target} have different LoRA ranks or alphas: one fused LoRA "
                             "cannot hold them; give them one rank and alpha, or write the diffusers format "
                             "(diffusers, ComfyUI)")
        _, up0, alpha, rank = next(iter(parts.values()))
        width = up0.shape[0]
        downs, ups = [], []
        for slot in sorted(parts):
            d, u = parts[slot][0], parts[slot][1]
            block = torch.zeros(3 * width, rank)
            block[slot * width:(slot + 1) * width] = u
            downs.append(d)
            ups.append(block)
        key = "lora_unet_" + target.replace(".", "_")
        out.update({f"{key}.lora_down.weight": torch.cat(downs).contiguous(),
                    f"{key}.lora_up.weight": torch.cat(ups, dim=1).contiguous(),
                    f"{key}.alpha": torch.tensor(alpha * len(parts))})
    return out


def _network(student: nn.Module) -> tuple[nn.Module, str]:
    """The diffusers network inside a student wrapper (UNetStudent, FlowTransformerStudent, FlowAsVE), and its kind."""
    for module in student.modules():
        name = type(module).__name__
        if name == "UNet2DConditionModel":
            return module, "unet"
        if name in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
            return module, "transformer"
    raise TypeError(f"no diffusers UNet2DConditionModel or SD3/Flux transformer in {type(student).__name__}")


def _adapters(network: nn.Module, state: dict | None = None, prefix: str = ""):
    """(module path, lora_A weight, lora_B weight, alpha, rank) of each LoRA layer of `network`; the
    weights from `state` (a full state dict, keys `prefix + path`) when given: an FSDP-sharded
    network's own parameters are shards."""
    layers = {id(m) for m in lora_layers(network)}
    for path, module in network.named_modules():
        if id(module) in layers and "default" in module.lora_A:
            if state is None:
                down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
            else:
                down, up = state[f"{prefix}{path}.lora_A.default.weight"], state[f"{prefix}{path}.lora_B.default.weight"]
            yield path, down, up, float(module.lora_alpha["default"]), int(module.r["default"])


# The LoRA key formats each network family writes, its default first, and the hosts that load them.
LORA_FORMATS = {"UNet2DConditionModel": ("kohya",), "FluxTransformer2DModel": ("diffusers",),
                "SD3Transformer2DModel": ("diffusers", "kohya")}
FORMAT_HOSTS = {"UNet2DConditionModel": {"kohya": "diffusers, ComfyUI, A1111 and Forge"},
                "FluxTransformer2DModel": {"diffusers": "diffusers, ComfyUI"},
                "SD3Transformer2DModel": {"diffusers": "diffusers, ComfyUI", "kohya": "Forge, ComfyUI"}}


def lora_format(network_class: str, format: str | None = None) -> str:
    """The LoRA key format a `network_class` student is written in: `format`, or the family's default
    when None; a ValueError naming the formats it writes when it cannot write `format`."""
    if format not in (None, "diffusers", "kohya"):
        raise ValueError(f"format must be 'diffusers' or 'kohya', got {format!r}")
    formats = LORA_FORMATS[network_class]
    if format is not None and format not in formats:
        writes = " or ".join(f"{f} ({FORMAT_HOSTS[network_class][f]} load it)" for f in formats)
        raise ValueError(f"a {network_class} student's LoRA is written in {writes}, not in {format} keys: pass "
                         f"format {formats[0]!r} (--format {formats[0]}) or leave it out")
    return format or formats[0]


def check_kohya_paths(paths, network: nn.Module) -> None:
    """That kohya's SD3 format has a name for each LoRA'd module of `paths` in the SD3 `network` (which may
    be an empty skeleton on the meta device: only its structure is read); a ValueError naming the first
    one it has not."""
    for path in paths:
        mmdit_path(path, network)


def lora_file_state_dict(student: nn.Module, state: dict | None = None,
                         format: str | None = None) -> dict[str, torch.Tensor]:
    """The student's adapters under the names the hosts load (kohya for UNets, peft for transformers).
    `state`: the student's full state dict (as gathered from FSDP shards), else its own parameters.
    `format`: "kohya" writes an SD3 student in kohya's SD3 format (Forge's and ComfyUI's LoRA loaders;
    diffusers' SD3 loader reads only the default, "diffusers"); a family's other format is refused
    (`lora_format`)."""
    network, kind = _network(student)
    prefix = next(name for name, module in student.named_modules() if module is network)
    sd3 = type(network).__name__ == "SD3Transformer2DModel"
    format = lora_format(type(network).__name__, format)
    if sd3 and format == "kohya":
        out = _kohya_mmdit_state_dict(network, _adapters(network, state, prefix + "." if prefix else ""))
        if not out:
            raise ValueError("the student has no LoRA adapters to export: export it as a full checkpoint (full=True)")
        return out
    # diffusers' SD3 loader refuses any key without "lora" (an alpha): there the scale is folded into
    # lora_B, which every loader then applies at its no-alpha scale of 1
    fold = sd3
    out = {}
    for path, down, up, alpha, rank in _adapters(network, state, prefix + "." if prefix else ""):
        if kind == "unet":
            key = "lora_unet_" + ldm_unet_path(path, network.config).replace(".", "_")
            out[f"{key}.lora_down.weight"] = down.detach().float().contiguous().cpu()
            out[f"{key}.lora_up.weight"] = up.detach().float().contiguous().cpu()
        else:
            key = f"transformer.{path}"
            out[f"{key}.lora_A.weight"] = down.detach().float().contiguous().cpu()
            out[f"{key}.lora_B.weight"] = (up.detach().float() * (alpha / rank if fold else 1.0)).contiguous().cpu()
        if not fold:
            out[f"{key}.alpha"] = torch.tensor(alpha)
    if not out:
        raise ValueError("the student has no LoRA adapters to export: export it as a full checkpoint (full=True)")
    return out


def _step_conditioned(student: nn.Module):
    """The SFD-v wrapper (UNetStudent / FlowTransformerStudent with a step embedding) inside `student`, or None."""
    for module in student.modules():
        if getattr(module, "step_embedding", None) is not None and hasattr(module, "time_module"):
            return module
    return None


def _check_exportable(student: nn.Module) -> None:
    if _step_conditioned(student) is not None:
        raise ValueError("an SFD-v student's step embedding is not part of the network the hosts load: export it "
                         "as a full network for one step count (save_full(..., num_steps=n)), train a student for "
                         "one step count (SFD), or use it through kdistpp")


# Where a step count's embedding folds into a bias: the last Linear whose output is (a summand of) the
# time embedding the step embedding is added to.
_FOLD_INTO = {"time_embedding": "time_embedding.linear_2", "time_text_embed": "time_text_embed.text_embedder.linear_2"}


def _fold_step_embedding(student: nn.Module, network: nn.Module, state: dict, num_steps: int) -> None:
    """Adds SFD-v's embedding of `num_steps` to the bias of the time embedding's last Linear (in `state`):
    the network then computes, without any step input, what the student computes at that count."""
    wrapper = _step_conditioned(student)
    with torch.no_grad():
        emb = wrapper.step_embedding(torch.tensor([int(num_steps)]))[0].float().cpu()
    key = _FOLD_INTO[wrapper.time_module] + ".bias"
    state[key] = (state[key].float() + emb).to(state[key].dtype)


def save_lora(student: nn.Module, path: str | Path, metadata: dict | None = None, state: dict | None = None,
              format: str | None = None) -> Path:
    """Writes the student's adapters to `path` (.safetensors) in the hosts' key format (from `state`, the
    full state dict, when given; `format`, "kohya" for an SD3 student Forge loads: see `lora_file_state_dict`)."""
    from safetensors.torch import save_file

    _check_exportable(student)
    path = Path(path)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    save_file(lora_file_state_dict(student, state, format), str(path), metadata=meta)
    return path


def merged_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """The network's weights with each LoRA's alpha / r * B @ A added to its base weight, under the
    network's own (diffusers) names: what `save_pretrained` writes for the merged network."""
    deltas = {}
    for path, down, up, alpha, rank in _adapters(network):
        delta = (up.detach().float().flatten(1) @ down.detach().float().flatten(1)) * (alpha / rank)
        deltas[f"{path}.base_layer.weight"] = delta
    out = {}
    for key, value in network.state_dict().items():
        if "lora_" in key:
            continue
        value = value.detach()
        if key in deltas:
            value = (value.float() + deltas[key].reshape(value.shape)).to(value.dtype)
        out[key.replace(".base_layer.", ".")] = value.contiguous().cpu()
    return out


def save_full(student: nn.Module, folder: str | Path, num_steps: int | None = None) -> Path:
    """Writes the merged student as a diffusers model folder (config.json and
    diffusion_pytorch_model.safetensors), loadable by `from_pretrained` and by the hosts' model loaders.
    An SFD-v student needs `num_steps`, the step count the written network is for (its step embedding
    at that count is folded into the time embedding's bias)."""
    from safetensors.torch import save_file

    network, _ = _network(student)
    state = merged_state_dict(network)
    if _step_conditioned(student) is not None:
        if num_steps is None:
            _check_exportable(student)
        _fold_step_embedding(student, network, state, num_steps)
    elif num_steps is not None:
        raise ValueError("num_steps is for SFD-v students (a step embedding to fold in); this student has none")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(network.config).items() if not k.startswith("_")}
    config["_class_name"] = type(network).__name__
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return folder


__all__ = ["LORA_FORMATS", "check_kohya_paths", "ldm_unet_path", "lora_file_state_dict", "lora_format", "mmdit_path",
           "merged_state_dict", "save_full", "save_lora"]
