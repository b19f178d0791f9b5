"""Issue 24's cases: what a careless user could lose, and what must refuse in one line."""

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
import torch

from amnesia_sd.errors import UserError
from amnesia_sd.paths import stamp
from helpers import load_parts, run_command


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
    from amnesia_sd.cache import model_entry

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
    from amnesia_sd.export import FORMAT, LORA_FORMAT
    from amnesia_sd.paths import Output, check_output

    own = stamped_file(tmp_path / "model.safetensors", FORMAT)
    assert check_output(Output("--output", own, None, "export", (FORMAT, LORA_FORMAT)), overwrite=True)
    with pytest.raises(UserError, match="already holds a finished export"):
        check_output(Output("--output", own, None, "export", (FORMAT, LORA_FORMAT)), overwrite=False)
