"""What the closed-form methods share: token rows of encoded prompts, the stacked K/V weights, grouped by the
input the layers read (Model.cross_attention_layers, Model.edit_features)."""

from __future__ import annotations

import functools

import torch

from ..errors import UserError
from ..model import CONTEXT, Encoded, Model

POSITIONS = ("key", "eot", "key+eot", "eot+padding", "all", "aligned", "phrase", "phrase+eot")
THROUGH_EOT = frozenset({"key", "eot", "key+eot", "phrase", "phrase+eot"})  # positions reading no row after [EoT]
ALIGNED_PARTS = frozenset({"prefix", "phrase", "suffix", "eot", "padding"})


def paired_rows(target: Encoded, anchor: Encoded, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned embedding rows of target and anchor prompts (pair i with pair i) at the chosen positions:
    'key' (last content token), 'eot' (first end-of-text), 'key+eot', 'eot+padding' ([EoT] and the rows after
    it, matched by offset from [EoT]), 'all' (every row from [KEY] on: key, eot and padding), 'aligned' (every
    row of the prompt, start token and padding included, matched as aligned_rows says), 'phrase' (the rows of
    the target phrase alone, paired as in 'aligned'), 'phrase+eot' (those and [EoT])."""
    if positions not in POSITIONS:
        raise UserError(f"unknown positions {positions!r}: use one of {', '.join(POSITIONS)}")
    if positions not in THROUGH_EOT and (target.through_eot or anchor.through_eot):
        raise ValueError(f"positions {positions!r} read rows after [EoT], which a through_eot encoding lacks")
    if positions == "aligned":
        return aligned_rows(target, anchor)
    if positions.startswith("phrase"):
        return aligned_rows(target, anchor, frozenset(positions.split("+")))
    t_rows, a_rows = [], []
    length = target.embeddings.shape[1]
    for i in range(len(target.prompts)):
        te, ae = int(target.eot[i]), int(anchor.eot[i])
        offsets: list[int] = []
        if positions in ("key", "key+eot", "all"):
            t_rows.append(target.embeddings[i, max(te - 1, 0)])
            a_rows.append(anchor.embeddings[i, max(ae - 1, 0)])
        if positions in ("eot", "key+eot"):
            offsets = [0]
        elif positions in ("eot+padding", "all"):
            offsets = list(range(0, length - max(te, ae)))
        for k in offsets:
            t_rows.append(target.embeddings[i, te + k])
            a_rows.append(anchor.embeddings[i, ae + k])
    return torch.stack(t_rows), torch.stack(a_rows)


def aligned_rows(target: Encoded, anchor: Encoded, parts: frozenset[str] = ALIGNED_PARTS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row of each target prompt with its counterpart in the anchor prompt. The prompts share a
    template, so their token ids agree on a prefix and on a suffix through [EoT]: those rows pair one to one,
    padding pairs by offset from [EoT], and each row of the differing middle (the target phrase) pairs with
    the anchor's row at the same offset into its middle, or its last middle row, or, for an empty anchor,
    the last prefix row. A bidirectional encoder (the testbed's MiniLM, T5) writes the concept into every
    row of the prompt, not only the phrase's: this is the mode that reaches all of them.
    parts keeps some of the rows: 'prefix', 'phrase', 'suffix' (before [EoT]), 'eot', 'padding'."""
    if "padding" in parts and (target.through_eot or anchor.through_eot):
        raise ValueError("padding rows were asked for from a through_eot encoding, which lacks them")
    rows, t_pos, a_pos = [], [], []  # prompt index, target position, anchor position of every pair
    length = target.embeddings.shape[1]
    for i in range(len(target.prompts)):
        te, ae = int(target.eot[i]), int(anchor.eot[i])
        t_ids, a_ids = target.input_ids[i, :te + 1].tolist(), anchor.input_ids[i, :ae + 1].tolist()
        shortest = min(len(t_ids), len(a_ids))
        prefix = next((k for k in range(shortest) if t_ids[k] != a_ids[k]), shortest)
        suffix = next((k for k in range(shortest - prefix) if t_ids[-1 - k] != a_ids[-1 - k]), shortest - prefix)
        a_middle = range(prefix, len(a_ids) - suffix)
        for k in range(len(t_ids)):
            if k < prefix:
                j, part = k, "prefix"
            elif k >= len(t_ids) - suffix:
                j, part = k - len(t_ids) + len(a_ids), "eot" if k == te else "suffix"
            elif len(a_middle):
                j, part = a_middle[min(k - prefix, len(a_middle) - 1)], "phrase"
            else:
                j, part = max(prefix - 1, 0), "phrase"
            if part in parts:
                rows.append(i)
                t_pos.append(k)
                a_pos.append(j)
        padding = range(1, length - max(te, ae)) if "padding" in parts else range(0)
        rows += [i] * len(padding)
        t_pos += [te + k for k in padding]
        a_pos += [ae + k for k in padding]
    rows = torch.tensor(rows, dtype=torch.long)
    return (target.embeddings[rows, torch.tensor(t_pos, dtype=torch.long)],
            anchor.embeddings[rows, torch.tensor(a_pos, dtype=torch.long)])


def single_rows(enc: Encoded, positions: str) -> torch.Tensor:
    """Rows of one prompt set at the chosen positions (as paired_rows, against itself). A prompt with no
    anchor has no phrase of its own, so the phrase modes take every row of it up to [EoT]."""
    if positions.startswith("phrase"):
        return aligned_rows(enc, enc, ALIGNED_PARTS - {"padding"})[0]
    return paired_rows(enc, enc, positions)[0]


class Encodings:
    """The prompts of one edit, each distinct prompt through the text encoder once: a shared anchor, a target that
    is also a RECE concept name, a prompt asked for again in a later round are encoded the first time only.
    encodings(prompts) -> Encoded in the order given; prefetch(*lists) encodes what is new in one batched call;
    inputs(reads, prompts) -> the features of the layers reading `reads` (every input in `reads` given here is
    computed in one Model.edit_features call over every prompt stored by then).
    through_eot: the edit reads no row after a prompt's [EoT] (positions in THROUGH_EOT), so a family whose
    rows_ignore_padding encodes only up to the longest prompt's [EoT] (Model.encode)."""

    def __init__(self, model: Model, reads: list[str] = (), steps: int = 4, through_eot: bool = False):
        self.model = model
        self.reads = [r for r in dict.fromkeys(reads) if r != CONTEXT]  # other inputs, computed together
        self.steps = steps  # Model.edit_features' steps, for layers that read the denoiser's own states
        self.through_eot = through_eot
        self.batches: list[Encoded] = []  # every batched encode, in order
        self.stored: dict[str, tuple[int, int]] = {}  # prompt -> (its batch, its row there)
        self.features: dict[str, tuple[list[str], Encoded | torch.Tensor]] = {}  # reads -> (prompts, features)

    def prefetch(self, *prompt_lists: list[str]) -> None:
        new = list(dict.fromkeys(p for prompts in prompt_lists for p in prompts if p not in self.stored))
        if new:
            self.batches.append(self.model.encode(new, through_eot=self.through_eot))
            self.stored.update((p, (len(self.batches) - 1, i)) for i, p in enumerate(new))

    def __call__(self, prompts: list[str]) -> Encoded:
        self.prefetch(prompts)
        found = [self.stored[p] for p in prompts]
        used = sorted({b for b, _ in found})
        if len(used) == 1:  # the common case: one gather from one batch
            return select(self.batches[used[0]], torch.tensor([i for _, i in found], dtype=torch.long), prompts)
        whole = join([self.batches[b] for b in used], self.model)  # batches of other lengths, as one
        offset = dict(zip(used, torch.tensor([0] + [len(self.batches[b].prompts) for b in used]).cumsum(0).tolist()))
        return select(whole, torch.tensor([offset[b] + i for b, i in found], dtype=torch.long), prompts)

    def inputs(self, reads: str, prompts: list[str]) -> Encoded | torch.Tensor:
        """The features the layers reading `reads` see for prompts (Model.edit_features), in the order given.
        Every prompt stored so far is run once per input, all together: prefetch what an edit needs first."""
        if reads == CONTEXT:
            return self(prompts)
        self.prefetch(prompts)
        if reads not in self.features or not set(prompts) <= set(self.features[reads][0]):
            stored = list(self.stored)
            together = self.reads if reads in self.reads else [reads]
            self.features.update((r, (stored, f)) for r, f in self.model.edit_features(
                self(stored), together, self.steps).items())
        order, feats = self.features[reads]
        where = {p: i for i, p in enumerate(order)}
        index = torch.tensor([where[p] for p in prompts], dtype=torch.long)
        if isinstance(feats, torch.Tensor):
            return feats[index.to(feats.device)]
        k = len(feats.prompts) // len(order)  # rows per prompt
        rows = (index[:, None] * k + torch.arange(k)[None]).flatten()
        return select(feats, rows, [feats.prompts[i] for i in rows.tolist()])


def select(enc: Encoded, index: torch.Tensor, prompts: list[str]) -> Encoded:
    """The prompts of enc at index (one gather per field), named prompts."""
    on = index.to(enc.embeddings.device)
    cond = None if enc.conditioning is None else enc.conditioning[index.to(enc.conditioning.device)]
    return Encoded(list(prompts), enc.embeddings[on], enc.input_ids[index], enc.attention_mask[index],
                   enc.eot[index.to(enc.eot.device)], [enc.truncated[i] for i in index.tolist()], cond,
                   enc.through_eot)


def join(batches: list[Encoded], model: Model) -> Encoded:
    """Encodings of several batches as one. Batches encoded through [EoT] at different lengths are padded to
    the longest with filler rows after [EoT] (zero context rows, inserted before any pooled rows by
    Model.extend_context; end tokens, mask 0), so the result is through_eot too."""
    length = max(b.input_ids.shape[1] for b in batches)
    parts = []
    for b in batches:
        pad = length - b.input_ids.shape[1]
        if pad and not b.through_eot:
            raise ValueError("encodings of different lengths that are not through_eot cannot be joined")
        if not pad:
            parts.append(b)
            continue
        n, d = b.embeddings.shape[0], b.embeddings.shape[2]
        rows = b.embeddings.new_zeros(n, pad, d)
        ids = torch.cat([b.input_ids, b.input_ids.new_full((n, pad), model.end_token_id)], 1)
        mask = torch.cat([b.attention_mask, b.attention_mask.new_zeros(n, pad)], 1)
        cond = None if b.conditioning is None else model.extend_context(b.conditioning, rows)
        parts.append(Encoded(b.prompts, torch.cat([b.embeddings, rows], 1), ids, mask, b.eot, b.truncated, cond, True))
    cat = lambda field: torch.cat([getattr(b, field) for b in parts])  # noqa: E731
    conditioning = cat("conditioning") if parts[0].conditioning is not None else None
    return Encoded([p for b in parts for p in b.prompts], cat("embeddings"), cat("input_ids"), cat("attention_mask"),
                   cat("eot"), [t for b in parts for t in b.truncated], conditioning,
                   any(b.through_eot for b in parts))


class KVStack:
    """Cross-attention K/V matrices that read one input, stacked along their output rows: (sum_out, d).

    Every K/V projection of SD reads the same text embeddings, so a key's Gram matrix is shared and one
    solve edits every layer at once. Layers that read other inputs (FLUX's pooled projection, its blocks'
    text streams) form their own stacks: `groups`."""

    def __init__(self, model: Model, layers: str = "default", reads: str = CONTEXT, found=None, stacked: bool = True):
        """stacked: take the float64 stack `w0` now, a snapshot of the weights as they are (what the solvers that
        read it need); False leaves it to be built on first use, for an edit that reads `weights` at once."""
        self.reads = reads
        self.layers = [la for la in (found or model.cross_attention_layers(layers)) if la.reads == reads]
        if not self.layers:
            raise UserError(f"{model.source} has no text-conditioning layer reading {reads!r} in layer set "
                            f"{layers!r}: use --set layers= one of {', '.join(model.edit_layer_sets())}")
        self.names = [la.name for la in self.layers]
        self.sizes = [la.weight.shape[0] for la in self.layers]
        self.weights = [la.weight.detach() for la in self.layers]  # the modules' own tensors, not copies
        if stacked:
            self.w0 = self.stack()

    @functools.cached_property
    def w0(self) -> torch.Tensor:
        return self.stack()

    def stack(self) -> torch.Tensor:
        """(sum_out, d) float64 stack of the weights, each copied once, into place."""
        w0 = torch.empty(sum(self.sizes), self.weights[0].shape[1], dtype=torch.float64)
        for rows, w in zip(w0.split(self.sizes), self.weights):
            rows.copy_(w)
        return w0

    @classmethod
    def groups(cls, model: Model, layers: str = "default", stacked: bool = True) -> list[KVStack]:
        """One stack per input the layers of `layers` read, in the order the family lists them."""
        found = model.cross_attention_layers(layers)
        return [cls(model, layers, reads, found, stacked) for reads in dict.fromkeys(la.reads for la in found)]

    def values(self, keys: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs of every layer for key rows (N, d): (N, sum_out). Each distinct row is multiplied once (a
        shared anchor's row, e.g. the empty guide of 100 concepts, is one product, not 100)."""
        rows, where = torch.unique(keys.double().cpu(), dim=0, return_inverse=True)
        return (rows @ (self.w0 if weight is None else weight).T)[where]

    def split(self, stacked: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, stacked.float().split(self.sizes)))

    def norms(self, stacked: torch.Tensor) -> dict[str, float]:
        """Relative Frobenius change per layer."""
        out = {}
        for name, new, old in zip(self.names, stacked.split(self.sizes), self.w0.split(self.sizes)):
            out[name] = float((new - old).norm() / old.norm())
        return out


def paired_inputs(target: Encoded | torch.Tensor, anchor: Encoded | torch.Tensor, positions: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """paired_rows of token features; features with one row per prompt (a pooled embedding) pair as they are,
    whatever the positions."""
    if isinstance(target, torch.Tensor):
        return target, anchor
    return paired_rows(target, anchor, positions)


def single_inputs(features: Encoded | torch.Tensor, positions: str) -> torch.Tensor:
    """single_rows of token features; one-row-per-prompt features as they are."""
    return features if isinstance(features, torch.Tensor) else single_rows(features, positions)


def warn_unknown_tokens(model: Model, phrases: list[str]) -> list[str]:
    """Phrases whose every token is unknown to the tokenizer (they carry no meaning to erase)."""
    bad = []
    unk = model.tokenizer.unk_token_id
    for phrase in phrases:
        ids = model.tokenizer(phrase, add_special_tokens=False).input_ids
        if phrase.strip() and ids and unk is not None and all(i == unk for i in ids):
            bad.append(phrase)
    return bad
