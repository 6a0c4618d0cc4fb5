"""ComfyUI's real server for tests: `main.py --cpu` on a free port with this repository in custom_nodes/.

`start(tmp)` runs the pinned ComfyUI (KDISTPP_COMFYUI) with the Python of the running venv, a fresh
`--base-directory` under `tmp` whose custom_nodes/kdistpp links to this repository (its
`__init__.py` makes it a custom node), and, with models=True, tiny random-weight model files under
the file names the example workflows' loaders use: the same node graph runs end to end, in seconds,
on CPU.

The tiny checkpoint is what ComfyUI's CheckpointLoaderSimple detects as an SD1.x model (its
detection keys on the UNet's width 320 and text width 768, so SDXL's own shape cannot be tiny): a
one-level 320-channel UNet, the full CLIP-L text encoder (its config is fixed: ComfyUI builds it at
full size whatever the file holds, and missing weights would stay uninitialised) and the SD VAE's
decoder (the encoder is left out: text-to-image never encodes). All in float16, seeded.

The Qwen-Image and Wan workflows' LoRA and VAE files are tiny too (the LoRAs fit tests/comfy_models'
tiny Qwen-Image and Wan 2.1, the VAEs are Wan 2.1 VAEs 8 channels wide); their diffusion models and
text encoders cannot be (ComfyUI sizes Qwen-Image and Wan from full-width shapes; the text encoders
have fixed 7B / 5B shapes), so test_nodes=True adds test-only stand-ins for those loaders.
`workflow_to_prompt` converts a UI-format workflow to the API prompt /prompt takes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hosts import REPO

# The file names the example workflows' loaders use (example_workflows/*.json).
SDXL_BASE = "sd_xl_base_1.0.safetensors"
SDXL_LIGHTNING_LORA = "sdxl_lightning_4step_lora.safetensors"
DMD2_LORA = "dmd2_sdxl_4step_lora_fp16.safetensors"
# A tiny SD3 (MMDiT) diffusion model for UNETLoader: another latent space than the checkpoint's.
TINY_SD3 = "tiny_sd3.safetensors"
# The flow workflows' LoRA files: (tiny model family, model seed, LoRA seed).
FLOW_LORAS = {"Qwen-Image-Lightning-8steps-V1.0.safetensors": ("qwen_image", 0, 21),
              "wan2.2_t2v_lightx2v_4steps_lora_v1.1_high_noise.safetensors": ("wan21", 0, 22),
              "wan2.2_t2v_lightx2v_4steps_lora_v1.1_low_noise.safetensors": ("wan21", 1, 23)}
WAN_VAES = {"qwen_image_vae.safetensors": 31, "wan_2.1_vae.safetensors": 32}  # Wan 2.1 VAEs (width read from the file)
WAN_VAE_DIM = 8

# A one-level UNet that ComfyUI detects as SD1.x (model_channels 320, context 768, conv-in transformers).
UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1],
        "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1,
        "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
        "transformer_depth_output": [1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


@dataclass
class ComfyServer:
    """A running ComfyUI server: its URL, its base directory and its process."""

    url: str
    base: Path
    process: subprocess.Popen
    log: Path = field(default=None)
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def stop(self) -> None:
        """Ends the server process (and waits for it)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)

    def get(self, route: str):
        """GET `route` and parse the JSON answer."""
        with urllib.request.urlopen(self.url + route, timeout=60) as answer:
            return json.loads(answer.read())

    def post(self, route: str, body: dict):
        """POST JSON to `route`; returns (HTTP status, parsed answer) for errors as well."""
        data = json.dumps(body).encode()
        request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def queue(self, prompt: dict) -> str:
        """POST /prompt with an API-format prompt; returns its prompt_id. A prompt the server refuses
        (validation) raises AssertionError with the server's answer."""
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        assert status == 200, f"/prompt refused the prompt ({status}): {json.dumps(answer)[:3000]}"
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        """Polls /history until the prompt has finished (success or error); returns its history entry."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited ({self.process.returncode}):\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """queue + wait."""
        return self.wait(self.queue(prompt), timeout)

    def images(self, entry: dict, kind: str = "images") -> list[Path]:
        """The files a finished prompt saved, in node order: SaveImage's images, or (kind="latents")
        SaveLatent's latents."""
        paths = []
        for _, output in sorted(entry.get("outputs", {}).items()):
            for image in output.get(kind, []):
                folder = self.base / image.get("type", "output") / image.get("subfolder", "")
                paths.append(folder / image["filename"])
        return paths

    def log_tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log and self.log.exists() else ""


