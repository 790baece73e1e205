"""Block-sparse per-head window attention with FlexAttention (``torch.nn.attention.flex_attention``).

The same keys as :mod:`models.window` -- from query position t a head with (sink, window) sees
``[0, sink) U (t - window, t]``, causal -- optionally within a native sliding-window ``cap`` and with
Gemma-2 logit soft-capping, computed over a :class:`BlockMask` of 128 x 128 tiles so nothing of size Q x K
is built. :func:`hard_attention` (the hard mask), :func:`soft_attention` (the learnable soft window as a
``score_mod``; its gradient reaches the window on CUDA only), :func:`available` (whether the compiled kernel
runs, so a caller can fall back to the dense path). Queries (B, Hq, Q, D) are the last Q of the K keys
(B, Hkv, K, D); output (B, Q, Hq, D). For full-cache forwards, not token-by-token decode.

Design: docs/design.md, section 'Two attention paths: dense and block-sparse'.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F

from headkv.models import window as win

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = flex_attention = None
try:  # torch >= 2.9: the lse as an auxiliary output (return_lse is deprecated)
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:  # pragma: no cover
    AuxRequest = None

log = logging.getLogger(__name__)
BLOCK = 128  # FlexAttention's sparse tile (query and key)
CACHE_SIZE = 128  # block masks kept (LRU); a 30-layer model with distinct rows per layer needs 30 per shape
RECOMPILE_LIMIT = 64  # dynamo's default (8) would silently fall back to eager (dense) flex past 8 shapes
_NO_CAP = 2**62  # "no cap" as a number, so cap None and cap 16 share one compiled graph

Cap = int | torch.Tensor | None  # a layer's native cap: one for all heads or one per KV head; <= 0: none

_compiled = None
# per device type: the kernel options the training probe settled on ({} = flex's defaults); see trainable()
KERNEL_OPTIONS: dict[str, dict] = {}
_lock = threading.Lock()
_masks: OrderedDict[tuple, BlockMask] = OrderedDict()
_available: dict[tuple, bool] = {}


def _flex():
    """The process's one compiled ``flex_attention`` (compiled lazily, on first use)."""
    global _compiled
    with _lock:
        if _compiled is None:
            _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


# ---- the block mask -------------------------------------------------------------------------------


def caps(cap: Cap, heads: int) -> tuple[int, ...]:
    """A cap (int, (H,) or 0-d tensor, or None) as one int per head, 'none' (None, <= 0) as a huge number."""
    if cap is None:
        return (_NO_CAP,) * heads
    values = [int(x) for x in torch.as_tensor(cap).reshape(-1).tolist()]
    if len(values) == 1:
        values = values * heads
    if len(values) != heads:
        raise ValueError(f"{len(values)} caps for {heads} heads")
    return tuple(c if c > 0 else _NO_CAP for c in values)


