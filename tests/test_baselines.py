"""At w = 0 every *_distpp sampler is its baseline: k-diffusion's sampler, or sample_consistency."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from k_diffusion import sampling as K
from torch.utils._python_dispatch import TorchDispatchMode

import kdistpp
from conftest import DEVICE, ElementwiseDenoiser

PAIRS = {
    "euler": (K.sample_euler, kdistpp.sample_euler_distpp),
    "euler_ancestral": (K.sample_euler_ancestral, kdistpp.sample_euler_ancestral_distpp),
    "dpmpp_2s_ancestral": (K.sample_dpmpp_2s_ancestral, kdistpp.sample_dpmpp_2s_ancestral_distpp),
    "dpmpp_2m": (K.sample_dpmpp_2m, kdistpp.sample_dpmpp_2m_distpp),
}
ANCESTRAL = {"euler_ancestral", "dpmpp_2s_ancestral"}


@st.composite
def problems(draw):
    """A random latent shape, batch, schedule (Karras or exponential, optionally not ending at 0)."""
    batch = draw(st.integers(1, 3))
    event = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    n = draw(st.integers(1, 8))
    sigma_min = draw(st.floats(0.01, 0.5))
    sigma_max = draw(st.floats(1.01, 80.0))  # not 1.0: a schedule from 1.0 to 0 looks like a flow one (warns)
    maker = draw(st.sampled_from([K.get_sigmas_karras, K.get_sigmas_exponential]))
    sigmas = maker(n, sigma_min, sigma_max)
    if draw(st.booleans()) and n > 1:
        sigmas = sigmas[:-1]  # a schedule that stops at sigma_min
    seed = draw(st.integers(0, 2**16))
    return (batch, *event), sigmas, seed


def _run(fn, model, x, sigmas, seed, **kw):
    torch.manual_seed(seed)
    if DEVICE.type == "cuda":
        torch.cuda.manual_seed(seed)
    return fn(model, x, sigmas, disable=True, **kw)


@pytest.mark.parametrize("name", PAIRS)
@given(problem=problems(), eta=st.floats(0.0, 1.5), s_noise=st.floats(0.5, 1.5), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_w0_equals_k_diffusion(name, problem, eta, s_noise, dtype):
    shape, sigmas, seed = problem
    base, ours = PAIRS[name]
    model = ElementwiseDenoiser()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(DEVICE) * float(sigmas[0])
    kw = {"eta": eta, "s_noise": s_noise} if name in ANCESTRAL else {}
    expected = _run(base, model, x, sigmas.to(DEVICE, dtype), seed, **kw)
    got = _run(ours, model, x, sigmas, seed, teacher=ElementwiseDenoiser(bias=1.0), w=0.0, **kw)
    assert got.dtype == x.dtype and got.shape == x.shape
    # kdistpp does its scalar step math in float64: equal to k-diffusion up to float32 rounding.
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5 * float(sigmas[0]))


@given(problem=problems(), churn=st.floats(0.1, 20.0), s_noise=st.floats(0.5, 1.5))
def test_euler_churn_equals_k_diffusion(problem, churn, s_noise):
    # Churn on every step: k-diffusion 0.1.1 draws its churn noise every step (also when unused),
    # kdistpp only when it adds it (as k-diffusion master and ComfyUI), so compare where both draw.
    shape, sigmas, seed = problem
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * float(sigmas[0])
    kw = {"s_churn": churn, "s_noise": s_noise}
    expected = _run(K.sample_euler, ElementwiseDenoiser(), x, sigmas.to(DEVICE), seed, **kw)
    got = _run(kdistpp.sample_euler_distpp, ElementwiseDenoiser(), x, sigmas, seed, teacher=ElementwiseDenoiser(1.0),
               w=0.0, **kw)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5 * float(sigmas[0]))


def _fixed_noise(shape, steps, seed, half, dtype):
    g = torch.Generator().manual_seed(seed)  # drawn in the half dtype, so all three runs see the same values
    table = [torch.randn(shape, generator=g).to(half).to(DEVICE, dtype) for _ in range(steps)]
    counter = iter(range(10**9))
    return lambda sigma, sigma_next: table[next(counter) % steps]


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_k_diffusion_to_half_precision(name, dtype):
    """fp16/bf16 latents: the model runs in that dtype, kdistpp's step math in float32 and
    k-diffusion's in the latent dtype, so the two agree only to the half dtype's resolution; both
    stay within it of a float64 run with the same noise, and kdistpp returns the latent's dtype."""
    sigmas = K.get_sigmas_karras(6, 0.03, 14.6)
    shape, seed = (2, 4, 8, 8), 3
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 14.6).to(DEVICE, dtype)
    base, ours = PAIRS[name]
    kw = lambda dt: {"noise_sampler": _fixed_noise(shape, 6, seed, dtype, dt)} if name in ANCESTRAL else {}
    truth = base(ElementwiseDenoiser(), x.double(), sigmas.double().to(DEVICE), disable=True, **kw(torch.float64))
    theirs = base(ElementwiseDenoiser(), x, sigmas.to(DEVICE), disable=True, **kw(dtype))
    mine = ours(ElementwiseDenoiser(), x, sigmas, disable=True, teacher=ElementwiseDenoiser(1.0), w=0.0, **kw(dtype))
    assert mine.dtype == dtype
    tol = 4 * torch.finfo(dtype).eps * 14.6
    torch.testing.assert_close(mine.double(), truth, atol=tol, rtol=0)
    torch.testing.assert_close(theirs.double(), truth, atol=tol, rtol=0)


