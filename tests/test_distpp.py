"""The Distillation++ refinement: its forms, its identities, its cost, and teacher_guided."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from k_diffusion import sampling as K

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser

SAMPLERS = dict(kdistpp.SAMPLERS)
CFG_PP = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m"]
SIGMAS = kdistpp.get_sigmas_karras(5, 0.05, 14.6)


def latent(seed=0, shape=(3, 2, 4, 4)):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 14.6).to(DEVICE)


def seeded(fn, *args, seed=7, **kw):
    torch.manual_seed(seed)
    if DEVICE.type == "cuda":
        torch.cuda.manual_seed(seed)
    return fn(*args, disable=True, **kw)


def generator_noise(seed):
    """A renoise/noise sampler with its own generator: independent of the global RNG."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return lambda sigma, sigma_next, shape=(3, 2, 4, 4): torch.randn(shape, generator=g, device=DEVICE)


@pytest.mark.parametrize("name", SAMPLERS)
@given(w=st.floats(0.0, 3.0), steps=st.integers(1, 5), seed=st.integers(0, 999))
def test_guidance_form_with_teacher_equal_to_student_is_the_baseline(name, w, steps, seed):
    x = latent(seed)
    student = ElementwiseDenoiser()
    expected = seeded(SAMPLERS[name], student, x, SIGMAS, teacher=student, w=0.0)
    got = seeded(SAMPLERS[name], student, x, SIGMAS, teacher=student, w=w, guidance_steps=steps, form="guidance")
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name,extra", [
    ("euler", {}), ("euler_ancestral", {}), ("consistency", {}),
    ("dpmpp_2m", {"history": "refined"}),  # the default keeps the student's estimate in the history
    ("dpmpp_2s_ancestral", {"guided_evaluation": "both"}),  # the midpoint is a second student call
])
def test_refined_direction_guidance_form_w1_everywhere_is_the_baseline_on_the_teacher(name, extra):
    x, student, teacher = latent(1), ElementwiseDenoiser(), ElementwiseDenoiser(bias=2.0, scale=1.5)
    expected = seeded(SAMPLERS[name], teacher, x, SIGMAS, teacher=teacher, w=0.0)
    got = seeded(SAMPLERS[name], student, x, SIGMAS, teacher=teacher, w=1.0, guidance_steps=5, form="guidance",
                 direction="refined", **extra)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2s_ancestral"])
def test_default_choices_differ_from_the_teacher_run(name):
    """Documented choices: the default direction keeps the student's noise, 2M's history keeps the
    student, so w=1 everywhere is not the teacher's run there."""
    x, student, teacher = latent(1), ElementwiseDenoiser(), ElementwiseDenoiser(bias=2.0, scale=1.5)
    expected = seeded(SAMPLERS[name], teacher, x, SIGMAS, teacher=teacher, w=0.0)
    got = seeded(SAMPLERS[name], student, x, SIGMAS, teacher=teacher, w=1.0, guidance_steps=5, form="guidance")
    assert (got - expected).abs().max() > 1e-3


class OwnNoise:
    """Renoise with the student's own noise (x - x0s) / sigma: the renoised point is x itself."""

    def __init__(self, student):
        self.student = student

    def __call__(self, sigma, sigma_next):
        x, s, _ = self.student.inputs[-1]
        return (x - self.student.last) / s[0].to(x.dtype)


