"""The Fisher is exactly METHOD.md's: per sample, the gradient of the loss summed over timesteps,
squared, averaged over samples; it does not depend on how timesteps are batched."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from amnesia_sd.core.errors import UserError
from amnesia_sd.method.fisher import fisher_diagonal, load_fisher, sample_noise, save_fisher, timestep_set
from amnesia_sd.model.diffusion import diffusion_target
from amnesia_sd.model.families import FAMILIES
from helpers import load_parts, random_latents

PROMPTS = ["a photo of a dog", "a painting of a house", "a cat in a tree"]


SD = FAMILIES["sd"]


def embedder(pipe, prompts):
    return lambda n: SD.encode_text(pipe, [prompts[n]])


def brute_force_fisher(family, unet, scheduler, latents, embed, timesteps, seed):
    """The reference way: one batch-1 forward per timestep, gradients summed, squared per sample."""
    params = dict(unet.named_parameters())
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    scale = scheduler.config.num_train_timesteps / len(timesteps)
    for n in range(len(latents)):
        noise = sample_noise(seed, n, len(timesteps), tuple(latents.shape[1:]))
        emb = embed(n)
        loss = 0
        for j, t in enumerate(timesteps):
            t1 = t.reshape(1)
            x = latents[n : n + 1]
            noisy = scheduler.add_noise(x, noise[j : j + 1], t1)
            pred = unet(noisy, t1, emb["encoder_hidden_states"]).sample
            target = diffusion_target(scheduler, x, noise[j : j + 1], t1)
            loss = loss + ((pred - target) ** 2).mean()
        grads = torch.autograd.grad(loss * scale, list(params.values()), allow_unused=True)
        for (k, _), g in zip(params.items(), grads):
            if g is not None:
                total[k] += g**2
    return {k: v / len(latents) for k, v in total.items()}


def assert_rel_close(got, expected, tol=1e-4):
    """float32 sums in another order differ in the last bits: compare against each tensor's scale."""
    assert set(got) == set(expected)
    for k in expected:
        scale = expected[k].abs().max().clamp_min(1e-30)
        assert (got[k] - expected[k]).abs().max() <= tol * scale, k


@pytest.fixture(scope="module")
def parts(tiny_model):
    return load_parts(tiny_model)


def test_fisher_equals_brute_force_and_ignores_chunking(parts):
    pipe, scheduler = parts
    latents, timesteps = random_latents(3), timestep_set(1000, 7)
    args = (SD, pipe.unet, scheduler, latents, embedder(pipe, PROMPTS), timesteps, 5)
    expected = brute_force_fisher(*args)
    for chunk in (7, 3, 1):
        assert_rel_close(fisher_diagonal(*args, timestep_batch_size=chunk, progress=False), expected)
    assert sum(v.sum() for v in expected.values()) > 0


def test_gradient_checkpointing_gives_the_same_fisher(tiny_model, parts):
    pipe, scheduler = parts
    latents, timesteps = random_latents(2), timestep_set(1000, 5)
    plain = fisher_diagonal(SD, pipe.unet, scheduler, latents, embedder(pipe, PROMPTS), timesteps, 3, 5, progress=False)
    saving, _ = load_parts(tiny_model)  # its own copy: the shared one stays as it is
    saving.unet.enable_gradient_checkpointing()
    recomputed = []
    for module in saving.unet.modules():  # count the blocks that run checkpointed
        checkpoint = getattr(module, "_gradient_checkpointing_func", None)
        if checkpoint is not None:
            module._gradient_checkpointing_func = (
                lambda *a, _run=checkpoint, **k: (recomputed.append(1), _run(*a, **k))[1])
    saved = fisher_diagonal(SD, saving.unet, scheduler, latents, embedder(saving, PROMPTS), timesteps, 3, 5, progress=False)
    assert recomputed, "checkpointing was not used"
    assert_rel_close(saved, plain, tol=1e-5)


def test_shards_add_up_to_the_whole(parts):
    pipe, scheduler = parts
    latents, timesteps = random_latents(3), timestep_set(1000, 4)
    args = (SD, pipe.unet, scheduler, latents, embedder(pipe, PROMPTS), timesteps, 1, 4)
    whole = fisher_diagonal(*args, progress=False)
    a = fisher_diagonal(*args, indices=[0, 2], progress=False)
    b = fisher_diagonal(*args, indices=[1], progress=False)
    assert_rel_close({k: a[k] + b[k] for k in a}, whole, tol=1e-6)


def test_v_prediction_target_and_fisher(tiny_vpred_model):
    pipe, scheduler = load_parts(tiny_vpred_model)
    assert scheduler.config.prediction_type == "v_prediction"
    x, noise, t = random_latents(2), random_latents(2, seed=1), torch.tensor([10, 900])
    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(scheduler, x, noise, t), alpha * noise - sigma * x)
    latents, timesteps = random_latents(2), timestep_set(1000, 3)
    args = (SD, pipe.unet, scheduler, latents, embedder(pipe, PROMPTS), timesteps, 2)
    expected = brute_force_fisher(*args)
    assert_rel_close(fisher_diagonal(*args, timestep_batch_size=2, progress=False), expected)


