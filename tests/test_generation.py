"""generate(): KV-cached decoding equals full recompute; sampling filters; stop tokens; streaming; prompts of
different lengths in one batch (left padding + attention_mask) equal generating each prompt alone."""
import pickle

import pytest
import torch

from slmlab.generation import filter_logits, generate, generate_ragged, sample_next
from slmlab.models.layers import MoEConfig
from slmlab.models.new_llm import NewLLM, NewLLMConfig
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


# ---- prompts of different lengths: left padding and a mask ------------------------------------------

RAGGED = [(None, 2), (MoEConfig(num_experts=3, top_k=2), 1)]  # dense (GQA 4:2) and MoE (MQA)


def ragged_prompts(lengths=(3, 7, 5), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]


def left_padded(prompts, pad_id=0):
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@pytest.mark.parametrize("moe,n_kv", RAGGED)
def test_ragged_greedy_equals_one_prompt_at_a_time(moe, n_kv):
    model = model_for(moe, n_kv).eval()
    prompts = ragged_prompts()
    alone = [generate(model, torch.tensor([p]), 9, temperature=0)[0].tolist() for p in prompts]
    assert generate_ragged(model, prompts, pad_id=5, max_new_tokens=9, temperature=0) == alone
    # generate itself keeps the padding in front of each row; the pad id changes nothing
    ids, mask = left_padded(prompts, pad_id=0)
    out = generate(model, ids, 9, temperature=0, attention_mask=mask)
    assert [row[7 - len(p):] for row, p in zip(out.tolist(), prompts)] == alone


@pytest.mark.parametrize("moe,n_kv", RAGGED)
def test_ragged_prefill_and_decode_logits_equal_single_prompt(moe, n_kv):
    model = model_for(moe, n_kv).eval()
    prompts = ragged_prompts()
    ids, mask = left_padded(prompts)
    nxt = torch.randint(0, V, (3, 1))
    with torch.no_grad():
        cache = model.new_cache(3, 10)
        pre = model({"input_ids": ids, "attention_mask": mask}, cache=cache, logits_to_keep=1).logits[:, -1]
        full = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        dec = model({"input_ids": nxt, "attention_mask": full}, cache=cache, start_pos=7).logits[:, -1]
        for i, p in enumerate(prompts):
            one = model({"input_ids": torch.tensor([p + nxt[i].tolist()])}).logits[0]
            torch.testing.assert_close(pre[i], one[-2], atol=1e-5, rtol=0)
            torch.testing.assert_close(dec[i], one[-1], atol=1e-5, rtol=0)


def test_ragged_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = model_for().eval()
    prompts = ragged_prompts()
    sample = lambda seed: generate_ragged(  # noqa: E731
        model, prompts, max_new_tokens=8, temperature=0.9, top_p=0.95, generator=torch.Generator().manual_seed(seed))
    a = sample(3)
    assert a == sample(3) and [len(r) for r in a] == [11, 15, 13]
    assert [r[: len(p)] for r, p in zip(a, prompts)] == prompts
    assert all(0 <= t < V for r in a for t in r)
    greedy = generate_ragged(model, prompts, max_new_tokens=8, temperature=0)
    assert generate_ragged(model, prompts, max_new_tokens=8, temperature=1.3, top_k=1) == greedy


def test_ragged_stop_tokens_end_each_prompt_as_alone():
    model = model_for().eval()
    prompts = ragged_prompts()
    free = generate_ragged(model, prompts, max_new_tokens=10, temperature=0)
    # stop on the first token of prompt 0's continuation that is not its first (it stops at a step >= 1)
    # and on prompt 2's first token (it stops at once); the others stop if they emit one of those
    cont0 = free[0][3:]
    stops = [next(t for t in cont0[1:] if t != cont0[0]), free[2][5]]
    streamed = []
    out = generate_ragged(model, prompts, max_new_tokens=10, temperature=0, stop_token_ids=stops,
                          on_token=streamed.append)
    alone = [generate(model, torch.tensor([p]), 10, temperature=0, stop_token_ids=stops)[0].tolist()
             for p in prompts]
    assert out == alone
    assert out[0][-1] in stops and 3 + 2 <= len(out[0]) < len(free[0])
    assert out[2] == free[2][:6]
    assert len(streamed) == max(len(r) - len(p) for r, p in zip(out, prompts))


