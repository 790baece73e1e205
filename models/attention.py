"""The only code in headkv that touches transformers internals.

``with windowed(model, masks, positions):`` switches the model's ``config._attn_implementation`` to headkv's
attention function (registered once, through transformers' public ``AttentionInterface`` /
``AttentionMaskInterface``) and back on exit; inside, every attention layer adds a per-head bias to SDPA. A
mask provider is anything with ``bias(layer, q_pos, k_pos) -> (kv_heads, Q, K)`` (:mod:`models.masks`).
The cache the patch runs with implements :class:`PositionSource`, the cache <-> attention contract
(:class:`FullCache` by default, or an evicting cache reporting the true positions of the keys it holds).
Users do not call ``windowed`` with an allocation: :func:`alloc.allocation.applied` is the one door.

Design: docs/design.md, section 'The attention patch'.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from headkv.models import window as win
from headkv.models.common import HeadkvError
from headkv.models.masks import HardMask, MaskProvider, SoftMask

IMPLEMENTATION = "headkv"


@runtime_checkable
class PositionSource(Protocol):
    """The cache <-> attention contract: everything the patch reads from the cache it runs with. Both sides
    implement it: :class:`FullCache` (the masked forward over transformers' own cache) and
    ``models.kv_cache.PerHeadCache`` (the evicting cache); the patch reads nothing else from either."""

    evicting: bool  # keys are not transformers' contiguous cache: its causal mask is bypassed (see _mask)
    reindex: bool  # StreamingLLM's position re-indexing (see Rotary)
    prefix: bool  # this forward's keys are positions 0..K-1, its queries the last Q (flex may serve it)

    def positions(self, layer: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of this step's queries (Q,) and of the held keys (K,) or (kv_heads, K)."""
        ...

    def decode_bias(self, layer: int, k_len: int, q_heads: int = 0) -> torch.Tensor | None:
        """Evicting only, after a one-token write: the bias ((B,) Hkv, 1, K) masking the empty slots of the
        held keys (each holds exactly the keys the query may see), or one row per query head ((B,) q_heads,
        1, K) already repeated, or None when nothing needs masking."""
        ...

    def note_padding(self, attention_mask: torch.Tensor | None, q_len: int) -> None:
        """Evicting only: this forward's 2-D padding mask (B, columns), or None (no padding)."""
        ...


class FullCache:
    """Default positions: nothing evicted, queries are the last Q of K keys (optionally re-indexed)."""

    evicting = False
    prefix = True

    def __init__(self, reindex: bool = False) -> None:
        self.reindex = reindex

    def positions(self, layer: int, q_len: int, k_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_pos = torch.arange(k_len)
        return k_pos[k_len - q_len :], k_pos

    def decode_bias(self, layer: int, k_len: int, q_heads: int = 0) -> torch.Tensor | None:
        raise NotImplementedError("a full cache holds every key: the patch masks it in full")

    def note_padding(self, attention_mask: torch.Tensor | None, q_len: int) -> None:
        raise NotImplementedError("a full cache keeps transformers' own padding mask")


class Rotary:
    """A model's rotary embedding, used to re-rotate queries for StreamingLLM's position re-indexing.

    Under re-indexing a query whose head holds ``sink + window`` keys sits at in-cache position
    ``min(t, sink + window - 1)``: window keys keep their true distance ``t - p`` (every key between them and
    the query is held), only sink keys move closer. RoPE scores depend on the distance alone, so the key
    re-rotation is done exactly by rotating the query a second time, by ``min(t, sink + window - 1) - t``,
    for its scores against sink keys. Only the first ``dim`` channels rotate (partial rotary, e.g. Pythia's
    25%); the rest pass through.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
        if not found:
            raise HeadkvError("position re-indexing needs a model with rotary position embeddings")
        rope, types = found[0], getattr(model.config, "layer_types", None)
        if hasattr(rope, "inv_freq"):  # one rotary embedding for every layer
            kinds = {"": getattr(rope, "rope_type", "default")}
            freqs = {"": rope.inv_freq}
            self.kind_of = lambda layer: ""  # noqa: E731
        else:  # one per layer type (Gemma-3: local and global bases)
            kinds = dict(getattr(rope, "rope_type", {}))
            freqs = {t: getattr(rope, f"{t}_inv_freq") for t in kinds}
            self.kind_of = lambda layer: types[layer]  # noqa: E731
        for kind in kinds.values():
            if kind in ("dynamic", "longrope"):
                raise HeadkvError(f"position re-indexing does not support rope_type '{kind}'")
        self.freqs = {k: f.double() for k, f in freqs.items()}  # (F,) each
        self.dim = 2 * next(iter(self.freqs.values())).numel()

    def rotate(self, x: torch.Tensor, delta: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Rotate x (B, H, Q, D) of ``layer`` by ``delta`` (H, Q) positions."""
        inv_freq = self.freqs[self.kind_of(layer)]
        angle = delta.to(inv_freq.device, torch.float64).unsqueeze(-1) * inv_freq  # (H, Q, F)
        cos = torch.cat([angle.cos(), angle.cos()], -1).to(x.device, x.dtype)  # (H, Q, dim)
        sin = torch.cat([angle.sin(), angle.sin()], -1).to(x.device, x.dtype)
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        half = torch.cat([-rot[..., self.dim // 2 :], rot[..., : self.dim // 2]], -1)
        return torch.cat([rot * cos + half * sin, rest], -1)


BACKENDS = ("auto", "flex", "dense")
FLEX_MIN_QUERIES = 1024  # "auto" takes the block-sparse path from this many queries per forward on


@dataclass
class _State:
    masks: MaskProvider
    positions: PositionSource
    rotary: Rotary | None = None
    backend: str = "dense"
    padding: bool = False  # this forward's batch is padded (the block-sparse path then steps aside)
    # a padded batch over a full cache: (the mask _mask returned, q_pos (B, Q), k_pos (B, K)) of this forward
    padded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


_ACTIVE: dict[int, _State] = {}  # id(model.config) -> state, only while inside windowed()
CAPTURE = "headkv_capture"
_CAPTURE: dict[int, "AttentionCallback"] = {}  # id(model.config) -> callback, only inside captured()
_LOCK = threading.Lock()


def _reindexed(state: _State, layer: int, query, key, q_pos, k_pos, scaling):
    """Query and key with the sink scores re-indexed (see :class:`Rotary`), on doubled channels.

    ``[q, q_sink] . [k * not_sink, k * sink]`` gives ``q . k`` on window keys and ``q_sink . k`` on sink keys
    in one SDPA call; values are untouched, and the scale stays the model's.
    """
    sink = state.masks.sink[layer].to(query.device)  # (Hkv,)
    window = state.masks.window[layer].to(query.device)
    n_kv = key.shape[1]
    cap = sink + window - 1  # in-cache position of a query whose head holds all it may
    q = q_pos.unsqueeze(-2)  # (1, Q), or (B, 1, Q) per sequence (a padded batch)
    delta = torch.minimum(q, cap.view(-1, 1)) - q  # ((B,) Hkv, Q), <= 0
    q_sink = state.rotary.rotate(query, delta.repeat_interleave(query.shape[1] // n_kv, dim=-2), layer)
    if q_pos.dim() == 2:  # per sequence: keys (B, K) or (B, Hkv, K)
        kp = k_pos.unsqueeze(1) if k_pos.dim() == 2 else k_pos
    else:
        kp = k_pos.expand(n_kv, -1) if k_pos.dim() == 1 else k_pos  # (Hkv, K)
    is_sink = ((kp >= 0) & (kp < sink.view(-1, 1))).to(key.dtype).unsqueeze(-1)  # ((B,) Hkv, K, 1)
    key = torch.cat([key * (1 - is_sink), key * is_sink], dim=-1)  # (B, Hkv, K, 2D)
    query = torch.cat([query, q_sink], dim=-1)  # (B, Hq, Q, 2D)
    return query, key, scaling if scaling is not None else (query.shape[-1] // 2) ** -0.5


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """SDPA plus the per-head bias of the model's active mask provider (attention logit soft-capping, which
    SDPA lacks, takes the explicit path of :func:`_gqa_attention`)."""
    state = _ACTIVE.get(id(module.config))
    softcap = kwargs.pop("softcap", None)
    if state is None:  # a model switched to this implementation outside windowed(): plain attention
        if softcap is not None:
            return _gqa_attention(query, key, value, None, attention_mask, dropout, scaling, softcap), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    q_len, k_len = query.shape[2], key.shape[2]
    if getattr(state.masks, "content", False):  # a mask that depends on content runs the whole attention
        if state.padding:
            raise HeadkvError("a dynamic allocation's masked forward takes no padding (equal-length "
                              "sequences)")
        out = state.masks.attend(module.layer_idx, query, key, value, scaling, softcap, state.positions)
        return out, None
    if state.positions.evicting and q_len == 1 and state.rotary is None and isinstance(state.masks, HardMask):
        # an evicting cache after a one-token write holds exactly the keys this query may see: only its
        # empty slots need masking (None: no mask at all, so SDPA can take its fastest kernel)
        bias = state.positions.decode_bias(module.layer_idx, k_len, query.shape[1])  # ((B,) Hkv, 1, K)|None
        if key.shape[1] == 1 and bias is not None and bias.shape[-3] > 1:  # a ragged layer's flat buffer
            return _flat_attention(query, key, value, bias, dropout, scaling, softcap), None
        if softcap is not None:
            if bias is not None and bias.shape[-3] == query.shape[1] != key.shape[1]:  # per query head
                bias = bias[..., :: query.shape[1] // key.shape[1], :, :]  # its KV head's rows
            return _gqa_attention(query, key, value, bias, None, dropout, scaling, softcap), None
        if bias is not None:
            if bias.shape[-3] != query.shape[1]:
                bias = bias.repeat_interleave(query.shape[1] // bias.shape[-3], dim=-3)
            bias = bias.to(query.dtype)
            if bias.dim() == 4:  # per sequence (a padded batch): a padding query may see nothing, not NaN
                bias = bias.clamp(min=torch.finfo(query.dtype).min)
            else:
                bias = bias.unsqueeze(0)
        return sdpa_attention_forward(module, query, key, value, bias, dropout, scaling, is_causal=False,
                                      **kwargs)
    if state.padded is not None and attention_mask is state.padded[0]:  # a padded batch, full cache
        q_pos, k_pos = state.padded[1:]  # (B, Q), (B, K): each sequence's own positions
    else:
        q_pos, k_pos = state.positions.positions(module.layer_idx, q_len, k_len)
    q_pos, k_pos = q_pos.to(query.device), k_pos.to(query.device)
    if _block_sparse(state, query):
        return _flex_attention(state, module.layer_idx, query, key, value, scaling, softcap), None
    # (Hkv, Q, K), or (B, Hkv, Q, K) for per-sequence positions
    bias = state.masks.bias(module.layer_idx, q_pos, k_pos)
    if state.rotary is not None:
        query, key, scaling = _reindexed(state, module.layer_idx, query, key, q_pos, k_pos, scaling)
    # transformers' causal/padding mask for the same keys (bypassed for an evicting cache: see _mask)
    if state.positions.evicting:
        attention_mask = None
    if softcap is not None or (bias.requires_grad and state.rotary is None):  # soft-capping; learnable gates
        return _gqa_attention(query, key, value, bias, attention_mask, dropout, scaling, softcap), None
    bias = bias.repeat_interleave(query.shape[1] // bias.shape[-3], dim=-3)  # ((B,) Hq, Q, K)
    bias = (bias if bias.dim() == 4 else bias.unsqueeze(0)).to(query.dtype)  # (1 | B, Hq, Q, K)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attention_mask, float("-inf"))
        else:
            bias = bias + attention_mask
    # finite floor: a fully masked (padding) row softmaxes to uniform instead of NaN, as transformers does
    bias = bias.clamp(min=torch.finfo(query.dtype).min)
    return sdpa_attention_forward(
        module, query, key, value, bias, dropout, scaling, is_causal=False, **kwargs
    )


def _flat_attention(query, key, value, bias, dropout, scaling, softcap) -> torch.Tensor:
    """One query per sequence over a ragged layer's flat buffer (``models.kv_cache.HeadLayer.decode_kv``):
    ``key``/``value`` (B, 1, S, D) hold every KV head's segment, ``bias`` ((B,) Hq, 1, S) masks each query
    head to its KV head's. The Hq query heads become Hq queries of that one head, so a single SDPA call
    scores them all without copying a key; its (B, 1, Hq, D) output is already attention's (B, Q, Hq, D)."""
    bias = bias.transpose(-3, -2).to(query.dtype)
    # ((B,) 1, Hq, S); per sequence (a padded batch) a padding query may see nothing: uniform, not NaN
    bias = bias.unsqueeze(0) if bias.dim() == 3 else bias.clamp(min=torch.finfo(query.dtype).min)
    query = query.transpose(1, 2)  # (B, 1, Hq, D)
    if softcap is not None:
        return _gqa_attention(query, key, value, bias, None, dropout, scaling, softcap).transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                                            dropout_p=dropout, scale=scaling)


def _block_sparse(state: _State, query: torch.Tensor) -> bool:
    """Whether this call takes the FlexAttention path: asked for ("flex", or "auto" from
    FLEX_MIN_QUERIES queries on), a full-cache forward without padding or re-indexing (the queries are the
    last Q of the keys), and a kernel that runs here (soft gates that need a gradient: CUDA only)."""
    if not _flex_wanted(state.backend, query.shape[2]):
        return False
    if state.rotary is not None or state.padding or not state.positions.prefix:
        return False
    masks = state.masks
    if not isinstance(masks, HardMask):
        if not isinstance(masks, SoftMask) or masks.sink.is_floating_point():
            return False  # another provider, or learned (soft) sinks: the dense soft bias only
        if masks.window.requires_grad and torch.is_grad_enabled():  # probed: dense trains where flex cannot
            return _flex_trains(query.device, query.shape[-1], query.dtype)
    from headkv.models import flex

    return flex.available(query.device, query.shape[-1], query.dtype)


def _flex_wanted(backend: str, query_len: int) -> bool:
    """Whether ``backend`` asks for FlexAttention at this many queries ("auto": from FLEX_MIN_QUERIES on)."""
    return backend == "flex" or (backend == "auto" and query_len >= FLEX_MIN_QUERIES)


def soft_trains_on_flex(backend: str, query_len: int, device: torch.device | str, head_dim: int,
                        dtype: torch.dtype) -> bool:
    """Whether a training forward of learnable soft gates under ``backend`` takes the FlexAttention path
    (then nothing of size T x T is kept for the backward, and the caller need not recompute layers)."""
    return _flex_wanted(backend, query_len) and _flex_trains(torch.device(device), head_dim, dtype)


_FELL_BACK: set[tuple] = set()


def _flex_trains(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the soft window trains through FlexAttention here (:func:`models.flex.trainable`); a CUDA
    device where it does not says so once, in one log line, and the dense soft bias takes over."""
    from headkv.models import flex

    ok = flex.trainable(device, head_dim, dtype)
    key = (device.type, head_dim, dtype)
    if not ok and device.type == "cuda" and key not in _FELL_BACK:
        _FELL_BACK.add(key)
        logging.getLogger(__name__).warning(
            "FlexAttention does not train here (torch %s, head dim %d, %s): the dense soft bias trains "
            "instead", torch.__version__, head_dim, str(dtype).removeprefix("torch."))
    return ok


def _flex_attention(state: _State, layer: int, query, key, value, scaling, softcap) -> torch.Tensor:
    """The allocation's keys (and the native cap) as a FlexAttention block mask (:mod:`models.flex`)."""
    from headkv.models import flex

    masks = state.masks
    cap = None if masks.cap is None else masks.cap[layer]
    if isinstance(masks, HardMask):
        return flex.hard_attention(query, key, value, masks.sink[layer], masks.window[layer], cap, scaling,
                                   softcap)
    return flex.soft_attention(query, key, value, masks.sink[layer], masks.window[layer], masks.tau, cap,
                               scaling, softcap, masks.edge)


class _AddHeadBias(torch.autograd.Function):
    """``scores (B, Hkv, r, Q, K) + bias (1 | B, Hkv, Q, K)``, broadcast over the r query heads of each KV
    head (and over the batch). The backward sums the bias gradient with plain adds: torch's sum over the
    broadcast dimensions (0, 2) is about 30x slower on CPU in bfloat16, which dominated a batch-2 step."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.bias_batch = bias.shape[0]
        return scores + bias.unsqueeze(2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = grad.unbind(2)
        g = heads[0].clone()
        for h in heads[1:]:
            g += h
        if ctx.bias_batch == 1 and g.shape[0] > 1:
            g = g.sum(0, keepdim=True)
        return grad, g


def _gqa_attention(query, key, value, bias, attention_mask, dropout, scaling, softcap=None) -> torch.Tensor:
    """Explicit attention with a per-KV-head bias, for learnable gates (training) and for models that
    soft-cap their attention logits (Gemma-2), which SDPA cannot do.

    SDPA needs the bias repeated to every query head (and, with a float bias that requires grad, runs its
    math kernel anyway); here the query heads of one KV head are a broadcast dimension instead, so neither
    the bias nor the keys and values are repeated, and :class:`_AddHeadBias` sums the bias gradient over
    those query heads. ``bias``: (Hkv, Q, K), ((B,) Hkv, Q, K) or None. ``softcap``: scores become
    ``softcap * tanh(scores / softcap)`` before any mask, as the models' eager attention does. Same result
    as ``sdpa_attention_forward`` with the repeated bias, in the model's dtype; returns (B, Q, Hq, D) like
    it. On CUDA this also avoids the memory-efficient SDPA kernel, whose backward fails with a float bias
    that requires grad ("LSE is not correctly aligned", torch 2.11).
    """
    b, n_q, q_len, dim = query.shape
    n_kv, k_len = key.shape[1], key.shape[2]
    scale = scaling if scaling is not None else dim**-0.5
    if bias is None:
        bias = torch.zeros(1, n_kv, q_len, k_len, dtype=query.dtype, device=query.device)
    bias = bias.to(query.dtype)
    bias = bias if bias.dim() == 4 else bias.unsqueeze(0)  # (1 | B, Hkv, Q, K)
    if attention_mask is not None:  # transformers' causal/padding mask, shared by all heads
        if attention_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attention_mask, float("-inf"))
        else:
            bias = bias + attention_mask
    bias = bias.clamp(min=torch.finfo(query.dtype).min)  # a fully masked row: uniform, not NaN
    q = (query * scale).view(b, n_kv, n_q // n_kv, q_len, dim)  # (B, Hkv, r, Q, D)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2))  # (B, Hkv, r, Q, K)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = _AddHeadBias.apply(scores, bias)
    probs = scores.softmax(-1)
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = torch.matmul(probs, value.unsqueeze(2))  # (B, Hkv, r, Q, D)
    return out.view(b, n_q, q_len, -1).transpose(1, 2).contiguous()


def _mask(*args, **kwargs):
    """transformers' SDPA mask, and the positions of a padded batch (called once per forward).

    A token's position is its index among its own sequence's real tokens (:func:`models.window.positions`,
    what ``generate`` derives ``position_ids`` from), so padding never takes a sink or a window slot. An
    evicting cache: transformers' mask is bypassed (its keys are not a contiguous prefix) and the padding
    mask goes to the cache, which gives padding no slot and each sequence its own positions. A full cache
    (the masked evaluator) with padding and a hard mask: the positions of this forward's keys and queries
    are noted for :func:`_attention`, tied to the very mask returned here.
    """
    state = _ACTIVE.get(id(kwargs.get("config")))
    padding = kwargs.get("attention_mask")  # 2-D (B, kv columns), or None: no padding
    if state is not None and state.positions.evicting:
        state.positions.note_padding(padding, kwargs["q_length"])
        return None
    mask = sdpa_mask(*args, **kwargs)
    if state is not None:
        state.padded = None
        state.padding = padding is not None and not bool(padding.all())
        if padding is not None and isinstance(state.masks, HardMask) and not bool(padding.all()):
            kv_offset, kv_length = int(kwargs.get("kv_offset") or 0), kwargs["kv_length"]
            q_offset, q_length = int(kwargs.get("q_offset") or 0), kwargs["q_length"]
            pos = win.positions(padding.bool())  # (B, columns)
            short = kv_offset + kv_length - pos.shape[-1]
            if short > 0:  # transformers pads a short mask with padding
                pos = torch.nn.functional.pad(pos, (0, short), value=-1)
            q_pos = pos[:, q_offset : q_offset + q_length]
            state.padded = (mask, q_pos, pos[:, kv_offset : kv_offset + kv_length])
    return mask


AttentionInterface.register(IMPLEMENTATION, _attention)  # once, public API; plain SDPA outside windowed()
AttentionMaskInterface.register(IMPLEMENTATION, _mask)


@contextmanager
def windowed(
    model: PreTrainedModel,
    masks: MaskProvider,
    positions: PositionSource | None = None,
    backend: str = "dense",
) -> Iterator[PreTrainedModel]:
    """Apply per-head masks (a :class:`HardMask` or soft gates) to ``model`` inside the block.

    ``backend``: "dense" (SDPA plus a (heads, Q, K) bias: the reference), "flex" (FlexAttention with a block
    mask built from the allocation, :mod:`models.flex`: nothing of size Q x K is built, and key tiles no head
    sees are skipped) or "auto" (flex from FLEX_MIN_QUERIES queries per forward on). Flex serves full-cache
    forwards without padding or re-indexing where its kernel runs, the dense path everything else.
    Callers with an allocation go through :func:`alloc.allocation.applied`, which checks its shape first.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    rotary = None
    if positions is not None and positions.reindex:
        if not isinstance(masks, HardMask):
            raise ValueError("position re-indexing needs a hard mask (sink + window per head)")
        rotary = Rotary(model)
    key = id(model.config)
    with _LOCK:
        if key in _ACTIVE or key in _CAPTURE:
            raise RuntimeError("windowed() is already active on this model; nesting is not supported")
        _ACTIVE[key] = _State(masks, positions or FullCache(), rotary, backend)
        previous = model.config._attn_implementation
        model.config._attn_implementation = IMPLEMENTATION
    try:
        yield model
    finally:
        with _LOCK:
            model.config._attn_implementation = previous
            _ACTIVE.pop(key, None)


def is_active_source(positions: object) -> bool:
    """True while ``positions`` is the position source of some model inside ``windowed()``."""
    return any(state.positions is positions for state in list(_ACTIVE.values()))


def is_clean(model: PreTrainedModel) -> bool:
    """True when nothing of the patch remains on ``model`` (its attention implementation is its own again)."""
    return (
        model.config._attn_implementation not in (IMPLEMENTATION, CAPTURE)
        and id(model.config) not in _ACTIVE
        and id(model.config) not in _CAPTURE
    )


# ---- attention capture (head classification) ---------------------------------------------------------


class AttentionCallback(Protocol):
    def __call__(self, layer: int, probs: torch.Tensor) -> None:
        """Receives one layer's attention probabilities (B, query heads, Q, K) of a full-cache forward."""
        ...


def _capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain SDPA for the output; the attention probabilities are recomputed and handed to the callback."""
    out = sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    callback = _CAPTURE.get(id(module.config))
    if callback is not None:
        keys = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)  # (B, Hq, K, D)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = (query @ keys.transpose(-1, -2)).float() * scale  # (B, Hq, Q, K)
        if attention_mask is None:  # SDPA's is_causal path: the queries are the last Q of K keys
            q_len, k_len = scores.shape[-2:]
            q_pos = torch.arange(k_len - q_len, k_len, device=scores.device).view(-1, 1)
            scores = scores.masked_fill(torch.arange(k_len, device=scores.device) > q_pos, float("-inf"))
        elif attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
        callback(module.layer_idx, scores.softmax(-1))
    return out


AttentionInterface.register(CAPTURE, _capture_attention)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)


@contextmanager
def captured(model: PreTrainedModel, callback: AttentionCallback) -> Iterator[PreTrainedModel]:
    """Run ``model`` with full attention and hand every layer's attention probabilities to ``callback``."""
    key = id(model.config)
    with _LOCK:
        if key in _ACTIVE or key in _CAPTURE:
            raise RuntimeError("captured() cannot nest with windowed() or captured() on the same model")
        _CAPTURE[key] = callback
        previous = model.config._attn_implementation
        model.config._attn_implementation = CAPTURE
    try:
        yield model
    finally:
        with _LOCK:
            model.config._attn_implementation = previous
            _CAPTURE.pop(key, None)


@torch.no_grad()
def attention_maps(model: PreTrainedModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities (B, query heads, T, T) for one full-attention forward."""
    maps: dict[int, torch.Tensor] = {}
    with captured(model, lambda layer, probs: maps.__setitem__(layer, probs)):
        model(ids)
    return [maps[i] for i in sorted(maps)]
