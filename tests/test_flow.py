"""Rectified-flow models (parametrization='flow'): each sampler against a flow-native reference
written here from the flow formulas, the refinement written with (1 - s) x0 + s n, the run of the
converted VE model, s = 1 handled exactly, and the flow schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser
from kdistpp import flow

SHAPE = (2, 3, 4)


def schedule(n, shift, start=1.0):
    """A shifted flow schedule from `start` down, ending at 0, in float64."""
    t = torch.linspace(start, 0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def noise_list(seed, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(count)]


def replay(noises):
    it = iter(noises)
    return lambda sigma, sigma_next: next(it)


def call(model, x, s):
    return model(x, torch.full((x.shape[0],), s, dtype=x.dtype, device=x.device))


# Flow-native references: state x = (1 - s) x0 + s n throughout, written from the formulas.

def ref_euler(model, x, s, noises=None, eta=None):
    for i in range(len(s) - 1):
        x0 = call(model, x, s[i])
        x = (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * x0  # DDIM / flow Euler
    return x


def rf_down(s, s_next, eta):
    s_down = s_next * (1 + (s_next / s - 1) * eta)
    c = math.sqrt(s_next**2 - s_down**2 * (1 - s_next) ** 2 / (1 - s_down) ** 2)
    return s_down, c


def ref_euler_ancestral(model, x, s, noises, eta):
    for i in range(len(s) - 1):
        x0 = call(model, x, s[i])
        if s[i + 1] == 0:
            x = x0
            continue
        s_down, c = rf_down(s[i], s[i + 1], eta)
        x = (s_down / s[i]) * x + (1 - s_down / s[i]) * x0
        x = (1 - s[i + 1]) / (1 - s_down) * x + c * noises[i]
    return x


def ref_dpmpp_2s_ancestral(model, x, s, noises, eta):
    for i in range(len(s) - 1):
        x0 = call(model, x, s[i])
        if s[i + 1] == 0:
            x = x0
            continue
        s_down, c = rf_down(s[i], s[i + 1], eta)
        lam = lambda v: math.log((1 - v) / v)  # noqa: E731
        s_mid = 0.9999 if s[i] == 1 else 1 / (1 + math.exp((lam(s[i]) + lam(s_down)) / 2))
        u = (s_mid / s[i]) * x + (1 - s_mid / s[i]) * x0
        x0_mid = call(model, u, s_mid)
        x = (s_down / s[i]) * x + (1 - s_down / s[i]) * x0_mid
        x = (1 - s[i + 1]) / (1 - s_down) * x + c * noises[i]
    return x


def ref_dpmpp_2m(model, x, s, noises=None, eta=None):
    """DPM-Solver++(2M) with its step ratio in t = -log s, as ComfyUI runs it on flow models."""
    previous = None
    for i in range(len(s) - 1):
        x0 = call(model, x, s[i])
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i] / s[i + 1])
            d = x0
            if previous is not None:
                r = math.log(s[i - 1] / s[i]) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
            x = (s[i + 1] / s[i]) * x + (1 - s[i + 1] / s[i]) * d
        previous = x0
    return x


def ref_consistency(model, x, s, noises, eta=None):
    for i in range(len(s) - 1):
        x = call(model, x, s[i])
        if s[i + 1] > 0:
            x = (1 - s[i + 1]) * x + s[i + 1] * noises[i]
    return x


REFERENCES = {"euler": ref_euler, "euler_ancestral": ref_euler_ancestral, "dpmpp_2s_ancestral": ref_dpmpp_2s_ancestral,
              "dpmpp_2m": ref_dpmpp_2m, "consistency": ref_consistency}
NOISY = {"euler_ancestral", "dpmpp_2s_ancestral", "consistency"}


@pytest.mark.parametrize("name", REFERENCES)
@given(n=st.integers(1, 6), shift=st.floats(1.0, 8.0), start=st.sampled_from([1.0, 0.97, 0.6]),
       eta=st.sampled_from([1.0, 0.6]), seed=st.integers(0, 99))
def test_each_sampler_on_a_flow_model_equals_its_flow_native_reference(name, n, shift, start, eta, seed):
    s = schedule(n, shift, start)
    x = noise_list(seed + 1000, 1)[0] * float(s[0])
    model = ElementwiseDenoiser(bias=0.3)
    noises = noise_list(seed, n)
    kw = {"noise_sampler": replay(noises)} if name in NOISY else {}
    if "ancestral" in name:
        kw["eta"] = eta
    ours = kdistpp.SAMPLERS[name](model, x, s, disable=True, parametrization="flow", **kw)
    expected = REFERENCES[name](model, x, [float(v) for v in s], noises, eta)
    assert bool(torch.isfinite(ours).all())
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", REFERENCES)
@pytest.mark.parametrize("form", ["interpolate", "guidance"])
@given(w=st.floats(0.05, 1.0), shift=st.floats(1.0, 6.0), seed=st.integers(0, 99))
def test_a_guided_flow_step_renoises_with_the_flow_state_and_moves_by_one_minus_s_next(name, form, w, shift, seed):
    """Eq. 9 in flow terms: the teacher sees x_r = (1 - s_r) x0s + s_r n at s_r = s_1, and the state
    after the step (the one the callback gets at step 1) moves by (1 - s_1) w (x0T - x0s) from the
    unguided step's (direction 'student')."""
    s = schedule(4, shift)[:3]  # two steps, 1 -> s_1 -> s_2 > 0; step 0 guided
    x = noise_list(seed + 500, 1)[0]
    student, teacher = ElementwiseDenoiser(bias=0.3), ElementwiseDenoiser(bias=-0.7, scale=1.4)
    noises = noise_list(seed, 2)
    states = {"base": [], "guided": []}
    base = {"noise_sampler": replay(noises)} if name in NOISY else {}
    kdistpp.SAMPLERS[name](student, x, s, disable=True, parametrization="flow", **base,
                           callback=lambda d: states["base"].append(d))
    renoise = {} if form == "guidance" else {"renoise_generator": torch.Generator(device=DEVICE).manual_seed(seed)}
    kw = {"noise_sampler": replay(noises)} if name in NOISY else {}
    kdistpp.SAMPLERS[name](student, x, s, disable=True, parametrization="flow", teacher=teacher, w=w, form=form,
                           callback=lambda d: states["guided"].append(d), **renoise, **kw)
    refined = 1 if name == "dpmpp_2s_ancestral" else 0  # 2S a refines its midpoint evaluation
    point, level = teacher.inputs[0][0], teacher.inputs[0][1]
    x0t = teacher(point, level)
    evaluated = student.inputs[len(student.inputs) // 2 + refined]  # the guided run's refined evaluation
    x0s = student(*evaluated[:2])
    if refined == 0:
        torch.testing.assert_close(states["guided"][0]["student_denoised"], x0s)
    s1 = float(s[1])
    moved = states["guided"][1]["x"] - states["base"][1]["x"]
    torch.testing.assert_close(moved, (1 - s1) * w * (x0t - x0s), rtol=1e-9, atol=1e-9)
    level = float(level[0])
    if form == "interpolate":
        n = torch.randn(SHAPE, generator=torch.Generator(device=DEVICE).manual_seed(seed), dtype=x.dtype, device=DEVICE)
        assert level == pytest.approx(s1)
        torch.testing.assert_close(point, (1 - s1) * x0s + s1 * n, rtol=1e-12, atol=1e-12)
    else:
        assert level == pytest.approx(float(evaluated[1][0]))
        torch.testing.assert_close(point, evaluated[0], rtol=0, atol=0)  # the state the student evaluated


@pytest.mark.filterwarnings("ignore:form='eps' scales")  # an identity of the maps, at any w and sigma
@pytest.mark.parametrize("name", ["euler", "consistency"])
@pytest.mark.parametrize("form", kdistpp.FORMS)
@given(n=st.integers(3, 5), shift=st.floats(1.0, 6.0), w=st.floats(0.0, 0.8), seed=st.integers(0, 99))
def test_the_flow_run_is_the_ve_run_of_the_converted_model(name, form, n, shift, w, seed):
    """A flow model is a VE model in y = x / (1 - s), sigma = s / (1 - s): Euler (DDIM) and the
    consistency sampler, guided or not, give the same sample in either coordinate."""
    s = schedule(n, shift, start=0.95)
    sigma = torch.tensor([flow.ve_sigma(float(v)) for v in s], dtype=torch.float64)
    x = noise_list(seed + 7, 1)[0] * float(s[0])
    student, teacher = ElementwiseDenoiser(bias=0.3), ElementwiseDenoiser(bias=-0.7, scale=1.4)
    kw = dict(teacher=teacher, w=w, form=form, guidance_steps=[0, 1], renoise="next")
    runs = []
    for coordinates in ("flow", "ve"):
        noises = noise_list(seed, n)
        extra = {"noise_sampler": replay(noises)} if name == "consistency" else {}
        gen = {} if form == "guidance" else {"renoise_generator": torch.Generator(device=DEVICE).manual_seed(seed + 1)}
        if coordinates == "flow":
            runs.append(kdistpp.SAMPLERS[name](student, x, s, disable=True, parametrization="flow", **gen, **kw,
                                               **extra))
        else:
            ve_teacher = flow.VEDenoiser(teacher)
            out = kdistpp.SAMPLERS[name](flow.VEDenoiser(student), flow.to_ve(x, float(s[0])), sigma, disable=True,
                                         **gen, **{**kw, "teacher": ve_teacher}, **extra)
            runs.append(flow.to_flow(out, 0.0))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-8, atol=1e-8)