def host_root() -> Path:
    """The ComfyUI tree KDISTPP_COMFYUI names, or a skip saying what is missing."""
    path = os.environ.get("KDISTPP_COMFYUI")
    if not path:
        pytest.skip("KDISTPP_COMFYUI is not set: the ComfyUI server tests need a ComfyUI 0.8.0 tree")
    root = Path(path).resolve()
    if not (root / "main.py").is_file():
        pytest.skip(f"KDISTPP_COMFYUI={path} has no main.py")
    try:
        import comfyui_frontend_package  # noqa: F401  (ComfyUI's server serves its page from it)
    except ImportError:
        pytest.skip("comfyui_frontend_package is not installed here: ComfyUI's server needs it (.ci/run builds "
                    ".venv-comfyui with it)")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, models: bool = True, timeout: float = 120, node: Path = REPO,
          test_nodes: bool = False) -> ComfyServer:
    """Starts ComfyUI's server for tests on a free port, with this repository (or `node`, another
    checkout of it) as the custom node `kdistpp` in a fresh base directory under `tmp`, and
    (models=True) the tiny model files. test_nodes=True adds the test-only loaders of
    TEST_NODE_CLASS_MAPPINGS (custom node `kdistpp_test_nodes`)."""
    root = host_root()
    base = Path(tmp) / "comfy"
    for sub in ("custom_nodes", "output", "input", "user", "temp", "models/checkpoints", "models/loras",
                "models/vae", "models/diffusion_models", "models/text_encoders"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / "kdistpp"
    if not link.exists():
        link.symlink_to(Path(node).resolve(), target_is_directory=True)
    if test_nodes:
        (base / "custom_nodes" / "kdistpp_test_nodes").mkdir(exist_ok=True)
        (base / "custom_nodes" / "kdistpp_test_nodes" / "__init__.py").write_text(
            f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "from comfy_server import TEST_NODE_CLASS_MAPPINGS as NODE_CLASS_MAPPINGS\n")
    if models:
        write_tiny_models(base / "models")
    port = free_port()
    log = base / "server.log"
    command = [sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",  # nothing in the host tree
               "--use-pytorch-cross-attention", "--disable-auto-launch", "--disable-api-nodes"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(url=f"http://127.0.0.1:{port}", base=base, process=process, log=log)
    end = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited at start ({process.returncode}):\n{server.log_tail()}")
        try:
            server.get("/system_stats")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if time.monotonic() > end:
            server.stop()
            raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{server.log_tail()}")
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- tiny models


def _random(shapes: dict, seed: int, prefix: str = "") -> dict:
    """Seeded float16 weights of a sensible scale for a {name: shape} dict (as hosts.fill does)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("position_ids"):
            continue
        if name.endswith("bias"):
            t = torch.randn(shape, generator=g) * 0.02
        elif len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.randn(shape, generator=g) / fan_in ** 0.5
        out[prefix + name] = t.to(torch.float16)
    return out


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def checkpoint_state_dict(seed: int) -> dict:
    """A tiny SD1.x-detected checkpoint: UNet (UNET), CLIP-L and the VAE decoder, seeded."""
    import torch

    from hosts import import_comfy

    import_comfy(full=True)
    import comfy.ldm.models.autoencoder as autoencoder
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**UNET, dtype=torch.float32, device=torch.device("meta"),
                         operations=comfy.ops.disable_weight_init)
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
        vae = autoencoder.AutoencoderKL(ddconfig=VAE, embed_dim=4)
    vae_shapes = {k: v for k, v in _shapes(vae).items() if not k.startswith("encoder.")}  # decode only
    sd = _random(_shapes(unet), seed, "model.diffusion_model.")
    sd.update(_random(_shapes(clip), 1000 + seed, "cond_stage_model."))
    sd.update(_random(vae_shapes, 2000 + seed, "first_stage_model."))
    return sd


def lora_state_dict(unet_keys, seed: int, scale: float = 0.5, attention: str = ".attn") -> dict:
    """A rank-2 kohya-format LoRA on the attention projections (names containing `attention`), in
    the `lora_unet_` + diffusion-model-name form ComfyUI maps for every model."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name, shape in unet_keys.items():
        if len(shape) == 2 and name.endswith(".weight") and attention in name:
            key = "lora_unet_" + name[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
            lora[f"{key}.lora_up.weight"] = (torch.randn(shape[0], 2, generator=g) * scale).half()
            lora[f"{key}.lora_down.weight"] = (torch.randn(2, shape[1], generator=g) * scale).half()
            lora[f"{key}.alpha"] = torch.tensor(2.0)
    return lora


# Test-only model seeds: a tiny model is rebuilt from (family, seed), in the test and in the server.
def tiny_flow_patcher(family: str, seed: int):
    """tests/comfy_models' tiny flow model (ComfyUI's own class and config, seeded weights)."""
    import comfy.model_management  # noqa: F401  (the server's, or the tests' import_comfy)
    import comfy.model_patcher  # noqa: F401
    import comfy.supported_models  # noqa: F401
    from comfy_models import tiny_flow

    return tiny_flow(sys.modules["comfy"], family, 100 + seed)


def tiny_flow_state_dict(family: str, seed: int) -> dict:
    from hosts import import_comfy

    import_comfy(full=True)
    return tiny_flow_patcher(family, seed).model.diffusion_model.state_dict()


def wan_vae_state_dict(seed: int) -> dict:
    """A Wan 2.1 VAE of width WAN_VAE_DIM (ComfyUI reads the width from `decoder.head.0.gamma`)."""
    import torch

    from hosts import import_comfy

    import_comfy(full=True)
    import comfy.ldm.wan.vae as wan_vae

    with torch.device("meta"):
        vae = wan_vae.WanVAE(dim=WAN_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                             temperal_downsample=[False, True, True], image_channels=3, dropout=0.0)
    return _random(_shapes(vae), seed)


class TinyFlowModel:
    """Test-only stand-in for UNETLoader: a tiny Qwen-Image or Wan 2.1 model (ComfyUI's own classes)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["qwen_image", "wan21"],), "seed": ("INT", {"default": 0, "min": 0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, family, seed):
        return (tiny_flow_patcher(family, seed),)


class TinyTextConditioning:
    """Test-only stand-in for CLIPLoader + CLIPTextEncode: the tiny models' conditioning, seeded by the text."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text):
        import zlib

        from comfy_models import flow_conditioning

        return (flow_conditioning(zlib.crc32(text.encode())),)


TEST_NODE_CLASS_MAPPINGS = {"KdistppTestTinyFlowModel": TinyFlowModel,
                            "KdistppTestTextConditioning": TinyTextConditioning}


def write_tiny_models(models: Path) -> None:
    """Writes the tiny model files under the example workflows' file names (skips existing files)."""
    from safetensors.torch import save_file

    unet_shapes = None
    path = models / "checkpoints" / SDXL_BASE
    if not path.exists():
        sd = checkpoint_state_dict(0)
        unet_shapes = {k: tuple(v.shape) for k, v in sd.items() if k.startswith("model.diffusion_model.")}
        save_file(sd, str(path))
    for name, seed in ((SDXL_LIGHTNING_LORA, 11), (DMD2_LORA, 12)):
        path = models / "loras" / name
        if path.exists():
            continue
        if unet_shapes is None:
            from safetensors import safe_open

            with safe_open(str(models / "checkpoints" / SDXL_BASE), "pt") as f:
                unet_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                               if k.startswith("model.diffusion_model.")}
        save_file(lora_state_dict(unet_shapes, seed), str(path))
    for name, (family, model_seed, seed) in FLOW_LORAS.items():
        path = models / "loras" / name
        if not path.exists():
            weights = tiny_flow_state_dict(family, model_seed)
            shapes = {"model.diffusion_model." + k: tuple(v.shape) for k, v in weights.items()}
            save_file(lora_state_dict(shapes, seed, attention="attn"), str(path))
    for name, seed in WAN_VAES.items():
        path = models / "vae" / name
        if not path.exists():
            save_file(wan_vae_state_dict(seed), str(path))
    path = models / "diffusion_models" / TINY_SD3
    if not path.exists():
        from comfy_models import tiny_flow
        from hosts import import_comfy

        model = tiny_flow(import_comfy(full=True), "sd3", 5).model.diffusion_model
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))


