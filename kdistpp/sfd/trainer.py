"""SFD: Simple and Fast Distillation of a few-step student (Zhou et al. 2024, Algorithm 2).

Per trajectory batch: the teacher solves the PF-ODE with DPM-Solver++(3M) on the nested grid; the
student walks the same timestamps one Euler step at a time from its *own* detached previous state,
and after each step takes one optimizer step on the L1 distance to the teacher's state there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import random
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import trange

from .trajectory import (analytic_denoised, broadcast_sigma, dpmpp_3m_trajectory, euler_step, euler_trajectory, nested_grid,
                         polynomial_sigmas)

TEACHER_SOLVERS = {"dpmpp_3m": dpmpp_3m_trajectory, "euler": euler_trajectory}


@dataclasses.dataclass
class SFDConfig:
    """SFD's hyperparameters. The defaults are the authors' for pixel EDM models (sigma 0.006..80;
    SD: 0.1..14.6) except `afs`: their launch scripts turn the analytical first step on; here it is
    off by default so that NFE = N - 1 and every interval is trained (pass afs=True for theirs).

    num_steps: N timestamps (NFE N - 1; N - 2 with `afs`), or a sequence of N for SFD-v, one drawn
        per batch and passed to the student as `num_steps` (a (B,) long tensor).
    iterations: trajectory batches; each makes N - 1 optimizer steps (one less with `afs`).
    lr_decay_at: fraction of `iterations` after which the learning rate is divided by 10.
    afs: analytical first step (untrained, no model call); sigma_data is the std it assumes for x0.
    teacher_solver: "dpmpp_3m" (SFD's teacher solver) or "euler" (the second stage's, whose teacher is a
        first-stage student; see `second_stage`).
    """

    num_steps: int | Sequence[int] = 4
    sigma_min: float = 0.006
    sigma_max: float = 80.0
    rho: float = 7.0
    substeps: int = 4
    teacher_solver: str = "dpmpp_3m"
    afs: bool = False
    sigma_data: float = 1.0
    lr: float = 5e-5
    lr_decay_at: float = 0.5
    batch_size: int = 128
    iterations: int = 1600
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.num_steps, numbers.Integral) and not isinstance(self.num_steps, bool):
            self.num_steps = int(self.num_steps)  # numpy ints too
        choices = self.step_choices
        if not choices or any(not isinstance(n, int) or n < 2 for n in choices):
            raise ValueError(f"num_steps must be an int >= 2 or a non-empty sequence of them, got {self.num_steps!r}")
        if self.afs and min(choices) < 3:
            raise ValueError("afs=True takes the first interval analytically: num_steps must be >= 3")
        if not isinstance(self.substeps, int) or self.substeps < 1:
            raise ValueError(f"substeps (K) must be an int >= 1, got {self.substeps!r}")
        if self.teacher_solver not in TEACHER_SOLVERS:
            raise ValueError(f"teacher_solver must be one of {sorted(TEACHER_SOLVERS)}, got {self.teacher_solver!r}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.batch_size < 1 or self.iterations < 1 or self.lr <= 0:
            raise ValueError("batch_size and iterations must be >= 1 and lr > 0")

    @property
    def step_choices(self) -> tuple[int, ...]:
        return (self.num_steps,) if isinstance(self.num_steps, int) else tuple(self.num_steps)

    @property
    def step_conditioned(self) -> bool:
        return not isinstance(self.num_steps, int)

    def trained_steps(self, n: int | None = None) -> int:
        """n checked against the timestamp counts this config trains: a student sampled at a count it
        was not trained for walks timestamps it never saw. None means the one count of a plain SFD
        config; an SFD-v config trains several, so it needs n."""
        if n is None:
            if self.step_conditioned:
                raise ValueError(f"this SFD-v config trains num_steps in {self.step_choices}: pass one of them")
            return self.num_steps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) not in self.step_choices:
            raise ValueError(f"num_steps={n!r} is not a timestamp count this config trains {self.step_choices}; "
                             "pick one of them, or train a student for it")
        return int(n)

    def timestamps(self, n: int | None = None, device="cpu") -> torch.Tensor:
        """The student's sampling schedule for N = n timestamps (ends at sigma_min, no zero)."""
        return polynomial_sigmas(self.trained_steps(n), self.sigma_min, self.sigma_max, self.rho, device)


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SFDTrainer:
    """Distils `teacher` into `student` (usually a copy of it) by SFD.

    Both are denoisers in k-diffusion's VE-sigma form, D(x, sigma, **extra) -> x0. Under
    torch.distributed (torchrun, accelerate launch) the student is wrapped in DistributedDataParallel,
    each rank draws its own noise, all ranks draw the same SFD-v step count N per batch (a separate
    generator seeded alike on every rank: DDP needs the same graph, hence the same number of
    optimizer steps, on every replica), and rank 0 alone shows progress and writes checkpoints: the
    same script runs on one device or many.

    Conditional models: `condition(generator, batch_size)` returns the batch's extra_args; the teacher
    gets them updated with `teacher_extra_args` (e.g. a guidance scale; SFD distils at scale 1).

    Only the student's parameters with requires_grad are optimised (a LoRA student's adapters).
    `parallel="fsdp"` shards the student with FSDP2 (`fully_shard` per block, then the whole
    network; `kdistpp.sfd.distributed.shard`) instead of DDP; shard a separate frozen teacher the
    same way yourself, or pass a `LoRATeacher`, which is the sharded student with its adapters off.
    `autocast` (e.g. torch.bfloat16) runs student and teacher under torch.autocast while the weights,
    the optimizer and the step arithmetic stay float32. `ema` (a decay, e.g. 0.999) keeps an exponential
    moving average of the trained weights after every optimizer step (`ema_weights()` swaps it in); SFD's
    authors use none.
    """

    def __init__(self, student: nn.Module, teacher: Callable, config: SFDConfig | None = None, *,
                 shape: Sequence[int] | None = None, condition: Callable | None = None,
                 teacher_extra_args: dict | None = None, optimizer: torch.optim.Optimizer | None = None,
                 parallel: str = "ddp", autocast: torch.dtype | None = None, ema: float | None = None):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module (its weights are trained), got {type(student).__name__}")
        if not callable(teacher):
            raise TypeError(f"teacher must be a denoiser D(x, sigma, **extra), got {type(teacher).__name__}")
        from .networks import check_pair

        check_pair(student, teacher)
        self.config = config or SFDConfig()
        self.student, self.teacher = student, teacher
        self.shape = tuple(shape) if shape is not None else None
        self.condition, self.teacher_extra_args = condition, dict(teacher_extra_args or {})
        if parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {parallel!r}")
        if autocast is not None and not (isinstance(autocast, torch.dtype) and autocast.is_floating_point):
            raise TypeError(f"autocast must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {autocast!r}")
        self.rank, self.world_size = _distributed()
        if ema is not None and not 0.0 < ema < 1.0:
            raise ValueError(f"ema must be a decay in (0, 1), e.g. 0.999, or None, got {ema!r}")
        self.parallel, self.autocast, self.ema_decay = parallel, autocast, ema
        self.model = student
        if self.world_size > 1 and parallel == "ddp":
            self.model = nn.parallel.DistributedDataParallel(student)
        elif self.world_size > 1:
            from .distributed import shard

            self.model = shard(student)
        trainable = [p for p in student.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("the student has no parameter with requires_grad=True: nothing would be trained")
        self.optimizer = optimizer or torch.optim.Adam(trainable, lr=self.config.lr, betas=(0.9, 0.999), eps=1e-8)
        self.ema = None if ema is None else {name: p.detach().clone() for name, p in self.trained_parameters()}
        self.generator = torch.Generator().manual_seed(self.config.seed * 1000 + self.rank)  # noise, per rank
        self.step_generator = torch.Generator().manual_seed(self.config.seed)  # SFD-v's N, the same on all ranks
        self.iteration = 0
        self.losses: list[float] = []

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def learning_rate(self, iteration: int) -> float:
        """SFD's schedule: lr, divided by 10 after `lr_decay_at` of the iterations."""
        return self.config.lr * (0.1 if iteration >= self.config.lr_decay_at * self.config.iterations else 1.0)

    def draw_noise(self, batch_size: int | None = None) -> torch.Tensor:
        if self.shape is None:
            raise ValueError("pass shape=(C, H, W) (one sample's shape) to SFDTrainer, or x_T to train_batch")
        z = torch.randn((batch_size or self.config.batch_size, *self.shape), generator=self.generator)
        return z.to(self.device) * self.config.sigma_max

    def train_batch(self, x_T: torch.Tensor | None = None, extra_args: dict | None = None, num_steps: int | None = None) -> float:
        """One trajectory batch (Algorithm 2's inner loop); returns the mean L1 loss over its student steps."""
        cfg = self.config
        n = num_steps or (cfg.step_choices[int(torch.randint(len(cfg.step_choices), (), generator=self.step_generator))])
        x = self.draw_noise() if x_T is None else x_T
        if extra_args is None and self.condition is not None:
            extra_args = self.condition(self.generator, x.shape[0])
        extra_args = dict(extra_args or {})
        teacher_args = {**extra_args, **self.teacher_extra_args}
        if cfg.step_conditioned:
            extra_args["num_steps"] = torch.full((x.shape[0],), n, dtype=torch.long, device=x.device)
        ts = cfg.timestamps(n)
        grid = nested_grid(ts, cfg.substeps, cfg.rho)
        self.teacher_eval()
        with self.autocast_context():
            targets = TEACHER_SOLVERS[cfg.teacher_solver](self.teacher, x, grid, teacher_args)[:: cfg.substeps]
        lr = self.learning_rate(self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        losses = []
        for i in range(n - 1):
            t, t_next = float(ts[i]), float(ts[i + 1])
            if cfg.afs and i == 0:
                x = euler_step(x, t, t_next, analytic_denoised(x, t, cfg.sigma_data))
                continue
            with self.autocast_context():
                denoised = self.model(x, broadcast_sigma(t, x), **extra_args).to(x.dtype)
            if denoised.shape != x.shape:
                raise ValueError(f"student returned shape {tuple(denoised.shape)} for input {tuple(x.shape)}")
            x_next = euler_step(x, t, t_next, denoised)
            loss = (x_next - targets[i + 1]).abs().flatten(1).sum(1).mean()  # L1 per sample, as the authors
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.update_ema()
            losses.append(loss.item())
            x = x_next.detach()  # the next step starts from the student's own state; no gradient through it
        self.iteration += 1
        mean = sum(losses) / len(losses)
        self.losses.append(mean)
        return mean

    def trained_parameters(self):
        return [(name, p) for name, p in self.student.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights (on FSDP's shards alike: the update is elementwise)."""
        if self.ema is None:
            return
        for name, p in self.trained_parameters():
            self.ema[name].lerp_(p.detach(), 1.0 - self.ema_decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the student holds its EMA weights (for sampling or export); restored after."""
        if self.ema is None:
            raise ValueError("this trainer keeps no EMA: build it with ema=<decay>")
        saved = {}
        with torch.no_grad():
            for name, p in self.trained_parameters():
                saved[name] = p.detach().clone()
                p.copy_(self.ema[name])
        try:
            yield self.student
        finally:
            with torch.no_grad():
                for name, p in self.trained_parameters():
                    p.copy_(saved[name])

    def autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def teacher_eval(self) -> None:
        if isinstance(self.teacher, nn.Module):
            self.teacher.eval()

    def fit(self, iterations: int | None = None, *, progress: bool = True, checkpoint: str | None = None,
            checkpoint_every: int = 0) -> list[float]:
        """Trains up to `iterations` trajectory batches in total (default config.iterations), resuming
        from the current iteration; saves to `checkpoint` every `checkpoint_every` batches and at the end."""
        total = iterations or self.config.iterations
        bar = trange(self.iteration, total, disable=not progress or self.rank != 0, desc="SFD")
        for _ in bar:
            bar.set_postfix(loss=f"{self.train_batch():.4g}", lr=f"{self.learning_rate(self.iteration - 1):.1e}")
            if checkpoint and checkpoint_every and self.iteration % checkpoint_every == 0:
                self.save(checkpoint)
        if checkpoint:
            self.save(checkpoint)
        self.student.eval()
        return self.losses

    def state_dict(self) -> dict:
        """The training state: the student's trainable weights (its frozen ones are the teacher's, loaded
        with it), the optimizer, iteration, and every rank's noise generator. A collective call under
        torch.distributed (FSDP's shards are gathered): every rank calls it; rank 0 gets the tensors."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        student, optimizer = get_state_dict(self.student, self.optimizer, options=options)
        generators = [self.generator.get_state()]
        if self.world_size > 1:
            generators = [None] * self.world_size
            torch.distributed.all_gather_object(generators, self.generator.get_state())
        return {"student": student, "optimizer": optimizer,
                "iteration": self.iteration, "generators": generators,
                "step_generator": self.step_generator.get_state(), "losses": list(self.losses),
                "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                "config": dataclasses.asdict(self.config), "ema": self._full_ema()}

    def _full_ema(self) -> dict | None:
        """The EMA as full CPU tensors (FSDP's shards gathered: a collective, like the rest of state_dict)."""
        if self.ema is None:
            return None
        return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu() for name, t in self.ema.items()}

    def save(self, path: str) -> None:
        """Writes model, optimizer, iteration and RNG states; under torch.distributed every rank must call
        it (the state is gathered) and rank 0 alone writes."""
        state = self.state_dict()
        if self.rank == 0:
            torch.save(state, path)

    def load(self, path: str) -> "SFDTrainer":
        """Restores a checkpoint written by `save`; training then continues exactly where it stopped.
        Under torch.distributed every rank reads `path` (a file system all ranks see) and the same
        number of processes must run as when it was written."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers and tuples only
        saved = SFDConfig(**state["config"])
        if dataclasses.asdict(saved) != dataclasses.asdict(self.config):
            raise ValueError(f"checkpoint was trained with {saved}, this trainer has {self.config}")
        if len(state["generators"]) != self.world_size:
            raise ValueError(f"checkpoint was written by {len(state['generators'])} processes, this run has "
                             f"{self.world_size}: resume with as many (each rank's noise stream is in it)")
        trainable = {name for name, p in self.student.named_parameters() if p.requires_grad}
        if not trainable <= set(state["student"]):
            raise ValueError(f"checkpoint lacks trainable weights of this student: {sorted(trainable - set(state['student']))[:5]}")
        set_state_dict(self.student, self.optimizer, model_state_dict=state["student"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False))
        self.iteration, self.losses = state["iteration"], list(state["losses"])
        self.generator.set_state(state["generators"][self.rank].cpu())
        self.step_generator.set_state(state["step_generator"].cpu())
        if (state.get("ema") is None) != (self.ema is None):
            raise ValueError("checkpoint and trainer disagree on EMA: resume with the ema setting it was trained with")
        if self.ema is not None:
            for name, p in self.trained_parameters():
                full = state["ema"][name].to(p.device)
                if hasattr(p, "device_mesh"):  # an FSDP shard: this rank's part of the full tensor
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(full, p.device_mesh, p.placements)
                self.ema[name] = full.to(p.dtype)
        torch.set_rng_state(state["torch_rng"].cpu())
        random.setstate(state["python_rng"])
        return self