def tiles(
    sink: torch.Tensor, window: torch.Tensor, cap: Cap, q_len: int, k_len: int, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which (query tile, key tile) pairs each head sees partly and fully: bool (H, Q tiles, K tiles) each.

    Exact, in O(H x tiles^2): query t (absolute, ``k_len - q_len + row``) sees key k at distance d = t - k
    when 0 <= d < cap and (k < sink or d < window). Over a tile pair (queries [ta, tb], keys [k0, k1]) the
    distances are every integer of [ta - k1, tb - k0], so

    - some key is seen iff a window distance [0, min(window, cap) - 1] is in that range, or the tile has
      sink keys [k0, min(k1, sink - 1)] and a distance [0, cap - 1] is in theirs;
    - every key is seen iff all distances are in [0, cap - 1] and the keys past the sinks,
      [max(k0, sink), k1], are within the window of the last query: tb - max(k0, sink) < window.

    ``create_block_mask``'s convention (it pads the mask to whole tiles with False): full only for whole
    (``block``-long) tiles, partial when some key is seen and the pair is not full. The tests check these
    tiles equal create_block_mask's.
    """
    sink = sink.detach().to("cpu", torch.long).view(-1, 1, 1)  # (H, 1, 1)
    window = window.detach().to("cpu", torch.long).view(-1, 1, 1)
    cap = torch.tensor(caps(cap, sink.shape[0])).view(-1, 1, 1)
    nq, nk = -(-q_len // block), -(-k_len // block)
    qa = torch.arange(nq).view(1, -1, 1) * block  # query rows of each tile, [qa, qb]
    qb = torch.clamp(qa + block, max=q_len) - 1
    ta, tb = qa + (k_len - q_len), qb + (k_len - q_len)  # absolute positions
    k0 = torch.arange(nk).view(1, 1, -1) * block  # (1, 1, nk)
    k1 = torch.clamp(k0 + block, max=k_len) - 1

    def meets(lo, hi, top):  # does [lo, hi] meet [0, top]?
        return (hi >= 0) & (lo <= top) & (lo <= hi) & (top >= 0)

    reach = torch.clamp(torch.minimum(window, cap), min=0) - 1
    some = meets(ta - k1, tb - k0, reach)
    sink_end = torch.minimum(k1, sink - 1)  # last sink key of the tile
    some = some | ((sink_end >= k0) & meets(ta - sink_end, tb - k0, cap - 1))
    past = torch.maximum(k0, sink)  # first non-sink key of the tile
    every = (ta - k1 >= 0) & (tb - k0 <= cap - 1) & ((k1 < sink) | (tb - past <= window - 1))
    whole = ((qb - qa + 1) == block) & ((k1 - k0 + 1) == block)
    full = every & whole
    return some & ~full, full


def _ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, indices) of a dense 0/1 tile map (..., rows, cols): BlockMask's layout, listed tiles first."""
    dense = dense.to(torch.int32)
    count = dense.sum(-1, dtype=torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


def _mask_mod(sink: torch.Tensor, window: torch.Tensor, offset: torch.Tensor, cap: torch.Tensor, r: int):
    """``mask_mod`` of :func:`models.window.allowed` plus the cap, over query heads (h // r: its KV head)."""

    def mask_mod(b, h, q_idx, kv_idx):
        t = q_idx + offset
        kv = h // r
        seen = (kv_idx <= t) & (t - kv_idx < cap[kv])
        return seen & ((kv_idx < sink[kv]) | (kv_idx > t - window[kv]))

    return mask_mod


def block_mask(
    sink: torch.Tensor,
    window: torch.Tensor,
    cap: Cap,
    q_len: int,
    k_len: int,
    q_heads: int,
    device: torch.device | str,
) -> BlockMask:
    """The BlockMask (1, q_heads, Q, K) of per-KV-head rows ``sink``, ``window`` (Hkv,), the queries being the
    last ``q_len`` of ``k_len`` keys. Cached by content: equal rows, cap, lengths, heads and device give the
    same object back."""
    device = torch.device(device)
    rows_s, rows_w = tuple(int(x) for x in sink.tolist()), tuple(int(x) for x in window.tolist())
    rows_c = caps(cap, len(rows_s))
    key = (rows_s, rows_w, rows_c, q_len, k_len, q_heads, str(device))
    with _lock:
        hit = _masks.get(key)
        if hit is not None:
            _masks.move_to_end(key)
            return hit
    n_kv = len(rows_s)
    if n_kv != len(rows_w) or q_heads % n_kv:
        raise ValueError(f"{q_heads} query heads cannot share {n_kv} KV heads' rows")
    if q_len > k_len:
        raise ValueError(f"queries ({q_len}) must be the last of the keys ({k_len})")
    r = q_heads // n_kv
    partial, full = tiles(torch.tensor(rows_s), torch.tensor(rows_w), torch.tensor(rows_c), q_len, k_len)
    partial = partial.repeat_interleave(r, 0).unsqueeze(0)  # (1, Hq, nq, nk)
    full = full.repeat_interleave(r, 0).unsqueeze(0)
    mod = _mask_mod(
        torch.tensor(rows_s, device=device),
        torch.tensor(rows_w, device=device),
        torch.tensor(k_len - q_len, device=device),
        torch.tensor(rows_c, device=device),
        r,
    )
    count, index = _ordered(partial)
    full_count, full_index = _ordered(full)
    mask = BlockMask.from_kv_blocks(
        count.to(device), index.to(device), full_count.to(device), full_index.to(device),
        BLOCK_SIZE=BLOCK, mask_mod=mod, seq_lengths=(q_len, k_len),
    )
    with _lock:
        _masks[key] = mask
        while len(_masks) > CACHE_SIZE:
            _masks.popitem(last=False)
    return mask


def clear_cache() -> None:
    """Forget every cached block mask."""
    with _lock:
        _masks.clear()


# ---- attention ------------------------------------------------------------------------------------


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sink: torch.Tensor) -> None:
    if query.dim() != 4 or key.dim() != 4 or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"expected query (B, Hq, Q, D), key/value (B, Hkv, K, D); got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[1] % key.shape[1] or sink.numel() != key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads, {key.shape[1]} KV heads, {sink.numel()} rows")
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"queries ({query.shape[2]}) must be the last of the keys ({key.shape[2]})")


