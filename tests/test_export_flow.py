"""`amnesia-sd export` of SD 3/3.5 and FLUX.1: the transformer alone in Stability's / Black Forest
Labs' original key layout, which diffusers' own single-file reader (and so ComfyUI and Forge, which
read the same files) turns back into exactly the same weights; and --lora-only, the adapter in
diffusers' layout, which diffusers' LoRA loader applies exactly as the result's own file."""

import json
import shutil

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors import safe_open
from safetensors.torch import load_file

from amnesia_sd.commands.export import ExportConfig, export as export_command, transformer_to_original
from amnesia_sd.core.errors import UserError
from amnesia_sd.core.io import write_safetensors
from amnesia_sd.model.families import FAMILIES
from helpers import run_command

QUICK = ["--num-inference-steps", "2", "--batch-size", "2", "--resolution", "16"]


def export(model, out, *, dtype="fp32", **kwargs):
    return export_command(ExportConfig(model=str(model), output=str(out), dtype=dtype, **kwargs))


def read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same(source, loaded, dtype):
    """Every tensor of `loaded` is the source's, rounded to `dtype` (exactly equal at fp32)."""
    a, b = source.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].to(dtype).float(), b[key].float()), key


def sd35_like(tiny_sd3_model, root):
    """The tiny SD3 with SD 3.5's extras: qk norm (ln_q/ln_k) and a dual-attention block (x_block.attn2)."""
    path = root / "sd35"
    shutil.copytree(tiny_sd3_model, path)
    config = dict(SD3Transformer2DModel.load_config(path, subfolder="transformer"))
    torch.manual_seed(4)
    transformer = SD3Transformer2DModel.from_config({**config, "qk_norm": "rms_norm", "dual_attention_layers": (0,)})
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "norm_" in name:  # RMSNorm weights start at one: make them tell q from k
                p.normal_()
    shutil.rmtree(path / "transformer")
    transformer.save_pretrained(path / "transformer")
    return path


@pytest.mark.parametrize("variant, dtype, torch_dtype", [("sd3", "fp32", torch.float32),
                                                          ("sd3", "bf16", torch.bfloat16),
                                                          ("sd35", "fp32", torch.float32)])
def test_sd3_reads_back_through_diffusers_single_file_reader(variant, dtype, torch_dtype, tiny_sd3_model, tmp_path):
    model = tiny_sd3_model if variant == "sd3" else sd35_like(tiny_sd3_model, tmp_path)
    out = export(model, tmp_path / "sd3.safetensors", dtype=dtype)
    tensors, metadata = read(out)
    source = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer")
    loaded = SD3Transformer2DModel.from_single_file(str(out), config=str(model), subfolder="transformer",
                                                    local_files_only=True, torch_dtype=torch_dtype)
    assert_same(source, loaded, torch_dtype)
    # the sd3_medium.safetensors layout: the MMDiT alone, under model.diffusion_model.
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    assert {v.dtype for v in tensors.values()} == {torch_dtype}
    last = source.config.num_layers - 1
    for key in ("joint_blocks.0.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.bias",
                "joint_blocks.0.context_block.attn.proj.weight", "joint_blocks.0.context_block.mlp.fc2.weight",
                f"joint_blocks.{last}.x_block.mlp.fc1.weight", "pos_embed", "x_embedder.proj.weight",
                "t_embedder.mlp.2.bias", "y_embedder.mlp.0.weight", "final_layer.adaLN_modulation.1.weight"):
        assert "model.diffusion_model." + key in tensors, key
    # the last block's context stream only feeds the attention
    assert f"model.diffusion_model.joint_blocks.{last}.context_block.attn.proj.weight" not in tensors
    assert f"model.diffusion_model.joint_blocks.{last}.context_block.mlp.fc1.weight" not in tensors
    extras = {"model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight",
              "model.diffusion_model.joint_blocks.1.context_block.attn.ln_k.weight",
              "model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight",
              "model.diffusion_model.joint_blocks.0.x_block.attn2.ln_k.weight"}
    assert extras & tensors.keys() == (extras if variant == "sd35" else set())
    assert metadata["format"] == "amnesia-sd-export" and metadata["tool"] == "amnesia-sd"
    assert metadata["architecture"] == "sd3" and metadata["layout"] == "sd3-transformer"
    assert metadata["prediction_type"] == "flow_matching" and metadata["dtype"] == dtype


