"""SFD's training step checked against independent computations: the student's own states, the
teacher's targets at the student's timestamps, the Euler step, the LR schedule, checkpoints,
SFD-v's step counts across ranks (the 2-process DDP runs are in test_sfd.py), and the 3M solver."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import DEVICE
from kdistpp.sfd import MLPDenoiser, SFDConfig, SFDTrainer, polynomial_sigmas, sample_sfd, train_dsm

S_DATA = 1.5  # the Gaussian data's std: its exact denoiser and PF-ODE solution are known in closed form


class GaussianDenoiser(nn.Module):
    """D(x, sigma) = c * x * s^2 / (s^2 + sigma^2); c = 1 is the exact denoiser of N(0, s^2)."""

    def __init__(self, c=1.0):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(float(c)))
        self.seen = []  # (input, output) per call

    def forward(self, x, sigma, **_):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        out = self.c * x * S_DATA**2 / (S_DATA**2 + s**2)
        self.seen.append((x.detach().clone(), out.detach().clone()))
        return out


def exact_ode_state(x_T, sigma_T, sigma):
    """The PF-ODE of N(0, s^2) scales x by sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_T^2)."""
    return x_T * math.sqrt(S_DATA**2 + sigma**2) / math.sqrt(S_DATA**2 + sigma_T**2)


def config(**kw):
    base = dict(num_steps=4, sigma_min=0.02, sigma_max=20.0, substeps=8, batch_size=6, lr=1e-3, iterations=4)
    return SFDConfig(**{**base, **kw})


def test_student_walks_its_own_euler_states_and_is_scored_at_its_timestamps():
    cfg = config()
    teacher, student = GaussianDenoiser(), GaussianDenoiser(c=0.7).to(DEVICE)
    trainer = SFDTrainer(student, teacher, cfg, shape=(3,), optimizer=torch.optim.SGD(student.parameters(), lr=0.0))
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE) * cfg.sigma_max
    loss = trainer.train_batch(x_T)
    ts = [float(t) for t in polynomial_sigmas(4, cfg.sigma_min, cfg.sigma_max)]
    x, expected_losses = x_T, []
    for i, (seen_x, seen_out) in enumerate(student.seen):
        # the student's input is its own previous Euler state, never the teacher's
        torch.testing.assert_close(seen_x, x, rtol=1e-5, atol=1e-5)
        x = x + (ts[i + 1] - ts[i]) * (x - seen_out) / ts[i]  # Euler, written out
        target = exact_ode_state(x_T, ts[0], ts[i + 1])
        expected_losses.append((x - target).abs().sum(1).mean().item())
    assert len(student.seen) == 3
    # the teacher's 3M trajectory on the nested grid is close to the exact solution at the student's timestamps
    assert loss == pytest.approx(sum(expected_losses) / 3, rel=2e-3)
    teacher_state = exact_ode_state(x_T, ts[0], ts[1])
    assert (student.seen[1][0] - teacher_state).abs().max() > 0.1  # teacher forcing would have fed this


def test_learning_rate_is_divided_by_ten_after_lr_decay_at():
    cfg = config(iterations=4, lr_decay_at=0.5, lr=1e-2)
    trainer = SFDTrainer(GaussianDenoiser(c=0.7).to(DEVICE), GaussianDenoiser(), cfg, shape=(3,))
    seen = []
    for _ in range(4):
        trainer.train_batch()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-2, 1e-2, 1e-3, 1e-3])


def test_checkpoint_every(tmp_path, monkeypatch):
    trainer = SFDTrainer(GaussianDenoiser(c=0.7).to(DEVICE), GaussianDenoiser(), config(iterations=5), shape=(3,))
    saved = []
    monkeypatch.setattr(trainer, "save", lambda path: saved.append((path, trainer.iteration)))
    trainer.fit(progress=False, checkpoint=str(tmp_path / "c.pt"), checkpoint_every=2)
    assert [it for _, it in saved] == [2, 4, 5]


def test_sfd_v_draws_the_same_step_counts_whatever_the_rank(monkeypatch):
    import kdistpp.sfd.trainer as trainer_module

    draws = {}
    for rank in (0, 1):
        monkeypatch.setattr(trainer_module, "_distributed", lambda r=rank: (r, 1))
        torch.manual_seed(0)
        teacher = MLPDenoiser(2, hidden=8, depth=1).requires_grad_(False)
        student = MLPDenoiser(2, hidden=8, depth=1, step_conditioned=True).load_teacher(teacher)
        trainer = SFDTrainer(student, teacher, config(num_steps=(3, 4, 5), iterations=6), shape=(2,))
        counts, original = [], trainer.config.timestamps
        monkeypatch.setattr(trainer.config.__class__, "timestamps",
                            lambda self, n=None, device="cpu": (counts.append(n), original(n, device))[1])
        for _ in range(6):
            trainer.train_batch()
        monkeypatch.undo()
        draws[rank] = counts
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_3m_update_is_exact_for_an_estimate_quadratic_in_log_sigma_on_unequal_steps():
    """x' = -x + D(lambda) with D = a + b u + c u^2: the exponential integrator over h is
    e^-h x + a (1 - e^-h) + b (h - 1 + e^-h) + c (h^2 - 2h + 2 - 2 e^-h), and 3M is exact for it."""
    from kdistpp.sfd import multistep_update

    a, b, c = 0.7, -1.3, 0.4
    gaps, h = [0.5, 0.9], 0.3  # unequal log-sigma steps: u = -1.4, -0.9, 0 for the history and now
    estimate = lambda u: torch.tensor([a + b * u + c * u * u], dtype=torch.float64)  # noqa: E731
    history = [estimate(-gaps[0] - gaps[1]), estimate(-gaps[1])]
    x = torch.tensor([2.0], dtype=torch.float64)
    got = multistep_update(x, estimate(0.0), history, gaps, h, 3)
    e = math.exp(-h)
    exact = e * 2.0 + a * (1 - e) + b * (h - 1 + e) + c * (h * h - 2 * h + 2 - 2 * e)
    assert float(got) == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="order"):
        multistep_update(x, estimate(0.0), history, gaps, h, 4)


def test_3m_trajectory_lowers_the_order_on_its_last_steps():
    """A 2-step grid: both steps first order (no history at first, last step at the end)."""
    from kdistpp.sfd import dpmpp_3m_trajectory

    teacher = GaussianDenoiser()
    grid = torch.tensor([10.0, 2.0, 0.5], dtype=torch.float64)
    x = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    states = dpmpp_3m_trajectory(teacher, x, grid)
    expected = x
    for s, s_next in ((10.0, 2.0), (2.0, 0.5)):
        d = expected * S_DATA**2 / (S_DATA**2 + s**2)
        expected = (s_next / s) * expected + (1 - s_next / s) * d
    torch.testing.assert_close(states[-1], expected, rtol=1e-12, atol=1e-12)


def test_3m_trajectory_keeps_float64_range_and_refuses_a_zero_sigma():
    from kdistpp.sfd import dpmpp_3m_trajectory

    teacher = GaussianDenoiser()
    grid = polynomial_sigmas(5, 0.1, 10.0).double()
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    big = dpmpp_3m_trajectory(teacher, x * 1e300, grid)[-1]  # beyond float32's range
    assert torch.isfinite(big).all()
    torch.testing.assert_close(big / 1e300, dpmpp_3m_trajectory(teacher, x, grid)[-1], rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="above zero"):
        dpmpp_3m_trajectory(teacher, x, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_analytic_first_step_and_grid_arguments():
    from kdistpp.sfd import nested_grid
    from kdistpp.sfd.trajectory import analytic_denoised

    x = torch.tensor([3.0])
    assert float(analytic_denoised(x, 4.0, sigma_data=3.0)) == pytest.approx(3.0 - 3.0 * 4.0 / 5.0)
    for n in (1, 2.0):
        with pytest.raises(ValueError, match="int >= 2"):
            polynomial_sigmas(n, 0.1, 10.0)
    for k in (0, 1.5):
        with pytest.raises(ValueError, match="substeps"):
            nested_grid(polynomial_sigmas(3, 0.1, 10.0), k)


@pytest.mark.parametrize("kwargs,ok", [
    (dict(afs=True, num_steps=3), True), (dict(afs=True, num_steps=2), False), (dict(afs=True, num_steps=(3, 2)), False),
    (dict(substeps=1), True), (dict(substeps=0), False), (dict(substeps=1.5), False),
    (dict(batch_size=1, iterations=1), True), (dict(batch_size=0), False), (dict(iterations=0), False),
    (dict(lr=0.0), False), (dict(num_steps=1), False), (dict(num_steps=()), False),
])
def test_config_bounds(kwargs, ok):
    if ok:
        config(**kwargs)
    else:
        with pytest.raises(ValueError):
            config(**kwargs)


def test_timestamps_are_only_given_for_trained_step_counts():
    with pytest.raises(ValueError, match=r"SFD-v config trains num_steps in \(3, 5\): pass one"):
        config(num_steps=(3, 5)).timestamps()
    assert len(config(num_steps=(3, 5)).timestamps(5)) == 5
    assert len(config(num_steps=4).timestamps()) == 4
    for cfg, n in [(config(num_steps=(3, 5)), 4), (config(num_steps=4), 5), (config(num_steps=4), True)]:
        with pytest.raises(ValueError, match="not a timestamp count this config trains"):
            cfg.timestamps(n)


@pytest.mark.parametrize("num_steps,n", [((3, 4, 5, 6), 9), ((3, 4, 5, 6), None), (4, 3)])
def test_sampling_a_student_at_an_untrained_step_count_is_refused_before_any_call(num_steps, n):
    calls = []

    def student(x, sigma, **extra):
        calls.append(extra)
        return x

    with pytest.raises(ValueError, match="num_steps"):
        sample_sfd(student, torch.zeros(2, 3), config(num_steps=num_steps), num_steps=n, disable=True)
    assert calls == []


def test_train_dsm_shows_progress(capsys):
    net = MLPDenoiser(2, hidden=8, depth=1)
    train_dsm(net, torch.randn(16, 2), 3, batch_size=4)
    assert "DSM" in capsys.readouterr().err
    train_dsm(net, torch.randn(16, 2), 3, batch_size=4, progress=False)
    assert "DSM" not in capsys.readouterr().err


def test_drawn_noise_has_the_sigma_max_scale():
    trainer = SFDTrainer(GaussianDenoiser(c=0.7).to(DEVICE), GaussianDenoiser(), config(batch_size=4000), shape=(2,))
    z = trainer.draw_noise()
    assert z.shape == (4000, 2) and float(z.std()) == pytest.approx(20.0, rel=0.05)


def test_condition_supplies_the_batchs_extra_args_to_student_and_teacher():
    seen = {"student": [], "teacher": [], "condition": []}

    class Conditioned(GaussianDenoiser):
        def __init__(self, who, c=1.0):
            super().__init__(c)
            self.who = who

        def forward(self, x, sigma, **extra):
            seen[self.who].append(extra)
            return super().forward(x, sigma)

    def condition(generator, batch):
        seen["condition"].append(batch)
        return {"label": torch.arange(batch)}

    trainer = SFDTrainer(Conditioned("student", 0.7).to(DEVICE), Conditioned("teacher"), config(batch_size=5),
                         shape=(2,), condition=condition, teacher_extra_args={"cond_scale": 3.0})
    trainer.train_batch()
    assert seen["condition"] == [5]
    assert all(torch.equal(e["label"], torch.arange(5)) and "cond_scale" not in e for e in seen["student"])
    assert all(torch.equal(e["label"], torch.arange(5)) and e["cond_scale"] == 3.0 for e in seen["teacher"])


def test_first_adam_step_moves_every_trained_weight_by_about_lr():
    """Adam (beta 0.9/0.999, eps 1e-8, as the authors): the first step is lr * sign(grad)."""
    torch.manual_seed(0)
    teacher = MLPDenoiser(2, hidden=8, depth=1).requires_grad_(False)
    student = MLPDenoiser(2, hidden=8, depth=1)
    before = [p.detach().clone() for p in student.parameters()]
    SFDTrainer(student, teacher, config(num_steps=2, lr=1e-3), shape=(2,)).train_batch()
    moves = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(student.parameters(), before)])
    moved = moves[moves > 0]
    assert moved.numel() > 0.9 * moves.numel()
    assert float(moved.median()) == pytest.approx(1e-3, rel=0.01)


def test_progress_bar_only_when_asked(capsys):
    trainer = SFDTrainer(GaussianDenoiser(c=0.7).to(DEVICE), GaussianDenoiser(), config(iterations=2), shape=(3,))
    trainer.fit(progress=False)
    assert "SFD" not in capsys.readouterr().err
    trainer.fit(4, progress=True)
    assert "SFD" in capsys.readouterr().err


def test_numpy_step_counts_are_ints():
    import numpy as np

    assert config(num_steps=np.int64(4)).num_steps == 4 and len(config(num_steps=np.int64(4)).timestamps()) == 4
