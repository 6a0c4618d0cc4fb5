"""SFD under torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 runs of a LoRA UNet student equal
one process on the joint batch, started by torch.multiprocessing or by `accelerate launch`; an FSDP2 run that
stops, saves and resumes equals one that does not (its EMA of the weights, kept on the shards, included); and
`python -m kdistpp.sfd train` under `accelerate launch` takes FSDP2 and bf16 from the launcher's options.

Run as a script (`accelerate launch ... tests/test_sfd_distributed.py OUT SETUP`) this file is the launched
worker: it joins the launcher's process group and trains as the launcher's options say."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from kdistpp.sfd import MLPDenoiser, SFDConfig, SFDTrainer  # noqa: E402
from kdistpp.sfd.lora import LoRATeacher, add_lora  # noqa: E402
from kdistpp.sfd.distributed import backend_for, init_distributed, launch_settings  # noqa: E402
from kdistpp.sfd.networks import UNetStudent  # noqa: E402

if __name__ != "__main__":  # the CLI tests' tiny SD pipeline (a launched worker needs none of it)
    from test_sfd_cli import teacher_dir, train_args  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]

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
    _train_and_write(rank, out_dir, setup, parallel, resume)


def _launched(out_dir, setup):
    """A process `accelerate launch` started: the group and the parallelism are the launcher's."""
    device = init_distributed()
    settings = launch_settings()
    rank = torch.distributed.get_rank()
    if rank == 0:
        Path(out_dir, "launched.json").write_text(json.dumps({
            **settings._asdict(), "world_size": torch.distributed.get_world_size(), "device": str(device),
            "backend": torch.distributed.get_backend()}))
    _train_and_write(rank, out_dir, setup, settings.parallel, False)


def _train_and_write(rank, out_dir, setup, parallel, resume):
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
    Path(out_dir, f"finished{rank}").touch()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("setup, parallel, resume", [("unet_lora", "ddp", False), ("unet_lora", "fsdp", False),
                                                     ("mlp_full", "fsdp", False), ("unet_lora", "fsdp", True)])
def test_two_gloo_processes_equal_one_process_on_the_joint_batch(tmp_path, setup, parallel, resume):
    try:
        torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), setup, parallel, resume),
                                    nprocs=WORLD)
    except torch.multiprocessing.ProcessExitedException as error:
        # A gloo worker thread can abort a process at interpreter exit, after its group was destroyed (seen once
        # on a loaded 2-core machine: "terminate called without an active exception"). Tolerated only there:
        # every rank must have passed the final barrier, with the weights compared below already written.
        finished = all((tmp_path / f"finished{rank}").exists() for rank in range(WORLD))
        if error.signal_name != "SIGABRT" or not finished:
            raise
        warnings.warn(f"gloo aborted a process at exit after its run finished: {error}")
    trainer, initial = agrees_with_one_process_on_the_joint_batch(tmp_path, setup, resume)
    if resume:
        ema = torch.load(tmp_path / "ema.pt")
        assert set(ema) == set(trainer.ema)
        for name in ema:
            assert close_to_update(ema[name], trainer.ema[name], initial[name]), name


def agrees_with_one_process_on_the_joint_batch(tmp_path, setup, resume=False):
    """The weights the 2-process run wrote (trained.pt) against one process trained on the joint batches;
    returns that process's trainer and its initial weights."""
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
    return trainer, initial


def close_to_update(got, expected, initial, fraction=1e-2):
    return bool((got - expected).abs().max() <= fraction * (expected - initial).abs().max())


