"""The example workflows through ComfyUI's real server (the pinned 0.8.0 tree, `main.py --cpu`).

`comfy_server.start` runs the server with this repository in custom_nodes/ and tiny random-weight
files under the file names the example workflows' loaders use; each UI-format workflow in
example_workflows/ is converted to an API prompt with the server's own /object_info
(`comfy_server.workflow_to_prompt`), queued on /prompt, and its saved PNG read back from the output
folder once /history says it finished.

The SDXL-Lightning and DMD2 workflows run as committed, with one widget changed: the empty latent
is 64 x 64 pixels instead of 1024 (a CPU decodes that size in a second). The tiny checkpoint under
the SDXL base's file name is one ComfyUI detects as an SD1.x model (SDXL's own shape cannot be
tiny); the node graph, the loaders and the LoRA path are the workflow's.

The Qwen-Image and Wan 2.2 workflows are checked as committed by ComfyUI's own prompt validation
(everything but the absent model files is accepted), and run with smaller loaders swapped in
(`tiny_loaders`: tiny Qwen-Image / Wan 2.1 models and seeded conditioning from test-only nodes in
place of UNETLoader and CLIPLoader + CLIPTextEncode, SaveImage in place of the video nodes; 64 px,
5 frames); the sampler part of the graph (LoRA loaders on the real files' names, model sampling,
the Distillation++ nodes, BasicScheduler, SplitSigmas, SamplerCustom, VAELoader, VAEDecode) is the
workflow's own.

Needs KDISTPP_COMFYUI and ComfyUI's requirements with its page (comfyui_frontend_package):
`.ci/run` runs this file in .venv-comfyui; elsewhere it skips with the reason.
"""

from __future__ import annotations

import copy
import json
import urllib.request

import numpy as np
import pytest

from comfy_server import SAMPLER_INPUTS_V1, SAMPLER_RANGES_V1, as_listed, ranges, start, workflow_to_prompt
from hosts import REPO

EXAMPLES = REPO / "example_workflows"
# The base sampler of each workflow's Distillation++ node(s), and ComfyUI's sampler of the same name.
BASE = {"sdxl_lightning_distillation_pp": "euler", "dmd2_consistency_distillation_pp": "consistency",
        "qwen_image_lightning_distillation_pp": "euler", "wan22_two_experts_distillation_pp": "euler"}
SDXL = ["sdxl_lightning_distillation_pp", "dmd2_consistency_distillation_pp"]
FLOW = ["qwen_image_lightning_distillation_pp", "wan22_two_experts_distillation_pp"]
COMFY_SAMPLER = {"euler": "euler", "consistency": "lcm"}
NODE = "KdistppDistillationPPSampler"
GUIDER = "KdistppDistillationPPGuider"
GUIDED = ["qwen_image_lightning_guider_distillation_pp"]  # the Distillation++ Guider with SamplerCustomAdvanced


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("comfyui_server"), test_nodes=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def workflow(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def prompt(name: str, object_info: dict, size: int = 64) -> dict:
    """The workflow as an API prompt, with its empty latent `size` pixels square (and 5 frames).
    The flow workflows get the test-only loaders (`tiny_loaders`)."""
    p = workflow_to_prompt(workflow(name), object_info)
    for node in p.values():
        if node["class_type"].startswith("Empty") and "width" in node["inputs"]:
            node["inputs"]["width"] = node["inputs"]["height"] = size
        if "length" in node["inputs"]:
            node["inputs"]["length"] = 5  # two latent frames
    return tiny_loaders(p) if name in FLOW + GUIDED else p


def tiny_loaders(p: dict) -> dict:
    """The flow workflows with smaller loaders swapped in, the rest of the graph (LoRA loaders,
    model sampling, the Distillation++ nodes, schedulers, SamplerCustom, VAE loader and decode)
    unchanged: UNETLoader -> KdistppTestTinyFlowModel (tests/comfy_models' tiny Qwen-Image or
    Wan 2.1, built by ComfyUI's own classes: ComfyUI's detection of these families reads full-width
    shapes), CLIPLoader + CLIPTextEncode -> KdistppTestTextConditioning (the 7B/5B text encoders
    have fixed shapes), and for Wan CreateVideo + SaveVideo -> SaveImage of the decoded frames."""
    p = copy.deepcopy(p)
    for node_id, node in list(p.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "UNETLoader":
            name = inputs["unet_name"]
            p[node_id] = {"class_type": "KdistppTestTinyFlowModel", "inputs": {
                "family": "qwen_image" if name.startswith("qwen") else "wan21", "seed": int("low_noise" in name)}}
        elif kind == "CLIPLoader":
            del p[node_id]
        elif kind == "CLIPTextEncode":
            p[node_id] = {"class_type": "KdistppTestTextConditioning", "inputs": {"text": inputs["text"]}}
        elif kind == "CreateVideo":
            frames = inputs["images"]
            del p[node_id]
    for node_id, node in list(p.items()):
        if node["class_type"] == "SaveVideo":
            p[node_id] = {"class_type": "SaveImage", "inputs": {"images": frames, "filename_prefix": "frames"}}
    return p


def ids(p: dict, class_type: str) -> list[str]:
    return sorted((k for k, v in p.items() if v["class_type"] == class_type), key=int)


def one(p: dict, class_type: str) -> str:
    found = ids(p, class_type)
    assert len(found) == 1, (class_type, found)
    return found[0]


def image(server, p: dict) -> np.ndarray:
    """Runs the prompt; the images it saved (one, or a video's frames), as int16 (N, H, W, 3)."""
    from PIL import Image

    entry = server.run(p)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    paths = server.images(entry)
    assert paths, entry["outputs"]
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths]).astype(np.int16)


