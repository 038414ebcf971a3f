"""The adapter bank: S LoRA slots on every targeted Linear, routed per sample.

Why not peft's LoRA layers: peft keeps one *active adapter set* per model. Its ``adapter_names``
forward argument can route each sample to one adapter (never a weighted mix of several), and peft
refuses per-sample adapters in training mode. PureCC needs both: a pack trains k concepts at once
with each sample updating only its own concept's slot, and serving composes several concepts with
per-concept weights, with different concept sets for different samples of one batch. So the bank
is written here; its files stay standard (see ``adapter_files``) and a single-slot bank matches
peft numerically (tests/purecc/test_bank.py).

Layout: all slots live in ONE parameter ``storage[S, P]`` (P = adapter parameters per concept),
so loading a concept into a slot is one flat copy and per-slot optimisers are a handful of
vectorised ops over rows. Layer ``l`` owns the columns ``[off_l, off_l + r*in + r*out)`` of each
row: ``A`` viewed as ``(S, r, in)`` and ``B^T`` as ``(S, r, out)``.

Forward of a banked Linear with routing ``w[b, s]`` (already multiplied by alpha / r):
``y = W x + sum_s w[b, s] * B_s A_s x``, as two matmuls over the concatenated slots.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from .concept_embeddings import (ConceptEmbeddings, ConceptTokens, attach_embeddings, attach_tokens,
                                 detach_embeddings, detach_tokens)

DEFAULT_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class LayerSpec:
    """One adapted Linear: its name, shape and where its columns start in a storage row."""

    name: str          # e.g. "transformer_blocks.3.attn.to_q"
    in_features: int
    out_features: int
    offset: int        # first column of this layer in a storage row


def find_targets(transformer: nn.Module, projections: Sequence[str] = DEFAULT_PROJECTIONS) -> list[str]:
    """Names of the Linear layers to adapt: ``transformer_blocks.<i>.attn.<proj>`` (attn2 is not adapted)."""
    names = []
    for name, module in transformer.named_modules():
        parts = name.split(".")
        if (len(parts) >= 4 and parts[0] == "transformer_blocks" and parts[2] == "attn"
                and ".".join(parts[3:]) in projections and isinstance(module, nn.Linear)):
            names.append(name)
    if not names:
        raise ValueError(f"targets: no Linear named transformer_blocks.<i>.attn.{{{','.join(projections)}}}")
    return names


class BankedLinear(nn.Module):
    """A frozen Linear plus the bank's slots for this layer."""

    def __init__(self, base: nn.Linear, bank: "AdapterBank", spec: LayerSpec):
        super().__init__()
        self.base = base
        self.spec = spec
        object.__setattr__(self, "_bank", bank)  # not a submodule: the bank owns the storage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        w = self._bank.routing_for(x.shape[0], y.dtype, x.dim())  # (B, 1.., S*r) or None
        if w is None:
            return y
        a_cat, bt_cat = self._bank.layer_mats(self.spec)           # (S*r, in), (S*r, out)
        if a_cat.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            a_cat, bt_cat = a_cat.to(x.dtype), bt_cat.to(x.dtype)
        # where, not a plain product: a slot a sample does not use contributes exact zeros even when
        # its activations overflow (0 * inf = NaN would reach every sample of the batch)
        h = torch.where(w != 0, (x @ a_cat.t()) * w, 0.0)           # (B, ..., S*r)
        if not torch.is_grad_enabled() and h.dtype == y.dtype == bt_cat.dtype:
            # serving: fold the add into the matmul (fewer kernels per layer at small batch)
            return y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), bt_cat).view(y.shape)
        return y + (h @ bt_cat).to(y.dtype)


