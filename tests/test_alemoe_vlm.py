"""AleMoEVLM: the model (cache, prefix, export, routing, metrics), its image-text data and generation."""
import json
import re

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


def test_patch_init_std_sets_only_the_patch_embedding():
    default, lecun = tiny(), tiny(patch_init_std=0.5)
    assert default.vit.patch.weight.std().item() == pytest.approx(0.1, rel=0.2)  # init_std, as before
    assert lecun.vit.patch.weight.std().item() == pytest.approx(0.5, rel=0.2)
    torch.testing.assert_close(lecun.vit.blocks[0].attn.wqkv.weight, default.vit.blocks[0].attn.wqkv.weight)
    with pytest.raises(ValueError, match="patch_init_std"):
        AleMoEVLMConfig(vocab_size=V, patch_init_std=0.0)


@pytest.mark.parametrize("bad, field", [({"image_size": 30, "patch_size": 4}, "patch_size"),
                                        ({"vit_dim": 48, "vit_heads": 8}, "vit_heads"),
                                        ({"image_size": 24, "patch_size": 4, "pixel_shuffle": 4}, "pixel_shuffle")])
def test_config_rejects_impossible_shapes(bad, field):
    with pytest.raises(ValueError, match=field):
        AleMoEVLMConfig(vocab_size=V, **bad)


# ---------------------------------------------------------------------------------------------
# image-text data


def test_scenes_are_deterministic_and_answers_match_the_pixels():
    import io
    import random

    import numpy as np
    from PIL import Image

    from slmlab.data.images import COLOURS, SCENE_SIZE, draw_scene, scene_questions, shape_records

    a, b = shape_records(3, 4, 2), shape_records(3, 4, 2)
    assert [r["image"] for r in a] == [r["image"] for r in b] and [r["qa"] for r in a] == [r["qa"] for r in b]
    assert shape_records(4, 4, 2)[0]["image"] != a[0]["image"]
    held_out = {r["image_id"] for r in a if r["split"] == "val"}
    assert held_out and held_out.isdisjoint({r["image_id"] for r in a if r["split"] == "train"})
    img, objects = draw_scene(random.Random(0))
    qs = scene_questions(objects)
    assert 30 <= sum(len(v) for v in qs.values()) <= 40 and len(qs["shape"]) == 6
    # independent of the generator's bookkeeping: each colour's pixel centroid decides left/right and top/bottom
    rgb = np.asarray(Image.open(io.BytesIO(shape_records(0, 1, 1)[0]["image"])).convert("RGB")).astype(int)
    qa = {q: ans for q, ans, _ in shape_records(0, 1, 1)[0]["qa"]}
    for name, colour in COLOURS.items():
        ys, xs = np.nonzero((np.abs(rgb - np.array(colour)).sum(-1)) < 10)
        assert len(xs) > 20, name
        half = SCENE_SIZE / 2
        assert qa[f"is the {name} object on the left or the right?"] == ("left" if xs.mean() < half else "right")
        assert qa[f"is the {name} object at the top or the bottom?"] == ("top" if ys.mean() < half else "bottom")
    # grounded answers name the object first; the same scene, the same answers after the name
    grounded = shape_records(0, 1, 1, grounded=True)[0]["qa"]
    assert [q for q, _, _ in grounded] == list(qa)
    for q, a, t in grounded:
        named = re.search(r"the (\w+) object", q).group(1)  # "red", or "leftmost" for the colour questions
        assert a == f"{named} {qa[q]}", (q, a)

    # caption_extremes: the caption also names what the colour questions ask, from the same scene; off by default
    plain, extended = shape_records(0, 20, 1)[:20], shape_records(0, 20, 1, grounded=True, extremes=True)[:20]
    for p, e in zip(plain, extended):
        colours = [a for _, a, t in e["qa"] if t == "colour"]  # grounded: "leftmost grey"
        assert e["image"] == p["image"] and e["caption"] == p["caption"][:-1] + "".join(f"; {', '.join(colours)}"
                                                                                       for _ in colours[:1]) + "."
    assert any(r["caption"].count(",") == 3 for r in extended)  # most scenes name all four


def test_digits_are_the_real_sklearn_images_held_out_by_image():
    from sklearn.datasets import load_digits

    from slmlab.data.images import digit_records, load_image

    recs = digit_records(0)
    assert len(recs) == 1797
    val = [r for r in recs if r["split"] == "val"]
    assert 300 < len(val) < 420
    assert len({r["image_id"] for r in recs}) == 1797
    d = load_digits()
    i = int(val[0]["image_id"].split("/")[1])
    assert val[0]["qa"][0][1] == str(d.target[i])
    pix = load_image(val[0]["image"], 8, channels=1)  # back at native size: the sklearn pixels, rescaled
    assert abs(((pix[0] + 1) * 127.5 * 16 / 255) - d.images[i]).max() < 0.1