def test_equal_length_mask_takes_the_plain_path():
    model = model_for().eval()
    prompt = torch.randint(0, V, (2, 5))
    plain = generate(model, prompt, 6, temperature=0)
    assert torch.equal(generate(model, prompt, 6, temperature=0, attention_mask=torch.ones(2, 5)), plain)
    assert generate_ragged(model, list(prompt), max_new_tokens=6, temperature=0) == plain.tolist()


def test_family_without_padding_support_refuses_ragged_prompts():
    model = NewLLM(NewLLMConfig(vocab_size=V, dim=16, context_dim=16, n_layers=1, ffn_hidden=16)).eval()
    assert not model.capabilities.padded_generation
    with pytest.raises(TypeError, match="NewLLM cannot generate from padded prompts.*must be equal length"):
        generate_ragged(model, ragged_prompts(), max_new_tokens=3)
    same = ragged_prompts((4, 4))  # equal lengths need no padding: every family takes them
    assert [len(r) for r in generate_ragged(model, same, max_new_tokens=3, temperature=0)] == [7, 7]


@pytest.mark.parametrize("mask,match", [
    ([[0, 0, 0, 0], [0, 1, 1, 1]], r"rows \[0\] are all padding"),
    ([[1, 1, 1, 1], [1, 1, 1, 0]], r"left padding.*rows \[1\]"),  # right padding
    ([[0, 1, 0, 1], [1, 1, 1, 1]], r"left padding.*rows \[0\]"),  # a gap
    ([[1, 1, 1], [0, 1, 1]], r"expected the shape of input_ids"),
])
def test_bad_padding_masks_are_refused(mask, match):
    model = model_for().eval()
    with pytest.raises(ValueError, match=match):
        generate(model, torch.randint(0, V, (2, 4)), 3, attention_mask=torch.tensor(mask))


def test_empty_ragged_prompt_is_refused():
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        generate_ragged(model_for(), [[1, 2], []], max_new_tokens=3)


def test_rotary_gives_each_row_its_own_positions():
    model = model_for()
    cos, sin = model.rope(0, 4, torch.float32)
    pos = torch.tensor([[0, 0, 0, 1], [0, 1, 2, 3]])  # a row padded by 2, a full row
    rcos, rsin = model.rope(0, 4, torch.float32, pos)
    assert rcos.shape == (2, 4, cos.size(-1))
    assert torch.equal(rcos[0], cos[pos[0]]) and torch.equal(rsin[1], sin)


def test_compiled_fixed_shape_step_gives_the_eager_tokens_and_reuses_its_cache():
    """generate(compile_step=True): one torch.compile'd step with a tensor position over a static cache read
    in full under a mask. Greedy tokens equal eager decoding, for equal and ragged prompts, and a second
    call of another length in the same bucket reuses the cache (and, on CUDA, the captured graph)."""
    from slmlab.generation import FixedShapeDecoder

    model = model_for().eval()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(7))
    assert torch.equal(generate(model, prompt, 12, temperature=0, compile_step=True),
                       generate(model, prompt, 12, temperature=0))
    decoder = FixedShapeDecoder.of(model)
    cache = decoder._cache
    assert cache.max_len == 64  # the 256 bucket, capped at the model's max_seq_len
    longer = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(8))
    assert torch.equal(generate(model, longer, 20, temperature=0, compile_step=True),
                       generate(model, longer, 20, temperature=0))
    assert decoder._cache is cache and FixedShapeDecoder.of(model) is decoder
    prompts = ragged_prompts()
    assert generate_ragged(model, prompts, max_new_tokens=9, temperature=0, compile_step=True) == \
        generate_ragged(model, prompts, max_new_tokens=9, temperature=0)
    pickle.dumps(model)  # the decoder (a compiled function, a cache) is beside the model, not on it
    assert "_fixed_shape_decoder" not in model.__dict__


