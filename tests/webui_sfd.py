"""An SFD LoRA student exported by kdistpp, in the real webuis (A1111 1.10.1 and Forge) through `<lora:sfd:1>`.

The teacher is one of the harness's SD1-format checkpoints; kdistpp's student is a diffusers UNet holding
the same weights (read through kdistpp's ldm key map) with LoRA adapters, written by
`kdistpp.sfd.export.save_lora` into the webui's models/Lora. A generation with `<lora:sfd:1>` runs the
webui's own LoRA loading and sampler; each UNet call it makes is compared with kdistpp's networks on the
call's inputs: the student (adapters on), or its SFD teacher (the same network with its adapters off).

The checks run the same way in both webuis; each test file passes its webui's handle (`host`: client,
student, and `unet()`, the webui's UNet module its generations call) and the diffusers architecture of its
checkpoints.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import webui_lora
from webui_api import generate, same_image

TEACHER = "sfd_teacher"
PROMPT = "a red cube <lora:sfd:1>"


def diffusers_unet_from_checkpoint(checkpoint: Path, **architecture):
    """The checkpoint's UNet as a diffusers UNet2DConditionModel of the given architecture."""
    import diffusers

    from kdistpp.sfd.export import ldm_unet_path

    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                          **architecture)
    ldm = webui_lora.unet_state(checkpoint)
    state = {}
    for name in unet.state_dict():
        module, param = name.rsplit(".", 1)
        state[name] = ldm.pop(f"{ldm_unet_path(module, unet.config)}.{param}")
    assert not ldm, sorted(ldm)[:5]  # every checkpoint weight found its diffusers place
    unet.load_state_dict(state)
    return unet.eval()


def exported_student(checkpoint: Path, lora_dir: Path, architecture: dict, targets=None):
    """kdistpp's LoRA student on the checkpoint's UNet, its adapters set as after training (far from peft's
    zero start), exported to `lora_dir`/sfd.safetensors."""
    import diffusers

    from kdistpp.sfd.export import save_lora
    from kdistpp.sfd.lora import DEFAULT_TARGETS, add_lora
    from kdistpp.sfd.networks import UNetStudent

    unet = diffusers_unet_from_checkpoint(checkpoint, **architecture)
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    student = UNetStudent(add_lora(unet, rank=4, alpha=2.0, target_modules=targets or DEFAULT_TARGETS), scheduler)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p[0].numel() ** 0.5))
    save_lora(student, Path(lora_dir) / "sfd.safetensors")
    return student


def host_with_exported_student(shared, app, checkpoint: Path, architecture: dict, unet, targets=None):
    """The handle the checks take, for a started webui (`shared`, its FastAPI `app`) whose models/Lora gets the
    exported student of `checkpoint`'s UNet; `unet()` returns the webui's UNet module its generations call."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fastapi.testclient import TestClient
    from modules import extra_networks, script_callbacks

    if "lora" not in extra_networks.extra_network_registry:
        script_callbacks.before_ui_callback()  # as the webuis' api_only() does: the Lora extension registers here
    student = exported_student(checkpoint, Path(shared.cmd_opts.lora_dir), architecture, targets)
    return SimpleNamespace(client=TestClient(app), student=student, unet=unet)


def references(student) -> dict:
    """kdistpp's networks, each evaluated on a webui UNet call's inputs (x, timestep, context)."""
    from kdistpp.sfd.lora import adapters_disabled

    unet = student.unet

    def evaluate(args, kwargs, teacher=False):
        context = kwargs["context"] if "context" in kwargs else args[2]
        with adapters_disabled(unet) if teacher else nullcontext():
            return unet(args[0].float(), args[1].float(), encoder_hidden_states=context.float()).sample

    return {"student": evaluate, "sfd teacher": lambda args, kwargs: evaluate(args, kwargs, teacher=True)}


def which_network(calls, student) -> list[str]:
    """For each recorded UNet call, the kdistpp network that reproduces it (webui_lora.which_weights)."""
    return webui_lora.which_weights(calls, references(student), lambda network, args, kwargs: network(args, kwargs))


def sfd(host, sampler, **kwargs):
    """A generation (webui_api.generate) of the exported student: its LoRA in the prompt, on the teacher's
    checkpoint, 3 steps at CFG 1. Returns its images."""
    return generate(host, sampler, prompt=PROMPT, cfg_scale=1.0, steps=3, settings={"sd_model_checkpoint": TEACHER},
                    **kwargs)


def recorded(host, sampler, **kwargs):
    """`sfd`'s generation with every call of the webui's UNet recorded: (images, calls)."""
    calls = webui_lora.Calls(host.unet())
    try:
        images = sfd(host, sampler, **kwargs)
    finally:
        calls.remove()
    return images, calls.calls


def check_the_lora_runs_the_exported_student(host) -> None:
    """With the webui's own Euler, every UNet call of the generation is kdistpp's student, not its teacher."""
    sfd(host, "Euler")  # loads the checkpoint and the LoRA
    _, calls = recorded(host, "Euler")
    names = which_network(calls, host.student)
    assert names == ["student"] * 3, names


def check_distpp_with_the_same_checkpoint_as_teacher(host) -> None:
    """The webui's "Euler Distillation++" on the exported student, its teacher the same checkpoint without the
    prompt's LoRAs: at w = 0 the webui's own Euler image, with no teacher call; guided (w 0.5, the first 2 of 3 steps), each guided
    step is the student's UNet call then one teacher call, which is kdistpp's SFD teacher (the checkpoint's
    weights, clearly not the student's), and every other call is kdistpp's student."""
    from kdistpp.integrations.webui_teachers import SAME_CHECKPOINT

    base = sfd(host, "Euler")[0]
    unguided, calls = recorded(host, "Euler Distillation++", teacher=SAME_CHECKPOINT, w=0.0)
    assert same_image(unguided[0], base)
    assert which_network(calls, host.student) == ["student"] * 3  # no teacher call
    assert not same_image(sfd(host, "Euler", seed=6)[0], base)  # the comparison can fail
    images, calls = recorded(host, "Euler Distillation++", teacher=SAME_CHECKPOINT, w=0.5, guided_steps=2)
    names = which_network(calls, host.student)
    assert names == ["student", "sfd teacher", "student", "sfd teacher", "student"], names
    assert not same_image(images[0], base)  # the teacher moved the image
