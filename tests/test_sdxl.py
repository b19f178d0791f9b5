"""SDXL through every command, conditioned exactly as diffusers' own SDXL pipeline conditions it;
and an SD 2.x v-prediction pipeline through the same flow.

The commands run in this process (`run`), as the installed command would run them, as test_cli.py's
flows do too. What only a fresh process shows stays in one here (`cli`, and the plain-diffusers check)."""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from amnesia_sd.core.errors import UserError
from amnesia_sd.model import families
from amnesia_sd.model.families import FAMILIES, family_of_keys
from helpers import ENV, EXE, run_command

QUICK = ["--num-inference-steps", "2", "--batch-size", "4"]
XL = FAMILIES["sdxl"]


def cli(*args, cwd, code=0):
    """The installed `amnesia-sd` command, in a process of its own: for what only a fresh process
    shows (the exact stderr a user sees)."""
    done = subprocess.run([EXE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == code, done.stderr
    return done


def run(*args, cwd, code=0):
    """The same command, run in this process (see helpers.run_command): the same files, output and
    exit code, without starting Python and importing torch and diffusers again (~6 s a command)."""
    return run_command(*args, cwd=cwd, code=code)


def load_xl(path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_conditioning_is_what_the_sdxl_pipeline_builds(tiny_sdxl_model):
    pipe = load_xl(tiny_sdxl_model)
    prompts = ["a photo of brad pitt", "a dog in a house"]
    ours = XL.encode_text(pipe, prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    assert ours["encoder_hidden_states"].shape == (2, 16, 64)  # both encoders' 32 wide, side by side
    torch.testing.assert_close(ours["encoder_hidden_states"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["text_embeds"], pooled, rtol=0, atol=0)
    for micro in (XL.micro_conditioning(16), XL.micro_conditioning(16, original=(40, 30), crop=(0, 7))):
        expected = pipe._get_add_time_ids(micro["original_size"], micro["crops_coords_top_left"],
                                          micro["target_size"], torch.float32, text_encoder_projection_dim=24)
        torch.testing.assert_close(XL.image_conditioning(micro)["time_ids"][None], expected, rtol=0, atol=0)


def digest(path: Path) -> dict:
    """SHA-256 of every file under a folder, by relative path; JSON files by their content, less what
    diffusers and transformers add when they save a loaded component again (where it came from)."""
    def content(p: Path) -> bytes:
        if p.suffix != ".json":
            return p.read_bytes()
        data = {k: v for k, v in json.loads(p.read_text()).items() if k not in ("_name_or_path", "is_local", "local_files_only")}
        return json.dumps(data, sort_keys=True).encode()

    return {str(p.relative_to(path)): hashlib.sha256(content(p)).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


PLAIN_DIFFUSERS_CHECK = textwrap.dedent("""
    import sys, torch
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline
    sys.stdin.readline()  # started early (conftest's early_python): on once the test has made the result
    base = StableDiffusionXLPipeline.from_pretrained(sys.argv[1])
    out = StableDiffusionXLPipeline.from_pretrained(sys.argv[2])
    auto = AutoPipelineForText2Image.from_pretrained(sys.argv[2])
    assert "amnesia_sd" not in sys.modules and type(auto).__name__ == "StableDiffusionXLPipeline"
    assert out.config.force_zeros_for_empty_prompt is True
    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not same(base.unet, out.unet) and same(out.unet, auto.unet)
    for part in ("vae", "text_encoder", "text_encoder_2"):
        assert same(getattr(base, part), getattr(out, part)), part
    assert base.tokenizer_2.get_vocab() == out.tokenizer_2.get_vocab()
    assert dict(base.scheduler.config) == dict(out.scheduler.config)
    for pipe in (out, auto):
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a photo of brad pitt", num_inference_steps=2, output_type="np").images
        assert image.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(image)).all()
    print("PLAIN-DIFFUSERS-OK")
""")


def replay_and_fim(model, cwd, images: int, timesteps: int) -> None:
    """`replay` into cwd/replay, then `fim` over it into cwd/fim.safetensors."""
    run("replay", "--model", str(model), "--output-dir", "replay", "--num-images", str(images), *QUICK, cwd=cwd)
    run("fim", "--model", str(model), "--replay-dir", "replay", "--output", "fim.safetensors", "--num-timesteps",
        str(timesteps), cwd=cwd)


@pytest.fixture(scope="module")
def sdxl_replay_fim(tiny_sdxl_model, tmp_path_factory):
    """One SDXL replay set (4 images) and its Fisher (4 timesteps), made by the commands once for the
    tests of this module, which only read them: DIR/replay and DIR/fim.safetensors."""
    root = tmp_path_factory.mktemp("xl-sets")
    replay_and_fim(tiny_sdxl_model, root, images=4, timesteps=4)
    return root


def test_sdxl_flow_replay_fim_surrogate_forget_sample_eval(tiny_sdxl_model, sdxl_replay_fim, tmp_path, early_python):
    model, sets = str(tiny_sdxl_model), sdxl_replay_fim  # replay and fim: the module's (4 images, 4 timesteps)
    plain_diffusers_check = early_python(PLAIN_DIFFUSERS_CHECK, model, tmp_path / "out")
    run("surrogate", "--model", model, "--prompt", "a middle aged man", "--output-dir", "surrogate",
        "--num-images", "4", *QUICK, cwd=tmp_path)
    done = run("forget", "--model", model, "--concept", "Brad Pitt", "--surrogate-dir", "surrogate",
               "--replay-dir", sets / "replay", "--fim", sets / "fim.safetensors", "--output-dir", "out",
               "--max-train-steps", "2", "--train-batch-size", "2", "--learning-rate", "1e-3", *QUICK, cwd=tmp_path)
    assert "StableDiffusionXLPipeline.from_pretrained" in done.stdout
    run("sample", "--model", "out", "--prompt", "a photo of brad pitt", "--num-images", "2", "--output-dir",
        "samples", "--compare", model, *QUICK, cwd=tmp_path)
    run("eval", "--model", "out", "--output-dir", "report", "--concept", "nudity, naked", "--num-images", "1",
        "--num-inference-steps", "2", "--clip-model", "nonexistent-org/no-clip", cwd=tmp_path)

    # Image sets made at SDXL's native size record the micro-conditioning they were made with, and
    # carry each image's time ids.
    manifest = json.loads((sets / "replay" / "manifest.json").read_text())
    assert manifest["architecture"] == "sdxl" and manifest["resolution"] == 16  # the tiny UNet's native size
    assert manifest["micro_conditioning"] == {"original_size": [16, 16], "crops_coords_top_left": [0, 0],
                                              "target_size": [16, 16]}
    with safe_open(str(tmp_path / "surrogate" / "latents.safetensors"), "pt") as f:
        assert f.get_tensor("time_ids").tolist() == [[16, 16, 0, 0, 16, 16]] * 4
    with safe_open(str(sets / "fim.safetensors"), "pt") as f:
        assert f.metadata()["architecture"] == "sdxl"
        assert {k for k in f.keys() if k.startswith("add_embedding.")}  # the added-condition embedding too
    record = json.loads((tmp_path / "out" / "amnesia.json").read_text())
    assert record["architecture"] == "sdxl" and record["pipeline_class"] == "StableDiffusionXLPipeline"
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Stable Diffusion XL pipeline" in card and "StableDiffusionXLPipeline.from_pretrained" in card
    # Only the UNet differs from the base, file for file.
    base, out = digest(tiny_sdxl_model), digest(tmp_path / "out")
    for name, sha in base.items():
        if name.startswith("unet/") and name.endswith(".safetensors"):
            assert out[name] != sha, name
        elif name != "model_index.json":
            assert out[name] == sha, name
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    assert len(list((tmp_path / "samples" / "images").iterdir())) == 2 and (tmp_path / "samples" / "compare.png").is_file()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert all(e["images"] for e in report["sets"].values())

    check = plain_diffusers_check()  # a fresh interpreter, without amnesia_sd
    assert "PLAIN-DIFFUSERS-OK" in check.stdout, check.stderr


def test_training_conditions_like_the_pipeline(tiny_sdxl_model, sdxl_replay_fim, tmp_path, monkeypatch):
    """Every row the UNet sees in training: the pipeline's own embeddings of the concept prompt (on a
    surrogate image) or of the replay image's prompt, and the time ids the pipeline used to make it."""
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.commands.forget import forget
    from amnesia_sd.data.imageset import load_image_set

    model = str(tiny_sdxl_model)
    # The user's own surrogate images, not square: SDXL is told their original size and the crop.
    from PIL import Image

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (24, 40), (200, 30, 30)).save(tmp_path / "photos" / "tall.png")
    Image.new("RGB", (48, 16), (30, 200, 30)).save(tmp_path / "photos" / "wide.png")
    seen = []
    real = families.StableDiffusionXL.predict
    monkeypatch.setattr(families.StableDiffusionXL, "predict",  # (the memory plan's meta-device forwards aside)
                        lambda self, unet, x, t, cond: real(self, unet, x, t, cond) if x.is_meta else seen.append(
                            {k: v.detach().clone() for k, v in cond.items()}) or real(self, unet, x, t, cond))
    forget(ForgetConfig(model=model, concept="Brad Pitt", surrogate_images=str(tmp_path / "photos"),
                        replay_dir=str(sdxl_replay_fim / "replay"), fim=str(sdxl_replay_fim / "fim.safetensors"),
                        output_dir=str(tmp_path / "out"), max_train_steps=2, train_batch_size=2,
                        num_inference_steps=2, checkpointing_steps=100))
    pipe = load_xl(tiny_sdxl_model)
    replay = load_image_set(sdxl_replay_fim / "replay")
    record = json.loads((tmp_path / "out" / "amnesia.json").read_text())

    def embeds(prompt):
        e, _, p, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        return e[0], p[0]

    def time_ids(original, crop):
        return pipe._get_add_time_ids(original, crop, (16, 16), torch.float32, text_encoder_projection_dim=24)[0]

    concept = [embeds(p) for p in record["concept_prompts"]]
    replays = [(embeds(p), time_ids((16, 16), (0, 0))) for p in replay.prompts]
    # tall 24x40 -> 16x27, crop top 5; wide 48x16 -> 48x16, crop left 16 (sorted: tall, wide)
    photos = [time_ids((40, 24), (5, 0)), time_ids((16, 48), (0, 16))]
    def close(a, b):  # one prompt alone or in a batch: float sums in another order
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    assert len(seen) == 2
    for cond in seen:
        rows = list(zip(cond["encoder_hidden_states"], cond["text_embeds"], cond["time_ids"]))
        for i, (h, p, ids) in enumerate(rows):
            if i < 2:  # the surrogate half: a concept prompt on a user image
                assert any(close(h, ch) and close(p, cp) for ch, cp in concept)
                assert any(torch.equal(ids, t) for t in photos)
            else:
                assert any(close(h, rh) and close(p, rp) and torch.equal(ids, t) for (rh, rp), t in replays)


def test_architecture_mismatch_is_refused(tiny_sdxl_model, tiny_model, tmp_path):
    """A Fisher (or image set) made for one architecture is refused for another, before training."""
    run("replay", "--model", str(tiny_model), "--output-dir", "sd-replay", "--num-images", "2", *QUICK, cwd=tmp_path)
    run("fim", "--model", str(tiny_model), "--replay-dir", "sd-replay", "--output", "sd-fim.safetensors",
        "--num-timesteps", "2", cwd=tmp_path)
    done = cli("forget", "--model", str(tiny_sdxl_model), "--concept", "Brad Pitt", "--surrogate", "a man",
               "--replay-dir", "sd-replay", "--fim", "sd-fim.safetensors", "--output-dir", "out", *QUICK,
               cwd=tmp_path, code=2)
    assert done.stderr.strip().splitlines() == [
        "error: Fisher file sd-fim.safetensors was made for a Stable Diffusion 1.x/2.x model "
        f"({Path(tiny_model).resolve()}), this model is Stable Diffusion XL: run `amnesia-sd fim` for this one"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_family_of_single_file_checkpoints_and_unsupported_pipelines(tmp_path):
    assert family_of_keys(["model.diffusion_model.x", "cond_stage_model.transformer.y"]).name == "sd"
    assert family_of_keys(["model.diffusion_model.x", "conditioner.embedders.0.transformer.a",
                           "conditioner.embedders.1.model.b"]).name == "sdxl"
    with pytest.raises(UserError, match="SDXL refiner"):
        family_of_keys(["conditioner.embedders.0.model.b"])
    assert family_of_keys(["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]).name == "sd3"
    assert family_of_keys(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]).name == "flux"
    assert families.family_of_index({"_class_name": "FluxPipeline", "transformer": []}, "m").name == "flux"
    assert families.family_of_index({"_class_name": "StableDiffusion3Pipeline", "transformer": []}, "m").name == "sd3"
    for index, message in (({"_class_name": "FluxFillPipeline", "transformer": []}, "is a FluxFillPipeline"),
                           ({"_class_name": "StableDiffusion3Pipeline"}, "is a StableDiffusion3Pipeline"),
                           ({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True,
                             "text_encoder_2": []}, "is an SDXL refiner")):
        with pytest.raises(UserError, match=message + ".*amnesia-sd takes Stable Diffusion 1.x/2.x, SDXL base, SD 3"):
            families.family_of_index(index, "m")


def test_exported_checkpoints_are_told_apart_by_their_tensor_names(tiny_model, tiny_sdxl_model, tmp_path):
    """What `--model file.safetensors` loads with: SDXL's pipeline for an SDXL checkpoint, SD's for SD's."""
    from amnesia_sd.commands.export import ExportConfig, export
    from amnesia_sd.model.families import detect_family

    for model, name in ((tiny_model, "sd"), (tiny_sdxl_model, "sdxl")):
        path = export(ExportConfig(model=str(model), output=str(tmp_path / f"{name}.safetensors")))
        assert detect_family("file", str(path)).name == name


def test_train_methods_on_the_sdxl_unet(tiny_sdxl_model):
    from diffusers import UNet2DConditionModel

    from amnesia_sd.model.trainable import trainable_names

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_model, subfolder="unet")
    names = [n for n, _ in unet.named_parameters()]
    xattn, noxattn = trainable_names(unet, "xattn"), set(trainable_names(unet, "noxattn"))
    assert xattn and all(".attn2." in n for n in xattn)
    frozen = set(names) - noxattn
    assert {n.split(".")[0] for n in frozen - set(xattn)} == {"time_embedding", "add_embedding", "conv_norm_out",
                                                              "conv_out"}
    assert any(n.startswith("add_embedding.") for n in names)


def test_sd2_v_prediction_flow(tiny_vpred_model, tmp_path):
    model = str(tiny_vpred_model)
    replay_and_fim(model, tmp_path, images=4, timesteps=4)
    run("forget", "--model", model, "--concept", "Brad Pitt", "--surrogate", "a middle aged man",
        "--num-surrogate-images", "4", "--replay-dir", "replay", "--fim", "fim.safetensors", "--output-dir", "out",
        "--max-train-steps", "2", "--train-batch-size", "2", *QUICK, cwd=tmp_path)
    run("sample", "--model", "out", "--prompt", "a photo of brad pitt", "--num-images", "1", "--output-dir",
        "samples", *QUICK, cwd=tmp_path)
    run("eval", "--model", "out", "--output-dir", "report", "--concept", "nudity, naked", "--num-images", "1",
        "--num-inference-steps", "2", "--clip-model", "nonexistent-org/no-clip", cwd=tmp_path)
    with safe_open(str(tmp_path / "fim.safetensors"), "pt") as f:
        assert f.metadata()["prediction_type"] == "v_prediction"
    record = json.loads((tmp_path / "out" / "amnesia.json").read_text())
    assert record["architecture"] == "sd" and record["fim"]["metadata"]["prediction_type"] == "v_prediction"
    from diffusers import StableDiffusionPipeline

    out = StableDiffusionPipeline.from_pretrained(tmp_path / "out")
    assert out.scheduler.config.prediction_type == "v_prediction"
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_docs_memory_table_is_what_the_preflight_computes(monkeypatch, capsys):
    """docs/families.md's SDXL memory and parameter tables, and the per-GPU FSDP table, come from
    benchmarks/memory.py, which uses forget's own memory_parts, trainable_names and training_peak on
    the real SDXL base, SD v1.4 UNet and FLUX.1 transformer configs."""
    import runpy

    root = Path(__file__).resolve().parent.parent
    # `python memory.py` in benchmarks/, run in this process: the script only computes (UNets on the
    # meta device) and prints, so a process of its own would only add Python's and torch's start.
    monkeypatch.chdir(root / "benchmarks")
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    monkeypatch.setattr(sys, "argv", ["memory.py"])
    capsys.readouterr()
    runpy.run_path("memory.py", run_name="__main__")
    plan = json.loads(capsys.readouterr().out)
    readme = (root / "docs" / "families.md").read_text()
    sd14, sdxl = plan["sd14"]["before_activations"], plan["sdxl"]["before_activations"]
    assert plan["sdxl"]["unet_parameters"] == 2_567_463_684
    for method in ("full", "noxattn", "xattn"):
        assert f"| `{method}` | {sd14[method]['trained_parameters']:,} | {sdxl[method]['trained_parameters']:,} |" in readme
        gb = [sdxl[method][s]["gb"] for s in ("fp32 Fisher, AdamW", "bf16 Fisher, AdamW", "bf16 Fisher, 8-bit AdamW")]
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{method}` | {gb[0]} ("))
        assert [float(cell.split()[0]) for cell in row.strip("|").split("|")[1:]] == gb, row
    # The per-GPU table of full-weight forgetting under FSDP, in the README and docs/multi-gpu.md.
    for page in (root / "README.md", root / "docs" / "multi-gpu.md"):
        lines = page.read_text().splitlines()
        for model, title in (("sdxl", "SDXL base UNet"), ("flux1_dev", "FLUX.1-dev transformer")):
            for stored, label in (("fp32", "fp32"), ("bf16", "`--fim-dtype bf16`")):
                row = next(line for line in lines if line.startswith(f"| {title}") and f"| {label} |" in line)
                peaks = plan["fsdp"][model]["per_gpu_peak_gb"][f"{stored} Fisher, AdamW"]
                assert [float(c) for c in row.strip("|").split("|")[2:]] == [peaks[g] for g in ("1", "2", "4", "8")], row


def test_lora_forgetting_on_sdxl_loads_in_plain_diffusers(tiny_sdxl_model, sdxl_replay_fim, tmp_path):

    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.commands.forget import forget

    out = forget(ForgetConfig(model=str(tiny_sdxl_model), concept="Brad Pitt", surrogate="a middle aged man",
                              num_surrogate_images=2, replay_dir=str(sdxl_replay_fim / "replay"),
                              fim=str(sdxl_replay_fim / "fim.safetensors"), output_dir=str(tmp_path / "lora"), lora_rank=2,
                              max_train_steps=2, train_batch_size=2, learning_rate=1e-2, num_inference_steps=2))
    assert json.loads((out / "amnesia.json").read_text())["pipeline_class"] == "StableDiffusionXLPipeline"
    pipe = load_xl(tiny_sdxl_model)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for k in changed)
    image = pipe("a photo of brad pitt", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_unconditional_replay_is_refused_on_sdxl_before_any_work(tiny_sdxl_model, tmp_path):
    """SDXL samples its unconditional branch from zero embeddings, not from the empty prompt: a replay
    of the empty prompt would not hold it, so the flag is refused, with nothing made."""
    for args in (["replay", "--output-dir", "r"],
                 ["forget", "--concept", "brad pitt", "--surrogate", "a man", "--output-dir", "o"]):
        result = run_command(*args, "--model", str(tiny_sdxl_model), "--unconditional-replay", "0.1", cwd=tmp_path,
                             code=2)
        assert ("--unconditional-replay is not supported on this Stable Diffusion XL pipeline: it has "
                "force_zeros_for_empty_prompt=True") in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_unconditional_replay_is_accepted_on_sdxl_saved_without_zeroed_empty_prompt(tiny_sdxl_model, tmp_path):
    """With force_zeros_for_empty_prompt=False in model_index.json (what the refusal suggests), the SDXL
    pipeline's unconditional branch is the encoded empty prompt, as in SD 1.x, so the flag is accepted."""
    copy = Path(shutil.copytree(tiny_sdxl_model, tmp_path / "sdxl"))
    index = json.loads((copy / "model_index.json").read_text())
    (copy / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    default, unzeroed = load_xl(tiny_sdxl_model), load_xl(copy)
    with pytest.raises(UserError, match="force_zeros_for_empty_prompt=False"):
        families.check_unconditional_replay(XL, default, 0.1)
    families.check_unconditional_replay(XL, unzeroed, 0.1)
    families.check_unconditional_replay(XL, default, None)  # without the flag nothing is checked
    # what the replay of "" trains is what this pipeline's unconditional branch samples from
    _, negative, _, negative_pooled = unzeroed.encode_prompt("a photo of brad pitt", device="cpu")
    empty = XL.encode_text(unzeroed, [""])
    assert torch.equal(negative, empty["encoder_hidden_states"])
    assert torch.equal(negative_pooled, empty["text_embeds"])
