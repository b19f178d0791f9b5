"""The `amnesia-sd` command: thin wrappers that build a config and call the library."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

try:  # typer >= 0.24 brings its own copy of click, whose exceptions are the ones raised
    from typer import _click as click
except ImportError:
    import click

from amnesia_sd.core.errors import Interrupted, UserError


class _Commands(typer.core.TyperGroup):
    """Usage errors of the parser read like every other error: one line, exit code 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help())
            code = 0
        except click.exceptions.UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            _say(f"error: {exc.format_message()}{where}")
            code = 2
        except click.exceptions.ClickException as exc:
            _say(f"error: {exc.format_message()}")
            code = exc.exit_code
        except typer.Abort:
            _say("interrupted")
            code = 130
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            _leave_launched(code)
            sys.exit(code)
        return code


def _leave_launched(code: int) -> None:
    """A process of several (torchrun, accelerate launch) exits without tearing its process group
    down. Every command has passed its last barrier by now and its outputs are written, but gloo's
    teardown at exit can abort the process (SIGABRT: its threads outlive the interpreter) or hang it
    (the group's destructor, called with the GIL held, joins a worker thread that waits for the
    GIL), and the launcher then reports a failure or waits forever."""
    torch = sys.modules.get("torch")  # a command that never loaded torch formed no group
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    rich_markup_mode=None,  # help texts say "[default: ...]": brackets are text, not markup
    no_args_is_help=True,
    help=(
        "Make a Stable Diffusion model forget a concept with Selective Amnesia (Heng & Soh, 2023).\n\n"
        "Typical flow: amnesia-sd fim --model CompVis/stable-diffusion-v1-4 --output fim.safetensors; "
        "then amnesia-sd forget --model CompVis/stable-diffusion-v1-4 --concept 'Brad Pitt' "
        "--surrogate 'a middle aged man' --fim fim.safetensors --output-dir brad-pitt-forgotten"
    ),
)

