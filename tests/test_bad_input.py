"""Every bad input: exit code 2, one line naming the problem, no traceback, nothing left behind."""

import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from amnesia_sd.cli import app
from amnesia_sd.core.errors import UserError
from helpers import load_parts

runner = CliRunner()


@pytest.fixture(scope="module")
def fim(tiny_model, tmp_path_factory):
    """A valid-shaped Fisher of the tiny model, plus broken variants."""
    root = tmp_path_factory.mktemp("fims")
    params = dict(load_parts(tiny_model)[0].unet.named_parameters())
    good = {k: torch.ones_like(p) for k, p in params.items()}
    save_file(good, str(root / "good.safetensors"))
    save_file({**good, "extra.weight": torch.ones(2)}, str(root / "keys.safetensors"))
    first = next(iter(good))
    save_file({**good, first: torch.ones(5)}, str(root / "shapes.safetensors"))
    (root / "pickled.safetensors").write_bytes(b"\x80\x04\x95\x00.")
    return root


def fails(args, message, cwd=None):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert message in lines[0], lines[0]
    assert "Traceback" not in result.output


def forget_args(model, out, fim, **overrides):
    args = {"--model": str(model), "--concept": "brad pitt", "--surrogate": "a middle aged man",
            "--fim": str(fim), "--output-dir": str(out), **overrides}
    return ["forget", *[x for kv in args.items() for x in kv]]


def test_missing_model_path(tmp_path, fim):
    fails(forget_args(tmp_path / "no-such-model", tmp_path / "o", fim / "good.safetensors"), "does not exist")
    assert not (tmp_path / "o").exists()


def test_folder_that_is_not_a_pipeline(tmp_path, fim):
    (tmp_path / "empty").mkdir()
    fails(forget_args(tmp_path / "empty", tmp_path / "o", fim / "good.safetensors"), "not a diffusers pipeline")
    fails(["replay", "--model", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "r")], "no model_index.json")
    assert not (tmp_path / "o").exists() and not (tmp_path / "r").exists()


def test_unreadable_model_weights(tiny_model, tmp_path, fim):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    fails(["replay", "--model", str(broken), "--output-dir", str(tmp_path / "r")], "could not load model")
    assert not (tmp_path / "r").exists()


def test_single_file_checkpoints_that_cannot_load(tmp_path, capfd):
    save_file({"foo": torch.ones(2)}, str(tmp_path / "model.safetensors"))

    class Payload:
        def __reduce__(self):
            return (print, ("UNPICKLED",))

    torch.save({"state_dict": Payload()}, str(tmp_path / "model.ckpt"))
    for name in ("model.safetensors", "model.ckpt"):
        fails(["replay", "--model", str(tmp_path / name), "--output-dir", str(tmp_path / "r")],
              "could not load checkpoint")
    assert "UNPICKLED" not in capfd.readouterr().out  # torch.load(weights_only=True) refused the payload
    (tmp_path / "model.bin").write_bytes(b"x")
    fails(["replay", "--model", str(tmp_path / "model.bin"), "--output-dir", str(tmp_path / "r")],
          "must be a .safetensors or .ckpt checkpoint")


def test_hub_id_offline_and_not_cached(tmp_path, fim):
    fails(forget_args("someone/not-cached-model", tmp_path / "o", fim / "good.safetensors"), "HF_HUB_OFFLINE is set")


@pytest.mark.parametrize("variant,message", [
    ("keys", "1 unexpected (e.g. extra.weight)"),
    ("shapes", "has shape (5,)"),
    ("pickled", "is not a safetensors Fisher file"),
])
def test_fisher_that_does_not_fit(tiny_model, tmp_path, fim, variant, message):
    fails(forget_args(tiny_model, tmp_path / "o", fim / f"{variant}.safetensors"), message)
    assert not (tmp_path / "o" / "data").exists()  # refused before any generation


def test_forget_without_fisher(tiny_model, tmp_path):
    fails(forget_args(tiny_model, tmp_path / "o", tmp_path / "fim.safetensors"),
          "compute it once per base model with `amnesia-sd fim")


