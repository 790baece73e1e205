"""Scoring from hidden states, a chunk of tokens at a time, equals scoring the full logits: the head of every
supported family, the evaluator's NLL and hits, the KL and CE losses and their gradients, and the layer
checkpointing of training (same loss and gate gradients, the layers really recomputed)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from headkv.alloc.gates import WindowGates
from headkv.alloc.train import distill_loss
from headkv.models import scoring
from headkv.models.attention import is_clean
from headkv.models.loading import freeze, model_shape

VOCAB = 101
T = 37  # with CHUNK = 8: four full chunks and a short one
CHUNK = 8
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=128)
GQA = dict(SMALL, num_key_value_heads=2)
GEMMA = dict(GQA, head_dim=8, query_pre_attn_scalar=8, sliding_window=16)
CONFIGS = {
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL, rotary_pct=0.25),
    "llama": lambda: LlamaConfig(**GQA),
    "mistral": lambda: MistralConfig(**GQA, sliding_window=16),
    "qwen2": lambda: Qwen2Config(**GQA),
    "qwen3": lambda: Qwen3Config(**GQA, head_dim=8),
    "gemma2": lambda: Gemma2Config(**GEMMA, final_logit_softcapping=0.5),  # a cap that bends the logits
    "gemma3_text": lambda: Gemma3TextConfig(**GEMMA, final_logit_softcapping=0.5),
    "gemma3_text-nocap": lambda: Gemma3TextConfig(**GEMMA),
    "phi3": lambda: Phi3Config(**GQA, pad_token_id=0),
}
GRAD = ["gpt_neox", "llama", "gemma2", "gemma3_text"]


def model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = CONFIGS[name]()
    impl = "eager" if cfg.model_type.startswith("gemma") else "sdpa"  # softcapped attention: eager
    return freeze(AutoModelForCausalLM.from_config(cfg, attn_implementation=impl, dtype=torch.float32))


def ids(seed: int = 1, b: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, T), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_every_verified_family_is_tested():
    assert scoring.VERIFIED == {CONFIGS[n]().model_type for n in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_head_of_hidden_states_is_the_causal_lm(name):
    lm, x = model(name), ids(b=2)
    with torch.no_grad():
        want = lm(x).logits
        got = scoring.logits(lm, scoring.hidden(lm, x))
    cap = getattr(lm.config, "final_logit_softcapping", None)
    if cap is not None:
        assert float(want.abs().max()) < cap  # the cap is applied, and bends the logits
        assert float(want.abs().max()) > cap / 2
    close(got, want)
    nll, hits = scoring.chunked_nll(lm, scoring.hidden(lm, x), x, chunk=CHUNK)
    full = want[:, :-1].float()
    close(nll, F.cross_entropy(full.transpose(1, 2), x[:, 1:], reduction="none").double())
    assert nll.dtype == torch.float64 and nll.shape == (2, T - 1)
    assert hits.tolist() == (full.argmax(-1) == x[:, 1:]).sum(-1).tolist()


@pytest.mark.parametrize("name", GRAD)
def test_chunked_kl_and_ce_and_their_gradients_equal_the_full_logits(name):
    student, teacher, x = model(name), model(name, seed=1), ids(b=2)
    for p in student.parameters():
        p.requires_grad_(True)
    params = [p for p in student.parameters()]

    def grads(loss):
        return torch.autograd.grad(loss, params, allow_unused=True)

    with torch.no_grad():
        t_logits, t_hidden = teacher(x).logits, scoring.hidden(teacher, x)
    full_kl = F.kl_div(F.log_softmax(student(x).logits.float(), -1), F.log_softmax(t_logits.float(), -1),
                       log_target=True, reduction="sum")
    kl = scoring.chunked_kl(student, scoring.hidden(student, x), t_hidden, CHUNK, teacher_model=teacher)
    close(kl, full_kl)
    for g, h in zip(grads(kl), grads(full_kl), strict=True):
        assert (g is None) == (h is None)
        if g is not None:
            close(g, h)
    logits = student(x).logits.float()
    full_ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    ce = scoring.chunked_ce(student, scoring.hidden(student, x), x, CHUNK)
    close(ce, full_ce)
    for g, h in zip(grads(ce), grads(full_ce), strict=True):
        if g is not None:
            close(g, h)


def test_the_gradient_reaches_through_the_hidden_states_and_chunks_are_recomputed(monkeypatch):
    """Only the hidden states require grad (the model frozen, as in training): the gradient wrt them equals
    the full-logit one, and each chunk's head runs twice (forward, then recomputed in the backward)."""
    lm, x = model("gemma2"), ids()
    with torch.no_grad():
        base = scoring.hidden(lm, x)
        teacher = scoring.hidden(model("gemma2", seed=1), x)
    h1 = base.clone().requires_grad_(True)
    head = lm.get_output_embeddings()
    calls = []
    handle = head.register_forward_hook(lambda *a: calls.append(1))
    loss = scoring.chunked_kl(lm, h1, teacher, CHUNK)
    n_fwd = len(calls)
    loss.backward()
    handle.remove()
    n_chunks = -(-T // CHUNK)
    assert n_fwd == 2 * n_chunks and len(calls) == 4 * n_chunks  # student + teacher, again in the backward
    h2 = base.clone().requires_grad_(True)
    full = F.kl_div(F.log_softmax(scoring.logits(lm, h2).float(), -1),
                    F.log_softmax(scoring.logits(lm, teacher).float(), -1), log_target=True, reduction="sum")
    full.backward()
    close(loss, full)
    close(h1.grad, h2.grad)


@pytest.mark.parametrize("name", ["llama", "gpt_neox"])
@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_layer_checkpointing_gives_the_same_loss_and_gate_gradients_and_recomputes(name, objective):
    """The frozen model stays in eval mode; the layers are recomputed in the backward (after windowed()
    has exited, as under Lightning), under the same soft mask: loss and gate gradients equal."""
    lm, x = model(name), ids(b=2)
    shape = model_shape(lm)
    attn_calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: attn_calls.append(1))
             for n, m in lm.named_modules() if n.endswith(("self_attn", "attention")) and "." in n]
    assert len(hooks) == shape.n_layers
    out = {}
    for remat in (False, True):
        gates = WindowGates(shape.shape, 12.0, T, 2)
        with torch.no_grad():
            gates.logits.normal_(generator=torch.Generator().manual_seed(0))
        attn_calls.clear()
        loss = distill_loss(lm, gates, x, tau=2.0, objective=objective, checkpoint=remat)
        fwd = len(attn_calls)
        assert is_clean(lm)
        loss.backward()
        assert is_clean(lm)
        out[remat] = loss.detach(), gates.logits.grad.clone(), fwd, len(attn_calls)
    for h in hooks:
        h.remove()
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())
    close(out[True][0], out[False][0])
    close(out[True][1], out[False][1])
    assert float(out[True][1].abs().max()) > 0
    teacher = shape.n_layers if objective == "kl" else 0
    assert out[False][2] == out[False][3] == teacher + shape.n_layers  # nothing runs in the backward
    assert out[True][2] == teacher + shape.n_layers and out[True][3] == out[True][2] + shape.n_layers
    for layer in scoring._layers(lm):  # the wrappers are gone
        assert "forward" not in layer.__dict__


def test_a_family_with_another_head_is_refused(monkeypatch):
    lm, x = model("llama"), ids()
    monkeypatch.setattr(scoring, "VERIFIED", frozenset())
    scoring.hidden(lm, x)  # checked once against model(ids).logits: equal
    assert lm._headkv_head_checked
    other = model("llama")
    head = other.lm_head
    monkeypatch.setattr(other, "forward", lambda *a, **k: type("O", (), {"logits": head(
        scoring.decoder(other)(*a, **k).last_hidden_state) * 2})())
    with pytest.raises(scoring.ScoringError, match="cannot score model type 'llama'"):
        scoring.hidden(other, x)
