"""FSDP2 for SFD students and teachers: `fully_shard` per block, then the whole network.

The blocks are the items of the outermost `nn.ModuleList`s (a UNet's down/up blocks, a
transformer's blocks, an MLP's layers) plus a UNet's `mid_block`: each is gathered for its own
forward and backward and freed after, so at most one block's full weights live beside the shards.
"""

from __future__ import annotations

from torch import nn


def blocks(network: nn.Module) -> list[nn.Module]:
    """The modules `shard` wraps before the root: items of the outermost ModuleLists, and mid blocks."""
    found, taken = [], []
    for name, module in network.named_modules():
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue
        if isinstance(module, nn.ModuleList):
            found.extend(m for m in module if any(True for _ in m.parameters()))
            taken.append(name)
        elif name.endswith("mid_block") and module is not network:
            found.append(module)
            taken.append(name)
    return found


def shard(network: nn.Module, mp_policy=None) -> nn.Module:
    """Shards `network` in place with FSDP2 (`torch.distributed.fsdp.fully_shard`) over the default
    process group, block by block and then as a whole; returns it. `mp_policy`: an FSDP2
    `MixedPrecisionPolicy` (gather and reduce dtypes), None for float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {"mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in blocks(network):
        fully_shard(block, **kwargs)
    fully_shard(network, **kwargs)
    return network


__all__ = ["blocks", "shard"]
