"""What one guided step does to the sampler's state, computed independently from the models' outputs.

direction='student' (default, the authors' update): the state after a guided step is the unguided
state plus the refinement x0h - x0s = w (x0T - x0s), on every sampler. direction='refined': the
shift is scaled by the update's coefficient of the estimate (1 - sigma_{i+1}/sigma_i on Euler).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser

SIGMAS = kdistpp.get_sigmas_karras(5, 0.05, 14.6)
SIG = [float(s) for s in SIGMAS]


class Recorder(ElementwiseDenoiser):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.outputs = []

    def __call__(self, x, sigma, **extra):
        out = super().__call__(x, sigma, **extra)
        self.outputs.append(out)
        return out


def own_noise(seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn((2, 3, 4), generator=g, device=DEVICE)


def states(name, w, step, **kw):
    """The state x at the start of every step (and the output), with the student and teacher."""
    x = (torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)) * SIG[0]).to(DEVICE)
    student, teacher, seen = Recorder(), Recorder(bias=1.5, scale=2.0), []
    torch.manual_seed(3)
    out = kdistpp.SAMPLERS[name](student, x, SIGMAS, teacher=teacher, w=w, guidance_steps=[step],
                                 renoise_sampler=own_noise(9), callback=lambda d: seen.append(d["x"]), disable=True, **kw)
    return seen + [out], student, teacher


def refined_coefficient(name, step, **kw):
    """The coefficient of the estimate the update reads, i.e. how much of x0h - x0s a 'refined' step keeps."""
    s, s_next = SIG[step], SIG[step + 1]
    if name == "consistency":
        return 1.0
    if name == "euler":
        return 1 - s_next / s
    sigma_down, _ = kdistpp.ancestral_step(s, s_next)
    if name == "euler_ancestral":
        return 1 - sigma_down / s
    if name == "dpmpp_2s_ancestral":
        return -math.expm1(-math.log(s / sigma_down))
    h = math.log(s / s_next)  # dpmpp_2m, history kept raw
    if step == 0:
        return -math.expm1(-h)
    r = math.log(SIG[step - 1] / s) / h
    return -math.expm1(-h) * (1 + 1 / (2 * r))


def refined_evaluation(name, student, step):
    """Index of the student call the teacher refined: 2S a's default refines the midpoint."""
    return 2 * step + 1 if name == "dpmpp_2s_ancestral" else step


@pytest.mark.parametrize("name", kdistpp.SAMPLERS)
@pytest.mark.parametrize("direction", kdistpp.DIRECTIONS)
@given(w=st.floats(0.01, 1.0), step=st.sampled_from([0, 2]))
def test_one_guided_step_moves_the_state_by_the_refinement(name, direction, w, step):
    plain, _, _ = states(name, 0.0, step)
    guided, student, teacher = states(name, w, step, direction=direction)
    assert teacher.calls == 1
    x0s, x0t = student.outputs[refined_evaluation(name, student, step)], teacher.outputs[0]
    scale = 1.0 if direction == "student" else refined_coefficient(name, step)
    for j in range(step + 1):  # untouched before the guided step
        assert torch.equal(guided[j], plain[j])
    torch.testing.assert_close(guided[step + 1] - plain[step + 1], scale * w * (x0t - x0s), rtol=1e-4, atol=2e-5)


def test_authors_euler_step_written_out():
    """x1 = x0h + sigma_1 (x0 - x0s) / sigma_0 with x0h = x0s + w (DT(x0s + sigma_1 n, sigma_1) - x0s)."""
    x = (torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2)) * SIG[0]).to(DEVICE)
    student, teacher, w = ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0, scale=2.0), 0.1
    got = kdistpp.sample_euler_distpp(student, x, torch.tensor([SIG[0], SIG[1]]),
                                      teacher=teacher, w=w, renoise_sampler=own_noise(4), disable=True)
    s0 = torch.full((2,), SIG[0], device=DEVICE)
    x0s = student(x, s0)
    x0t = teacher(x0s + SIG[1] * own_noise(4)(None, None), torch.full((2,), SIG[1], device=DEVICE))
    x0h = x0s + w * (x0t - x0s)
    torch.testing.assert_close(got, x0h + SIG[1] * (x - x0s) / SIG[0], rtol=1e-5, atol=1e-5)


