"""New-LLM: parallel scan == recurrence, causality, constant state, no attention, config errors, learns."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from slmlab.models.base import FAMILIES, build_model  # noqa: E402
from slmlab.models.new_llm import MAX_FORGET, SCAN_CHUNK, NewLLM, NewLLMConfig, linear_scan  # noqa: E402

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def _single_thread(one_thread):
    """Tiny models gain nothing from intra-op threads and only contend with other jobs."""


def tiny(**kw) -> NewLLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=VOCAB, dim=32, context_dim=24, n_layers=3, ffn_hidden=48, max_seq_len=64)
    cfg.update(kw)
    return NewLLM(NewLLMConfig(**cfg)).eval()


VARIANTS = [
    dict(gate="none", norm="rmsnorm"),
    dict(gate="scalar", norm="layernorm"),
    dict(gate="vector", norm="rmsnorm"),
    dict(gate="vector", norm="none", tie_embeddings=False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
def test_recurrent_step_matches_parallel_form(variant):
    model = tiny(**variant)
    ids = torch.randint(0, VOCAB, (2, 2 * SCAN_CHUNK + 5), generator=torch.Generator().manual_seed(1))
    T = ids.size(1)
    with torch.no_grad():
        parallel = model({"input_ids": ids}).logits
        state = model.new_cache(2, T)
        steps = torch.cat(
            [model({"input_ids": ids[:, t : t + 1]}, cache=state, start_pos=t).logits for t in range(T)], dim=1
        )
        # chunked prefill (parallel form continuing from a state), then single steps, then a chunk again
        state = model.new_cache(2, T)
        mixed = [model({"input_ids": ids[:, :21]}, cache=state, start_pos=0).logits]
        mixed += [model({"input_ids": ids[:, t : t + 1]}, cache=state, start_pos=t).logits for t in range(21, 24)]
        mixed.append(model({"input_ids": ids[:, 24:]}, cache=state, start_pos=24).logits)
    torch.testing.assert_close(steps, parallel, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(mixed, dim=1), parallel, atol=1e-5, rtol=0)
    assert state.pos == T


def test_linear_scan_matches_python_loop_at_strongest_decay():
    g = torch.Generator().manual_seed(0)
    B, T, C = 2, 300, 8
    log_a = -MAX_FORGET * torch.rand(B, T, C, generator=g)
    log_a[:, ::7] = -MAX_FORGET  # the bound itself: exp(-L) reaches e^64 inside a chunk
    b, c0 = torch.randn(B, T, C, generator=g), torch.randn(B, C, generator=g)
    ref, c = [], c0
    for t in range(T):
        c = log_a[:, t].exp() * c + b[:, t]
        ref.append(c)
    torch.testing.assert_close(linear_scan(log_a, b, c0), torch.stack(ref, 1), atol=1e-5, rtol=1e-5)
    # scalar decay broadcasts over channels; no decay is a running sum
    torch.testing.assert_close(
        linear_scan(log_a[..., :1], b, c0)[:, -1], linear_scan(log_a[..., :1].expand(B, T, C), b, c0)[:, -1]
    )
    torch.testing.assert_close(linear_scan(None, b, c0), c0[:, None] + b.cumsum(1))


def test_scan_gradients_finite_over_long_sequence():
    log_a = (-MAX_FORGET * torch.rand(1, 1000, 4)).requires_grad_()
    b = torch.randn(1, 1000, 4, requires_grad=True)
    linear_scan(log_a, b).square().mean().backward()
    assert torch.isfinite(log_a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("gate", ["none", "scalar", "vector"])
def test_causal(gate):
    model = tiny(gate=gate)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    k = 23
    changed = ids.clone()
    changed[0, k] = (ids[0, k] + 1) % VOCAB
    with torch.no_grad():
        a, b = model({"input_ids": ids}).logits, model({"input_ids": changed}).logits
    torch.testing.assert_close(a[:, :k], b[:, :k], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, k:], b[:, k:])


def test_state_size_independent_of_sequence_length():
    model = tiny()
    short, long = model.new_cache(2, max_len=16), model.new_cache(2, max_len=1 << 20)
    expected = model.cfg.n_layers * 2 * model.cfg.context_dim * 4  # fp32
    assert short.nbytes == long.nbytes == expected
    with torch.no_grad():
        model({"input_ids": torch.randint(0, VOCAB, (2, 5))}, cache=short)
        model({"input_ids": torch.randint(0, VOCAB, (2, 300))}, cache=long)
        ptr = long.context.data_ptr()
        model({"input_ids": torch.randint(0, VOCAB, (2, 1))}, cache=long, start_pos=300)
    assert short.context.shape == long.context.shape and long.nbytes == expected
    assert long.context.data_ptr() == ptr  # updated in place, no growth or reallocation


def test_no_attention_and_no_positional_parameters():
    for variant in VARIANTS:
        model = tiny(**variant)
        for name, m in model.named_modules():
            assert not isinstance(m, nn.MultiheadAttention)
            assert not any(s in type(m).__name__.lower() for s in ("attention", "rotary", "position")), name
        names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
        assert not any(s in n for n in names for s in ("pos", "rope", "rotary", "wpe", "attn")), names
        assert list(model.buffers()) == []  # no position tables of any kind
        # the only (vocab|seq)-sized parameters are the token embedding / head, nothing scales with max_seq_len
        longer = NewLLM(model.cfg.model_copy(update={"max_seq_len": 4096}))
        assert sum(p.numel() for p in longer.parameters()) == sum(p.numel() for p in model.parameters())


def test_config_validation_errors_carry_field_location():
    base = dict(vocab_size=VOCAB, dim=8, context_dim=8, n_layers=1, ffn_hidden=8)
    with pytest.raises(ValidationError) as e:
        NewLLMConfig(**base, gate="none", norm="none")
    assert e.value.errors()[0]["loc"] == ("norm",) and "running sum" in e.value.errors()[0]["msg"]
    cfg = NewLLMConfig(**base, gate="vector", norm="none")
    with pytest.raises(ValidationError) as e:
        cfg.gate = "none"  # validate_assignment: the same rule from the other side
    assert e.value.errors()[0]["loc"] == ("gate",)
    for bad, loc in [
        ({"gate": "matrix"}, ("gate",)),
        ({"norm": "batchnorm"}, ("norm",)),
        ({"context_dim": 0}, ("context_dim",)),
        ({"init_std": 0.0}, ("init_std",)),
        ({"contxt_dim": 4}, ("contxt_dim",)),
    ]:
        with pytest.raises(ValidationError) as e:
            NewLLMConfig(**{**base, **bad})
        assert e.value.errors()[0]["loc"] == loc


def test_registered_and_built_from_registry():
    assert FAMILIES["new_llm"].config_cls is NewLLMConfig
    model = build_model(NewLLMConfig(vocab_size=VOCAB, dim=8, context_dim=8, n_layers=1, ffn_hidden=8))
    assert isinstance(model, NewLLM)


def test_cache_rejects_rewind_and_keeps_last_logits():
    model = tiny()
    ids = torch.randint(0, VOCAB, (1, 10))
    state = model.new_cache(1, 10)
    with torch.no_grad():
        out = model({"input_ids": ids}, cache=state, logits_to_keep=1)
        assert out.logits.shape == (1, 1, VOCAB)
        with pytest.raises(ValueError, match="start_pos"):
            model({"input_ids": ids[:, :1]}, cache=state, start_pos=5)


def test_bf16_forward_keeps_fp32_state():
    model = tiny().to(torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        state = model.new_cache(2, 20, dtype=torch.bfloat16)
        logits = model({"input_ids": ids}, cache=state).logits
    assert state.context.dtype == torch.float32 and logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    with torch.no_grad():
        ref = tiny()({"input_ids": ids}).logits
    assert (logits.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


@pytest.mark.parametrize("gate", ["none", "vector"])
def test_overfits_a_tiny_batch(gate):
    torch.manual_seed(0)
    model = NewLLM(NewLLMConfig(vocab_size=64, dim=32, context_dim=32, n_layers=2, ffn_hidden=64, gate=gate))
    ids = torch.randint(0, 64, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert out.lm_loss is out.loss
    assert losses[-1] < 0.25 * losses[0], losses  # ln(64) = 4.16 -> ~0.15 observed


def test_backward_through_cached_chunks():
    """Truncated-BPTT style use: a chunk forward with a cache, then another; gradients stay valid."""
    model = tiny().train()
    ids = torch.randint(0, VOCAB, (2, 24))
    state = model.new_cache(2, 24)
    model({"input_ids": ids[:, :12]}, cache=state)
    out = model({"input_ids": ids[:, 12:], "labels": ids[:, 12:].roll(-1, 1)}, cache=state, start_pos=12)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_generic_generator_matches_parallel_greedy():
    generation = pytest.importorskip("slmlab.generation")
    model = tiny()
    prompt = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    out = generation.generate(model, prompt, max_new_tokens=6, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):  # no cache: re-run the whole sequence in the parallel form each time
            seq = torch.cat([seq, model({"input_ids": seq}).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