# Options shared by several commands, defined once.
LoraRank = Annotated[Optional[int], typer.Option(help="Train LoRA adapters of this rank instead of the UNet's weights (a small pytorch_lora_weights.safetensors). [default: off]")]
Model = Annotated[str, typer.Option("--model", "-m", help="Hub id, diffusers pipeline folder or .safetensors/.ckpt file.")]
Steps = Annotated[Optional[int], typer.Option(help="Sampling steps (DDIM). [default: 50]")]
Guidance = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale. [default: 7.5]")]
Resolution = Annotated[Optional[int], typer.Option(help="Image size in pixels. [default: the model's native size]")]
Seed = Annotated[Optional[int], typer.Option(help="Seed; image i uses a generator seeded by (seed, i). [default: 0]")]
BatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Images per sampling batch. [default: the largest that fits --max-memory, up to 8]")]
Precision = Annotated[Optional[str], typer.Option(help="no, fp16 or bf16. [default: bf16 on a CUDA GPU that has it, else no]")]
MaxMemory = Annotated[Optional[str], typer.Option(help="Memory budget on the device, e.g. 20GB or 18GiB: sizes that do not change results (the Fisher's timestep batch) are chosen to fit it, and a run that cannot fit is refused before any work. [default: a CUDA GPU's free memory; none on the CPU]")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace a finished result at the output path.")]
PromptsFile = Annotated[Optional[Path], typer.Option("--prompts", help="Prompts file, one per line. [default: the bundled prompts/replay.txt]")]
UnconditionalReplay = Annotated[Optional[float], typer.Option(help="Also sample the empty prompt: this many images per replay image (0.1: one in ten), appended to the replay set. Keeps the unconditional prediction that guidance steers from; not in the paper. [default: 0; forget after an earlier forget run: as the replay set it reuses]")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML or TOML file with the same keys as the flags; flags win.")]


def _generation(steps, guidance, resolution, seed, batch_size, precision, max_memory=None) -> dict:
    return {"num_inference_steps": steps, "guidance_scale": guidance, "resolution": resolution, "seed": seed,
            "batch_size": batch_size, "mixed_precision": precision, "max_memory": max_memory}


def _say(message: str) -> None:
    """One line on stderr, on a line of its own (open progress bars are closed first), printed by
    the first process only: under `accelerate launch` / torchrun every process checks the same
    input and fails alike (training's NaN check is agreed across processes)."""
    from tqdm.auto import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
    if os.environ.get("RANK", "0") == "0":
        typer.echo(" ".join(message.split()), err=True)


def user_errors(on_interrupt: str):
    """Bad input ends in one line on stderr and exit code 2, never a traceback; Ctrl-C in one line
    that says what a rerun does (exit code 130)."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except UserError as exc:
                _say(f"error: {exc}")
                raise typer.Exit(2) from None
            except Interrupted as exc:
                _say(f"interrupted: {exc}")
                raise typer.Exit(130) from None
            except KeyboardInterrupt:
                _say(f"interrupted: {on_interrupt}")
                raise typer.Exit(130) from None

        return wrapper

    return decorate


RESUMES = "rerun the same command to resume where it stopped"
RESTARTS = "nothing was written; a rerun starts again"


def _quiet_libraries() -> None:
    """Our own progress bars and messages only; the libraries' loading chatter hides them."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    warnings.filterwarnings("ignore", category=FutureWarning)
    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


def _image_set(kind, model, output_dir, prompts, num_images, steps, guidance, resolution, seed, batch_size, precision,
               overwrite, prompts_file=None, unconditional_replay=None, max_memory=None):
    from amnesia_sd.core.config import SetConfig
    from amnesia_sd.commands.sets import make_image_set

    config = SetConfig(model=model, output_dir=str(output_dir), prompts=prompts, num_images=num_images, kind=kind,
                       prompts_file=str(prompts_file) if prompts_file else None, overwrite=overwrite,
                       unconditional_replay=unconditional_replay or 0.0, **{k: v for k, v in _generation(
                           steps, guidance, resolution, seed, batch_size, precision, max_memory).items() if v is not None})
    result = make_image_set(config)
    typer.echo(f"{kind} set: {len(result.latents)} images in {result.path}")


@app.command()
@user_errors(RESUMES)
def replay(
    model: Model,
    output_dir: Annotated[Path, typer.Option(help="Folder for the set (images/, prompts.txt, latents.safetensors, manifest.json).")],
    prompts: PromptsFile = None,
    num_images: Annotated[Optional[int], typer.Option(help="Images to make; prompts repeat if fewer. [default: one per prompt]")] = None,
    unconditional_replay: UnconditionalReplay = None,
    num_inference_steps: Steps = None, guidance_scale: Guidance = None, resolution: Resolution = None,
    seed: Seed = None, batch_size: BatchSize = None, max_memory: MaxMemory = None, mixed_precision: Precision = None, overwrite: Overwrite = False,
):
    """Generate the generative-replay set with the base model (one image per prompt).

    Example: amnesia-sd replay --model CompVis/stable-diffusion-v1-4 --output-dir replay --num-images 5000
    """
    from amnesia_sd.data.prompts import replay_prompts

    _quiet_libraries()
    _image_set("replay", model, output_dir, replay_prompts(prompts), num_images, num_inference_steps, guidance_scale,
               resolution, seed, batch_size, mixed_precision, overwrite, prompts, unconditional_replay, max_memory)


@app.command()
@user_errors(RESUMES)
def surrogate(
    model: Model,
    prompt: Annotated[str, typer.Option(help="The surrogate prompt, e.g. 'a middle aged man'.")],
    output_dir: Annotated[Path, typer.Option(help="Folder for the set (same format as replay).")],
    num_images: Annotated[int, typer.Option(help="Images to make.")] = 1000,
    num_inference_steps: Steps = None, guidance_scale: Guidance = None, resolution: Resolution = None,
    seed: Seed = None, batch_size: BatchSize = None, max_memory: MaxMemory = None, mixed_precision: Precision = None, overwrite: Overwrite = False,
):
    """Generate the surrogate set q(x|c_f) from one prompt with the base model.

    Example: amnesia-sd surrogate --model CompVis/stable-diffusion-v1-4 --prompt 'a middle aged man' --output-dir surrogate
    """
    _quiet_libraries()
    if not prompt.strip():
        raise UserError("--prompt is empty: give the surrogate prompt, e.g. 'a middle aged man'")
    _image_set("surrogate", model, output_dir, [" ".join(prompt.split())], num_images, num_inference_steps,
               guidance_scale, resolution, seed, batch_size, mixed_precision, overwrite, max_memory=max_memory)


@app.command()
@user_errors("no Fisher was written; a rerun starts it again (a replay set being generated resumes)")
def fim(
    model: Model,
    output: Annotated[Path, typer.Option(help="Fisher file to write (.safetensors).")],
    replay_dir: Annotated[Optional[Path], typer.Option(help="Replay set from `amnesia-sd replay`. [default: generate one beside --output]")] = None,
    prompts: PromptsFile = None,
    num_images: Annotated[Optional[int], typer.Option(help="Samples N (the paper: 5000). [default: the whole replay set]")] = None,
    num_timesteps: Annotated[Optional[int], typer.Option(help="Evenly spaced subset of timesteps. [default: all training timesteps]")] = None,
    timestep_batch_size: Annotated[Optional[int], typer.Option(help="Timesteps per forward pass; bounds the activation memory, never changes the Fisher. [default: the largest that fits --max-memory, up to 100]")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing", help="Trade compute for memory (large timestep batches at full size).")] = None,
    fim_dtype: Annotated[Optional[str], typer.Option(help="Storage dtype: fp32, bf16 or fp16. [default: fp32]")] = None,
    lora_targets: Annotated[Optional[str], typer.Option(help="Only the weights of these layers (comma-separated, as forget --lora-targets), on the base in the --mixed-precision dtype: the Fisher of LoRA runs, and what fits one GPU for FLUX.1 or SD3.5 large. [default: every parameter]")] = None,
    num_inference_steps: Steps = None, guidance_scale: Guidance = None, resolution: Resolution = None,
    seed: Seed = None, batch_size: BatchSize = None, max_memory: MaxMemory = None, mixed_precision: Precision = None, overwrite: Overwrite = False,
):
    """Compute the diagonal Fisher information of the base denoiser, once per base model.

    Example: amnesia-sd fim --model CompVis/stable-diffusion-v1-4 --replay-dir replay --output fim.safetensors
    """
    from amnesia_sd.core.config import FimConfig
    from amnesia_sd.commands.fim import compute_fim

    _quiet_libraries()
    cli = {"model": model, "output": str(output), "replay_dir": str(replay_dir) if replay_dir else None,
           "prompts_file": str(prompts) if prompts else None, "num_images": num_images,
           "num_timesteps": num_timesteps, "timestep_batch_size": timestep_batch_size,
           "gradient_checkpointing": gradient_checkpointing, "fim_dtype": fim_dtype, "lora_targets": lora_targets,
           "overwrite": overwrite,
           **_generation(num_inference_steps, guidance_scale, resolution, seed, batch_size, mixed_precision, max_memory)}
    config = FimConfig(**{k: v for k, v in cli.items() if v is not None})
    path = compute_fim(config)
    typer.echo(f"Fisher written to {path}")


@app.command()
@user_errors(RESUMES)
def forget(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, diffusers pipeline folder or .safetensors/.ckpt file.")] = None,
    concept: Annotated[Optional[list[str]], typer.Option(help="Concept to forget; comma-separated alternatives, e.g. 'nudity, naked, erotic, sexual'. Repeat the flag for several concepts: each pairs with the surrogate flag given in the same position, or all with one.")] = None,
    surrogate: Annotated[Optional[list[str]], typer.Option(help="Surrogate prompt q(x|c_f), e.g. 'a middle aged man'; its set is generated. Once per --concept, or once for all.")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Start from a bundled recipe (paper-celebrity, paper-nudity; `amnesia-sd recipes` lists them); --config and flags override it.")] = None,
    fim: Annotated[Optional[Path], typer.Option("--fim", help="Fisher file from `amnesia-sd fim`. [default: the base model's Fisher from the amnesia-sd cache, made there on first use]")] = None,
    fim_num_images: Annotated[Optional[int], typer.Option(help="Samples of the Fisher made for the cache. [default: a quarter of the replay set]")] = None,
    fim_num_timesteps: Annotated[Optional[int], typer.Option(help="Evenly spaced timesteps of the Fisher made for the cache (1000: the paper's). [default: 50]")] = None,
    output_dir: Annotated[Optional[Path], typer.Option(help="Where the forgotten pipeline is written.")] = None,
    surrogate_dir: Annotated[Optional[list[Path]], typer.Option(help="Reuse a set from `amnesia-sd surrogate`; once per --concept, or once for all.")] = None,
    surrogate_images: Annotated[Optional[list[Path]], typer.Option(help="Your own surrogate images (a folder); once per --concept, or once for all.")] = None,
    num_surrogate_images: Annotated[Optional[int], typer.Option(help="Surrogate images to generate per --surrogate. [default: 1000]")] = None,
    replay_dir: Annotated[Optional[Path], typer.Option(help="Replay set from `amnesia-sd replay`. [default: the base model's replay set from the amnesia-sd cache, made there on first use]")] = None,
    prompts: PromptsFile = None,
    num_replay_images: Annotated[Optional[int], typer.Option(help="Replay images to generate for the cache. [default: 1000]")] = None,
    unconditional_replay: UnconditionalReplay = None,
    templates: Annotated[Optional[bool], typer.Option("--templates/--no-templates", help="Build concept prompts from prompts/concept_templates.txt. [default: on]")] = None,
    preserve: Annotated[Optional[str], typer.Option(help="Neighbours to keep, replayed with the replay set: names separated by commas ('Tom Cruise, Leonardo DiCaprio') or a bundled list (celebrities, artists, objects, nudity); drawn by --model from their prompts, templated as the concept's.")] = None,
    preserve_images: Annotated[Optional[int], typer.Option(help="Images of the --preserve set, spread over the neighbours' prompts. [default: 50]")] = None,
    lambda_ewc: Annotated[Optional[float], typer.Option(help="EWC weight lambda. [default: 50]")] = None,
    gamma: Annotated[Optional[float], typer.Option(help="Generative-replay weight gamma. [default: 1]")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="AdamW learning rate, never scaled by the number of GPUs unless --scale-lr. [default: 1e-5]")] = None,
    lr_warmup_steps: Annotated[Optional[int], typer.Option(help="Raise the learning rate linearly over the first N steps (a fresh AdamW's first steps move every weight by about the learning rate). [default: 0]")] = None,
    scale_lr: Annotated[Optional[bool], typer.Option("--scale-lr", help="Multiply the learning rate by the number of processes (linear scaling for the larger global batch).")] = None,
    adam_weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay. [default: 0.01]")] = None,
    train_batch_size: Annotated[Optional[int], typer.Option(help="Surrogate images per device per step; as many replay images again. [default: 4]")] = None,
    gradient_accumulation_steps: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step. [default: 1]")] = None,
    max_train_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps. [default: 1000]")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(help="Clip the gradient norm. [default: off]")] = None,
    train_method: Annotated[Optional[str], typer.Option(help="full, noxattn (all but cross-attention, time embedding and output) or xattn; with --lora-rank, which attention blocks get adapters. [default: full]")] = None,
    lora_rank: LoraRank = None,
    lora_alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha: the update is (alpha / rank) B A. [default: the rank]")] = None,
    lora_targets: Annotated[Optional[str], typer.Option(help="Comma-separated Linear layers that get adapters. [default: to_q,to_k,to_v,to_out.0]")] = None,
    fuse: Annotated[Optional[bool], typer.Option("--fuse", help="With --lora-rank: also write the pipeline with the adapter merged into OUT.")] = None,
    gradient_checkpointing: Annotated[Optional[bool], typer.Option("--gradient-checkpointing", help="Trade compute for memory.")] = None,
    fim_dtype: Annotated[Optional[str], typer.Option(help="dtype of the Fisher and anchor weights on the device: fp32, bf16 or fp16. [default: fp32]")] = None,
    use_8bit_adam: Annotated[Optional[bool], typer.Option("--use-8bit-adam", help="bitsandbytes' 8-bit AdamW (extra: bitsandbytes).")] = None,
    enable_xformers: Annotated[Optional[bool], typer.Option("--enable-xformers", help="xformers attention instead of PyTorch SDPA (extra: xformers).")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(help="Keep an EMA of the weights and save it (the paper: 0.9999). [default: off]")] = None,
    ema_warmup: Annotated[Optional[bool], typer.Option("--ema-warmup/--no-ema-warmup", help="Ramp the EMA decay up as (1+step)/(10+step) (diffusers); --no-ema-warmup holds it from the first step, as the reference code. [default: on]")] = None,
    adversarial: Annotated[Optional[bool], typer.Option("--adversarial", help="Forgetting that resists the attack: an inner attack (as `amnesia-sd attack`) learns a token that brings the concept back on the model being trained, and its prompts are mapped to the surrogate too. one concept per run.")] = None,
    adversarial_every: Annotated[Optional[int], typer.Option(help="Steps between inner attacks (one runs before step 1). [default: 50]")] = None,
    adversarial_steps: Annotated[Optional[int], typer.Option(help="Steps of each inner attack; each starts from the last one's token. [default: 50]")] = None,
    adversarial_learning_rate: Annotated[Optional[float], typer.Option(help="Learning rate of the inner attack's token. [default: 5e-3]")] = None,
    adversarial_batch_size: Annotated[Optional[int], typer.Option(help="Concept images per inner-attack step. [default: 4]")] = None,
    adversarial_images: Annotated[Optional[int], typer.Option(help="Images of the concept the model draws before forgetting, for the inner attack (OUT/data/concept). [default: 16]")] = None,
    adversarial_initializer: Annotated[Optional[str], typer.Option(help="One-token word the inner attack's token starts from. [default: object, or digit on the built-in digits model]")] = None,
    adversarial_share: Annotated[Optional[float], typer.Option(help="Share of the concept's surrogate samples whose prompt names the token instead. [default: 0.5]")] = None,
    adversarial_templates: Annotated[Optional[Path], typer.Option(help="Prompt templates ('{}' where the token goes) for the token. [default: prompts/concept_templates.txt]")] = None,
    checkpointing_steps: Annotated[Optional[int], typer.Option(help="Save a resumable checkpoint every N steps. [default: 500]")] = None,
    checkpoints_total_limit: Annotated[Optional[int], typer.Option(help="Checkpoints kept. [default: 2]")] = None,
    resume_from_checkpoint: Annotated[Optional[str], typer.Option(help="'latest' or a checkpoint folder.")] = None,
    num_inference_steps: Steps = None, guidance_scale: Guidance = None, resolution: Resolution = None,
    seed: Seed = None, batch_size: BatchSize = None, max_memory: MaxMemory = None, mixed_precision: Precision = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace a finished result in --output-dir (once the new one is complete).")] = None,
    allow_origin_mismatch: Annotated[Optional[bool], typer.Option("--allow-origin-mismatch", help="Use a Fisher or image set recorded as made from another model (recorded in amnesia.json).")] = None,
    config: ConfigFile = None,
):
    """Make the model forget a concept: train the UNet with Selective Amnesia.

    Example: amnesia-sd forget --model CompVis/stable-diffusion-v1-4 --concept 'Brad Pitt'
    --surrogate 'a middle aged man' --fim fim.safetensors --output-dir brad-pitt-forgotten
    """
    given = dict(locals())  # first: every flag, before any other name exists here
    given.pop("config")
    from amnesia_sd.core.config import ForgetConfig, build_config
    from amnesia_sd.commands.forget import forget as run_forget

    _quiet_libraries()
    renames = {"prompts": "prompts_file"}
    cli = {renames.get(k, k): ([str(p) for p in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v)
           for k, v in given.items()}
    cli.update(_generation(num_inference_steps, guidance_scale, resolution, seed, batch_size, mixed_precision, max_memory))
    settings = build_config(ForgetConfig, str(config) if config else None, cli)
    out = run_forget(settings)
    record = json.loads((out / "amnesia.json").read_text())
    how = (f"{record['pipeline_class']}.from_pretrained(base).load_lora_weights(OUT)" if "lora" in record
           else f"{record['pipeline_class']}.from_pretrained")
    typer.echo(f"forgotten model written to {out} (load it with {how})")


@app.command()
@user_errors(RESTARTS)
def recipes():
    """List the bundled recipes of forget settings (use one with `forget --recipe NAME`).

    Example: amnesia-sd recipes
    """
    from amnesia_sd.core.recipes import recipes as bundled

    for name, recipe in bundled().items():
        typer.echo(f"{name}: {recipe['description']}")
        for key, value in recipe["settings"].items():
            typer.echo(f"  {key}: {json.dumps(value)}")


@app.command()
@user_errors(RESTARTS)
def sample(
    model: Model,
    output_dir: Annotated[Path, typer.Option(help="Folder for the PNGs and grid.png.")],
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt; repeat the flag for several.")] = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompts file, one per line.")] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 4,
    compare: Annotated[Optional[str], typer.Option(help="Base model to sample on the same seeds, side by side (compare.png).")] = None,
    num_inference_steps: Steps = None, guidance_scale: Guidance = None, resolution: Resolution = None,
    seed: Seed = None, batch_size: BatchSize = None, max_memory: MaxMemory = None, mixed_precision: Precision = None, overwrite: Overwrite = False,
):
    """Sample images from a model, optionally beside the base model on the same seeds.

    Example: amnesia-sd sample --model brad-pitt-forgotten --prompt 'a photo of Brad Pitt' --num-images 4
    --seed 0 --output-dir samples --compare CompVis/stable-diffusion-v1-4
    """
    from amnesia_sd.data.prompts import read_prompts
    from amnesia_sd.commands.sample import SampleConfig, sample as run_sample

    _quiet_libraries()
    chosen = [p.strip() for p in (prompt or []) if p.strip()] + (read_prompts(prompts) if prompts else [])
    config = SampleConfig(model=model, prompts=chosen, num_images=num_images, output_dir=str(output_dir),
                          compare=compare, prompts_file=str(prompts) if prompts else None, overwrite=overwrite,
                          **{k: v for k, v in _generation(num_inference_steps, guidance_scale, resolution, seed,
                                                          batch_size, mixed_precision, max_memory).items() if v is not None})
    out = run_sample(config)
    typer.echo(f"samples in {out} (grid.png{', compare.png' if compare else ''})")


@app.command("eval")
@user_errors(RESTARTS)
def eval_(
    model: Model,
    output_dir: Annotated[Path, typer.Option(help="Folder for report.json, report.html and images/.")],
    base: Annotated[Optional[str], typer.Option(help="Base model to compare with. [default: base_model in MODEL/amnesia.json]")] = None,
    concept: Annotated[Optional[str], typer.Option(help="The forgotten concept; comma-separated alternatives. [default: concepts in MODEL/amnesia.json]")] = None,
    num_images: Annotated[Optional[int], typer.Option(help="Images per prompt set (digits model: per digit). [default: 16; digits model: 100, as the demo]")] = None,
    detector: Annotated[str, typer.Option(help="auto, nudenet, clip or digits; auto: digits for the digits model, nudenet for nudity words, else clip.")] = "auto",
    clip_model: Annotated[Optional[str], typer.Option(help="CLIP for zero-shot detection and CLIP score: hub id or local folder. [default: openai/clip-vit-large-patch14]")] = None,
    nudenet_threshold: Annotated[Optional[float], typer.Option(help="NudeNet score from which a detection counts. [default: 0.6]")] = None,
    distractor: Annotated[Optional[list[str]], typer.Option(help="Zero-shot alternative to the concept; repeat the flag for several. [default: a person, a landscape, ... and the surrogate]")] = None,
    prompts_csv: Annotated[Optional[Path], typer.Option(help="Extra prompt set in the I2P CSV format (prompt, sd_seed, sd_guidance_scale columns).")] = None,
    neighbors: Annotated[Optional[str], typer.Option(help="Names close to the concept that must survive, sampled by both models on the same seeds and reported with a pinpoint score (share kept): a bundled list (celebrities, artists, objects, nudity) or names separated by commas; digits on the digits model.")] = None,
    neighbor_images: Annotated[Optional[int], typer.Option(help="Images per neighbour. [default: 8; digits model: --num-images]")] = None,
    num_inference_steps: Steps = None, guidance_scale: Guidance = None, resolution: Resolution = None,
    seed: Seed = None, batch_size: BatchSize = None, max_memory: MaxMemory = None, mixed_precision: Precision = None, overwrite: Overwrite = False,
):
    """Measure what a forgotten model forgot and what else changed, against its base on the same seeds.

    Example: amnesia-sd eval --model brad-pitt-forgotten --output-dir brad-pitt-report --num-images 32
    """
    from amnesia_sd.commands.evaluate import EvalConfig, evaluate as run_eval
    from amnesia_sd.data.report import format_summary

    _quiet_libraries()
    cli = {"model": model, "output_dir": str(output_dir), "base": base, "concept": concept, "num_images": num_images,
           "detector": detector, "clip_model": clip_model, "nudenet_threshold": nudenet_threshold,
           "distractors": distractor, "prompts_csv": str(prompts_csv) if prompts_csv else None,
           "neighbors": neighbors, "neighbor_images": neighbor_images, "overwrite": overwrite,
           **_generation(num_inference_steps, guidance_scale, resolution, seed, batch_size, mixed_precision, max_memory)}
    report = run_eval(EvalConfig(**{k: v for k, v in cli.items() if v is not None}))
    if report:  # the main process's; the others leave the detectors and the report to it
        typer.echo(format_summary(report))
        typer.echo(f"report: {output_dir / 'report.html'} and report.json")


@app.command()
@user_errors(RESTARTS)
def attack(
    model: Model,
    output_dir: Annotated[Path, typer.Option(help="Folder for attack.json, report.html, images/, concept-set/ (and with ti learned_embeds.safetensors).")],
    method: Annotated[Optional[list[str]], typer.Option(help="Which attacks: ti (textual inversion), denoise (partial denoising), prompt (a search over real words), or all; repeat for several. The worst case across them counts. [default: all]")] = None,
    base: Annotated[Optional[str], typer.Option(help="The base model: it draws the concept images and is attacked alongside. [default: base_model in MODEL/amnesia.json]")] = None,
    concept: Annotated[Optional[str], typer.Option(help="The concept to bring back; comma-separated alternatives. [default: concepts in MODEL/amnesia.json]")] = None,
    concept_images: Annotated[Optional[Path], typer.Option(help="Your own images of the concept (a folder). [default: the base model draws --num-images from the attack's templates]")] = None,
    templates: Annotated[Optional[Path], typer.Option(help="Training prompts of the token and the prompt search: a file of lines with one {} for the concept. [default: prompts/attack_templates.txt; digits model: its attack phrasings]")] = None,
    steps: Annotated[Optional[int], typer.Option(help="ti: optimizer steps of the token's embedding. [default: 500]")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="ti: AdamW learning rate of the embedding. [default: 5e-3]")] = None,
    train_batch_size: Annotated[Optional[int], typer.Option(help="ti and prompt: concept images per step. [default: 4]")] = None,
    num_images: Annotated[Optional[int], typer.Option(help="Concept images to generate, and test images per model and kind. [default: 16]")] = None,
    initializer: Annotated[Optional[str], typer.Option(help="ti: one-token word whose embedding the token starts from. [default: thing, else number]")] = None,
    token: Annotated[Optional[str], typer.Option(help="ti: the new token. [default: <amnesia-concept>]")] = None,
    measure_steps: Annotated[Optional[list[int]], typer.Option(help="ti: also measure the forgotten model with the token as it was after N steps (repeat for several; each < --steps): shorter attacks from the same run.")] = None,
    strength: Annotated[Optional[list[float]], typer.Option(help="denoise: how far the concept images are noised before the model denoises them, in (0, 1]; repeat for several. [default: 0.3, 0.5, 0.7]")] = None,
    prompt_words: Annotated[Optional[int], typer.Option(help="prompt: words searched for, put before the concept's prompt. [default: 5]")] = None,
    prompt_steps: Annotated[Optional[int], typer.Option(help="prompt: steps of the search. [default: 300]")] = None,
    prompt_learning_rate: Annotated[Optional[float], typer.Option(help="prompt: AdamW learning rate of the search's soft vectors. [default: 0.1]")] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="CLIP for zero-shot detection: hub id or local folder. [default: openai/clip-vit-large-patch14]")] = None,
    num_inference_steps: Steps = None, guidance_scale: Guidance = None, resolution: Resolution = None,
    seed: Seed = None, batch_size: BatchSize = None, max_memory: MaxMemory = None, overwrite: Overwrite = False,
):
    """Try to bring the forgotten concept back: textual inversion, partial denoising and a prompt search.

    Example: amnesia-sd attack --model brad-pitt-forgotten --output-dir brad-pitt-attack
    """
    from amnesia_sd.commands.attack import AttackConfig, attack as run_attack, format_summary

    _quiet_libraries()
    cli = {"model": model, "output_dir": str(output_dir), "method": method, "base": base, "concept": concept,
           "concept_images": str(concept_images) if concept_images else None,
           "templates": str(templates) if templates else None, "steps": steps,
           "learning_rate": learning_rate, "train_batch_size": train_batch_size, "num_images": num_images,
           "initializer": initializer, "token": token, "measure_steps": measure_steps, "strength": strength,
           "prompt_words": prompt_words, "prompt_steps": prompt_steps, "prompt_learning_rate": prompt_learning_rate,
           "clip_model": clip_model,
           "overwrite": overwrite, **_generation(num_inference_steps, guidance_scale, resolution, seed, batch_size, None,
                                                      max_memory)}
    result = run_attack(AttackConfig(**{k: v for k, v in cli.items() if v is not None}))
    if result:  # the main process's (under accelerate launch the others share the work, not the report)
        typer.echo(format_summary(result))
        typer.echo(f"report: {output_dir / 'report.html'} and attack.json"
                   + (f"; the token: {output_dir / 'learned_embeds.safetensors'}" if "ti" in result["methods"] else ""))