def test_a_schedule_starting_at_s_1_is_exact_and_the_eps_form_cannot_guide_there():
    s = schedule(4, 3.0)
    assert float(s[0]) == 1.0
    x = noise_list(1, 1)[0]
    student, teacher = ElementwiseDenoiser(bias=0.3), ElementwiseDenoiser(bias=-0.7)
    for name in kdistpp.SAMPLERS:
        out = kdistpp.SAMPLERS[name](student, x, s, disable=True, parametrization="flow", teacher=teacher, w=0.3)
        assert bool(torch.isfinite(out).all()), name
    with pytest.raises(ValueError, match="s = 1"):
        kdistpp.sample_consistency_distpp(student, x, s, teacher=teacher, w=0.01, form="eps", parametrization="flow")
    out = kdistpp.sample_consistency_distpp(student, x, s, teacher=teacher, w=0.01, form="eps", guidance_steps=[1],
                                            parametrization="flow", disable=True)
    assert bool(torch.isfinite(out).all())


def test_flow_arguments_are_checked():
    x = noise_list(1, 1)[0]
    with pytest.raises(ValueError, match="lie in \\[0, 1\\]"):
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, kdistpp.get_sigmas_karras(4, 0.1, 14.6), parametrization="flow")
    with pytest.raises(ValueError, match="lie in \\[0, 1\\], got 1.5"):
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, torch.tensor([1.5, 0.5, 0.0]), parametrization="flow")
    with pytest.raises(ValueError, match="parametrization must be"):
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, schedule(2, 1.0), parametrization="rf")
    with pytest.raises(ValueError, match="cfg_pp"):
        kdistpp.sample_euler_distpp(kdistpp.CFGDenoiser(ElementwiseDenoiser()), x, schedule(2, 1.0), cfg_pp=True,
                                    parametrization="flow")
    wrapped = kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0), schedule(4, 3.0).float(),
                                     w=0.2, parametrization="flow")
    assert isinstance(wrapped.guidance.run.param, kdistpp.RectifiedFlow)


