"""The Distillation++ Guider inside real ComfyUI (the pinned 0.8.0 tree), with every sampler of
`comfy.samplers.SAMPLER_NAMES`, on a tiny random SD1.5 model (eps) and a tiny Flux model (CONST).

Sampling goes through ComfyUI's SamplerCustomAdvanced node with the GUIDER the node returns and the
SAMPLER of KSamplerSelect, as a user wires it. Model calls are read at the model: a
`model_function_wrapper` (ComfyUI's own hook, `set_model_unet_function_wrapper`) on a clone of each
patcher records the sigma each evaluation receives; step boundaries are read from the callback
SamplerCustomAdvanced hands the sampler (latent_preview's), which ComfyUI's samplers call once a step.

Run with `-s` to see the per-sampler table (the w = 0 parity and the teacher calls of each sampler).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import kdistpp
from comfy_models import FLOW_LATENT, WAN_LATENT, conditioning, flow_conditioning, lora_clone, tiny_flow, tiny_sd15
from comfy_server import SAMPLER_INPUTS_V1, SAMPLER_RANGES_V1, as_listed, ranges
from hosts import import_comfy

FAMILIES = {"sd1": ("karras", (1, 4, 8, 8), conditioning), "flux": ("simple", FLOW_LATENT, flow_conditioning)}
STEPS, GUIDED = 4, 2
# samplers that choose their own sigmas (ComfyUI hands them only the schedule's ends): only an evaluation at a
# schedule sigma is refined, and the run warns about the guided steps it never evaluated
OWN_SIGMAS = {"dpm_fast", "dpm_adaptive"}
TABLE: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module")
def comfy():
    return import_comfy(full=True)


@pytest.fixture(scope="module")
def models(comfy):
    """Per family: (student, teacher), each a distinct tiny model."""
    return {"sd1": (tiny_sd15(comfy, 5), tiny_sd15(comfy, 0)), "flux": (tiny_flow(comfy, "flux", 5),
                                                                         tiny_flow(comfy, "flux", 0))}


@pytest.fixture(scope="module", autouse=True)
def table():
    yield TABLE
    if TABLE:
        rows = ["| sampler | model | w = 0 vs CFGGuider | student evaluations (4 steps) | refined, per guided step k: "
                "which of the run's evaluations at sigma_k | teacher calls (at sigma) |", "|---|---|---|---|---|---|"]
        for (name, family), r in sorted(TABLE.items(), key=lambda kv: (list(SAMPLER_ORDER).index(kv[0][0]), kv[0][1])):
            rows.append(f"| {name} | {family} | {r.get('parity', '')} | {r.get('evaluations', '')} | "
                        f"{r.get('refined', '')} | {r.get('teacher', '')} |")
        print("\n" + "\n".join(rows))


SAMPLER_ORDER: dict[str, int] = {}


def sampler_names():
    """SAMPLER_NAMES of the pinned tree, read without importing ComfyUI at collection time."""
    import ast
    import pathlib

    from hosts import comfyui_root

    root = comfyui_root()
    if root is None:
        return ["euler"]  # the tests skip without ComfyUI
    source = (pathlib.Path(root) / "comfy" / "samplers.py").read_text()
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            target = node.targets[0].id
            if target == "KSAMPLER_NAMES":
                names[target] = ast.literal_eval(node.value)
            elif target == "SAMPLER_NAMES":
                names[target] = names["KSAMPLER_NAMES"] + ast.literal_eval(node.value.right)
    SAMPLER_ORDER.update({n: i for i, n in enumerate(names["SAMPLER_NAMES"])})
    return names["SAMPLER_NAMES"]


NAMES = sampler_names()


def guider_node():
    from kdistpp.integrations.comfyui_nodes import DistillationPPGuider

    return DistillationPPGuider


def guider(student, teacher, family, w, cfg=1.0, teacher_cfg=3.0, **kw):
    cond = FAMILIES[family][2]
    options = dict(w=w, guided_steps=GUIDED, form="interpolate", renoise="next")
    options.update(kw)
    return guider_node().execute(student, cond(1), cond(2), cfg, teacher, cond(3), cond(4), teacher_cfg,
                                 **options).result[0]


def cfg_guider(student, family, cfg=1.0):
    import comfy_extras.nodes_custom_sampler as ncs

    cond = FAMILIES[family][2]
    return ncs.CFGGuider.execute(student, cond(1), cond(2), cfg).result[0]


def schedule(student, family, steps=STEPS):
    """A fresh schedule per run: ComfyUI's uni_pc writes 0.001 over the last sigma of the tensor it gets."""
    import comfy_extras.nodes_custom_sampler as ncs

    return ncs.BasicScheduler.execute(student, FAMILIES[family][0], steps, 1.0).result[0]