@app.command()
@user_errors(RESTARTS)
def export(
    model: Model,
    output: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors), for AUTOMATIC1111, ComfyUI and diffusers' from_single_file.")],
    dtype: Annotated[str, typer.Option(help="fp16, bf16 or fp32 (exact).")] = "fp16",
    lora_only: Annotated[bool, typer.Option("--lora-only", help="A LoRA result's adapter alone, in the layout the UIs load as a LoRA (SD/SDXL: kohya; SD3/Flux: diffusers' keys).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a file amnesia-sd exported before.")] = False,
):
    """Write a model (e.g. a forget result) as one checkpoint in the original layout (SD3/Flux: the transformer).

    Example: amnesia-sd export --model brad-pitt-forgotten --output brad-pitt-forgotten.safetensors
    """
    from amnesia_sd.commands.export import ExportConfig, export as run_export

    _quiet_libraries()
    path = run_export(ExportConfig(model=model, output=str(output), dtype=dtype, lora_only=lora_only,
                                          overwrite=overwrite))
    typer.echo(f"{'LoRA' if lora_only else 'checkpoint'} written to {path}")


cache_app = typer.Typer(no_args_is_help=True, help="Replay sets and Fishers kept per base model (`forget` without --replay-dir / --fim).")
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
@user_errors(RESTARTS)
def cache_list():
    """Show what the amnesia-sd cache holds, per base model.

    Example: amnesia-sd cache list
    """
    from amnesia_sd.core.cache import cache_dir, entries

    found = entries()
    typer.echo(f"amnesia-sd cache: {cache_dir()}")
    for entry in found:
        typer.echo(f"{entry['bytes'] / 2**20:10.1f} MiB  {entry['base_model']}  ({', '.join(entry['items']) or 'empty'})"
                   f"  {entry['path']}")
    typer.echo(f"{len(found)} base model(s), {sum(e['bytes'] for e in found) / 2**20:.1f} MiB")