@given(s=st.floats(0.0, 0.999999))
def test_sigma_maps_are_inverse_and_exact_at_the_ends(s):
    assert flow.flow_sigma(flow.ve_sigma(s)) == pytest.approx(s, rel=1e-12, abs=1e-15)
    assert flow.ve_sigma(1.0) == math.inf and flow.flow_sigma(math.inf) == 1.0
    t = torch.tensor([1.0, s, 0.0], dtype=torch.float64)
    torch.testing.assert_close(flow.flow_sigma(flow.ve_sigma(t)), t)
    assert math.isinf(float(flow.ve_sigma(t)[0]))


def test_state_maps_and_the_ve_denoiser():
    x = noise_list(2, 1)[0]
    torch.testing.assert_close(flow.to_flow(flow.to_ve(x, 0.75), 3.0), x)
    with pytest.raises(ValueError, match="s = 1"):
        flow.to_ve(x, 1.0)
    model = ElementwiseDenoiser()
    sigma = torch.full((2,), 3.0, dtype=torch.float64, device=DEVICE)
    torch.testing.assert_close(flow.VEDenoiser(model)(x, sigma), call(model, x / 4.0, 0.75))
    with pytest.raises(ValueError, match="infinity"):
        flow.VEDenoiser(model)(x, torch.full((2,), math.inf, device=DEVICE))


