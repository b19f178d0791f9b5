"""SD 3/3.5 and FLUX.1 through the family seam: the conditioning as the pipelines' own encode_prompt
makes it, the flow-matching loss and its Fisher against direct computations, the timestep draws of
diffusers' training scripts, and the whole command flow on tiny pipelines, read back by plain
diffusers (full weights, merged LoRA, and the LoRA file on the base)."""

import json
import textwrap

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors import safe_open
from safetensors.torch import load_file

from amnesia_sd.data.imageset import load_image_set
from amnesia_sd.data.prompts import concept_prompts
from amnesia_sd.method.fisher import fisher_diagonal, sample_noise
from amnesia_sd.model.diffusion import per_sample_loss
from amnesia_sd.model.families import FAMILIES, family_of
from amnesia_sd.model.loading import load_pipeline, resolve_model
from helpers import run_command
from test_eval import tiny_clip  # noqa: F401 (a fixture)

QUICK = ["--num-inference-steps", "2", "--batch-size", "2", "--resolution", "16"]
PROMPTS = ["", "a photo of a dog in a house", *concept_prompts(["Brad Pitt"], True)[:3],
           "a painting of a tree " * 8]  # the last is longer than CLIP's 16-token window here


@pytest.fixture(params=["sd3", "flux", "flux-schnell"])
def flow_model(request, tiny_sd3_model, tiny_flux_model, tiny_flux_schnell_model):
    """Tiny SD3, FLUX.1 dev (guidance embedding) and FLUX.1 schnell (none) pipelines."""
    return {"sd3": tiny_sd3_model, "flux": tiny_flux_model, "flux-schnell": tiny_flux_schnell_model}[request.param]


def test_conditioning_is_what_encode_prompt_makes(flow_model):
    pipe = load_pipeline(resolve_model(str(flow_model)))
    family = family_of(pipe)
    ours = family.encode_text(pipe, PROMPTS)
    with torch.no_grad():
        if family.name == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=family.max_sequence_length)
        else:
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=family.max_sequence_length)
    assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["pooled_projections"], pooled)
    if family.name == "sd3":  # SD3 without T5: its zeros, as the pipeline pads them
        pipe.text_encoder_3 = pipe.tokenizer_3 = None
        ours = family.encode_text(pipe, PROMPTS)
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
        assert torch.equal(ours["encoder_hidden_states"], embeds) and torch.equal(ours["pooled_projections"], pooled)


def test_what_no_text_encoder_reads_is_what_t5s_window_cuts(flow_model):
    """A phrasing past CLIP's window still reaches the transformer through T5: only what T5 cuts is lost."""
    pipe = load_pipeline(resolve_model(str(flow_model)))
    family = family_of(pipe)
    t5 = getattr(pipe, family.tokenizers[-1])
    assert family.window(pipe) == family.max_sequence_length
    within = "a painting of a tree " * 8  # past CLIP's 16 tokens here, inside T5's window
    assert len(pipe.tokenizer(within).input_ids) > pipe.tokenizer.model_max_length
    assert family.beyond_window(pipe, within) == ""
    long = " ".join(f"tree{i % 10}" for i in range(family.max_sequence_length))  # several T5 tokens per word
    dropped = family.beyond_window(pipe, long)
    kept = t5(long, max_length=family.max_sequence_length, truncation=True).input_ids[:-1]  # without </s>
    assert dropped and t5.decode(kept + t5(dropped, add_special_tokens=False).input_ids).replace(" ", "") == \
        long.replace(" ", "")


