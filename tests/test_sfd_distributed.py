"""SFD under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 runs of a LoRA UNet student equal
one process on the joint batch; an FSDP2 run that stops, saves and resumes equals one that does not (its EMA
of the weights, kept on the shards, included)."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from kdistpp.sfd import MLPDenoiser, SFDConfig, SFDTrainer  # noqa: E402
from kdistpp.sfd.lora import LoRATeacher, add_lora  # noqa: E402
from kdistpp.sfd.networks import UNetStudent  # noqa: E402

TEXT_DIM, WORLD, PER_RANK, ITERATIONS = 32, 2, 2, 2
CONFIG = dict(sigma_min=0.1, sigma_max=14.6, batch_size=PER_RANK, lr=1e-3, iterations=ITERATIONS)


def unet_setup():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.manual_seed(1)
    student = UNetStudent(add_lora(unet, rank=2), sched, step_conditioned=True)
    return student, LoRATeacher(student), SFDConfig(num_steps=(3, 4), **CONFIG), (4, 8, 8)


def mlp_setup():
    torch.manual_seed(0)
    teacher = MLPDenoiser(2, hidden=16, depth=2, sigma_data=1.0).requires_grad_(False)
    student = MLPDenoiser(2, hidden=16, depth=2, sigma_data=1.0, step_conditioned=True).load_teacher(teacher)
    with torch.no_grad():  # a student unlike its teacher, so the first steps have something to learn
        for p in student.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return student, teacher, SFDConfig(num_steps=(3, 4), **CONFIG), (2,)


SETUPS = {"unet_lora": unet_setup, "mlp_full": mlp_setup}


def batch(rank: int, iteration: int, shape):
    g = torch.Generator().manual_seed(100 + rank + 10 * iteration)
    x = torch.randn(PER_RANK, *shape, generator=g) * CONFIG["sigma_max"]
    extra = {"cond": {"encoder_hidden_states": torch.randn(PER_RANK, 5, TEXT_DIM, generator=g)}} if len(shape) > 1 else {}
    return x, extra


def joint_batch(iteration: int, shape):
    parts = [batch(r, iteration, shape) for r in range(WORLD)]
    x = torch.cat([p[0] for p in parts])
    if not parts[0][1]:
        return x, {}
    return x, {"cond": {"encoder_hidden_states": torch.cat([p[1]["cond"]["encoder_hidden_states"] for p in parts])}}


def trainable_state(trainer):
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()
            if "lora_" in k or "step_embedding" in k or not k.startswith("unet.")}


def _worker(rank, init_file, out_dir, setup, parallel, resume):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    student, teacher, config, shape = SETUPS[setup]()
    ema = 0.5 if resume else None
    trainer = SFDTrainer(student, teacher, config, parallel=parallel, ema=ema)
    for it in range(ITERATIONS):
        if resume and it == 1:  # stop, save, and continue in a trainer built afresh
            trainer.save(f"{out_dir}/resume.pt")
            torch.distributed.barrier()
            student, teacher, config, shape = SETUPS[setup]()
            trainer = SFDTrainer(student, teacher, config, parallel=parallel, ema=ema).load(f"{out_dir}/resume.pt")
        trainer.train_batch(*batch(rank, it, shape))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ema = trainer._full_ema()  # gathered from the shards on every rank
    if rank == 0 and ema is not None:
        torch.save(ema, f"{out_dir}/ema.pt")
    if rank == 0:
        torch.save({k: v for k, v in state.items() if "lora_" in k or "step_embedding" in k or not k.startswith("unet.")},
                   f"{out_dir}/trained.pt")
    torch.distributed.barrier()  # no rank tears the group down while another still uses it
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("setup, parallel, resume", [("unet_lora", "ddp", False), ("unet_lora", "fsdp", False),
                                                     ("mlp_full", "fsdp", False), ("unet_lora", "fsdp", True)])
def test_two_gloo_processes_equal_one_process_on_the_joint_batch(tmp_path, setup, parallel, resume):
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), setup, parallel, resume),
                                nprocs=WORLD)
    student, teacher, config, shape = SETUPS[setup]()
    trainer = SFDTrainer(student, teacher, config, ema=0.5 if resume else None)
    initial = trainable_state(trainer)
    for it in range(ITERATIONS):
        trainer.train_batch(*joint_batch(it, shape))
    expected, got = trainable_state(trainer), torch.load(tmp_path / "trained.pt")
    assert set(got) == set(expected)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-4  # training moved the weights, so agreeing below is not agreeing at the start
    # Adam's first steps are about lr * sign(g): where a gradient is near 0, the summation order (two ranks'
    # all-reduce against one batch, and the BLAS threads) can move a weight by a fraction of its update. So the
    # tolerance is 1 % of how far training moved each tensor; a rank training on its own half alone, or an
    # unsynchronised shard, is off by the order of the whole update.
    for name in expected:
        assert close_to_update(got[name], expected[name], initial[name]), name
    if resume:
        ema = torch.load(tmp_path / "ema.pt")
        assert set(ema) == set(trainer.ema)
        for name in ema:
            assert close_to_update(ema[name], trainer.ema[name], initial[name]), name


def close_to_update(got, expected, initial, fraction=1e-2):
    return bool((got - expected).abs().max() <= fraction * (expected - initial).abs().max())
