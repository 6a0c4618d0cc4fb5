"""`python -m kdistpp.sfd train|export` on a tiny random SD-architecture pipeline saved with save_pretrained
(the real SD1 tokenizer files from the Forge tree; the test skips without them)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hosts import SHARED_HOSTS

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from kdistpp.sfd import cli, prompts  # noqa: E402

TOKENIZER = (Path(os.environ.get("KDISTPP_FORGE", SHARED_HOSTS / "forge-dfdcbab")).resolve()
             / "backend" / "huggingface" / "runwayml" / "stable-diffusion-v1-5" / "tokenizer")
CONTEXT = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    if not (TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"the SD1 tokenizer files are not at {TOKENIZER}")
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=CONTEXT, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=CONTEXT))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CONTEXT, attention_head_dim=8, norm_num_groups=32)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=16)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER)),
        unet=unet, scheduler=diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                     steps_offset=1, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def prompts_file(tmp_path, lines=("a red circle", "two blue squares", "")):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_args(teacher_dir, tmp_path, *extra, run="run"):
    return ["train", "--teacher", str(teacher_dir), "--prompts", str(prompts_file(tmp_path)), "--output",
            str(tmp_path / run), "--steps", "3", "--lora-rank", "2", "--iterations", "2", "--batch-size", "2",
            "--checkpoint-every", "1", "--samples", "2", "--lr", "1e-2", "--no-progress", *extra]


def test_train_writes_log_checkpoints_grids_and_a_lora_that_export_reproduces(teacher_dir, tmp_path):
    assert cli.main(train_args(teacher_dir, tmp_path, "--ema", "0.5")) == 0
    run = tmp_path / "run"
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(checkpoint["ema"]) == set(checkpoint["student"])  # the LoRA file below is the EMA's
    assert any(not torch.equal(checkpoint["ema"][k], checkpoint["student"][k]) for k in checkpoint["ema"])
    rows = list(csv.DictReader((run / "loss.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    grids = sorted(run.glob("samples_*.png"))
    assert [g.name for g in grids] == ["samples_000001.png", "samples_000002.png"]
    assert grids[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file

    lora = load_file(str(run / "student_lora.safetensors"))
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_up" in k)  # trained, not the zero init
    embeddings = load_file(str(run / "prompt_embeddings.safetensors"))
    assert embeddings["cond.encoder_hidden_states"].shape == (2, 77, CONTEXT)  # the blank line is no prompt

    # export rebuilds the student from the teacher and checkpoint.pt: the same file as at the end of training
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "exported.safetensors")]) == 0
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert set(exported) == set(lora) and all(torch.equal(exported[k], lora[k]) for k in lora)
    # kohya is the one format a UNet student is written in: asking for it by name writes the same file
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "kohya.safetensors"), "--format",
                     "kohya"]) == 0
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    assert set(kohya) == set(lora) and all(torch.equal(kohya[k], lora[k]) for k in lora)


def test_an_interrupted_run_resumed_equals_an_uninterrupted_one_and_reuses_the_embeddings(teacher_dir, tmp_path,
                                                                                          monkeypatch):
    from safetensors.torch import load_file

    from kdistpp.sfd.trainer import SFDTrainer

    assert cli.main(train_args(teacher_dir, tmp_path, run="whole")) == 0
    original = SFDTrainer.train_batch

    def stop_at_the_second_batch(self, *args, **kwargs):
        if self.iteration == 1:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFDTrainer, "train_batch", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        cli.main(train_args(teacher_dir, tmp_path, run="parts"))
    monkeypatch.setattr(SFDTrainer, "train_batch", original)

    def no_encoding(*args, **kwargs):
        raise AssertionError("the prompts were embedded again")

    monkeypatch.setattr(prompts, "encode", no_encoding)  # resuming reads the cached embeddings
    assert cli.main(train_args(teacher_dir, tmp_path, "--resume", run="parts")) == 0
    whole, parts = (load_file(str(tmp_path / r / "student_lora.safetensors")) for r in ("whole", "parts"))
    assert set(whole) == set(parts)
    for key in whole:
        assert torch.allclose(parts[key], whole[key], atol=1e-7), key
    assert [int(r["iteration"]) for r in csv.DictReader((tmp_path / "parts" / "loss.csv").open())] == [1, 2]


def test_bad_input_is_refused_before_any_training(teacher_dir, tmp_path, capsys):
    def refused(args, message):
        assert cli.main(args) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run" / "checkpoint.pt").exists()

    args = train_args(teacher_dir, tmp_path)
    teacher_at = args.index("--teacher") + 1
    refused(args[:teacher_at] + [str(tmp_path)] + args[teacher_at + 1:], "not a diffusers model folder")
    refused(args[:teacher_at] + [str(tmp_path / "missing")] + args[teacher_at + 1:], "does not exist")
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    refused(args[:teacher_at] + [str(single)] + args[teacher_at + 1:], "not a checkpoint file")
    flow = tmp_path / "other"
    flow.mkdir()
    (flow / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    refused(args[:teacher_at] + [str(flow)] + args[teacher_at + 1:], "not one the command trains")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    at = args.index("--prompts") + 1
    refused(args[:at] + [str(empty)] + args[at + 1:], "holds no prompt")
    bad_jsonl = tmp_path / "p.jsonl"
    bad_jsonl.write_text('{"text": "a cat"}\n')
    refused(args[:at] + [str(bad_jsonl)] + args[at + 1:], "'prompt' field")
    steps_at = args.index("--steps") + 1
    refused(args[:steps_at] + ["1"] + args[steps_at + 1:], "N >= 2")
    refused(args[:steps_at] + ["four"] + args[steps_at + 1:], "must be integers")
    refused(args[:steps_at] + ["2", "--afs"] + args[steps_at + 1:], "afs=True")
    refused(args + ["--resume"], "no checkpoint.pt")


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "id": 1}\n\n{"prompt": "a dog"}\n')
    assert prompts.read_prompts(path) == ["a cat", "a dog"]


def test_help_documents_every_option():
    result = subprocess.run([sys.executable, "-m", "kdistpp.sfd", "train", "--help"], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 0
    train = next(a for a in cli.parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    for action in train._actions:
        for flag in action.option_strings:
            assert flag in result.stdout, flag
        assert action.help, action.dest


def test_help_shows_each_options_real_default_and_the_lora_format_of_each_family():
    """argparse's "(default: None)" is no default: an option worked out at run time says what it resolves to."""
    def helped(command):
        result = subprocess.run([sys.executable, "-m", "kdistpp.sfd", command, "--help"], capture_output=True,
                                text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "1000"},
                                timeout=120)
        assert result.returncode == 0
        return result.stdout

    train, export = helped("train"), helped("export")
    assert "(default: None)" not in train and "(default: None)" not in export
    assert "(default: fp32, or what `accelerate launch --mixed_precision` asks for: bf16 or no)" in train
    assert "(default: ddp, or fsdp under `accelerate launch --use_fsdp --fsdp_version 2`)" in train
    assert "(default: 1600)" in train  # argparse's own default where it is the value
    assert "A UNet (SD 1.x/2.x, SDXL) student: kohya only (diffusers, ComfyUI, A1111 and Forge load it)" in export
    assert "An SD3 student: diffusers (diffusers' load_lora_weights, ComfyUI) or kohya (Forge, ComfyUI)" in export
    assert "A Flux student: diffusers only (diffusers, ComfyUI)" in export
    assert "(default: kohya for a UNet, diffusers for SD3 and Flux)" in export