def advanced(comfy, the_guider, name, sig, shape, seed=3, latent=None, add_noise=True):
    """SamplerCustomAdvanced with KSamplerSelect's SAMPLER, as the node graph runs it."""
    import comfy_extras.nodes_custom_sampler as ncs

    noise = (ncs.RandomNoise.execute(seed) if add_noise else ncs.DisableNoise.execute()).result[0]
    sampler = ncs.KSamplerSelect.execute(name).result[0]
    image = {"samples": torch.zeros(shape) if latent is None else latent}
    with torch.no_grad():
        return ncs.SamplerCustomAdvanced.execute(noise, the_guider, sampler, sig, image).result[0]["samples"]


class Events:
    """Model calls, read at the model (ComfyUI's model_function_wrapper on a clone of each patcher), and
    the steps the sampler reports (the callback SamplerCustomAdvanced hands it), in the order they happen."""

    def __init__(self, monkeypatch):
        import latent_preview

        self.log: list[tuple[str, float]] = []
        original = latent_preview.prepare_callback

        def prepare_callback(*args, **kwargs):
            preview = original(*args, **kwargs)

            def callback(step, x0, x, total_steps):
                self.log.append(("step", step))
                return preview(step, x0, x, total_steps)
            return callback

        monkeypatch.setattr(latent_preview, "prepare_callback", prepare_callback)

    def watch(self, patcher, who: str):
        clone = patcher.clone()

        def wrapper(apply_model, args):
            self.log.append((who, float(args["timestep"].reshape(-1)[0])))
            return apply_model(args["input"], args["timestep"], **args["c"])

        clone.set_model_unet_function_wrapper(wrapper)
        return clone

    def of(self, who: str) -> list[float]:
        return [v for w, v in self.log if w == who]


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * abs(b)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_at_w0_the_guider_is_comfyuis_cfgguider_pixel_for_pixel(comfy, models, name, family):
    """Every ComfyUI sampler: the guider at w = 0 gives CFGGuider's latent bit for bit (same seed, same
    sampler), and the teacher is never called."""
    student, teacher = models[family]
    shape = FAMILIES[family][1]
    theirs = advanced(comfy, cfg_guider(student, family), name, schedule(student, family), shape)
    counted = []
    watched = teacher.clone()
    watched.set_model_unet_function_wrapper(lambda f, a: counted.append(1) or f(a["input"], a["timestep"], **a["c"]))
    ours = advanced(comfy, guider(student, watched, family, 0.0), name, schedule(student, family), shape)
    assert torch.equal(ours, theirs)
    assert counted == []
    TABLE.setdefault((name, family), {})["parity"] = "bit for bit"