def test_prompts_files(tiny_model, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n# only a comment\n")
    fails(["replay", "--model", str(tiny_model), "--output-dir", str(tmp_path / "r"), "--prompts",
           str(tmp_path / "empty.txt")], "is empty: put one prompt per line")
    fails(["replay", "--model", str(tiny_model), "--output-dir", str(tmp_path / "r"), "--prompts",
           str(tmp_path / "missing.txt")], "missing.txt not found")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("overrides,message", [
    ({"--concept": " , "}, "--concept is empty"),
    ({"--surrogate": "Brad Pitt"}, "is the concept itself"),
    ({"--lambda-ewc": "-1"}, "--lambda-ewc must be >= 0"),
    ({"--max-train-steps": "0"}, "--max-train-steps must be positive"),
    ({"--learning-rate": "0"}, "--learning-rate must be positive"),
    ({"--train-method": "attn"}, "--train-method must be one of full, noxattn, xattn"),
    ({"--unconditional-replay": "1.5"}, "--unconditional-replay must be between 0 and 1"),
    ({"--unconditional-replay": "0.1", "--replay-dir": "r"}, "cannot be combined with --replay-dir"),
])
def test_bad_settings(tiny_model, tmp_path, fim, overrides, message):
    fails(forget_args(tiny_model, tmp_path / "o", fim / "good.safetensors", **overrides), message)
    assert not (tmp_path / "o").exists()


def test_optional_extras_that_are_missing(tiny_model, monkeypatch):
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.commands.forget import enable_xformers, make_optimizer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "xformers", None)
    config = ForgetConfig(model="m", concept="c", surrogate="s", fim="f", output_dir="o", use_8bit_adam=True)
    with pytest.raises(UserError, match=r"--use-8bit-adam needs bitsandbytes: pip install 'amnesia-sd\[bitsandbytes\]'"):
        make_optimizer([torch.zeros(2, requires_grad=True)], config, config.learning_rate)
    with pytest.raises(UserError, match=r"--enable-xformers needs xformers: pip install 'amnesia-sd\[xformers\]'"):
        enable_xformers(load_parts(tiny_model)[0].unet)


def test_output_that_is_not_ours_is_never_replaced(tiny_model, tmp_path, fim):
    out = tmp_path / "o"
    out.mkdir()
    (out / "amnesia.json").write_text("{}")  # looks like a result, but carries no amnesia-sd stamp
    for extra in ({}, {"--overwrite": ""}):
        args = [a for a in forget_args(tiny_model, out, fim / "good.safetensors", **extra) if a]
        fails(args, "is not an amnesia-sd forgotten model; --overwrite only replaces amnesia-sd's own results")
    assert [p.name for p in out.iterdir()] == ["amnesia.json"] and (out / "amnesia.json").read_text() == "{}"
    assert not (tmp_path / "o.partial").exists()


def test_config_file_unknown_key_and_precedence(tiny_model, tmp_path, fim):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lambda_ewc: 10\nlamda_ewc: 5\n")
    fails(forget_args(tiny_model, tmp_path / "o", fim / "good.safetensors", **{"--config": str(bad)}),
          "unknown key(s) in")
    from amnesia_sd.core.config import ForgetConfig, build_config

    toml = tmp_path / "c.toml"
    toml.write_text('lambda-ewc = 10.0\ngamma = 0.5\nmax_train_steps = 7\nconcept = "from file"\n')
    cfg = build_config(ForgetConfig, str(toml), {"model": "m", "output_dir": "o", "fim": "f", "surrogate": "s",
                                                  "gamma": 2.0, "lambda_ewc": None})
    assert (cfg.lambda_ewc, cfg.gamma, cfg.max_train_steps) == (10.0, 2.0, 7)
    assert cfg.concepts == [{"concept": "from file", "surrogate": "s"}]  # file concept, flag surrogate
    assert cfg.learning_rate == ForgetConfig.learning_rate  # untouched keys keep their defaults
