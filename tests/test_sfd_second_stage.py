"""SFD's second stage: a first-stage student, sampled by Euler on 7 timestamps, teaches a 1-NFE student."""

from __future__ import annotations

import copy

import pytest
import torch

from kdistpp import toys
from kdistpp.sfd import MLPDenoiser, SFDConfig, SFDTrainer, sample_sfd, train_dsm
from kdistpp.sfd.second_stage import second_stage

RANGE = dict(sigma_min=0.01, sigma_max=20.0)


@pytest.fixture(scope="module")
def first_stage():
    """A DSM teacher on a ring mixture, and a short first-stage SFD-v student at N in {4, 7}."""
    data = toys.ring_mixture(n_modes=4, radius=1.0, std=0.1, dim=2, seed=0).sample(2000)
    torch.manual_seed(0)
    teacher = MLPDenoiser(2, hidden=32, depth=2, sigma_data=float(data.std()))
    train_dsm(teacher, data, iterations=150, batch_size=128, progress=False)
    teacher.requires_grad_(False)
    student = MLPDenoiser(2, hidden=32, depth=2, sigma_data=teacher.sigma_data, step_conditioned=True).load_teacher(teacher)
    config = SFDConfig(num_steps=(4, 7), afs=True, lr=1e-3, batch_size=64, iterations=20, **RANGE)
    SFDTrainer(student, teacher, config, shape=(2,)).fit(progress=False)
    return student.requires_grad_(False), config


def test_the_targets_are_the_first_stage_students_own_euler_samples_at_every_third_timestamp(first_stage):
    first, first_config = first_stage
    student, teacher, config = second_stage(first, first_config, num_steps=3, m=2, iterations=1, batch_size=8)
    assert (config.num_steps, config.substeps, config.teacher_solver, config.afs) == ((3,), 3, "euler", True)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1)) * config.sigma_max
    seen = []
    trainer = SFDTrainer(student, teacher, config, shape=(2,))
    original = trainer.teacher
    trainer.teacher = lambda x_, s_, **kw: (seen.append(float(s_[0])), original(x_, s_, **kw))[1]
    trainer.train_batch(x)
    # the teacher was called on the first stage's 7 timestamps (its AFS point included, through the wrapper)
    assert seen == pytest.approx(first_config.timestamps(7)[:-1].tolist(), rel=1e-6)
    # its final state is what sampling the first-stage student at N = 7 gives (the library's sampler)
    from kdistpp.sfd.trajectory import euler_trajectory, nested_grid

    states = euler_trajectory(teacher, x, nested_grid(config.timestamps(3), 3, config.rho))
    visited = {}
    final = sample_sfd(first, x, first_config, num_steps=7, disable=True,
                       callback=lambda info: visited.setdefault(info["i"], info["x"].clone()))
    assert len(states) == 7
    assert torch.allclose(states[3], visited[3], atol=1e-5)  # the middle student target
    assert torch.allclose(states[-1], final, atol=1e-5)  # the last one


def test_second_stage_training_brings_the_one_step_student_to_its_teacher(first_stage):
    first, first_config = first_stage
    student, teacher, config = second_stage(first, first_config, num_steps=3, m=2, iterations=60, batch_size=64,
                                            lr=2e-3)
    before = copy.deepcopy(student)
    SFDTrainer(student, teacher, config, shape=(2,)).fit(progress=False)
    x = torch.randn(512, 2, generator=torch.Generator().manual_seed(7)) * config.sigma_max
    target = sample_sfd(first, x, first_config, num_steps=7, disable=True)
    error_before = (sample_sfd(before, x, config, num_steps=3, disable=True) - target).norm(dim=1).mean()
    error_after = (sample_sfd(student, x, config, num_steps=3, disable=True) - target).norm(dim=1).mean()
    assert error_after < 0.7 * error_before, (float(error_before), float(error_after))


def test_second_stage_refuses_a_first_stage_without_the_teacher_count(first_stage):
    first, first_config = first_stage
    with pytest.raises(ValueError, match="needs a first-stage student trained at 10 timestamps"):
        second_stage(first, first_config, num_steps=4, m=2)
    with pytest.raises(ValueError, match="set by the second stage"):
        second_stage(first, first_config, substeps=4)
    with pytest.raises(ValueError, match="teacher_solver"):
        SFDConfig(teacher_solver="heun")
