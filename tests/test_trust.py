"""Issue 24's cases: what a careless user could lose, and what must refuse in one line."""

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch

from amnesia_sd.core.errors import UserError
from amnesia_sd.core.paths import stamp
from helpers import load_parts, make_sets, run_command


def hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def stamped_file(path: Path, fmt: str) -> Path:
    save_file({"x": torch.zeros(2)}, str(path), metadata={**stamp(), "format": fmt})
    return path


def test_cache_clear_removes_only_entries_that_are_ours_and_hold_only_what_we_wrote(tmp_path, monkeypatch):
    cache = tmp_path / "U"
    monkeypatch.setenv("AMNESIA_SD_CACHE", str(cache))
    models = cache / "models"
    # The reproduction: a parseable entry.json without our stamp, beside a user's file.
    (models / "p").mkdir(parents=True)
    (models / "p" / "entry.json").write_text('{"a": 1}')
    (models / "p" / "w.bin").write_text("w")
    # Stamped, but holding something we never write there.
    (models / "q").mkdir()
    (models / "q" / "entry.json").write_text(json.dumps({**stamp(), "base_model": "m"}))
    (models / "q" / "notes.txt").write_text("mine")
    # Not a dict; a link to a folder elsewhere; a file where a folder would be.
    (models / "r").mkdir()
    (models / "r" / "entry.json").write_text("[1, 2]")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "entry.json").write_text(json.dumps({**stamp(), "base_model": "m"}))
    (models / "s").symlink_to(elsewhere, target_is_directory=True)
    (models / "t").write_text("a file")
    # Ours: the stamp and nothing but a Fisher of ours.
    (models / "ours").mkdir()
    (models / "ours" / "entry.json").write_text(json.dumps({**stamp(), "base_model": "m"}))
    stamped_file(models / "ours" / "fim-0123.safetensors", "amnesia-sd-fisher")
    before = {**hashes(cache), **{f"elsewhere/{k}": v for k, v in hashes(elsewhere).items()}}

    listed = run_command("cache", "list", cwd=tmp_path)
    assert "1 base model(s)" in listed.output and "Traceback" not in listed.output
    cleared = run_command("cache", "clear", cwd=tmp_path)
    assert cleared.output.startswith("removed 1 entry")
    assert not (models / "ours").exists()
    after = {**hashes(cache), **{f"elsewhere/{k}": v for k, v in hashes(elsewhere).items()}}
    assert after == {k: v for k, v in before.items() if not k.startswith("models/ours/")}
    assert (models / "s").is_symlink() and (models / "t").is_file()


def test_a_cache_path_that_is_a_file_is_one_line(tiny_model, tmp_path, monkeypatch):
    from amnesia_sd.core.cache import model_entry

    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("AMNESIA_SD_CACHE", str(tmp_path / "cache"))
    pipe, _ = load_parts(tiny_model)
    with pytest.raises(UserError, match=r"cannot hold a new entry .*point AMNESIA_SD_CACHE at a writable folder"):
        model_entry({"base_model": "m"}, pipe.unet)
    assert run_command("cache", "list", cwd=tmp_path).exit_code == 0
    assert (tmp_path / "cache").read_text() == "not a folder"