def _softcap(softcap: float | None, device: torch.device):
    if softcap is None:
        return None
    return torch.tensor(float(softcap), device=device, dtype=torch.float32)


def _call(query, key, value, score_mod, mask, scaling, lse: bool = False):
    """The compiled flex call: (B, Hq, Q, D), or (output, lse-or-aux) with ``lse``."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    limit = max(RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit)
    kw = {}
    if lse:
        kw = {"return_aux": AuxRequest(lse=True)} if AuxRequest is not None else {"return_lse": True}
    if KERNEL_OPTIONS.get(query.device.type):
        kw["kernel_options"] = KERNEL_OPTIONS[query.device.type]
    # compiled flex on CPU has no lse output: the eager kernel (it materializes scores) gives it there
    fn = flex_attention if lse and query.device.type == "cpu" else _flex()
    with torch._dynamo.config.patch(recompile_limit=limit), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(query, key, value, score_mod=score_mod, block_mask=mask, scale=float(scale),
                  enable_gqa=True, **kw)


def _run(query, key, value, score_mod, mask, scaling):
    out = _call(query, key, value, score_mod, mask, scaling)
    return out.transpose(1, 2).contiguous()  # (B, Q, Hq, D), as sdpa_attention_forward


def hard_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sink: torch.Tensor,
    window: torch.Tensor,
    cap: Cap,
    scaling: float | None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of each query head over the keys its KV head's (sink, window) row allows, within ``cap``.

    query (B, Hq, Q, D); key, value (B, Hkv, K, D); sink, window (Hkv,) integer tensors; ``cap`` an int
    or (Hkv,) integer tensor (a key is seen only if ``t - k < cap``), None or <= 0 for none; ``scaling``
    the model's score scale (None: D ** -0.5); ``softcap``: Gemma-2 logit soft-capping of the scaled
    scores, or None. The queries are the last Q of the K keys. Returns (B, Q, Hq, D) in the query's dtype.
    A query that sees no key at all (only possible with window 0 and no sink) gets zeros, where SDPA with a
    -inf bias gives NaN.
    """
    _check(query, key, value, sink)
    mask = block_mask(sink, window, cap, query.shape[2], key.shape[2], query.shape[1], query.device)
    sc = _softcap(softcap, query.device)
    score_mod = None
    if sc is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return sc * torch.tanh(score / sc)
    return _run(query, key, value, score_mod, mask, scaling)