def test_flow_schedules():
    t = torch.linspace(1, 0, 5, dtype=torch.float64)[:-1]
    torch.testing.assert_close(kdistpp.get_sigmas_flow(4, shift=3.0).double(),
                               torch.cat([3 * t / (1 + 2 * t), torch.zeros(1, dtype=torch.float64)]))
    torch.testing.assert_close(kdistpp.get_sigmas_flow(4).double(), torch.linspace(1, 0, 5, dtype=torch.float64))
    assert flow.flux_mu(256) == pytest.approx(0.5) and flow.flux_mu(4096) == pytest.approx(1.15)
    mu = flow.flux_mu(4096)
    expected = [math.exp(mu) / (math.exp(mu) + (1 / v - 1)) for v in t.tolist()] + [0.0]
    torch.testing.assert_close(kdistpp.get_sigmas_flow(4, mu=mu).double(), torch.tensor(expected, dtype=torch.float64))
    assert flow.flux_time_shift(0.0, 0.3) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="shift"):
        flow.time_snr_shift(0.0, 0.5)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2s_ancestral"])
def test_eta_zero_flow_ancestral_steps_add_no_noise(name):
    """At eta = 0 the RF down step is s' itself and no noise enters: Euler a is flow Euler, and 2S a
    is deterministic (a noise sampler of sevens would show)."""
    s = schedule(4, 3.0)
    x = noise_list(3, 1)[0]
    model = ElementwiseDenoiser(bias=0.3)
    sevens = lambda sigma, sigma_next: torch.full(SHAPE, 7.0, dtype=torch.float64, device=DEVICE)  # noqa: E731
    out = kdistpp.SAMPLERS[name](model, x, s, eta=0.0, noise_sampler=sevens, disable=True, parametrization="flow")
    expected = REFERENCES[name](model, x, [float(v) for v in s], [torch.zeros_like(x)] * 4, 1e-300)
    assert kdistpp.RectifiedFlow().ancestral_step(0.8, 0.5, 0.0) == (0.5, 0.0, 1.0)
    if name == "euler_ancestral":
        torch.testing.assert_close(out, ref_euler(model, x, [float(v) for v in s]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


class DeclaredFlow(ElementwiseDenoiser):
    parametrization = "flow"


def test_a_denoiser_declaring_flow_runs_as_flow_and_a_contradiction_is_refused():
    s = schedule(4, 3.0)
    x, noises = noise_list(3, 1)[0], noise_list(4, 4)
    model = DeclaredFlow(bias=0.3)
    got = kdistpp.sample_euler_ancestral_distpp(model, x, s, noise_sampler=replay(noises), disable=True)
    torch.testing.assert_close(got, ref_euler_ancestral(model, x, s, noises, 1.0))
    # through the library's wrappers: CFGDenoiser forwards the inner model's declaration
    wrapped = kdistpp.CFGDenoiser(model)
    got = kdistpp.sample_euler_distpp(wrapped, x, s, disable=True)
    torch.testing.assert_close(got, ref_euler(model, x, s))
    with pytest.raises(ValueError, match="parametrization='ve'.*declares parametrization='flow'"):
        kdistpp.sample_euler_distpp(model, x, s, parametrization="ve")
    with pytest.raises(ValueError, match="teacher declares parametrization='flow'.*'ve'"):
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, kdistpp.get_sigmas_karras(3, 0.1, 10.0), teacher=model,
                                    w=0.1)
    with pytest.raises(ValueError, match="parametrization='flow'.*declares parametrization='ve'"):
        kdistpp.sample_euler_distpp(flow.VEDenoiser(model), x, s, parametrization="flow")


def test_teacher_guided_declares_the_parametrization_it_was_built_with():
    """A teacher_guided wrapper around an undeclared student, built for flow, runs as flow in a kdistpp
    sampler given no parametrization (the reference rectified-flow Euler), and refuses a VE run."""
    s = schedule(4, 3.0)
    x = noise_list(3, 1)[0]
    student = ElementwiseDenoiser()  # declares nothing
    wrapped = kdistpp.teacher_guided(student, ElementwiseDenoiser(bias=0.5), s, w=0.0, parametrization="flow")
    assert wrapped.parametrization == "flow"
    torch.testing.assert_close(kdistpp.sample_euler_distpp(wrapped, x, s, disable=True), ref_euler(student, x, s))
    with pytest.raises(ValueError, match="parametrization='ve'.*declares parametrization='flow'"):
        kdistpp.sample_euler_distpp(wrapped, x, s, parametrization="ve")


def test_the_library_flow_adapters_declare_flow():
    from kdistpp.integrations.diffusers import DiffusersFlowTransformerDenoiser, DiffusersUNetDenoiser

    assert DiffusersFlowTransformerDenoiser.parametrization == "flow"
    assert DiffusersUNetDenoiser.parametrization == "ve"
    assert flow.VEDenoiser(DeclaredFlow()).parametrization == "ve"


def test_a_default_ve_run_over_a_flow_looking_schedule_warns():
    s, x = schedule(4, 3.0), noise_list(3, 1)[0]
    with pytest.warns(kdistpp.ParametrizationWarning, match="parametrization='flow'"):
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, s, disable=True)
    with pytest.warns(kdistpp.ParametrizationWarning):
        kdistpp.teacher_guided(ElementwiseDenoiser(), ElementwiseDenoiser(), s.float(), w=0.1)
    with pytest.warns(kdistpp.ParametrizationWarning):  # a one-step flow schedule
        kdistpp.sample_consistency(ElementwiseDenoiser(), x, torch.tensor([1.0, 0.0]), disable=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, s, parametrization="ve", disable=True)  # asked for
        kdistpp.sample_euler_distpp(DeclaredFlow(), x, s, disable=True)  # declared
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, schedule(4, 3.0, start=0.9), disable=True)
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, torch.tensor([1.0, 0.5, 0.1]), disable=True)


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2s_ancestral"])
def test_a_repeated_leading_1_is_a_zero_length_step(name):
    """A bf16-rounded long Flux schedule starts 1.0, 1.0: the step between them keeps x and adds no
    noise (its draw is still taken, as ComfyUI takes it), so the run is the run without the repeat."""
    s = kdistpp.get_sigmas_flow(200, mu=1.15).bfloat16().double()[::20]
    s = torch.cat([s.new_ones(1), s, s.new_zeros(1)]) if float(s[-1]) != 0 else torch.cat([s.new_ones(1), s])
    assert float(s[0]) == float(s[1]) == 1.0
    x, noises = noise_list(5, 1)[0], noise_list(6, len(s) - 1)
    model = ElementwiseDenoiser(bias=0.3)
    got = kdistpp.SAMPLERS[name](model, x, s, noise_sampler=replay(noises), disable=True, parametrization="flow")
    expected = REFERENCES[name](model, x, s[1:], noises[1:], 1.0)
    torch.testing.assert_close(got, expected)
    with pytest.warns(kdistpp.GuidanceWarning, match="s = 1: .*pure noise"):  # step 0's next sigma is 1 too
        guided = kdistpp.SAMPLERS[name](model, x, s, noise_sampler=replay(noises), disable=True,
                                        parametrization="flow", teacher=ElementwiseDenoiser(bias=-0.5), w=0.2,
                                        guidance_steps=[0, 1])
    assert bool(torch.isfinite(guided).all())


