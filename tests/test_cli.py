"""The whole flow through the `amnesia-sd` commands, and the result in plain diffusers.

The flows run each command in this process (helpers.run_command: the same app the installed
entry point calls, which only sets TOKENIZERS_PARALLELISM, as conftest does), without starting
Python and importing torch and diffusers again for each (~5 s a command). What only a process of
its own shows stays in one: the installed command's exit code and stderr on bad input, and the
result loaded by plain diffusers in a fresh interpreter without amnesia_sd."""

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

from helpers import ENV, EXE, run_command

QUICK = ["--num-inference-steps", "3", "--batch-size", "4"]
# make_grid's layout (amnesia_sd/grid.py): 2-pixel gaps, a 14-pixel label strip on top when there are
# column labels, and the tiny model's 16-pixel images enlarged to 64 (nearest neighbour).
PAD, LABELS, CELL = 2, 14, 64


def grid_size(rows: int, cols: int, labels: bool) -> tuple[int, int]:
    return cols * (CELL + PAD) + PAD, (LABELS if labels else 0) + rows * (CELL + PAD) + PAD


def grid_cell(grid: Image.Image, row: int, col: int, labels: bool) -> Image.Image:
    x, y = PAD + col * (CELL + PAD), (LABELS if labels else 0) + PAD + row * (CELL + PAD)
    return grid.crop((x, y, x + CELL, y + CELL))


def same_image(cell: Image.Image, png: Path) -> bool:
    enlarged = Image.open(png).convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST)
    return np.array_equal(np.asarray(cell), np.asarray(enlarged))


