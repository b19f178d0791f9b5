"""Every long command says what it will cost before it starts, and its measured rate after the first batch."""

import io

from tqdm import tqdm
from typer.testing import CliRunner

from amnesia_sd.cli import app
from amnesia_sd.core.cost import first_batch, generation_passes


def test_generation_passes_count_guidance_twice():
    assert generation_passes(1000, 50, 7.5) == 100_000
    assert generation_passes(1000, 50, 1.0) == 50_000  # no classifier-free guidance: one pass per step


def said_after_first_batch(capsys, monkeypatch, total, done, seconds, passes_per_unit):
    """What first_batch prints for a bar whose first update of `done` units took `seconds`."""
    monkeypatch.delenv("RANK", raising=False)
    bar = tqdm(total=total, file=io.StringIO())
    bar.update(done)
    bar.start_t = bar._time() - seconds  # elapsed is measured from start_t
    capsys.readouterr()
    first_batch(bar, passes_per_unit, "Fisher")
    first_batch(bar, passes_per_unit, "Fisher")  # said once
    bar.close()
    return capsys.readouterr().out.splitlines()


def test_first_batch_of_a_one_image_job_says_it_finished_at_a_readable_rate(capsys, monkeypatch):
    # one image x 50 timesteps in 3 minutes: 0.28 passes/s would print as "0.3" (or "0.0" when slower)
    assert said_after_first_batch(capsys, monkeypatch, 1, 1, 180, 50) == [
        "Fisher: finished in 03:00 at 3.6 s per denoiser pass"]


def test_first_batch_gives_rate_and_time_left(capsys, monkeypatch):
    assert said_after_first_batch(capsys, monkeypatch, 5, 1, 10, 50) == [
        "Fisher: 5.0 denoiser passes/s after the first batch; about 00:40 to go"]
    assert said_after_first_batch(capsys, monkeypatch, 5, 1, 100, 10) == [
        "Fisher: 10.0 s per denoiser pass after the first batch; about 06:40 to go"]


def test_replay_fim_and_eval_announce_their_cost(tiny_model, tmp_path):
    def run(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    said = run("replay", "--model", tiny_model, "--output-dir", tmp_path / "r", "--num-images", "3",
               "--num-inference-steps", "2", "--batch-size", "2")
    lines = said.splitlines()
    cost = lines.index("cost of the replay set: 3 images x 2 steps: 12 passes; 12 denoiser passes in all (a "
                       "forward+backward pass costs about 3 forward passes); rate and ETA follow the first batch")
    rate = [i for i, line in enumerate(lines) if "denoiser passes/s after the first batch" in line]
    assert len(rate) == 1 and rate[0] > cost and lines[rate[0]].startswith("replay images: ")
    said = run("fim", "--model", tiny_model, "--replay-dir", tmp_path / "r", "--output", tmp_path / "f.safetensors",
               "--num-timesteps", "4", "--timestep-batch-size", "2")
    assert "cost of fim: Fisher (3 samples x 4 timesteps, forward+backward): 12 passes;" in said
    assert "Fisher: " in said and "denoiser passes/s after the first batch" in said
    said = run("forget", "--model", tiny_model, "--concept", "brad pitt", "--surrogate-dir", tmp_path / "r",
               "--replay-dir", tmp_path / "r", "--fim", tmp_path / "f.safetensors", "--output-dir", tmp_path / "o",
               "--max-train-steps", "2", "--train-batch-size", "1")
    assert ("cost of forget: training (2 steps x 2 images x 1 accumulation, forward+backward): 4 passes; "
            "4 denoiser passes in all") in said
    said = run("eval", "--model", tmp_path / "o", "--output-dir", tmp_path / "e", "--num-images", "1",
               "--num-inference-steps", "2", "--detector", "clip", "--clip-model", tmp_path / "no-clip")
    assert "cost of eval: base (4 images x 2 steps): 16 passes; forgotten (4 images x 2 steps): 16 passes;" in said