def _soft_score_mod(w, s, tau_t, offset, sc, r, kind, slope: bool = False):
    """The soft window's ``score_mod`` (see :func:`soft_attention`). ``slope=True``: the score plus
    ``log(d gate / d window)`` instead of plus the gate, so a forward under it weighs each key by the
    gate's slope (the window gradient, :class:`_WindowGrad`); sink keys get a finite floor (slope 0)."""

    def score_mod(score, b, h, q_idx, kv_idx):
        kv = h // r
        if sc is not None:
            score = sc * torch.tanh(score / sc)
        distance = (q_idx + offset - kv_idx).to(w.dtype)
        x = win.edge(w[kv], distance, kind) / tau_t
        gate = F.logsigmoid(x)
        if slope:  # d logsigmoid(x) / d w = sigmoid(-x) * d edge / d w / tau
            log_dedge = -torch.log(w[kv] - 0.5) if kind == "log" else 0.0  # log(d edge / d w)
            gate = gate + F.logsigmoid(-x) + log_dedge - torch.log(tau_t)
            return score.to(gate.dtype) + torch.where(kv_idx < s[kv], torch.full_like(gate, _FLOOR), gate)
        return score + torch.where(kv_idx < s[kv], torch.zeros_like(gate), gate)

    return score_mod


_FLOOR = -1e30  # "no weight" that stays finite: a row of sink keys only must not give NaN


def _aux_lse(out):
    """(output, lse) of a flex call made with the lse requested, across torch versions."""
    return (out[0], out[1].lse) if hasattr(out[1], "lse") else out


class _WindowGrad(torch.autograd.Function):
    """Identity on the attention output; its backward adds the soft window's gradient.

    With the bias ``g(w, d)`` added to scores ``S``, ``dL/dw = sum_{q,k} dS_qk dg/dw``, ``dS = P o (dP - D)``
    (``dP = dO V^T``, ``D = rowsum(dO o O)``). Writing ``P_qk g'_qk = exp(S + g + log g' - lse_q)``, a second
    forward under the score ``S + g + log g'`` gives ``out'`` and ``lse'``, and the sums over keys close:
    ``dL/dw = sum_q exp(lse'_q - lse_q) (dO_q . out'_q - D_q)`` -- two flex forwards under one block mask,
    nothing of size Q x K, exact for the forward it differentiates, no gradient through a captured tensor.
    ``dO`` passes through unchanged to flex's own backward for the query, key and value gradients (the window
    is a constant there)."""

    @staticmethod
    def forward(ctx, out, window, lse, query, key, value, run):  # noqa: ANN001
        ctx.save_for_backward(out, lse, query, key, value)
        ctx.run = run
        ctx.n_kv = window.shape[0]
        return out.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        out, lse, query, key, value = ctx.saved_tensors
        with torch.no_grad():
            out2, lse2 = ctx.run(query, key, value)  # (B, Hq, Q, D), (B, Hq, Q)
            up = torch.promote_types(grad.dtype, torch.float32)  # float32 at least, float64 stays
            d = (grad.to(up) * out.to(up)).sum(-1)  # (B, Hq, Q)
            dot = (grad.to(up) * out2.to(up)).sum(-1)
            weight = torch.exp((lse2.to(up) - lse.to(up)).clamp(max=60.0))
            per_head = (weight * (dot - d)).sum((0, 2))  # (Hq,)
            gw = per_head.view(ctx.n_kv, -1).sum(1)
        return grad, gw, None, None, None, None, None


BAND_TAUS = 40  # a linear soft window skips keys beyond w + BAND_TAUS * tau: their weight is < e^-40 x


