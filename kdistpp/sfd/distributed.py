"""SFD on torch.distributed: joining the process group a launcher describes, and FSDP2 sharding.

`torchrun` and `accelerate launch` both start one process per device with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set; `init_distributed` joins that group (gloo on CPU, nccl on CUDA) and
`launch_settings` reads what `accelerate launch` was asked for (`--use_fsdp --fsdp_version 2`,
`--mixed_precision bf16`, `--cpu`, `--fsdp_activation_checkpointing`) as the command's own options, refusing
what kdistpp does not do (FSDP1, a sharding strategy other than full sharding, no resharding after forward,
parameter or activation-checkpoint offload, fp16, fp8, DeepSpeed, Megatron-LM, torch.compile) before any
model is loaded. Accelerate's `--multi_gpu` launcher is torchrun underneath and starts its processes on CPU too
(gloo); its `--cpu` launcher starts one process unless MPI starts the others, which kdistpp does not join.

FSDP2: `fully_shard` per block, then the whole network. The blocks are the items of the outermost
`nn.ModuleList`s (a UNet's down/up blocks, a transformer's blocks, an MLP's layers) plus a UNet's
`mid_block`: each is gathered for its own forward and backward and freed after, so at most one block's
full weights live beside the shards.
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple

import torch
from torch import nn

# accelerate launch --mixed_precision -> the command's --precision (autocast dtype; weights stay float32)
ACCELERATE_PRECISIONS = {"no": "fp32", "bf16": "bf16"}
MPI_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


class LaunchSettings(NamedTuple):
    parallel: str  # "ddp" or "fsdp"
    precision: str  # "fp32" or "bf16"
    gradient_checkpointing: bool


def _true(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


def launch_settings(parallel: str | None = None, precision: str | None = None, gradient_checkpointing: bool = False,
                    environ: Mapping[str, str] | None = None) -> LaunchSettings:
    """The run's parallelism, autocast precision and activation checkpointing: the options given, with what
    `accelerate launch` set in the environment (`environ`, default os.environ) filling those left None.
    An option that contradicts the launcher's setting, or a launcher setting kdistpp cannot honour, is a
    ValueError naming both and the fix."""
    env = os.environ if environ is None else environ
    if _true(env.get("ACCELERATE_USE_DEEPSPEED")):
        raise ValueError("accelerate launch --use_deepspeed: kdistpp trains with torch.distributed's DDP or FSDP2; "
                         "launch with --multi_gpu (DDP) or --use_fsdp --fsdp_version 2")
    if _true(env.get("ACCELERATE_USE_MEGATRON_LM")):
        raise ValueError("accelerate launch --use_megatron_lm: kdistpp trains with torch.distributed's DDP or FSDP2, "
                         "not Megatron-LM's tensor or pipeline parallelism; launch with --multi_gpu (DDP) or "
                         "--use_fsdp --fsdp_version 2")
    if env.get("ACCELERATE_DYNAMO_BACKEND", "NO").upper() != "NO":
        raise ValueError(f"accelerate launch --dynamo_backend {env['ACCELERATE_DYNAMO_BACKEND'].lower()}: kdistpp does "
                         "not compile its networks; launch with --dynamo_backend no")
    if _true(env.get("ACCELERATE_USE_CPU")) and "WORLD_SIZE" not in env:
        if any(name in env for name in MPI_WORLD_SIZES):
            raise ValueError("accelerate launch --cpu started these processes with MPI, whose ranks kdistpp does not "
                             "join: launch with --multi_gpu --num_processes N (torchrun underneath; on a machine "
                             "without GPUs its processes run on CPU with gloo)")
        if "MASTER_ADDR" in env:  # set by accelerate's --cpu launcher only for --num_processes > 1
            raise ValueError("accelerate launch --cpu --num_processes N starts a single process (its multi-CPU mode "
                             "needs MPI): launch with --multi_gpu --num_processes N instead (torchrun underneath; "
                             "its processes run on CPU with gloo where there is no GPU, or pass --device cpu)")
    if _true(env.get("ACCELERATE_USE_FSDP")):
        if env.get("FSDP_VERSION", "1") != "2":
            raise ValueError(f"accelerate launch --use_fsdp with FSDP version {env.get('FSDP_VERSION', '1')}: kdistpp "
                             "shards with FSDP2 (fully_shard); add --fsdp_version 2")
        if _true(env.get("FSDP_OFFLOAD_PARAMS")):
            raise ValueError("accelerate launch --fsdp_offload_params true: kdistpp keeps the shards on the device; "
                             "launch without it (--gradient-checkpointing and --precision bf16 save memory)")
        # accelerate's defaults (FULL_SHARD, reshard after forward, no checkpoint offload) are what kdistpp does
        strategy = env.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD").strip().upper()
        if strategy not in ("FULL_SHARD", "1"):
            raise ValueError(f"accelerate launch --fsdp_sharding_strategy {env['FSDP_SHARDING_STRATEGY']}: kdistpp "
                             "shards parameters, gradients and optimizer state (FULL_SHARD); launch without it, or "
                             "with --multi_gpu (DDP) to keep whole copies")
        if not _true(env.get("FSDP_RESHARD_AFTER_FORWARD", "true")):
            raise ValueError(f"accelerate launch --fsdp_reshard_after_forward {env['FSDP_RESHARD_AFTER_FORWARD']}: "
                             "kdistpp frees each block's gathered weights after its forward (FSDP2's default); launch "
                             "without it, or with --multi_gpu (DDP) to keep whole copies")
        if _true(env.get("FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD")):
            raise ValueError("accelerate launch --fsdp_activation_checkpointing_offload true: kdistpp keeps the "
                             "checkpointed activations on the device; launch without it (--fsdp_activation_"
                             "checkpointing alone recomputes them in backward)")
        if parallel == "ddp":
            raise ValueError("--parallel ddp contradicts accelerate launch --use_fsdp: drop one of them")
        parallel = "fsdp"
        gradient_checkpointing = gradient_checkpointing or _true(env.get("FSDP_ACTIVATION_CHECKPOINTING"))
    mixed = env.get("ACCELERATE_MIXED_PRECISION")
    if mixed is not None:
        mixed = mixed.strip().lower()
        if mixed not in ACCELERATE_PRECISIONS:
            raise ValueError(f"accelerate launch --mixed_precision {mixed}: kdistpp trains in bf16 autocast or float32 "
                             "(fp16 needs loss scaling, which SFD's trainer does not do); launch with "
                             "--mixed_precision bf16 or no")
        implied = ACCELERATE_PRECISIONS[mixed]
        if mixed != "no" and precision is not None and precision != implied:
            raise ValueError(f"--precision {precision} contradicts accelerate launch --mixed_precision {mixed}: drop "
                             "one of them")
        precision = precision or implied
    return LaunchSettings(parallel or "ddp", precision or "fp32", bool(gradient_checkpointing))


def backend_for(device: torch.device) -> str:
    """The process group's backend for this process's device: nccl for CUDA tensors, gloo for CPU ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(device: str | None = None) -> torch.device:
    """This process's device, after joining the process group that torchrun or `accelerate launch` set up
    (WORLD_SIZE > 1 in the environment; one process joins nothing). The device: `device` if given (a bare
    'cuda' meaning cuda:LOCAL_RANK), else cuda:LOCAL_RANK where CUDA is available and the launcher did not
    ask for the CPU (`accelerate launch --cpu`), else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local)
    elif torch.cuda.is_available() and not _true(os.environ.get("ACCELERATE_USE_CPU")):
        chosen = torch.device("cuda", local)
    else:
        chosen = torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)  # nccl's collectives run on the current device
        torch.distributed.init_process_group(backend_for(chosen))
    return chosen


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


__all__ = ["LaunchSettings", "backend_for", "blocks", "init_distributed", "launch_settings", "shard"]
