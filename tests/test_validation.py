"""Bad input gets a ValueError/TypeError naming the argument, before any model call."""

from __future__ import annotations

import pytest
import torch

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser

SIGMAS = kdistpp.get_sigmas_karras(4, 0.05, 14.6)


def call(sampler="euler", x=None, sigmas=SIGMAS, student=None, **kw):
    student = student or ElementwiseDenoiser()
    kw.setdefault("teacher", ElementwiseDenoiser(bias=1.0))
    kw.setdefault("w", 0.1)
    x = torch.randn(2, 3, device=DEVICE) if x is None else x
    kdistpp.SAMPLERS[sampler](student, x, sigmas, disable=True, **kw)
    return student, kw["teacher"]


BAD = [
    ("sigmas", dict(sigmas=SIGMAS[None]), ValueError, "1-D"),
    ("sigmas", dict(sigmas=SIGMAS[:1]), ValueError, "at least 2"),
    ("sigmas", dict(sigmas=SIGMAS.flip(0)), ValueError, "non-increasing"),
    ("sigmas", dict(sigmas=torch.tensor([3.0, 1.0, 2.0, 0.0])), ValueError, "non-increasing"),
    ("sigmas", dict(sigmas=torch.tensor([2.0, 1.0, -1.0])), ValueError, "non-negative"),
    ("sigmas", dict(sigmas=torch.tensor([2.0, float("nan"), 0.0])), ValueError, "finite"),
    ("sigmas", dict(sigmas=torch.tensor([2.0, 0.0, 0.0])), ValueError, "only the last"),
    ("sigmas", dict(sigmas=[2.0, 1.0, 0.0]), TypeError, "torch.Tensor"),
    ("x", dict(x=torch.ones(2, 3, dtype=torch.long)), TypeError, "floating"),
    ("x", dict(x=[[1.0]]), TypeError, "torch.Tensor"),
    ("x", dict(x=torch.zeros(0, 3)), ValueError, "non-empty batch"),
    ("x", dict(x=torch.tensor(1.0)), ValueError, "non-empty batch"),
    ("w", dict(w=-0.1), ValueError, ">= 0"),
    ("w", dict(w=float("inf")), ValueError, "finite"),
    ("w", dict(w=float("nan")), ValueError, "finite"),
    ("w", dict(w=[0.1], guidance_steps=2), ValueError, "one value per step"),
    ("w", dict(w="strong"), TypeError, "float"),
    ("w", dict(w=True), TypeError, "float"),
    ("w", dict(w=torch.tensor([0.1, 0.2]), guidance_steps=3), ValueError, "one value per step"),
    ("direction", dict(direction="teacher"), ValueError, "'student'"),
    ("guidance_steps", dict(guidance_steps=True), TypeError, "bool"),
    ("guidance_steps", dict(guidance_steps=5), ValueError, "beyond the schedule"),
    ("guidance_steps", dict(guidance_steps=-1), ValueError, "beyond the schedule"),
    ("guidance_steps", dict(guidance_steps=[0, 4]), ValueError, "beyond the schedule"),
    ("guidance_steps", dict(guidance_steps=[0.5]), TypeError, "ints"),
    ("guidance_steps", dict(guidance_steps="first"), TypeError, "collection"),
    ("form", dict(form="cfg"), ValueError, "'interpolate'"),
    ("renoise", dict(renoise="previous"), ValueError, "'next'"),
    ("renoise", dict(renoise=0.0), ValueError, "sigma > 0"),
    ("renoise", dict(renoise=None), TypeError, "'next'"),
    ("renoise", dict(guidance_steps=4), ValueError, "next sigma is 0"),
    ("teacher", dict(teacher="sdxl"), TypeError, "callable"),
    ("renoise_sampler", dict(renoise_sampler=3), TypeError, "callable"),
    ("teacher_extra_args", dict(teacher_extra_args=[1]), TypeError, "dict"),
    ("extra_args", dict(extra_args="cond"), TypeError, "dict"),
    ("cfg_pp", dict(cfg_pp=True), TypeError, "last_uncond_denoised"),
    ("eta", dict(sampler="euler_ancestral", eta=-1.0), ValueError, ">= 0"),
    ("eta", dict(sampler="euler_ancestral", eta=float("nan")), ValueError, "got nan"),
    ("eta", dict(sampler="dpmpp_2s_ancestral", eta=float("inf")), ValueError, "finite"),
    ("eta", dict(sampler="euler_ancestral", eta="1"), TypeError, "real number"),
    ("s_noise", dict(sampler="euler_ancestral", s_noise=-1.0), ValueError, ">= 0"),
    ("s_noise", dict(sampler="dpmpp_2s_ancestral", s_noise=float("nan")), ValueError, "got nan"),
    ("s_noise", dict(sampler="euler", s_noise=None), TypeError, "real number"),
    ("s_churn", dict(sampler="euler", s_churn=-5.0), ValueError, ">= 0"),
    ("s_churn", dict(sampler="euler", s_churn=float("nan")), ValueError, "got nan"),
    ("s_tmin", dict(sampler="euler", s_tmin=float("nan")), ValueError, "got nan"),
    ("s_tmax", dict(sampler="euler", s_tmax=float("-inf")), ValueError, "got -inf"),
    ("s_noise", dict(sampler="euler_ancestral", s_noise=float("inf")), ValueError, "finite"),
    ("s_churn", dict(sampler="euler", s_churn=float("inf")), ValueError, "finite"),
    ("s_tmin", dict(sampler="euler", s_tmin=float("inf")), ValueError, "finite"),
    ("sigmas", dict(sigmas=torch.tensor([14.6, 2.0, 5.0, 0.5, 0.0])), ValueError, "sigma_2=5 is above sigma_1=2"),
    ("sigmas", dict(sigmas=torch.tensor([1.0, 3.0, 2.0, 4.0])), ValueError, "sigma_1=3 is above sigma_0=1"),
    ("sigmas", dict(sigmas=torch.tensor([0.0, 1.0, 1.0, 2.0])), ValueError, "reverse it"),
]