def cli(*args, cwd):
    done = subprocess.run([EXE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


PLAIN_DIFFUSERS_CHECK = textwrap.dedent("""
    import sys, torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    sys.stdin.readline()  # started early (conftest's early_python): on once the test has made the result
    base = StableDiffusionPipeline.from_pretrained(sys.argv[1])
    out = StableDiffusionPipeline.from_pretrained(sys.argv[2])
    unet = UNet2DConditionModel.from_pretrained(sys.argv[2], subfolder="unet")
    assert "amnesia_sd" not in sys.modules
    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not same(base.unet, out.unet), "UNet unchanged"
    assert same(out.unet, unet)
    assert same(base.vae, out.vae) and same(base.text_encoder, out.text_encoder)
    assert base.tokenizer.get_vocab() == out.tokenizer.get_vocab()
    assert dict(base.scheduler.config) == dict(out.scheduler.config)
    image = out("a photo of brad pitt", num_inference_steps=2, output_type="np").images
    assert image.shape[0] == 1
    print("PLAIN-DIFFUSERS-OK")
""")


def test_flow_replay_fim_surrogate_forget_sample(tiny_model, tmp_path, early_python):
    model = str(tiny_model)
    plain_diffusers_check = early_python(PLAIN_DIFFUSERS_CHECK, model, tmp_path / "out")
    run_command("replay", "--model", model, "--output-dir", "replay", "--num-images", "6", *QUICK, cwd=tmp_path)
    run_command("fim", "--model", model, "--replay-dir", "replay", "--output", "fim.safetensors",
                "--num-timesteps", "10", "--timestep-batch-size", "5", cwd=tmp_path)
    run_command("surrogate", "--model", model, "--prompt", "a middle aged man", "--output-dir", "surrogate",
                "--num-images", "4", *QUICK, cwd=tmp_path)
    run_command("forget", "--model", model, "--concept", "Brad Pitt", "--surrogate-dir", "surrogate",
                "--replay-dir", "replay", "--fim", "fim.safetensors", "--output-dir", "out", "--max-train-steps", "3",
                "--train-batch-size", "2", "--learning-rate", "1e-3", *QUICK, cwd=tmp_path)
    prompts = ["--prompt", "a photo of brad pitt", "--prompt", "a dog", "--num-images", "2", "--seed", "3", *QUICK]
    run_command("sample", "--model", "out", *prompts, "--output-dir", "samples", "--compare", model, cwd=tmp_path)
    run_command("sample", "--model", model, *prompts, "--output-dir", "base-alone", cwd=tmp_path)

    # The Fisher: one fp32 tensor per UNet parameter, same names and shapes, with metadata.
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    with safe_open(str(tmp_path / "fim.safetensors"), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
        params = dict(unet.named_parameters())
        assert keys == set(params)
        for k in keys:
            t = f.get_tensor(k)
            assert t.shape == params[k].shape and t.dtype.is_floating_point and (t >= 0).all()
    assert meta["num_samples"] == "6" and meta["num_timesteps"] == "10" and meta["prediction_type"] == "epsilon"
    assert meta["base_model"] == str(Path(model).resolve()) and len(meta["unet_config_hash"]) == 16

    out = tmp_path / "out"
    record = json.loads((out / "amnesia.json").read_text())
    assert record["concepts"] == ["Brad Pitt"] and record["steps"] == 3
    assert "a photo of Brad Pitt" in record["concept_prompts"]
    assert record["settings"]["lambda_ewc"] == 50.0 and record["versions"]["diffusers"]
    # Trained on the set that `amnesia-sd surrogate` made, not on one of its own.
    assert record["surrogate_set"] == str((tmp_path / "surrogate").resolve())
    assert record["replay_set"] == str((tmp_path / "replay").resolve())
    assert not (out / "data" / "surrogate").exists()
    assert "Brad Pitt" in (out / "README.md").read_text()
    assert not list(out.rglob("*.bin")) and list(out.rglob("*.safetensors"))
    # sample --compare: both models' images on the same seeds, the base's exactly as the base alone
    # draws them, and the grids of what make_grid lays out (amnesia_sd/grid.py).
    samples = tmp_path / "samples"
    names = ["p000_s000.png", "p000_s001.png", "p001_s000.png", "p001_s001.png"]
    for folder in ("images", "base"):
        assert sorted(p.name for p in (samples / folder).iterdir()) == names
        assert {Image.open(samples / folder / n).size for n in names} == {(16, 16)}  # the tiny model's size
    assert sorted(p.name for p in (tmp_path / "base-alone" / "images").iterdir()) == names
    for n in names:
        assert (samples / "base" / n).read_bytes() == (tmp_path / "base-alone" / "images" / n).read_bytes(), n
    assert any((samples / "base" / n).read_bytes() != (samples / "images" / n).read_bytes() for n in names)
    grid, compare = Image.open(samples / "grid.png").convert("RGB"), Image.open(samples / "compare.png").convert("RGB")
    assert grid.size == grid_size(2, 2, labels=False)  # a row per prompt, an image per seed
    assert compare.size == grid_size(2, 4, labels=True)  # a row per prompt: base's images, then the model's
    for j in range(2):
        for k in range(2):
            assert same_image(grid_cell(grid, j, k, False), samples / "images" / f"p{j:03d}_s{k:03d}.png")
            assert same_image(grid_cell(compare, j, k, True), samples / "base" / f"p{j:03d}_s{k:03d}.png")
            assert same_image(grid_cell(compare, j, 2 + k, True), samples / "images" / f"p{j:03d}_s{k:03d}.png")

    check = plain_diffusers_check()  # a fresh interpreter, without amnesia_sd
    assert "PLAIN-DIFFUSERS-OK" in check.stdout, check.stderr


def test_bad_input_is_one_line_without_traceback(tmp_path):
    done = subprocess.run([EXE, "forget", "--model", "./missing-model", "--concept", "x", "--surrogate", "y",
                           "--fim", "f.safetensors", "--output-dir", "o"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: no Fisher file at f.safetensors: compute it once per base model with "
        "`amnesia-sd fim --model ./missing-model --output f.safetensors`"]
    assert not (tmp_path / "o").exists()


def test_help_shows_the_defaults(tmp_path):
    text = " ".join(cli("forget", "--help", cwd=tmp_path).stdout.split())  # help lines wrap anywhere
    assert "[default: 1e-5]" in text and "[default: 50]" in text and "--scale-lr" in text


def test_lora_result_through_sample_and_eval(tiny_model, tmp_path):
    """A LoRA result is a --model like any other: the base comes from its amnesia.json."""
    model = str(tiny_model)
    done = run_command("forget", "--model", model, "--concept", "Brad Pitt", "--surrogate", "a middle aged man",
                       "--num-surrogate-images", "4", "--num-replay-images", "4", "--fim-num-timesteps", "2",
                       "--lora-rank", "4", "--lora-alpha", "8", "--max-train-steps", "2", "--train-batch-size", "2",
                       "--learning-rate", "1e-2", "--output-dir", "lora", *QUICK, cwd=tmp_path)
    assert "LoRA rank 4 adapters" in done.stdout and "load_lora_weights(OUT)" in done.stdout
    out = tmp_path / "lora"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["README.md", "amnesia.json",
                                                                   "pytorch_lora_weights.safetensors"]
    prompts = ["--prompt", "a photo of brad pitt", "--num-images", "2", "--seed", "3", *QUICK]
    run_command("sample", "--model", "lora", *prompts, "--output-dir", "samples", "--compare", model, cwd=tmp_path)
    samples = tmp_path / "samples"
    assert any((samples / "base" / n).read_bytes() != (samples / "images" / n).read_bytes()
               for n in ("p000_s000.png", "p000_s001.png"))  # the adapter changes the images
    run_command("eval", "--model", "lora", "--output-dir", "report", "--concept", "nudity, naked", "--num-images",
                "1", "--num-inference-steps", "2", "--clip-model", "nonexistent-org/no-clip", cwd=tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["models"]["base"]["identity"] == str(Path(model).resolve())
    # --lora-alpha 8 on rank 4: the scale 2 is folded into B, recorded as alpha = rank
    record = json.loads((out / "amnesia.json").read_text())
    assert record["lora"]["alpha"] == 4 and record["lora"]["trained_alpha"] == 8.0