def _reach(window_float: torch.Tensor, tau: float | torch.Tensor, kind: str, k_len: int) -> torch.Tensor:
    """The hard window (Hkv,) of a soft window's block mask: under the linear edge a key ``BAND_TAUS * tau``
    past ``w`` carries a gate below ``-BAND_TAUS`` (weight and window gradient below ``e^-40`` of an inside
    key's), so the tiles beyond it are skipped, rounded up to whole tiles so that a slowly moving window
    reuses its mask; the log edge decays by a power of the distance: every causal key."""
    if kind != "linear":
        return torch.full(window_float.shape, _NO_CAP)
    reach = torch.ceil(window_float.detach().float().cpu() + 0.5 + BAND_TAUS * float(tau)).long()
    reach = -(-reach // BLOCK) * BLOCK
    return torch.where(reach >= k_len, _NO_CAP, reach.clamp(min=1))


def soft_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sink: torch.Tensor,
    window_float: torch.Tensor,
    tau: float | torch.Tensor,
    cap: Cap,
    scaling: float | None,
    softcap: float | None = None,
    kind: str = "linear",
) -> torch.Tensor:
    """Attention under the learnable soft window of :func:`models.window.soft_bias`, for training on CUDA.

    Scores (scaled, then soft-capped if ``softcap``) get ``logsigmoid(edge(w, t - k) / tau)`` added on
    non-sink keys (0 on sink keys; ``edge`` is :func:`models.window.edge` of that ``kind``),
    ``w = window_float[kv head]`` (Hkv,) float; the causal limit and ``cap`` are the hard block mask.
    ``tau`` may be a float or a 0-d tensor (a tensor either way inside, so annealing it does not recompile).
    Shapes as :func:`hard_attention`. Keys far beyond a linear soft window are skipped (:func:`_reach`).

    The window is captured detached (flex's backward never differentiates a captured tensor: that path
    failed to compile on CUDA); its gradient comes from :class:`_WindowGrad` (a second flex forward), and
    the query, key and value gradients from flex's own backward. On CPU FlexAttention has no backward: the
    window's gradient works there (two forwards), a query/key/value that requires grad raises
    NotImplementedError (use the dense path).
    """
    _check(query, key, value, sink)
    grad_on = torch.is_grad_enabled()
    qkv_grad = grad_on and any(t.requires_grad for t in (query, key, value))
    w_grad = grad_on and window_float.requires_grad
    if qkv_grad and query.device.type != "cuda":
        raise NotImplementedError("FlexAttention has no backward on this device; use the dense soft bias")
    n_kv = key.shape[1]
    r = query.shape[1] // n_kv
    dev = query.device
    mask = block_mask(sink.detach().cpu().long(), _reach(window_float, tau, kind, key.shape[2]), cap,
                      query.shape[2], key.shape[2], query.shape[1], dev)
    w = window_float.detach().to(dev)
    s = sink.to(dev, torch.long)
    tau_t = (tau.detach().to(dev, w.dtype) if isinstance(tau, torch.Tensor)
             else torch.tensor(float(tau), device=dev, dtype=w.dtype))
    offset = torch.tensor(key.shape[2] - query.shape[2], device=dev)
    sc = _softcap(softcap, dev)
    score_mod = _soft_score_mod(w, s, tau_t, offset, sc, r, kind)
    if not w_grad:
        return _run(query, key, value, score_mod, mask, scaling)
    slope_mod = _soft_score_mod(w, s, tau_t, offset, sc, r, kind, slope=True)

    def run_slope(q, k, v):
        return _aux_lse(_call(q, k, v, slope_mod, mask, scaling, lse=True))

    out, lse = _aux_lse(_call(query, key, value, score_mod, mask, scaling, lse=True))
    out = _WindowGrad.apply(out, window_float, lse.detach(), query.detach(), key.detach(), value.detach(),
                            run_slope)
    return out.transpose(1, 2).contiguous()


# ---- availability ---------------------------------------------------------------------------------


def available(device: torch.device | str, head_dim: int = 64, dtype: torch.dtype = torch.float32) -> bool:
    """True when the compiled FlexAttention runs on ``device`` for this head dim and dtype (probed once per
    (device type, head dim, dtype) with a small GQA call against a plain reference; the answer is cached).
    Call it per attention call (a dict look-up after the first) and fall back to the dense path on False."""
    if flex_attention is None:
        return False
    device = torch.device(device)
    probe_key = (device.type, int(head_dim), dtype)
    if probe_key in _available:
        return _available[probe_key]
    ok = False
    try:
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 2, 3, head_dim, generator=gen).to(device, dtype)
        k = torch.randn(1, 1, 5, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(1, 1, 5, head_dim, generator=gen).to(device, dtype)
        with torch.no_grad():
            out = hard_attention(q, k, v, torch.tensor([1]), torch.tensor([2]), None, None)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 attn_mask=_probe_mask(device), enable_gqa=True)
        ok = bool(torch.allclose(out.float().transpose(1, 2), ref, atol=5e-2, rtol=5e-2))
    except Exception:  # noqa: BLE001 - any failure to compile or run means: use the dense path
        ok = False
    _available[probe_key] = ok
    return ok


