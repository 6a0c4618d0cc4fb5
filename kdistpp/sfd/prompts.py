"""Prompts for SFD on text-to-image teachers: read from a file, embedded once by the teacher's own text
encoders, cached on disk, so that training never holds the text encoders.

The cache is a .safetensors file of the pipeline's `encode_prompt` outputs for every prompt
(`cond.<name>`, one row per prompt) and for the empty prompt (`uncond.<name>`, one row, the
negative branch of a teacher CFG scale); its metadata records a hash of the prompts and of the
teacher's folder, so changed prompts or another teacher are re-embedded rather than silently reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line; blank lines skipped) or a JSONL file (a `prompt` field per line)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts file {str(path)!r} does not exist: pass a text file with one prompt per line, "
                         "or a .jsonl file with a 'prompt' field per line")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{number}: each JSONL line needs a string 'prompt' field")
            prompts.append(record["prompt"])
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {str(path)!r} holds no prompt: SFD needs at least one to condition the teacher on")
    return prompts


def prompts_hash(prompts: list[str], source: str = "") -> str:
    """A digest of the prompts and of what embedded them (the teacher's folder)."""
    return hashlib.sha256("\n".join([source, *prompts]).encode()).hexdigest()


def encode(pipe, prompts: list[str], device, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """The pipeline's conditioning for `prompts` and for the empty prompt, as flat tensors:
    cond.encoder_hidden_states (P, T, D) and, for SDXL/SD3/Flux, cond.pooled (P, D); uncond.* (1, ...)."""
    names = ("encoder_hidden_states", "pooled")
    rows: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for start in range(0, len(prompts) + 1, batch_size):
            chunk = (prompts + [""])[start:start + batch_size]
            for name, tensor in zip(names, _encode_prompt(pipe, chunk, device)):
                if tensor is not None:
                    rows.setdefault(name, []).append(tensor.float().cpu())
    out = {}
    for name, parts in rows.items():
        full = torch.cat(parts)
        out[f"cond.{name}"], out[f"uncond.{name}"] = full[:-1].contiguous(), full[-1:].contiguous()
    return out


def _encode_prompt(pipe, prompts: list[str], device):
    """(prompt_embeds, pooled or None) from the pipeline's own encode_prompt, whatever its kind."""
    kind = type(pipe).__name__
    if "Flux" in kind:
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device)
        return embeds, pooled
    if "StableDiffusion3" in kind:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled
    if "XL" in kind:
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds, None


def cached_embeddings(pipe, prompts: list[str], cache: str | Path, device="cpu", source: str = "") -> dict[str, torch.Tensor]:
    """The prompts' embeddings from `cache` if it was written for these prompts by the same `source` (the
    teacher's folder), else computed by `pipe` and written."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cache, digest = Path(cache), prompts_hash(prompts, source)
    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("prompts_sha256") == digest:
                return {k: f.get_tensor(k) for k in f.keys()}
    embeddings = encode(pipe, prompts, device)
    save_file(embeddings, str(cache), metadata={"prompts_sha256": digest, "count": str(len(prompts))})
    return embeddings


__all__ = ["cached_embeddings", "encode", "prompts_hash", "read_prompts"]