@pytest.mark.parametrize("command,kind", [("export", "amnesia-sd-fisher"), ("fim", "amnesia-sd-export")])
def test_overwrite_replaces_only_a_result_of_the_same_kind(tiny_model, tmp_path, command, kind):
    """`export --overwrite --output fim.safetensors` must not replace a Fisher, nor `fim --overwrite` an export."""
    target = stamped_file(tmp_path / "target.safetensors", kind)
    before = target.read_bytes()
    args = ["--model", tiny_model, "--output", "target.safetensors", "--overwrite"]
    refused = run_command(command, *args, code=2, cwd=tmp_path)
    [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "is another kind of amnesia-sd file" in line and "--overwrite replaces only a result of the same kind" in line
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target.safetensors"]


def test_overwrite_still_replaces_its_own_kind(tmp_path):
    from amnesia_sd.commands.export import FORMAT, LORA_FORMAT
    from amnesia_sd.core.paths import Output, check_output

    own = stamped_file(tmp_path / "model.safetensors", FORMAT)
    assert check_output(Output("--output", own, None, "export", (FORMAT, LORA_FORMAT)), overwrite=True)
    with pytest.raises(UserError, match="already holds a finished export"):
        check_output(Output("--output", own, None, "export", (FORMAT, LORA_FORMAT)), overwrite=False)


@pytest.fixture(scope="module")
def sets(tiny_model, tmp_path_factory):
    return make_sets(tiny_model, tmp_path_factory.mktemp("trust"), fisher=True)


def forget_args(tiny_model, sets, out):
    return ["forget", "--model", tiny_model, "--concept", "brad pitt", "--surrogate-dir", sets / "surrogate",
            "--replay-dir", sets / "replay", "--fim", sets / "fim.safetensors", "--output-dir", out,
            "--max-train-steps", "1", "--train-batch-size", "1"]


def test_a_file_written_into_the_output_during_the_run_is_never_moved_or_deleted(tiny_model, sets, tmp_path,
                                                                                    monkeypatch):
    from amnesia_sd.commands import forget as forget_module

    (tmp_path / "o").mkdir()  # empty: accepted at the start
    real = forget_module.write_result

    def user_writes_meanwhile(*args, **kwargs):
        (tmp_path / "o" / "important.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(forget_module, "write_result", user_writes_meanwhile)
    inputs = hashes(sets)
    refused = run_command(*forget_args(tiny_model, sets, "o"), code=2, cwd=tmp_path)
    [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "changed during the run and now holds important.txt" in line and "o.partial" in line
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["important.txt"]
    assert (tmp_path / "o" / "important.txt").read_text() == "mine"
    assert (tmp_path / "o.partial" / "amnesia.json").is_file()  # the finished result, kept
    assert hashes(sets) == inputs


def test_overwrite_keeps_an_old_result_that_someone_added_files_to(tiny_model, sets, tmp_path):
    run_command(*forget_args(tiny_model, sets, "o"), cwd=tmp_path)
    old_record = (tmp_path / "o" / "amnesia.json").read_text()
    import os
    import time

    notes = tmp_path / "o" / "notes.txt"
    notes.write_text("mine")
    later = time.time() + 5
    os.utime(notes, (later, later))  # written after the result was finished
    again = run_command(*forget_args(tiny_model, sets, "o"), "--overwrite", cwd=tmp_path)
    assert "it is kept at" in again.output and "notes.txt" in again.output
    [kept] = list(tmp_path.glob(".o.replaced-*/o"))
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "amnesia.json").read_text() == old_record
    assert (tmp_path / "o" / "amnesia.json").is_file() and not (tmp_path / "o" / "notes.txt").exists()
    # Without an added file, --overwrite replaces the old result whole, as before.
    run_command(*forget_args(tiny_model, sets, "o"), "--overwrite", cwd=tmp_path)
    assert len(list(tmp_path.glob(".o.replaced-*"))) == 1


def test_two_runs_on_one_output_the_second_refuses_while_the_first_runs(tiny_model, sets, tmp_path):
    import subprocess
    import time

    from helpers import ENV, EXE

    first = subprocess.Popen([EXE, *map(str, forget_args(tiny_model, sets, "o")), "--max-train-steps", "3000"],
                             cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = tmp_path / "o.partial" / ".amnesia-sd-lock.json"
        deadline = time.time() + 120
        while not lock.is_file() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert lock.is_file(), first.stderr.read() if first.poll() is not None else "no lock"
        second = run_command(*forget_args(tiny_model, sets, "o"), "--overwrite", code=2, cwd=tmp_path)
        [line] = [line for line in second.output.splitlines() if line.startswith("error:")]
        assert "is in use by another run (forget, process" in line and str(first.pid) in line
        assert first.poll() is None  # the first run goes on, its folder untouched
    finally:
        first.kill()
        first.wait()
    # Killed: its lock is stale now. The next run says so, takes the folder and finishes.
    done = run_command(*forget_args(tiny_model, sets, "o"), "--overwrite", cwd=tmp_path)
    assert f"(process {first.pid}) is no longer running; its lock was removed" in done.output
    assert (tmp_path / "o" / "amnesia.json").is_file() and not (tmp_path / "o" / ".amnesia-sd-lock.json").exists()


def test_a_second_attack_never_deletes_the_first_ones_work_folder(tmp_path):
    import subprocess

    from amnesia_sd.core.paths import open_work

    holder = subprocess.Popen(["sleep", "60"])
    try:
        work = tmp_path / "a.partial"
        open_work(tmp_path / "a", "attack", {}, keep=False)
        (work / "concept-set").mkdir()
        lock = json.loads((work / ".amnesia-sd-lock.json").read_text())
        (work / ".amnesia-sd-lock.json").write_text(json.dumps({**lock, "pid": holder.pid}))  # another live run
        with pytest.raises(UserError, match=f"is in use by another run \\(attack, process {holder.pid}"):
            open_work(tmp_path / "a", "attack", {}, keep=False)
        assert (work / "concept-set").is_dir()
    finally:
        holder.kill()
        holder.wait()


class _Boom:
    """A pickle that runs a command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_in_a_checkpoint_never_runs_and_the_resume_is_refused(tiny_model, sets, tmp_path,
                                                                              monkeypatch):
    import pickle

    from amnesia_sd.commands import forget as forget_module

    real = forget_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(forget_module, "save_checkpoint", save_then_stop)
    args = [*forget_args(tiny_model, sets, "o"), "--max-train-steps", "4", "--checkpointing-steps", "2"]
    run_command(*args, code=130, cwd=tmp_path)
    monkeypatch.setattr(forget_module, "save_checkpoint", real)
    checkpoint = tmp_path / "o.partial" / "checkpoints" / "checkpoint-2"
    assert not list(checkpoint.glob("*.pkl")) or all("random_states" in p.name for p in checkpoint.glob("*.pkl"))
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        original = (checkpoint / name).read_bytes() if (checkpoint / name).exists() else None
        (checkpoint / name).write_bytes(pickle.dumps(_Boom(marker)))
        refused = run_command(*args, "--resume-from-checkpoint", "latest", code=2, cwd=tmp_path)
        [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
        assert f"changed after it was saved ({name})" in line and "it is not loaded" in line
        assert not marker.exists()
        if original is None:
            (checkpoint / name).unlink()
        else:
            (checkpoint / name).write_bytes(original)
    # A folder that is not one of this run's checkpoints: one line, no traceback.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "o.partial" / "checkpoints" / "not-a-step").mkdir()
    for given in ("elsewhere", "o.partial/checkpoints/not-a-step"):
        refused = run_command(*args, "--resume-from-checkpoint", given, code=2, cwd=tmp_path)
        assert "is not a checkpoint-N folder of this run" in refused.output and "Traceback" not in refused.output
    # As saved, it resumes: the schedule, weights and optimizer come back without any pickle.
    resumed = run_command(*args, "--resume-from-checkpoint", "latest", cwd=tmp_path)
    assert "resumed from" in resumed.output and not marker.exists()
    assert json.loads((tmp_path / "o" / "amnesia.json").read_text())["steps"] == 4


def test_a_learning_rate_beyond_any_that_trains_is_one_line(tiny_model, sets, tmp_path):
    refused = run_command(*forget_args(tiny_model, sets, "o"), "--learning-rate", "1e38", code=2, cwd=tmp_path)
    assert "--learning-rate 1e+38 is far above any that trains" in refused.output
    assert "Traceback" not in refused.output and not (tmp_path / "o").exists()


def test_a_non_finite_run_names_the_flag_that_is_out_of_range(tiny_model, sets, tmp_path):
    refused = run_command(*forget_args(tiny_model, sets, "o"), "--max-train-steps", "3", "--learning-rate", "1e-3",
                          "--lambda-ewc", "1e38", code=2, cwd=tmp_path)
    [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "lower --lambda-ewc 1e+38 (the paper's is 50)" in line and "--learning-rate" not in line
    assert not (tmp_path / "o" / "amnesia.json").exists()


def test_the_default_adversary_initializer_works_on_every_bundled_model(tiny_model):
    from amnesia_sd.method.adversary import check_adversarial
    from amnesia_sd.core.config import ForgetConfig
    from amnesia_sd.model.families import family_of
    from amnesia_sd.model.loading import load_pipeline, resolve_model

    config = ForgetConfig(model="digits", concept="zero", surrogate="noise", output_dir="o", adversarial=True)
    digits = load_pipeline(resolve_model("digits"))
    assert check_adversarial(config, family_of(digits), digits) == "digit"  # 'object' is not in its vocabulary
    tiny, _ = load_parts(tiny_model)
    with pytest.raises(UserError, match="none of object, digit is one token for this model's tokenizer"):
        check_adversarial(config, family_of(tiny), tiny)
    given = ForgetConfig(model="m", concept="c", surrogate="s", output_dir="o", adversarial=True,
                         adversarial_initializer="man")
    assert check_adversarial(given, family_of(tiny), tiny) == "man"


def test_lora_rank_and_alpha_out_of_range_are_refused_before_any_work(tiny_model, sets, tmp_path):
    refused = run_command(*forget_args(tiny_model, sets, "o"), "--lora-rank", "100000", code=2, cwd=tmp_path)
    assert "--lora-rank 100000 is more than the smaller side" in refused.output
    refused = run_command(*forget_args(tiny_model, sets, "o"), "--lora-rank", "4", "--lora-alpha", "1e30", "--fuse",
                          code=2, cwd=tmp_path)
    assert "--lora-alpha 1e+30 with --lora-rank 4 scales the adapter's update by 2.5e+29" in refused.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_a_result_identical_to_its_start_is_an_error_naming_the_cause(tiny_model, sets, tmp_path, monkeypatch):
    # An optimizer that moves nothing stands in for every cause (a learning rate too small for
    # float32, an adapter scaled to nothing): the run must not call the unchanged model a result.
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: None)
    refused = run_command(*forget_args(tiny_model, sets, "o"), "--learning-rate", "1e-9", code=2, cwd=tmp_path)
    [line] = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert "training changed nothing" in line and "--learning-rate 1e-09 too small" in line
    assert not (tmp_path / "o" / "amnesia.json").exists()


def test_attack_token_must_be_new_to_the_tokenizer(tiny_model):
    from amnesia_sd.method.textual_inversion import add_token
    from amnesia_sd.model.families import family_of

    pipe, _ = load_parts(tiny_model)
    before = len(pipe.tokenizer)
    for word in ("pitt", "Brad"):  # words of the vocabulary (the concept's own name among them)
        with pytest.raises(UserError, match=f"the token '{word}' is already a word of this model's tokenizer"):
            add_token(pipe, family_of(pipe), word, "man")
    assert len(pipe.tokenizer) == before  # nothing was added
    assert len(add_token(pipe, family_of(pipe), "<new-token>", "man")) == 1


def test_a_concept_longer_than_the_text_window_says_what_is_dropped(tiny_model, sets, tmp_path):
    long = "brad pitt " * 12  # the tiny tokenizer reads 16 tokens
    done = run_command(*forget_args(tiny_model, sets, "o")[:4], long.strip(), *forget_args(tiny_model, sets, "o")[5:],
                       "--no-templates", cwd=tmp_path)
    assert "1 prompt(s) of the concept" in done.output and "longer than the text encoder reads (16 tokens)" in done.output
    assert "is dropped from" in done.output


def test_a_cache_entry_that_cannot_be_removed_is_one_line(tmp_path, monkeypatch):
    """A read-only cache (simulated: this machine runs as root, which may write anywhere)."""
    from amnesia_sd.core import cache as cache_module

    monkeypatch.setenv("AMNESIA_SD_CACHE", str(tmp_path / "c"))
    entry = tmp_path / "c" / "models" / "ours"
    entry.mkdir(parents=True)
    (entry / "entry.json").write_text(json.dumps({**stamp(), "base_model": "m"}))

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_module.shutil, "rmtree", read_only)
    refused = run_command("cache", "clear", code=2, cwd=tmp_path)
    assert f"could not remove {entry} (Permission denied)" in refused.output and "Traceback" not in refused.output
    assert entry.is_dir()
