"""Textual inversion: a new token in the tokenizer(s), its embedding row(s) learned alone with the
denoising loss, saved in diffusers' textual-inversion format. The attack command and forget
--adversarial's inner attack share it."""

from __future__ import annotations

import copy
import random
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from amnesia_sd.core.errors import UserError
from amnesia_sd.data.generate import image_seed
from amnesia_sd.data.imageset import ImageSet
from amnesia_sd.model.diffusion import per_sample_loss
from amnesia_sd.model.families import take, to_device

EMBEDDINGS = "learned_embeds.safetensors"  # diffusers' textual-inversion file name


def initializer_id(tokenizer, initializer: str, flag: str = "--initializer") -> int:
    """The token id of a one-token word; anything else is refused in one line naming `flag`."""
    ids = tokenizer.encode(initializer.strip(), add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"{flag} {initializer!r} is {len(ids)} tokens for this model's tokenizer, not one: "
                        "pick a single-token word (e.g. object, person; digit on the digits model)")
    return ids[0]


def choose_initializer(text, family, given: str | None, defaults: tuple[str, ...], flag: str) -> str:
    """`given`, checked to be one token in every tokenizer of `text`; else the first of `defaults`
    that every tokenizer keeps as one token."""
    tokenizers = [getattr(text, tok) for tok, _ in family.text_parts()]
    if given is not None:
        for tokenizer in tokenizers:
            initializer_id(tokenizer, given, flag)
        return given
    for word in defaults:
        if all(len(t.encode(word, add_special_tokens=False)) == 1 for t in tokenizers):
            return word
    raise UserError(f"none of {', '.join(defaults)} is one token for this model's tokenizer: pass {flag} with a "
                    "neutral one-token word")


def text_copies(pipe, family) -> SimpleNamespace:
    """Copies of the pipeline's tokenizers and text encoders, for a token that must not enter the
    pipeline's own (forget --adversarial's, the prompt search's)."""
    return SimpleNamespace(**{name: copy.deepcopy(getattr(pipe, name)) for pair in family.text_parts()
                              for name in pair})


def draw_batch(images: ImageSet, size: int, generator: torch.Generator, draw_t) -> dict:
    """`size` of the set's latents (by index, with replacement), their noise and timesteps (`draw_t(count,
    generator)`: the family's draw_timesteps), drawn on the CPU in that order, so a seed gives the
    same batches on any device."""
    index = torch.randint(len(images.latents), (size,), generator=generator)
    latents = images.latents[index]
    return {"index": index, "latents": latents, "noise": torch.randn(latents.shape, generator=generator),
            "t": draw_t(size, generator)}


def add_token(text, family, token: str, initializer: str, flag: str = "--initializer") -> list[int]:
    """Add `token` to every tokenizer of `text` (a pipeline, or anything with its tokenizers and
    text encoders) and a row for it to each text encoder's input embeddings, a copy of the
    initializer word's row; return the token's id in each. Every other row is kept as it is."""
    starts = [initializer_id(getattr(text, tok), initializer, flag) for tok, _ in family.text_parts()]
    ids = []
    for tok, _ in family.text_parts():  # all checked before any tokenizer changes
        tokenizer = getattr(text, tok)
        existing = tokenizer.encode(token, add_special_tokens=False)
        if token in tokenizer.get_vocab() or (len(existing) == 1 and existing[0] != tokenizer.unk_token_id):
            raise UserError(f"the token {token!r} is already a word of this model's tokenizer: a new row would shadow "
                            "it (the concept's own name, if it is that word); pick a new string such as <my-token>")
    for (tok, enc), start in zip(family.text_parts(), starts):
        tokenizer, encoder = getattr(text, tok), getattr(text, enc)
        if tokenizer.add_tokens(token) != 1:
            raise UserError(f"the token {token!r} is already in this model's tokenizer: pick another token")
        # The new row is set below: no mean/covariance start (costly on a 49k-token table).
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        ids.append(tokenizer.convert_tokens_to_ids(token))
        with torch.no_grad():
            weights = encoder.get_input_embeddings().weight
            weights[ids[-1]] = weights[start]
    return ids


def token_rows(text, family, ids: list[int]) -> list[torch.Tensor]:
    """The token's row in each text encoder (views: writing them sets the token)."""
    return [getattr(text, enc).get_input_embeddings().weight[i] for (_, enc), i in zip(family.text_parts(), ids)]


