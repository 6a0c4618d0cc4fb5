"""`python -m kdistpp.sfd train|export`: a few-step student of a diffusers teacher, with one command.

    python -m kdistpp.sfd train --teacher ./sd15 --prompts prompts.txt --steps 4 --output run/
    torchrun --nproc_per_node 4 -m kdistpp.sfd train ... --parallel fsdp --precision bf16
    accelerate launch --use_fsdp --fsdp_version 2 --num_processes 4 --mixed_precision bf16 -m kdistpp.sfd train ...
    python -m kdistpp.sfd export --run run/ --output sfd_lora.safetensors

`train` reads the teacher (a diffusers folder, `save_pretrained` layout: SD 1.x/2.x, SDXL, SD3, Flux; or a
single-file checkpoint as the hosts load, with `--teacher-config` giving its diffusers configs offline),
embeds the prompts once with its text encoders (cached in the output folder) and frees them, and
trains a LoRA (or full) student by SFD. It writes `loss.csv`, `checkpoint.pt`, a sample grid per checkpoint (`samples_<iteration>.png`:
student above, teacher's Euler at the same timestamps below, same seeds) and, at the end, the
student as a LoRA file the hosts load (`student_lora.safetensors`). Rank 0 alone logs and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path

import torch

from .teacher import TeacherSource, check_teacher, load_network, load_pipeline

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # no fp16: its training needs loss scaling


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" for the options whose default is a value; an option whose default is
    None (worked out at run time, as its help says) or that is required shows none."""

    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdistpp.sfd", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="distil a few-step student by SFD", formatter_class=_HelpFormatter)
    t.add_argument("--teacher", required=True, help="the teacher: a diffusers pipeline folder (model_index.json, "
                   "save_pretrained layout) of an SD 1.x/2.x or SDXL UNet model, or of an SD3 or Flux flow transformer; "
                   "or a single-file checkpoint (.safetensors/.ckpt: an A1111/ComfyUI SD 1.x/SDXL checkpoint, a "
                   "Flux/SD3 transformer file) with --teacher-config")
    t.add_argument("--teacher-config", default=None, help="for a single-file --teacher: a diffusers folder of the "
                   "same architecture (save_pretrained's, or the model repository's model_index.json, configs and "
                   "tokenizers) giving its configs offline; text encoders and VAE the file does not hold are read "
                   "from it (default: the configs of the repository diffusers infers from the file's keys, from the "
                   "Hugging Face cache, or downloaded unless HF_HUB_OFFLINE is set)")
    t.add_argument("--prompts", required=True, help="prompts file: one prompt per line, or .jsonl with a 'prompt' field")
    t.add_argument("--output", required=True, help="output folder (checkpoint, loss.csv, sample grids, LoRA file)")
    t.add_argument("--steps", default="4", help="number of student timestamps N (NFE = N - 1); several, comma-separated "
                   "(e.g. 4,5,6,7), train one SFD-v student for all of them")
    t.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the student (0: full fine-tuning)")
    t.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (scale alpha / rank; default: the rank)")
    t.add_argument("--iterations", type=int, default=1600, help="trajectory batches (each makes N - 1 optimizer steps)")
    t.add_argument("--batch-size", type=int, default=4, help="trajectories per batch and process")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate, divided by 10 halfway "
                   "(default: 5e-5 for full fine-tuning, 1e-4 for LoRA)")
    t.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the UNet's sample size times the VAE's downsampling factor)")
    t.add_argument("--sigma-min", type=float, default=None, help="last student timestamp, in VE sigma (default: 0.1 "
                   "for a UNet, as SFD for Stable Diffusion; 0.006 for a flow transformer, flow sigma 0.006)")
    t.add_argument("--sigma-max", type=float, default=None, help="first student timestamp, in VE sigma (default: the "
                   "UNet's largest sigma; 80 for a flow transformer, flow sigma 80/81)")
    t.add_argument("--guidance", type=float, default=None, help="Flux-dev's distilled guidance value, an input of "
                   "teacher and student (guidance-distilled Flux transformers need it; others take none)")
    t.add_argument("--teacher-cfg", type=float, default=1.0, help="teacher's classifier-free guidance scale against "
                   "the empty prompt (SFD distils at 1; the student is then sampled at any scale)")
    t.add_argument("--afs", action="store_true", help="analytic first step (no model call at sigma_max; NFE = N - 2)")
    t.add_argument("--precision", choices=sorted(PRECISIONS), default=None, help="autocast dtype of the networks' "
                   "compute (weights, optimizer and step arithmetic stay float32) (default: fp32, or what "
                   "`accelerate launch --mixed_precision` asks for: bf16 or no)")
    t.add_argument("--parallel", choices=("ddp", "fsdp"), default=None, help="under torchrun/accelerate launch: "
                   "DistributedDataParallel or FSDP2 (fully_shard per block) for the student (default: ddp, or fsdp "
                   "under `accelerate launch --use_fsdp --fsdp_version 2`)")
    t.add_argument("--ema", type=float, default=None, help="keep an EMA of the trained weights with this decay "
                   "(e.g. 0.999); the sample grids and the LoRA file then use it (SFD's authors use none)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    t.add_argument("--checkpoint-every", type=int, default=200, help="iterations between checkpoints and sample grids (0: at the end only)")
    t.add_argument("--samples", type=int, default=4, help="images per row of the sample grid (0: no grids)")
    t.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    t.add_argument("--seed", type=int, default=0, help="seed of noise, prompts and step counts")
    t.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK when available, else cpu)")
    t.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e = sub.add_parser("export", help="write a trained student as a LoRA file or a full UNet",
                       formatter_class=_HelpFormatter)
    e.add_argument("--run", required=True, help="the output folder of `train` (its run.json names the teacher, "
                   "folder or single file and --teacher-config, whose network the student is rebuilt on)")
    e.add_argument("--output", required=True, help="the file (.safetensors LoRA) or folder (--full) to write")
    e.add_argument("--full", action="store_true", help="write the merged student as a diffusers network folder "
                   "(UNet or transformer) instead of a LoRA")
    e.add_argument("--steps", type=int, default=None, help="an SFD-v run's step count N to write the full network "
                   "for (its step embedding at N folded in; with --full)")
    e.add_argument("--format", choices=("diffusers", "kohya"), default=None, help="the LoRA file's key format. "
                   "A UNet (SD 1.x/2.x, SDXL) student: kohya only (diffusers, ComfyUI, A1111 and Forge load it). An SD3 "
                   "student: diffusers (diffusers' load_lora_weights, ComfyUI) or kohya (Forge, ComfyUI). A Flux "
                   "student: diffusers only (diffusers, ComfyUI). A format the family does not write is refused "
                   "(default: kohya for a UNet, diffusers for SD3 and Flux)")
    return p