# ------------------------------------------------------------------------------ UI workflow -> API prompt

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the page, never sent to the server


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """A UI-format workflow (what ComfyUI's page saves: nodes with `widgets_values`, links as
    [id, from_node, from_slot, to_node, to_slot, type]) as the API prompt /prompt takes.

    Input order and which inputs are widgets come from the server's /object_info: widget values are
    consumed in that order, an INT with `control_after_generate` (seeds) is followed in
    `widgets_values` by its control entry ("fixed", "randomize", ...), which is skipped; a widget
    input that is linked takes the link. Note nodes are skipped; muted nodes (mode 2) too."""
    links = {link[0]: (link[1], link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise ValueError(f"node {node['id']} ({kind}) is bypassed: the converter does not reroute bypassed nodes")
        if kind not in object_info:
            raise ValueError(f"node {node['id']}: type {kind!r} is not in the server's /object_info")
        info = object_info[kind]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = node.get("widgets_values") or []
        inputs, k = {}, 0
        for name in order:
            spec = specs[name]
            if _is_widget(spec) and not isinstance(values, dict):
                if k < len(values):
                    inputs[name] = values[k]
                k += 1
                if spec[0] == "INT" and len(spec) > 1 and spec[1].get("control_after_generate"):
                    k += 1  # the control widget's value ("fixed", "randomize", ...)
            elif _is_widget(spec) and name in values:
                inputs[name] = values[name]
            if name in linked:
                source, slot = linked[name]
                inputs[name] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs, "_meta": {"title": node.get("title", kind)}}
    return prompt


# ------------------------------------------------------------------------------ the nodes' inputs

# The inputs of the nodes' first release (V1), in order: saved workflows store widget values in this order.
SAMPLER_INPUTS_V1 = {
    "required": [("teacher", "MODEL", None), ("teacher_positive", "CONDITIONING", None),
                 ("teacher_negative", "CONDITIONING", None), ("teacher_cfg", "FLOAT", 5.0),
                 ("base_sampler", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "consistency"],
                  "euler"), ("w", "FLOAT", 0.3), ("guided_steps", "INT", 1),
                 ("form", ["interpolate", "guidance", "eps"], "interpolate"),
                 ("renoise", ["next", "current", "random"], "next")],
    "optional": [("direction", ["student", "refined"], "student"), ("guide_sigma_min", "FLOAT", 0.0),
                 ("guide_sigma_max", "FLOAT", 0.0)],
}


# ... and the ranges of its number widgets (min, max, step; an INT's step is the page's default)
SAMPLER_RANGES_V1 = {"teacher_cfg": (0.0, 30.0, 0.1), "w": (0.0, 1.0, 0.01), "guided_steps": (0, 100, None),
                     "guide_sigma_min": (0.0, 1000.0, 0.01), "guide_sigma_max": (0.0, 1000.0, 0.01)}


def ranges(spec: dict) -> dict:
    """The (min, max, step) of each number input of an INPUT_TYPES dict."""
    return {name: (value[1].get("min"), value[1].get("max"), value[1].get("step"))
            for inputs in spec.values() for name, value in inputs.items() if value[0] in ("INT", "FLOAT")}


def as_listed(spec: dict) -> dict:
    """An INPUT_TYPES dict as (name, type, default) per group, a combo as its options (V1's form)."""
    out = {}
    for group, inputs in spec.items():
        out[group] = [(name, value[1]["options"] if value[0] == "COMBO" else value[0], value[1].get("default"))
                      for name, value in inputs.items()]
    return out
