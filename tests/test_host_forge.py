"""The extension inside the real Forge webui (dfdcbab): requests through its API route.

tests/forge_host.py starts the pinned Forge with this repository cloned into extensions/, on two
small random SD1.5 checkpoints (student and teacher) loaded by Forge's own backend.
"""

from __future__ import annotations

import pytest

import forge_host
from kdistpp.registry import REGISTRY
from webui_api import generate, init_image, mask_image, same_image


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    shared, app = forge_host.start(tmp_path_factory.mktemp("forge"), {"student": 11, "teacher": 22})
    from fastapi.testclient import TestClient

    from modules import sd_models

    return type("Forge", (), {"shared": shared, "client": TestClient(app), "sd_models": sd_models})


class Recorder:
    """The order of Forge's model preparations and of the teacher's UNet calls."""

    def __init__(self, monkeypatch):
        import backend.sampling.sampling_function as sampling
        from kdistpp.integrations import webui_teachers

        self.events = []
        self.teacher = webui_teachers._forge_teacher["engine"]
        self.hook = self.teacher.forge_objects.unet.model.diffusion_model.register_forward_pre_hook(
            lambda *_: self.events.append("teacher unet"))
        real = sampling.sampling_prepare

        def prepare(unet, x):
            self.events.append("prepare teacher" if unet is self.teacher.forge_objects.unet else "prepare student")
            return real(unet, x)

        monkeypatch.setattr(sampling, "sampling_prepare", prepare)


@pytest.fixture
def recorder(monkeypatch):
    """Makes a Recorder; its hook is removed after the test."""
    made = []

    def make():
        made.append(Recorder(monkeypatch))
        return made[-1]

    yield make
    for r in made:
        r.hook.remove()


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_w0_and_no_teacher_give_forges_own_sampler_image(forge, entry):
    base = generate(forge, entry.webui_base)[0]
    assert same_image(generate(forge, entry.label)[0], base)
    assert same_image(generate(forge, entry.label, teacher="teacher", w=0.0)[0], base)
    assert not same_image(generate(forge, entry.webui_base, seed=6)[0], base)


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_the_teacher_runs_once_per_guided_step_through_forges_memory_manager(forge, entry, recorder):
    plain = generate(forge, entry.label)[0]
    generate(forge, entry.label, teacher="teacher", w=0.5)  # loads the teacher
    calls = recorder()
    guided = generate(forge, entry.label, teacher="teacher", w=0.5, guided_steps=2)[0]
    assert calls.events == ["prepare teacher", "teacher unet", "prepare student"] * 2
    assert not same_image(guided, plain)
    assert forge.sd_models.model_data.sd_model.sd_checkpoint_info.model_name == "student"


def test_the_teacher_is_loaded_once_and_the_same_seed_repeats(forge, monkeypatch):
    import backend.loader

    first = generate(forge, "Euler a Distillation++", teacher="teacher", w=0.5)[0]
    loads = []
    monkeypatch.setattr(backend.loader, "forge_loader", lambda *a, **k: loads.append(a))
    assert same_image(generate(forge, "Euler a Distillation++", teacher="teacher", w=0.5)[0], first)
    assert loads == []


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.name in ("euler_ancestral", "consistency")],
                         ids=lambda e: e.name)
def test_a_batch_gives_the_images_of_its_seeds_alone(forge, entry):
    for kwargs in ({}, {"teacher": "teacher", "w": 0.5}):
        batch = generate(forge, entry.label, seed=40, batch_size=2, **kwargs)
        assert same_image(batch[1], generate(forge, entry.label, seed=41, **kwargs)[0])
        assert not same_image(batch[0], batch[1])


@pytest.mark.parametrize("inpaint", [False, True], ids=["img2img", "inpaint"])
def test_img2img_and_inpaint(forge, inpaint, recorder):
    request = {"init_images": [init_image()], "denoising_strength": 0.6, **({"mask": mask_image()} if inpaint else {})}
    generate(forge, "Euler a", route="img2img", **request)
    base = generate(forge, "Euler a", route="img2img", **request)[0]
    assert same_image(generate(forge, "Euler a Distillation++", route="img2img", **request)[0], base)
    generate(forge, "Euler a Distillation++", route="img2img", teacher="teacher", w=0.5, **request)
    calls = recorder()
    guided = generate(forge, "Euler a Distillation++", route="img2img", teacher="teacher", w=0.5, **request)[0]
    assert calls.events.count("teacher unet") == 1 and not same_image(guided, base)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_a_flow_model_with_a_ve_model_is_refused_before_any_model_call(forge, role, monkeypatch):
    """Forge's own flow predictor (Flux: PredictionFlux, 'const') on one side, an SD1.5 model on the other,
    wrapped as Forge wraps them: the pair is refused, naming both kinds, before any model call."""
    import torch
    from backend.modules.k_prediction import PredictionFlux
    from k_diffusion.external import ForgeScheduleLinker

    from kdistpp.integrations import webui, webui_teachers

    calls = []
    engine = webui_teachers.load_forge_teacher(forge, "teacher")
    sd15 = engine.forge_objects.unet.model.predictor
    if role == "teacher":
        monkeypatch.setattr(engine.forge_objects.unet.model, "predictor", PredictionFlux())

    class StudentCFG:
        inner_model = ForgeScheduleLinker(PredictionFlux() if role == "student" else sd15)
        step = 0

        def __call__(self, x, sigma, **extra):
            calls.append(sigma)
            return x

    StudentCFG.inner_model.inner_model = type("Engine", (), {"forge_objects": engine.forge_objects})()
    monkeypatch.setattr(webui.settings, "teacher", "teacher")
    monkeypatch.setattr(webui.settings, "w", 0.5)
    sample = webui.make_sampler_function(REGISTRY[0], webui_factory=lambda: forge)
    kinds = ["a rectified-flow model", "a VE/eps/v model"]
    teacher_kind, student_kind = kinds if role == "teacher" else kinds[::-1]
    with pytest.raises(ValueError, match=f"teacher 'teacher' is {teacher_kind}.* but the student is {student_kind}"):
        sample(StudentCFG(), torch.zeros(1, 4, 8, 8), torch.tensor([1.0, 0.5, 0.0]), disable=True)
    assert calls == []
    assert "engine" not in webui_teachers._forge_teacher  # a refused teacher is not kept
