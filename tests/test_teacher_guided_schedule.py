"""teacher_guided finds its guided steps by sigma: the same schedule from another library matches,
a sampler that never evaluates a guided sigma warns, and the count of refined evaluations does not
depend on rounding."""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import pytest
import torch
from k_diffusion import sampling as K

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser

SIGMA_MIN, SIGMA_MAX = 0.0292, 14.6146


def latent(seed=0, shape=(2, 3, 4)):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * SIGMA_MAX).to(DEVICE)


def own_noise(seed, shape=(2, 3, 4)):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, device=DEVICE)


@contextlib.contextmanager
def no_guidance_warnings():
    """A context in which any GuidanceWarning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", kdistpp.GuidanceWarning)
        yield


def test_k_diffusions_own_karras_schedule_is_guided_like_kdistpps():
    ours = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    theirs = K.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    assert not torch.equal(ours, theirs)  # the two libraries round the same formula differently
    assert torch.allclose(ours, theirs, rtol=1e-5)
    x, student = latent(1), ElementwiseDenoiser()
    results = []
    for schedule in (ours, theirs):
        teacher = ElementwiseDenoiser(bias=1.0)
        wrapped = kdistpp.teacher_guided(student, teacher, ours, w=0.3, guidance_steps=2,
                                         renoise_sampler=own_noise(4))
        with no_guidance_warnings():
            results.append(K.sample_euler(wrapped, x, schedule.to(DEVICE), disable=True))
        assert teacher.calls == 2
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


def test_a_wrapper_built_for_another_step_count_warns():
    x, student, teacher = latent(2), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, kdistpp.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX), w=0.3)
    with pytest.warns(kdistpp.GuidanceWarning, match="same sigmas"):
        K.sample_euler(wrapped, x, kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX).to(DEVICE), disable=True)


@pytest.mark.parametrize("w", [0.3, 1.0])
def test_a_guided_step_the_sampler_never_evaluates_warns(w):
    """Euler with churn evaluates at sigma_hat, never at the guided sigma_0: the refinement cannot fire."""
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    x, student, teacher = latent(3), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=w)
    with pytest.warns(kdistpp.GuidanceWarning, match="sigma_0"):
        K.sample_euler(wrapped, x, sigmas.to(DEVICE), s_churn=1.0, disable=True)
    assert teacher.calls == 0


@pytest.mark.parametrize("sampler", [K.sample_euler, K.sample_heun, K.sample_lms, K.sample_dpmpp_2m,
                                     K.sample_dpmpp_2s_ancestral, K.sample_dpmpp_sde, K.sample_euler_ancestral])
def test_matching_runs_do_not_warn_and_a_wrapper_serves_several_runs(sampler):
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    x, student, teacher = latent(4), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=0.3, guidance_steps=2, renoise_sampler=own_noise(1))
    with no_guidance_warnings():
        sampler(wrapped, x, sigmas.to(DEVICE), disable=True)
        first = teacher.calls
        sampler(wrapped, x, sigmas.to(DEVICE), disable=True)
    assert first >= 2 and teacher.calls == 2 * first


@pytest.mark.parametrize("guided", [1, 2, 3])
def test_2s_ancestral_eta1_refined_evaluations_do_not_depend_on_rounding(guided):
    """At eta = 1 the 2S midpoint is sqrt(sigma_i * sigma_down) = sigma_{i+1} exactly, so the
    midpoint of every guided step but the last is also at a guided sigma: 2k - 1 refined
    evaluations for k guided steps, in float32 and in float64 alike."""
    counts = []
    for dtype in (torch.float32, torch.float64):
        sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX).to(dtype)
        x, student, teacher = latent(5).to(dtype), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
        wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=0.3, guidance_steps=guided)
        with no_guidance_warnings():
            K.sample_dpmpp_2s_ancestral(wrapped, x, sigmas.to(DEVICE), eta=1.0, disable=True)
        counts.append(teacher.calls)
    assert counts == [2 * guided - 1] * 2


def test_per_sample_sigmas_that_differ_are_refused():
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    wrapped = kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0), sigmas, w=0.3)
    x = latent(6)
    with pytest.raises(ValueError, match="per-sample sigmas"):
        wrapped(x, torch.tensor([float(sigmas[0]), float(sigmas[1])], device=DEVICE))
    same = torch.full((2,), float(sigmas[0]), device=DEVICE)
    assert wrapped(x, same).shape == x.shape


def test_numpy_arguments_are_accepted():
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    x = latent(7)
    results = []
    for w, steps in ((0.25, 2), (np.float32(0.25), np.int64(2))):
        teacher = ElementwiseDenoiser(bias=1.0)
        wrapped = kdistpp.teacher_guided(ElementwiseDenoiser(), teacher, sigmas, w=w, guidance_steps=steps,
                                         renoise=np.float64(0.5), renoise_sampler=own_noise(2))
        results.append(K.sample_euler(wrapped, x, sigmas.to(DEVICE), disable=True))
        assert teacher.calls == 2
    torch.testing.assert_close(results[0], results[1])


def test_a_run_that_starts_above_the_guided_sigma_warns_at_its_start():
    """A one-step churned run: its only evaluation is at sigma_hat > sigma_0, so nothing later could tell."""
    sigmas = torch.tensor([14.6, 0.0])
    x, student, teacher = latent(8), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=0.3, renoise="current")
    with pytest.warns(kdistpp.GuidanceWarning, match="starts at sigma"):
        K.sample_euler(wrapped, x, sigmas.to(DEVICE), s_churn=1.0, disable=True)
    assert teacher.calls == 0


def test_a_run_that_stops_above_a_guided_step_warns_when_the_next_run_starts():
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    x, student, teacher = latent(9), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=[0.0, 0.0, 0.5])
    with no_guidance_warnings():
        K.sample_euler(wrapped, x, sigmas[:3].to(DEVICE), disable=True)  # the sampler runs the top part only
    with pytest.warns(kdistpp.GuidanceWarning, match="previous run never evaluated the schedule's sigma_2"):
        K.sample_euler(wrapped, x, sigmas.to(DEVICE), disable=True)
    assert teacher.calls == 1  # the second, full run


def test_fp16_latents_with_fp16_sigmas_are_guided_at_every_step():
    """k-diffusion builds sigma from x.new_ones: an fp16 latent hands over fp16 sigmas (1e-4 off)."""
    sigmas = kdistpp.get_sigmas_karras(4, 0.03, 14.6)
    x, student, teacher = latent(10).half(), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=[0.5, 0.5, 0.5])
    with no_guidance_warnings():
        K.sample_euler(wrapped, x, sigmas.to(DEVICE), disable=True)
    assert teacher.calls == 3


def test_a_repeated_guided_sigma_warns_that_both_steps_are_refined():
    with pytest.warns(kdistpp.GuidanceWarning, match="guided step 2's sigma 5 also starts step 1"):
        kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0),
                               torch.tensor([10.0, 5.0, 5.0, 1.0, 0.0]), w=[0.0, 0.0, 0.5])


def test_w_one_with_the_guidance_form_hands_the_sampler_the_teachers_estimate():
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    student, teacher = ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=1.0, form="guidance")
    x, s0 = latent(11), torch.full((2,), float(sigmas[0]), device=DEVICE)
    torch.testing.assert_close(wrapped(x, s0), ElementwiseDenoiser(bias=1.0)(x, s0))


def test_the_top_part_of_a_split_schedule_with_the_guided_step_in_it_does_not_warn():
    """A two-expert split (Wan 2.2): the high-noise part ends at sigma_2; the guided step 0 and its
    next sigma were both evaluated, so nothing was skipped, now or when the next run starts."""
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    x, student, teacher = latent(12), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=0.3)
    with no_guidance_warnings():
        K.sample_euler(wrapped, x, sigmas[:3].to(DEVICE), disable=True)
        K.sample_euler(wrapped, x, sigmas.to(DEVICE), disable=True)
    assert teacher.calls == 2


def test_a_run_ending_between_expected_sigmas_is_reported_when_the_next_starts_even_close_by():
    """The next run starts at 14.6, close above the previous run's last sigma 12 (less than 2x)."""
    schedule = torch.tensor([14.6, 10.0, 3.0, 0.0])
    x, student, teacher = latent(13), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, schedule, w=0.3)
    with no_guidance_warnings():
        K.sample_euler(wrapped, x, torch.tensor([14.6, 12.0, 11.0]).to(DEVICE), disable=True)
    with pytest.warns(kdistpp.GuidanceWarning, match="previous run never evaluated the schedule's sigma_1"):
        K.sample_euler(wrapped, x, schedule.to(DEVICE), disable=True)