def _direct_loss(pipe, family, latents, noise, index, text, guidance):
    """The flow-matching loss written out as diffusers' SD3 and Flux training scripts compute it."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sigmas = scheduler.sigmas[index].view(-1, 1, 1, 1)
    noisy = (1 - sigmas) * latents + sigmas * noise
    timesteps = scheduler.timesteps[index]
    if family.name == "sd3":
        prediction = pipe.transformer(hidden_states=noisy, timestep=timesteps, pooled_projections=text["pooled_projections"],
                                      encoder_hidden_states=text["encoder_hidden_states"]).sample
    else:
        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", latents.dtype)
        text_ids = torch.zeros(text["encoder_hidden_states"].shape[1], 3)
        out = pipe.transformer(hidden_states=packed, timestep=timesteps / 1000,
                               guidance=guidance if pipe.transformer.config.guidance_embeds else None,
                               pooled_projections=text["pooled_projections"],
                               encoder_hidden_states=text["encoder_hidden_states"], txt_ids=text_ids,
                               img_ids=image_ids).sample
        prediction = FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                                  pipe.vae_scale_factor)
    return ((prediction - (noise - latents)) ** 2).mean(dim=(1, 2, 3))


def test_flow_matching_loss_and_its_fisher_against_direct_computations(flow_model):
    pipe = load_pipeline(resolve_model(str(flow_model)))
    family = family_of(pipe)
    scheduler = family.training_scheduler(pipe.scheduler.config)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    index = torch.tensor([120, 730])
    text = family.encode_text(pipe, ["a photo of Brad Pitt", "a dog"])
    guidance = torch.tensor([3.5, 7.5])
    cond = {**text, "guidance": guidance} if family.name == "flux" else text
    ours = per_sample_loss(family, pipe.transformer, scheduler, latents, noise, index, cond)
    torch.testing.assert_close(ours, _direct_loss(pipe, family, latents, noise, index, text, guidance))
    assert ours.shape == (2,) and (ours > 0).all()

    # The Fisher of one sample over 3 timesteps: the squared gradient of N/3 x sum_t w_t L_t.
    timesteps = torch.tensor([40, 500, 960])
    weights = family.timestep_weights(scheduler)[timesteps]
    one = {k: v[:1] for k, v in cond.items()}
    fisher = fisher_diagonal(family, pipe.transformer, scheduler, latents[:1], lambda n: one, timesteps, seed=5,
                             timestep_batch_size=2, progress=False)
    pipe.transformer.zero_grad()
    n = sample_noise(5, 0, 3, (4, 8, 8))
    losses = _direct_loss(pipe, family, latents[:1].expand(3, -1, -1, -1), n, timesteps,
                          {k: v[:1].expand(3, *v.shape[1:]) for k, v in text.items()}, guidance[:1].expand(3))
    ((losses * weights).sum() * 1000 / 3).backward()
    for name, p in pipe.transformer.named_parameters():
        expected = p.grad ** 2  # (to rounding: the Fisher sums its timestep chunks' gradients)
        torch.testing.assert_close(fisher[name], expected, rtol=1e-4, atol=1e-5 * float(expected.max()))
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    if family.name == "sd3":  # logit-normal: the middle timesteps weigh more than the ends
        assert weights[1] > 1 > weights[0] and weights[1] > 1 > weights[2]
    else:
        assert torch.equal(weights, torch.ones(3))


@pytest.mark.parametrize("name,scheme", [("sd3", "logit_normal"), ("flux", "none")])
def test_timesteps_are_drawn_as_diffusers_training_scripts_draw_them(name, scheme):
    family, scheduler = FAMILIES[name], FlowMatchEulerDiscreteScheduler(shift=3.0)
    drawn = family.draw_timesteps(scheduler, 200_000, torch.Generator().manual_seed(1))
    u = compute_density_for_timestep_sampling(scheme, 200_000, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(1))
    assert torch.equal(drawn, (u * 1000).long())
    # The Fisher's weights are the draw's distribution: ten bins of 100 timesteps, within sampling error.
    expected = family.timestep_weights(scheduler).view(10, 100).sum(1) / 1000
    observed = torch.bincount(drawn // 100, minlength=10).float() / len(drawn)
    torch.testing.assert_close(observed, expected, atol=3e-3, rtol=0)
    assert family.timestep_weights(scheduler).sum().item() == pytest.approx(1000, rel=1e-5)


PLAIN_CHECK = textwrap.dedent("""
    import json, sys, torch, numpy as np
    sys.stdin.readline()
    import diffusers
    from diffusers import AutoPipelineForText2Image
    from PIL import Image
    from safetensors.torch import load_file
    base, full, lora, attack = sys.argv[1:5]
    kwargs = dict(height=16, width=16, num_inference_steps=2, output_type="np")
    run = lambda pipe: pipe("a photo of brad pitt", generator=torch.Generator().manual_seed(0), **kwargs).images
    out = AutoPipelineForText2Image.from_pretrained(full)
    print(type(out).__name__, run(out).shape)
    merged = run(AutoPipelineForText2Image.from_pretrained(lora))  # the --fuse pipeline
    pipe = AutoPipelineForText2Image.from_pretrained(base)
    plain = run(pipe)
    pipe.load_lora_weights(lora)  # the LoRA file on the base, as diffusers users load it
    adapted = run(pipe)
    print("LORA-CHANGES", float(abs(adapted - plain).max()) > 1e-4)
    print("LORA-IS-MERGED", float(abs(adapted - merged).max()) < 1e-3)

    # The attack's partial denoising, redone with the family's img2img pipeline on the forgotten model.
    result = json.load(open(f"{attack}/attack.json"))
    img2img = getattr(diffusers, result["methods"]["denoise"]["load_with"].split("diffusers.")[1].split(".")[0])
    pipe = img2img.from_pretrained(full)
    entries = [e["denoise-0.5"] for e in result["images"]]  # in the attack's batch
    images = pipe([d["prompt"] for d in entries], image=[Image.open(f"{attack}/{d['input']}") for d in entries],
                  strength=0.5, num_inference_steps=2, guidance_scale=7.5,
                  generator=[torch.Generator().manual_seed(e["seed"]) for e in result["images"]]).images
    same = [np.array_equal(np.asarray(image), np.asarray(Image.open(f"{attack}/{d['forgotten']['image']}")))
            for image, d in zip(images, entries)]
    print("DENOISE-REPLAYS", img2img.__name__, all(same))
    # The token: diffusers' own loader where the pipeline has one (Flux), else the lines the attack gives (SD3).
    pipe = AutoPipelineForText2Image.from_pretrained(full)
    state = load_file(f"{attack}/learned_embeds.safetensors")
    token = result["settings"]["token"]
    if hasattr(pipe, "load_textual_inversion"):
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["t5"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    else:
        import os
        os.chdir(attack)  # the line names the file as it lies in the attack's folder
        exec(result["methods"]["ti"]["load_with"].replace("safetensors.torch.load_file", "load_file"))
    print("TOKEN-LOADS", type(run(pipe)).__name__)
""")


def test_commands_on_tiny_sd3_and_flux(flow_model, tiny_clip, tmp_path, early_python):
    model = str(flow_model)
    check = early_python(PLAIN_CHECK, model, tmp_path / "out", tmp_path / "lora", tmp_path / "attack")
    run_command("replay", "--model", model, "--output-dir", "replay", "--num-images", "4", *QUICK, cwd=tmp_path)
    run_command("fim", "--model", model, "--replay-dir", "replay", "--output", "fim.safetensors", "--num-timesteps",
                "6", "--timestep-batch-size", "3", cwd=tmp_path)
    run_command("surrogate", "--model", model, "--prompt", "a middle aged man", "--output-dir", "surrogate",
                "--num-images", "2", *QUICK, "--guidance-scale", "3.5", cwd=tmp_path)
    common = ["--model", model, "--concept", "Brad Pitt", "--surrogate-dir", "surrogate", "--replay-dir", "replay",
              "--fim", "fim.safetensors", "--max-train-steps", "3", "--train-batch-size", "2", *QUICK]
    run_command("forget", *common, "--output-dir", "out", "--learning-rate", "1e-3", cwd=tmp_path)
    run_command("forget", *common, "--output-dir", "lora", "--learning-rate", "1e-2", "--lora-rank", "4", "--fuse",
                cwd=tmp_path)
    run_command("sample", "--model", "out", "--prompt", "a photo of brad pitt", "--num-images", "2", "--output-dir",
                "samples", "--compare", model, *QUICK, cwd=tmp_path)

    base = load_pipeline(resolve_model(model))
    family = family_of(base)
    with safe_open(str(tmp_path / "fim.safetensors"), "pt") as f:  # one entry per transformer parameter
        assert set(f.keys()) == {n for n, _ in base.transformer.named_parameters()}
        assert f.metadata()["prediction_type"] == "flow_matching" and f.metadata()["architecture"] == family.name
    replay, surrogate = load_image_set(tmp_path / "replay"), load_image_set(tmp_path / "surrogate")
    assert replay.manifest["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    assert replay.manifest["max_sequence_length"] == family.max_sequence_length
    if family.name == "flux":  # the guidance each image was made with is what training embeds
        assert replay.conditioning["guidance"].tolist() == [7.5] * 4
        assert surrogate.conditioning["guidance"].tolist() == [3.5] * 2
    else:
        assert replay.conditioning == {}

    # Only the transformer changed; the result says what it is and how it loads.
    record = json.loads((tmp_path / "out" / "amnesia.json").read_text())
    assert record["architecture"] == family.name and record["pipeline_class"] == family.pipeline
    out = load_pipeline(resolve_model(str(tmp_path / "out")))
    for part in ("vae", *family.text_encoders):
        for (k, a), (_, b) in zip(getattr(base, part).state_dict().items(), getattr(out, part).state_dict().items()):
            assert torch.equal(a, b), (part, k)
    moved = [k for k, v in out.transformer.state_dict().items() if not torch.equal(v, base.transformer.state_dict()[k])]
    assert moved
    lora = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") and (".lora_A." in k or ".lora_B." in k) for k in lora)
    assert sorted(p.name for p in (tmp_path / "samples" / "images").iterdir()) == ["p000_s000.png", "p000_s001.png"]

    # eval and every kind of attack, on the forgotten model against its base
    run_command("eval", "--model", "out", "--output-dir", "report", "--concept", "Brad Pitt", "--num-images", "2",
                "--clip-model", str(tiny_clip), *QUICK, cwd=tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["models"]["base"]["identity"] == str(flow_model.resolve()) and report["detector"] == "clip"
    assert report["settings"]["scheduler"] == "FlowMatchEulerDiscreteScheduler"  # what sampled, not DDIM
    run_command("attack", "--model", "out", "--output-dir", "attack", "--concept", "Brad Pitt", "--initializer", "dog",
                "--steps", "2", "--num-images", "2", "--strength", "0.5", "--prompt-words", "2", "--prompt-steps", "2",
                "--clip-model", str(tiny_clip), *QUICK, cwd=tmp_path)
    result = json.loads((tmp_path / "attack" / "attack.json").read_text())
    assert list(result["methods"]) == ["ti", "denoise", "prompt"]
    assert sorted(load_file(str(tmp_path / "attack" / "learned_embeds.safetensors"))) == sorted(family.embedding_keys)
    for word in result["methods"]["prompt"]["prompt"].split():  # one token in every tokenizer
        for tokenizer in family.tokenizers:
            assert len(getattr(base, tokenizer).encode(word, add_special_tokens=False)) == 1
    assert all(0 <= m["after"] <= 1 for m in result["methods"].values())

    done = check()
    assert f"{family.pipeline} (1, 16, 16, 3)" in done.stdout, done.stderr
    assert "LORA-CHANGES True" in done.stdout and "LORA-IS-MERGED True" in done.stdout, done.stdout + done.stderr
    assert f"DENOISE-REPLAYS {family.img2img_pipeline} True" in done.stdout, done.stdout + done.stderr
    assert "TOKEN-LOADS ndarray" in done.stdout, done.stdout + done.stderr


def test_flow_families_refuse_what_they_do_not_have(tiny_flux_model, tmp_path):
    common = ["forget", "--model", str(tiny_flux_model), "--concept", "Brad Pitt", "--surrogate", "a man",
              "--output-dir", "out", *QUICK]
    done = run_command(*common, "--train-method", "xattn", cwd=tmp_path, code=2)
    assert "--train-method xattn names a UNet's cross-attention (attn2)" in done.output
    done = run_command(*common, "--unconditional-replay", "0.1", cwd=tmp_path, code=2)
    assert "--unconditional-replay is not supported on this FLUX.1 pipeline" in done.output
    # the memory plan measures the transformer (packed latents, both kinds of blocks) and refuses before work
    done = run_command(*common, "--max-memory", "4MB", "--gradient-checkpointing", cwd=tmp_path, code=2)
    [error] = [line for line in done.output.splitlines() if line.startswith("error:")]
    assert "training needs about" in error and "the budget is 3.8 MiB" in error and "--lora-rank 8 (" in error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_the_fisher_of_a_lora_run_covers_its_adapted_layers_on_a_16_bit_base(tiny_flux_model, tmp_path):
    """What makes FLUX.1 fit one GPU: `fim --lora-targets` and `forget --lora-rank` without --fim hold
    the gradient and sum of the adapted weights alone, the base in the mixed-precision dtype; its
    entries are the full Fisher's (in float32, exactly those values); forget takes it only for LoRA."""
    model = str(tiny_flux_model)
    run_command("replay", "--model", model, "--output-dir", "replay", "--num-images", "2", *QUICK, cwd=tmp_path)
    fim = ["fim", "--model", model, "--replay-dir", "replay", "--num-timesteps", "4", "--timestep-batch-size", "2"]
    run_command(*fim, "--output", "full.safetensors", cwd=tmp_path)
    run_command(*fim, "--output", "lora.safetensors", "--lora-targets", "to_q,to_v", cwd=tmp_path)
    run_command(*fim, "--output", "lora-bf16.safetensors", "--lora-targets", "to_q,to_v", "--mixed-precision", "bf16",
                cwd=tmp_path)
    full, lora = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "lora.safetensors"))
    pipe = load_pipeline(resolve_model(model))
    adapted = {f"{n}.weight" for n, m in pipe.transformer.named_modules() if n.endswith((".to_q", ".to_v"))}
    assert set(lora) == adapted and len(full) > len(lora)
    for name, value in lora.items():
        torch.testing.assert_close(value, full[name], rtol=1e-5, atol=0)
    with safe_open(str(tmp_path / "lora-bf16.safetensors"), "pt") as f:
        meta = f.metadata()
        assert meta["covers"] == "lora" and meta["lora_targets"] == "to_q,to_v" and meta["weights_dtype"] == "bfloat16"
        assert set(f.keys()) == adapted
    common = ["forget", "--model", model, "--concept", "Brad Pitt", "--surrogate", "a man", "--replay-dir", "replay",
              "--max-train-steps", "2", "--train-batch-size", "1", "--num-surrogate-images", "2", *QUICK]
    done = run_command(*common, "--fim", "lora.safetensors", "--output-dir", "full-out", cwd=tmp_path, code=2)
    assert "holds only a LoRA run's adapted layers (--lora-targets to_q,to_v)" in done.output
    done = run_command(*common, "--fim", "lora.safetensors", "--output-dir", "more", "--lora-rank", "2",
                       "--lora-targets", "to_q,to_k", cwd=tmp_path, code=2)
    assert "holds only the entries of a LoRA run's adapted layers (--lora-targets to_q,to_v), not " in done.output
    assert ".attn.to_k.weight" in done.output
    assert not list(tmp_path.glob("*out*")) and not (tmp_path / "more").exists()
    # forget --lora-rank under bf16 without --fim: its own Fisher of the adapted layers, on the bf16 base
    run_command(*common, "--output-dir", "lora-out", "--lora-rank", "2", "--lora-targets", "to_q,to_v",
                "--mixed-precision", "bf16", "--learning-rate", "1e-2", cwd=tmp_path)
    record = json.loads((tmp_path / "lora-out" / "amnesia.json").read_text())
    meta = record["fim"]["metadata"]
    assert meta["covers"] == "lora" and meta["weights_dtype"] == "bfloat16" and meta["lora_layers"] == str(len(adapted))
    adapter = load_file(str(tmp_path / "lora-out" / "pytorch_lora_weights.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in adapter.values())
