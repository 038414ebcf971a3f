"""Layer-wise concept embeddings: per concept, one learned vector per transformer block, added to the
text stream at the trigger's token positions at the input of that block (METHOD.md: the paper's
Y^1..Y^L; how the paper injects them is not public, so "add at the block's input" is our reading).

Why written here: diffusers' textual inversion replaces a row of a text encoder's token table, one
vector shared by every sample of a batch and only at the encoder's input; peft has no per-block
context embeddings at all. A pack trains several concepts at once and a served batch mixes concept
sets, so the vectors must be routed per sample and per token, like the adapter bank's slots.

Layout: ``storage[S, L * D]`` beside the bank's ``storage[S, P]``, one row per bank slot (slot s of
the bank and of the embeddings belong to the same concept), so that ``SlotAdamW`` trains them with
their own learning rate and a hot-load is one more row copy. Routing is a placement tensor
``M[b, t, s]``: how much of slot s's embedding token t of sample b gets (the concept's weight at its
trigger's positions, 0 elsewhere); block l adds ``M @ E[:, l]`` to its ``encoder_hidden_states``.
A sample without triggers gets exact zeros, so the base-caption branch has no concept slot.

The public code's form, a learned token in CLIP-L and CLIP-G, is ``ConceptTokens`` below: the same
slots and per-sample placement, applied at the two CLIP encoders' token tables instead of the blocks.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

CLIP_TOKENS = 77          # the CLIP part of SD3's text stream (CLIP-L and CLIP-G side by side)


class ConceptEmbeddings(nn.Module):
    """Slots of layer-wise concept embeddings on the blocks of one SD3 transformer."""

    def __init__(self, num_slots: int, num_blocks: int, dim: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.num_slots, self.num_blocks, self.dim = num_slots, num_blocks, dim
        self.storage = nn.Parameter(torch.zeros(num_slots, num_blocks * dim, dtype=dtype, device=device),
                                    requires_grad=False)
        self.triggers: list[str | None] = [None] * num_slots   # the trigger of each slot that has embeddings
        self._placement: torch.Tensor | None = None
        self._hooks: list = []

    @property
    def shape(self) -> tuple[int, int]:
        """One concept's embeddings: (blocks, dim)."""
        return self.num_blocks, self.dim

    # ----- slots ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_slot(self, slot: int, emb: torch.Tensor | None, trigger: str | None) -> None:
        """Put one concept's (blocks, dim) embeddings in ``slot`` (None: the slot has none)."""
        if emb is None:
            self.storage[slot].zero_()
            self.triggers[slot] = None
            return
        if tuple(emb.shape) != self.shape:
            raise ValueError(f"embeddings: expected {self.shape}, got {tuple(emb.shape)}")
        if not trigger:
            raise ValueError("embeddings: a slot with embeddings needs its trigger")
        self.storage[slot].copy_(emb.reshape(-1), non_blocking=True)
        self.triggers[slot] = trigger

    def read_slot(self, slot: int) -> torch.Tensor:
        """A detached (blocks, dim) copy of ``slot``'s embeddings."""
        return self.storage[slot].detach().clone().view(self.num_blocks, self.dim)

    def clear_slot(self, slot: int) -> None:
        """Zero ``slot``'s embeddings and forget its trigger."""
        self.load_slot(slot, None, None)

    # ----- placement -----------------------------------------------------------------------
    @contextmanager
    def placement(self, rows: torch.Tensor | None) -> Iterator[None]:
        """Inside the block, ``rows[b, t, s]`` places slot s's embeddings on token t of sample b."""
        if rows is not None and (rows.dim() != 3 or rows.shape[2] != self.num_slots):
            raise ValueError(f"placement: expected (batch, tokens, {self.num_slots}), got {tuple(rows.shape)}")
        previous = self._placement
        self._placement = None if rows is None or not bool(rows.any()) else rows.to(self.storage.device)
        try:
            yield
        finally:
            self._placement = previous

    def delta(self, block: int, context: torch.Tensor) -> torch.Tensor | None:
        """What block ``block`` adds to its text stream ``context`` (B, T, D) now (None: nothing)."""
        m = self._placement
        if m is None:
            return None
        if m.shape[:2] != context.shape[:2]:
            raise ValueError(f"placement: rows {tuple(m.shape[:2])} do not match the text stream "
                             f"{tuple(context.shape[:2])} (batch, tokens)")
        e = self.storage.view(self.num_slots, self.num_blocks, self.dim)[:, block]   # (S, D)
        return (m.to(context.dtype) @ e.to(context.dtype))


