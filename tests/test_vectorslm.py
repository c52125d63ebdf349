"""VectorSLM: config validation, forward/loss contract, KV-cache consistency, dtype handling."""

import math

import pytest
import torch
from pydantic import ValidationError

from slmlab.models.base import FAMILIES, build_model, count_parameters
from slmlab.models.layers import MoEConfig
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig


def tiny(**kw) -> VectorSLMConfig:
    base = dict(vocab_size=97, max_seq_len=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    return VectorSLMConfig(**{**base, **kw})


def _single_error(exc: ValidationError):
    errors = exc.errors()
    assert len(errors) == 1, errors
    return errors[0]


# ---------------------------------------------------------------------------------------------- config


def test_n_heads_must_divide_dim_error_located_at_n_heads():
    with pytest.raises(ValidationError) as e:
        VectorSLMConfig(dim=256, n_heads=7, n_kv_heads=7)
    err = _single_error(e.value)
    assert err["loc"] == ("n_heads",)
    assert "expected a divisor of dim=256, found 7" in err["msg"]


def test_n_kv_heads_must_divide_n_heads_error_located_at_n_kv_heads():
    with pytest.raises(ValidationError) as e:
        VectorSLMConfig(dim=256, n_heads=8, n_kv_heads=3)
    err = _single_error(e.value)
    assert err["loc"] == ("n_kv_heads",)
    assert "expected a divisor of n_heads=8, found 3" in err["msg"]


def test_head_dim_must_be_even():
    with pytest.raises(ValidationError) as e:
        VectorSLMConfig(dim=96, n_heads=32, n_kv_heads=32)  # head_dim 3
    err = _single_error(e.value)
    assert err["loc"] == ("n_heads",)
    assert "even head_dim" in err["msg"] and "found 32" in err["msg"]


def test_validation_on_assignment_and_unknown_keys():
    cfg = VectorSLMConfig(dim=256, n_heads=8, n_kv_heads=4)
    with pytest.raises(ValidationError) as e:
        cfg.n_kv_heads = 3
    assert _single_error(e.value)["loc"] == ("n_kv_heads",)
    with pytest.raises(ValidationError) as e:
        VectorSLMConfig(dim=256, n_heads=8, n_kv_heads=4, hidden=3)
    assert _single_error(e.value)["loc"] == ("hidden",)
    with pytest.raises(ValidationError) as e:
        VectorSLMConfig(moe={"num_experts": 4, "top_k": 2, "capcity_factor": 1.0})
    assert e.value.errors()[0]["loc"] == ("moe", "capcity_factor")


def test_moe_top_k_at_most_num_experts():
    with pytest.raises(ValidationError) as e:
        MoEConfig(num_experts=2, top_k=3)
    err = _single_error(e.value)
    assert err["loc"] == ("top_k",) and "expected at most num_experts=2, found 3" in err["msg"]
    with pytest.raises(ValidationError) as e:
        VectorSLMConfig(moe={"num_experts": 4, "top_k": 5})
    assert _single_error(e.value)["loc"] == ("moe", "top_k")
    cfg = VectorSLMConfig(moe={"num_experts": 4, "top_k": 4})
    assert cfg.moe.top_k == 4


def test_ffn_hidden_defaults_to_llama_rule():
    assert VectorSLMConfig(dim=256, n_heads=4, n_kv_heads=4, multiple_of=64).ffn_dim == 704  # 682 -> 704
    assert VectorSLMConfig(dim=4096, n_heads=32, n_kv_heads=8, multiple_of=256).ffn_dim == 11008  # Llama-7B
    assert VectorSLMConfig(dim=256, n_heads=4, n_kv_heads=4, ffn_hidden=300).ffn_dim == 300


# ---------------------------------------------------------------------------------------------- model


def test_registered_and_built_through_registry():
    assert FAMILIES["vectorslm"].config_cls is VectorSLMConfig
    model = build_model(tiny())
    assert isinstance(model, VectorSLM)


def test_forward_loss_and_tied_embeddings():
    torch.manual_seed(0)
    cfg = tiny()
    model = VectorSLM(cfg)
    assert model.lm_head.weight is model.tok_emb.weight
    untied = VectorSLM(tiny(tie_embeddings=False))
    assert count_parameters(untied) - count_parameters(model) == cfg.vocab_size * cfg.dim

    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = model({"input_ids": ids, "labels": labels})
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert out.loss is out.lm_loss and out.metrics == {}
    assert abs(out.lm_loss.item() - math.log(cfg.vocab_size)) < 0.5  # small init -> near-uniform
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model({"input_ids": ids}).loss is None


def test_logits_to_keep():
    model = VectorSLM(tiny()).eval()
    ids = torch.randint(0, 97, (2, 10))
    full = model({"input_ids": ids}).logits
    torch.testing.assert_close(model({"input_ids": ids}, logits_to_keep=3).logits, full[:, -3:])


@pytest.mark.parametrize("moe", [None, MoEConfig(num_experts=4, top_k=2)])
def test_cache_prefill_chunks_and_decode_match_full_forward(moe):
    torch.manual_seed(0)
    model = VectorSLM(tiny(moe=moe, init_std=0.1)).eval()
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model({"input_ids": ids}).logits
        cache = model.new_cache(2, 32)
        parts = [
            model({"input_ids": ids[:, :7]}, cache=cache, start_pos=0).logits,  # prefill (causal)
            model({"input_ids": ids[:, 7:12]}, cache=cache, start_pos=7).logits,
        ]  # chunk with explicit mask
        parts += [
            model({"input_ids": ids[:, t : t + 1]}, cache=cache, start_pos=t).logits for t in range(12, 20)
        ]  # decode
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_position_limit_raise():
    model = VectorSLM(tiny()).eval()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model({"input_ids": torch.zeros(1, 5, dtype=torch.long)}, cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=64"):
        model({"input_ids": torch.zeros(1, 65, dtype=torch.long)})


def test_bf16_cast_keeps_rotary_tables_fp32_and_autocast_runs():
    torch.manual_seed(0)
    model = VectorSLM(tiny(moe=MoEConfig(num_experts=4, top_k=2)))
    ids = torch.randint(0, 97, (2, 12))
    ref = model({"input_ids": ids}).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({"input_ids": ids, "labels": ids})
        cache = model.new_cache(2, 16, dtype=torch.bfloat16)
        model({"input_ids": ids}, cache=cache)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    assert (out.logits.float() - ref).abs().max() < 0.1
    bf = VectorSLM(tiny()).to(torch.bfloat16)
    assert bf.rope.cos.dtype == torch.float32 and bf.rope.sin.dtype == torch.float32
    assert bf({"input_ids": ids}).logits.dtype == torch.bfloat16


@pytest.mark.slow
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_compiled_training_follows_the_eager_loss_curve(moe):
    """train.compile compiles the model in place: parameter names are unchanged (checkpoints, export) and the
    loss curve of a few AdamW steps matches eager to 1e-4 per step, the bar every speed-up must keep. MoE too:
    routing (top-k, per-expert gathers) compiles; router noise is off, since compiled code draws other numbers."""
    cfg = VectorSLMConfig(vocab_size=256, max_seq_len=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          moe=MoEConfig(num_experts=4, top_k=2, router_noise=0.0) if moe else None)
    data = torch.randint(0, 256, (4, 33), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": data[:, :-1], "labels": data[:, 1:]}
    curves = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = VectorSLM(cfg).train()
        names = [n for n, _ in model.named_parameters()]
        if compiled:
            model.compile()
            assert [n for n, _ in model.named_parameters()] == names
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = []
        for _ in range(4):
            loss = model(batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < curves[0][0]  # it trains at all
    assert max(abs(a - b) for a, b in zip(*curves)) < 1e-4, curves
