"""MoEFeedForward: routing semantics, aux losses, capacity, dtype, metrics through the model."""
import pytest
import torch
import torch.nn.functional as F

from slmlab.models.layers import MoEConfig, MoEFeedForward
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig

DIM, HIDDEN = 32, 48


def layer(**kw) -> MoEFeedForward:
    torch.manual_seed(0)
    return MoEFeedForward(DIM, HIDDEN, MoEConfig(**{"num_experts": 4, "top_k": 2, **kw}))


def reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Token-by-token Mixtral semantics: softmax, top-k, renormalise, weighted SwiGLU experts."""
    out = torch.zeros_like(x)
    for n, tok in enumerate(x):
        probs = (moe.router.weight @ tok).softmax(-1)
        w, e = probs.topk(moe.cfg.top_k)
        for wi, ei in zip(w / w.sum(), e):
            gate, up = (moe.w_gate_up[ei] @ tok).chunk(2)
            out[n] += wi * (moe.w_down[ei] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_matches_token_by_token_reference(top_k):
    moe = layer(top_k=top_k).eval()
    x = torch.randn(2, 9, DIM)
    y, aux = moe(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, DIM), reference(moe, x.reshape(-1, DIM)), atol=1e-5, rtol=1e-5)
    assert aux.dropped_frac.item() == 0.0


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_one_token_takes_its_experts_directly_with_the_batched_paths_bits(top_k):
    """Batch-1 decoding sends one token: its experts are called directly (no sort, gather, scatter). Its
    output and every aux figure equal what the batched path gives for that token, bit for bit."""
    moe = layer(top_k=top_k).eval()
    batched = layer(top_k=top_k).eval()
    batched.one_token_path = False
    calls, direct = [], moe._one_token
    moe._one_token = lambda *a: calls.append(1) or direct(*a)
    for t in torch.randn(8, 1, 1, DIM, generator=torch.Generator().manual_seed(4)):
        (y, aux), (y_ref, aux_ref) = moe(t), batched(t)
        assert torch.equal(y, y_ref)
        torch.testing.assert_close(y.reshape(1, DIM), reference(moe, t.reshape(1, DIM)), atol=1e-5, rtol=1e-5)
        for name in ("load_balance", "z_loss", "expert_frac", "dropped_frac", "router_logits"):
            assert torch.equal(getattr(aux, name), getattr(aux_ref, name)), name
    assert len(calls) == 8  # every one-token call took the direct path


def test_load_balance_loss_is_minimal_for_uniform_routing():
    moe = layer()
    x = torch.randn(64, DIM)
    with torch.no_grad():
        moe.router.weight.zero_()  # every expert equally likely for every token
    _, aux = moe(x)
    assert aux.load_balance.item() == pytest.approx(1.0, abs=1e-6)
    assert aux.z_loss.item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2, rel=1e-6)
    with torch.no_grad():  # skew: expert 0 favoured by every token
        moe.router.weight[0] = x.mean(0) * 5
    _, skew = moe(x)
    assert skew.load_balance.item() > 1.2
    assert skew.expert_frac[0] > 0.25


def test_aux_losses_have_router_gradients():
    moe = layer()
    _, aux = moe(torch.randn(16, DIM))
    aux.weighted_loss(moe.cfg).backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0


def test_capacity_drops_only_in_training():
    moe = layer(capacity_factor=0.5)  # capacity = 0.5 * 32 * 2 / 4 = 8 slots per expert, 64 slots routed
    x = torch.randn(32, DIM)
    moe.train()
    y_train, aux_train = moe(x)
    assert aux_train.dropped_frac.item() >= 0.5 - 1e-6  # at most 4*8 of 64 slots survive
    moe.eval()
    y_eval, aux_eval = moe(x)
    assert aux_eval.dropped_frac.item() == 0.0
    torch.testing.assert_close(y_eval, reference(moe, x), atol=1e-5, rtol=1e-5)  # eval = dropless Mixtral
    assert not torch.allclose(y_train, y_eval)
    # with no capacity limit training mode routes exactly like eval
    dropless = layer(capacity_factor=None).train()
    y_dropless, aux_dropless = dropless(x)
    assert aux_dropless.dropped_frac.item() == 0.0
    torch.testing.assert_close(y_dropless, y_eval, atol=1e-6, rtol=1e-6)


def test_capacity_keeps_at_most_capacity_per_expert():
    moe = layer(capacity_factor=1.0, num_experts=4, top_k=1).train()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 prefers expert 0
    x = torch.randn(40, DIM).abs()
    _, aux = moe(x)
    assert aux.expert_frac[0].item() == 1.0  # routed (pre-drop) share
    assert aux.dropped_frac.item() == pytest.approx(1 - 10 / 40)  # capacity 1.0 * 40 / 4 = 10 kept


def test_router_runs_in_fp32_under_bf16_autocast():
    moe = layer()
    x = torch.randn(2, 8, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert aux.router_logits.dtype == torch.float32
    assert y.dtype == x.dtype  # expert matmuls ran in bf16, the weighted sum is accumulated in fp32 like HF
    torch.testing.assert_close(aux.router_logits, x.reshape(-1, DIM) @ moe.router.weight.T, atol=1e-5, rtol=1e-5)
    bf = layer().to(torch.bfloat16)
    _, aux_bf = bf(x.to(torch.bfloat16))
    assert aux_bf.router_logits.dtype == torch.float32


def test_router_noise_only_in_training():
    moe = layer(router_noise=1.0)
    x = torch.randn(64, DIM)
    moe.eval()
    a, _ = moe(x)
    b, _ = moe(x)
    torch.testing.assert_close(a, b)
    moe.train()
    torch.manual_seed(1)
    c, _ = moe(x)
    assert not torch.allclose(a, c)


def test_model_loss_and_metrics():
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, load_balance_weight=0.1, z_loss_weight=0.01)
    cfg = VectorSLMConfig(vocab_size=50, max_seq_len=32, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, moe=moe)
    model = VectorSLM(cfg)
    ids = torch.randint(0, 50, (2, 12))
    out = model({"input_ids": ids, "labels": ids})
    m = out.metrics
    for i in range(3):
        fracs = [m[f"moe/layer{i}/expert{e}_frac"] for e in range(4)]
        assert sum(fracs) == pytest.approx(1.0, abs=1e-6)
        assert f"moe/layer{i}/load_balance" in m and f"moe/layer{i}/z_loss" in m
        assert m[f"moe/layer{i}/dropped_frac"] == 0.0
    assert all(isinstance(v, float) for v in m.values())
    lb = sum(m[f"moe/layer{i}/load_balance"] for i in range(3)) / 3
    z = sum(m[f"moe/layer{i}/z_loss"] for i in range(3)) / 3
    assert m["moe/load_balance"] == pytest.approx(lb, rel=1e-5)
    assert out.loss.item() == pytest.approx(out.lm_loss.item() + 0.1 * lb + 0.01 * z, rel=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