@pytest.mark.parametrize("argument,kwargs,error,text", BAD, ids=[f"{a}-{t}" for a, _, _, t in BAD])
def test_bad_input_is_refused_before_any_model_call(argument, kwargs, error, text):
    student, teacher = ElementwiseDenoiser(), kwargs.get("teacher", ElementwiseDenoiser(bias=1.0))
    with pytest.raises(error, match=text) as info:
        call(student=student, **{"teacher": teacher, **kwargs})
    assert argument in str(info.value)
    assert student.calls == 0 and getattr(teacher, "calls", 0) == 0
    if argument == "sigmas" and "flip" in str(info.value):  # the hint fixes what it is given for
        assert kwargs["sigmas"].flip(0).diff().le(0).all()


def test_a_noise_sampler_of_the_wrong_shape_is_named_at_its_first_draw():
    for sampler, key in (("euler_ancestral", "noise_sampler"), ("dpmpp_2s_ancestral", "noise_sampler"),
                         ("consistency", "noise_sampler"), ("euler", "renoise_sampler")):
        student = ElementwiseDenoiser()
        with pytest.raises(ValueError, match=rf"{key} returned shape \(1, 3\) at step 0; .* \(2, 3\)"):
            call(sampler, student=student, **{key: lambda s, sn: torch.randn(1, 3, device=DEVICE)})
        assert student.calls == (2 if sampler == "dpmpp_2s_ancestral" else 1)  # the first draw follows step 0's calls
    with pytest.raises(TypeError, match="noise_sampler returned a float"):
        call("euler_ancestral", noise_sampler=lambda s, sn: 0.0)


def test_sampler_options_in_range_run():
    call("euler_ancestral", eta=0.0, s_noise=0.0)
    call("euler", s_churn=1.0, s_tmin=0.0, s_tmax=float("inf"), guidance_steps=[1])
    call("euler", s_churn=1.0, s_tmin=0.2, s_tmax=0.5, guidance_steps=[1])
    call("dpmpp_2s_ancestral", eta=torch.tensor(0.5), s_noise=1)


def test_model_not_callable():
    with pytest.raises(TypeError, match="model"):
        kdistpp.sample_euler_distpp("unet", torch.zeros(1, 2), SIGMAS, teacher=ElementwiseDenoiser(), w=0.1)


def test_last_step_guided_with_a_sound_renoise_level_is_allowed():
    call(guidance_steps=4, renoise="current")
    call(guidance_steps=4, form="guidance")
    call(guidance_steps=[3], renoise=0.5)


@pytest.mark.parametrize("bad,text", [
    (lambda x, s, **k: x[:1], "shape"),
    (lambda x, s, **k: torch.full_like(x, float("nan")), "non-finite"),
])
def test_bad_teacher_output_names_teacher_and_step(bad, text):
    def teacher(x, s, **k):
        return bad(x, s)

    with pytest.raises(kdistpp.TeacherOutputError, match=rf"teacher teacher .*{text}.*|teacher teacher returned .*") as info:
        call(teacher=teacher, guidance_steps=[1])
    assert "step 1" in str(info.value) and text in str(info.value)


def test_teacher_guided_validates_up_front():
    with pytest.raises(TypeError, match="student"):
        kdistpp.teacher_guided(None, ElementwiseDenoiser(), SIGMAS, w=0.1)
    with pytest.raises(ValueError, match="form"):
        kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(), SIGMAS, w=0.1, form="x")
    with pytest.raises(ValueError, match="history"):
        kdistpp.sample_dpmpp_2m_distpp(ElementwiseDenoiser(), torch.zeros(1, 2), SIGMAS, teacher=ElementwiseDenoiser(), w=0.1,
                                       history="teacher")


def test_w_list_positive_outside_explicit_guidance_steps_is_an_error():
    with pytest.raises(ValueError, match=r"w\[0\]=0.3 but step 0 is not among guidance_steps=0"):
        call(w=[0.3, 0.1], guidance_steps=0)
    student, teacher = call(w=0.3, guidance_steps=[torch.tensor(1)])
    assert teacher.calls == 1