def reference_consistency(model, x, sigmas, noises):
    """Multistep consistency sampling written out directly from Song et al. (2023), Algorithm 1."""
    for i in range(len(sigmas) - 1):
        x0 = model(x, sigmas[i] * torch.ones(x.shape[0], device=x.device))
        x = x0 + sigmas[i + 1] * noises[i] if sigmas[i + 1] > 0 else x0
    return x


@given(problem=problems())
def test_sample_consistency_matches_the_algorithm(problem):
    shape, sigmas, seed = problem
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(DEVICE) * float(sigmas[0])
    noises = [torch.randn(shape, generator=g).to(DEVICE) for _ in range(len(sigmas) - 1)]
    step = iter(range(len(noises)))
    got = kdistpp.sample_consistency(ElementwiseDenoiser(), x, sigmas, disable=True,
                                     noise_sampler=lambda s, sn: noises[next(step)])
    expected = reference_consistency(ElementwiseDenoiser(), x, sigmas.to(DEVICE), noises)
    torch.testing.assert_close(got, expected)
    if float(sigmas[-1]) == 0:  # ends at 0: the output is the last estimate itself
        seen = []
        step = iter(range(len(noises)))
        again = kdistpp.sample_consistency(ElementwiseDenoiser(), x, sigmas, disable=True, callback=seen.append,
                                           noise_sampler=lambda s, sn: noises[next(step)])
        assert torch.equal(again, seen[-1]["denoised"])


@given(problem=problems())
def test_consistency_distpp_w0_is_sample_consistency(problem):
    shape, sigmas, seed = problem
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE) * float(sigmas[0])
    expected = _run(kdistpp.sample_consistency, ElementwiseDenoiser(), x, sigmas, seed)
    got = _run(kdistpp.sample_consistency_distpp, ElementwiseDenoiser(), x, sigmas, seed, teacher=ElementwiseDenoiser(1.0), w=0.0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("renoise", ["next", "random"])
def test_guiding_leaves_the_samplers_own_noise_stream_unchanged(renoise):
    """Same torch.manual_seed, tiny w: Euler a's ancestral noise is k-diffusion's own draws, so the
    output is k-diffusion's plain run up to the tiny shift, and the global RNG ends where it does."""
    sigmas = K.get_sigmas_karras(6, 0.1, 10.0).to(DEVICE)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 10
    model, teacher = ElementwiseDenoiser(), ElementwiseDenoiser(bias=1.0)
    expected = _run(K.sample_euler_ancestral, model, x, sigmas, 7)
    state = (torch.get_rng_state(), torch.cuda.get_rng_state() if DEVICE.type == "cuda" else None)
    kw = dict(teacher=teacher, w=1e-4, guidance_steps=4, renoise=renoise)
    got = _run(kdistpp.sample_euler_ancestral_distpp, model, x, sigmas, 7, **kw)
    assert torch.equal(torch.get_rng_state(), state[0])
    if DEVICE.type == "cuda":
        assert torch.equal(torch.cuda.get_rng_state(), state[1])
    assert 0 < float((got - expected).abs().max()) < 1e-3  # moved by the teacher alone
    # the same seed gives the same renoise noise: the run repeats exactly
    assert torch.equal(_run(kdistpp.sample_euler_ancestral_distpp, model, x, sigmas, 7, **kw), got)


class TeacherInputs:
    """A teacher that records the states it is called on (the renoised x_r = x0s + sigma_r n)."""

    def __init__(self):
        self.inputs = []

    def __call__(self, x, sigma, **extra_args):
        self.inputs.append(x.clone())
        return torch.zeros_like(x)


def test_the_default_renoise_noise_follows_x_when_the_global_rng_stands_still():
    """Euler draws nothing from the global RNG, so its state is the same at the start of each run of a seed
    loop whose x comes from a torch.Generator: the renoise noise n = (x_r - x0s) / sigma_r, read at the
    teacher, differs between two seeds' x, repeats for the same x, and stays unit Gaussian."""
    sigmas = K.get_sigmas_karras(4, 0.1, 10.0).to(DEVICE)
    model = ElementwiseDenoiser()
    torch.manual_seed(0)

    def renoise_noise(seed):
        x = (torch.randn(8, 512, generator=torch.Generator().manual_seed(seed)) * 10).to(DEVICE)
        teacher = TeacherInputs()
        kdistpp.sample_euler_distpp(model, x, sigmas, teacher=teacher, w=0.5, disable=True)
        x0s = model(x, sigmas[0] * torch.ones(8, device=DEVICE))  # the student's estimate at the guided step
        return (teacher.inputs[0] - x0s) / sigmas[1]

    n1, n2 = renoise_noise(1), renoise_noise(2)
    assert torch.equal(renoise_noise(1), n1)
    assert float((n1 - n2).abs().mean()) > 0.5
    for n in (n1, n2):
        assert abs(float(n.mean())) < 0.05 and abs(float(n.std()) - 1) < 0.05
    assert abs(float((n1 * n2).mean())) < 0.05  # the two seeds' noises are uncorrelated


class TeacherSigmas:
    """A teacher that records the sigma it is called at (renoise='random''s level)."""

    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma, **extra_args):
        self.sigmas.append(float(sigma.reshape(-1)[0]))
        return torch.zeros_like(x)