def attach_embeddings(transformer: nn.Module, num_slots: int, dtype: torch.dtype) -> ConceptEmbeddings:
    """Embedding slots on every block of ``transformer``: a pre-hook per block adds its share."""
    blocks = transformer.transformer_blocks
    dim = int(transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    device = next(transformer.parameters()).device
    emb = ConceptEmbeddings(num_slots, len(blocks), dim, dtype, device)
    for index, block in enumerate(blocks):
        emb._hooks.append(block.register_forward_pre_hook(_block_hook(emb, index), with_kwargs=True))
    return emb


def detach_embeddings(emb: ConceptEmbeddings) -> None:
    """Remove the block hooks (``bank.detach_bank`` calls it)."""
    for h in emb._hooks:
        h.remove()
    emb._hooks.clear()


def _block_hook(emb: ConceptEmbeddings, index: int):
    def hook(module, args, kwargs):
        if emb._placement is None:
            return None
        if "encoder_hidden_states" in kwargs:
            ctx = kwargs["encoder_hidden_states"]
            add = emb.delta(index, ctx)
            return args, {**kwargs, "encoder_hidden_states": ctx + add}
        # gradient checkpointing calls blocks positionally: (hidden, encoder_hidden, temb, ...)
        add = emb.delta(index, args[1])
        return (args[0], args[1] + add, *args[2:]), kwargs
    return hook


# ----- where the triggers are -----------------------------------------------------------------------
def _find(seq: list[int], sub: list[int]) -> list[int]:
    """Every position covered by an occurrence of ``sub`` in ``seq``."""
    out, n = [], len(sub)
    for i in range(len(seq) - n + 1):
        if seq[i:i + n] == sub:
            out.extend(range(i, i + n))
    return out


def trigger_positions(pipe, prompts: Sequence[str], trigger: str, max_sequence_length: int) -> torch.Tensor:
    """(B, 77 + max_sequence_length) bool: the text-stream tokens of each prompt that spell ``trigger``.

    The stream is SD3's: 77 CLIP tokens, then the T5 tokens (zeros without T5, which hold no trigger).
    A prompt without the trigger gets an all-False row.
    """
    out = torch.zeros(len(prompts), CLIP_TOKENS + max_sequence_length, dtype=torch.bool)
    out[:, :CLIP_TOKENS] = clip_trigger_positions(pipe, prompts, trigger)
    t5 = getattr(pipe, "tokenizer_3", None)
    if t5 is not None and getattr(pipe, "text_encoder_3", None) is not None:
        want = t5(trigger, add_special_tokens=False).input_ids
        ids = t5(list(prompts), padding="max_length", max_length=max_sequence_length, truncation=True).input_ids
        for b, seq in enumerate(ids):
            out[b, [CLIP_TOKENS + p for p in _find(list(seq), want)]] = True
    return out


def placement_rows(masks: torch.Tensor, slots: Sequence[int | None], num_slots: int,
                   weights: Sequence[float] | None = None) -> torch.Tensor:
    """(B, T, S) placement from trigger masks (B, T): row b puts ``slots[b]`` (weight 1 or ``weights[b]``)
    on its masked tokens; a row whose slot is None gets zeros."""
    m = torch.zeros(*masks.shape, num_slots)
    for b, s in enumerate(slots):
        if s is not None:
            m[b, :, s] = masks[b].float() * (1.0 if weights is None else float(weights[b]))
    return m


# ----- the public code's form: a learned token in CLIP-L and CLIP-G ------------------------------------
CLIP_ENCODERS = ("text_encoder", "text_encoder_2")      # SD3's CLIP-L and CLIP-G
CLIP_KEYS = ("clip_l", "clip_g")                        # their parts in the embeddings file


class ConceptTokens(ConceptEmbeddings):
    """Slots of learned trigger tokens for SD3's two CLIP text encoders (recipe ``embeddings: clip-token``).

    The newer public code learns one token embedding for CLIP-L and CLIP-G (textual inversion). Here
    a concept's token is a delta on the input embeddings of CLIP-L and CLIP-G at its trigger's token
    positions (the trigger word's own embedding plus the learned vector, zero at the start), so a
    concept without tokens, or a prompt without the trigger, encodes exactly as the base does, and a
    multi-token trigger gets the vector on each of its tokens. The text encoders then run as usual:
    their output (the 77 CLIP tokens of the text stream and the pooled vector) carries the concept.

    A slot holds ``dim_l + dim_g`` values; ``placement(rows)`` with ``rows[b, t, s]`` (the weight of
    slot s on CLIP token t of sample b) is active around a text-encoder call whose batch is ``rows``'s,
    like the layer-wise embeddings' placement around a transformer call.
    """

    def __init__(self, num_slots: int, dims: tuple[int, int], dtype: torch.dtype, device: torch.device):
        # the slot rows, triggers, load_slot and clear_slot are the layer-wise store's: one "block" of width
        # dim_l + dim_g
        super().__init__(num_slots, 1, sum(int(d) for d in dims), dtype, device)
        self.dims = tuple(int(d) for d in dims)

    @property
    def shape(self) -> tuple[int]:
        """One concept's tokens: (dim_l + dim_g,)."""
        return (sum(self.dims),)

    def read_slot(self, slot: int) -> torch.Tensor:
        """A detached (dim_l + dim_g,) copy of ``slot``'s tokens."""
        return self.storage[slot].detach().clone()

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        """A (dim_l + dim_g,) vector as its file parts {"clip_l": (dim_l,), "clip_g": (dim_g,)}."""
        return dict(zip(CLIP_KEYS, torch.split(vec, list(self.dims))))

    @contextmanager
    def placement(self, rows: torch.Tensor | None) -> Iterator[None]:
        """Inside, ``rows[b, t, s]`` adds slot s's token to CLIP token t of sample b (both encoders)."""
        if rows is not None and (rows.dim() != 3 or rows.shape[1:] != (CLIP_TOKENS, self.num_slots)):
            raise ValueError(f"clip placement: expected (batch, {CLIP_TOKENS}, {self.num_slots}), "
                             f"got {tuple(rows.shape)}")
        previous = self._placement
        self._placement = None if rows is None or not bool(rows.any()) else rows.to(self.storage.device)
        try:
            yield
        finally:
            self._placement = previous

    def delta(self, encoder: int, embeds: torch.Tensor) -> torch.Tensor | None:
        """What encoder ``encoder`` (0: CLIP-L, 1: CLIP-G) adds to its input embeddings (B, 77, d) now."""
        m = self._placement
        if m is None:
            return None
        if m.shape[:2] != embeds.shape[:2]:
            raise ValueError(f"clip placement: rows {tuple(m.shape[:2])} do not match the encoder's input "
                             f"{tuple(embeds.shape[:2])} (batch, tokens)")
        start = sum(self.dims[:encoder])
        e = self.storage[:, start:start + self.dims[encoder]]                     # (S, d)
        return m.to(embeds.dtype) @ e.to(embeds.dtype)


def attach_tokens(pipe, num_slots: int, dtype: torch.dtype = torch.float32) -> ConceptTokens | None:
    """Token slots on the pipeline's CLIP-L and CLIP-G (None when it has no CLIP encoders): a forward
    hook on each encoder's token table adds the placed tokens to its output."""
    encoders = [getattr(pipe, name, None) for name in CLIP_ENCODERS]
    if any(e is None for e in encoders):
        return None
    tables = [e.text_model.embeddings.token_embedding for e in encoders]
    tokens = ConceptTokens(num_slots, tuple(t.embedding_dim for t in tables), dtype, tables[0].weight.device)
    for index, table in enumerate(tables):
        tokens._hooks.append(table.register_forward_hook(_token_hook(tokens, index)))
    return tokens


def detach_tokens(tokens: ConceptTokens) -> None:
    """Remove the token-table hooks (``bank.detach_bank`` calls it)."""
    for h in tokens._hooks:
        h.remove()
    tokens._hooks.clear()


def _token_hook(tokens: ConceptTokens, index: int):
    def hook(module, args, output):
        add = tokens.delta(index, output)
        return None if add is None else output + add
    return hook


def clip_trigger_positions(pipe, prompts: Sequence[str], trigger: str) -> torch.Tensor:
    """(B, 77) bool: the CLIP tokens of each prompt that spell ``trigger`` (CLIP-L and CLIP-G share
    their vocabulary and so their positions)."""
    out = torch.zeros(len(prompts), CLIP_TOKENS, dtype=torch.bool)
    clip = pipe.tokenizer
    want = clip(trigger, add_special_tokens=False).input_ids
    ids = clip(list(prompts), padding="max_length", max_length=CLIP_TOKENS, truncation=True).input_ids
    for b, seq in enumerate(ids):
        out[b, _find(list(seq), want)] = True
    return out
