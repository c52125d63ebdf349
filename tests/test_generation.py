"""generate(): KV-cached decoding equals full recompute; sampling filters; stop tokens; streaming."""
import pytest
import torch

from slmlab.generation import filter_logits, generate, sample_next
from slmlab.models.layers import MoEConfig
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig

V = 61


def model_for(moe=None, n_kv_heads=2, seed=0) -> VectorSLM:
    torch.manual_seed(seed)
    cfg = VectorSLMConfig(vocab_size=V, max_seq_len=64, dim=48, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads,
                          init_std=0.2, moe=moe)
    return VectorSLM(cfg)


def greedy_by_recompute(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model({"input_ids": ids}).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


@pytest.mark.parametrize("moe,n_kv", [(None, 1), (None, 4), (MoEConfig(num_experts=3, top_k=2), 2)])
def test_kv_cached_greedy_equals_full_recompute(moe, n_kv):
    model = model_for(moe, n_kv).eval()
    prompt = torch.randint(0, V, (3, 5))
    out = generate(model, prompt, 12, temperature=0)
    assert out.shape == (3, 17)
    assert torch.equal(out, greedy_by_recompute(model, prompt, 12))


def test_generate_restores_training_mode_and_needs_no_grad():
    model = model_for().train()
    out = generate(model, torch.randint(0, V, (1, 4)), 3, temperature=0)
    assert model.training and out.shape == (1, 7) and not out.requires_grad


def test_top_k_filter_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=2)
    assert torch.isfinite(kept).nonzero()[:, 1].tolist() == [1, 3]
    assert torch.equal(filter_logits(logits, top_k=None), logits)


def test_top_p_filter_is_the_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    keep = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert keep(0.5) == [1]  # the top token alone reaches 0.5
    assert keep(0.79) == [1, 3]
    assert keep(0.81) == [1, 2, 3]
    assert keep(0.01) == [1]  # the most likely token always survives
    assert keep(1.0) == [0, 1, 2, 3]


def test_sampling_respects_filters_and_generator():
    logits = torch.randn(1, 50).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    top5 = set(logits[0].topk(5).indices.tolist())
    draws = sample_next(logits, temperature=1.0, top_k=5, generator=g)
    assert set(draws.tolist()) <= top5 and len(set(draws.tolist())) == 5
    assert torch.equal(sample_next(logits[:3], temperature=0), logits[:3].argmax(-1))
    assert torch.equal(sample_next(logits[:3], temperature=1.0, top_k=1), logits[:3].argmax(-1))


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = model_for().eval()
    prompt = torch.randint(0, V, (2, 4))
    a = generate(model, prompt, 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(generate(model, prompt, 6, temperature=1.3, top_k=1), generate(model, prompt, 6, temperature=0))


def test_stop_tokens_end_sequences_and_stream():
    model = model_for().eval()
    prompt = torch.randint(0, V, (2, 4))
    sample = dict(temperature=1.0)  # sampled (seeded) rather than greedy: a random model's argmax repeats itself
    free = generate(model, prompt, 10, generator=torch.Generator().manual_seed(0), **sample)
    row0, row1 = free[0, 4:].tolist(), free[1, 4:].tolist()
    # stop on the first token sequence 0 emits that is not its first token (so it stops at step j >= 1)
    j = next(i for i, t in enumerate(row0) if t != row0[0])
    stop = row0[j]
    streamed = []
    out = generate(model, prompt, 10, stop_token_ids=[stop], on_token=streamed.append,
                   generator=torch.Generator().manual_seed(0), **sample)
    assert out[0, 4:4 + j + 1].tolist() == row0[: j + 1]
    if stop in row1:  # both finish: generation ends at the later stop
        end1 = row1.index(stop)
        assert out.shape[1] == 4 + max(j, end1) + 1
        assert out[1, 4:4 + end1 + 1].tolist() == row1[: end1 + 1]
    else:  # sequence 1 runs to the limit; sequence 0 is padded with its stop token
        assert torch.equal(out[1], free[1])
    assert (out[0, 4 + j:] == stop).all()
    assert len(streamed) == out.shape[1] - 4 and all(len(s) == 2 for s in streamed)
    assert [s[0] for s in streamed] == out[0, 4:].tolist()


def test_all_sequences_stopping_ends_early():
    model = model_for().eval()
    prompt = torch.randint(0, V, (1, 4))
    free = generate(model, prompt, 8, temperature=0)
    out = generate(model, prompt, 8, temperature=0, stop_token_ids={free[0, 4].item()})
    assert out.shape == (1, 5) and out[0, 4] == free[0, 4]


def test_too_long_request_fails_before_generating():
    model = model_for()
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)
