"""Every Distillation++ setting acts or is refused: w lists imply their steps, a w that guides no
step warns, a plain call needs no teacher, numpy scalars are numbers, and renoise_generator keeps
guiding off the global RNG."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np
import pytest
import torch
from k_diffusion import sampling as K

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser

SIGMAS = kdistpp.get_sigmas_karras(4, 0.05, 14.6)
SIG = [float(s) for s in SIGMAS]
KD = {"euler": K.sample_euler, "euler_ancestral": K.sample_euler_ancestral,
      "dpmpp_2s_ancestral": K.sample_dpmpp_2s_ancestral, "dpmpp_2m": K.sample_dpmpp_2m}


def latent(seed=0, shape=(2, 3, 4)):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * SIG[0]).to(DEVICE)


def own_noise(seed, shape=(2, 3, 4)):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=g, device=DEVICE)


def run(name, w, seed=3, **kw):
    """One seeded run; returns the output and the teacher's call count."""
    teacher = kw.pop("teacher", ElementwiseDenoiser(bias=1.0))
    torch.manual_seed(seed)
    out = kdistpp.SAMPLERS[name](ElementwiseDenoiser(), latent(1), SIGMAS, disable=True, teacher=teacher, w=w,
                                 renoise_sampler=own_noise(5), **kw)
    return out, teacher.calls


@pytest.mark.parametrize("name", kdistpp.SAMPLERS)
def test_a_w_list_guides_the_steps_it_gives_values_for(name):
    listed, calls = run(name, [0.1, 0.2, 0.3])
    assert calls == 3
    explicit, _ = run(name, [0.1, 0.2, 0.3, 0.0], guidance_steps=3)
    torch.testing.assert_close(listed, explicit, rtol=0, atol=0)
    single, _ = run(name, [0.1])
    default, calls = run(name, 0.1)  # a float guides the first step, the paper's setting
    assert calls == 1
    torch.testing.assert_close(single, default, rtol=0, atol=0)
    gap, calls = run(name, [0.0, 0.2])
    assert calls == 1
    torch.testing.assert_close(gap, run(name, 0.2, guidance_steps=[1])[0], rtol=0, atol=0)


def test_w_list_mistakes_are_errors_before_any_call():
    for kw, text in [(dict(w=[0.1] * 5), "schedule has 4 steps"),
                     (dict(w=[0.1, 0.2], guidance_steps=1), r"w\[1\]=0.2 but step 1 is not among"),
                     (dict(w=[0.1], guidance_steps=2), "one value per step"),
                     (dict(w=[0.1, -0.2]), ">= 0")]:
        teacher = ElementwiseDenoiser(bias=1.0)
        with pytest.raises(ValueError, match=text):
            run("euler", teacher=teacher, **kw)
        assert teacher.calls == 0


@pytest.mark.parametrize("kw", [dict(w=0.3, guidance_steps=0), dict(w=0.3, guidance_steps=[]),
                                dict(w=0.3, guidance_steps=kdistpp.SigmaWindow(100.0, 200.0))])
def test_a_w_that_guides_no_step_warns(kw):
    with pytest.warns(kdistpp.GuidanceWarning, match="guides no step"):
        out, calls = run("euler", **kw)
    assert calls == 0
    torch.testing.assert_close(out, run("euler", 0.0)[0], rtol=0, atol=0)


def test_settings_that_act_and_w_zero_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", kdistpp.GuidanceWarning)
        run("euler", 0.3)
        run("euler", [0.3, 0.2], guidance_steps=[0, 1])
        run("euler", 0.0, guidance_steps=0)
        run("euler", [0.0, 0.0])
        run("euler", 0.0, form="guidance", renoise="random")  # nothing guided: nothing to say about renoise
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), latent(), SIGMAS, guidance_steps=2, disable=True)
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), latent(), SIGMAS, disable=True)


@pytest.mark.parametrize("name", KD)
def test_a_plain_call_needs_no_teacher_and_is_the_baseline(name):
    x, student = latent(2), ElementwiseDenoiser()
    torch.manual_seed(0)
    ours = kdistpp.SAMPLERS[name](student, x, SIGMAS, disable=True)
    torch.manual_seed(0)
    theirs = KD[name](student, x, SIGMAS.to(DEVICE), disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=3e-5)
    torch.manual_seed(0)
    assert torch.equal(kdistpp.SAMPLERS[name](student, x, SIGMAS, disable=True, w=0.0), ours)


def test_consistency_without_a_teacher_is_sample_consistency():
    x, student = latent(2), ElementwiseDenoiser()
    torch.manual_seed(0)
    ours = kdistpp.sample_consistency_distpp(student, x, SIGMAS, disable=True)
    torch.manual_seed(0)
    assert torch.equal(ours, kdistpp.sample_consistency(student, x, SIGMAS, disable=True))


def test_guidance_without_a_teacher_or_a_teacher_without_w_is_refused():
    student = ElementwiseDenoiser()
    with pytest.raises(TypeError, match="teacher is None"):
        kdistpp.sample_euler_distpp(student, latent(), SIGMAS, w=0.1, disable=True)
    with pytest.raises(TypeError, match="w is required"):
        kdistpp.sample_euler_distpp(student, latent(), SIGMAS, teacher=ElementwiseDenoiser(bias=1.0), disable=True)
    assert student.calls == 0


