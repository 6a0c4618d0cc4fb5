"""The example workflows through ComfyUI's real server (the pinned 0.8.0 tree, `main.py --cpu`).

`comfy_server.start` runs the server with this repository in custom_nodes/ and tiny random-weight
files under the file names the example workflows' loaders use; each UI-format workflow in
example_workflows/ is converted to an API prompt with the server's own /object_info
(`comfy_server.workflow_to_prompt`), queued on /prompt, and its saved PNG read back from the output
folder once /history says it finished.

What the SDXL-Lightning and DMD2 workflows run as committed, with one widget changed: the empty
latent is 64 x 64 pixels instead of 1024 (a CPU decodes that size in a second). The tiny
checkpoint under the SDXL base's file name is one ComfyUI detects as an SD1.x model (SDXL's own
shape cannot be tiny); the node graph, the loaders and the LoRA path are the workflow's.

Needs KDISTPP_COMFYUI and ComfyUI's requirements with its page (comfyui_frontend_package):
`.ci/run` runs this file in .venv-comfyui; elsewhere it skips with the reason.
"""

from __future__ import annotations

import copy
import json
import urllib.request

import numpy as np
import pytest

from comfy_server import start, workflow_to_prompt
from hosts import REPO

EXAMPLES = REPO / "example_workflows"
SDXL = {"sdxl_lightning_distillation_pp": "euler", "dmd2_consistency_distillation_pp": "consistency"}
COMFY_SAMPLER = {"euler": "euler", "consistency": "lcm"}  # ComfyUI's sampler of the same name
NODE = "KdistppDistillationPPSampler"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("comfyui_server"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def workflow(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def prompt(name: str, object_info: dict, size: int = 64) -> dict:
    """The workflow as an API prompt, with its empty latent `size` pixels square."""
    p = workflow_to_prompt(workflow(name), object_info)
    for node in p.values():
        if node["class_type"].startswith("Empty") and "width" in node["inputs"]:
            node["inputs"]["width"] = node["inputs"]["height"] = size
    return p


def one(p: dict, class_type: str) -> str:
    ids = [k for k, v in p.items() if v["class_type"] == class_type]
    assert len(ids) == 1, (class_type, ids)
    return ids[0]


def image(server, p: dict) -> np.ndarray:
    """Runs the prompt; the one image it saved, as uint8 (H, W, 3)."""
    from PIL import Image

    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    paths = server.images(entry)
    assert len(paths) == 1, paths
    return np.asarray(Image.open(paths[0]).convert("RGB")).astype(np.int16)


def error(server, p: dict) -> dict:
    """Runs a prompt that must fail while executing; ComfyUI's execution_error message."""
    entry = server.run(p)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:3000]
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


def with_comfy_sampler(p: dict, base: str) -> dict:
    """The prompt with ComfyUI's own KSamplerSelect (the same sampler) where the Distillation++ node was."""
    q = copy.deepcopy(p)
    q[one(q, NODE)] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": COMFY_SAMPLER[base]}}
    return q


def test_example_workflows_are_served_as_the_custom_nodes_templates(server):
    names = sorted(path.stem for path in EXAMPLES.glob("*.json"))
    assert len(names) == 4
    templates = server.get("/workflow_templates")
    assert sorted(templates["kdistpp"]) == names  # the template browser's list for this custom node
    for name in names:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/kdistpp/{name}.json") as answer:
            assert json.loads(answer.read()) == workflow(name)


def test_each_workflow_has_a_note_naming_every_model_file_its_loaders_use(object_info):
    for path in EXAMPLES.glob("*.json"):
        w = json.loads(path.read_text())
        notes = " ".join(n["widgets_values"][0] for n in w["nodes"] if n["type"] == "Note")
        p = workflow_to_prompt(w, object_info)
        files = [v for node in p.values() if "Loader" in node["class_type"] for v in node["inputs"].values()
                 if isinstance(v, str) and v.endswith(".safetensors")]
        assert files and all(f in notes for f in files), (path.name, files)


@pytest.mark.parametrize("name", ["qwen_image_lightning_distillation_pp", "wan22_two_experts_distillation_pp"])
def test_flow_workflows_validate_on_the_server_except_for_the_model_files(server, object_info, name):
    """ComfyUI validates a whole prompt before running it: the only errors left are the model files
    this test server does not have (every link, type and other widget value is accepted)."""
    status, answer = server.post("/prompt", {"prompt": prompt(name, object_info), "client_id": server.client_id})
    assert status == 400, answer
    problems = [(node_id, e["type"], e["extra_info"]["input_name"]) for node_id, errors in answer["node_errors"].items()
                for e in errors["errors"]]
    p = workflow_to_prompt(workflow(name), object_info)
    assert problems and all(kind == "value_not_in_list" and "Loader" in p[node_id]["class_type"]
                            and p[node_id]["inputs"][input_name].endswith(".safetensors")
                            for node_id, kind, input_name in problems), problems


@pytest.mark.parametrize("name", SDXL)
def test_w0_is_comfyuis_own_sampler_pixel_for_pixel(server, object_info, name):
    """At w = 0 the workflow's image is the one ComfyUI's KSamplerSelect (same sampler name) gives in
    the node's place, pixel for pixel; another seed changes it (the comparison can fail)."""
    base = SDXL[name]
    p = prompt(name, object_info)
    p[one(p, NODE)]["inputs"]["w"] = 0.0
    ours = image(server, p)
    theirs = image(server, with_comfy_sampler(p, base))
    assert ours.std() > 5  # a picture, not a flat or saturated one
    np.testing.assert_array_equal(ours, theirs)
    other = with_comfy_sampler(p, base)
    other[one(other, "SamplerCustom")]["inputs"]["noise_seed"] += 1
    assert np.abs(image(server, other) - theirs).max() > 20


@pytest.mark.parametrize("name", SDXL)
def test_with_the_teacher_on_its_first_step_is_the_teachers(server, object_info, name):
    """The teacher is called, with its own model, conditioning and CFG, proven from the outside.

    With w = 1, form `guidance` (the teacher at the student's point), direction `refined` and one
    guided step, the refined estimate of step 0 is the teacher's own (torch.lerp at weight 1 is
    exact), so the run must give the image of a run whose first step is the teacher's: ComfyUI's
    SplitSigmas at step 1, a SamplerCustom on the teacher MODEL (its CFG and conditioning, the same
    seed, the same ComfyUI sampler) for the first sigma, then the workflow's own SamplerCustom on the
    student for the rest (add_noise off). A 2-step schedule keeps the consistency sampler's noise
    draws the same in both (ComfyUI's lcm adds fresh noise after every step but the last: one draw,
    the first of the seed's stream in both runs). The two agree to float32 rounding (the split run
    scales its latent out and back in between the parts): at most one 8-bit level on a few pixels,
    while the unguided image differs by far more, so a run that skipped the teacher, or called
    another model or CFG, cannot pass.
    """
    base = SDXL[name]
    p = prompt(name, object_info)
    node_id, sampler_id, sched_id = one(p, NODE), one(p, "SamplerCustom"), one(p, "BasicScheduler")
    p[sched_id]["inputs"]["steps"] = 2
    settings = p[node_id]["inputs"]
    settings.update(w=1.0, form="guidance", direction="refined", guided_steps=1)
    guided = image(server, p)

    ref = with_comfy_sampler(p, base)
    sampler = ref[sampler_id]["inputs"]
    ref["split"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": sampler["sigmas"], "step": 1}}
    ref["teacher_step"] = {"class_type": "SamplerCustom", "inputs": {
        "model": settings["teacher"], "add_noise": True, "noise_seed": sampler["noise_seed"],
        "cfg": settings["teacher_cfg"], "positive": settings["teacher_positive"],
        "negative": settings["teacher_negative"], "sampler": sampler["sampler"], "sigmas": ["split", 0],
        "latent_image": sampler["latent_image"]}}
    sampler.update(add_noise=False, sigmas=["split", 1], latent_image=["teacher_step", 0])
    teacher_first = image(server, ref)

    plain = image(server, with_comfy_sampler(p, base))
    diff = np.abs(guided - teacher_first)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert np.abs(guided - plain).max() > 20


def test_the_workflow_as_committed_runs_and_its_teacher_changes_the_image(server, object_info):
    name = "sdxl_lightning_distillation_pp"
    p = prompt(name, object_info)
    guided = image(server, p)
    plain = image(server, with_comfy_sampler(p, SDXL[name]))
    assert np.abs(guided - plain).max() > 2


def test_bad_teachers_and_settings_are_comfyuis_node_errors_naming_the_input(server, object_info):
    """Three mistakes come back in /history as ComfyUI's execution error of the SamplerCustom node
    (status "error"), with the node's message: a flow teacher for an eps student, a teacher of
    another latent space (a tiny SD3 for the SD1.x-shaped student, both flow), guided steps past
    the schedule."""
    p = prompt("sdxl_lightning_distillation_pp", object_info)
    node_id, sampler_id = one(p, NODE), one(p, "SamplerCustom")
    ckpt = one(p, "CheckpointLoaderSimple")

    flow_teacher = copy.deepcopy(p)
    flow_teacher["shift"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": [ckpt, 0], "shift": 3.0}}
    flow_teacher[node_id]["inputs"]["teacher"] = ["shift", 0]
    e = error(server, flow_teacher)
    assert e["node_type"] == "SamplerCustom" and e["exception_type"].endswith("ValueError")
    assert "parametrized differently" in e["exception_message"]
    assert "the `teacher` input of the Distillation++ Sampler node" in e["exception_message"]

    other_space = copy.deepcopy(p)
    lora = one(p, "LoraLoaderModelOnly")
    other_space["flow_student"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": [lora, 0], "shift": 3.0}}
    other_space[sampler_id]["inputs"]["model"] = ["flow_student", 0]
    other_space["sd3"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors",
                                                                  "weight_dtype": "default"}}
    other_space[node_id]["inputs"]["teacher"] = ["sd3", 0]
    e = error(server, other_space)
    assert e["node_type"] == "SamplerCustom" and e["exception_type"].endswith("ValueError")
    assert "different latent spaces" in e["exception_message"] and "`teacher` input" in e["exception_message"]
    assert "SD15" in e["exception_message"] and "SD3" in e["exception_message"]

    too_many = copy.deepcopy(p)
    too_many[node_id]["inputs"]["guided_steps"] = 10
    e = error(server, too_many)
    assert e["node_type"] == "SamplerCustom" and e["exception_type"].endswith("ValueError")
    assert "is beyond the schedule's 4 steps" in e["exception_message"]