def test_2s_ancestral_first_evaluation_acts_only_through_the_student():
    """Refining the first estimate moves the output far less than refining the midpoint estimate
    (it reaches the output only through the student's Jacobian at the midpoint)."""
    plain, _, _ = states("dpmpp_2s_ancestral", 0.0, 0)
    shift = {}
    for choice in ("midpoint", "first"):
        guided, _, teacher = states("dpmpp_2s_ancestral", 0.5, 0, guided_evaluation=choice)
        assert teacher.calls == 1
        shift[choice] = (guided[1] - plain[1]).norm()
    assert shift["first"] < 0.1 * shift["midpoint"], shift


def test_2s_ancestral_both_calls_the_teacher_twice_per_guided_step():
    _, _, teacher = states("dpmpp_2s_ancestral", 0.5, 0, guided_evaluation="both")
    assert teacher.calls == 2
    with pytest.raises(ValueError, match="guided_evaluation"):
        states("dpmpp_2s_ancestral", 0.5, 0, guided_evaluation="mid")


def test_2m_history_keeps_the_raw_estimate_by_default():
    """After a guided step 1, step 2's correction uses x0s_1, not x0h_1, so with the default history
    step 2 is the unguided step 2 from the shifted state; 'refined' history changes it."""
    plain, _, _ = states("dpmpp_2m", 0.0, 1)
    guided, _, _ = states("dpmpp_2m", 0.3, 1)
    refined_history, _, _ = states("dpmpp_2m", 0.3, 1, history="refined")
    assert torch.equal(guided[2], refined_history[2])
    assert (guided[3] - refined_history[3]).abs().max() > 1e-4


@pytest.mark.parametrize("name", kdistpp.SAMPLERS)
def test_sigma_window_guides_the_steps_whose_sigma_lies_in_it(name):
    lo, hi = SIG[3] * 0.99, SIG[1] * 1.01  # steps 1, 2, 3
    x = (torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)) * SIG[0]).to(DEVICE)
    teacher = Recorder(bias=1.0)
    torch.manual_seed(0)
    kdistpp.SAMPLERS[name](Recorder(), x, SIGMAS, teacher=teacher, w=0.2, renoise="current",
                           guidance_steps=kdistpp.SigmaWindow(lo, hi), disable=True,
                           **({"guided_evaluation": "first"} if name == "dpmpp_2s_ancestral" else {}))
    assert [float(s[0]) for _, s, _ in teacher.inputs] == pytest.approx(SIG[1:4])


@pytest.mark.parametrize("lo,hi", [(2.0, 1.0), (-1.0, 1.0), (0.0, float("inf")), (True, 2.0)])
def test_sigma_window_refuses_bad_bounds(lo, hi):
    with pytest.raises(ValueError, match="SigmaWindow"):
        kdistpp.SigmaWindow(lo, hi)


def test_sigma_window_outside_the_schedule_guides_nothing():
    x = (torch.randn(2, 3, 4) * SIG[0]).to(DEVICE)
    teacher = Recorder()
    plain = kdistpp.sample_euler_distpp(Recorder(), x, SIGMAS, teacher=teacher, w=0.0, disable=True)
    with pytest.warns(kdistpp.GuidanceWarning, match="guides no step") as record:
        out = kdistpp.sample_euler_distpp(Recorder(), x, SIGMAS, teacher=teacher, w=0.5, disable=True,
                                          guidance_steps=kdistpp.SigmaWindow(100.0, 200.0))
    assert teacher.calls == 0 and torch.equal(out, plain)
    assert record[0].filename == __file__  # the warning points at the caller's line


