"""SFD's second stage for one-step students: a first-stage SFD (or SFD-v) student is the teacher.

The new student has N = `num_steps` timestamps (3 with AFS: one model call); its teacher is the
first-stage student sampled by Euler on (M + 1)(N - 1) + 1 timestamps of the same polynomial
schedule, which the first stage must have trained (N = 7 for M = 2: an SFD student of 7 timestamps,
or an SFD-v student whose counts include 7). That teacher grid is SFD's nested grid with M + 1
sub-steps per student interval, so the student's targets are the teacher's Euler states at every
(M + 1)-th point. The student starts from a copy of the first-stage student; the authors' setting
is N = 3, M = 2, AFS and lr 5e-4.
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from .sampling import sfd_denoiser
from .trainer import SFDConfig


def second_stage(first_student: nn.Module, first_config: SFDConfig, num_steps: int = 3, m: int = 2, *,
                 afs: bool = True, lr: float = 5e-4, **config_changes) -> tuple[nn.Module, object, SFDConfig]:
    """(student, teacher, config) for `SFDTrainer(student, teacher, config, ...)`: the second stage.

    first_student/first_config: the trained first-stage student and its config (the schedule,
    sigma range, rho, AFS and SFD-v-ness are taken from it). `config_changes`: further SFDConfig
    fields (iterations, batch_size, seed, ...). An SFD-v first stage gives an SFD-v student trained
    at the one count `num_steps` (sample it with num_steps=`num_steps`).
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be an int >= 2 (the second-stage student's timestamps), got {num_steps!r}")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (teacher Euler steps per student interval, minus one) must be an int >= 1, got {m!r}")
    teacher_steps = (m + 1) * (num_steps - 1) + 1
    if teacher_steps not in first_config.step_choices:
        raise ValueError(f"the second stage with num_steps={num_steps}, m={m} needs a first-stage student trained at "
                         f"{teacher_steps} timestamps; this one trained {first_config.step_choices}")
    for field in ("num_steps", "substeps", "teacher_solver"):
        if field in config_changes:
            raise ValueError(f"{field} is set by the second stage itself")
    teacher_network = copy.deepcopy(first_student).requires_grad_(False).eval()
    teacher = sfd_denoiser(teacher_network, first_config, teacher_steps)
    config = dataclasses.replace(first_config, num_steps=(num_steps,) if first_config.step_conditioned else num_steps,
                                 substeps=m + 1, teacher_solver="euler", afs=afs, lr=lr, **config_changes)
    return _trainable_copy(first_student), teacher, config


def _trainable_copy(network: nn.Module) -> nn.Module:
    """A copy that trains what the first stage trained: its trainable weights as they were, or, for a
    network frozen after training, every weight (a LoRA network: its adapters and step embedding)."""
    student = copy.deepcopy(network)
    if not any(p.requires_grad for p in student.parameters()):
        lora = any("lora_" in name for name, _ in student.named_parameters())
        for name, p in student.named_parameters():
            p.requires_grad_(not lora or "lora_" in name or "step_embedding" in name)
    return student


__all__ = ["second_stage"]
