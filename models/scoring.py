"""Scoring a causal LM from its final hidden states, a chunk of tokens at a time.

The one place in headkv that knows how a transformers ``...ForCausalLM`` turns hidden states into logits:
:func:`hidden` (the base model, through headkv's attention) and :func:`logits` (output embedding and final
logit soft-capping). A (T x vocab) logit tensor is never held: :func:`chunked_nll`, :func:`chunked_ce` and
:func:`chunked_kl` compute ``chunk`` rows at a time (checkpointed with gradients);
:func:`checkpointed_layers` checkpoints every decoder layer whatever the ``training`` flag. A model type
outside :data:`VERIFIED` is checked once against ``model(ids).logits`` and refused if they differ.

Design: docs/design.md, section 'Scoring long sequences'.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from headkv.models.common import HeadkvError

CHUNK = 512  # tokens of logits at a time: 512 x 49152 x 4 B = 100 MB for SmolLM2, 537 MB for Gemma-3
# model types whose CausalLM forward is exactly decoder -> output embedding (-> final soft-capping); each is
# proven against model(ids).logits in tests/test_scoring.py
VERIFIED = frozenset(
    {"gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"}
)
_CHECK_TOKENS = 8


class ScoringError(HeadkvError):
    """A model headkv cannot score from hidden states."""


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The base model under the LM head (``model.model``, ``model.gpt_neox``, ...)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else None
    if base is None or base is model:
        base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ScoringError(f"{type(model).__name__} has no base model under its LM head")
    return base


def logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``model(ids).logits`` from ``hidden`` (..., H) = the matching rows of :func:`hidden`: the output
    embedding, then the final soft-capping of Gemma2/3; in the model's dtype, as the CausalLM returns them."""
    out = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:  # the CausalLM's exact op order
        out = out / cap
        out = torch.tanh(out)
        out = out * cap
    return out


def hidden(model: torch.nn.Module, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Final hidden states (B, T, H) of ``model`` on ``ids`` (B, T): the base model's output, normed, before
    the LM head. No cache is built unless ``kw`` asks for one (``use_cache``)."""
    _check_head(model, ids)
    kw.setdefault("use_cache", False)
    return decoder(model)(ids, **kw).last_hidden_state


def _check_head(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """For a model type outside VERIFIED, once per model: head(hidden) must equal ``model(ids).logits``."""
    if model.config.model_type in VERIFIED or getattr(model, "_headkv_head_checked", False):
        return
    few = ids[:1, :_CHECK_TOKENS]
    with torch.no_grad():
        want = model(few, use_cache=False).logits.float()
        got = logits(model, decoder(model)(few, use_cache=False).last_hidden_state).float()
    tol = 1e-4 if got.dtype == torch.float32 and model.dtype == torch.float32 else 2e-2
    if got.shape != want.shape or not torch.allclose(got, want, rtol=tol, atol=tol):
        raise ScoringError(
            f"cannot score model type '{model.config.model_type}' from hidden states: its CausalLM head does "
            "more than the output embedding and final soft-capping"
        )
    model._headkv_head_checked = True


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _chunked_sum(fn: Callable[..., torch.Tensor], chunk: int, *rows: torch.Tensor) -> torch.Tensor:
    """sum over chunks of ``fn(*row_chunks)`` (each a float scalar); every chunk is checkpointed when the
    first argument requires grad, so only one chunk's vocab-size intermediates exist at a time, forward or
    backward."""
    grad = torch.is_grad_enabled() and rows[0].requires_grad
    total = None
    for lo in range(0, rows[0].shape[0], chunk):
        part = [r[lo : lo + chunk] for r in rows]
        out = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        total = out if total is None else total + out
    if total is None:
        raise ScoringError("nothing to score: no tokens")
    return total


@torch.no_grad()
def chunked_nll(
    model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL (B, T-1) float64 of ``ids[:, 1:]`` given ``hidden`` (B, T, H) of ``ids`` (B, T), and
    the top-1 hits per sequence (B,), computed ``chunk`` positions at a time (no grad)."""
    b, t = ids.shape
    nll = torch.empty(b, t - 1, dtype=torch.float64, device=hidden.device)
    correct = torch.zeros(b, dtype=torch.long, device=hidden.device)
    for lo in range(0, t - 1, chunk):
        hi = min(lo + chunk, t - 1)
        pred = logits(model, hidden[:, lo:hi]).float()  # (B, c, V)
        target = ids[:, lo + 1 : hi + 1]
        nll[:, lo:hi] = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none").view(b, -1)
        correct += (pred.argmax(-1) == target).sum(-1)
    return nll, correct


def chunked_ce(
    model: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids[:, 1:]`` given ``hidden`` (B, T, H), differentiable in
    ``hidden``: ``F.cross_entropy(model(ids).logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())``
    without its (B x T x V) logits."""

    def ce(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits(model, h).float(), target, reduction="sum")

    targets = ids[:, 1:].reshape(-1)
    return _chunked_sum(ce, chunk, _rows(hidden[:, :-1]), targets) / targets.numel()


def chunked_kl(
    model: torch.nn.Module,
    student: torch.Tensor,
    teacher: torch.Tensor,
    chunk: int = CHUNK,
    teacher_model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """Sum over all positions of KL(teacher || student) of the next-token distributions, from the final
    hidden states ``student`` and ``teacher`` (B, T, H) (the teacher scored by ``teacher_model``, default
    the same model), differentiable in ``student``; the teacher is detached:
    ``F.kl_div(log_softmax(student_logits), log_softmax(teacher_logits), log_target=True, reduction="sum")``
    in float32, without either (B x T x V) tensor."""
    tm = model if teacher_model is None else teacher_model

    def kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(logits(tm, t).float(), dim=-1)
        pred = F.log_softmax(logits(model, s).float(), dim=-1)
        return F.kl_div(pred, target, log_target=True, reduction="sum")

    if student.shape != teacher.shape:
        raise ScoringError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    return _chunked_sum(kl, chunk, _rows(student), _rows(teacher.detach()))


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = decoder(model)
    found = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not found and isinstance(getattr(base, "layers", None), torch.nn.ModuleList):
        found = list(base.layers)
    if not found:
        raise ScoringError(f"{type(model).__name__}: no decoder layers found to checkpoint")
    return found


@contextmanager
def checkpointed_layers(
    model: torch.nn.Module, recompute: Callable[[], ContextManager] | None = None
) -> Iterator[torch.nn.Module]:
    """Inside the block, each decoder layer called with grad enabled runs under non-reentrant activation
    checkpointing: it keeps only its inputs, and is recomputed in the backward (which may come after the
    block), inside ``recompute()`` when given (a context entered at recompute time, e.g. to restore an
    attention implementation that was active in the forward). Frozen weights are fine: gradients reach
    whatever requires grad (inputs or tensors the layer reads, e.g. gates) through the recorded graph.
    The module's ``training`` flag is left alone."""

    def contexts() -> tuple[ContextManager, ContextManager]:
        return nullcontext(), (recompute() if recompute is not None else nullcontext())

    layers = _layers(model)
    own = [layer.__dict__.get("forward") for layer in layers]  # an instance-level forward to restore
    for layer in layers:
        forward = layer.forward

        def wrapped(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)

        layer.forward = wrapped
    try:
        yield model
    finally:
        for layer, previous in zip(layers, own, strict=True):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous
