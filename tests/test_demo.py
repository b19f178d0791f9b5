"""The digits demo, shortened, and `--model digits` in every command."""

import json
import math

import pytest
from PIL import Image
from typer.testing import CliRunner

from amnesia_sd import digits
from amnesia_sd.cli import app
from amnesia_sd.demo import DemoConfig, run_demo

KEYS = {"p_forgotten", "entropy_forgotten", "acc_retained", "p_forgotten_heldout"}
QUICK = ["--num-inference-steps", "2", "--batch-size", "16"]


pytestmark = pytest.mark.usefixtures("isolated_cache")  # the demo's Fisher and classifier go there


def test_short_demo_writes_what_it_promises(tmp_path):
    out = tmp_path / "demo"
    run_demo(DemoConfig(digit=3, output_dir=str(out), samples_per_digit=3, replay_per_digit=2, surrogate_images=4,
                        fim_per_digit=1, fim_timesteps=4, max_train_steps=2, train_batch_size=4,
                        num_inference_steps=3, batch_size=64))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["forgotten_digit"] == 3 and metrics["samples_per_digit"] == 3 and metrics["seconds"] > 0
    assert metrics["base_model_path"] == str(digits.SHIPPED_MODEL)
    for name in ("original", "sa", "naive"):
        assert set(metrics[name]) == KEYS
        values = metrics[name]
        assert 0 <= values["p_forgotten"] <= 1 and 0 <= values["p_forgotten_heldout"] <= 1
        assert 0 <= values["acc_retained"] <= 1 and 0 <= values["entropy_forgotten"] <= math.log(10) + 1e-6
    grid = Image.open(out / "grid.png")
    assert grid.height > 10 * 64 and grid.width > 12 * 64  # 10 rows of 3 models x 4 samples, enlarged
    for name in ("sa", "naive"):
        record = json.loads((out / name / "amnesia.json").read_text())
        assert (out / name / "model_index.json").is_file() and record["steps"] == 2
    naive = json.loads((out / "naive" / "amnesia.json").read_text())["settings"]
    assert naive["lambda_ewc"] == 0 and naive["gamma"] == 0
    with pytest.raises(Exception, match="already holds a finished demo"):
        run_demo(DemoConfig(output_dir=str(out)))


def test_every_command_takes_model_digits(tmp_path):
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(app, [*args])
        assert result.exit_code == 0, result.output

    ok("replay", "--model", "digits", "--output-dir", str(tmp_path / "r"), "--num-images", "2", *QUICK)
    ok("surrogate", "--model", "digits", "--prompt", "the number 8", "--output-dir", str(tmp_path / "s"),
       "--num-images", "2", *QUICK)
    ok("fim", "--model", "digits", "--replay-dir", str(tmp_path / "r"), "--output", str(tmp_path / "f.safetensors"),
       "--num-timesteps", "2")
    ok("forget", "--model", "digits", "--concept", "the number 3", "--no-templates", "--surrogate-dir",
       str(tmp_path / "s"), "--replay-dir", str(tmp_path / "r"), "--fim", str(tmp_path / "f.safetensors"),
       "--output-dir", str(tmp_path / "o"), "--max-train-steps", "1")
    ok("sample", "--model", "digits", "--prompt", "the number 3", "--num-images", "1", "--output-dir",
       str(tmp_path / "p"), "--compare", str(tmp_path / "o"), *QUICK)
    ok("eval", "--model", str(tmp_path / "o"), "--base", "digits", "--output-dir", str(tmp_path / "e"),
       "--num-images", "1", *QUICK)
    assert json.loads((tmp_path / "e" / "report.json").read_text())["digits"]["forgotten_digit"] == 3
    assert json.loads((tmp_path / "o" / "amnesia.json").read_text())["base_model"] == str(digits.SHIPPED_MODEL)