def parse_steps(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--steps must be integers (comma-separated for SFD-v), got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise ValueError(f"--steps: SFD trains N >= 2 timestamps (NFE = N - 1), got {text!r}")
    return values[0] if len(values) == 1 else values


def sigma_range(args, flow: bool) -> tuple[float, float | None]:
    """(sigma_min, sigma_max) in VE sigma; sigma_max None: the UNet's own largest."""
    if flow:
        return args.sigma_min or 0.006, args.sigma_max or 80.0
    return args.sigma_min or 0.1, args.sigma_max


def _distributed_setup(device_arg):
    from .distributed import init_distributed

    return init_distributed(device_arg or None)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def train(args) -> int:
    from .prompts import read_prompts

    # every input check before a model is loaded
    steps = parse_steps(args.steps)
    prompts = read_prompts(args.prompts)
    teacher = check_teacher(args.teacher, args.teacher_config)
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0 (0: full fine-tuning), got {args.lora_rank}")
    if args.iterations < 1 or args.batch_size < 1:
        raise ValueError("--iterations and --batch-size must be >= 1")
    if args.teacher_cfg <= 0:
        raise ValueError(f"--teacher-cfg must be > 0 (1: no guidance), got {args.teacher_cfg}")
    out = Path(args.output)
    if args.resume and not (out / "checkpoint.pt").is_file():
        raise ValueError(f"--resume: no checkpoint.pt in {str(out)!r}")
    from .trainer import SFDConfig

    lr = args.lr or (5e-5 if args.lora_rank == 0 else 1e-4)
    flow = teacher.network_class != "UNet2DConditionModel"
    guided = teacher.network_class == "FluxTransformer2DModel" and teacher.network_config.get("guidance_embeds", False)
    if args.guidance is not None and not guided:
        raise ValueError("--guidance is a guidance-distilled Flux transformer's input (FLUX.1-dev): this teacher has "
                         "none (guide it with --teacher-cfg)")
    if guided and args.guidance is None:
        raise ValueError("this Flux transformer is guidance-distilled (FLUX.1-dev): pass its guidance value, e.g. "
                         "--guidance 3.5")
    from .distributed import launch_settings

    # `accelerate launch`'s --use_fsdp, --mixed_precision, --fsdp_activation_checkpointing as the options they mean
    args.parallel, args.precision, args.gradient_checkpointing = launch_settings(
        args.parallel, args.precision, args.gradient_checkpointing)
    sigma_min, sigma_max = sigma_range(args, flow)
    SFDConfig(num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max or 14.6, afs=args.afs, lr=lr,
              batch_size=args.batch_size, iterations=args.iterations, seed=args.seed)  # refuses a bad combination now

    joined = not torch.distributed.is_initialized()
    device = _distributed_setup(args.device)
    joined = joined and torch.distributed.is_initialized()
    try:
        if _rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
        return TrainingRun(args, teacher, prompts, steps, lr, device).train()
    finally:
        if joined:  # left to interpreter exit, gloo's worker threads can abort the process after a finished run
            torch.distributed.destroy_process_group()


class TrainingRun:
    """The teacher pipeline loaded, prompts embedded and cached, student built; `train` runs SFD."""

    def __init__(self, args, teacher: TeacherSource, prompts: list[str], steps, lr: float, device):
        from .lora import DEFAULT_TARGETS, LoRATeacher, add_lora
        from .flow import FlowAsVE
        from .networks import CFGTeacher, FlowTransformerStudent, UNetStudent
        from .prompts import cached_embeddings
        from .trainer import SFDConfig, SFDTrainer

        self.args, self.out, self.device, self.rank = args, Path(args.output), device, _rank()
        pipe = load_pipeline(teacher)
        cache = self.out / "prompt_embeddings.safetensors"
        if self.rank == 0:
            embeddings = cached_embeddings(pipe.to(device), prompts, cache, device, source=teacher.identity)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if self.rank != 0:
            embeddings = cached_embeddings(None, prompts, cache, source=teacher.identity)
        self.embeddings = {k: v.to(device) for k, v in embeddings.items()}
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3"):
            # training never holds them
            if getattr(pipe, name, None) is not None:
                setattr(pipe, name, None)
        self.vae = pipe.vae.to(device).requires_grad_(False).eval()
        self.flow = getattr(pipe, "unet", None) is None
        network = (pipe.transformer if self.flow else pipe.unet).to(device)
        self.kind = type(network).__name__
        self.sdxl = getattr(network.config, "addition_embed_type", None) == "text_time"
        if args.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        step_conditioned = not isinstance(steps, int)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)  # the VAE's downsampling
        channels = network.config.in_channels // (4 if self.kind == "FluxTransformer2DModel" else 1)
        resolution = args.resolution or (network.config.sample_size * factor if not self.flow else 512)
        if resolution % (factor * 2):
            raise ValueError(f"--resolution must be a multiple of {factor * 2} (the VAE's factor, and 2x2 latent "
                             f"patches), got {resolution}")
        self.factor, self.latent = factor, (channels, resolution // factor, resolution // factor)
        torch.manual_seed(args.seed)  # peft draws lora_A (and SFD-v its embedding) from the global generator

        def wrap(net, step_conditioned=False):
            if self.flow:
                return FlowAsVE(FlowTransformerStudent(net, guidance=args.guidance, step_conditioned=step_conditioned))
            return UNetStudent(net, pipe.scheduler, step_conditioned=step_conditioned)

        if args.lora_rank:
            student = wrap(add_lora(network, args.lora_rank, args.lora_alpha), step_conditioned).to(device)
            base = LoRATeacher(student)
        else:
            import copy

            frozen = copy.deepcopy(network).requires_grad_(False).eval()
            student = wrap(network.requires_grad_(True), step_conditioned).to(device)
            base = wrap(frozen)
        self.teacher = CFGTeacher(base, self.cond_rows(None, uncond=True), args.teacher_cfg)
        sigma_min, sigma_max = sigma_range(args, self.flow)
        sigma_max = sigma_max or student.sigma_max
        self.config = SFDConfig(num_steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, afs=args.afs, lr=lr,
                                batch_size=args.batch_size, iterations=args.iterations, seed=args.seed)
        self.prompt_count = self.embeddings["cond.encoder_hidden_states"].shape[0]
        self.trainer = SFDTrainer(student, self.teacher, self.config, shape=self.latent, condition=self.condition,
                                  parallel=args.parallel, autocast=PRECISIONS[args.precision], ema=args.ema)
        self.student = student
        if self.rank == 0:  # what `export` rebuilds the student from
            # absolute paths, and the config folder the file was read with (given or inferred): `export` from anywhere
            where = {"teacher": str((teacher.file or teacher.folder).resolve()),
                     "teacher_config": str(teacher.folder.resolve()) if teacher.file else None}
            (self.out / "run.json").write_text(json.dumps({**vars(args), **where, "sigma_max": sigma_max, "lr": lr,
                                                           "lora_targets": list(DEFAULT_TARGETS)}, indent=2))

    def cond_rows(self, index, uncond: bool = False) -> dict:
        """The UNet's keyword arguments for prompt rows `index` (or the empty prompt)."""
        prefix = "uncond." if uncond else "cond."
        hidden = self.embeddings[prefix + "encoder_hidden_states"]
        hidden = hidden if index is None else hidden[index]
        cond = {"encoder_hidden_states": hidden}
        if self.flow:
            pooled = self.embeddings[prefix + "pooled"]
            cond["pooled_projections"] = pooled if index is None else pooled[index]
        elif self.sdxl:
            from ..integrations.diffusers import sdxl_time_ids

            pooled = self.embeddings[prefix + "pooled"]
            pooled = pooled if index is None else pooled[index]
            side = self.latent[1] * self.factor
            cond["added_cond_kwargs"] = {"text_embeds": pooled,
                                         "time_ids": sdxl_time_ids(side, side, pooled.shape[0], device=pooled.device)}
        return cond

    def condition(self, generator, batch: int) -> dict:
        index = torch.randint(self.prompt_count, (batch,), generator=generator).to(self.device)
        return {"cond": self.cond_rows(index)}

    def train(self) -> int:
        from tqdm.auto import tqdm

        trainer, cfg, out = self.trainer, self.config, self.out
        if self.args.resume:
            trainer.load(str(out / "checkpoint.pt"))
        every = self.args.checkpoint_every or cfg.iterations
        bar = tqdm(total=cfg.iterations, initial=trainer.iteration, desc="SFD",
                   disable=self.args.no_progress or self.rank != 0)
        log = out / "loss.csv"
        if self.rank == 0 and not (self.args.resume and log.is_file()):
            log.write_text("iteration,loss,lr\n")
        while trainer.iteration < cfg.iterations:
            loss = trainer.train_batch()
            if self.rank == 0:
                with log.open("a", newline="") as f:
                    csv.writer(f).writerow([trainer.iteration, f"{loss:.6g}", f"{trainer.learning_rate(trainer.iteration - 1):.3g}"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}")
            if trainer.iteration % every == 0 or trainer.iteration == cfg.iterations:
                trainer.save(str(out / "checkpoint.pt"))
                if self.args.samples:
                    self.sample_grid(out / f"samples_{trainer.iteration:06d}.png")
        bar.close()
        if self.args.lora_rank and not cfg.step_conditioned:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from .export import save_lora

            # gathered on every rank (a collective under FSDP), written by rank 0
            state = trainer._full_ema() if trainer.ema is not None else get_model_state_dict(
                self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
            if self.rank == 0:
                save_lora(self.student, out / "student_lora.safetensors", {"kdistpp_sfd_steps": cfg.num_steps}, state)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        return 0

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """Student (top row) and the teacher's Euler on the same timestamps (bottom row), same seeds and
        prompts, at the first trained step count: decoded by the VAE, written as one PNG (by rank 0; every
        rank samples, as an FSDP-sharded student needs all of them)."""
        from ..png import write_png
        from .sampling import sample_sfd

        cfg, n = self.config, self.config.step_choices[0]
        count = self.args.samples
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(count, *self.latent, generator=g).to(self.device) * cfg.sigma_max
        index = torch.arange(count, device=self.device) % self.prompt_count
        cond = self.cond_rows(index)
        self.student.eval()
        with self.trainer.ema_weights() if self.trainer.ema is not None else contextlib.nullcontext():
            student = sample_sfd(self.student, x, cfg, n, extra_args={"cond": cond}, disable=True)
        teacher_cfg = type(cfg)(**{**vars(cfg), "num_steps": n, "afs": False})

        def teacher(x, sigma, num_steps=None, **extra):
            return self.teacher(x, sigma, **extra)

        reference = sample_sfd(teacher, x, teacher_cfg, n, extra_args={"cond": cond}, disable=True)
        rows = [self.decode(student), self.decode(reference)]
        if self.rank == 0:
            write_png(path, torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).cpu().numpy())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        scale = getattr(self.vae.config, "scaling_factor", 0.18215)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        if self.flow:  # the VE state at sigma_min as the flow state the VAE's latents are
            from ..flow import to_flow

            latents = to_flow(latents, self.config.sigma_min)
        images = self.vae.decode((latents / scale + shift).to(self.vae.dtype)).sample.float()
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def check_lora_file(teacher: TeacherSource, targets, format: str | None) -> None:
    """That the run's student can be written as a LoRA file in `format`, from the teacher's network class
    and config alone: kohya's SD3 format also needs an MMDiT name for each targeted module, read from an
    empty skeleton of the network on the meta device (no weights)."""
    from .export import check_kohya_paths, lora_format

    if lora_format(teacher.network_class, format) == "kohya" and teacher.network_class == "SD3Transformer2DModel":
        import diffusers

        from .lora import targeted_paths

        with torch.device("meta"):
            skeleton = getattr(diffusers, teacher.network_class).from_config(teacher.network_config)
        check_kohya_paths(targeted_paths(skeleton, targets), skeleton)


def export(args) -> int:
    """Rebuilds the run's student (teacher weights + trained ones from checkpoint.pt) and writes it."""
    import diffusers

    from .export import save_full, save_lora
    from .flow import FlowAsVE
    from .lora import DEFAULT_TARGETS, add_lora
    from .networks import FlowTransformerStudent, UNetStudent

    run = Path(args.run)
    if not (run / "run.json").is_file() or not (run / "checkpoint.pt").is_file():
        raise ValueError(f"--run {args.run!r} is not a finished `train` output folder (needs run.json and checkpoint.pt)")
    settings = json.loads((run / "run.json").read_text())
    steps = parse_steps(settings["steps"])
    step_conditioned = not isinstance(steps, int)
    if step_conditioned and not (args.full and args.steps in steps):
        raise ValueError(f"this run trained an SFD-v student (--steps {settings['steps']}): its step embedding is not "
                         "part of a LoRA the hosts load; write a full network for one of its step counts with "
                         f"--full --steps N (N in {list(steps)})")
    if not step_conditioned and args.steps is not None:
        raise ValueError("--steps is for SFD-v runs (several step counts); this run trained one")
    if args.full and args.format is not None:
        raise ValueError("--format is the key format of a LoRA file; --full writes a diffusers network folder")
    if not args.full and not settings["lora_rank"]:
        raise ValueError("this run fine-tuned the whole network (--lora-rank 0): export it with --full")
    teacher = check_teacher(settings["teacher"], settings.get("teacher_config"))
    targets = settings.get("lora_targets") or DEFAULT_TARGETS
    if not args.full:
        check_lora_file(teacher, targets, args.format)
    network = load_network(teacher)
    if settings["lora_rank"]:
        network = add_lora(network, settings["lora_rank"], settings["lora_alpha"], targets)
    if teacher.network_class == "UNet2DConditionModel":
        student = UNetStudent(network, diffusers.DDPMScheduler.from_pretrained(str(teacher.folder / "scheduler")),
                              step_conditioned=step_conditioned)
    else:
        student = FlowAsVE(FlowTransformerStudent(network, guidance=settings.get("guidance"),
                                                  step_conditioned=step_conditioned))
    checkpoint = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    state = checkpoint["ema"] if settings.get("ema") else checkpoint["student"]  # the weights train wrote at its end
    missing = {n for n, p in student.named_parameters() if p.requires_grad} - set(state)
    if missing:
        raise ValueError(f"checkpoint.pt lacks trained weights of this student: {sorted(missing)[:3]}")
    student.load_state_dict(state, strict=False)
    if args.full:
        save_full(student, args.output, num_steps=args.steps)
    else:
        save_lora(student, args.output, {"kdistpp_sfd_steps": steps}, format=args.format)
    print(f"wrote {args.output}")
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return train(args) if args.command == "train" else export(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


__all__ = ["main", "parser", "parse_steps", "check_teacher"]