class AdapterBank(nn.Module):
    """Slots of rank-``rank`` adapters on the targeted Linears of one transformer."""

    def __init__(self, specs: list[LayerSpec], num_slots: int, rank: int, alpha: float,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        if num_slots < 1 or rank < 1:
            raise ValueError(f"num_slots/rank: must be >= 1, got {num_slots}/{rank}")
        self.specs = specs
        self.num_slots, self.rank, self.alpha = num_slots, rank, alpha
        self.params_per_slot = sum(rank * (s.in_features + s.out_features) for s in specs)
        self.storage = nn.Parameter(torch.zeros(num_slots, self.params_per_slot, dtype=dtype, device=device),
                                    requires_grad=False)
        self.trainable_slots: set[int] = set()
        self._routing: torch.Tensor | None = None
        self._routing_views: dict[tuple, torch.Tensor] = {}
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_version = -1
        # split once per forward: one autograd node whose backward writes each layer's gradient
        # into the (S, P) gradient once, instead of one full-size zero tensor per layer slice
        self._split_sizes = [n for s in specs for n in (rank * s.in_features, rank * s.out_features)]
        self._layer_index = {s.name: i for i, s in enumerate(specs)}
        self._grad_parts: tuple[torch.Tensor, ...] | None = None
        # the concepts' layer-wise embeddings, slot for slot (``attach_bank`` adds them)
        self.embeddings: ConceptEmbeddings | None = None
        # and their CLIP tokens, when the pipeline's text encoders are attached (``attach_clip_tokens``)
        self.tokens: ConceptTokens | None = None

    # ----- routing -------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """The LoRA scale ``alpha / rank`` applied on top of the routing weights."""
        return self.alpha / self.rank

    def set_routing(self, weights: torch.Tensor | None) -> None:
        """``weights[b, s]``: how much of slot s sample b gets (1.0 = the trained strength)."""
        if weights is None:
            self._routing = None
            return
        if weights.dim() != 2 or weights.shape[1] != self.num_slots:
            raise ValueError(f"routing: expected (batch, {self.num_slots}), got {tuple(weights.shape)}")
        self._routing_views = {}
        if not bool(weights.any()):  # checked before the copy to the device: no device sync
            self._routing = None
            return
        w = weights.to(self.storage.device, torch.float32, non_blocking=True) * self.scale
        self._routing = w.repeat_interleave(self.rank, dim=1)

    @contextmanager
    def routing(self, weights: torch.Tensor | None) -> Iterator[None]:
        """Route with ``weights`` (B, S) inside the block, then restore the previous routing."""
        previous = self._routing
        self.set_routing(weights)
        try:
            yield
        finally:
            self._routing, self._routing_views = previous, {}

    def routing_for(self, batch: int, dtype: torch.dtype, ndim: int) -> torch.Tensor | None:
        """The routing rows for an input of ``batch`` rows and ``ndim`` dims, built once per forward
        shape and dtype and shared by every layer."""
        w = self._routing
        if w is None:
            return None
        key = (batch, dtype, ndim)
        view = self._routing_views.get(key)
        if view is None:
            if batch % w.shape[0]:
                raise ValueError(f"routing: batch {batch} is not a multiple of the routing rows {w.shape[0]}")
            # classifier-free guidance stacks [uncond; cond]: the rows repeat as a block
            rows = w if w.shape[0] == batch else w.repeat(batch // w.shape[0], 1)
            view = rows.to(dtype).view(batch, *([1] * (ndim - 2)), rows.shape[1])
            self._routing_views[key] = view
        return view

    def layer_mats(self, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slots concatenated: A as (S*r, in) and B^T as (S*r, out)."""
        grad = torch.is_grad_enabled() and self.storage.requires_grad
        r, n_in, n_out = self.rank, spec.in_features, spec.out_features
        if grad:
            if self._grad_parts is None:
                self._grad_parts = self.storage.split(self._split_sizes, dim=1)
            i = 2 * self._layer_index[spec.name]
            a_part, bt_part = self._grad_parts[i], self._grad_parts[i + 1]
            return a_part.reshape(self.num_slots * r, n_in), bt_part.reshape(self.num_slots * r, n_out)
        if self._cache_version == self.storage._version and spec.name in self._cache:
            return self._cache[spec.name]
        block = self.storage[:, spec.offset: spec.offset + r * (n_in + n_out)]
        a = block[:, : r * n_in].reshape(self.num_slots * r, n_in)
        bt = block[:, r * n_in:].reshape(self.num_slots * r, n_out)
        if self._cache_version != self.storage._version:
            self._cache, self._cache_version = {}, self.storage._version
        self._cache[spec.name] = (a, bt)
        return a, bt

    def begin_forward(self) -> None:
        """Called before every forward of the model: the per-forward split is rebuilt."""
        self._grad_parts = None

    # ----- slots ---------------------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot: {slot} outside 0..{self.num_slots - 1}")

    @torch.no_grad()
    def load_slot(self, slot: int, flat: torch.Tensor, *, emb: torch.Tensor | None = None,
                  trigger: str | None = None) -> None:
        """Copy one concept (a flat vector in this bank's layout) into ``slot``: a single copy, plus its
        embeddings and trigger when it has them (without: the slot has none). ``emb`` is either form:
        layer-wise (blocks, dim), or CLIP tokens (dim_l + dim_g,) for a bank with ``tokens``."""
        self._check_slot(slot)
        if flat.shape != (self.params_per_slot,):
            raise ValueError(f"adapter: expected {self.params_per_slot} values, got {tuple(flat.shape)}")
        token = emb is not None and emb.dim() == 1
        if emb is not None and (self.tokens if token else self.embeddings) is None:
            raise ValueError("embeddings: this bank has no " + ("CLIP token slots (its pipeline's text "
                             "encoders were not attached)" if token else "embedding slots"))
        if self.embeddings is not None:
            self.embeddings.load_slot(slot, None if token else emb, trigger)
        if self.tokens is not None:
            self.tokens.load_slot(slot, emb if token else None, trigger)
        self.storage[slot].copy_(flat, non_blocking=True)

    def slot_embeddings(self, slot: int, form: str) -> torch.Tensor:
        """A copy of ``slot``'s embeddings of ``form`` ("layerwise" or "clip-token")."""
        store = self.tokens if form == "clip-token" else self.embeddings
        if store is None:
            raise ValueError(f"embeddings: this bank has no {form} slots")
        return store.read_slot(slot)

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        """Zero ``slot`` (its adapter and embeddings become a no-op)."""
        self._check_slot(slot)
        self.storage[slot].zero_()
        if self.embeddings is not None:
            self.embeddings.clear_slot(slot)
        if self.tokens is not None:
            self.tokens.clear_slot(slot)

    @torch.no_grad()
    def init_slot(self, slot: int, generator: torch.Generator) -> None:
        """Fresh LoRA: A ~ N(0, 1/r^2), B = 0 (the adapter starts as a no-op)."""
        self._check_slot(slot)
        row = torch.zeros(self.params_per_slot, dtype=torch.float32)
        for s in self.specs:
            n = self.rank * s.in_features
            row[s.offset: s.offset + n] = torch.randn(n, generator=generator) / self.rank
        self.storage[slot].copy_(row)

    def read_slot(self, slot: int) -> torch.Tensor:
        """A detached copy of ``slot``'s flat vector (P,)."""
        self._check_slot(slot)
        return self.storage[slot].detach().clone()

    def set_trainable(self, slots: Sequence[int]) -> None:
        """Mark which slots an optimiser may update; all others are frozen."""
        for s in slots:
            self._check_slot(s)
        self.trainable_slots = set(slots)
        self.storage.requires_grad_(bool(self.trainable_slots))

    # ----- per-layer views (file formats) --------------------------------------------------
    def unflatten(self, flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Flat slot vector -> {layer: (A (r, in), B (out, r))}."""
        out = {}
        r = self.rank
        for s in self.specs:
            a = flat[s.offset: s.offset + r * s.in_features].view(r, s.in_features)
            bt = flat[s.offset + r * s.in_features: s.offset + r * (s.in_features + s.out_features)]
            out[s.name] = (a, bt.view(r, s.out_features).t())
        return out

    def flatten(self, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """{layer: (A (r, in), B (out, r))} -> flat vector; refuses missing layers or shapes."""
        missing = [s.name for s in self.specs if s.name not in layers]
        extra = sorted(set(layers) - {s.name for s in self.specs})
        if missing or extra:
            raise ValueError(f"adapter targets: missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                             f"unexpected {extra[:4]}")
        parts = []
        for s in self.specs:
            a, b = layers[s.name]
            if tuple(a.shape) != (self.rank, s.in_features) or tuple(b.shape) != (s.out_features, self.rank):
                raise ValueError(f"adapter shapes: {s.name} has A{tuple(a.shape)} B{tuple(b.shape)}, bank "
                                 f"expects A({self.rank}, {s.in_features}) B({s.out_features}, {self.rank})")
            parts += [a.reshape(-1), b.t().reshape(-1)]
        return torch.cat([p.float() for p in parts])


def attach_bank(transformer: nn.Module, num_slots: int, *, rank: int = 4, alpha: float | None = None,
                projections: Sequence[str] = DEFAULT_PROJECTIONS, dtype: torch.dtype = torch.float32) -> AdapterBank:
    """Swap every targeted Linear for a ``BankedLinear`` sharing one ``AdapterBank``. Done once per model."""
    if getattr(transformer, "adapter_bank", None) is not None:
        raise RuntimeError("transformer already carries an adapter bank; it is attached once per model")
    names = find_targets(transformer, projections)
    modules = dict(transformer.named_modules())
    specs, offset = [], 0
    for name in names:
        lin = modules[name]
        specs.append(LayerSpec(name, lin.in_features, lin.out_features, offset))
        offset += rank * (lin.in_features + lin.out_features)
    device = next(transformer.parameters()).device
    bank = AdapterBank(specs, num_slots, rank, float(alpha if alpha is not None else rank), dtype, device)
    for spec in specs:
        parent_name, _, child = spec.name.rpartition(".")
        parent = modules[parent_name]
        banked = BankedLinear(modules[spec.name], bank, spec)
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = banked
        else:
            setattr(parent, child, banked)
    object.__setattr__(bank, "embeddings", attach_embeddings(transformer, num_slots, dtype))
    object.__setattr__(transformer, "adapter_bank", bank)
    hook = transformer.register_forward_pre_hook(lambda module, args: bank.begin_forward())
    object.__setattr__(bank, "_hook", hook)
    return bank


def detach_bank(transformer: nn.Module) -> None:
    """Undo ``attach_bank``: every ``BankedLinear`` gives back its frozen Linear and the bank goes, so
    that a loaded base can take another bank (a pack's next stage) as a freshly loaded one would."""
    bank = getattr(transformer, "adapter_bank", None)
    if bank is None:
        return
    modules = dict(transformer.named_modules())
    for name, mod in modules.items():
        if isinstance(mod, BankedLinear):
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name]
            if isinstance(parent, nn.ModuleList):
                parent[int(child)] = mod.base
            else:
                setattr(parent, child, mod.base)
    bank._hook.remove()
    if bank.embeddings is not None:
        detach_embeddings(bank.embeddings)
    if bank.tokens is not None:
        detach_tokens(bank.tokens)
    object.__delattr__(transformer, "adapter_bank")


def attach_clip_tokens(pipe, bank: AdapterBank) -> ConceptTokens | None:
    """Give ``bank`` CLIP token slots on ``pipe``'s CLIP-L and CLIP-G (once; None without those encoders),
    so that it can hold concepts whose embeddings are ``clip-token``."""
    if bank.tokens is None:
        tokens = attach_tokens(pipe, bank.num_slots)
        if tokens is not None:
            object.__setattr__(bank, "tokens", tokens)
    return bank.tokens


def one_hot_routing(slots: Sequence[int | None], num_slots: int, weight: float = 1.0) -> torch.Tensor:
    """Routing rows where sample b uses only ``slots[b]`` (None: the bare base)."""
    w = torch.zeros(len(slots), num_slots)
    for b, s in enumerate(slots):
        if s is not None:
            w[b, s] = weight
    return w