@pytest.mark.slow
def test_under_torchrun_two_processes_train_and_only_rank_0_writes(teacher_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m kdistpp.sfd train ... --parallel fsdp` on CPU (gloo)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed beside this Python")
    args = train_args(teacher_dir, tmp_path, "--parallel", "fsdp", "--device", "cpu", "--checkpoint-every", "2")
    result = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "kdistpp.sfd", *args],
                            capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert [int(r["iteration"]) for r in csv.DictReader((run / "loss.csv").open())] == [1, 2]  # one writer
    assert sorted(p.name for p in run.glob("samples_*.png")) == ["samples_000002.png"]
    from safetensors.torch import load_file

    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(state["generators"]) == 2  # each rank's noise stream, for resuming
    lora = load_file(str(run / "student_lora.safetensors"))
    # the LoRA written at the end is the checkpoint's (gathered from the shards), in the hosts' names
    ups = [k for k in lora if k.endswith("lora_up.weight")]
    assert ups and any(float(lora[k].abs().max()) > 0 for k in ups)
    assert sum(1 for k in state["student"] if "lora_" in k) == len(ups) * 2


FLUX_TOKENIZERS = (Path(os.environ.get("KDISTPP_FORGE", SHARED_HOSTS / "forge-dfdcbab")).resolve()
                   / "backend" / "huggingface" / "black-forest-labs" / "FLUX.1-dev")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A tiny random FluxPipeline (CLIP-L and T5 of width 32 and 16, a 1+1-block transformer, a 2-level VAE)
    with the real FLUX.1 tokenizers from the Forge tree, saved with save_pretrained."""
    if not (FLUX_TOKENIZERS / "tokenizer_2" / "tokenizer.json").is_file():
        pytest.skip(f"the FLUX.1 tokenizer files are not at {FLUX_TOKENIZERS}")
    folder = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=32))
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32128, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2))
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.1,
                                  scaling_factor=0.5)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip,
        tokenizer=transformers.CLIPTokenizer.from_pretrained(str(FLUX_TOKENIZERS / "tokenizer")), text_encoder_2=t5,
        tokenizer_2=transformers.T5TokenizerFast.from_pretrained(str(FLUX_TOKENIZERS / "tokenizer_2")),
        transformer=transformer)
    pipe.save_pretrained(str(folder))
    return folder


def test_a_flux_teacher_trains_a_lora_student_and_exports_it(flux_dir, tmp_path, capsys):
    args = ["train", "--teacher", str(flux_dir), "--prompts", str(prompts_file(tmp_path)), "--output",
            str(tmp_path / "run"), "--steps", "3", "--lora-rank", "2", "--iterations", "2", "--batch-size", "2",
            "--resolution", "16", "--samples", "2", "--lr", "1e-2", "--no-progress"]
    assert cli.main(args) == 2  # this transformer is guidance-distilled (Flux-dev): it needs --guidance
    assert "--guidance 3.5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    assert cli.main(args + ["--guidance", "3.5"]) == 0
    run = tmp_path / "run"
    from safetensors.torch import load_file

    embeddings = load_file(str(run / "prompt_embeddings.safetensors"))
    assert embeddings["cond.pooled"].shape == (2, 32) and embeddings["cond.encoder_hidden_states"].shape[-1] == 16
    lora = load_file(str(run / "student_lora.safetensors"))
    assert lora and all(k.startswith("transformer.") for k in lora)  # peft names, as ComfyUI and Forge read Flux LoRAs
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if k.endswith("lora_B.weight"))
    assert (run / "samples_000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "exported.safetensors")]) == 0
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert set(exported) == set(lora) and all(torch.equal(exported[k], lora[k]) for k in lora)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline (two CLIP text encoders of width 16 and 32, the second with
    a projection: SDXL's pooled embedding), saved with save_pretrained."""
    if not (TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"the SD1 tokenizer files are not at {TOKENIZER}")
    folder = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    common = dict(vocab_size=49408, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  max_position_embeddings=77)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(hidden_size=16, projection_dim=16, **common))
    clip_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(hidden_size=32, projection_dim=32,
                                                                                  **common))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, attention_head_dim=8, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=16)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=clip, text_encoder_2=clip_2, tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    pipe.save_pretrained(str(folder))
    return folder


def test_an_sdxl_teacher_with_pooled_embeddings_and_time_ids_trains_at_a_teacher_cfg(sdxl_dir, tmp_path):
    args = train_args(sdxl_dir, tmp_path, "--teacher-cfg", "3.0")
    assert cli.main(args) == 0
    run = tmp_path / "run"
    from safetensors.torch import load_file

    embeddings = load_file(str(run / "prompt_embeddings.safetensors"))
    # SDXL's prompt embedding is both encoders' hidden states side by side; the pooled one is the second's
    assert embeddings["cond.encoder_hidden_states"].shape == (2, 77, 48)
    assert embeddings["cond.pooled"].shape == (2, 32) and embeddings["uncond.pooled"].shape == (1, 32)
    lora = load_file(str(run / "student_lora.safetensors"))
    assert lora and all(k.startswith("lora_unet_") for k in lora)
    assert len(list(csv.DictReader((run / "loss.csv").open()))) == 2


def test_the_embedding_cache_is_reused_only_for_the_same_prompts_and_teacher(tmp_path):
    class CountingPipeline:  # the SD pipelines' encode_prompt signature; counts the prompts it embeds
        def __init__(self):
            self.seen = []

        def encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance):
            self.seen += prompt
            return torch.stack([torch.full((3, 4), float(len(p))) for p in prompt]), None

    pipe, cache = CountingPipeline(), tmp_path / "cache.safetensors"
    first = prompts.cached_embeddings(pipe, ["a cat", "a red dog"], cache, source="teacher A")
    assert pipe.seen == ["a cat", "a red dog", ""]  # the empty prompt too: the uncond of a teacher CFG scale
    assert first["cond.encoder_hidden_states"][:, 0, 0].tolist() == [5.0, 9.0]
    assert first["uncond.encoder_hidden_states"].shape == (1, 3, 4)
    again = prompts.cached_embeddings(pipe, ["a cat", "a red dog"], cache, source="teacher A")
    assert len(pipe.seen) == 3 and torch.equal(again["cond.encoder_hidden_states"], first["cond.encoder_hidden_states"])
    prompts.cached_embeddings(pipe, ["a cat"], cache, source="teacher A")  # other prompts
    prompts.cached_embeddings(pipe, ["a cat"], cache, source="teacher B")  # another teacher
    assert len(pipe.seen) == 3 + 2 + 2


def test_an_sfd_v_run_exports_a_full_unet_per_step_count(teacher_dir, tmp_path, capsys):
    args = train_args(teacher_dir, tmp_path)
    args[args.index("--steps") + 1] = "3,4"
    assert cli.main(args) == 0
    run = tmp_path / "run"
    assert not (run / "student_lora.safetensors").exists()  # a LoRA cannot hold the step embedding
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "--full --steps N" in capsys.readouterr().err
    outputs = []
    for n in (3, 4):
        assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / f"unet{n}"), "--full", "--steps", str(n)]) == 0
        outputs.append(diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / f"unet{n}")).time_embedding.linear_2.bias)
    assert not torch.equal(*outputs)  # each step count's embedding folded in


# Single-file teachers: the weights in one checkpoint file as the hosts load it, the diffusers configs from a
# folder (--teacher-config) that holds no weights of what the file holds, so that a run equal to the folder's
# can only come from the file's weights.

def config_folder(teacher: Path, folder: Path, in_the_file: tuple[str, ...]) -> Path:
    """A copy of the pipeline folder `teacher` without the weights of the components `in_the_file`."""
    import shutil

    def weights(directory, names):
        inside = Path(directory).name in in_the_file and Path(directory).parent == teacher
        return [n for n in names if inside and n.endswith((".safetensors", ".bin"))]

    shutil.copytree(teacher, folder, ignore=weights)
    return folder


def ldm_checkpoint(teacher: Path, path: Path, clip: bool = True) -> Path:
    """The pipeline folder's UNet (and, for SD 1.x, CLIP text encoder) in an A1111 checkpoint's (ldm/sgm) key
    layout, without a VAE: the UNet's names through kdistpp's ldm map, the CLIP's under
    cond_stage_model.transformer.text_model."""
    from safetensors.torch import save_file

    from kdistpp.sfd.export import ldm_unet_path

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(teacher / "unet"))
    state = {}
    for name, value in unet.state_dict().items():
        module, param = name.rsplit(".", 1)
        state[f"model.diffusion_model.{ldm_unet_path(module, unet.config)}.{param}"] = value
    if clip:
        encoder = transformers.CLIPTextModel.from_pretrained(str(teacher / "text_encoder"))
        for name, value in encoder.state_dict().items():  # transformers >= 5 names them without text_model.
            state["cond_stage_model.transformer." + ("" if name.startswith("text_model.") else "text_model.") + name] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def same_runs(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    assert (a / "loss.csv").read_text() == (b / "loss.csv").read_text()
    first, second = (load_file(str(r / "student_lora.safetensors")) for r in (a, b))
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def offline_hub_cache(monkeypatch, cache: Path) -> Path:
    """Hugging Face Hub offline, with `cache` (empty here) as its cache."""
    from huggingface_hub import constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def cache_repository(cache: Path, repo: str, folder: Path) -> None:
    """`folder` as the cached snapshot of the Hub repository `repo` (the cache's own layout)."""
    import shutil

    root = cache / ("models--" + repo.replace("/", "--"))
    shutil.copytree(folder, root / "snapshots" / ("0" * 40))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)


def test_a_single_file_sd_checkpoint_as_teacher_trains_and_exports_as_its_folder(teacher_dir, tmp_path, monkeypatch):
    file = ldm_checkpoint(teacher_dir, tmp_path / "sd15.safetensors")
    configs = config_folder(teacher_dir, tmp_path / "configs", ("unet", "text_encoder"))  # the VAE from here
    assert cli.main(train_args(teacher_dir, tmp_path, run="folder")) == 0
    assert cli.main(train_args(file, tmp_path, "--teacher-config", str(configs), run="file")) == 0
    same_runs(tmp_path / "folder", tmp_path / "file")
    # without --teacher-config: the configs of the repository diffusers infers from the keys (SD 1.5's), from
    # the Hugging Face cache when offline
    cache_repository(offline_hub_cache(monkeypatch, tmp_path / "hub"), "stable-diffusion-v1-5/stable-diffusion-v1-5",
                     configs)
    assert cli.main(train_args(file, tmp_path, run="inferred")) == 0
    same_runs(tmp_path / "folder", tmp_path / "inferred")
    inferred = Path(json.loads((tmp_path / "inferred" / "run.json").read_text())["teacher_config"])
    assert (inferred / "model_index.json").read_text() == (configs / "model_index.json").read_text()
    settings = json.loads((tmp_path / "file" / "run.json").read_text())
    assert (settings["teacher"], settings["teacher_config"]) == (str(file.resolve()), str(configs.resolve()))
    from safetensors.torch import load_file

    # export rebuilds the student on the file's UNet
    assert cli.main(["export", "--run", str(tmp_path / "file"), "--output", str(tmp_path / "exported.safetensors")]) == 0
    exported, lora = (load_file(str(p)) for p in (tmp_path / "exported.safetensors",
                                                   tmp_path / "folder" / "student_lora.safetensors"))
    assert set(exported) == set(lora) and all(torch.equal(exported[k], lora[k]) for k in lora)


SD3_TOKENIZERS = (Path(os.environ.get("KDISTPP_FORGE", SHARED_HOSTS / "forge-dfdcbab")).resolve()
                  / "backend" / "huggingface" / "stabilityai" / "stable-diffusion-3-medium-diffusers")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline (CLIP-L and CLIP-G of width 8, T5 of width 16, a one-block MMDiT,
    a 2-level VAE) with the real SD3 tokenizers from the Forge tree, saved with save_pretrained."""
    if not (SD3_TOKENIZERS / "tokenizer_3" / "tokenizer.json").is_file():
        pytest.skip(f"the SD3 tokenizer files are not at {SD3_TOKENIZERS}")
    folder = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(0)
    common = dict(vocab_size=49408, hidden_size=8, projection_dim=8, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, max_position_embeddings=77)
    clip_l, clip_g = (transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**common)) for _ in "lg")
    t5 = transformers.T5EncoderModel(transformers.T5Config(vocab_size=32128, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                           num_heads=2))
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=16, out_channels=4)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  layers_per_block=1, norm_num_groups=8, sample_size=16, shift_factor=0.1,
                                  scaling_factor=0.5)
    clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(SD3_TOKENIZERS / "tokenizer"))
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=clip_l,
        tokenizer=clip_tokenizer, text_encoder_2=clip_g, tokenizer_2=clip_tokenizer, text_encoder_3=t5,
        tokenizer_3=transformers.T5TokenizerFast.from_pretrained(str(SD3_TOKENIZERS / "tokenizer_3")),
        transformer=transformer)
    pipe.save_pretrained(str(folder))
    return folder


def sd3_args(teacher, tmp_path, *extra, run="run"):
    # alpha 1 at rank 2: a LoRA scale of 1/2, which the file must carry
    return ["train", "--teacher", str(teacher), "--prompts", str(prompts_file(tmp_path)), "--output",
            str(tmp_path / run), "--steps", "3", "--lora-rank", "2", "--lora-alpha", "1", "--iterations", "2",
            "--batch-size", "2", "--resolution", "16", "--samples", "2", "--lr", "1e-2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def sd3_run(sd3_dir, tmp_path_factory):
    """`train` on the SD3 folder: (its output folder, the folder holding its prompts file)."""
    tmp = tmp_path_factory.mktemp("sd3_run")
    assert cli.main(sd3_args(sd3_dir, tmp)) == 0
    return tmp / "run", tmp


def test_an_sd3_teacher_trains_through_the_command_and_its_lora_loads_in_diffusers(sd3_dir, sd3_run, tmp_path):
    from safetensors.torch import load_file

    run, _ = sd3_run
    embeddings = load_file(str(run / "prompt_embeddings.safetensors"))
    # CLIP-L and CLIP-G side by side, padded to T5's width, then T5's tokens; pooled: both CLIPs' projections
    assert embeddings["cond.encoder_hidden_states"].shape == (2, 77 + 256, 16)
    assert embeddings["cond.pooled"].shape == (2, 16) and embeddings["uncond.pooled"].shape == (1, 16)
    rows = list(csv.DictReader((run / "loss.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [1, 2] and all(float(r["loss"]) > 0 for r in rows)
    assert (run / "samples_000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lora = load_file(str(run / "student_lora.safetensors"))
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "exported.safetensors")]) == 0
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert set(exported) == set(lora) and all(torch.equal(exported[k], lora[k]) for k in lora)

    # diffusers' own LoRA loader on the teacher pipeline gives the student: the merged network `export --full` writes
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "full"), "--full"]) == 0
    student = diffusers.SD3Transformer2DModel.from_pretrained(str(tmp_path / "full")).eval()
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(sd3_dir))
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([300.0, 700.0]),
                  encoder_hidden_states=torch.randn(2, 7, 16, generator=g), pooled_projections=torch.randn(2, 16, generator=g))
    with torch.no_grad():
        teacher = pipe.transformer(**inputs).sample
        pipe.load_lora_weights(str(run / "student_lora.safetensors"))
        loaded, ours = pipe.transformer(**inputs).sample, student(**inputs).sample
    tolerance = 1e-5 * float(ours.abs().max())
    assert float((teacher - ours).abs().max()) > 20 * tolerance  # the trained LoRA moves the output
    assert torch.allclose(loaded, ours, rtol=0, atol=tolerance), float((loaded - ours).abs().max())


def test_export_writes_an_sd3_lora_in_kohyas_format_with_the_same_weight_deltas(sd3_run, tmp_path, capsys):
    """`export --format kohya` (Forge's SD3 format): MMDiT names, q, k, v as one LoRA on the fused qkv. Each
    layer's alpha / rank * up @ down equals what the diffusers-format file adds to the same weights."""
    from safetensors.torch import load_file

    run, _ = sd3_run
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "kohya.safetensors"), "--format",
                     "kohya"]) == 0
    kohya = load_file(str(tmp_path / "kohya.safetensors"))
    peft = load_file(str(run / "student_lora.safetensors"))

    def kohya_delta(name):
        key = f"lora_unet_joint_blocks_0_{name}"
        rank = kohya[f"{key}.lora_down.weight"].shape[0]
        return float(kohya[f"{key}.alpha"]) / rank * kohya[f"{key}.lora_up.weight"] @ kohya[f"{key}.lora_down.weight"]

    def peft_delta(module):  # no alpha: the scale is in lora_B
        key = f"transformer.transformer_blocks.0.attn.{module}"
        return peft[f"{key}.lora_B.weight"] @ peft[f"{key}.lora_A.weight"]

    assert len(kohya) == 6 and all(k.startswith("lora_unet_joint_blocks_0_x_block_attn_") for k in kohya)
    fused = torch.cat([peft_delta(m) for m in ("to_q", "to_k", "to_v")])
    assert torch.allclose(kohya_delta("x_block_attn_qkv"), fused, atol=1e-7 * float(fused.abs().max()))
    proj = peft_delta("to_out.0")
    assert float(fused.abs().max()) > 0 and float(proj.abs().max()) > 0  # trained: the deltas are not peft's zeros
    assert torch.allclose(kohya_delta("x_block_attn_proj"), proj, atol=1e-7 * float(proj.abs().max()))
    assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "full"), "--full", "--format", "kohya"]) == 2
    assert "--format is the key format of a LoRA file" in capsys.readouterr().err


def test_export_refuses_a_lora_file_it_cannot_write_before_loading_the_teacher_or_checkpoint(
        teacher_dir, sd3_dir, flux_dir, tmp_path, monkeypatch, capsys):
    """Refusals that run.json, the arguments and the teacher's network class (or an empty skeleton of its
    config) decide: made before the teacher's network or checkpoint.pt is read."""
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before refusing")

    monkeypatch.setattr(cli, "load_network", no_loading)
    monkeypatch.setattr(torch, "load", no_loading)

    def refused(teacher, message, *extra, **settings):
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        (run / "run.json").write_text(json.dumps({"teacher": str(teacher), "teacher_config": None, "steps": "3",
                                                  "lora_rank": 2, "lora_alpha": None, **settings}))
        (run / "checkpoint.pt").write_bytes(b"")
        assert cli.main(["export", "--run", str(run), "--output", str(tmp_path / "x.safetensors"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x.safetensors").exists()

    refused(teacher_dir, "UNet2DConditionModel student's LoRA is written in kohya (diffusers, ComfyUI, A1111 and "
            "Forge load it), not in diffusers keys", "--format", "diffusers")
    refused(flux_dir, "FluxTransformer2DModel student's LoRA is written in diffusers (diffusers, ComfyUI load it), "
            "not in kohya keys", "--format", "kohya")
    refused(teacher_dir, "fine-tuned the whole network (--lora-rank 0): export it with --full", lora_rank=0)
    refused(sd3_dir, "fine-tuned the whole network (--lora-rank 0): export it with --full", "--format", "kohya",
            lora_rank=0)
    # a module kohya's SD3 format has no name for, found on the config's skeleton
    refused(sd3_dir, "no MMDiT module for the SD3 module 'pos_embed.proj'", "--format", "kohya",
            lora_targets=["to_q", "pos_embed.proj"])


def test_an_sd3_transformer_file_as_teacher_trains_as_its_folder(sd3_dir, sd3_run, tmp_path):
    """A transformer alone in one file (as ComfyUI's diffusion_models hold one; here in diffusers' layout), the
    text encoders, tokenizers and VAE from the config folder."""
    import shutil

    file = tmp_path / "sd3_transformer.safetensors"
    shutil.copy(sd3_dir / "transformer" / "diffusion_pytorch_model.safetensors", file)
    configs = config_folder(sd3_dir, tmp_path / "configs", ("transformer",))
    run, prompts_dir = sd3_run
    args = sd3_args(file, tmp_path, "--teacher-config", str(configs), run="file")
    args[args.index("--prompts") + 1] = str(prompts_dir / "prompts.txt")  # the folder run's prompts file
    assert cli.main(args) == 0
    same_runs(run, tmp_path / "file")
    from safetensors.torch import load_file

    # export rebuilds the student on the file's transformer
    assert cli.main(["export", "--run", str(tmp_path / "file"), "--output", str(tmp_path / "exported.safetensors")]) == 0
    exported, lora = (load_file(str(p)) for p in (tmp_path / "exported.safetensors", run / "student_lora.safetensors"))
    assert set(exported) == set(lora) and all(torch.equal(exported[k], lora[k]) for k in lora)


def test_single_file_teachers_bad_input_is_refused_before_any_training(teacher_dir, sd3_dir, tmp_path, capsys,
                                                                        monkeypatch):
    def refused(teacher, message, *extra):
        assert cli.main(train_args(teacher, tmp_path, *extra)) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run" / "checkpoint.pt").exists()

    file = ldm_checkpoint(teacher_dir, tmp_path / "sd15.safetensors")
    offline_hub_cache(monkeypatch, tmp_path / "hub")  # offline, and the inferred repository is not in the cache
    refused(file, "pass --teacher-config FOLDER")
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
    refused(file, "--teacher-config", "--teacher-config", str(tmp_path / "missing"))
    refused(file, "not a diffusers model folder", "--teacher-config", str(tmp_path))
    refused(teacher_dir, "--teacher-config is for a single-file --teacher", "--teacher-config", str(teacher_dir))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    refused(junk, "not a checkpoint file", "--teacher-config", str(teacher_dir))
    notes = tmp_path / "notes.txt"
    notes.write_text("a prompt\n")
    refused(notes, "not a checkpoint file", "--teacher-config", str(teacher_dir))
    # the wrong architecture: an SD checkpoint with SD3 configs, an SD3 transformer with SD 1.x configs
    refused(file, "does not hold a", "--teacher-config", str(sd3_dir))
    refused(sd3_dir / "transformer" / "diffusion_pytorch_model.safetensors", "does not hold a", "--teacher-config",
            str(teacher_dir))
    # a text encoder lacking a tensor (which diffusers would leave uninitialised)
    from safetensors.torch import load_file, save_file

    state = load_file(str(file))
    del state[next(k for k in state if k.endswith("final_layer_norm.weight"))]
    save_file(state, str(tmp_path / "incomplete.safetensors"))
    refused(tmp_path / "incomplete.safetensors", "no weights for 1 tensors", "--teacher-config", str(teacher_dir))
    # the file has no VAE, nor has the config folder
    refused(file, "holds no vae", "--teacher-config", str(config_folder(teacher_dir, tmp_path / "configs", ("vae",))))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_sdxl_and_flux_single_files_load_as_their_folders(family, request, tmp_path):
    """An SDXL UNet in the sgm layout and a Flux transformer file (diffusers' layout) give the folder's pipeline;
    the text encoders and VAE, which the files lack, come from the config folder."""
    import shutil

    from kdistpp.sfd.teacher import check_teacher, load_network, load_pipeline

    teacher = request.getfixturevalue(f"{family}_dir")
    name = "unet" if family == "sdxl" else "transformer"
    file = tmp_path / f"{family}.safetensors"
    if family == "sdxl":
        ldm_checkpoint(teacher, file, clip=False)  # the SDXL UNet alone, in the sgm layout
    else:
        shutil.copy(teacher / name / "diffusion_pytorch_model.safetensors", file)
    source = check_teacher(str(file), str(config_folder(teacher, tmp_path / "configs", (name,))))
    ours = load_pipeline(source)
    theirs = diffusers.DiffusionPipeline.from_pretrained(str(teacher))
    assert type(ours) is type(theirs)
    for component in (name, "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, component).state_dict(), getattr(theirs, component).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), component
    network = load_network(source).state_dict()  # export's path
    assert all(torch.equal(network[k], v) for k, v in getattr(theirs, name).state_dict().items())


def test_a_ckpt_file_with_a_state_dict_loads_as_its_folder(teacher_dir, tmp_path):
    """The older .ckpt container (torch.save of {"state_dict": ...}), read with weights_only as diffusers reads it."""
    from safetensors.torch import load_file

    from kdistpp.sfd.teacher import check_teacher, load_pipeline

    state = load_file(str(ldm_checkpoint(teacher_dir, tmp_path / "sd15.safetensors")))
    torch.save({"state_dict": state}, tmp_path / "sd15.ckpt")
    configs = config_folder(teacher_dir, tmp_path / "configs", ("unet", "text_encoder"))
    ours = load_pipeline(check_teacher(str(tmp_path / "sd15.ckpt"), str(configs)))
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(str(teacher_dir))
    for component in ("unet", "text_encoder"):
        a, b = getattr(ours, component).state_dict(), getattr(theirs, component).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b), component