class Recording(ElementwiseDenoiser):
    def __call__(self, x, sigma, **extra):
        self.last = super().__call__(x, sigma, **extra)
        return self.last


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("form", ["interpolate", "eps"])
@given(w=st.floats(0.05, 1.0), steps=st.integers(1, 4))
def test_renoise_current_with_own_noise_is_the_guidance_form(name, form, w, steps):
    x, teacher = latent(2), ElementwiseDenoiser(bias=1.0)
    student = Recording()
    expected = seeded(SAMPLERS[name], Recording(), x, SIGMAS, teacher=teacher, w=w, guidance_steps=steps, form="guidance")
    got = seeded(SAMPLERS[name], student, x, SIGMAS, teacher=teacher, w=w, guidance_steps=steps, form=form,
                 renoise="current", renoise_sampler=OwnNoise(student))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_interpolate_and_guidance_forms_give_close_samples_with_fresh_noise():
    """Paper Fig. 6: with fresh renoise noise, eq. 9 and eq. 10 give nearly the same samples. On
    this toy the mean gap between the two forms' samples is about 0.87 w (0.043 at w = 0.05), against
    0.37 between the plain student and the teacher, so at the paper's w (0.01-0.1) it is small."""
    mix = kdistpp.toys.ring_mixture(8, 4.0, 0.35, dim=2)
    sig = kdistpp.get_sigmas_karras(4, 0.05, 20.0)
    student = kdistpp.toys.ProgressiveStudent(mix, sig, substeps=2)
    x = (torch.randn(2000, 2, generator=torch.Generator().manual_seed(0)) * 20).to(DEVICE)
    run = lambda **kw: seeded(kdistpp.sample_euler_distpp, student, x, sig, teacher=mix, **kw)
    forms = {f: run(w=0.05, form=f) for f in ("interpolate", "guidance")}
    gap_forms = (forms["interpolate"] - forms["guidance"]).norm(dim=1).mean()
    gap_models = (run(w=0.0) - seeded(kdistpp.sample_euler_distpp, mix, x, sig, teacher=mix, w=0.0)).norm(dim=1).mean()
    assert gap_forms < 0.2 * gap_models, (gap_forms, gap_models)


# Not 2S a: its final update renoises along x + D_1 - U_2 (ComfyUI's dpmpp_2s_ancestral_cfg_pp, which
# kdistpp matches; tests/test_host_comfyui_samplers.py), and D_1 != D_2 even when U = C.
@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2m"])
def test_cfg_pp_with_uncond_equal_to_cond_is_the_plain_sampler(name):
    x, inner = latent(3), kdistpp.toys.ring_mixture(4, 2.0, 0.5, dim=32)
    cond = torch.zeros(3, 4, device=DEVICE)
    cond[:, 0] = 3.0
    model = kdistpp.CFGDenoiser(inner, cond=cond, uncond=cond, cond_scale=3.0)
    plain = seeded(SAMPLERS[name], model, x, SIGMAS, teacher=inner, w=0.0)
    cfgpp = seeded(SAMPLERS[name], model, x, SIGMAS, teacher=inner, w=0.0, cfg_pp=True)
    torch.testing.assert_close(cfgpp, plain)


def test_cfg_pp_euler_step_uses_the_unconditional_direction():
    """One guided Euler CFG++ step: x1 = x0h + sigma_1 * (x0 - U) / sigma_0 (design note)."""
    x, inner = latent(4), kdistpp.toys.ring_mixture(4, 2.0, 0.5, dim=32)
    cond = torch.zeros(3, 4, device=DEVICE)
    cond[:, 1] = 2.0
    model = kdistpp.CFGDenoiser(inner, cond=cond, uncond=torch.zeros_like(cond), cond_scale=0.6)
    teacher = ElementwiseDenoiser(bias=0.5)
    sig = SIGMAS[:2]
    seen = []
    got = seeded(kdistpp.sample_euler_distpp, model, x, sig, teacher=teacher, w=0.3, renoise="current",
                 cfg_pp=True, callback=seen.append)
    uncond = model.last_uncond_denoised
    expected = seen[0]["denoised"] + float(sig[1]) * (x - uncond) / float(sig[0])
    torch.testing.assert_close(got, expected)


KD = {"euler": K.sample_euler, "euler_ancestral": K.sample_euler_ancestral,
      "dpmpp_2s_ancestral": K.sample_dpmpp_2s_ancestral, "dpmpp_2m": K.sample_dpmpp_2m}


