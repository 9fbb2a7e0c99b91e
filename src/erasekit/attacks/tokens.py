"""Prompts as editable token sequences: the attack vocabulary, prompts with free token slots, encoding
with substituted (soft or hard) token embeddings, and turning token ids back into replayable text.

Substitution works through a forward hook on the text encoder's input embedding table, so the same
code serves CLIP (SD), BERT-style (testbed) and T5 (FLUX) encoders, with gradients reaching the substitutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Model

WORD_START = "\u2581"  # SentencePiece's mark of a piece that starts a word (T5)


def attack_vocabulary(model: Model) -> torch.Tensor:
    """Ids of whole-word, alphabetic tokens: what an adversarial prompt may use. Word pieces, special
    and unused tokens are left out so that the decoded text tokenizes back to the same ids. SentencePiece
    vocabularies (T5) keep the word-start pieces that the tokenizer gives back alone for their word."""
    tok = model.tokenizer
    vocab = tok.get_vocab()
    special = set(tok.all_special_ids)
    clip_style = any(t.endswith("</w>") for t in vocab)  # BPE marks word ends; WordPiece marks continuations
    piece_style = not clip_style and any(t.startswith(WORD_START) for t in vocab)  # SentencePiece marks starts
    keep = []
    for token, idx in vocab.items():
        if idx in special:
            continue
        if clip_style:
            if not token.endswith("</w>"):
                continue
            token = token[:-4]
        elif piece_style:
            if not token.startswith(WORD_START):
                continue
            token = token[1:]
        elif token.startswith("##"):
            continue
        if token.isascii() and token.isalpha() and len(token) >= 2:
            keep.append((idx, token))
    if piece_style and keep:  # a unigram model may split a word its vocabulary also holds whole
        alone = tok([word for _, word in keep], add_special_tokens=False)["input_ids"]
        keep = [(idx, word) for (idx, word), ids in zip(keep, alone) if ids == [idx]]
    return torch.tensor(sorted(idx for idx, _ in keep), dtype=torch.long)


@dataclass
class SlotPrompt:
    """Token ids of one prompt (padded to the model's length) and which positions are free slots."""
    ids: torch.Tensor  # (L,)
    slots: torch.Tensor  # (S,) positions of the free tokens
    mask: torch.Tensor  # (L,) attention mask

    def with_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """ids with the slots filled: tokens (S,) or (B, S) -> (B, L)."""
        tokens = tokens.view(-1, len(self.slots))
        ids = self.ids.to(tokens.device).expand(tokens.shape[0], -1).clone()
        ids[:, self.slots.to(tokens.device)] = tokens
        return ids


def content_ids(model: Model, text: str) -> list[int]:
    """The prompt's tokens without begin/end/padding."""
    return model.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]


def slot_prompt(model: Model, pieces: list[int | None]) -> SlotPrompt:
    """Build a prompt from content token ids and None for each free slot; adds the begin token (when the
    tokenizer has one: T5's has not) and the end token, and pads."""
    tok = model.tokenizer
    begin = tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id
    start = [] if begin is None else [begin]
    end = model.end_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else end
    body = pieces[:model.max_length - 1 - len(start)]
    ids = start + [0 if p is None else p for p in body] + [end]
    slots = [i + len(start) for i, p in enumerate(body) if p is None]
    length = len(ids)
    ids = ids + [pad] * (model.max_length - length)
    mask = [1] * length + [0] * (model.max_length - length)
    return SlotPrompt(torch.tensor(ids), torch.tensor(slots, dtype=torch.long), torch.tensor(mask))


def embedding_table(model: Model) -> torch.nn.Embedding:
    """The first text encoder's token embedding table: the space the attacks optimize in."""
    return model.text_encoder.get_input_embeddings()


def encode_ids(model: Model, ids: torch.Tensor, mask: torch.Tensor, substitute=None) -> torch.Tensor:
    """The denoiser's conditioning for ids (B, L); substitute(table, k) gives text encoder k's token
    embeddings instead of its table lookup (Model.encode_tokens)."""
    return model.encode_tokens(ids, mask, substitute)


def slot_embeddings(table: torch.Tensor, prompt: SlotPrompt, slot_embeds: torch.Tensor) -> torch.Tensor:
    """Token embeddings (B, L, d_tok) from the embedding table (V, d_tok) of the prompt with its slots
    holding slot_embeds (B, S, d_tok)."""
    base = table[prompt.ids.to(table.device)].detach()
    base = base.unsqueeze(0).expand(slot_embeds.shape[0], -1, -1)
    onehot = torch.zeros(prompt.ids.shape[0], device=table.device, dtype=table.dtype)
    onehot[prompt.slots.to(table.device)] = 1.0
    full = torch.zeros_like(base)
    full[:, prompt.slots.to(table.device)] = slot_embeds.to(table.dtype)
    return base * (1 - onehot)[None, :, None] + full


def ids_to_text(model: Model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> str:
    """Readable prompt text for a row of ids (specials and padding dropped)."""
    return model.tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()
