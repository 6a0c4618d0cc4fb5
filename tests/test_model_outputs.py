"""Bad model outputs are errors that name the model that produced them, where, and at which sigma;
steps that would overflow or divide by zero are handled, not propagated."""

from __future__ import annotations

import math

import pytest
import torch

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser

SIGMAS = kdistpp.get_sigmas_karras(4, 0.05, 14.6)
SIG = [float(s) for s in SIGMAS]


def latent(seed=0, shape=(2, 3, 4), dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * SIG[0]).to(DEVICE, dtype)


class Broken(ElementwiseDenoiser):
    """Returns `bad(x)` at the sigmas in `at` (every sigma when None), else a normal estimate."""

    def __init__(self, bad, at=None, bias=0.0):
        super().__init__(bias=bias)
        self.bad, self.at = bad, at

    def __call__(self, x, sigma, **extra):
        out = super().__call__(x, sigma, **extra)
        if self.at is None or any(math.isclose(float(sigma[0]), s, rel_tol=1e-6) for s in self.at):
            return self.bad(out)
        return out


NAN = lambda out: torch.full_like(out, float("nan"))  # noqa: E731
SHAPES = [(lambda out: out[:1], "shape"), (lambda out: out.reshape(-1)[:1].reshape(1, 1, 1), "shape"),
          (lambda out: (out, None), "tuple"), (NAN, "non-finite")]


@pytest.mark.parametrize("name", kdistpp.SAMPLERS)
@pytest.mark.parametrize("bad,text", SHAPES)
@pytest.mark.parametrize("setting", [dict(), dict(w=0.2, teacher=ElementwiseDenoiser(bias=1.0), form="guidance")])
def test_a_bad_student_output_is_a_student_error_on_any_step(name, bad, text, setting):
    """Also on an unguided step (sigma_2), at w = 0 and in the guidance form, where no teacher runs."""
    student = Broken(bad, at=[SIG[2]])
    with pytest.raises(kdistpp.StudentOutputError, match=text) as info:
        kdistpp.SAMPLERS[name](student, latent(), SIGMAS, disable=True, **setting)
    assert "student" in str(info.value) and "teacher" not in str(info.value)
    assert f"{SIG[2]:.4g}" in str(info.value)


@pytest.mark.parametrize("bad,text", SHAPES)
def test_a_bad_teacher_output_names_the_teacher_the_step_and_both_sigmas(bad, text):
    def teacher(x, s, **k):
        return bad(ElementwiseDenoiser(bias=1.0)(x, s))

    with pytest.raises(kdistpp.TeacherOutputError, match=text) as info:
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), latent(), SIGMAS, teacher=teacher, w=0.1,
                                    guidance_steps=[1], disable=True)
    message = str(info.value)
    assert "teacher teacher" in message and "step 1" in message
    assert f"step sigma={SIG[1]:.4g}" in message and f"sigma_r={SIG[2]:.4g}" in message


def test_teacher_guided_checks_the_wrapped_student():
    wrapped = kdistpp.teacher_guided(Broken(NAN), ElementwiseDenoiser(bias=1.0), SIGMAS, w=0.1)
    with pytest.raises(kdistpp.StudentOutputError, match="student"):
        wrapped(latent(), torch.full((2,), SIG[2], device=DEVICE))


def test_errors_share_a_base_class_and_are_value_errors():
    assert issubclass(kdistpp.StudentOutputError, kdistpp.DenoiserOutputError)
    assert issubclass(kdistpp.TeacherOutputError, kdistpp.DenoiserOutputError)
    assert issubclass(kdistpp.DenoiserOutputError, ValueError)


def test_a_w_beyond_the_step_dtype_is_refused_before_any_call():
    student = ElementwiseDenoiser()
    with pytest.raises(ValueError, match="w=1e[+]?300 is beyond torch.float32's range"):
        kdistpp.sample_euler_distpp(student, latent(), SIGMAS, teacher=ElementwiseDenoiser(bias=1.0), w=1e300,
                                    disable=True)
    assert student.calls == 0