@pytest.mark.parametrize("name", KD)
@pytest.mark.parametrize("form", kdistpp.FORMS)
@given(w=st.floats(0.01, 1.0), steps=st.sets(st.integers(0, 3), min_size=1), renoise=st.sampled_from(["next", "current", 2.0]))
def test_teacher_guided_with_k_diffusion_equals_the_dedicated_sampler(name, form, w, steps, renoise):
    x, student, teacher = latent(5), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0, scale=2.0)
    # form='guidance' does not renoise: renoise settings would only warn that they do nothing
    common = dict(w=w, guidance_steps=steps, form=form, **({} if form == "guidance" else {"renoise": renoise}))
    noise = (lambda: {}) if form == "guidance" else (lambda: {"renoise_sampler": generator_noise(11)})
    # eta 0.7: at eta 1 a 2S-a midpoint sits exactly at sigma_{i+1}, where the wrapper (which
    # knows steps only by sigma) also refines it if step i+1 is guided; see the next test.
    eta = {"eta": 0.7} if "ancestral" in name else {}
    # A wrapper can only hand the sampler the refined estimate, so 2M's history holds it.
    # A wrapper can only replace the estimate: direction 'refined'; 2S: the first evaluation.
    options = {"dpmpp_2m": {"history": "refined"}, "dpmpp_2s_ancestral": {"guided_evaluation": "first"}}.get(name, {})
    wrapped = kdistpp.teacher_guided(student, teacher, SIGMAS, **noise(), **common)
    expected = seeded(KD[name], wrapped, x, SIGMAS.to(DEVICE), **eta)
    got = seeded(SAMPLERS[name], student, x, SIGMAS, teacher=teacher, **noise(), **common, **eta,
                 direction="refined", **options)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-4)


def test_teacher_guided_2s_ancestral_eta1_agrees_when_only_the_first_step_is_guided():
    x, student, teacher = latent(5), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0, scale=2.0)
    wrapped = kdistpp.teacher_guided(student, teacher, SIGMAS, w=0.3, renoise_sampler=generator_noise(3))
    expected = seeded(K.sample_dpmpp_2s_ancestral, wrapped, x, SIGMAS.to(DEVICE))
    got = seeded(kdistpp.sample_dpmpp_2s_ancestral_distpp, student, x, SIGMAS, teacher=teacher, w=0.3,
                 renoise_sampler=generator_noise(3), direction="refined", guided_evaluation="first")
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-4)


def test_teacher_guided_with_sample_consistency_equals_the_dedicated_sampler():
    x, student, teacher = latent(6), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, SIGMAS, w=0.2, guidance_steps=2, form="eps")
    expected = seeded(kdistpp.sample_consistency, wrapped, x, SIGMAS)
    got = seeded(kdistpp.sample_consistency_distpp, student, x, SIGMAS, teacher=teacher, w=0.2, guidance_steps=2, form="eps")
    torch.testing.assert_close(got, expected)
    default = seeded(kdistpp.sample_consistency_distpp, student, x, SIGMAS, teacher=teacher, w=0.2, guidance_steps=2,
                     form="eps", direction="refined")
    assert torch.equal(default, got)  # consistency lands on the estimate: both directions give x0h


def test_teacher_guided_drives_samplers_kdistpp_does_not_ship():
    x, student, teacher = latent(7), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, SIGMAS, w=0.5)
    plain = seeded(K.sample_heun, student, x, SIGMAS.to(DEVICE))
    guided = seeded(K.sample_heun, wrapped, x, SIGMAS.to(DEVICE))
    assert teacher.calls == 1  # Heun's step 0: only the evaluation at sigma_0 is guided
    assert (guided - plain).abs().max() > 1e-3


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("form", kdistpp.FORMS)
def test_one_teacher_call_per_guided_step_and_callback_keys(name, form):
    x, student, teacher = latent(8), Recording(), Recording(bias=1.0)
    seen, w, sig = [], 0.2, [float(s) for s in SIGMAS]
    # 2S a: the default refines the midpoint, after the callback; 'first' shows the refinement there
    options = {"guided_evaluation": "first"} if name == "dpmpp_2s_ancestral" else {}
    renoise = {} if form == "guidance" else {"renoise_sampler": generator_noise(5)}  # guidance does not renoise
    seeded(SAMPLERS[name], student, x, SIGMAS, teacher=teacher, w=w, guidance_steps=[0, 2], form=form,
           callback=seen.append, **renoise, **options)
    assert teacher.calls == 2
    assert [d["i"] for d in seen] == list(range(5))
    noise = generator_noise(5)
    for d in seen:
        assert {"x", "i", "sigma", "sigma_hat", "denoised"} <= set(d)
        assert ({"student_denoised", "teacher_denoised"} <= set(d)) == (d["i"] in (0, 2))
        if d["i"] not in (0, 2):
            continue
        # the refined estimate, recomputed from the callback's parts and the replayed renoise noise
        i, x0s, x0t = d["i"], d["student_denoised"], d["teacher_denoised"]
        n = noise(None, None)
        if form == "eps":  # x_r = x0s + sigma_{i+1} n; eps-mixing with the sigma_i / sigma_r factor
            x_r = x0s + sig[i + 1] * n
            eps_s, eps_t = (d["x"] - x0s) / sig[i], (x_r - x0t) / sig[i + 1]
            expected = d["x"] - sig[i] * (eps_s + w * (eps_t - eps_s))
        else:
            expected = x0s + w * (x0t - x0s)
            teacher_point = d["x"] if form == "guidance" else x0s + sig[i + 1] * n
            torch.testing.assert_close(teacher.inputs[len([e for e in seen if e["i"] in (0, 2) and e["i"] < i])][0],
                                       teacher_point, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d["denoised"], expected, rtol=1e-5, atol=1e-4)


