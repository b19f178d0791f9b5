"""A careless or hostile user: every command refuses, in one line with exit code 2, anything that
could lose data or hand back a broken result, and leaves every input byte for byte as it was."""

import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from amnesia_sd.cli import app
from amnesia_sd.commands.sets import make_image_set
from amnesia_sd.core.config import SetConfig
from amnesia_sd.model import digits
from helpers import load_parts

QUICK = ["--num-inference-steps", "2", "--batch-size", "4"]
pytestmark = pytest.mark.usefixtures("isolated_cache")  # `--model digits` is the shipped build


def tree_hash(*paths: Path) -> str:
    """Names, modes and bytes of every file under the paths."""
    digest = hashlib.sha256()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            digest.update(f"{f}:{stat.S_IMODE(f.stat().st_mode)}".encode())
            digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory):
    """What a user has on disk: a model, a replay set, a Fisher, an unrelated folder of their own."""
    root = tmp_path_factory.mktemp("user")
    model = root / "model"
    import shutil

    shutil.copytree(tiny_model, model)
    replay = make_image_set(SetConfig(model=str(model), output_dir=str(root / "replay"), prompts=["a dog", "a cat"],
                                      num_images=2, num_inference_steps=2, batch_size=2)).path
    params = dict(load_parts(model)[0].unet.named_parameters())
    fim = root / "fim.safetensors"
    save_file({k: torch.full_like(p, 1e-3) for k, p in params.items()}, str(fim))
    mine = root / "my-photos"
    mine.mkdir()
    (mine / "holiday.txt").write_text("precious")
    prompts = root / "prompts.txt"
    prompts.write_text("a dog\na cat\n")
    return {"root": root, "model": model, "replay": replay, "fim": fim, "mine": mine, "prompts": prompts,
            "params": params}


@pytest.fixture
def untouched(world):
    """Every input of the user's, hashed before the test and checked after it."""
    paths = [world[k] for k in ("model", "replay", "fim", "mine", "prompts")]
    before = tree_hash(*paths)
    yield
    assert tree_hash(*paths) == before, "an input changed"


