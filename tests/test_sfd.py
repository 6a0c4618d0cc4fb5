"""SFD trainer: grids, the teacher solver, the training step, SFD-v, checkpoints, errors, DDP."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import DEVICE
from kdistpp.sfd import (
    MLPDenoiser,
    SFDConfig,
    SFDTrainer,
    dpmpp_3m_trajectory,
    multistep_update,
    nested_grid,
    polynomial_sigmas,
    sample_sfd,
)

SMALL = dict(sigma_min=0.01, sigma_max=20.0, batch_size=16, lr=1e-3)


def nets(step_conditioned=False, seed=0):
    torch.manual_seed(seed)
    teacher = MLPDenoiser(2, hidden=32, depth=2, sigma_data=1.0).to(DEVICE).requires_grad_(False)
    student = MLPDenoiser(2, hidden=32, depth=2, sigma_data=1.0, step_conditioned=step_conditioned).to(DEVICE)
    return student.load_teacher(teacher), teacher


def perturbed_copy(teacher, seed=1):
    student = copy.deepcopy(teacher).requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(p))
    return student


@given(n=st.integers(2, 12), k=st.integers(1, 6), rho=st.floats(1.0, 9.0))
def test_teacher_grid_contains_the_student_timestamps(n, k, rho):
    ts = polynomial_sigmas(n, 0.002, 80.0, rho)
    grid = nested_grid(ts, k, rho)
    assert len(grid) == k * (n - 1) + 1
    assert torch.equal(grid[::k], ts)
    assert float(ts[0]) == 80.0 and float(ts[-1]) == 0.002
    assert (grid[1:] < grid[:-1]).all()


def gaussian_pf_ode(s=1.0):
    """Data N(0, s^2): D(x, sigma) = s^2 x / (s^2 + sigma^2); the PF-ODE's x(sigma) is proportional to sqrt(s^2 + sigma^2)."""
    model = lambda x, sigma: x * s**2 / (s**2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2)  # noqa: E731
    exact = lambda sigma: math.sqrt(s**2 + sigma**2)  # noqa: E731
    return model, exact


@pytest.mark.parametrize("order", [1, 2, 3])
def test_multistep_update_has_local_error_of_order_plus_one(order):
    model, exact = gaussian_pf_ode()
    errors = []
    for h in (0.1, 0.05, 0.025):
        sig = [2.0 * math.exp(h * k) for k in range(order - 1, -1, -1)]  # history at larger sigmas, exact states
        states = [torch.full((1, 1), exact(s), dtype=torch.float64) for s in sig]
        denoised = [model(x, s) for x, s in zip(states, sig)]
        out = multistep_update(states[-1], denoised[-1], denoised[:-1], [h] * (order - 1), h, order)
        errors.append(abs(float(out) - exact(sig[-1] * math.exp(-h))))
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(r > order + 0.7 for r in rates), (errors, rates)


def test_dpmpp_3m_trajectory_converges_to_the_exact_ode_solution():
    model, exact = gaussian_pf_ode()
    x = torch.full((1, 1), exact(10.0), dtype=torch.float64, device=DEVICE)
    grid = polynomial_sigmas(41, 0.5, 10.0).to(DEVICE)
    states = dpmpp_3m_trajectory(model, x, grid)
    assert len(states) == 41
    assert float(states[-1]) == pytest.approx(exact(0.5), rel=1e-3)


def test_gradients_flow_through_the_current_step_only():
    student, teacher = nets()
    inputs = []
    original = student.forward

    def recording(x, sigma, **kw):
        inputs.append(x.requires_grad)
        return original(x, sigma, **kw)

    student.forward = recording
    trainer = SFDTrainer(student, teacher, SFDConfig(num_steps=5, iterations=1, **SMALL), shape=(2,))
    trainer.train_batch()
    assert inputs == [False] * 4  # N - 1 student steps, each from a detached state
    assert all(p.grad is not None for p in student.parameters())


def test_loss_falls_on_a_toy():
    _, teacher = nets()
    student = perturbed_copy(teacher)
    trainer = SFDTrainer(student, teacher, SFDConfig(num_steps=4, iterations=80, **SMALL), shape=(2,))
    losses = trainer.fit(progress=False)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_sfd_v_conditioning_starts_at_the_teacher_and_learns_per_step_count():
    student, teacher = nets(step_conditioned=True)
    x, sigma = torch.randn(8, 2, device=DEVICE), torch.full((8,), 3.0, device=DEVICE)
    for n in (3, 6):
        assert torch.allclose(student(x, sigma, num_steps=n), teacher(x, sigma))
    with pytest.raises(TypeError, match="num_steps"):
        student(x, sigma)
    trainer = SFDTrainer(student, teacher, SFDConfig(num_steps=(3, 4, 5), iterations=12, **SMALL), shape=(2,))
    trainer.fit(progress=False)
    assert student.step_embedding.mlp[-1].weight.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(student(x, sigma, num_steps=3), student(x, sigma, num_steps=5))