def test_numpy_and_tensor_scalars_are_numbers():
    expected, calls = run("euler_ancestral", 0.25, guidance_steps=2, renoise=0.7)
    assert calls == 2
    for w, steps, renoise in [(np.float32(0.25), np.int64(2), np.float64(0.7)),
                              (torch.tensor(0.25), torch.tensor(2), 0.7),
                              (np.array([0.25, 0.25]), None, np.float32(0.7))]:
        got, calls = run("euler_ancestral", w, guidance_steps=steps, renoise=renoise)
        assert calls == 2
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    window = kdistpp.SigmaWindow(np.float32(SIG[1]), np.float64(SIG[0]))
    assert (window.lo, window.hi) == (float(np.float32(SIG[1])), SIG[0]) and type(window.lo) is float
    for bad in (np.bool_(True), torch.tensor(True)):
        with pytest.raises(TypeError, match="w must be a float"):
            run("euler", bad)


@pytest.mark.parametrize("name", kdistpp.SAMPLERS)
def test_renoise_generator_leaves_the_global_rng_alone_and_seeds_the_random_level(name):
    outputs = []
    for seed in (11, 11, 12):
        torch.manual_seed(0)
        x = latent(4)
        noise = {"noise_sampler": own_noise(9)} if "noise_sampler" in inspect.signature(
            kdistpp.SAMPLERS[name]).parameters else {}
        teacher = ElementwiseDenoiser(bias=1.0)
        out = kdistpp.SAMPLERS[name](ElementwiseDenoiser(), x, SIGMAS, disable=True, teacher=teacher, w=0.5,
                                     guidance_steps=2, renoise="random",
                                     renoise_generator=torch.Generator(device=DEVICE).manual_seed(seed), **noise)
        after = torch.rand(4)
        torch.manual_seed(0)
        assert torch.equal(after, torch.rand(4)), "guiding drew from the global RNG"
        outputs.append(out)
        levels = [float(s[0]) for _, s, _ in teacher.inputs]
        assert len(levels) == 2 and all(SIG[-2] <= s <= SIG[0] for s in levels)
        assert not any(math.isclose(s, t) for s in levels for t in SIG)  # a random level, not a schedule sigma
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])


def test_renoise_generator_noise_is_its_own_stream():
    """The renoised point is x0s + sigma_r * randn(generator), drawn like x on the generator's device."""
    x, student, teacher = latent(5), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=teacher, w=0.5, disable=True,
                                renoise_generator=torch.Generator(device=DEVICE).manual_seed(21))
    x0s = student.inputs[0]
    x0s = ElementwiseDenoiser()(x0s[0], x0s[1])
    n = torch.randn(x.shape, generator=torch.Generator(device=DEVICE).manual_seed(21), device=DEVICE)
    torch.testing.assert_close(teacher.inputs[0][0], x0s + SIG[1] * n)


def test_renoise_generator_must_be_a_generator():
    with pytest.raises(TypeError, match="renoise_generator"):
        run("euler", 0.1, renoise_generator=21)


def test_a_sigma_window_holds_its_bounds_whatever_the_schedules_dtype():
    """A window typed as [3.65, 14.6] holds the float32 sigmas 3.6500001 and 14.6000004."""
    from kdistpp.guided_steps import step_weights

    sig = torch.linspace(14.6, 0, 5, dtype=torch.float64)
    window = kdistpp.SigmaWindow(3.65, 14.6)
    for dtype in (torch.float32, torch.float64):
        assert step_weights(0.3, window, [float(s) for s in sig.to(dtype)]) == (0.3, 0.3, 0.3, 0.3)
    # and no further: 3.4813 lies above a window ending at 3.0, 0.0500 below one starting at 0.08
    assert step_weights(0.3, kdistpp.SigmaWindow(0.08, 3.0), SIG) == (0.0, 0.0, 0.3, 0.0)


@pytest.mark.parametrize("kw,text", [
    (dict(w=[0.3, 0.0], guidance_steps=[0, 1]), "lists step 1, but w\\[1\\] is 0"),
    (dict(w=0.3, form="guidance", renoise="random"), "renoise and renoise_sampler have no effect"),
    (dict(w=0.3, form="guidance", renoise_generator=torch.Generator()), "renoise_sampler and renoise_generator have"),
    (dict(w=0.3, renoise_generator=torch.Generator()), "renoise_generator, which would draw it otherwise"),
])
def test_settings_that_do_nothing_warn(kw, text):
    with pytest.warns(kdistpp.GuidanceWarning, match=text):
        run("euler", **kw)  # run() passes a renoise_sampler


def test_a_zero_dim_numpy_w_is_a_number():
    assert torch.equal(run("euler", np.array(0.2))[0], run("euler", 0.2)[0])


def test_a_flow_models_fixed_renoise_level_is_a_flow_sigma():
    flow_sigmas = kdistpp.get_sigmas_flow(4, shift=3.0)
    with pytest.raises(ValueError, match="renoise=2.0 is not a flow sigma"):
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), latent(), flow_sigmas, teacher=ElementwiseDenoiser(), w=0.3,
                                    renoise=2.0, parametrization="flow")


def test_guidance_steps_as_tensors():
    assert run("euler", 0.3, guidance_steps=torch.tensor([0, 1]))[1] == 2
    assert run("euler", 0.3, guidance_steps=torch.tensor(2))[1] == 2
    with pytest.raises(TypeError, match="guidance_steps"):
        run("euler", 0.3, guidance_steps=torch.tensor(2.0))