def test_a_repeated_guided_sigma_on_the_last_step_warns_too():
    with pytest.warns(kdistpp.GuidanceWarning, match="guided step 1's sigma 5 also starts step 2"):
        kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0), torch.tensor([10.0, 5.0, 5.0, 0.0]),
                               w=[0.0, 0.5])


def test_a_run_that_skips_several_guided_sigmas_warns_once():
    x, student, teacher = latent(2), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, kdistpp.get_sigmas_karras(8, SIGMA_MIN, SIGMA_MAX), w=0.3,
                                     guidance_steps=[0, 1, 2, 3, 4])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        K.sample_euler(wrapped, x, kdistpp.get_sigmas_karras(3, SIGMA_MIN, SIGMA_MAX).to(DEVICE), disable=True)
    assert len([w for w in seen if issubclass(w.category, kdistpp.GuidanceWarning)]) == 1


def test_the_wrapper_draws_the_renoise_noise_from_the_callers_generator():
    """A renoise_generator given to teacher_guided is the one used, in every run: the wrapper equals the
    dedicated sampler (direction='refined') given a generator seeded the same."""
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    x, student, teacher = latent(4), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, sigmas, w=0.3, guidance_steps=[0, 1],
                                     renoise_generator=torch.Generator(device=DEVICE).manual_seed(5))
    got = K.sample_euler(wrapped, x, sigmas.to(DEVICE), disable=True)
    expected = kdistpp.sample_euler_distpp(student, x, sigmas, teacher=teacher, w=0.3, guidance_steps=[0, 1],
                                           direction="refined", disable=True,
                                           renoise_generator=torch.Generator(device=DEVICE).manual_seed(5))
    torch.testing.assert_close(got, expected)
    other = kdistpp.teacher_guided(student, teacher, sigmas, w=0.3, guidance_steps=[0, 1],
                                   renoise_generator=torch.Generator(device=DEVICE).manual_seed(6))
    assert not torch.allclose(K.sample_euler(other, x, sigmas.to(DEVICE), disable=True), got)  # the seed matters