def test_question_types_keep_only_those_turns_in_training_and_eval(tmp_path):
    from pydantic import ValidationError

    from slmlab.data.images import ImageSourceConfig, _read_records

    everything, _ = _read_records(ImageSourceConfig(kind="shapes", n_train=6, n_val=2), 0, seed=0, val_fraction=0.2)
    src = ImageSourceConfig(kind="shapes", n_train=6, n_val=2, question_types=["up_down", "shape"])
    only, _ = _read_records(src, 0, seed=0, val_fraction=0.2)
    assert [r["image"] for r in only] == [r["image"] for r in everything]  # same images, fewer questions
    for full, cut in zip(everything, only):
        assert cut["qa"] == [t for t in full["qa"] if t[2] in ("up_down", "shape")] and len(cut["qa"]) == 12
        assert cut["caption"] == full["caption"]
    # records on disk keep their own types
    (tmp_path / "a.jsonl").write_text(json.dumps({"image": "x.png", "question": "q?", "answer": "a", "qtype": "mine"})
                                      + "\n" + json.dumps({"image": "y.png", "question": "r?", "answer": "b"}) + "\n")
    recs, _ = _read_records(ImageSourceConfig(kind="jsonl", path=str(tmp_path / "a.jsonl"), question_types=["mine"]),
                            0, seed=0, val_fraction=0.2)
    assert [r["qa"] for r in recs] == [[("q?", "a", "mine")], []]
    with pytest.raises(ValidationError, match=r"question_types: \['colours'\] are not shapes question types"):
        ImageSourceConfig(kind="shapes", question_types=["shape", "colours"])


def test_question_weights_tilt_the_training_draw_and_nothing_else():
    import random

    from pydantic import ValidationError

    from slmlab.data.images import ImageSourceConfig, _read_records, _rows_of

    recs, _ = _read_records(ImageSourceConfig(kind="shapes", n_train=40, n_val=2), 0, seed=0, val_fraction=0.2)
    qa = [(f"{q} #{i}", a, t) for i, (q, a, t) in enumerate(turn for r in recs for turn in r["qa"])]  # distinct
    types = {q: t for q, _, t in qa}

    def share(weights, n=400):
        rows = _rows_of(qa, None, "qa", random.Random(0), copies=n, per_copy=8, weights=weights)
        drawn = [types[q] for turns in rows for q, _ in turns]
        assert all(len(turns) == 8 and len({q for q, _ in turns}) == 8 for turns in rows)  # no repeats in a copy
        return drawn.count("colour") / len(drawn)

    base = sum(t == "colour" for _, _, t in qa) / len(qa)
    assert abs(share({}) - base) < 0.03  # uniform: each type at its share of the questions
    assert share({"colour": 5.0}) > 2.5 * base
    # no weights: exactly the draw of before the field existed (earlier pipelines train on the same rows)
    rng = random.Random(3)
    assert _rows_of(qa, None, "qa", random.Random(3), 1, 8) == [[(q, a) for q, a, _ in rng.sample(qa, 8)]]
    with pytest.raises(ValidationError, match=r"question_weights: \['colours'\] are not shapes question types"):
        ImageSourceConfig(kind="shapes", question_weights={"colours": 2.0})
    with pytest.raises(ValidationError):
        ImageSourceConfig(kind="shapes", question_weights={"colour": 0.0})