def test_eta_above_1_on_flow_2s_ancestral():
    s, x = schedule(4, 3.0), noise_list(7, 1)[0]
    model = ElementwiseDenoiser(bias=0.3)
    with pytest.raises(ValueError, match=r"eta=4 puts step \d's down step .* below s = 0.*eta must stay below 3 "):
        kdistpp.sample_dpmpp_2s_ancestral_distpp(model, x, s, eta=4.0, parametrization="flow")
    assert model.calls == 0
    # a down step exactly at 0 is the step to the estimate (no midpoint needed): eta = 2 on [1, 0.5, 0.25, 0]
    model.calls = 0
    out = kdistpp.sample_dpmpp_2s_ancestral_distpp(model, x, torch.tensor([1.0, 0.5, 0.25, 0.0]), eta=2.0,
                                                   parametrization="flow", disable=True)
    assert bool(torch.isfinite(out).all()) and model.calls == 3  # one evaluation per step: no midpoints
    # where the down step stays above 0, eta > 1 runs as ComfyUI's formula gives
    s = schedule(8, 3.0, start=0.9)
    noises = noise_list(8, len(s) - 1)
    got = kdistpp.sample_dpmpp_2s_ancestral_distpp(model, x, s, eta=1.3, noise_sampler=replay(noises),
                                                   parametrization="flow", disable=True)
    torch.testing.assert_close(got, ref_dpmpp_2s_ancestral(model, x, s, noises, 1.3))