def flux_expected_keys(config):
    """The tensor names Black Forest Labs' checkpoints use, as diffusers' Flux converter reads them."""
    linear = ("weight", "bias")
    modules = ["time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "txt_in",
               "img_in", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    if config.guidance_embeds:
        modules += ["guidance_in.in_layer", "guidance_in.out_layer"]
    norms = []
    for i in range(config.num_layers):
        modules += [f"double_blocks.{i}.{m}" for m in (
            "img_mod.lin", "txt_mod.lin", "img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj",
            "img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2")]
        norms += [f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale" for s in ("img", "txt") for n in ("query", "key")]
    for i in range(config.num_single_layers):
        modules += [f"single_blocks.{i}.{m}" for m in ("modulation.lin", "linear1", "linear2")]
        norms += [f"single_blocks.{i}.norm.{n}_norm.scale" for n in ("query", "key")]
    return {f"{m}.{leaf}" for m in modules for leaf in linear} | set(norms)


@pytest.mark.parametrize("guidance", [True, False])
def test_flux_layout(guidance, tiny_flux_model, tmp_path):
    """diffusers' Flux converter fixes inner_dim=3072 (it cannot split a tiny linear1), so here the names
    and the fused tensors are checked against diffusers' modules; test_flux_reads_back_at_full_width
    reads a full-width one back with from_single_file itself."""
    model = tiny_flux_model
    if not guidance:  # schnell: no guidance embedding
        model = tmp_path / "schnell"
        shutil.copytree(tiny_flux_model, model)
        config = dict(FluxTransformer2DModel.load_config(model, subfolder="transformer"))
        shutil.rmtree(model / "transformer")
        FluxTransformer2DModel.from_config({**config, "guidance_embeds": False}).save_pretrained(model / "transformer")
    out = export(model, tmp_path / "flux.safetensors")
    tensors, metadata = read(out)
    source = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer")
    state = source.state_dict()
    assert tensors.keys() == flux_expected_keys(source.config)  # no prefix: flux1-dev.safetensors' layout
    assert any(k.startswith("guidance_in.") for k in tensors) == guidance
    for i in range(source.config.num_layers):
        for side, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for leaf in ("weight", "bias"):
                expected = torch.cat([state[f"transformer_blocks.{i}.attn.{n}.{leaf}"] for n in names])
                assert torch.equal(tensors[f"double_blocks.{i}.{side}_attn.qkv.{leaf}"], expected)
        assert torch.equal(tensors[f"double_blocks.{i}.txt_attn.norm.key_norm.scale"],
                           state[f"transformer_blocks.{i}.attn.norm_added_k.weight"])
        assert torch.equal(tensors[f"double_blocks.{i}.txt_mlp.2.weight"],
                           state[f"transformer_blocks.{i}.ff_context.net.2.weight"])
    for i in range(source.config.num_single_layers):
        d = f"single_transformer_blocks.{i}."
        for leaf in ("weight", "bias"):
            expected = torch.cat([state[f"{d}attn.to_q.{leaf}"], state[f"{d}attn.to_k.{leaf}"],
                                  state[f"{d}attn.to_v.{leaf}"], state[f"{d}proj_mlp.{leaf}"]])
            assert torch.equal(tensors[f"single_blocks.{i}.linear1.{leaf}"], expected)
        assert torch.equal(tensors[f"single_blocks.{i}.linear2.weight"], state[f"{d}proj_out.weight"])
    for leaf in ("weight", "bias"):  # diffusers' (scale, shift) is the original (shift, scale)
        scale, shift = state[f"norm_out.linear.{leaf}"].chunk(2)
        assert torch.equal(tensors[f"final_layer.adaLN_modulation.1.{leaf}"], torch.cat([shift, scale]))
    assert metadata["architecture"] == "flux" and metadata["layout"] == "flux-transformer"
    assert metadata["prediction_type"] == "flow_matching"


@pytest.mark.slow
def test_flux_reads_back_at_full_width(tmp_path):
    """A one-block FLUX.1-dev-shaped transformer at the real width (inner dim 3072, what diffusers'
    converter assumes), exported and read back by FluxTransformer2DModel.from_single_file."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=64,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    folder = tmp_path / "flux"
    transformer.save_config(folder / "transformer")  # save_pretrained's config.json, without 2 GB of weights
    tensors, layout = transformer_to_original(transformer, FAMILIES["flux"])
    out = tmp_path / "flux1.safetensors"
    write_safetensors(out, {k: v.contiguous() for k, v in tensors.items()}, {"layout": layout})
    del tensors
    loaded = FluxTransformer2DModel.from_single_file(str(out), config=str(folder), subfolder="transformer",
                                                     local_files_only=True)
    assert_same(transformer, loaded, torch.float32)


def test_cli_and_output_guard(tiny_sd3_model, tmp_path):
    done = run_command("export", "--model", tiny_sd3_model, "--output", "sd3.safetensors", cwd=tmp_path)
    assert "checkpoint written to sd3.safetensors" in done.stdout
    tensors, metadata = read(tmp_path / "sd3.safetensors")
    assert metadata["dtype"] == "fp16" and {v.dtype for v in tensors.values()} == {torch.float16}
    inside = tiny_sd3_model / "transformer" / "x.safetensors"  # never inside the model given
    done = run_command("export", "--model", tiny_sd3_model, "--output", inside, cwd=tmp_path, code=2)
    assert len(done.output.strip().splitlines()) == 1 and not inside.exists()


def test_a_parameter_with_no_place_is_refused(tiny_flux_model):
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_model, subfolder="transformer")
    transformer.register_parameter("extra", torch.nn.Parameter(torch.zeros(1)))
    with pytest.raises(UserError, match="transformer parameter extra has no place .* not shaped like FLUX.1's"):
        transformer_to_original(transformer, FAMILIES["flux"])
    del transformer.extra
    del transformer.single_transformer_blocks[0].attn.norm_k  # an RMSNorm a BFL single block must have
    with pytest.raises(UserError, match="no single_transformer_blocks.0.attn.norm_k.weight, which .*key_norm.scale"):
        transformer_to_original(transformer, FAMILIES["flux"])


def test_lora_only_needs_a_lora_result(tiny_sd3_model, tmp_path):
    done = run_command("export", "--model", tiny_sd3_model, "--output", "x.safetensors", "--lora-only",
                       cwd=tmp_path, code=2)
    lines = done.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --lora-only needs a LoRA result"), done.output
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def flux_lora_result(tiny_flux_model, tmp_path_factory):
    """A LoRA result of forget on the tiny FLUX.1, as a user makes it."""
    root = tmp_path_factory.mktemp("flux-lora")
    model = str(tiny_flux_model)
    run_command("replay", "--model", model, "--output-dir", "replay", "--num-images", "2", *QUICK, cwd=root)
    run_command("surrogate", "--model", model, "--prompt", "a middle aged man", "--output-dir", "surrogate",
                "--num-images", "2", *QUICK, cwd=root)
    run_command("fim", "--model", model, "--replay-dir", "replay", "--output", "fim.safetensors", "--num-timesteps",
                "2", cwd=root)
    run_command("forget", "--model", model, "--concept", "Brad Pitt", "--surrogate-dir", "surrogate", "--replay-dir",
                "replay", "--fim", "fim.safetensors", "--max-train-steps", "3", "--train-batch-size", "2", *QUICK,
                "--output-dir", "lora", "--learning-rate", "1e-2", "--lora-rank", "4", cwd=root)
    return root / "lora"


def flux_images(pipe):
    return pipe("a photo of brad pitt", height=16, width=16, num_inference_steps=2, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_flux_lora_only_loads_as_the_results_own_lora(flux_lora_result, tiny_flux_model, tmp_path):
    result = flux_lora_result
    done = run_command("export", "--model", result, "--output", "forgotten-lora.safetensors", "--lora-only",
                       "--dtype", "fp32", cwd=tmp_path)
    assert "LoRA written to forgotten-lora.safetensors" in done.stdout
    path = tmp_path / "forgotten-lora.safetensors"
    tensors, metadata = read(path)
    own = load_file(str(result / "pytorch_lora_weights.safetensors"))
    assert tensors.keys() == own.keys() and all(torch.equal(tensors[k], own[k]) for k in own)  # diffusers' names
    assert any(k.startswith("transformer.single_transformer_blocks.") for k in tensors)
    assert metadata["format"] == "amnesia-sd-export-lora" and metadata["layout"] == "diffusers"
    assert metadata["architecture"] == "flux" and json.loads(metadata["forgotten_concepts"]) == ["Brad Pitt"]
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4"
    assert json.loads(metadata["lora"])["rank"] == 4

    pipe = FluxPipeline.from_pretrained(tiny_flux_model)
    pipe.set_progress_bar_config(disable=True)
    plain = flux_images(pipe)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    exported = flux_images(pipe)
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(result), weight_name="pytorch_lora_weights.safetensors")
    assert float(abs(exported - plain).max()) > 1e-4  # the adapter changes the images
    assert (exported == flux_images(pipe)).all()  # exactly as the result's own file does
    theirs = pipe.transformer.state_dict()
    assert state.keys() == theirs.keys() and all(torch.equal(state[k], theirs[k]) for k in state)

    # the default dtype: fp16 tensors, the same names
    run_command("export", "--model", result, "--output", "half.safetensors", "--lora-only", cwd=tmp_path)
    half, metadata = read(tmp_path / "half.safetensors")
    assert half.keys() == own.keys() and {v.dtype for v in half.values()} == {torch.float16}


def test_sd3_lora_only(tiny_sd3_model, tmp_path):
    """An SD3 LoRA result (made here with peft, as forget saves it): diffusers' names, the same delta."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_model, subfolder="transformer")
    torch.manual_seed(3)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                          "add_q_proj", "to_add_out"],
                                       init_lora_weights="gaussian"))
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    result = tmp_path / "forgotten"
    StableDiffusion3Pipeline.save_lora_weights(str(result),
                                               transformer_lora_layers=get_peft_model_state_dict(transformer))
    (result / "amnesia.json").write_text(json.dumps({
        "tool": "amnesia-sd", "base_model": str(tiny_sd3_model), "architecture": "sd3", "lora": {"rank": 4, "alpha": 4},
        "concepts": ["x"], "settings": {}}))
    path = export(result, tmp_path / "lora.safetensors", lora_only=True)
    tensors, metadata = read(path)
    own = load_file(str(result / "pytorch_lora_weights.safetensors"))
    assert tensors.keys() == own.keys() and {v.dtype for v in tensors.values()} == {torch.float32}
    assert "transformer.transformer_blocks.1.attn.add_q_proj.lora_A.weight" in tensors
    assert metadata["layout"] == "diffusers" and metadata["architecture"] == "sd3"
    assert "ss_network_module" not in metadata  # kohya's LoRA module: not what these names are

    deltas = {f"{name}.weight": m.lora_B["default"].weight @ m.lora_A["default"].weight
              for name, m in transformer.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}
    assert len(deltas) == len(own) // 2
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = pipe.transformer.state_dict()
    assert fused.keys() == base.keys()
    for key in base:  # diffusers' loader merges base + B @ A, nothing else
        torch.testing.assert_close(fused[key], base[key] + deltas.get(key, 0), rtol=1e-5, atol=1e-6, msg=key)