def test_llava_conversations_and_qa_records_normalise():
    from slmlab.data.images import _turns_of

    qa, caption, why = _turns_of({"conversations": [
        {"from": "human", "value": "<image>\nwhat shape is it?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "which colour?"}, {"from": "gpt", "value": "red"}], "qtypes": ["shape", "colour"]})
    assert why is None and caption is None
    assert qa == [("what shape is it?", "circle", "shape"), ("which colour?", "red", "colour")]
    assert _turns_of({"question": "q?", "answer": "a"})[0] == [("q?", "a", "qa")]
    assert _turns_of({"caption": "a cat."})[1] == "a cat."
    assert "expected" in _turns_of({"image": "x.png"})[2]
    assert "expected" in _turns_of({"question": 3, "answer": "a"})[2]


@pytest.fixture(scope="module")
def vlm_tokenizer(tmp_path_factory):
    from slmlab.data.images import digit_records, shape_records
    from slmlab.data.tokenizer import train_bpe

    recs = shape_records(0, 30, 5) + digit_records(0, max_images=50)
    texts = [r["caption"] for r in recs] + [f"{q} {a}" for r in recs for q, a, _ in r["qa"]]
    return train_bpe(texts, 300, 2, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def test_rows_put_the_loss_on_answers_only(vlm_tokenizer, tmp_path):
    import numpy as np

    from slmlab.data.images import EncodeAndWrite, ImageDataConfig
    from slmlab.data.tokenizer import load_tokenizer

    cfg = ImageDataConfig(sources=[{"kind": "shapes"}], seq_len=40, turns_per_row=8, image_size=32, channels=3)
    enc = EncodeAndWrite(str(tmp_path), str(vlm_tokenizer), cfg.model_dump())
    enc.truncated = 0
    turns = [("what shape is the red object?", "circle"), ("is the red object on the left or the right?", "left"),
             ("what colour is the leftmost object?", "grey"),
             ("how many objects have the shape of the red object?", "3")]
    rows = list(enc._rows(turns))
    assert len(rows) > 1 and sum(len(used) for _, _, used in rows) == 4  # whole turns only, none lost
    tok = load_tokenizer(vlm_tokenizer)
    answers = []
    for ids, mask, used in rows:
        assert ids.shape == mask.shape == (41,) and mask[0] == 0
        answers.append(tok.decode(ids[mask == 1].tolist(), skip_special_tokens=False))
    assert answers == ["".join(f" {a}<|end|>" for _, a in used) for _, _, used in rows]  # after a space
    long = list(enc._rows([("why? " * 40, "because")]))
    assert len(long) == 1 and enc.truncated == 1 and np.count_nonzero(long[0][1]) == 0  # cut before its answer


def test_a_source_task_adds_captions_to_that_source_only(vlm_tokenizer, tmp_path):
    import numpy as np
    import pyarrow.parquet as pq

    from slmlab.data.images import (
        CAPTION_PROMPT,
        EncodeAndWrite,
        ImageDataConfig,
        digit_records,
        read_eval,
        shape_records,
    )
    from slmlab.data.tokenizer import load_tokenizer

    digit = next(r for r in digit_records(0, max_images=50) if r["split"] == "train")
    scene = shape_records(0, 1, 1)  # one training scene, one held-out
    scenes = {"kind": "shapes", "task": "both", "questions_per_image": 2}
    cfg = ImageDataConfig(task="qa", seq_len=160, sources=[{"kind": "digits"}, scenes], image_size=32, channels=3)
    records = [(digit, 0), (scene[0], 1), (scene[1], 1)]  # (record, its source)
    batch = {"row": np.arange(3), "seed": np.zeros(3, int), "image_id": np.array([r["image_id"] for r, _ in records]),
             "split": np.array([r["split"] for r, _ in records]), "image_bytes": [r["image"] for r, _ in records],
             "image_path": np.array(["", "", ""]), "caption": np.array([r["caption"] or "" for r, _ in records]),
             "qa": np.array([json.dumps(r["qa"]) for r, _ in records]), "source": np.array([i for _, i in records])}
    EncodeAndWrite(str(tmp_path), str(vlm_tokenizer), cfg.model_dump(mode="json"))(batch)
    tok = load_tokenizer(vlm_tokenizer)
    table = pq.read_table(str(tmp_path / "train")).to_pydict()
    texts = [tok.decode([int(i) for i in ids], skip_special_tokens=False) for ids in table["input_ids"]]
    scene_text, digit_text = "".join(t for t in texts if "digit" not in t), [t for t in texts if "digit" in t]
    assert CAPTION_PROMPT in scene_text and scene[0]["caption"] in scene_text  # the scene: caption + 2 questions
    assert scene_text.count("?") == 2
    assert digit_text and CAPTION_PROMPT not in "".join(digit_text)  # the digit: its question, no caption
    held_out = read_eval(tmp_path)
    assert "caption" in held_out["qtype"] and set(held_out["image_id"]) == {scene[1]["image_id"]}


def _bad_image_folder(root):
    import io
    import json

    import numpy as np
    from PIL import Image

    root.mkdir()
    good = [f"good{i}.png" for i in range(6)]
    for i, name in enumerate(good):
        Image.fromarray(np.full((10, 10, 3), 20 * i, np.uint8)).save(root / name)
    (root / "corrupt.png").write_bytes(b"this is not an image")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    meta = [{"file_name": n, "question": "what is the brightness?", "answer": str(i), "qtype": "bright",
             "split": "val" if i == 0 else "train"} for i, n in enumerate(good)]
    meta += [{"file_name": "corrupt.png", "caption": "broken."}, {"file_name": "truncated.png", "caption": "cut."},
             {"file_name": "missing.png", "caption": "gone."}, {"file_name": "good1.png"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n{not json\n")
    return root


@pytest.mark.timeout(1200)
def test_build_reports_bad_images_by_name_and_goes_on(ray_local, vlm_tokenizer, tmp_path):
    import numpy as np

    from slmlab.data.images import ImageDataConfig, build_image_shards, read_eval
    from slmlab.data.shards import summary_for_mlflow
    from slmlab.evaluate import read_blocks

    folder = _bad_image_folder(tmp_path / "imgs")
    cfg = ImageDataConfig(sources=[{"kind": "folder", "path": str(folder)},
                                   {"kind": "shapes", "n_train": 6, "n_val": 2}], image_size=16, channels=3,
                          seq_len=48, task="both")
    lines: list[str] = []
    shards = build_image_shards(cfg, tmp_path / "runs", vlm_tokenizer, seed=0, progress=lines.append)
    s = shards.summary
    bad = s["bad_records"]
    assert bad["images"] == 3 and bad["records"] == 2  # corrupt, truncated, missing; no text, invalid JSON
    text = " ".join(bad["examples"])
    for name in ("corrupt.png", "truncated.png", "missing.png", "metadata.jsonl:10", "metadata.jsonl:11"):
        assert name in text, name
    assert any("corrupt.png" in ln for ln in lines)  # reported to the user, not only in the file
    assert s["train"]["documents"] == 5 + 6 and s["val"]["documents"] == 1 + 2
    rows = next(read_blocks(shards.train_dir, 10**6))
    assert rows["pixel_values"].shape[1:] == (3, 16, 16) and rows["pixel_values"].dtype == np.float32
    assert -1.0 <= rows["pixel_values"].min() and rows["pixel_values"].max() <= 1.0
    assert rows["input_ids"].shape[1] == 49 and rows["target_mask"].sum() > 0
    ev = read_eval(shards.root)
    assert {"bright", "caption", "shape", "closest"} <= set(ev["qtype"])
    assert all("good0" in i or "/val/" in i for i in ev["image_id"])  # held-out images only
    assert summary_for_mlflow(shards)["data/bad_records"] == 5  # the generic run logging reads it
    again = build_image_shards(cfg, tmp_path / "runs", vlm_tokenizer, seed=0, progress=lines.append)
    assert again.root == shards.root and "reusing" in lines[-1]


# ---------------------------------------------------------------------------------------------
# generation from the command line


@pytest.fixture
def vlm_model_dir(tmp_path, vlm_tokenizer):
    import shutil

    from slmlab.data.tokenizer import load_tokenizer
    from slmlab.train.checkpoint import write_model

    torch.manual_seed(0)
    cfg = AleMoEVLMConfig(vocab_size=load_tokenizer(vlm_tokenizer).get_vocab_size(), max_seq_len=48, dim=32,
                          n_layers=2, n_heads=4, n_kv_heads=2, vit_dim=32, vit_layers=1, vit_heads=2, image_size=16)
    folder = tmp_path / "model"
    write_model(AleMoEVLM(cfg), cfg, folder)
    shutil.copy(vlm_tokenizer, folder / "tokenizer.json")
    return folder


def test_eval_budgets_are_per_question_and_capped_at_the_model(vlm_tokenizer, one_thread):
    """A caption gets a caption's budget, a one-word answer a short one; a budget past max_seq_len is capped."""
    from slmlab.data.tokenizer import load_tokenizer
    from slmlab.stages.vlm import answer_questions

    tok = load_tokenizer(vlm_tokenizer)
    model = tiny(0, vocab_size=tok.get_vocab_size())  # max_seq_len 48; its greedy decode never stops early
    pix = pixels(1).numpy().repeat(3, axis=0)  # one image: the three answers are one greedy decode, cut
    short, long_, capped = answer_questions(model, tok, ["describe the image."] * 3, pix, [2, 30, 10_000])
    assert 0 < len(short) < len(long_) <= len(capped) and long_.startswith(short) and capped.startswith(long_)
    assert answer_questions(model, tok, ["describe the image."], pix[:1], 2) == [short]  # one budget for all


def test_generate_image_streams_and_bad_images_are_one_line(vlm_model_dir, tmp_path):
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from slmlab.cli import app

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "digit.png")
    run = CliRunner().invoke(app, ["generate", str(vlm_model_dir), "--image", str(tmp_path / "digit.png"),
                                   "--prompt", "which digit is this?", "-t", "0", "-n", "4"],
                             env={"SLMLAB_VERBOSE": None})
    assert run.exit_code == 0, run.output
    for bad, why in ((tmp_path / "missing.png", "FileNotFoundError"),
                     (tmp_path / "broken.png", "UnidentifiedImageError")):
        if bad.name == "broken.png":
            bad.write_bytes(b"\x89PNG not really")
        run = CliRunner().invoke(app, ["generate", str(vlm_model_dir), "--image", str(bad), "--prompt", "q"],
                                 env={"SLMLAB_VERBOSE": None})
        assert run.exit_code == 2
        lines = [ln for ln in run.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(bad) in lines[0] and why in lines[0], run.output


# ---------------------------------------------------------------------------------------------
# the pipeline, end to end (real Ray Data, Ray Train + DeepSpeed, MLflow)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pipeline_trains_registers_and_evaluates(ray_local, tmp_path):
    import mlflow

    from slmlab.config import validate_pipeline
    from slmlab.pipeline import run_stages
    from slmlab.report import write_report

    digits = {"kind": "digits", "max_images": 60}
    shapes = {"kind": "shapes", "n_train": 40, "n_val": 10}
    raw = {
        "name": "vlm-tiny", "seed": 3, "run_dir": str(tmp_path / "runs"),
        "data": {"sources": [{"kind": "embedded", "max_documents": 40}], "seq_len": 32},
        "tokenizer": {"vocab_size": 400},
        "model": {"family": "alemoe_vlm", "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
                  "vit_dim": 32, "vit_layers": 1, "vit_heads": 2, "image_size": 16,
                  "moe": {"num_experts": 4, "top_k": 2, "router_noise": 0.5}},
        "train": {"micro_batch_size": 8, "max_steps": 3, "warmup_steps": 1, "eval_every": 3, "eval_batches": 2,
                  "checkpoint_every": 3, "lr": 0.01, "torch_threads": 1, "cpus_per_worker": 0.5},
        "eval": {"prompts": []},
        "stages": [
            {"kind": "vlm_train", "name": "captions", "data": {"task": "caption", "image_size": 16, "seq_len": 48,
                                                               "sources": [digits, shapes]}},
            {"kind": "vlm_train", "name": "qa", "init_from": "captions", "register_as": "vlm-tiny",
             # the scenes keep their captions beside their questions (a source's own task); the digits do not
             # no image_size here: the stage takes the model's (16)
             "data": {"task": "qa", "seq_len": 48, "sources": [{**digits, "repeat": 2, "shift": 1},
                                                               {**shapes, "task": "both"}]},
             # lr_scale: the ViT blocks at a tenth of the lr, through DeepSpeed's engine and the LR scheduler
             "train": {"max_steps": 4, "trainable": ["vit.", "projector.", "decoder."],
                       "lr_scale": {"vit.blocks": 0.1}}},
            {"kind": "vlm_eval", "of": "qa"},
        ],
    }
    results = run_stages(validate_pipeline(raw, "vlm-tiny.yaml"), progress=lambda m: None)
    qa = results["qa"].runs["qa"]
    assert qa.status == "FINISHED" and qa.model_uri == "models:/vlm-tiny/1"
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    m = client.get_run(qa.mlflow_run_id).data.metrics
    for key in ("eval/acc/digit", "eval/acc/shape", "eval/acc/caption", "eval/acc/attribute", "eval/acc/relational",
                "eval/gain/loss_true",
                "eval/gain/loss_blank", "eval/gain/loss_other", "eval/gain/true_over_blank",
                "eval/moe/layer1/image_expert3_share", "eval/moe/layer0/text_expert0_share",
                "val/gain/true_over_blank", "val/moe/layer0/image_expert0_share",
                "train/moe/layer1/image_expert2_share"):
        assert key in m, key
    assert sum(m[f"eval/moe/layer0/image_expert{e}_share"] for e in range(4)) == pytest.approx(1.0)
    arts = {a.path for a in client.list_artifacts(qa.mlflow_run_id, "report")}
    assert arts == {"report/accuracy_by_question_type.png", "report/expert_share_by_modality.png"}
    page = write_report("vlm-tiny", tmp_path / "report.html", tmp_path / "runs").read_text()
    assert "accuracy by question type" in page and "eval/acc/digit" in page
    # the pipeline's tokenizer also trained on the distinct text lines of both stages' training images
    from slmlab.data.images import ImageDataConfig, tokenizer_texts

    [data_dir] = [p for p in (tmp_path / "runs" / "cache" / "data").iterdir() if (p / "_SUCCESS").exists()]
    summary = json.loads((data_dir / "summary.json").read_text())
    want = tokenizer_texts([ImageDataConfig.model_validate(st["data"]) for st in raw["stages"][:2]], seed=3)
    assert summary["tokenizer"]["image_text_lines"] == len(want) > 0


def test_export_command_writes_the_text_decoder_as_mixtral(vlm_model_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from slmlab.cli import app

    run = CliRunner().invoke(app, ["export", str(vlm_model_dir), str(tmp_path / "hf")], env={"SLMLAB_VERBOSE": None})
    assert run.exit_code == 0, run.output
    assert "MixtralForCausalLM" in run.output
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]


def test_tokenizer_texts_are_the_training_images_lines_only():
    from slmlab.config import validate_pipeline
    from slmlab.data.images import ImageDataConfig, shape_records, tokenizer_texts
    from slmlab.data.shards import cache_key

    shapes = {"kind": "shapes", "n_train": 20, "n_val": 5}
    data = ImageDataConfig.model_validate({"task": "qa", "sources": [shapes, {**shapes, "repeat": 3}]})
    lines = tokenizer_texts([data, data], seed=3)
    recs = shape_records(3, 20, 5, grounded=True)  # the source's default
    train_captions = {" " + r["caption"] for r in recs if r["split"] == "train"}  # as the decoder sees replies
    held_out = {" " + r["caption"] for r in recs if r["split"] == "val"} - train_captions
    assert len(lines) == len(set(lines))  # distinct: repeats and a second stage add nothing
    assert train_captions <= set(lines) and not held_out & set(lines)
    assert {"what shape is the red object?", " red circle", " blue bottom"} <= set(lines)

    raw = {"name": "t", "run_dir": "/tmp/unused", "data": {"sources": [{"kind": "embedded", "max_documents": 5}]},
           "model": {"family": "alemoe_vlm"},
           "stages": [{"kind": "vlm_train", "name": "qa", "data": {"sources": [shapes]}}]}
    with_images = validate_pipeline(raw, "t.yaml")
    other_images = validate_pipeline({**raw, "stages": [{**raw["stages"][0], "data": {"sources": [
        {**shapes, "n_train": 21}]}}]}, "t.yaml")
    without = validate_pipeline({**raw, "tokenizer": {"image_text": False}}, "t.yaml")
    text_only = validate_pipeline({k: v for k, v in raw.items() if k != "stages"}, "t.yaml")
    keys = {cache_key(c, fingerprints=[]) for c in (with_images, other_images, without)}
    assert len(keys) == 3  # the tokenizer's image text is part of what the data cache is
    assert cache_key(without, fingerprints=[]) == cache_key(text_only, fingerprints=[])  # old caches stay valid


def test_a_stage_takes_the_models_image_size_and_rejects_another():
    from types import SimpleNamespace

    from slmlab.config import validate_pipeline
    from slmlab.stages import StageFailed
    from slmlab.stages.vlm import _run_config, run_train

    raw = {"name": "t", "run_dir": "/tmp/unused", "data": {"sources": [{"kind": "embedded", "max_documents": 5}]},
           "model": {"family": "alemoe_vlm", "image_size": 64, "patch_size": 8},
           "stages": [{"kind": "vlm_train", "name": "qa", "data": {"sources": [{"kind": "shapes"}]}}]}
    cfg = validate_pipeline(raw, "t.yaml")
    stage = cfg.stage_list()[0]
    assert stage.data.image_size is None
    assert _run_config(stage, SimpleNamespace(cfg=cfg), 300).model.image_size == 64
    raw["stages"][0]["data"]["image_size"] = 32
    cfg = validate_pipeline(raw, "t.yaml")
    for check in (lambda: _run_config(cfg.stage_list()[0], SimpleNamespace(cfg=cfg), 300),
                  lambda: run_train(cfg.stage_list()[0], SimpleNamespace(cfg=cfg))):  # before any shard is built
        with pytest.raises(StageFailed, match=r"stages\.qa\.data\.image_size: expected model\.image_size=64, found 32"):
            check()
