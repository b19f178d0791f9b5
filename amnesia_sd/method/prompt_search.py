"""The prompt attack: a search over real words for a few that, put before the concept's prompt,
bring the concept back on the attacked model (the idea of UnlearnDiffAtk and P4D; the search is
PEZ's, Wen et al., "Hard Prompts Made Easy", NeurIPS 2023).

Its objective is UnlearnDiffAtk's: the denoising loss of the attacked model on images of the
concept (the base model's, or the user's), conditioned on "<w1> ... <wK> <concept prompt>". A soft
vector per slot and text encoder is optimised; every step the slots take the vocabulary words
nearest to them (summed cosine similarity over the text encoders, so SDXL's two agree on one word),
the loss and its gradient are taken at those words, and the gradient moves the soft vectors. The
words that did best on a fixed held-back batch are the result: plain text that anyone pastes into
any pipeline, no file needed.

The words are written into rows of placeholder tokens in the searcher's own copies of the
tokenizers and text encoders: the attacked pipeline is not changed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from amnesia_sd.core.errors import UserError
from amnesia_sd.data.generate import image_seed
from amnesia_sd.data.imageset import ImageSet
from amnesia_sd.method.textual_inversion import add_token, draw_batch, text_copies, token_rows
from amnesia_sd.model.diffusion import per_sample_loss
from amnesia_sd.model.families import take, to_device

SLOT = "<amnesia-prompt-{}>"
HELD_BACK = 8  # samples of the fixed batch that ranks the words found


@dataclass
class Found:
    words: list[str]
    loss: float  # on the held-back batch
    losses: list[float]  # every step's, at the projected words
    checks: list[list[float]]  # [step, held-back loss] of every check


def vocabulary(text, family) -> tuple[list[str], list[list[int]]]:
    """The words a prompt can be made of: entries that every tokenizer of `text` keeps as one whole
    word of letters (so the words, joined by spaces, tokenize back into exactly these tokens), and
    each one's id in every tokenizer."""
    tokenizers = [getattr(text, tok) for tok, _ in family.text_parts()]
    words, ids = [], []
    for entry in tokenizers[0].get_vocab():
        if not entry.endswith("</w>") or not entry[:-4].isascii() or not entry[:-4].isalpha():
            continue
        word = entry[:-4]
        each = [t.encode(word, add_special_tokens=False) for t in tokenizers]
        if all(len(e) == 1 and e[0] != t.unk_token_id for e, t in zip(each, tokenizers)):
            words.append(word)
            ids.append([e[0] for e in each])
    if not words:
        raise UserError("this model's tokenizer has no whole-word entries to build a prompt from: leave out "
                        "--method prompt")
    order = sorted(range(len(words)), key=lambda i: words[i])  # the vocabulary's order is not fixed
    return [words[i] for i in order], [ids[i] for i in order]


def search_prompt(family, pipe, unet, scheduler, images: ImageSet, concept_prompts: list[str], n_words: int,
                  steps: int, learning_rate: float, batch_size: int, seed: int) -> Found:
    """The n_words words to put before the concept's prompts (each step one of `concept_prompts`
    at random) that minimise the attacked `unet`'s denoising loss on the concept set's latents.
    `pipe` gives the tokenizers and text encoders; copies of them are changed, not they."""
    text = text_copies(pipe, family)
    words, ids = vocabulary(text, family)
    choose = random.Random(image_seed(seed, 0, "attack-prompt"))
    starts = [choose.randrange(len(words)) for _ in range(n_words)]
    slot_ids = [add_token(text, family, SLOT.format(k), words[start]) for k, start in enumerate(starts)]
    tables, vocab_rows = [], []
    for e, (_, enc) in enumerate(family.text_parts()):
        encoder = getattr(text, enc).to(unet.device, torch.float32)
        encoder.requires_grad_(False)
        table = encoder.get_input_embeddings().weight
        tables.append(table)
        vocab_rows.append(table[torch.tensor([i[e] for i in ids], device=table.device)].detach())
    unit_rows = [torch.nn.functional.normalize(r, dim=-1) for r in vocab_rows]
    soft = [torch.stack([token_rows(text, family, slot)[e] for slot in slot_ids]).detach().clone().requires_grad_(True)
            for e in range(len(tables))]
    optimizer = torch.optim.AdamW(soft, lr=learning_rate, weight_decay=0.0)
    prefix = " ".join(SLOT.format(k) for k in range(n_words))
    generator = torch.Generator().manual_seed(image_seed(seed, 1, "attack-prompt"))
    draw_t = partial(family.draw_timesteps, scheduler)
    held = draw_batch(images, min(HELD_BACK, len(images.latents)), generator, draw_t)
    held_prompts = [f"{prefix} {concept_prompts[i % len(concept_prompts)]}" for i in range(len(held["index"]))]

    def project() -> list[int]:
        """Each slot's nearest word (summed cosine similarity over the text encoders)."""
        with torch.no_grad():
            score = sum(torch.nn.functional.normalize(s, dim=-1) @ u.T for s, u in zip(soft, unit_rows))
        return score.argmax(-1).tolist()

    def place(chosen: list[int]) -> None:
        with torch.no_grad():
            for e, (table, rows) in enumerate(zip(tables, vocab_rows)):
                for slot, word in zip(slot_ids, chosen):
                    table[slot[e]] = rows[word]

    def loss_of(batch: dict, prompts: list[str]) -> torch.Tensor:
        cond = {**family.text_conditioning(text, prompts), **to_device(take(images.conditioning, batch["index"]),
                                                                          unet.device)}
        return per_sample_loss(family, unet, scheduler, batch["latents"].to(unet.device, unet.dtype),
                               batch["noise"].to(unet.device, unet.dtype), batch["t"].to(unet.device), cond).mean()

    best, losses, checks = None, [], []
    check_every = max(1, steps // 20)
    for table in tables:
        table.requires_grad_(True)
    try:
        for step in tqdm(range(1, steps + 1), desc="searching a prompt", unit="step", leave=False):
            chosen = project()
            place(chosen)
            batch = draw_batch(images, batch_size, generator, draw_t)
            loss = loss_of(batch, [f"{prefix} {choose.choice(concept_prompts)}" for _ in range(batch_size)])
            if not torch.isfinite(loss):
                raise UserError(f"the prompt search's loss became {loss.item()} at step {step}: lower "
                                "--prompt-learning-rate")
            for table in tables:
                table.grad = None
            loss.backward(inputs=tables)
            with torch.no_grad():  # the gradient at the words, applied to the soft vectors
                for e, (s, table) in enumerate(zip(soft, tables)):
                    s.grad = torch.stack([table.grad[slot[e]] for slot in slot_ids])
            optimizer.step()
            losses.append(loss.item())
            if step % check_every == 0 or step == steps:
                chosen = project()
                place(chosen)
                with torch.no_grad():
                    held_loss = loss_of(held, held_prompts).item()
                checks.append([float(step), held_loss])
                if best is None or held_loss < best[1]:
                    best = (chosen, held_loss)
    finally:
        for table in tables:
            table.requires_grad_(False)
            table.grad = None
    return Found([words[i] for i in best[0]], best[1], losses, checks)