@pytest.mark.parametrize("w,dtype", [(1e38, torch.float32), (1e6, torch.float16), (1e6, torch.bfloat16)])
def test_a_w_whose_refined_estimate_overflows_the_models_dtype_is_an_error(w, dtype):
    """x0s + w (x0T - x0s) leaves the model dtype's range: refused at that step, naming w and the dtype
    (bfloat16 holds 1e6: no error there)."""
    student, teacher = ElementwiseDenoiser(), ElementwiseDenoiser(bias=10.0)
    x = latent(dtype=dtype)
    if dtype == torch.bfloat16:
        out = kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=teacher, w=w, disable=True)
        assert bool(torch.isfinite(out).all())
        return
    with pytest.raises(ValueError, match="overflow") as info:
        kdistpp.sample_euler_distpp(student, x, SIGMAS, teacher=teacher, w=w, disable=True)
    assert f"w={w}" in str(info.value) and str(dtype) in str(info.value) and "step 0" in str(info.value)
    assert student.calls == 1


def test_a_w_that_fits_the_dtype_runs():
    out = kdistpp.sample_euler_distpp(ElementwiseDenoiser(), latent(dtype=torch.float16), SIGMAS,
                                      teacher=ElementwiseDenoiser(bias=1.0), w=50.0, disable=True)
    assert out.dtype == torch.float16 and bool(torch.isfinite(out).all())


def test_dpmpp_2m_steps_over_a_repeated_sigma_as_first_order_steps():
    """[10, 5, 5, 1, 0]: the zero step leaves x as it is; the steps beside it have no step ratio,
    so they are first order (written out here with the DPM-Solver++ first-order update)."""
    sigmas = torch.tensor([10.0, 5.0, 5.0, 1.0, 0.0])
    x, student = latent(3), ElementwiseDenoiser()
    got = kdistpp.sample_dpmpp_2m_distpp(student, x, sigmas, disable=True)

    def first_order(x, s, s_next):
        d = student(x, torch.full((x.shape[0],), s, device=DEVICE))
        return d if s_next == 0 else (s_next / s) * x - math.expm1(-math.log(s / s_next)) * d

    expected = x
    for s, s_next in [(10.0, 5.0), (5.0, 5.0), (5.0, 1.0), (1.0, 0.0)]:
        expected = first_order(expected, s, s_next)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_bad_teacher_output_at_the_2s_midpoint_names_the_step_sigma_and_the_evaluation_sigma():
    seen = []

    def teacher(x, s, **k):
        seen.append(float(s.flatten()[0]))
        return torch.full_like(x, float("nan"))

    with pytest.raises(kdistpp.TeacherOutputError) as info:
        kdistpp.sample_dpmpp_2s_ancestral_distpp(ElementwiseDenoiser(), latent(), SIGMAS, teacher=teacher, w=0.1,
                                                 disable=True)
    message = str(info.value)
    assert f"step sigma={SIG[0]:.4g}" in message and "evaluated at sigma=" in message
    # the 2S midpoint exp(-(t + t_down) / 2), t = -log sigma, with eta = 1's sigma_down, written out here
    s0, s1 = SIG[0], SIG[1]
    down = math.sqrt(s1 ** 2 - min(s1, math.sqrt(s1 ** 2 * (s0 ** 2 - s1 ** 2) / s0 ** 2)) ** 2)
    assert seen[0] == pytest.approx(math.sqrt(s0 * down), rel=1e-5)
    assert f"evaluated at sigma={seen[0]:.4g}" in message


def test_a_bad_output_late_in_a_long_run_is_named_and_the_first_bad_one_wins():
    """The checks are read from the device once per run: a failure after hundreds of good calls is still
    found, and of several failures the first is the one reported."""
    sigmas = kdistpp.get_sigmas_karras(300, 0.05, 14.6)
    late = [float(sigmas[280]), float(sigmas[290])]
    with pytest.raises(kdistpp.StudentOutputError, match="non-finite") as info:
        kdistpp.sample_euler_distpp(Broken(NAN, at=late), latent(), sigmas, disable=True)
    assert f"at sigma={late[0]:.4g}" in str(info.value)


def test_a_w_at_the_step_dtypes_largest_value_is_still_a_number_it_computes_with():
    """w = float32's largest finite value is in range (only beyond it is refused up front); with the student
    as its own teacher the refined estimate is the student's, so the run completes."""
    out = kdistpp.sample_euler_distpp(ElementwiseDenoiser(), latent(), SIGMAS, teacher=ElementwiseDenoiser(),
                                      w=float(torch.finfo(torch.float32).max), disable=True)
    assert bool(torch.isfinite(out).all())