def test_timestep_set():
    assert timestep_set(1000, None).tolist() == list(range(1000))
    subset = timestep_set(1000, 50)
    assert len(subset) == 50 and subset[0] == 0 and subset[-1] == 999
    assert (subset.diff() > 0).all()


def test_save_and_load_round_trip(parts, tmp_path):
    pipe, _ = parts
    fisher = {k: torch.rand_like(p) for k, p in pipe.unet.named_parameters()}
    path = tmp_path / "fim.safetensors"
    save_fisher(path, fisher, "fp32", {"base_model": "tiny", "num_samples": "3"})
    loaded, meta = load_fisher(path, pipe)
    assert meta["format"] == "amnesia-sd-fisher" and meta["base_model"] == "tiny" and meta["dtype"] == "fp32"
    for k in fisher:
        assert torch.equal(loaded[k], fisher[k])
    save_fisher(tmp_path / "half.safetensors", fisher, "bf16", {})
    assert next(iter(load_file(str(tmp_path / "half.safetensors")).values())).dtype == torch.bfloat16


def test_mismatched_fisher_files_are_refused(parts, tmp_path):
    pipe, _ = parts
    good = {k: torch.ones_like(p) for k, p in pipe.unet.named_parameters()}
    missing = dict(good)
    missing.pop(next(iter(missing)))
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match="1 parameter\\(s\\) missing"):
        load_fisher(tmp_path / "missing.safetensors", pipe)
    reshaped = dict(good)
    name = next(iter(reshaped))
    reshaped[name] = torch.ones(3)
    save_file(reshaped, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UserError, match=f"{name} has shape \\(3,\\)"):
        load_fisher(tmp_path / "shape.safetensors", pipe)
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match="not a safetensors Fisher file"):
        load_fisher(tmp_path / "pickle.safetensors", pipe)


def fp16_gradients(unet, shrink: float):
    """Emulates the backward of fp16 autocast for a model whose loss gradients are `shrink` times
    this tiny one's (SD at 512 px: 4x64x64 latents instead of 4x8x8, fewer timesteps): the gradient
    reaching every layer's output is rounded to fp16 at that size. Returns the hooks' handles."""

    def to_half(module, grad_output):
        return tuple(None if g is None else (g * shrink).half().float() / shrink for g in grad_output)

    return [m.register_full_backward_pre_hook(to_half) for m in unet.modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_fp16_loss_scaling_keeps_the_small_entries_that_unscaled_fp16_loses(parts):
    from amnesia_sd.method.fisher import FP16_LOSS_SCALE

    pipe, scheduler = parts
    latents, timesteps = random_latents(2), timestep_set(1000, 4)
    args = (SD, pipe.unet, scheduler, latents, embedder(pipe, PROMPTS), timesteps, 0, 4)
    exact = torch.cat([v.flatten() for v in fisher_diagonal(*args, progress=False).values()])
    handles = fp16_gradients(pipe.unet, shrink=1e-5)
    try:
        unscaled = torch.cat([v.flatten() for v in fisher_diagonal(*args, progress=False).values()])
        scaled = torch.cat([v.flatten() for v in fisher_diagonal(*args, progress=False,
                                                                  loss_scale=FP16_LOSS_SCALE).values()])
    finally:
        for handle in handles:
            handle.remove()
    lost = lambda f: int(((f == 0) & (exact > 0)).sum())  # noqa: E731  entries left unanchored
    off = lambda f: int(((f - exact).abs() > 0.1 * exact).sum())  # noqa: E731  entries off by over 10 %
    # Measured: unscaled loses 128 entries and gets 154,022 of 792,964 off by over 10 %; scaled 0 and 58.
    assert lost(unscaled) > 0 and off(unscaled) > 0.1 * exact.numel()
    assert lost(scaled) == 0 and off(scaled) < 1e-3 * exact.numel()
    assert (scaled - exact).norm() <= 1e-3 * exact.norm()


def test_fp16_autocast_fisher_with_loss_scaling_equals_fp32_and_backs_off_on_overflow(parts):
    """Real fp16 autocast on the CPU: the scaled Fisher is fp32's up to fp16's rounding, also when the
    first scale is so large that fp16 overflows (the sample is done again at a smaller scale)."""
    pipe, scheduler = parts
    latents, timesteps = random_latents(2), timestep_set(1000, 4)
    args = (SD, pipe.unet, scheduler, latents, embedder(pipe, PROMPTS), timesteps, 0, 4)
    exact = fisher_diagonal(*args, progress=False)
    half = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    for start in (2.0**16, 2.0**30):
        got = fisher_diagonal(*args, progress=False, autocast=half, loss_scale=start)
        assert all(torch.isfinite(v).all() for v in got.values())
        flat = lambda f: torch.cat([v.flatten() for v in f.values()])  # noqa: E731
        assert (flat(got) - flat(exact)).norm() <= 1e-2 * flat(exact).norm()
        assert int(((flat(got) == 0) & (flat(exact) > 0)).sum()) == 0
