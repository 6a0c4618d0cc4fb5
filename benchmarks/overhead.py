"""Overhead of kdistpp, measured side by side in one run.

Run through `benchmarks/run.py --only overhead`.

1. kdistpp at w = 0 against k-diffusion's own sampler, cheap denoiser (the sampler's own cost).
2. A guided step against a plain step (one step, same student and teacher).
3. kdistpp.CFGDenoiser (cond + uncond in one call) against two separate calls.
4. Peak memory of a guided step against a plain step.
Each ratio is the median over `repeats` interleaved pairs, with the 10th-90th percentile spread.
Requires the test extra (k-diffusion).
"""

from __future__ import annotations

import platform
import statistics
import time

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kdistpp


class Cheap:
    """A cheap elementwise denoiser: the sampler's bookkeeping dominates the time."""

    def __call__(self, x, sigma, cond=None, **_):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return x / (1 + s**2)


class Conv:
    """A small conv net, so that CFG batching has real work to batch."""

    def __init__(self, device):
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(4, 64, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(64, 4, 3, padding=1)).to(device)

    def __call__(self, x, sigma, cond=None, **_):
        return self.net(x) + (0 if cond is None else cond.reshape(-1, 1, 1, 1))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def ratio_stats(pairs):
    ratios = sorted(a / b for a, b in pairs)
    q = lambda p: ratios[min(len(ratios) - 1, int(p * len(ratios)))]
    return statistics.median(ratios), q(0.1), q(0.9), statistics.median(b for _, b in pairs)


def side_by_side(ours, theirs, device, repeats):
    ours(), theirs()  # warm-up
    return ratio_stats([(timed(ours, device), timed(theirs, device)) for _ in range(repeats)])


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created inside the block, on any device: each op's outputs
    are counted when made and released when their storage is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def _release(self, nbytes, key):
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.seen:
                    self.seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._release, nbytes, key)
        return out


def peak_bytes(fn, device):
    """(peak bytes of tensors made by fn, CUDA allocator peak above the starting point or None)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.no_grad(), PeakTensorBytes() as mode:
        fn()
    allocator = torch.cuda.max_memory_allocated(device) - base if cuda else None
    return mode.peak, allocator


def measure(device: torch.device, repeats: int, steps: int):
    """The overhead rows: (comparison, median ratio, p10, p90, second's median seconds)."""
    from k_diffusion import sampling as K

    x = torch.randn(4, 4, 64, 64, device=device) * 14.6
    sigmas = kdistpp.get_sigmas_karras(steps, 0.03, 14.6)
    model = Cheap()
    rows = []
    pairs = {"euler": K.sample_euler, "euler_ancestral": K.sample_euler_ancestral,
             "dpmpp_2s_ancestral": K.sample_dpmpp_2s_ancestral, "dpmpp_2m": K.sample_dpmpp_2m}
    for name, base in pairs.items():
        ours = lambda: kdistpp.SAMPLERS[name](model, x, sigmas, disable=True, teacher=model, w=0.0)
        theirs = lambda: base(model, x, sigmas.to(device), disable=True)
        rows.append((f"{name}, w=0 vs k-diffusion ({steps} steps, cheap denoiser)", *side_by_side(ours, theirs, device, repeats)))
    net = Conv(device)
    one = sigmas[[0, 1]]
    guided = lambda: kdistpp.sample_euler_distpp(net, x, one, teacher=net, w=0.1, disable=True)
    plain = lambda: kdistpp.sample_euler_distpp(net, x, one, teacher=net, w=0.0, disable=True)
    rows.append(("guided step vs plain step (Euler, conv denoiser)", *side_by_side(guided, plain, device, repeats)))
    c, u = torch.ones(4, device=device), torch.zeros(4, device=device)
    batched = kdistpp.CFGDenoiser(net, cond=c, uncond=u, cond_scale=5.0)
    s = torch.full((4,), 3.0, device=device)
    two_calls = lambda: (lambda U, C: U + (C - U) * 5.0)(net(x, s, cond=u), net(x, s, cond=c))
    with torch.no_grad():
        rows.append(("CFGDenoiser batched vs two calls (conv denoiser)", *side_by_side(lambda: batched(x, s), two_calls, device, repeats)))
    latent = x.numel() * x.element_size()
    memory = [(name, *peak_bytes(fn, device)) for name, fn in (("plain step", plain), ("guided step", guided))]
    return rows, memory, latent


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads > 1 else ''}"


def section(device: torch.device, repeats: int, steps: int) -> str:
    rows, memory, latent = measure(device, repeats, steps)
    lines = [
        f"Device: {describe(device)}; torch {torch.__version__}; latent 4x4x64x64 float32.", "",
        "Ratio = time(first) / time(second), median over interleaved repeats, with the 10th-90th percentile.", "",
        "| comparison | ratio (median) | p10 | p90 | second's median time (s) |", "|---|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.4f} |" for r in rows]
    lines += ["", "Peak memory of one Euler step (conv denoiser as student and teacher), in latent-sized buffers "
              f"({latent / 2**20:.2f} MiB each): the peak of live tensors the step creates"
              + (", and the CUDA allocator's peak above the starting point." if device.type == "cuda" else "."), "",
              "| step | tensors made (latents) | CUDA allocator peak (latents) |", "|---|---|---|"]
    lines += [f"| {name} | {t / latent:.2f} | {'n/a (CPU)' if a is None else f'{a / latent:.2f}'} |" for name, t, a in memory]
    return "\n".join(lines)