def image_and_latent(server, p: dict) -> tuple[np.ndarray, np.ndarray]:
    """Runs the prompt with ComfyUI's SaveLatent added on what its VAEDecode decodes; the saved
    images (as `image`) and that latent (float32)."""
    from PIL import Image
    from safetensors.numpy import load_file

    q = copy.deepcopy(p)
    q["save_latent"] = {"class_type": "SaveLatent", "inputs": {
        "samples": q[one(q, "VAEDecode")]["inputs"]["samples"], "filename_prefix": "latents/kdistpp"}}
    entry = server.run(q)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    images = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in server.images(entry)])
    (latent,) = server.images(entry, "latents")
    return images.astype(np.int16), load_file(str(latent))["latent_tensor"]


def error(server, p: dict) -> dict:
    """Runs a prompt that must fail while executing; ComfyUI's execution_error message."""
    entry = server.run(p)
    assert entry["status"]["status_str"] == "error", json.dumps(entry["status"])[:3000]
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert len(errors) == 1, entry["status"]["messages"]
    return errors[0]


def with_comfy_sampler(p: dict, base: str) -> dict:
    """The prompt with ComfyUI's own KSamplerSelect (the same sampler) where each Distillation++ node was."""
    q = copy.deepcopy(p)
    for node_id in ids(q, NODE):
        q[node_id] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": COMFY_SAMPLER[base]}}
    return q


def teacher_first(p: dict, sampler_id: str, base: str) -> dict:
    """The prompt with every Distillation++ node replaced by KSamplerSelect, and SamplerCustom
    `sampler_id` split at its first sigma (SplitSigmas): a SamplerCustom on its node's teacher MODEL,
    with the teacher's CFG and conditioning and the same seed and noise setting, for the first
    sigma; the original SamplerCustom on its student, add_noise off, for the rest."""
    settings = p[p[sampler_id]["inputs"]["sampler"][0]]["inputs"]
    ref = with_comfy_sampler(p, base)
    sampler = ref[sampler_id]["inputs"]
    split, first = f"split{sampler_id}", f"teacher{sampler_id}"
    ref[split] = {"class_type": "SplitSigmas", "inputs": {"sigmas": sampler["sigmas"], "step": 1}}
    ref[first] = {"class_type": "SamplerCustom", "inputs": {
        "model": settings["teacher"], "add_noise": sampler["add_noise"], "noise_seed": sampler["noise_seed"],
        "cfg": settings["teacher_cfg"], "positive": settings["teacher_positive"],
        "negative": settings["teacher_negative"], "sampler": sampler["sampler"], "sigmas": [split, 0],
        "latent_image": sampler["latent_image"]}}
    sampler.update(add_noise=False, sigmas=[split, 1], latent_image=[first, 0])
    return ref


def test_example_workflows_are_served_as_the_custom_nodes_templates(server):
    names = sorted(path.stem for path in EXAMPLES.glob("*.json"))
    assert len(names) == 5
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


@pytest.mark.parametrize("name", ["qwen_image_lightning_distillation_pp", "wan22_two_experts_distillation_pp",
                                  "qwen_image_lightning_guider_distillation_pp"])
def test_flow_workflows_validate_on_the_server_except_for_the_model_files(server, object_info, name):
    """ComfyUI validates a whole prompt before running it: the only errors left are the model files
    this test server does not have (every link, type and other widget value is accepted)."""
    p = workflow_to_prompt(workflow(name), object_info)  # as committed: its own loaders and file names
    status, answer = server.post("/prompt", {"prompt": p, "client_id": server.client_id})
    assert status == 400, answer
    problems = [(node_id, e["type"], e["extra_info"]["input_name"]) for node_id, errors in answer["node_errors"].items()
                for e in errors["errors"]]
    assert problems and all(kind == "value_not_in_list" and "Loader" in p[node_id]["class_type"]
                            and p[node_id]["inputs"][input_name].endswith(".safetensors")
                            for node_id, kind, input_name in problems), problems