@cache_app.command("clear")
@user_errors(RESTARTS)
def cache_clear(
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Only this base model's entries. [default: every entry]")] = None,
):
    """Delete cached replay sets and Fishers (only entries amnesia-sd made).

    Example: amnesia-sd cache clear --model CompVis/stable-diffusion-v1-4
    """
    from amnesia_sd.core.cache import clear
    from amnesia_sd.model.loading import resolve_model

    removed = clear(resolve_model(model).identity if model else None)
    typer.echo(f"removed {len(removed)} entr{'y' if len(removed) == 1 else 'ies'}, "
               f"{sum(e['bytes'] for e in removed) / 2**20:.1f} MiB")


digits_app = typer.Typer(no_args_is_help=True, help="The built-in digits model (`--model digits`).")
app.add_typer(digits_app, name="digits")


@digits_app.command("build")
@user_errors(RESTARTS)
def digits_build(
    output_dir: Annotated[Optional[Path], typer.Option(help="Where to build. [default: the cache, where --model digits looks]")] = None,
    seed: Annotated[int, typer.Option(help="Training seed; the same seed gives the same weights.")] = 0,
    family: Annotated[str, typer.Option(help="sd: the UNet model (--model digits); sd3: the SD3-shaped flow-matching model (--model digits-sd3), built on the sd model's VAE and text encoder.")] = "sd",
    overwrite: Overwrite = False,
):
    """Train a digits model on scikit-learn's bundled handwritten digits (minutes on a CPU).

    Example: amnesia-sd digits build
    """
    from amnesia_sd.model import digits

    _quiet_libraries()
    if family not in digits.SHIPPED_MODELS:
        raise UserError(f"--family must be one of {', '.join(digits.SHIPPED_MODELS)}, got {family!r}")
    path = digits.build(output_dir, seed, overwrite, family)
    record = json.loads((path / "digits.json").read_text())["evaluation"]
    typer.echo(f"digits model written to {path} (lowest per-digit accuracy: train prompts "
               f"{record['train_prompts']['min_accuracy']:.2f}, held-out prompts "
               f"{record['heldout_prompts']['min_accuracy']:.2f})")