def test_fixed_shape_step_is_refused_where_shapes_cannot_be_fixed():
    moe = model_for(MoEConfig(num_experts=3, top_k=2)).eval()
    with pytest.raises(TypeError, match="fixed_shape_decode"):
        generate(moe, torch.randint(0, V, (1, 4)), 3, temperature=0, compile_step=True)
    dense = model_for().eval()
    cache = dense.new_cache(1, 16)
    with pytest.raises(ValueError, match="expected one token"):
        dense({"input_ids": torch.randint(0, V, (1, 3))}, cache=cache, start_pos=torch.tensor([0]))
    with pytest.raises(ValueError, match="attention_mask: the fixed-shape step expects shape"):
        dense({"input_ids": torch.randint(0, V, (1, 1)), "attention_mask": torch.ones(1, 5)}, cache=cache,
              start_pos=torch.tensor([4]))


@pytest.mark.parametrize("moe", [None, MoEConfig(num_experts=3, top_k=2)])
def test_decode_layout_copy_decodes_the_same_tokens_and_leaves_the_model_alone(moe, monkeypatch):
    import slmlab.generation as gen

    model = model_for(moe).eval()
    prompt = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(9))
    # this model's weights are all small, so nothing is packed: the (in, out) layout for the wide ones
    fast = gen.decode_layout(model)
    wide = [n for n, m in fast.named_modules() if type(m) is torch.nn.Linear and m.weight.size(0) > m.weight.size(1)]
    assert "lm_head" in wide and "layers.0.attn.wqkv" in wide
    for name, m in fast.named_modules():
        if type(m) is torch.nn.Linear:  # wide ones stored (in, out): a transposed view; the rest untouched
            assert m.weight.stride() == ((1, m.weight.size(0)) if name in wide else (m.weight.size(1), 1)), name
    assert fast.lm_head.weight is fast.tok_emb.weight  # still tied
    # a threshold the lm_head passes (61 x 48 fp32 = 11.7 kB) but attn.wo (48 x 48) does not: the big ones
    # go through oneDNN's packed kernel, the rest as before
    monkeypatch.setattr(gen, "PACK_MIN_BYTES", 48 * V * 4)
    packed = gen.decode_layout(model)
    linears = (torch.nn.Linear, gen.PackedLinear)
    kinds = {n: type(m).__name__ for n, m in packed.named_modules() if isinstance(m, linears)}
    if gen.can_pack(model.lm_head.weight):
        assert kinds["lm_head"] == "PackedLinear" and kinds["layers.0.attn.wo"] == "Linear", kinds
        assert packed.lm_head.weight is packed.tok_emb.weight  # the tie holds; the embedding reads the original
        assert set(packed.state_dict()) == set(model.state_dict())  # the packed copy is not part of the state
        again = pickle.loads(pickle.dumps(packed))  # the opaque oneDNN tensor is rebuilt from the weight
        assert type(again.lm_head).__name__ == "PackedLinear" and again.lm_head.weight is again.tok_emb.weight
        assert torch.equal(generate(again, prompt, 12, temperature=0), generate(model, prompt, 12, temperature=0))
    assert all(p.is_contiguous() for p in model.parameters())  # the original keeps its layout (it can be saved)
    for decoder in (fast, packed):
        with torch.no_grad():
            torch.testing.assert_close(decoder({"input_ids": prompt}).logits, model({"input_ids": prompt}).logits,
                                       atol=1e-5, rtol=0)
        assert torch.equal(generate(decoder, prompt, 12, temperature=0), generate(model, prompt, 12, temperature=0))


def test_decode_layout_keeps_nn_linear_where_onednn_fails_its_self_check(monkeypatch):
    """The oneDNN ops are torch internals: where they are missing or disagree with F.linear on a small product,
    decode_layout packs nothing and decodes through nn.Linear, with the same tokens."""
    import slmlab.generation as gen

    model = model_for().eval()
    monkeypatch.setattr(gen, "PACK_MIN_BYTES", 0)
    assert gen.can_pack(model.lm_head.weight) == gen._onednn_linear_works()
    monkeypatch.setattr(gen, "_onednn_linear_works", lambda: False)
    fast = gen.decode_layout(model)
    assert not any(isinstance(m, gen.PackedLinear) for m in fast.modules())
    prompt = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(3))
    assert torch.equal(generate(fast, prompt, 8, temperature=0), generate(model, prompt, 8, temperature=0))