def test_per_sample_sigmas_within_the_relative_tolerance_are_one_sigma():
    """Sigmas 1e-5 apart (relative) are step 0's sigma: the batch is refined as at sigma_0 exactly."""
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX).double()
    student, teacher = ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)

    def wrapped():
        return kdistpp.teacher_guided(student, teacher, sigmas, w=0.3,
                                      renoise_generator=torch.Generator(device=DEVICE).manual_seed(7))

    s0 = float(sigmas[0])  # ~14.6: a spread of 1e-5 relative is within 1e-4 relative, not within 1e-4 / sigma
    x = latent(6).double()
    spread = torch.tensor([s0, s0 * (1 + 1e-5)], dtype=torch.float64, device=DEVICE)
    exact = torch.full((2,), s0, dtype=torch.float64, device=DEVICE)
    got = wrapped()(x, spread)
    torch.testing.assert_close(got, wrapped()(x, exact), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, student(x, exact), rtol=1e-3, atol=1e-3)  # refined, not the student's alone


def test_matching_runs_with_the_last_step_guided_do_not_warn():
    """The schedule's final 0 is never evaluated and is not expected to be."""
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    wrapped = kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0), sigmas, w=0.3,
                                     guidance_steps=[3], renoise="current")
    with no_guidance_warnings():
        for seed in (0, 1):
            K.sample_euler(wrapped, latent(seed), sigmas.to(DEVICE), disable=True)


def test_a_longer_run_that_starts_above_the_guided_sigma_warns_at_its_start():
    sigmas = kdistpp.get_sigmas_karras(4, SIGMA_MIN, SIGMA_MAX)
    wrapped = kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0), sigmas, w=0.3)
    with pytest.warns(kdistpp.GuidanceWarning, match="starts at sigma"):
        K.sample_euler(wrapped, latent(8), sigmas.to(DEVICE), s_churn=4.0, disable=True)