def test_the_eps_form_warns_where_its_w_values_do_not_hold():
    s, x = schedule(8, 3.0), noise_list(7, 1)[0]
    assert flow.ve_sigma(float(s[1])) > 20
    with pytest.warns(kdistpp.GuidanceWarning, match=r"form='eps' scales .* step 1 \(s=0.9"):
        kdistpp.sample_consistency_distpp(ElementwiseDenoiser(), x, s, teacher=ElementwiseDenoiser(), w=0.01,
                                          form="eps", guidance_steps=[1], parametrization="flow", disable=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        late = [i for i in range(1, 8) if flow.ve_sigma(float(s[i])) <= 20][0]
        kdistpp.sample_consistency_distpp(ElementwiseDenoiser(), x, s, teacher=ElementwiseDenoiser(), w=0.01,
                                          form="eps", guidance_steps=[late], parametrization="flow", disable=True)
        kdistpp.sample_consistency_distpp(ElementwiseDenoiser(), x, s, teacher=ElementwiseDenoiser(), w=0.01,
                                          guidance_steps=[1], parametrization="flow", disable=True)


def test_flow_schedule_ends_and_step_counts():
    """The shifts are exact at t = 0 and 1 (floats and tensors); get_sigmas_flow takes a positive integer n."""
    for mu in (0.5, 1.15):
        assert flow.flux_time_shift(mu, 0.0) == 0.0 and flow.flux_time_shift(mu, 1.0) == 1.0
        ends = flow.flux_time_shift(mu, torch.tensor([0.0, 1.0], dtype=torch.float64))
        assert ends.tolist() == [0.0, 1.0]
    assert kdistpp.get_sigmas_flow(1).tolist() == [1.0, 0.0]
    for n in (0, -2, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            kdistpp.get_sigmas_flow(n)


def test_an_attribute_named_parametrization_that_kdistpp_does_not_know_is_not_a_declaration():
    """Another library's attribute of that name ('eps', 'v', a list) is ignored: the run is VE as asked."""
    x, sigmas = noise_list(2, 1)[0], kdistpp.get_sigmas_karras(3, 0.1, 10.0)
    expected = kdistpp.sample_euler_distpp(ElementwiseDenoiser(), x, sigmas, disable=True)
    for value in ("eps", "v_prediction", ["flow"], 3):
        model = ElementwiseDenoiser()
        model.parametrization = value
        torch.testing.assert_close(kdistpp.sample_euler_distpp(model, x, sigmas, disable=True), expected)


def test_a_fixed_renoise_level_of_1_is_not_a_flow_sigma():
    with pytest.raises(ValueError, match="renoise=1.0 is not a flow sigma"):
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(), noise_list(2, 1)[0], schedule(4, 3.0), parametrization="flow",
                                    teacher=ElementwiseDenoiser(), w=0.1, renoise=1.0)


def test_the_eps_form_warning_starts_above_ve_sigma_20():
    import warnings

    x = noise_list(7, 1)[0]
    for ve, warns in ((20.5, True), (19.5, False)):
        s = torch.tensor([1.0, ve / (1 + ve), 0.5, 0.0], dtype=torch.float64)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            kdistpp.sample_consistency_distpp(ElementwiseDenoiser(), x, s, teacher=ElementwiseDenoiser(bias=1.0), w=0.01,
                                              form="eps", guidance_steps=[1], parametrization="flow", disable=True)
        assert any("form='eps' scales" in str(w.message) for w in seen) == warns, ve


@pytest.mark.parametrize("name", kdistpp.SAMPLERS)
@pytest.mark.parametrize("renoise", ["current", "random"])
def test_a_1_step_student_guided_at_its_only_step_renoises_at_the_fallback_level_not_pure_noise(name, renoise):
    """On [1, 0] 'current' and 'random' resolve to s = 1, where the flow state is pure noise: the run warns
    before any model call and the teacher is handed (1 - s_r) x0s + s_r n at s_r = 0.5 (n read from the
    renoise generator's stream), which holds the student's estimate with weight 0.5."""
    s = torch.tensor([1.0, 0.0], dtype=torch.float64)
    x = noise_list(3, 1)[0]
    student, teacher = ElementwiseDenoiser(bias=0.3), ElementwiseDenoiser(bias=-0.7, scale=1.4)
    with pytest.warns(kdistpp.GuidanceWarning, match=r"level here is s = 1: .*pure noise.*s = 0\.5 instead") as seen:
        kdistpp.SAMPLERS[name](student, x, s, disable=True, parametrization="flow", teacher=teacher, w=0.5,
                               renoise=renoise, renoise_generator=torch.Generator(device=DEVICE).manual_seed(4))
    assert seen[0].filename == __file__
    assert len(teacher.inputs) == 1
    point, level = teacher.inputs[0][0], float(teacher.inputs[0][1][0])
    assert level == 0.5
    g = torch.Generator(device=DEVICE).manual_seed(4)
    if renoise == "random":
        torch.rand((), generator=g, device=DEVICE)  # the level's draw comes first from the same stream
    n = torch.randn(SHAPE, generator=g, dtype=x.dtype, device=DEVICE)
    x0s = call(student, x, 1.0)
    torch.testing.assert_close(point, 0.5 * x0s + 0.5 * n, rtol=1e-12, atol=1e-12)


def test_a_flow_renoise_level_below_1_is_kept_and_does_not_warn():
    import warnings

    s = schedule(4, 3.0)
    x = noise_list(3, 1)[0]
    teacher = ElementwiseDenoiser(bias=-0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdistpp.sample_euler_distpp(ElementwiseDenoiser(bias=0.3), x, s, disable=True, parametrization="flow",
                                    teacher=teacher, w=0.5, guidance_steps=[1], renoise="current")
    assert float(teacher.inputs[0][1][0]) == pytest.approx(float(s[1]))