def test_the_default_random_renoise_level_follows_x_when_the_global_rng_stands_still():
    """As the renoise noise above: over a seed loop whose x comes from a torch.Generator (Euler draws
    nothing from the global RNG), renoise='random''s level changes with the seed, repeats for the same
    seed, and stays log-uniform over the positive schedule (its quartiles, over 400 seeds). The global
    RNG's seed still moves it, and keying it reads nothing more from the device."""
    sigmas = K.get_sigmas_karras(4, 0.1, 10.0).to(DEVICE)
    model = ElementwiseDenoiser()

    def level(seed, global_seed=0):
        torch.manual_seed(global_seed)
        x = (torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)) * 10).to(DEVICE)
        teacher = TeacherSigmas()
        kdistpp.sample_euler_distpp(model, x, sigmas, teacher=teacher, w=0.5, renoise="random", disable=True)
        assert len(teacher.sigmas) == 1
        return teacher.sigmas[0]

    levels = [level(seed) for seed in range(400)]
    assert level(1) == levels[1] and level(1, global_seed=1) != levels[1]
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 10
    reads = {renoise: _host_reads(kdistpp.sample_euler_distpp, model, x, sigmas, disable=True, teacher=TeacherSigmas(),
                                  w=0.1, guidance_steps=[0, 2], renoise=renoise) for renoise in ("current", "random")}
    assert reads["random"] == reads["current"] + 2  # the level itself: one read per guided step, as unkeyed
    assert len(set(levels)) == len(levels)
    logs = torch.tensor([math.log(s) for s in levels], dtype=torch.float64)
    lo, hi = math.log(0.1), math.log(10.0)
    assert lo - 1e-6 <= float(logs.min()) and float(logs.max()) <= hi + 1e-6
    quartiles = torch.quantile(logs, torch.tensor([0.25, 0.5, 0.75], dtype=logs.dtype))
    expected = torch.tensor([lo + q * (hi - lo) for q in (0.25, 0.5, 0.75)], dtype=logs.dtype)
    assert torch.allclose(quartiles, expected, atol=0.35)  # 3 standard errors of the median at 400 draws


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value to the host (aten._local_scalar_dense: .item(), float(t),
    bool(t)), each a device sync on a GPU; on the CPU they go through the dispatcher the same way."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _host_reads(fn, *args, **kw):
    with HostReads() as reads:
        fn(*args, **kw)
    return reads.count


@pytest.mark.parametrize("name", [*PAIRS, "consistency"])
def test_one_host_read_per_run_and_at_most_one_more_per_guided_step(name):
    """The output checks are kept (test_model_outputs) but read the device once per run at w = 0 and
    once more per guided step, where k-diffusion's own loops read a sigma on every step."""
    sigmas = K.get_sigmas_karras(8, 0.1, 10.0).to(DEVICE)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)).to(DEVICE) * 10
    ours = kdistpp.SAMPLERS[name]
    assert _host_reads(ours, ElementwiseDenoiser(), x, sigmas, disable=True) <= 1
    for steps in ([0], [0, 3, 5]):
        reads = _host_reads(ours, ElementwiseDenoiser(), x, sigmas, disable=True, teacher=ElementwiseDenoiser(bias=1.0),
                            w=0.1, guidance_steps=steps)
        assert reads <= 1 + len(steps)
    if name in PAIRS:  # the reference point: k-diffusion's sampler on the same problem reads more
        assert _host_reads(PAIRS[name][0], ElementwiseDenoiser(), x, sigmas, disable=True) > 1