def test_resume_equals_uninterrupted_training(tmp_path):
    config = SFDConfig(num_steps=(3, 4), iterations=6, lr_decay_at=0.5, **SMALL)
    _, teacher = nets()
    straight = SFDTrainer(perturbed_copy(teacher), teacher, config, shape=(2,))
    straight.fit(progress=False)

    first = SFDTrainer(perturbed_copy(teacher), teacher, config, shape=(2,))
    first.fit(3, progress=False, checkpoint=str(tmp_path / "ckpt.pt"))
    resumed = SFDTrainer(perturbed_copy(teacher, seed=9), teacher, config, shape=(2,)).load(str(tmp_path / "ckpt.pt"))
    assert resumed.iteration == 3
    resumed.fit(progress=False)
    assert resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for a, b in zip(resumed.student.parameters(), straight.student.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_training_is_deterministic_under_a_seed():
    _, teacher = nets()
    runs = []
    for _ in range(2):
        trainer = SFDTrainer(perturbed_copy(teacher), teacher, SFDConfig(num_steps=(3, 4), iterations=3, **SMALL), shape=(2,))
        runs.append(trainer.fit(progress=False))
    assert runs[0] == pytest.approx(runs[1], rel=1e-6)


def test_afs_skips_the_first_model_call_in_training_and_sampling():
    student, teacher = nets()
    calls = []
    original = student.forward
    student.forward = lambda x, sigma, **kw: calls.append(float(sigma[0])) or original(x, sigma, **kw)
    config = SFDConfig(num_steps=4, afs=True, iterations=1, **SMALL)
    SFDTrainer(student, teacher, config, shape=(2,)).train_batch()
    assert len(calls) == 2 and 20.0 not in calls
    calls.clear()
    out = sample_sfd(student, torch.randn(5, 2, device=DEVICE) * 20.0, config, disable=True)
    assert len(calls) == 2 and out.shape == (5, 2) and torch.isfinite(out).all()


def test_distillation_pp_on_top_of_an_sfd_student_costs_one_teacher_call():
    student, teacher = nets()
    calls = []
    counted = lambda x, sigma, **kw: calls.append(1) or teacher(x, sigma, **kw)  # noqa: E731
    config = SFDConfig(num_steps=4, **SMALL)
    x = torch.randn(5, 2, device=DEVICE) * 20.0
    plain = sample_sfd(student, x, config, disable=True)
    guided = sample_sfd(student, x, config, disable=True, teacher=counted, w=0.5)
    assert len(calls) == 1 and not torch.allclose(plain, guided)


def test_bad_input_gets_a_clear_error():
    student, teacher = nets()
    with pytest.raises(ValueError, match="num_steps"):
        SFDConfig(num_steps=1)
    with pytest.raises(ValueError, match="substeps"):
        SFDConfig(substeps=0)
    with pytest.raises(ValueError, match="afs"):
        SFDConfig(num_steps=2, afs=True)
    with pytest.raises(TypeError, match="student must be a torch.nn.Module"):
        SFDTrainer(teacher.forward, teacher, SFDConfig())
    with pytest.raises(ValueError, match="shape"):
        SFDTrainer(student, teacher, SFDConfig(**SMALL)).train_batch()
    wrong = lambda x, sigma: x[:, :1]  # noqa: E731
    with pytest.raises(ValueError, match="teacher returned shape"):
        SFDTrainer(student, wrong, SFDConfig(**SMALL), shape=(2,)).train_batch()
    with pytest.raises(ValueError, match="non-finite"):
        SFDTrainer(student, lambda x, sigma: x * float("nan"), SFDConfig(**SMALL), shape=(2,)).train_batch()


def _ddp_setup(kind):
    """The same student, teacher and config on every rank and in the one-process reference."""
    torch.manual_seed(0)
    teacher = MLPDenoiser(2, hidden=16, depth=1, sigma_data=1.0).requires_grad_(False)
    if kind == "sfd":
        return SFDTrainer(perturbed_copy(teacher), teacher, SFDConfig(num_steps=3, iterations=3, **SMALL), shape=(2,))
    student = MLPDenoiser(2, hidden=16, depth=1, sigma_data=1.0, step_conditioned=True).load_teacher(teacher)
    # SFD-v: each batch draws N; every rank must draw the same N or DDP's replicas part
    return SFDTrainer(student, teacher, SFDConfig(num_steps=(3, 4, 5), iterations=3, **SMALL), shape=(2,))


def _ddp_batch(rank, iteration):
    return torch.randn(8, 2, generator=torch.Generator().manual_seed(100 + rank + 10 * iteration)) * SMALL["sigma_max"]


def _ddp_worker(rank, world, init_file, result_file, kind):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    trainer = _ddp_setup(kind)
    for it in range(3):
        trainer.train_batch(_ddp_batch(rank, it))
    if rank == 0:
        torch.save(trainer.student.state_dict(), result_file)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sfd", "sfd_v"])
def test_two_process_gloo_training_equals_one_process_on_the_joint_batch(tmp_path, kind):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt"), kind), nprocs=2)
    trainer = _ddp_setup(kind)
    for it in range(3):
        trainer.train_batch(torch.cat([_ddp_batch(r, it) for r in (0, 1)]))
    ddp = torch.load(tmp_path / "ddp.pt")
    for name, p in trainer.student.state_dict().items():
        assert torch.allclose(p, ddp[name], atol=1e-5), name