@pytest.mark.parametrize("name", SDXL + FLOW)
def test_w0_is_comfyuis_own_sampler_pixel_for_pixel(server, object_info, name):
    """At w = 0 the workflow's image is the one ComfyUI's KSamplerSelect (same sampler name) gives in
    the node's place (both nodes' places for Wan), pixel for pixel; another seed changes it (the
    comparison can fail)."""
    base = BASE[name]
    p = prompt(name, object_info)
    for node_id in ids(p, NODE):
        p[node_id]["inputs"]["w"] = 0.0
    ours = image(server, p)
    theirs = image(server, with_comfy_sampler(p, base))
    assert ours.std() > 5  # a picture, not a flat or saturated one
    np.testing.assert_array_equal(ours, theirs)
    other = with_comfy_sampler(p, base)
    other[ids(other, "SamplerCustom")[0]]["inputs"]["noise_seed"] += 1
    assert np.abs(image(server, other) - theirs).max() > 20


# (workflow, which SamplerCustom part's teacher is tested): Wan 2.2 has two parts, two teachers.
PARTS = [(name, 0) for name in SDXL + FLOW] + [("wan22_two_experts_distillation_pp", 1)]


@pytest.mark.parametrize(("name", "part"), PARTS)
def test_with_the_teacher_on_its_first_step_is_the_teachers(server, object_info, name, part):
    """The teacher is called, with its own model, conditioning and CFG, proven from the outside.

    With w = 1, form `guidance` (the teacher at the student's point), direction `refined` and one
    guided step, the refined estimate of the part's first step is the teacher's own (torch.lerp at
    weight 1 is exact), so the run must give the image of a run whose first step is the teacher's:
    ComfyUI's SplitSigmas at step 1, a SamplerCustom on the node's teacher MODEL (its CFG and
    conditioning, the same seed, the same ComfyUI sampler) for the first sigma, then the
    workflow's own SamplerCustom on the student for the rest (add_noise off); every Distillation++
    node is ComfyUI's KSamplerSelect there, and here the other part's node (Wan) has w = 0.
    The one-part workflows run a 2-step schedule (Wan's parts have two steps each): it keeps the
    consistency sampler's noise draws the same in both (ComfyUI's lcm adds fresh noise after every
    step but the last: one draw, the first of the seed's stream in both runs), and the first step
    long enough to show in the image. The two agree to float32 rounding (the split run
    scales its latent out and back in between the parts): the final latents (ComfyUI's SaveLatent)
    to 1e-3 of their scale (measured: 1e-7, 6e-5 for the consistency sampler), the images to one
    8-bit level on under 1% of the pixels. The unguided latent differs by more than 3e-2 of that
    scale, and so do the references with another teacher MODEL (the student), CFG 1, or the
    positive and negative swapped (measured: 3e-2 to 3.6 on the tiny models), so a run that skipped
    the teacher or called it wrongly cannot pass.
    """
    base = BASE[name]
    p = prompt(name, object_info)
    if name != "wan22_two_experts_distillation_pp":
        p[one(p, "BasicScheduler")]["inputs"]["steps"] = 2
    sampler_id = ids(p, "SamplerCustom")[part]
    for node_id in ids(p, NODE):
        p[node_id]["inputs"]["w"] = 0.0
    settings = p[p[sampler_id]["inputs"]["sampler"][0]]["inputs"]
    settings.update(w=1.0, form="guidance", direction="refined", guided_steps=1)
    guided, guided_latent = image_and_latent(server, p)
    reference, reference_latent = image_and_latent(server, teacher_first(p, sampler_id, base))
    _, plain_latent = image_and_latent(server, with_comfy_sampler(p, base))
    scale = float(np.abs(plain_latent).max())
    diff = np.abs(guided - reference)
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    assert np.abs(guided_latent - reference_latent).max() <= 1e-3 * scale
    assert np.abs(guided_latent - plain_latent).max() > 3e-2 * scale


@pytest.mark.parametrize("name", SDXL + FLOW)
def test_the_workflow_with_its_own_settings_runs_and_its_teachers_change_the_result(server, object_info, name):
    p = prompt(name, object_info)
    guided, guided_latent = image_and_latent(server, p)
    _, plain_latent = image_and_latent(server, with_comfy_sampler(p, BASE[name]))
    assert guided.std() > 5
    assert np.abs(guided_latent - plain_latent).max() > 1e-3 * np.abs(plain_latent).max()


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
    assert "guided_steps=10 (an input of the Distillation++ Sampler" in e["exception_message"]
    assert "beyond the 4 steps" in e["exception_message"]