def refuses(args, message, code=2):
    """Exit code 2 and one `error: ...` line, the last one printed (progress bars may come before)."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, (SystemExit, type(None)))
    assert [line for line in lines if "error:" in line] == lines[-1:], result.output
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
    return lines[-1]


def forget(world, out, *extra, fim=None):
    return ["forget", "--model", world["model"], "--concept", "brad pitt", "--surrogate", "a man", "--fim",
            fim or world["fim"], "--replay-dir", world["replay"], "--output-dir", out, *extra]


# 1. Data safety: one guard for every command ------------------------------------------------------

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_forget_into_the_model_folder(world, untouched, overwrite):
    refuses(forget(world, world["model"], *overwrite), f"--output-dir {world['model']} is --model")


def test_forget_into_the_replay_set_or_around_the_fisher(world, untouched):
    refuses(forget(world, world["replay"], "--overwrite"), "is --replay-dir")
    refuses(forget(world, world["root"], "--overwrite"), "contains --model")
    refuses(forget(world, world["replay"] / "sub"), "lies inside --replay-dir")


def test_sample_into_an_unrelated_folder_or_the_model(world, untouched):
    base = ["sample", "--model", world["model"], "--prompt", "a dog", *QUICK]
    refuses([*base, "--output-dir", world["mine"], "--overwrite"],
            "is not an amnesia-sd sample folder; --overwrite only replaces amnesia-sd's own results")
    refuses([*base, "--output-dir", world["model"], "--overwrite"], "is --model")
    refuses([*base, "--output-dir", world["root"] / "s", "--compare", world["root"] / "s" / "base"],
            "does not exist")


def test_digits_build_never_deletes_a_folder_it_did_not_make(world, untouched):
    refuses(["digits", "build", "--output-dir", world["mine"], "--overwrite"], "is not an amnesia-sd digits model")
    refuses(["digits", "build", "--output-dir", digits.SHIPPED_MODEL / "x"], "lies inside the shipped digits model")


def test_every_command_checks_its_outputs_against_its_inputs(world, untouched, tmp_path):
    m = world["model"]
    refuses(["replay", "--model", m, "--output-dir", m / "unet" / "r"], "lies inside --model")
    refuses(["replay", "--model", m, "--prompts", world["prompts"], "--output-dir", world["prompts"]], "is --prompts")
    refuses(["surrogate", "--model", m, "--prompt", "a man", "--output-dir", m], "is --model")
    refuses(["fim", "--model", m, "--replay-dir", world["replay"], "--output", world["replay"] / "f.safetensors"],
            "lies inside --replay-dir")
    refuses(["fim", "--model", m, "--replay-dir", world["replay"], "--output", world["fim"]],
            "is not an amnesia-sd Fisher; --overwrite only replaces")
    refuses(["eval", "--model", m, "--base", m, "--concept", "x", "--output-dir", m / "report"], "lies inside --model")
    refuses(["demo", "--output-dir", digits.SHIPPED_MODEL], "is the digits model")
    link = tmp_path / "link"
    link.symlink_to(m)  # a symlink is followed: the real target is the model
    refuses(forget(world, link, "--overwrite"), "is --model")


def test_a_work_folder_name_that_is_taken_is_not_ours(world, untouched, tmp_path):
    (tmp_path / "r.partial").mkdir()
    (tmp_path / "r.partial" / "keep.txt").write_text("mine")
    refuses(["replay", "--model", world["model"], "--output-dir", tmp_path / "r", "--overwrite"],
            "r.partial exists and was not made by amnesia-sd")
    assert (tmp_path / "r.partial" / "keep.txt").read_text() == "mine"


def test_files_for_folders_and_places_that_cannot_be_written(world, untouched, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    refuses(["replay", "--model", world["model"], "--output-dir", afile], "exists and is a file, but --output-dir")
    refuses(["replay", "--model", world["model"], "--output-dir", afile / "sub"], "is a file, not a folder")
    refuses(["fim", "--model", world["model"], "--replay-dir", world["replay"], "--output", tmp_path],
            "must end in .safetensors")
    (tmp_path / "d.safetensors").mkdir()
    refuses(["fim", "--model", world["model"], "--replay-dir", world["replay"], "--output",
             tmp_path / "d.safetensors"], "exists and is a folder, but --output must be a file")
    refuses(["replay", "--model", world["model"], "--output-dir", "/proc/amnesia-sd-test/r"], "cannot be written")
    assert afile.read_text() == "x"


# 2. Numeric health ------------------------------------------------------------------------------

@pytest.mark.parametrize("value,dtype,message", [
    (float("nan"), torch.float32, "holds 1 non-finite value(s)"),
    (float("inf"), torch.bfloat16, "holds 1 non-finite value(s)"),
    (-1e-3, torch.float32, "holds 1 negative value(s)"),
    (1, torch.int32, "has dtype int32, not a floating-point type"),
])
def test_broken_fisher_is_refused_naming_the_tensor(world, untouched, tmp_path, value, dtype, message):
    tensors = {k: torch.full_like(p, 1e-3) for k, p in world["params"].items()}
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = value
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, str(tmp_path / "f.safetensors"))
    refuses(forget(world, tmp_path / "o", fim=tmp_path / "f.safetensors"), f"{name} {message}")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("flag,value", [("--learning-rate", "inf"), ("--lambda-ewc", "nan"), ("--gamma", "inf"),
                                        ("--guidance-scale", "inf"), ("--ema-decay", "nan")])
def test_non_finite_flags_are_refused_up_front(world, untouched, tmp_path, flag, value):
    refuses(forget(world, tmp_path / "o", flag, value), f"{flag} ({flag[2:].replace('-', '_')}) must be a finite number")
    assert not (tmp_path / "o").exists()


def test_non_finite_generation_settings(world, untouched, tmp_path):
    refuses(["replay", "--model", world["model"], "--output-dir", tmp_path / "r", "--guidance-scale", "inf"],
            "--guidance-scale (guidance_scale) must be a finite number")
    refuses(["fim", "--model", world["model"], "--replay-dir", world["replay"], "--output", tmp_path / "f.safetensors",
             "--fim-dtype", "fp16"], "--fim-dtype fp16 cannot hold a Fisher")
    assert list(tmp_path.iterdir()) == []


def test_fisher_of_another_model_is_refused_with_both_origins(world, untouched, tmp_path):
    tensors = {k: torch.full_like(p, 1e-3) for k, p in world["params"].items()}
    meta = {"base_model": "hub:someone/other-model", "unet_config_hash": "0123456789abcdef",
            "prediction_type": "v_prediction", "tool": "amnesia-sd"}
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata=meta)
    line = refuses(forget(world, tmp_path / "o", fim=tmp_path / "f.safetensors"), "made from another model")
    assert "'hub:someone/other-model', this model " in line and "'v_prediction', this model 'epsilon'" in line
    assert "--allow-origin-mismatch" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# 3. What is recorded is what happened -----------------------------------------------------------

def test_mutually_exclusive_flags(world, untouched, tmp_path):
    refuses(forget(world, tmp_path / "o", "--surrogate-dir", world["replay"]),
            "give exactly one kind of surrogate: --surrogate PROMPT, --surrogate-dir DIR or --surrogate-images DIR "
            "(got --surrogate and --surrogate-dir; to mix kinds, list the concepts in a config file")
    refuses(forget(world, tmp_path / "o", "--prompts", world["prompts"]), "cannot be combined with --replay-dir")
    refuses(["fim", "--model", world["model"], "--replay-dir", world["replay"], "--prompts", world["prompts"],
             "--output", tmp_path / "f.safetensors"], "--prompts and --replay-dir cannot be combined")
    refuses(forget(world, tmp_path / "o", "--overwrite", "--resume-from-checkpoint", "latest"),
            "cannot be combined with --resume-from-checkpoint")


# 4. One clear line, never a traceback -----------------------------------------------------------

def test_resolution_that_the_vae_or_the_pipeline_cannot_take(world, untouched, tmp_path):
    refuses(["replay", "--model", world["model"], "--output-dir", tmp_path / "r", "--resolution", "13", *QUICK],
            "--resolution 13 is not a multiple of 8 (what this Stable Diffusion 1.x/2.x pipeline takes, its VAE "
            "downsampling by 2)")
    refuses(["sample", "--model", world["model"], "--prompt", "a dog", "--output-dir", tmp_path / "s",
             "--resolution", "13", *QUICK], "--resolution 13 is not a multiple of 8")
    # A multiple of the VAE's factor that diffusers' pipeline refuses (issue 24, case 8): one line too.
    refuses(["replay", "--model", world["model"], "--output-dir", tmp_path / "r12", "--resolution", "12", *QUICK],
            "--resolution 12 is not a multiple of 8")
    assert list(tmp_path.iterdir()) == []  # no .partial folder left behind


def test_a_model_that_makes_nan_stops_at_the_first_image_on_a_line_of_its_own(world, untouched, tmp_path):
    import shutil
    import subprocess

    from helpers import ENV, EXE

    broken = tmp_path / "nan-model"
    shutil.copytree(world["model"], broken)
    weights_file = broken / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    weights = load_file(str(weights_file))
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("nan"))
    save_file(weights, str(weights_file))
    done = subprocess.run([EXE, "replay", "--model", str(broken), "--output-dir", str(tmp_path / "r"), "--prompts",
                           str(world["prompts"]), "--num-images", "8", *QUICK], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "replay images" in done.stderr  # a progress bar was open when the error came
    assert done.stderr.splitlines()[-1] == (
        "error: image 0 ('a dog') came out non-finite (NaN or inf); nothing was finished: check the model and "
        "settings (fp16 overflow? try --mixed-precision bf16 or no)"), done.stderr
    assert "error:" not in "".join(done.stderr.splitlines()[:-1])
    assert not (tmp_path / "r").exists()  # nothing looks finished


@pytest.mark.parametrize("extra,message", [
    (["--fuse"], "--lora-alpha and --fuse are for LoRA training: add --lora-rank R"),
    (["--lora-rank", "0"], "--lora-rank must be positive, got 0"),
    (["--lora-rank", "4", "--lora-targets", "norm1"], "is a LayerNorm, not a Linear or Conv2d layer"),
    (["--lora-rank", "4", "--lora-targets", "to_q,nothing"], "--lora-targets nothing names no layer of this UNet"),
    (["--lora-rank", "4", "--lora-targets", " , "], "--lora-targets is empty"),
])
def test_lora_settings_that_cannot_work(world, untouched, tmp_path, extra, message):
    refuses(forget(world, tmp_path / "o", *extra), message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**31), str(2**70)])
def test_seed_outside_the_generators_range(world, untouched, tmp_path, seed):
    refuses(["replay", "--model", world["model"], "--output-dir", tmp_path / "r", "--seed", seed],
            "--seed must be in [0, 2**31)")


def test_mixed_precision_fp16_without_a_gpu(world, untouched, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    refuses(["replay", "--model", world["model"], "--output-dir", tmp_path / "r", "--mixed-precision", "fp16"],
            "--mixed-precision fp16 needs a CUDA GPU and none is available: use bf16 or no")
    refuses(forget(world, tmp_path / "o", "--mixed-precision", "fp16"), "needs a CUDA GPU")


@pytest.mark.parametrize("text,message", [
    ("max_train_steps: 1.5\n", "--max-train-steps (max_train_steps) must be a whole number, got 1.5"),
    ("learning_rate: fast\n", "--learning-rate (learning_rate) must be a number, got 'fast'"),
    ("templates: 'yes'\n", "--templates (templates) must be true or false, got 'yes'"),
    ("train_method: [a, b]\n", "--train-method (train_method) must be text"),
    ("lambda_ewc: .inf\n", "--lambda-ewc (lambda_ewc) must be a finite number, got inf"),
])
def test_config_values_of_the_wrong_type_name_the_key(world, untouched, tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    refuses(forget(world, tmp_path / "o", "--config", config), message)


def test_config_file_that_is_binary_or_is_the_output(world, untouched, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    refuses(forget(world, tmp_path / "o", "--config", config), "is not UTF-8 text")
    config.write_text("gamma: 1\n")
    refuses(forget(world, tmp_path, "--config", config), "contains --config")


def test_yaml_numbers_written_as_strings_are_read(tmp_path):
    from amnesia_sd.core.config import ForgetConfig, build_config

    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 1e-4\nmax_train_steps: 20.0\n")  # YAML 1.1 reads 1e-4 as text
    settings = build_config(ForgetConfig, str(config), {"model": "m", "concept": "c", "surrogate": "s", "fim": "f",
                                                        "output_dir": "o"})
    assert settings.learning_rate == 1e-4 and settings.max_train_steps == 20
    assert type(settings.max_train_steps) is int


def test_resuming_from_something_that_is_not_a_checkpoint(world, untouched, tmp_path):
    refuses(forget(world, tmp_path / "o", "--resume-from-checkpoint", world["mine"]),
            "is not a checkpoint-N folder of this run")


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "holds a list, not an object"),
    ('{"base_model": "digits", "concepts": "zero"}', "concepts is a str, not a list"),
    ("{not json", "is not valid JSON"),
])
def test_eval_on_a_malformed_amnesia_json(world, tmp_path, content, message):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(world["model"], model)
    (model / "amnesia.json").write_text(content)
    refuses(["eval", "--model", model, "--output-dir", tmp_path / "r"], message)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["forget", "--lamda-ewc", "5"], "No such option: --lamda-ewc"),
    (["forget", "--max-train-steps", "many"], "Invalid value for '--max-train-steps'"),
    (["replay", "--model", "m"], "Missing option '--output-dir'"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_usage_errors_read_like_every_other_error(args, message):
    line = refuses(args, message)
    assert "--help" in line


def test_ctrl_c_says_what_a_rerun_does(world, untouched, tmp_path, monkeypatch):
    from amnesia_sd.commands import sample
    from amnesia_sd.method import fisher

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fisher, "fisher_diagonal", interrupt)
    refuses_ = CliRunner().invoke(app, ["fim", "--model", str(world["model"]), "--replay-dir", str(world["replay"]),
                                        "--output", str(tmp_path / "f.safetensors")])
    assert refuses_.exit_code == 130
    assert [line for line in refuses_.output.splitlines() if "interrupted" in line] == [
        "interrupted: no Fisher was written; a rerun starts it again (a replay set being generated resumes)"]
    monkeypatch.setattr(sample, "make_grid", interrupt)
    result = CliRunner().invoke(app, ["sample", "--model", str(world["model"]), "--prompt", "a dog", "--output-dir",
                                      str(tmp_path / "s"), *QUICK])
    assert result.exit_code == 130
    assert [line for line in result.output.splitlines() if "interrupted" in line] == [
        "interrupted: nothing was written; a rerun starts again"]
    assert list(tmp_path.iterdir()) == []  # neither the Fisher nor a half-made sample folder


def test_outputs_get_the_umask_permissions(world, untouched, tmp_path):
    old = os.umask(0o022)
    try:
        result = CliRunner().invoke(app, ["fim", "--model", str(world["model"]), "--replay-dir", str(world["replay"]),
                                          "--output", str(tmp_path / "f.safetensors"), "--num-timesteps", "2"])
        assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, ["replay", "--model", str(world["model"]), "--output-dir",
                                          str(tmp_path / "r"), "--num-images", "1", *QUICK])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    for path in (tmp_path / "f.safetensors", tmp_path / "r" / "latents.safetensors", tmp_path / "r" / "manifest.json",
                 tmp_path / "r" / "images" / "000000.png"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    # A finished Fisher of ours is replaced with --overwrite, once the new one is complete.
    before = (tmp_path / "f.safetensors").read_bytes()
    refuses(["fim", "--model", world["model"], "--replay-dir", world["replay"], "--output", tmp_path / "f.safetensors"],
            "already holds a finished Fisher; pass --overwrite")
    assert (tmp_path / "f.safetensors").read_bytes() == before
