"""Image sets: seeded per image (batching never changes them), resumable, user images encoded."""

import pytest
import torch
from PIL import Image

from amnesia_sd.commands.sets import make_image_set
from amnesia_sd.core.config import SetConfig
from amnesia_sd.core.errors import UserError
from amnesia_sd.data import imageset
from amnesia_sd.data.imageset import encode_image_folder, load_image_set
from amnesia_sd.model.loading import make_accelerator, resolve_model
from helpers import load_parts

PROMPTS = ["a photo of a dog", "a cat", "a house in a tree", "a woman", "a man"]


def make(tiny_model, out, **kw):
    settings = {"model": str(tiny_model), "output_dir": str(out), "prompts": PROMPTS, "num_inference_steps": 3,
                "batch_size": 2, **kw}
    return make_image_set(SetConfig(**settings))


def test_batch_size_does_not_change_the_set(tiny_model, tmp_path):
    a = make(tiny_model, tmp_path / "a", batch_size=1)
    b = make(tiny_model, tmp_path / "b", batch_size=5)
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-4)  # batched matmuls round differently
    assert a.prompts == b.prompts == PROMPTS
    other_seed = make(tiny_model, tmp_path / "c", seed=1)
    assert not torch.allclose(a.latents, other_seed.latents)


def test_interrupted_set_resumes_where_it_stopped(tiny_model, tmp_path, monkeypatch):
    whole = make(tiny_model, tmp_path / "whole")
    real_save, saved = imageset._save_image, []

    def save_three_then_die(partial, index, *rest):
        if len(saved) == 3:
            raise KeyboardInterrupt
        real_save(partial, index, *rest)
        saved.append(index)

    monkeypatch.setattr(imageset, "_save_image", save_three_then_die)
    with pytest.raises(KeyboardInterrupt):
        make(tiny_model, tmp_path / "set")
    assert not (tmp_path / "set").exists() and (tmp_path / "set.partial").is_dir()
    with pytest.raises(UserError, match="not a finished image set"):
        load_image_set(tmp_path / "set.partial")
    monkeypatch.setattr(imageset, "_save_image", lambda partial, index, *rest: (
        saved.append(index), real_save(partial, index, *rest)))
    resumed = make(tiny_model, tmp_path / "set")
    # Finished batches are kept; the half-saved batch (2, 3) is made again whole, in the same batch
    # as without the interruption, so the set is bit for bit the uninterrupted one.
    assert saved == [0, 1, 2, 2, 3, 4]
    assert torch.equal(resumed.latents, whole.latents)
    assert not (tmp_path / "set.partial").exists()
    with pytest.raises(UserError, match="already holds a finished image set"):
        make(tiny_model, tmp_path / "set")


def test_partial_set_with_other_settings_is_not_mixed_in(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(imageset, "_save_image", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        make(tiny_model, tmp_path / "set")
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"interrupted run made with other settings \(guidance_scale: 7.5 -> 3.0\)"):
        make(tiny_model, tmp_path / "set", guidance_scale=3.0)


def test_user_images_are_cropped_and_encoded(tiny_model, tmp_path):
    source = tmp_path / "mine"
    source.mkdir()
    for i, size in enumerate([(40, 20), (16, 16), (20, 50)]):
        Image.new("RGB", size, (40 * i, 100, 200)).save(source / f"{i}.png")
    (source / "notes.txt").write_text("not an image")
    pipe, _ = load_parts(tiny_model)
    result = encode_image_folder(pipe, resolve_model(str(tiny_model)), source, tmp_path / "set", None,
                                 make_accelerator())
    assert result.latents.shape == (3, 4, 8, 8)
    assert result.manifest["source"] == "images" and [f[0] for f in result.manifest["files"]] == ["0.png", "1.png", "2.png"]
    assert all(Image.open(p).size == (16, 16) for p in (result.path / "images").iterdir())
    with pytest.raises(UserError, match="holds no images"):
        encode_image_folder(pipe, resolve_model(str(tiny_model)), tmp_path / "set" / "images" / "..",
                            tmp_path / "x", None, make_accelerator())


def test_processes_share_whole_batches():
    from amnesia_sd.data.generate import process_share

    for count, batch, world in [(5, 2, 2), (17, 4, 3), (3, 8, 2), (10, 1, 4)]:
        shares = [process_share(count, batch, rank, world) for rank in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(count))
        for share in shares:  # each process's batches are exactly the single process's batches
            for k in range(0, len(share), batch):
                chunk = share[k : k + batch]
                assert chunk == list(range(chunk[0], chunk[0] + len(chunk))) and chunk[0] % batch == 0