def test_the_parity_comparison_can_fail(comfy, models):
    """The same comparison sees a seed's change and a teacher's (w > 0)."""
    student, teacher = models["sd1"]
    shape = FAMILIES["sd1"][1]
    theirs = advanced(comfy, cfg_guider(student, "sd1"), "res_multistep", schedule(student, "sd1"), shape)
    other = advanced(comfy, cfg_guider(student, "sd1"), "res_multistep", schedule(student, "sd1"), shape, seed=4)
    guided = advanced(comfy, guider(student, teacher, "sd1", 0.01), "res_multistep", schedule(student, "sd1"), shape)
    assert not torch.equal(other, theirs) and not torch.equal(guided, theirs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", NAMES)
def test_the_teacher_is_called_once_per_guided_step_at_the_renoise_sigma(comfy, models, monkeypatch, name, family):
    """With the teacher on (w 0.5, two guided steps, renoise 'next'): the teacher is called once per guided
    step k, at sigma_{k+1} (read at the teacher's model call), right after the student's evaluation at
    sigma_k that the sampler then reports as step k (its callback with i = k); no other evaluation calls it."""
    student, teacher = models[family]
    events = Events(monkeypatch)
    sig = schedule(student, family)
    values = [float(s) for s in sig]
    the_guider = guider(events.watch(student, "student"), events.watch(teacher, "teacher"), family, 0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = advanced(comfy, the_guider, name, sig, FAMILIES[family][1])
    assert torch.isfinite(out).all()
    missed = [w for w in caught if issubclass(w.category, kdistpp.GuidanceWarning)]

    log, refined = events.log, []
    for k in range(GUIDED):  # the evaluation the sampler reports as step k: its callback with i = k follows it
        report = log.index(("step", k)) if ("step", k) in log else None
        if name in OWN_SIGMAS and (report is None or log[report - 1][0] != "teacher"):  # reports elsewhere
            if k == 0 and events.of("teacher"):
                refined.append("0: 1 of 1 (then its own sigmas)")
            continue
        assert log[report - 1] == ("teacher", pytest.approx(values[k + 1], rel=1e-5))
        assert log[report - 2][0] == "student" and close(log[report - 2][1], values[k]), log[:report + 1]
        at_sigma_k = [j for j, e in enumerate(log) if e[0] == "student" and close(e[1], values[k])]
        refined.append(f"{k}: {at_sigma_k.index(report - 2) + 1} of {len(at_sigma_k)}")
    teacher_calls = events.of("teacher")
    if name in OWN_SIGMAS:  # only step 0's sigma (the schedule's start) is one such a sampler evaluates
        assert teacher_calls == [pytest.approx(values[1], rel=1e-5)] and len(missed) == 1
        assert "never evaluated the student at guided step 1" in str(missed[0].message)
    else:
        assert teacher_calls == pytest.approx(values[1:GUIDED + 1], rel=1e-5) and missed == []
    teacher_at = ", ".join(f"{s:.4g}" for s in teacher_calls)
    TABLE.setdefault((name, family), {}).update(
        evaluations=str(len(events.of("student"))), refined="; ".join(refined),
        teacher=f"{len(teacher_calls)} ({teacher_at})")


@pytest.mark.parametrize("family", FAMILIES)
def test_with_euler_the_guider_is_the_sampler_nodes_refined_direction_and_w_acts_by_the_step_factor(
        comfy, models, family):
    """On Euler the guider's refined estimate is the SAMPLER node's direction='refined' (same seed, same
    renoise noise: the same image), and its shift of the state is the SAMPLER node's default
    (direction 'student') times 1 - sigma_{i+1} / sigma_i in VE sigma, i.e. (1 - s_{i+1} / s_i) / (1 - s_{i+1})
    in flow sigma s. Measured on one step between two inner sigmas of the schedule."""
    from kdistpp.integrations.comfyui_nodes import DistillationPPSampler

    student, teacher = models[family]
    shape, cond = FAMILIES[family][1], FAMILIES[family][2]
    sig = schedule(student, family)[1:3]  # one step from sigma_1 to sigma_2 (both inner)
    a, b = float(sig[0]), float(sig[1])
    factor = 1 - b / a if family == "sd1" else (1 - b / a) / (1 - b)

    def with_sampler(direction):
        sampler = DistillationPPSampler.execute(teacher, cond(3), cond(4), 3.0, "euler", 0.5, 1, "interpolate",
                                                "next", direction=direction).result[0]
        import comfy_extras.nodes_custom_sampler as ncs
        noise = ncs.RandomNoise.execute(3).result[0]
        with torch.no_grad():
            return ncs.SamplerCustomAdvanced.execute(noise, cfg_guider(student, family), sampler, sig.clone(),
                                                     {"samples": torch.zeros(shape)}).result[0]["samples"]

    plain = advanced(comfy, cfg_guider(student, family), "euler", sig.clone(), shape)
    ours = advanced(comfy, guider(student, teacher, family, 0.5, guided_steps=1), "euler", sig.clone(), shape)
    refined, authors = with_sampler("refined"), with_sampler("student")
    scale = float((authors - plain).abs().max())
    assert scale > 1e-3 and 0.05 < factor < 0.95
    torch.testing.assert_close(ours, refined, rtol=1e-4, atol=1e-5 * float(refined.abs().max()))
    torch.testing.assert_close(ours - plain, factor * (authors - plain), rtol=1e-3, atol=1e-4 * scale)


def test_wan22_two_experts_one_guider_per_half(comfy, monkeypatch):
    """Wan 2.2 A14B's split with two SamplerCustomAdvanced runs (SplitSigmas; the second with DisableNoise),
    one Distillation++ Guider per half, each with its own expert as student and teacher, res_multistep in
    the first half and er_sde in the second: at w = 0 the video is the two CFGGuiders' bit for bit; with
    the teachers on, each teacher is called once per guided step of its own half, at its half's sigmas."""
    import comfy_extras.nodes_custom_sampler as ncs

    high_teacher, low_teacher = tiny_flow(comfy, "wan21", 0), tiny_flow(comfy, "wan21", 2)
    high, low = lora_clone(comfy, high_teacher, 1), lora_clone(comfy, low_teacher, 3)
    sig = ncs.BasicScheduler.execute(high, "simple", 6, 1.0).result[0]
    cond = conditioning

    def run(w, events=None):
        watch = (lambda m, who: events.watch(m, who)) if events else (lambda m, who: m)
        halves = ncs.SplitSigmas.execute(sig.clone(), 3).result
        if w is None:
            guiders = [ncs.CFGGuider.execute(m, cond(1), cond(2), 1.0).result[0] for m in (high, low)]
        else:
            guiders = [guider_node().execute(watch(m, who), cond(1), cond(2), 1.0, watch(t, who + " teacher"), cond(3),
                                             cond(4), 3.5, w=w, guided_steps=2, form="interpolate",
                                             renoise="next").result[0]
                       for m, t, who in ((high, high_teacher, "high"), (low, low_teacher, "low"))]
        first = advanced(comfy, guiders[0], "res_multistep", halves[0], WAN_LATENT)
        return advanced(comfy, guiders[1], "er_sde", halves[1], WAN_LATENT, latent=first, add_noise=False)

    plain = run(None)
    assert torch.equal(run(0.0), plain)
    events = Events(monkeypatch)
    video = run(0.3, events)
    assert torch.isfinite(video).all() and (video - plain).abs().max() > 1e-4
    values = [float(s) for s in sig]
    assert events.of("high teacher") == pytest.approx(values[1:3], rel=1e-5)  # high half: steps 0, 1 of 0..2
    assert events.of("low teacher") == pytest.approx(values[4:6], rel=1e-5)  # low half: steps 3, 4 of 3..5
    assert events.of("high") == pytest.approx(values[:3], rel=1e-5)
    assert events.of("low") == pytest.approx(values[3:6], rel=1e-5)


def test_a_teacher_of_another_kind_and_guided_steps_past_the_schedule_are_refused_naming_the_guiders_input(
        comfy, models):
    student, _ = models["sd1"]
    _, flow_teacher = models["flux"]
    sd1 = FAMILIES["sd1"]
    counted = []
    watched = flow_teacher.clone()
    watched.set_model_unet_function_wrapper(lambda f, a: counted.append(1) or f(a["input"], a["timestep"], **a["c"]))
    wrong = guider_node().execute(student, conditioning(1), conditioning(2), 1.0, watched, flow_conditioning(3),
                                  flow_conditioning(4), 3.0, w=0.3, guided_steps=1, form="interpolate",
                                  renoise="next").result[0]
    with pytest.raises(ValueError, match=r"the `teacher` input of the Distillation\+\+ Guider node\) is a "
                                         r"rectified-flow model"):
        advanced(comfy, wrong, "euler", schedule(student, "sd1"), sd1[1])
    assert counted == []
    teacher = models["sd1"][1]
    with pytest.raises(ValueError, match=r"guided_steps=9 \(an input of the Distillation\+\+ Guider"):
        advanced(comfy, guider(student, teacher, "sd1", 0.3, guided_steps=9), "euler", schedule(student, "sd1"),
                 sd1[1])


def test_both_nodes_are_v3_nodes_with_the_first_releases_inputs_and_a_tooltip_on_each(comfy):
    """The V3 nodes (io.ComfyNode, from comfy_entrypoint's extension): the SAMPLER node keeps its id and its
    inputs' names, types, defaults and order; the guider's inputs are CFGGuider's followed by the teacher's
    and the settings; every input has a tooltip."""
    import asyncio

    from comfy_api.latest import io

    import kdistpp.integrations.comfyui as comfyui

    nodes = asyncio.run(asyncio.run(comfyui.comfy_entrypoint()).get_node_list())
    assert all(issubclass(n, io.ComfyNode) for n in nodes)
    schemas = {n.GET_SCHEMA().node_id: n for n in nodes}
    assert set(schemas) == {"KdistppDistillationPPSampler", "KdistppDistillationPPGuider"}
    sampler, the_guider = schemas["KdistppDistillationPPSampler"], schemas["KdistppDistillationPPGuider"]
    assert as_listed(sampler.INPUT_TYPES()) == SAMPLER_INPUTS_V1 and ranges(sampler.INPUT_TYPES()) == SAMPLER_RANGES_V1
    assert sampler.GET_SCHEMA().outputs[0].io_type == "SAMPLER"
    guider_inputs = as_listed(the_guider.INPUT_TYPES())
    assert [n for n, _, _ in guider_inputs["required"]] == [
        "model", "positive", "negative", "cfg", "teacher", "teacher_positive", "teacher_negative", "teacher_cfg", "w",
        "guided_steps", "form", "renoise"]
    assert [n for n, _, _ in guider_inputs["optional"]] == ["guide_sigma_min", "guide_sigma_max"]
    assert the_guider.GET_SCHEMA().outputs[0].io_type == "GUIDER"
    for node in nodes:
        assert all(spec[1].get("tooltip") for group in node.INPUT_TYPES().values() for spec in group.values())
        assert "w = 0" in node.GET_SCHEMA().description


@pytest.mark.parametrize("name", NAMES)
def test_a_teacher_identical_to_the_student_changes_nothing(comfy, models, name):
    """The student as its own teacher, with the student's conditioning and CFG, in form 'guidance' (the teacher
    at the student's own point) and w 0.5: every sampler gives CFGGuider's latent bit for bit, so the refined
    run differs from the plain one by the teacher alone: the dry run, the teacher's run through ComfyUI and
    the refinement leave the sampler's noise and state as they were."""
    student, _ = models["sd1"]
    shape = FAMILIES["sd1"][1]
    theirs = advanced(comfy, cfg_guider(student, "sd1", cfg=2.0), name, schedule(student, "sd1"), shape)
    the_guider = guider_node().execute(student, conditioning(1), conditioning(2), 2.0, student, conditioning(1),
                                       conditioning(2), 2.0, w=0.5, guided_steps=GUIDED, form="guidance",
                                       renoise="next").result[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", kdistpp.GuidanceWarning)  # dpm_fast / dpm_adaptive: step 1 not refined
        ours = advanced(comfy, the_guider, name, schedule(student, "sd1"), shape)
    assert torch.equal(ours, theirs)
    assert the_guider.evaluations.refined  # the teacher was called


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "er_sde"])
def test_renoise_noise_follows_the_seed_and_leaves_the_global_rng_alone(comfy, models, name):
    """Form interpolate draws its renoise noise from a generator seeded from ComfyUI's seed: the same seed gives
    the same latent, another seed another, and the global RNG is where an unguided run leaves it."""
    student, teacher = models["sd1"]
    shape = FAMILIES["sd1"][1]

    def run(w, seed):
        torch.manual_seed(123)
        out = advanced(comfy, guider(student, teacher, "sd1", w), name, schedule(student, "sd1"), shape, seed=seed)
        return out, torch.get_rng_state()

    first, state = run(0.5, 3)
    again, _ = run(0.5, 3)
    other, _ = run(0.5, 4)
    _, plain_state = run(0.0, 3)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert torch.equal(state, plain_state)


@pytest.mark.parametrize("name", ["res_multistep", "heun", "uni_pc"])
def test_a_lora_student_keeps_its_patches_around_every_teacher_call(comfy, name):
    """A LoRA student (`load_lora_for_models`, LoraLoader's path) of its own teacher: one UNet, patched for
    the student at each of its evaluations and unpatched for each teacher call (read at the shared UNet:
    the weights it runs with, and the batch: the teacher's CFG 3 is one batch of two)."""
    teacher = tiny_sd15(comfy, 0)
    student = lora_clone(comfy, teacher, 1)
    unet = teacher.model.diffusion_model
    base = float(unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight.double().sum())  # before any load
    seen = []

    def hook(module, args):
        weight = module.input_blocks[1][1].transformer_blocks[0].attn1.to_q.weight
        seen.append((args[0].shape[0], float(weight.double().sum())))

    handle = unet.register_forward_pre_hook(hook)
    try:
        plain = advanced(comfy, cfg_guider(student, "sd1"), name, schedule(student, "sd1"), FAMILIES["sd1"][1])
        plain_calls = list(seen)
        seen.clear()
        guided = advanced(comfy, guider(student, teacher, "sd1", 0.5), name, schedule(student, "sd1"),
                          FAMILIES["sd1"][1])
    finally:
        handle.remove()
    lora = plain_calls[0][1]
    assert lora != pytest.approx(base) and all(c == (1, pytest.approx(lora)) for c in plain_calls)
    teacher_calls = [c for c in seen if c[0] == 2]
    assert len(teacher_calls) == GUIDED and all(c[1] == pytest.approx(base) for c in teacher_calls)
    assert [c for c in seen if c[0] == 1] == [(1, pytest.approx(lora))] * len(plain_calls)  # student: patched
    assert not torch.equal(guided, plain)


@pytest.mark.parametrize("name", ["euler", "euler_cfg_pp", "heun"])
def test_a_student_patched_by_perturbed_attention_guidance(comfy, models, monkeypatch, name):
    """A student with ComfyUI's PerturbedAttentionGuidance (a post-CFG hook that evaluates the model again):
    at w = 0 the guider is CFGGuider on that student, bit for bit; guided, the dry run leaves the hook to the
    real run (it has no model to evaluate), which calls the teacher once per guided step (euler_cfg_pp adds
    a post-CFG hook of its own, which the dry run does run)."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    student, teacher = models["sd1"]
    pag = PerturbedAttentionGuidance.execute(student, 1.5).result[0]
    shape = FAMILIES["sd1"][1]
    theirs = advanced(comfy, cfg_guider(pag, "sd1", cfg=2.0), name, schedule(pag, "sd1"), shape)
    plain = advanced(comfy, cfg_guider(student, "sd1", cfg=2.0), name, schedule(student, "sd1"), shape)
    assert not torch.equal(theirs, plain)  # the hook acts
    assert torch.equal(advanced(comfy, guider(pag, teacher, "sd1", 0.0, cfg=2.0), name, schedule(pag, "sd1"), shape),
                       theirs)
    events = Events(monkeypatch)
    guided = advanced(comfy, guider(pag, events.watch(teacher, "teacher"), "sd1", 0.5, cfg=2.0), name,
                      schedule(pag, "sd1"), shape)
    assert len(events.of("teacher")) == GUIDED and not torch.equal(guided, theirs)