def test_teacher_gets_its_own_extra_args_and_the_student_sigma_vector():
    x, student, teacher = latent(9), ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    seeded(kdistpp.sample_euler_distpp, student, x, SIGMAS, extra_args={"cond": "s"}, teacher=teacher, w=0.1,
           teacher_extra_args={"cond": "t"})
    (tx, ts, textra), = teacher.inputs
    assert textra == {"cond": "t"} and all(e == {"cond": "s"} for _, _, e in student.inputs)
    assert ts.shape == (3,) and float(ts[0]) == pytest.approx(float(SIGMAS[1]))  # renoise 'next'
    teacher2 = ElementwiseDenoiser()
    seeded(kdistpp.sample_euler_distpp, student, x, SIGMAS, extra_args={"cond": "s"}, teacher=teacher2, w=0.1)
    assert teacher2.inputs[0][2] == {"cond": "s"}  # defaults to extra_args


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_in_dtype_out_and_no_mutation(name, dtype):
    x = latent(10).to(dtype)
    sigmas = SIGMAS.clone()
    x_copy, sigmas_copy = x.clone(), sigmas.clone()
    student, teacher = ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    out = seeded(SAMPLERS[name], student, x, sigmas, teacher=teacher, w=0.3, guidance_steps=2)
    assert out.dtype == dtype and out.device == x.device and torch.isfinite(out).all()
    assert torch.equal(x, x_copy) and torch.equal(sigmas, sigmas_copy)
    assert all(xi.dtype == dtype for xi, _, _ in student.inputs + teacher.inputs)  # models see their dtype


def test_renoise_levels():
    x, student = latent(11), ElementwiseDenoiser()
    for renoise, check in [("next", lambda s: s == pytest.approx(float(SIGMAS[1]))),
                           ("current", lambda s: s == pytest.approx(float(SIGMAS[0]))),
                           (3.0, lambda s: s == pytest.approx(3.0)),
                           ("random", lambda s: float(SIGMAS[-2]) * 0.999 <= s <= float(SIGMAS[0]) * 1.001)]:
        teacher = ElementwiseDenoiser(bias=1.0)
        seeded(kdistpp.sample_euler_distpp, student, x, SIGMAS, teacher=teacher, w=0.1, renoise=renoise)
        assert check(float(teacher.inputs[0][1][0])), renoise


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA")
def test_sigmas_on_cpu_latent_on_cuda():
    x = latent(12)
    out = kdistpp.sample_dpmpp_2m_distpp(ElementwiseDenoiser(), x, SIGMAS.cpu(), teacher=ElementwiseDenoiser(1.0), w=0.1,
                                         disable=True)
    assert out.is_cuda


def test_teacher_guided_exposes_the_students_attributes_and_survives_deepcopy():
    # hosts read attributes such as sigma_min or inner_model off the denoiser they are given
    import copy

    student, teacher = ElementwiseDenoiser(bias=0.25), ElementwiseDenoiser(bias=1.0)
    wrapped = kdistpp.teacher_guided(student, teacher, SIGMAS, w=0.5)
    assert wrapped.bias == 0.25 and wrapped.scale == 1.0
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute
    x = latent(3)
    clone = copy.deepcopy(wrapped)  # copying builds the object before its fields exist
    assert clone.bias == 0.25
    assert torch.equal(seeded(K.sample_euler, clone, x, SIGMAS.to(DEVICE)), seeded(K.sample_euler, wrapped, x, SIGMAS.to(DEVICE)))