def set_token(text, family, ids: list[int], rows: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for (_, enc), i, row in zip(family.text_parts(), ids, rows):
            getattr(text, enc).get_input_embeddings().weight[i] = row


def embedding_file(family, token: str, rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The token's rows in diffusers' textual-inversion layout (the family's keys; SD: the token)."""
    rows = [row[None].float().cpu().contiguous() for row in rows]
    return dict(zip(family.embedding_keys or (token,), rows))


def load_token(pipe, family, path: Path, token: str) -> None:
    """Load a saved token into a pipeline the way a diffusers user does: one call per text encoder;
    SD3's pipeline has no textual-inversion loader: there, the lines how_to_load gives."""
    if family.embedding_keys is None:
        pipe.load_textual_inversion(str(path), token=token)
        return
    state = load_file(str(path))
    for key, (tok, enc) in zip(family.embedding_keys, family.text_parts()):
        tokenizer, encoder = getattr(pipe, tok), getattr(pipe, enc)
        if not hasattr(pipe, "load_textual_inversion"):
            tokenizer.add_tokens(token)
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            with torch.no_grad():
                encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(token)] = state[key][0]
            continue
        pipe.load_textual_inversion(state[key], token=token, text_encoder=encoder, tokenizer=tokenizer)


def how_to_load(family, token: str) -> str:
    """load_token, as a user writes it."""
    if family.embedding_keys is None:
        return f"pipe.load_textual_inversion(\"{EMBEDDINGS}\", token=\"{token}\")"
    if not hasattr(family.pipeline_class(), "load_textual_inversion"):
        return f"state = safetensors.torch.load_file(\"{EMBEDDINGS}\"); " + "; ".join(
            f"pipe.{tok}.add_tokens(\"{token}\"); pipe.{enc}.resize_token_embeddings(len(pipe.{tok})); "
            f"pipe.{enc}.get_input_embeddings().weight.data[pipe.{tok}.convert_tokens_to_ids(\"{token}\")] = "
            f"state[\"{key}\"][0]" for key, (tok, enc) in zip(family.embedding_keys, family.text_parts()))
    return f"state = safetensors.torch.load_file(\"{EMBEDDINGS}\"); " + "; ".join(
        f"pipe.load_textual_inversion(state[\"{key}\"], token=\"{token}\", text_encoder=pipe.{enc}, tokenizer=pipe.{tok})"
        for key, (tok, enc) in zip(family.embedding_keys, family.text_parts()))


def learn_token(family, text, unet, scheduler, token_ids: list[int], images: ImageSet, prompts: list[str],
                steps: int, learning_rate: float, batch_size: int, seed: int, keep_at: tuple[int, ...] = (),
                fp16: bool = False, stream: str = "train") -> tuple[list[torch.Tensor], list[float], dict[int, list[torch.Tensor]]]:
    """Textual inversion: train the token's row in each text encoder of `text` (which has the
    family's tokenizers and text encoders) alone, with the denoising loss of `unet` on the set's
    latents, each with a random one of `prompts` (which name the token), starting from the rows as
    they are. Returns the learned rows, the loss of every step and the rows after each step in
    `keep_at`; the batches are drawn from seed stream `stream`. Nothing else changes: only the rows get a gradient (the UNet may be one being
    trained: its .grad stays as it was), and the other rows are restored after every step (as
    diffusers' textual-inversion example does), so even the optimizer cannot move them. With `fp16`
    (the UNet runs under fp16 autocast), the loss is scaled by a GradScaler: unscaled, the MSE's
    per-element gradients at 512 px sit at fp16's smallest normal numbers and the token would learn
    from what is left of them."""
    tables = []
    for _, enc in family.text_parts():
        encoder = getattr(text, enc)
        encoder.requires_grad_(False)
        tables.append(encoder.get_input_embeddings().weight)
    originals = [t.detach().clone() for t in tables]
    others = [torch.arange(len(t), device=t.device) != i for t, i in zip(tables, token_ids)]
    for table in tables:
        table.requires_grad_(True)
    # No weight decay: it would pull the learned rows towards zero, away from the concept.
    optimizer = torch.optim.AdamW(tables, lr=learning_rate, weight_decay=0.0)
    scaler = torch.amp.GradScaler(tables[0].device.type, enabled=fp16)
    # Noise, timesteps and images drawn on the CPU, so a seed gives the same run on any device.
    generator = torch.Generator().manual_seed(image_seed(seed, 0, stream))
    choose = random.Random(seed)
    device = unet.device
    losses, kept = [], {}

    def rows() -> list[torch.Tensor]:
        return [t[i].detach().clone() for t, i in zip(tables, token_ids)]

    try:
        for step in tqdm(range(1, steps + 1), desc="learning the token", unit="step", leave=False):
            batch = draw_batch(images, batch_size, generator, partial(family.draw_timesteps, scheduler))
            latents = batch["latents"].to(device, unet.dtype)
            noise = batch["noise"].to(device, latents.dtype)
            cond = {**family.text_conditioning(text, [choose.choice(prompts) for _ in range(batch_size)]),
                    **to_device(take(images.conditioning, batch["index"]), device)}
            loss = per_sample_loss(family, unet, scheduler, latents, noise, batch["t"].to(device), cond).mean()
            if not torch.isfinite(loss):
                raise UserError(f"the token's loss became {loss.item()} at step {step}: lower its learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward(inputs=tables)
            scaler.step(optimizer)  # unscaled in float32 first; a step whose gradient overflowed is skipped
            scaler.update()
            with torch.no_grad():
                for table, original, mask in zip(tables, originals, others):
                    table[mask] = original[mask]
            losses.append(loss.item())
            if step in keep_at:
                kept[step] = rows()
    finally:
        for table in tables:
            table.requires_grad_(False)
            table.grad = None
    return rows(), losses, kept
