"""AleMoEVLM decode speed: with an image prefix vs the same decoder text-only vs transformers' Mixtral.

    python benchmarks/bench_alemoe_vlm.py [--model MODEL_DIR] [--threads N] [--new-tokens N]

Same process, same torch, same threads, one run, batch 1, greedy, KV-cached:
  * ours with an image: the image is encoded once in the prefill (ViT + projector), its tokens sit in
    the cache; then one token per step;
  * ours text-only: the same decoder, same prompt, no image;
  * ours text-only, batched dispatch: the same, each MoE layer sending its one token through the sort, gather
    and scatter that batch many tokens per expert (``one_token_path = False``): the direct one-token call
    against the dispatch it replaces (the aux figures, computed only when read, are skipped in both); the
    same tokens;
  * HF: the text decoder exported as ``MixtralForCausalLM`` (no custom code), ``generate`` on the same
    weights; the tokens must be identical to ours text-only.
Timed calls alternate between the candidates so background load hits all alike; the best of N is
reported, and ratios also by process CPU time, which other jobs on a shared machine do not distort.
Each figure is also given against the bandwidth roofline measured in the same run (``roofline.py``: every
weight read per token, active experts only, plus the KV history); a model that fits in the last-level cache
is bound by per-token overhead, not memory, and the benchmark says so.
Without --model the pipeline's architecture (pipelines/alemoe_vlm.yaml) is built with random weights:
speed does not depend on what the weights learned.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import roofline  # noqa: E402
from slmlab.generation import generate  # noqa: E402
from slmlab.hf_interop import export_hf  # noqa: E402
from slmlab.models.alemoe_vlm import AleMoEVLM, AleMoEVLMConfig  # noqa: E402
from slmlab.models.base import count_parameters  # noqa: E402
from slmlab.models.layers import MoEFeedForward  # noqa: E402


def timed(fn) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def alternate(fns: dict, n: int) -> dict[str, tuple[float, float]]:
    samples: dict[str, list] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            samples[k].append(timed(fn))
    return {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in samples.items()}


def pipeline_model() -> AleMoEVLM:
    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "pipelines" / "alemoe_vlm.yaml").read_text())
    cfg = AleMoEVLMConfig.model_validate({**raw["model"], "vocab_size": raw["tokenizer"]["vocab_size"]})
    torch.manual_seed(0)
    return AleMoEVLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained model folder (default: the pipeline's architecture, random weights)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model:
        from slmlab.train.checkpoint import load_model_dir

        _, model = load_model_dir(args.model)
    else:
        model = pipeline_model()
    model.eval()
    cfg = model.cfg
    n = args.new_tokens
    prompt_len = 16
    assert prompt_len + n <= cfg.max_seq_len, "prompt + new tokens must fit max_seq_len"

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(*model.text_decoder(), Path(tmp) / "hf")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()

    parts = {name: count_parameters(getattr(model, name)) for name in ("vit", "projector", "decoder")}
    total = count_parameters(model)
    moe = cfg.moe
    expert = 3 * cfg.dim * cfg.decoder_config.ffn_dim
    active = total - parts["vit"] - parts["projector"] - cfg.n_layers * (moe.num_experts - moe.top_k) * expert
    print(f"torch {torch.__version__}  threads {torch.get_num_threads()}  cpus {os.cpu_count()}  "
          f"load(1m) {os.getloadavg()[0]:.1f}")
    roof = roofline.measure("cpu", torch.float32)
    print("\n".join(roof.lines()[:2]))
    print(f"AleMoEVLM: {total / 1e6:.2f}M parameters (ViT {parts['vit'] / 1e6:.2f}M, projector "
          f"{parts['projector'] / 1e6:.2f}M, decoder {parts['decoder'] / 1e6:.2f}M; decoder active per token "
          f"{active / 1e6:.2f}M with top-{moe.top_k} of {moe.num_experts} experts), {cfg.n_image_tokens} image tokens")

    batched = copy.deepcopy(model)
    for m in batched.modules():
        if isinstance(m, MoEFeedForward):
            m.one_token_path = False
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, cfg.vocab_size, (1, prompt_len), generator=g)
    image = torch.rand(1, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    with torch.inference_mode():
        calls = {
            "ours + image": lambda: generate(model, prompt, n, temperature=0, extra={"pixel_values": image}),
            "ours text-only": lambda: generate(model, prompt, n, temperature=0),
            "ours batched MoE": lambda: generate(batched, prompt, n, temperature=0),
            "HF Mixtral": lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                              pad_token_id=0),
        }
        text_only = calls["ours text-only"]()
        same = torch.equal(text_only, calls["HF Mixtral"]()) and torch.equal(text_only, calls["ours batched MoE"]())
        calls["ours + image"]()  # warm-up
        best = alternate(calls, args.rounds)
    tps = {k: n / w for k, (w, _) in best.items()}
    cps = {k: n / c for k, (_, c) in best.items()}
    print(f"\nKV-cached greedy decode, batch 1, prompt {prompt_len} tokens, {n} new tokens incl. prefill, best of "
          f"{args.rounds} alternating runs (HF, ours text-only and ours batched MoE produce identical tokens: {same}):")
    # bytes one decode step reads: the decoder's weights with top-k of the experts (the ViT and projector run
    # once, in the prefill), and the KV history at the mean context (image tokens included when there is one)
    step_bytes = (active - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)) * 4
    kv_per_pos = 2 * cfg.n_layers * cfg.decoder_config.n_kv_heads * cfg.decoder_config.head_dim * 4
    for k in calls:
        ctx = prompt_len + n / 2 + (cfg.n_image_tokens if k == "ours + image" else 0)
        ceiling = roof.decode_tokens_per_s(step_bytes, kv_per_pos * ctx)
        where = f"{tps[k] / ceiling * 100:5.1f}% of the bandwidth roofline ({ceiling:,.0f} tokens/s)"
        read = step_bytes + kv_per_pos * ctx
        if roof.fits_in_cache(read):
            where += f"; {read / 1e6:.1f} MB per token fits in the last-level cache: bound by per-token overhead"
        print(f"  {k:16s} {tps[k]:8.1f} tokens/s  {1000 / tps[k]:6.2f} ms/token  ({cps[k]:.1f} tokens per CPU-second)  "
              f"{where}")
    print(f"  image prefix / text-only: {tps['ours + image'] / tps['ours text-only']:.2f}x wall-clock, "
          f"{cps['ours + image'] / cps['ours text-only']:.2f}x by CPU time")
    print(f"  one-token MoE path / batched dispatch (text-only): "
          f"{tps['ours text-only'] / tps['ours batched MoE']:.2f}x wall-clock")
    print(f"  ours text-only / HF Mixtral generate: {tps['ours text-only'] / tps['HF Mixtral']:.2f}x wall-clock, "
          f"{cps['ours text-only'] / cps['HF Mixtral']:.2f}x by CPU time")


if __name__ == "__main__":
    main()
