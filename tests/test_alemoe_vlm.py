"""AleMoEVLM: the model (cache, prefix, export, routing, metrics), its image-text data and generation."""
import pytest
import torch
import torch.nn.functional as F

from slmlab.generation import generate
from slmlab.models.alemoe_vlm import AleMoEVLM, AleMoEVLMConfig
from slmlab.models.base import IGNORE_INDEX
from slmlab.models.layers import MoEConfig

V = 97


def tiny(seed: int = 0, **kw) -> AleMoEVLM:
    torch.manual_seed(seed)
    cfg = AleMoEVLMConfig(**{"vocab_size": V, "max_seq_len": 48, "dim": 32, "n_layers": 2, "n_heads": 4,
                             "n_kv_heads": 2, "vit_dim": 32, "vit_layers": 2, "vit_heads": 2, "image_size": 16,
                             "patch_size": 4, "init_std": 0.1,
                             "moe": MoEConfig(num_experts=4, top_k=2, router_noise=1.0), **kw})
    return AleMoEVLM(cfg).eval()


def pixels(b: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# the model


def test_image_prefix_gives_text_logits_and_changes_them(one_thread):
    m = tiny()
    ids = torch.randint(1, V, (2, 10))
    with_img = m({"input_ids": ids, "pixel_values": pixels()}).logits
    text_only = m({"input_ids": ids}).logits
    assert with_img.shape == text_only.shape == (2, 10, V)  # image positions are never in the logits
    assert not torch.allclose(with_img, text_only)
    other = m({"input_ids": ids, "pixel_values": pixels(seed=2)}).logits
    assert not torch.allclose(with_img, other)


def test_loss_covers_text_labels_only(one_thread):
    m = tiny()
    ids = torch.randint(1, V, (2, 10))
    labels = ids.roll(-1, 1).masked_fill(torch.arange(10) < 6, IGNORE_INDEX)  # only the last 4 positions are answers
    out = m({"input_ids": ids, "labels": labels, "pixel_values": pixels()})
    ref = F.cross_entropy(out.logits.reshape(-1, V), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.lm_loss, ref)
    assert out.loss > out.lm_loss  # + load-balance and z losses


def test_generation_with_cache_equals_generation_without(one_thread):
    m = tiny()
    prompt, pix = torch.randint(1, V, (2, 5)), pixels()
    cached = generate(m, prompt, 12, temperature=0, extra={"pixel_values": pix})
    seq = prompt
    for _ in range(12):  # no cache: the whole sequence (image included) re-run every step
        nxt = m({"input_ids": seq, "pixel_values": pix}).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(cached, seq)
    # and the cached prefill + decode logits equal the full forward's, position by position
    cache = m.new_cache(2, 17)
    logits = [m({"input_ids": seq[:, :5], "pixel_values": pix}, cache=cache).logits]
    assert cache.prefix == m.n_image_tokens
    for t in range(5, 16):
        logits.append(m({"input_ids": seq[:, t:t + 1]}, cache=cache, start_pos=t).logits)
    full = m({"input_ids": seq[:, :16], "pixel_values": pix}).logits
    torch.testing.assert_close(torch.cat(logits, 1), full, atol=1e-5, rtol=1e-5)


def test_text_only_generation_uses_no_prefix(one_thread):
    m = tiny()
    prompt = torch.randint(1, V, (1, 4))
    out = generate(m, prompt, 6, temperature=0)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, m({"input_ids": seq}).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_text_decoder_exports_to_mixtral_with_logits_parity(one_thread, tmp_path):
    transformers = pytest.importorskip("transformers")
    from slmlab.hf_interop import export_hf

    m = tiny(tie_embeddings=False)
    export_hf(*m.text_decoder(), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(hf, transformers.MixtralForCausalLM)
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        delta = (m({"input_ids": ids}).logits - hf(ids).logits).abs().max().item()
    assert delta <= 1e-4, delta
    mine = generate(m, ids[:, :6], 10, temperature=0)
    theirs = hf.generate(ids[:, :6], max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(mine, theirs)


def test_routing_noise_only_in_training(one_thread):
    m = tiny()
    batch = {"input_ids": torch.randint(1, V, (2, 10)), "pixel_values": pixels()}
    m.eval()
    torch.testing.assert_close(m(batch).logits, m(batch).logits, atol=0, rtol=0)
    m.train()
    a, b = m(batch).logits, m(batch).logits
    assert not torch.allclose(a, b)  # router_noise=1.0 re-draws the routing every call
    m.eval()


def test_expert_shares_by_modality(one_thread):
    m = tiny()
    ids = torch.randint(1, V, (2, 10))
    ids[1, 7:] = m.cfg.pad_id  # padding is not text
    out = m({"input_ids": ids, "labels": ids, "pixel_values": pixels()})
    k, P = m.cfg.moe.top_k, m.n_image_tokens
    for i in range(m.cfg.n_layers):
        img = [out.eval_sums[f"moe/layer{i}/image_slots{e}"].item() for e in range(4)]
        txt = [out.eval_sums[f"moe/layer{i}/text_slots{e}"].item() for e in range(4)]
        assert sum(img) == 2 * P * k and sum(txt) == (20 - 3) * k
        shares = [out.metrics[f"moe/layer{i}/image_expert{e}_share"] for e in range(4)]
        assert sum(shares) == pytest.approx(1.0)
    figures = m.eval_metrics({key: float(v) for key, v in out.eval_sums.items()})
    assert sum(figures[f"moe/layer0/text_expert{e}_share"] for e in range(4)) == pytest.approx(1.0)


def test_image_gain_sums(one_thread):
    m = tiny()
    ids = torch.randint(1, V, (3, 10))
    labels = ids.roll(-1, 1)
    pix = pixels(3)
    out = m({"input_ids": ids, "labels": labels, "pixel_values": pix})
    s = {k: float(v) for k, v in out.eval_sums.items()}
    n = s["gain/targets"]
    assert n == 30
    assert s["gain/nats_true"] / n == pytest.approx(out.lm_loss.item(), rel=1e-5)
    blank = m({"input_ids": ids, "labels": labels, "pixel_values": torch.zeros_like(pix)}).lm_loss.item()
    other = m({"input_ids": ids, "labels": labels, "pixel_values": pix.roll(1, 0)}).lm_loss.item()
    figures = m.eval_metrics(s)
    assert figures["gain/loss_blank"] == pytest.approx(blank, rel=1e-5)
    assert figures["gain/loss_other"] == pytest.approx(other, rel=1e-5)
    assert figures["gain/true_over_blank"] == pytest.approx(out.lm_loss.item() / blank, rel=1e-5)
    m.train()
    assert "gain/nats_blank" not in m({"input_ids": ids, "labels": labels, "pixel_values": pix}).eval_sums


def test_text_only_config_ignores_images(one_thread):
    m = tiny(use_images=False)
    assert "pixel_values" not in m.capabilities.batch_fields
    ids = torch.randint(1, V, (2, 8))
    torch.testing.assert_close(m({"input_ids": ids, "pixel_values": pixels()}).logits, m({"input_ids": ids}).logits)
    assert "pixel_values" in tiny().capabilities.batch_fields


@pytest.mark.parametrize("bad, field", [({"image_size": 30, "patch_size": 4}, "patch_size"),
                                        ({"vit_dim": 48, "vit_heads": 8}, "vit_heads"),
                                        ({"image_size": 24, "patch_size": 4, "pixel_shuffle": 4}, "pixel_shuffle")])
def test_config_rejects_impossible_shapes(bad, field):
    with pytest.raises(ValueError, match=field):
        AleMoEVLMConfig(vocab_size=V, **bad)
