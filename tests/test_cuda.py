"""The CUDA path of every generative family: skipped where there is no GPU (CI), run on a GPU machine with
``python -m pytest --noconftest tests/test_cuda.py`` (no Ray needed). Models only: training in bf16 autocast as
the loop does on GPU, and KV-cached greedy decoding equal to re-running the whole sequence."""

from __future__ import annotations

import pytest
import torch

from slmlab.generation import generate
from slmlab.models.alemoe_vlm import AleMoEVLM, AleMoEVLMConfig
from slmlab.models.layers import MoEConfig
from slmlab.models.new_llm import NewLLM, NewLLMConfig
from slmlab.models.vectorslm import VectorSLM, VectorSLMConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
V = 211


def build(family: str) -> tuple[torch.nn.Module, dict]:
    """A small model of ``family`` on the GPU (fp32 weights) and the extra batch fields it reads."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, router_noise=0.5)
    if family == "vectorslm":
        model, extra = VectorSLM(VectorSLMConfig(vocab_size=V, max_seq_len=64, dim=64, n_layers=2, n_heads=4,
                                                 n_kv_heads=2)), {}
    elif family == "vectorslm_moe":
        model, extra = VectorSLM(VectorSLMConfig(vocab_size=V, max_seq_len=64, dim=64, n_layers=2, n_heads=4,
                                                 n_kv_heads=2, moe=moe)), {}
    elif family == "new_llm":
        model, extra = NewLLM(NewLLMConfig(vocab_size=V, max_seq_len=64, dim=64, context_dim=64, n_layers=2,
                                           ffn_hidden=128)), {}
    else:
        model = AleMoEVLM(AleMoEVLMConfig(vocab_size=V, max_seq_len=48, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                          vit_dim=32, vit_layers=2, vit_heads=2, image_size=16, patch_size=4,
                                          moe=moe))
        extra = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)).cuda()}
    return model.cuda(), extra


FAMILIES = ["vectorslm", "vectorslm_moe", "new_llm", "alemoe_vlm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_bf16_autocast_training_step_matches_fp32_and_learns(family):
    model, extra = build(family)
    model.train()
    ids = torch.randint(0, V, (2, 33), generator=torch.Generator().manual_seed(2)).cuda()
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], **extra}
    torch.manual_seed(3)  # the router's training noise: the same draws in both passes
    fp32 = model(batch).loss.item()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        torch.manual_seed(3)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch).loss
        losses.append(loss.item())
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert abs(losses[0] - fp32) < 0.02 * fp32  # bf16 rounding, not a different computation
    assert losses[-1] < losses[0] - 0.1  # eight steps on one batch: it fits


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_decoding_equals_rerunning_the_sequence(family):
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32: ties must break the same way both ways
    model, extra = build(family)
    model.eval()
    prompt = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(4)).cuda()
    with torch.no_grad():
        cached = generate(model, prompt, 10, temperature=0, extra=extra or None)
        seq = prompt
        for _ in range(10):
            nxt = model({"input_ids": seq, **extra}).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert cached.device.type == "cuda"
    assert torch.equal(cached, seq)


def test_single_token_decode_never_takes_cudnn_attention():
    """cuDNN attention builds a plan per new key length, i.e. every decode step (~6 ms of CPU per layer on an
    H200); decode must take another SDPA kernel, and still give the full forward's logits."""
    from torch.profiler import ProfilerActivity, profile

    model, _ = build("vectorslm")
    model = model.to(torch.bfloat16).eval()
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        cache = model.new_cache(1, 48, dtype=torch.bfloat16)
        model({"input_ids": ids[:, :32]}, cache=cache)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            steps = [model({"input_ids": ids[:, t:t + 1]}, cache=cache, start_pos=t).logits for t in range(32, 40)]
        full = model({"input_ids": ids}).logits[:, 32:]
    ops = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops and not any("cudnn_attention" in op for op in ops)
    gap = (torch.cat(steps, 1).float() - full.float()).abs().max()
    assert gap < 0.05 * full.float().abs().max()  # bf16 rounding apart, the same logits


def test_compiled_decode_step_is_one_cuda_graph_replay_with_the_eager_tokens():
    """generate(compile_step=True) on CUDA: the fixed-shape step is compiled once and captured as a CUDA graph;
    each token is one graph replay. Greedy tokens equal eager decoding (fp32, TF32 off), a second call of
    another length in the same bucket replays the same graph, and ragged prompts equal eager ragged ones."""
    from torch.profiler import ProfilerActivity, profile

    from slmlab.generation import FixedShapeDecoder, generate_ragged

    torch.backends.cuda.matmul.allow_tf32 = False
    model, _ = build("vectorslm")
    model.eval()
    prompt = torch.randint(1, V, (2, 6), generator=torch.Generator().manual_seed(6)).cuda()
    assert torch.equal(generate(model, prompt, 12, temperature=0, compile_step=True),
                       generate(model, prompt, 12, temperature=0))
    decoder = FixedShapeDecoder.of(model)
    graph = decoder._graph["graph"]
    longer = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(7)).cuda()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        compiled = generate(model, longer, 16, temperature=0, compile_step=True)
    assert torch.equal(compiled, generate(model, longer, 16, temperature=0))
    assert decoder._graph["graph"] is graph  # replayed, not captured again
    launches = sum(e.count for e in prof.key_averages() if e.key == "cudaGraphLaunch")
    assert launches == 15  # one per decode step (the prefill runs eagerly)
    prompts = [[3, 4, 5, 6, 7], [9, 10], [11, 12, 13]]
    assert generate_ragged(model, prompts, max_new_tokens=8, temperature=0, compile_step=True) == \
        generate_ragged(model, prompts, max_new_tokens=8, temperature=0)
    with torch.no_grad():  # weights moved to new memory (new values too): the old graph would read freed memory
        for p in model.parameters():
            p.data = p.data * 1.5
    assert torch.equal(generate(model, prompt, 12, temperature=0, compile_step=True),
                       generate(model, prompt, 12, temperature=0))
    assert decoder._graph["graph"] is not graph