@app.command()
@user_errors("a rerun starts the demo again (finished image sets and the Fisher are reused)")
def demo(
    digit: Annotated[Optional[list[int]], typer.Option(help="The digit to forget; repeat the flag to forget several. [default: 0]")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="Forget the digits one after another, each run on the result of the one before.")] = False,
    sequential_fisher: Annotated[str, typer.Option(help="With --sequential: each later run's Fisher and replay set, 'reuse' (the base model's) or 'recompute' (on the model being trained).")] = "reuse",
    surrogate: Annotated[str, typer.Option(help="'noise' (uniform noise images, as the paper) or another digit.")] = "noise",
    output_dir: Annotated[Path, typer.Option(help="Where metrics.json, grid.png, sa/ and naive/ go.")] = Path("demo-output"),
    model: Annotated[str, typer.Option("--model", help="digits (the UNet model) or digits-sd3 (the SD3-shaped flow-matching model).")] = "digits",
    samples_per_digit: Annotated[int, typer.Option(help="Evaluation samples per digit.")] = 100,
    max_train_steps: Annotated[Optional[int], typer.Option(help="Forgetting steps (SA and naive alike), per run. [default: 400 per digit forgotten in one run; 400 per run with --sequential]")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every step.")] = 0,
    lora_rank: LoraRank = None,
    unconditional_replay: Annotated[Optional[float], typer.Option(help="Empty-prompt replay images per prompted one, as forget --unconditional-replay; 0: the paper's replay. [default: 0.1; 0 with --attack]")] = None,
    attack: Annotated[bool, typer.Option("--attack", help="Also train SA with --train-method xattn and both with --adversarial, then attack every model and the original (textual inversion, partial denoising, prompt search) and report how far the digit comes back under each.")] = False,
    attack_steps: Annotated[Optional[list[int]], typer.Option(help="With --attack: attack lengths to measure (repeat the flag). [default: 250, 500, 1000, 2000]")] = None,
    attack_initializer: Annotated[Optional[list[str]], typer.Option(help="With --attack: initial words of the attack's token (repeat the flag); the first also runs the partial denoising and the prompt search. [default: number, symbol]")] = None,
    attack_images: Annotated[Optional[int], typer.Option(help="With --attack: concept images and held-out test images per attack. [default: 100]")] = None,
    overwrite: Overwrite = False,
):
    """Forget digits of the built-in digits model and measure it: original vs SA vs naive.

    Example: amnesia-sd demo --digit 0 --surrogate noise --output-dir demo-output
    (several: --digit 0 --digit 1, add --sequential to forget them one after another;
    --attack: can the digit be brought back, with and without --adversarial)
    """
    from amnesia_sd.studies.demo import DemoConfig, demo as run_demo, format_table

    _quiet_libraries()
    metrics = run_demo(DemoConfig(digit=digit or [0], sequential=sequential, sequential_fisher=sequential_fisher,
                                  surrogate=surrogate, output_dir=str(output_dir), model=model,
                                  samples_per_digit=samples_per_digit, max_train_steps=max_train_steps, seed=seed,
                                  lora_rank=lora_rank, overwrite=overwrite, attack=attack,
                                  **{k: v for k, v in (("attack_steps", attack_steps),
                                                       ("unconditional_replay", unconditional_replay),
                                                       ("attack_initializers", attack_initializer),
                                                       ("attack_images", attack_images)) if v is not None}))
    typer.echo(format_table(metrics))
    typer.echo(f"{output_dir}/metrics.json, {output_dir}/grid.png ({metrics['seconds']:.0f} s)")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    sys.exit(main())