# kernel options tried in turn by trainable(): flex's defaults, then smaller backward tiles and fewer stages
# (a default backward config can ask for more shared memory than the card has)
TRAIN_OPTIONS: tuple[dict, ...] = (
    {},
    {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32, "num_stages": 1},
    {"BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16, "num_stages": 1, "num_warps": 4},
)
_trainable: dict[tuple, bool] = {}
PROBE_ERRORS: list[str] = []  # why each kernel option failed the training probe (for benchmarks' reports)


def trainable(device: torch.device | str, head_dim: int = 64, dtype: torch.dtype = torch.float32) -> bool:
    """True when :func:`soft_attention` trains on ``device`` for this head dim and dtype: a small GQA
    forward+backward (query, key, value and window all requiring grad) compiles, runs and matches a plain
    float32 reference of the soft bias. Kernel options are tried in turn (:data:`TRAIN_OPTIONS`); the first
    that passes is kept for the process (:data:`KERNEL_OPTIONS`). Probed once per (device type, head dim,
    dtype); False on CPU (no flex backward there) and whenever nothing passes: callers fall back to the dense
    soft bias."""
    device = torch.device(device)
    probe_key = (device.type, int(head_dim), dtype)
    if probe_key not in _trainable:
        ok = False
        if device.type == "cuda" and available(device, head_dim, dtype):
            for options in TRAIN_OPTIONS:
                KERNEL_OPTIONS[device.type] = options
                if _train_probe(device, head_dim, dtype):
                    ok = True
                    break
            if not ok:
                KERNEL_OPTIONS.pop(device.type, None)
        _trainable[probe_key] = ok
    return _trainable[probe_key]


def _train_probe(device: torch.device, head_dim: int, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    t = 2 * BLOCK + 16  # several tiles, a partial one too
    leaves = [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_()
              for shape in ((1, 4, t, head_dim), (1, 2, t, head_dim), (1, 2, t, head_dim))]
    grads = []
    try:
        for flex_path in (True, False):
            w = torch.tensor([40.0, 150.0], device=device, requires_grad=True)
            q, k, v = leaves
            sink = torch.tensor([4, 0])
            if flex_path:
                out = soft_attention(q, k, v, sink, w, 8.0, None, None)
            else:  # the reference: the dense soft bias in float32
                pos = torch.arange(t, device=device)
                bias = win.soft_bias(pos, pos, sink.to(device), w, 8.0)  # (Hkv, T, T)
                scores = (q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2)) * head_dim**-0.5
                probs = (scores + bias.repeat_interleave(2, 0)).softmax(-1)
                out = (probs @ v.float().repeat_interleave(2, 1)).transpose(1, 2)
            out.float().square().sum().backward()
            grads.append([w.grad.clone(), *(x.grad.clone() for x in leaves)])
            for x in leaves:
                x.grad = None
        torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 - any compile or run failure means: not this option
        PROBE_ERRORS.append(f"{KERNEL_OPTIONS.get(device.type)}: {type(err).__name__}: {str(err)[:300]}")
        log.info("flex training probe failed: %s", PROBE_ERRORS[-1])
        return False
    return all(bool(torch.isfinite(a).all()) and float((a.float() - b.float()).norm())
               <= 0.05 * float(b.float().norm()) + 1e-3 for a, b in zip(*grads, strict=True))


def _probe_mask(device: torch.device) -> torch.Tensor:
    """The probe's mask: queries 2, 3, 4 of keys 0..4, sink 1, window 2."""
    t = torch.arange(2, 5).view(-1, 1)
    k = torch.arange(5).view(1, -1)
    return ((k <= t) & ((k < 1) | (k > t - 2))).to(device)


__all__ = ["BLOCK", "available", "block_mask", "clear_cache", "hard_attention", "soft_attention", "tiles",
           "trainable"]