def with_cfg_guider(p: dict) -> dict:
    """The prompt with ComfyUI's own CFGGuider (the student, its conditioning and CFG) where the Distillation++
    Guider was."""
    q = copy.deepcopy(p)
    for node_id in ids(q, GUIDER):
        inputs = q[node_id]["inputs"]
        q[node_id] = {"class_type": "CFGGuider", "inputs": {k: inputs[k] for k in ("model", "positive", "negative",
                                                                                   "cfg")}}
    return q


def test_object_info_lists_both_v3_nodes_with_their_inputs(object_info):
    """/object_info, which the page builds its nodes from: the Distillation++ Sampler with the first release's
    inputs (names, types, defaults, order: saved workflows' widget values follow it), the Distillation++ Guider
    with CFGGuider's inputs, the teacher's and the settings; a tooltip on every input."""
    sampler, guider = object_info[NODE], object_info[GUIDER]
    assert as_listed(sampler["input"]) == SAMPLER_INPUTS_V1 and ranges(sampler["input"]) == SAMPLER_RANGES_V1
    assert sampler["input_order"] == {group: [n for n, _, _ in inputs] for group, inputs in SAMPLER_INPUTS_V1.items()}
    assert (sampler["output"], sampler["category"]) == (["SAMPLER"], "sampling/custom_sampling/samplers")
    assert guider["input_order"]["required"][:4] == object_info["CFGGuider"]["input_order"]["required"]
    assert guider["input_order"]["required"][4:] == [n for n, _, _ in SAMPLER_INPUTS_V1["required"]
                                                     if n != "base_sampler"]
    assert guider["input_order"]["optional"] == ["guide_sigma_min", "guide_sigma_max"]
    assert (guider["output"], guider["category"]) == (["GUIDER"], "sampling/custom_sampling/guiders")
    for node in (sampler, guider):
        assert all(spec[1].get("tooltip") for group in node["input"].values() for spec in group.values())


@pytest.mark.parametrize("sampler_name", ["res_multistep", "er_sde"])
def test_the_guider_workflow_at_w0_is_comfyuis_cfgguider_and_its_teacher_changes_it(server, object_info,
                                                                                    sampler_name):
    """The guider example (Qwen-Image-Lightning, SamplerCustomAdvanced) with its sampler (res_multistep) and with
    er_sde: at w = 0 the image is CFGGuider's in the guider's place, pixel for pixel (another seed changes it);
    with the workflow's own settings the teacher changes the latent."""
    p = prompt(GUIDED[0], object_info)
    p[one(p, "KSamplerSelect")]["inputs"]["sampler_name"] = sampler_name
    plain = with_cfg_guider(p)
    zero = copy.deepcopy(p)
    zero[one(zero, GUIDER)]["inputs"]["w"] = 0.0
    theirs = image(server, plain)
    assert theirs.std() > 5
    np.testing.assert_array_equal(image(server, zero), theirs)
    other = copy.deepcopy(plain)
    other[one(other, "RandomNoise")]["inputs"]["noise_seed"] += 1
    assert np.abs(image(server, other) - theirs).max() > 20
    guided, guided_latent = image_and_latent(server, p)
    _, plain_latent = image_and_latent(server, plain)
    assert guided.std() > 5
    assert np.abs(guided_latent - plain_latent).max() > 1e-3 * np.abs(plain_latent).max()


def test_the_converter_gives_the_pages_own_api_prompt(server, object_info):
    """`workflow_to_prompt` is checked against ComfyUI's page itself: headless Chromium loads each
    workflow into the page (app.loadGraphData) and the page converts it (app.graphToPrompt, what its
    Run button queues); both give the same class types and inputs, node for node."""
    browser = pytest.importorskip("browser")
    browser.require_browser()
    request = urllib.request.Request(server.url + "/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    with urllib.request.urlopen(request, timeout=30):
        pass  # a returning user: no first-run template dialog over the page
    with browser.chromium() as driver:
        driver.get(server.url)
        browser.wait_for(driver, lambda d: d.execute_script(
            "return !!(window.app && app.vueAppReady && app.graph && app.canvas)"), 120, "ComfyUI's page ready")
        driver.set_script_timeout(60)
        for path in sorted(EXAMPLES.glob("*.json")):
            w = json.loads(path.read_text())
            page = driver.execute_async_script(
                "const done = arguments[arguments.length - 1];"
                "app.loadGraphData(arguments[0]).then(() => app.graphToPrompt()).then(p => done(p.output),"
                " e => done({error: String(e)}));", w)
            ours = workflow_to_prompt(w, object_info)
            assert {k: (v["class_type"], v["inputs"]) for k, v in page.items()} == \
                {k: (v["class_type"], v["inputs"]) for k, v in ours.items()}, path.name