def test_random_renoise_level_is_log_uniform_over_the_positive_schedule():
    from kdistpp.refine import plan
    from kdistpp.steps import prepare

    sigmas = kdistpp.get_sigmas_karras(6, 0.1, 10.0)
    run = prepare(ElementwiseDenoiser(), torch.zeros(1, 2), sigmas)
    guide = plan(run, ElementwiseDenoiser(), 0.1, 1, "interpolate", "random", None, None, "student")
    torch.manual_seed(0)
    logs = torch.tensor([math.log(guide.renoise_level(0, 10.0)) for _ in range(4000)])
    lo, hi = math.log(0.1), math.log(10.0)
    assert lo <= float(logs.min()) < lo + 0.02 and hi - 0.02 < float(logs.max()) <= hi
    quartiles = torch.quantile(logs, torch.tensor([0.25, 0.5, 0.75], dtype=logs.dtype))
    expected = torch.tensor([lo + q * (hi - lo) for q in (0.25, 0.5, 0.75)], dtype=logs.dtype)
    assert torch.allclose(quartiles, expected, atol=0.1)


@pytest.mark.parametrize("name", kdistpp.SAMPLERS)
@pytest.mark.parametrize("direction", kdistpp.DIRECTIONS)
def test_a_guided_last_step_lands_on_the_refined_estimate(name, direction):
    """The step to sigma 0 has one evaluation (2S a: no midpoint); both directions land on x0h."""
    last = len(SIG) - 2
    plain, _, _ = states(name, 0.0, last, renoise="current")
    guided, student, teacher = states(name, 0.4, last, renoise="current", direction=direction)
    assert teacher.calls == 1
    x0s = student.outputs[2 * last if name == "dpmpp_2s_ancestral" else last]
    torch.testing.assert_close(guided[-1] - plain[-1], 0.4 * (teacher.outputs[0] - x0s), rtol=1e-4, atol=2e-5)


def test_sigma_window_edges():
    window = kdistpp.SigmaWindow(SIG[2], SIG[2])  # a window of one sigma, inclusive
    assert window.steps(SIG) == [2]
    assert kdistpp.SigmaWindow(0.0, SIG[-2]).steps(SIG) == [len(SIG) - 2]  # lo = 0 is allowed; the last step counts
    assert hash(window) == hash(kdistpp.SigmaWindow(SIG[2], SIG[2]))  # usable as a cache key (hosts cache options)
    with pytest.raises(AttributeError):
        window.lo = 0.0


def test_teacher_guided_on_a_batch_of_one_after_a_copy_and_on_the_last_step():
    import copy

    from k_diffusion import sampling as K

    student, teacher = ElementwiseDenoiser(), Recorder(bias=1.0)
    last = len(SIG) - 2
    wrapped = copy.deepcopy(kdistpp.teacher_guided(student, teacher, SIGMAS, w=0.3, guidance_steps=[last],
                                                   renoise="current"))
    x = (torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(3)) * SIG[0]).to(DEVICE)
    got = K.sample_euler(wrapped, x, SIGMAS.to(DEVICE), disable=True)
    assert len(wrapped.guidance.teacher.outputs) == 1  # the deep copy's teacher, called at the last step
    plain = K.sample_euler(student, x, SIGMAS.to(DEVICE), disable=True)
    assert (got - plain).abs().max() > 1e-4


def test_a_default_renoise_generator_is_made_only_where_a_guided_step_draws_from_it():
    from kdistpp.refine import plan
    from kdistpp.steps import prepare

    sigmas = kdistpp.get_sigmas_karras(4, 0.1, 10.0)
    run = prepare(ElementwiseDenoiser(), torch.zeros(2, 3), sigmas)
    teacher, sampler = ElementwiseDenoiser(bias=1.0), (lambda s, sn: torch.zeros(2, 3))

    def generator(w=0.1, form="interpolate", renoise="next", renoise_sampler=None):
        return plan(run, teacher, w, None, form, renoise, renoise_sampler, None, "student").generator

    assert isinstance(generator(), torch.Generator)
    assert isinstance(generator(renoise="random", renoise_sampler=sampler), torch.Generator)  # the level
    assert generator(w=0.0) is None and generator(form="guidance") is None
    assert generator(renoise_sampler=sampler) is None