def accelerate_launch(tmp_path, options, *command, timeout=600):
    """`accelerate launch OPTIONS COMMAND` with 2 processes on this machine, no accelerate config file (HF_HOME
    is empty), a free port; its `--multi_gpu` launcher is torchrun underneath, which starts the processes on
    CPU where there is no GPU (its `--cpu` launcher starts only one without MPI)."""
    pytest.importorskip("accelerate")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(WORLD), "--num_machines", "1",
              "--main_process_port", "0", "--dynamo_backend", "no", *options]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run([*launch, *command], capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("parallel, options", [("ddp", ["--multi_gpu"]), ("fsdp", ["--use_fsdp", "--fsdp_version", "2"])])
def test_accelerate_launch_two_processes_equal_one_process_on_the_joint_batch(tmp_path, parallel, options):
    """`accelerate launch --multi_gpu` gives DDP, `--use_fsdp --fsdp_version 2` FSDP2 (kdistpp reads the launcher's
    environment), in a gloo group of 2 CPU processes; the trained LoRA weights are those of one process on the
    joint batch, to the tolerance of the torch.multiprocessing runs above."""
    accelerate_launch(tmp_path, [*options, "--mixed_precision", "no"], __file__, str(tmp_path), "unet_lora")
    launched = json.loads((tmp_path / "launched.json").read_text())
    assert launched == {"parallel": parallel, "precision": "fp32", "gradient_checkpointing": False, "world_size": WORLD,
                        "device": "cpu", "backend": "gloo"}
    agrees_with_one_process_on_the_joint_batch(tmp_path, "unet_lora")


@pytest.mark.slow
def test_the_command_under_accelerate_launch_takes_fsdp2_and_bf16_from_it_and_only_rank_0_writes(teacher_dir, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2 --mixed_precision bf16 --num_processes 2 -m kdistpp.sfd train
    ...` (no --parallel, no --precision): the run is FSDP2 in bf16 autocast, and rank 0 alone logs and writes."""
    args = train_args(teacher_dir, tmp_path, "--checkpoint-every", "2")
    accelerate_launch(tmp_path, ["--use_fsdp", "--fsdp_version", "2", "--mixed_precision", "bf16"], "-m",
                      "kdistpp.sfd", *args)
    run = tmp_path / "run"
    settings = json.loads((run / "run.json").read_text())
    assert (settings["parallel"], settings["precision"]) == ("fsdp", "bf16")
    assert [int(r["iteration"]) for r in csv.DictReader((run / "loss.csv").open())] == [1, 2]  # one writer
    assert sorted(p.name for p in run.glob("samples_*.png")) == ["samples_000002.png"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(state["generators"]) == WORLD  # both ranks trained
    assert (run / "student_lora.safetensors").is_file()


LAUNCHED = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "WORLD_SIZE": "2"}
# what accelerate's launcher (utils/launch.py) sets for `--use_fsdp --fsdp_version 2` left at its defaults
ACCELERATE_FSDP2 = {**LAUNCHED, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
                    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false",
                    "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "false"}


@pytest.mark.parametrize("environ, given, expected", [
    ({}, {}, ("ddp", "fp32", False)),  # torchrun: nothing from a launcher
    (LAUNCHED, {}, ("ddp", "fp32", False)),
    (LAUNCHED, {"parallel": "fsdp", "precision": "bf16"}, ("fsdp", "bf16", False)),  # the command's own options
    ({**LAUNCHED, "ACCELERATE_MIXED_PRECISION": "bf16"}, {}, ("ddp", "bf16", False)),
    ({**LAUNCHED, "ACCELERATE_MIXED_PRECISION": "bf16"}, {"precision": "bf16"}, ("ddp", "bf16", False)),
    ({**LAUNCHED, "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_ACTIVATION_CHECKPOINTING": "true"}, {},
     ("fsdp", "fp32", True)),
    (ACCELERATE_FSDP2, {}, ("fsdp", "fp32", False)),
])
def test_launch_settings_read_accelerates_options(environ, given, expected):
    assert tuple(launch_settings(**given, environ=environ)) == expected


@pytest.mark.parametrize("environ, given, message", [
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, {}, "--mixed_precision fp16: kdistpp trains in bf16 autocast or float32"),
    ({"ACCELERATE_MIXED_PRECISION": "fp8"}, {}, "--mixed_precision fp8"),
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, {"precision": "fp32"}, "--precision fp32 contradicts accelerate launch "
                                                                     "--mixed_precision bf16"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, {}, "FSDP version 1: kdistpp shards with FSDP2.*--fsdp_version 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, {"parallel": "ddp"}, "--parallel ddp contradicts"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_OFFLOAD_PARAMS": "true"}, {}, "--fsdp_offload_params"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, {}, "--use_deepspeed"),
    ({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, {}, "--dynamo_backend inductor"),
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"}, {}, "--cpu --num_processes N starts a single process"),
    ({"ACCELERATE_USE_CPU": "True", "OMPI_COMM_WORLD_SIZE": "2"}, {}, "with MPI"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, {}, "--use_megatron_lm: kdistpp trains with torch.distributed's DDP "
                                                 "or FSDP2.*--multi_gpu"),
    ({**ACCELERATE_FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"}, {}, "--fsdp_reshard_after_forward false.*launch "
                                                                       "without it"),
    ({**ACCELERATE_FSDP2, "FSDP_ACTIVATION_CHECKPOINTING_OFFLOAD": "true"}, {},
     "--fsdp_activation_checkpointing_offload true.*launch without it"),
    ({**ACCELERATE_FSDP2, "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, {}, "--fsdp_sharding_strategy SHARD_GRAD_OP.*"
                                                                           "FULL_SHARD"),
    ({**ACCELERATE_FSDP2, "FSDP_SHARDING_STRATEGY": "3"}, {}, "--fsdp_sharding_strategy 3"),  # NO_SHARD by number
])
def test_launch_settings_refuse_what_kdistpp_does_not_do(environ, given, message):
    with pytest.raises(ValueError, match=message):
        launch_settings(**given, environ=environ)


def test_the_device_is_this_ranks_gpu_unless_accelerates_cpu_flag_or_device_says_otherwise(monkeypatch):
    """One process (no group joined, no CUDA call), on a machine that says it has CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert init_distributed() == torch.device("cuda", 1)
    assert init_distributed("cuda") == torch.device("cuda", 1)  # a bare 'cuda': this rank's GPU
    assert init_distributed("cpu") == torch.device("cpu")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert init_distributed() == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 1)) == "nccl"


def test_the_command_refuses_accelerates_fp16_before_loading_a_model(teacher_dir, tmp_path, monkeypatch, capsys):
    from kdistpp.sfd import cli

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert cli.main(train_args(teacher_dir, tmp_path)) == 2
    assert "--mixed_precision fp16" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    _launched(*sys.argv[1:])
