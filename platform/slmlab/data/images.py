"""Image-text data: embedded generators, record readers, and shards decoded on Ray Data.

A record is one image plus its text: a ``caption``; or a ``question`` + ``answer`` (+ ``qtype``); or a
LLaVA-style conversation (``conversations: [{from: human, value: "<image>\\nQ"}, {from: gpt, value: A}, ...]``,
``messages: [{role, content}]`` too). The image is a path (relative to the record file) or bytes. Records
come from JSONL files, parquet files, an image folder with a ``metadata.jsonl`` (Hugging Face imagefolder:
``file_name`` + text fields), or two embedded generators that download nothing:

- ``digits``: scikit-learn's 1,797 real 8x8 handwritten digits, with captions and "which digit is this?";
- ``shapes``: Sort-of-CLEVR scenes (six colours, circles and squares, deterministic by seed) with
  attribute questions (shape, left/right, up/down, colour of the leftmost/topmost...) and relational
  ones (colour of the closest / furthest object, how many share a shape).

Held-out images are never seen in training: the split is by image (embedded: drawn by seed; records: a
``split`` field, else a hash of the image's name). Shards are built on Ray Data: records are read on the
driver (text and image references only), then decoding, resizing, normalising and tokenising run in a
``map_batches`` that writes parquet rows — one image per row, padded, never packed::

    train/*.parquet, val/*.parquet   input_ids int32[seq_len+1], target_mask int8[seq_len+1] (answers only),
                                     pixel_values float32[C, H, W] in [-1, 1]
    eval/*.parquet                   one held-out question per row: pixel_values, question, answer, qtype
    tokenizer.json, summary.json, _SUCCESS

The folder is a :class:`~slmlab.data.shards.Shards`, so the generic loop trains on it unchanged. An
image that cannot be read or decoded (missing, corrupt, truncated) is counted and reported by file
name in ``summary.json``; the build goes on without it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, model_validator

from slmlab.data import chat
from slmlab.data.sources import file_digest
from slmlab.data.tokenizer import PAD, load_tokenizer
from slmlab.schema import StrictConfig

FORMAT_VERSION = 2  # bump when the row layout changes: old cache entries are ignored
CAPTION_PROMPT = "describe the image."
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_EXAMPLES = 20  # bad images named in the summary


# ----------------------------------------------------------------------------------------------
# Config


class ImageSourceConfig(StrictConfig):
    kind: Literal["digits", "shapes", "jsonl", "parquet", "folder"]  # embedded generators, or records on disk
    path: str | None = None  # jsonl/parquet file or folder; folder: images + metadata.jsonl
    image_field: str = "image"  # record column holding the image path (relative to the record file) or bytes
    repeat: int = Field(1, ge=1)  # training copies of each image (re-drawn questions): small sources get more steps
    shift: int = Field(0, ge=0)  # training copies move by up to this many pixels (at image_size): augmentation
    # for small sources (digits); 0 for scenes, whose left/right answers a shift could change
    max_images: int | None = Field(None, ge=1)  # cap, for quick experiments
    n_train: int = Field(4000, ge=1)  # shapes: training scenes
    n_val: int = Field(300, ge=1)  # shapes: held-out scenes
    questions_per_image: int = Field(8, ge=1)  # questions drawn (without replacement) per training copy of an image
    # this source's texts, when not the data's `task`: captions kept beside one source's questions (LLaVA's mix)
    # without turning another source's questions into captions too
    task: Literal["caption", "qa", "both"] | None = None
    # relative chance of each question type in that draw (types not named: 1), for a type the others crowd out of
    # a uniform draw: leftmost/rightmost colour questions are <= 4 of a scene's ~34. (Fast loop: colour drawn 3x
    # as often reached 46.6% where an even mix stayed at chance; in the pipeline, 4x did not lift it: README)
    question_weights: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    # only these question types (qtype), in training and held-out eval: a curriculum stage can train the easy
    # lookups first. None: all. An unknown shapes type is an error; other sources' types are their own
    question_types: list[str] | None = Field(None, min_length=1)
    # shapes: each answer names its object first ("red top", "leftmost grey"). The decoder then looks the object
    # up at the token that names it, one hop; a bare "top" must first carry the colour from the question to the
    # answer position, two hops: 56.3% at step 400 where the grounded answer reached 91.8% (README: how
    # AleMoEVLM learnt to bind a colour to its object). Exact match scores the whole answer, the name included
    grounded_answers: bool = True
    # shapes: each caption also names the leftmost, rightmost, topmost and bottommost object's colour
    # ("...; leftmost grey, rightmost red, topmost blue, bottommost green."): the colour questions' arg-min, densely
    # supervised while the ViT trains at the full lr in the captions stage, as the per-object shapes are
    caption_extremes: bool = False

    @model_validator(mode="after")
    def _path(self) -> "ImageSourceConfig":
        if self.kind in ("jsonl", "parquet", "folder") and not self.path:
            raise ValueError(f"a {self.kind!r} image source needs 'path'")
        known = {"shapes": ATTRIBUTE_TYPES + RELATIONAL_TYPES, "digits": ("digit",)}.get(self.kind)
        named_types = (("question_types", self.question_types or ()), ("question_weights", self.question_weights))
        for field, named in named_types:
            unknown = sorted(set(named) - set(known)) if known else []
            if unknown:
                raise ValueError(f"{field}: {unknown} are not {self.kind} question types; expected some of "
                                 f"{list(known)}")
        return self


class ImageDataConfig(StrictConfig):
    sources: list[ImageSourceConfig] = Field(min_length=1)  # all are mixed (shuffled by seed) into one set
    task: Literal["caption", "qa", "both"] = "qa"  # which texts make the training rows: captions, Q/A, or both
    image_size: int | None = Field(None, ge=4)  # side every image is resized to; None: model.image_size (a stage
    # sets it only to state it: it must equal the model's)
    channels: Literal[1, 3] | None = None  # 3: grey images are replicated to RGB; None: model.channels
    seq_len: int = Field(96, ge=8)  # text tokens per row; turns are added to a row while they fit
    turns_per_row: int = Field(8, ge=1)  # most question/answer turns that share one image row
    val_fraction: float = Field(0.2, gt=0, lt=1)  # held-out share of images for records without a split field
    eval_per_image: int = Field(1, ge=1)  # held-out questions per (image, question type) kept for exact-match eval


# ----------------------------------------------------------------------------------------------
# Embedded generators (deterministic by seed; images as PNG bytes)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_QUESTIONS = ["which digit is this?", "what number is written here?", "what digit is shown?"]


def digit_records(seed: int, val_fraction: float = 0.2, max_images: int | None = None) -> list[dict]:
    """scikit-learn's bundled 8x8 digits (values 0-16) as grey PNGs, split by image."""
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))[:max_images]
    n_val = max(1, round(len(order) * val_fraction))
    out = []
    for rank, i in enumerate(order):
        y = int(d.target[i])
        img = (d.images[i] * (255 / 16)).round().astype(np.uint8)
        out.append({"image_id": f"digits/{i:04d}", "image": _png(img), "split": "val" if rank < n_val else "train",
                    "caption": f"a handwritten {DIGIT_WORDS[y]}, the digit {y}.",
                    "qa": [(q, str(y), "digit") for q in DIGIT_QUESTIONS]})
    return out


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "orange": (245, 140, 20), "grey": (128, 128, 128), "yellow": (235, 215, 30)}
ATTRIBUTE_TYPES = ("shape", "left_right", "up_down", "colour")
RELATIONAL_TYPES = ("closest", "furthest", "count")
SCENE_SIZE, OBJECT_SIZE = 64, 12  # rendered size; resized to image_size in Ray Data


MARGIN = 2.0  # pixels (at SCENE_SIZE) an answer must win by: resizing blurs anything closer


def draw_scene(rng: random.Random) -> tuple[np.ndarray, list[dict]]:
    """One Sort-of-CLEVR scene: six objects, one per colour, each a circle or a square, not overlapping,
    none within MARGIN of a centre line (so left/right and top/bottom are decided by the pixels)."""
    from PIL import Image, ImageDraw

    objects: list[dict] = []
    lo, hi, c = OBJECT_SIZE // 2 + 1, SCENE_SIZE - OBJECT_SIZE // 2 - 1, SCENE_SIZE / 2
    for name in COLOURS:
        while True:
            # x, y: the pixel centroid of the drawn object (its box spans [x+0.5-size/2, x+0.5+size/2))
            x, y = rng.randint(lo, hi) - 0.5, rng.randint(lo, hi) - 0.5
            if (min(abs(x - c), abs(y - c)) >= MARGIN
                    and all(max(abs(x - o["x"]), abs(y - o["y"])) > OBJECT_SIZE + 1 for o in objects)):
                break
        objects.append({"colour": name, "shape": rng.choice(("circle", "square")), "x": x, "y": y})
    img = Image.new("RGB", (SCENE_SIZE, SCENE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for o in objects:
        x0, y0 = round(o["x"] + 0.5) - OBJECT_SIZE // 2, round(o["y"] + 0.5) - OBJECT_SIZE // 2
        box = (x0, y0, x0 + OBJECT_SIZE - 1, y0 + OBJECT_SIZE - 1)
        (draw.ellipse if o["shape"] == "circle" else draw.rectangle)(box, fill=COLOURS[o["colour"]])
    return np.asarray(img), objects


def scene_questions(objects: list[dict], grounded: bool = False) -> dict[str, list[tuple[str, str]]]:
    """Every question of each type about one scene, with its answer ("top"; grounded: "red top", the object the
    question names, then the answer). A closest / furthest / leftmost... question whose winner is not ahead by
    MARGIN pixels is left out: its answer would be a guess."""
    c = SCENE_SIZE / 2
    qs: dict[str, list[tuple[str, str]]] = {t: [] for t in ATTRIBUTE_TYPES + RELATIONAL_TYPES}

    def ask(qtype: str, question: str, named: str, answer: str) -> None:
        qs[qtype].append((question, f"{named} {answer}" if grounded else answer))

    for o in objects:
        others = sorted((p for p in objects if p is not o), key=lambda p: math.dist((o["x"], o["y"]), (p["x"], p["y"])))
        d = [math.dist((o["x"], o["y"]), (p["x"], p["y"])) for p in others]
        colour = o["colour"]
        name = f"the {colour} object"
        ask("shape", f"what shape is {name}?", colour, o["shape"])
        ask("left_right", f"is {name} on the left or the right?", colour, "left" if o["x"] < c else "right")
        ask("up_down", f"is {name} at the top or the bottom?", colour, "top" if o["y"] < c else "bottom")
        if d[1] - d[0] >= MARGIN:
            ask("closest", f"what colour is the object closest to {name}?", colour, others[0]["colour"])
        if d[-1] - d[-2] >= MARGIN:
            ask("furthest", f"what colour is the object furthest from {name}?", colour, others[-1]["colour"])
        same = sum(p["shape"] == o["shape"] for p in objects)
        ask("count", f"how many objects have the shape of {name}?", colour, str(same))
    for word, colour in scene_extremes(objects):
        ask("colour", f"what colour is the {word} object?", word, colour)
    return qs


def scene_extremes(objects: list[dict]) -> list[tuple[str, str]]:
    """(leftmost / rightmost / topmost / bottommost, its colour) for each whose object leads the next by MARGIN."""
    out = []
    for word, key, sign in (("leftmost", "x", 1), ("rightmost", "x", -1), ("topmost", "y", 1), ("bottommost", "y", -1)):
        first, second = sorted(objects, key=lambda o: sign * o[key])[:2]
        if abs(first[key] - second[key]) >= MARGIN:
            out.append((word, first["colour"]))
    return out


def scene_caption(objects: list[dict], extremes: bool = False) -> str:
    """Each object's colour, shape and quadrant in a fixed colour order; ``extremes``: then which colour is
    leftmost, rightmost, topmost and bottommost, as the colour answers name them ("leftmost grey")."""
    c = SCENE_SIZE / 2
    text = "; ".join(f"{o['colour']} {o['shape']} {'top' if o['y'] < c else 'bottom'} "
                     f"{'left' if o['x'] < c else 'right'}" for o in objects)
    named = scene_extremes(objects) if extremes else []
    if named:  # none when no object leads by MARGIN on any side
        text += "; " + ", ".join(f"{word} {colour}" for word, colour in named)
    return text + "."


def shape_records(seed: int, n_train: int, n_val: int, grounded: bool = False, extremes: bool = False) -> list[dict]:
    """Generated scenes; train and held-out scenes come from separate seeded streams."""
    out = []
    for split, n, stream in (("train", n_train, 0), ("val", n_val, 1)):
        rng = random.Random(f"shapes/{seed}/{stream}")
        for i in range(n):
            img, objects = draw_scene(rng)
            qs = scene_questions(objects, grounded)
            out.append({"image_id": f"shapes/{split}/{i:05d}", "image": _png(img), "split": split,
                        "caption": scene_caption(objects, extremes),
                        "qa": [(q, a, t) for t, pairs in qs.items() for q, a in pairs]})
    return out


# ----------------------------------------------------------------------------------------------
# Records on disk -> the same normalised form


def _turns_of(rec: dict) -> tuple[list[tuple[str, str, str]], str | None, str | None]:
    """(Q/A turns, caption, problem) of one raw record."""
    qa: list[tuple[str, str, str]] = []
    conv = rec.get("conversations", rec.get("messages"))
    if conv is not None:
        msgs, why = chat.normalize_chat({"messages": list(conv)}, _ChatFields)
        if msgs is None:
            return [], None, why
        msgs = [(r, c.replace("<image>", "").strip()) for r, c in msgs if r != "system"]
        types = rec.get("qtypes") or []
        for j in range(0, len(msgs) - 1, 2):
            (r1, q), (r2, a) = msgs[j], msgs[j + 1]
            if r1 == "user" and r2 == "assistant":
                qa.append((q, a, str(types[j // 2]) if j // 2 < len(types) else "qa"))
    elif rec.get("question") is not None or rec.get("answer") is not None:
        if not (isinstance(rec.get("question"), str) and isinstance(rec.get("answer"), str)):
            return [], None, "question/answer: expected two strings"
        qa.append((rec["question"], rec["answer"], str(rec.get("qtype") or "qa")))
    caption = rec.get("caption") if isinstance(rec.get("caption"), str) else None
    if not qa and caption is None:
        return [], None, "expected a caption, question/answer or conversations field"
    return qa, caption, None


class _ChatFields:  # what chat.normalize_chat reads from a source config
    messages_field, prompt_field, response_field, system_field = "messages", "prompt", "response", None


def _read_records(src: ImageSourceConfig, index: int, seed: int, val_fraction: float) -> tuple[list[dict], list[str]]:
    """Normalised records of one source, and its bad records as 'where: why' lines."""
    if src.kind == "digits":
        return _only(src, digit_records(seed, val_fraction, src.max_images)), []
    if src.kind == "shapes":
        return _only(src, shape_records(seed, src.n_train, src.n_val, src.grounded_answers, src.caption_extremes)), []
    path = Path(src.path)
    if not path.exists():
        raise FileNotFoundError(f"sources[{index}].path: expected a {src.kind} file or folder, found no {path}")
    raw: list[tuple[str, Path, dict]] = []  # (where, base folder for relative images, record)
    if src.kind == "folder":
        meta = path / "metadata.jsonl"
        if not meta.exists():
            raise FileNotFoundError(f"sources[{index}].path: expected {meta} (file_name + caption/question/answer)")
        files = [meta]
    else:
        ext = ".jsonl" if src.kind == "jsonl" else ".parquet"
        files = sorted(p for p in path.rglob(f"*{ext}")) if path.is_dir() else [path]
    for f in files:
        if f.suffix == ".parquet":
            import pyarrow.parquet as pq

            raw += [(f"{f}:row {i}", f.parent, r) for i, r in enumerate(pq.read_table(f).to_pylist())]
        else:
            for i, line in enumerate(f.read_text(encoding="utf-8").splitlines()):
                if line.strip():
                    try:
                        raw.append((f"{f}:{i + 1}", f.parent, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raw.append((f"{f}:{i + 1}", f.parent, {"_bad": f"invalid JSON ({err.msg})"}))
    field = "file_name" if src.kind == "folder" else src.image_field
    records, bad = [], []
    for where, base, rec in raw[: src.max_images]:
        qa, caption, why = _turns_of(rec) if "_bad" not in rec else ([], None, rec["_bad"])
        image = rec.get(field)
        if why is None and not isinstance(image, (str, bytes)):
            why = f"field {field!r}: expected an image path or bytes"
        if why:
            bad.append(f"{where}: {why}")
            continue
        name = str(base / image) if isinstance(image, str) else f"{where}"
        split = rec.get("split") if rec.get("split") in ("train", "val") else None
        if split is None:  # held out by image: the same image always lands on the same side
            h = int(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).hexdigest(), 16) / 2**64
            split = "val" if h < val_fraction else "train"
        records.append({"image_id": name, "image": image if isinstance(image, bytes) else name, "split": split,
                        "caption": caption, "qa": qa})
    return _only(src, records), bad


def _only(src: ImageSourceConfig, records: list[dict]) -> list[dict]:
    """``records`` with their question/answer turns cut to ``src.question_types`` (captions untouched)."""
    if src.question_types is not None:
        for r in records:
            r["qa"] = [turn for turn in r["qa"] if turn[2] in src.question_types]
    return records


def tokenizer_texts(data_configs: list[ImageDataConfig], seed: int) -> list[str]:
    """The distinct caption / question / answer lines of the *training* images of ``data_configs``,
    for the pipeline's tokenizer: a BPE trained on prose alone splits "circle" into four tokens and
    "red" differently at a caption's start and inside a question, so the same word reaches the
    decoder as unstable multi-token patterns. Held-out images stay unseen; distinct lines only, so a
    generator's thousands of near-identical captions do not outweigh the corpus. Answers and captions are
    taken as the decoder sees them, after a space (``reply``): a one-word answer is one line, seen once, and
    at a line start with no space before it would keep its byte-pair pieces ("bottom" -> b|ot|tom)."""
    lines: dict[str, None] = {}
    seen: set[str] = set()
    for cfg in data_configs:
        for i, src in enumerate(cfg.sources):
            key = json.dumps([source_fingerprint(src), cfg.val_fraction], sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            records, _ = _read_records(src, i, seed, cfg.val_fraction)
            for r in records:
                if r["split"] != "train":
                    continue
                questions = [q for q, _, _ in r["qa"]]
                replies = [reply(t) for t in [r["caption"]] + [a for _, a, _ in r["qa"]] if t]
                for text in [CAPTION_PROMPT, *filter(None, questions), *replies]:
                    lines.setdefault(text)
    return list(lines)


def source_fingerprint(src: ImageSourceConfig) -> object:
    """What a source's content is: its settings, plus the digest of every local file it reads."""
    entry: dict = src.model_dump(mode="json")
    if src.kind in ("jsonl", "parquet", "folder") and Path(src.path).exists():
        p = Path(src.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        entry["files"] = [[str(f), file_digest(str(f))] for f in files]
    return entry


# ----------------------------------------------------------------------------------------------
# Decoding (runs in Ray Data)


def load_image(image: str | bytes, size: int, channels: int = 3) -> np.ndarray:
    """Decode, resize (bilinear) and normalise one image to float32 (channels, size, size) in [-1, 1].
    Raises OSError/ValueError with the reason when the file is missing, corrupt or truncated."""
    from PIL import Image

    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as im:
        im.load()  # a truncated file fails here, not later
        im = im.convert("RGB" if channels == 3 else "L").resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1).copy()


def _shifted(pix: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image moved by (dx, dy) pixels, the border repeated into the gap (digits: black stays black)."""
    c, h, w = pix.shape
    pad = np.pad(pix, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx))), mode="edge")
    return pad[:, abs(dy) - dy:abs(dy) - dy + h, abs(dx) - dx:abs(dx) - dx + w].copy()


def reply(text: str) -> str:
    """An answer or caption as the assistant's turn: after a space, as Llama's "[/INST] answer" renders it, so a
    one-word answer is the token that word is inside a question (" bottom"), not pieces a byte-level BPE without
    a prefix space learns for line starts it sees once (b|ot|tom). Exact match strips it."""
    return " " + text


def _draw(qa: list, k: int, weights: dict[str, float], rng: random.Random) -> list:
    """k of the turns without replacement, each type at its weight (Efraimidis-Spirakis: the k largest
    u ** (1 / w)); with no weights, exactly ``rng.sample``: an unweighted source gives the rows it always gave."""
    if not weights:
        return rng.sample(qa, k)
    keys = [rng.random() ** (1.0 / weights.get(t, 1.0)) for _, _, t in qa]
    return [qa[i] for i in sorted(range(len(qa)), key=keys.__getitem__, reverse=True)[:k]]


def _rows_of(qa: list, caption: str | None, task: str, rng: random.Random, copies: int, per_copy: int | None,
             weights: dict[str, float] | None = None):
    """Text of each training row: lists of (question, answer) turns."""
    rows = []
    for _ in range(copies):
        turns = []
        if task in ("caption", "both") and caption:
            turns.append((CAPTION_PROMPT, caption))
        if task in ("qa", "both") and qa:
            pick = _draw(qa, min(per_copy or len(qa), len(qa)), weights or {}, rng)
            turns += [(q, a) for q, a, _ in pick]
        if turns:
            rows.append(turns)
    return rows


class EncodeAndWrite:
    """Ray Data map_batches: decode + resize + normalise each image, tokenise its turns into rows of
    seq_len + 1 tokens (loss on answers only), write train/val/eval parquet; return per-batch stats."""

    def __init__(self, out: str, tokenizer_path: str, cfg: dict):
        self.out, self.cfg = Path(out), ImageDataConfig.model_validate(cfg)
        self.tok = load_tokenizer(tokenizer_path)
        self.pad = self.tok.token_to_id(PAD)

    def _rows(self, turns: list[tuple[str, str]]):
        """Greedy: whole turns while they fit in seq_len + 1 tokens, then a new row; a single over-long
        turn is cut at the block (counted). Yields (ids, mask, turns in the row), padded."""
        block = self.cfg.seq_len + 1
        encoded = chat.encode_chats(self.tok, [[("user", q), ("assistant", reply(a))] for q, a in turns])
        i = 0
        while i < len(turns):
            ids, mask, n = [], [], 0
            while i + n < len(turns) and n < self.cfg.turns_per_row and len(ids) + len(encoded[i + n][0]) <= block:
                ids += encoded[i + n][0].tolist()
                mask += encoded[i + n][1].tolist()
                n += 1
            if n == 0:  # one turn longer than the block
                ids, mask, n = encoded[i][0][:block].tolist(), encoded[i][1][:block].tolist(), 1
                self.truncated += 1
            row_ids, row_mask = np.full(block, self.pad, np.int32), np.zeros(block, np.int8)
            row_ids[:len(ids)], row_mask[:len(mask)] = ids, mask
            yield row_ids, row_mask, turns[i:i + n]
            i += n

    def __call__(self, batch: dict) -> dict:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from ray.data.extensions import ArrowTensorArray

        cfg = self.cfg
        rows = {s: {"input_ids": [], "target_mask": [], "pixel_values": []} for s in ("train", "val")}
        ev: dict[str, list] = {"pixel_values": [], "question": [], "answer": [], "qtype": [], "image_id": []}
        zero = {"train": 0, "val": 0}
        stats = {"images": dict(zero), "rows": dict(zero), "tokens": dict(zero), "bytes": dict(zero),
                 "targets": dict(zero), "bad": []}
        self.truncated = 0
        for i in range(len(batch["image_id"])):
            name, split = str(batch["image_id"][i]), str(batch["split"][i])
            try:
                data = batch["image_bytes"][i]
                image = bytes(data) if len(data) else str(batch["image_path"][i])
                pix = load_image(image, cfg.image_size, cfg.channels)
            except Exception as err:  # noqa: BLE001 - any decoder failure is a bad image, reported by name
                stats["bad"].append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                continue
            qa = json.loads(batch["qa"][i])
            rng = random.Random(f"{batch['seed'][i]}/{name}")
            src = cfg.sources[int(batch["source"][i])]  # its settings: repeat, shift, questions, weights, task
            train = split == "train"
            copies, shift = (src.repeat, src.shift) if train else (1, 0)
            stats["images"][split] += 1
            task = src.task or cfg.task
            for copy, turns in enumerate(_rows_of(qa, batch["caption"][i] or None, task, rng, copies,
                                                  src.questions_per_image, src.question_weights if train else None)):
                moved = _shifted(pix, rng.randint(-shift, shift), rng.randint(-shift, shift)) if shift and copy else pix
                for ids, mask, used in self._rows(turns):
                    r = rows[split]
                    r["input_ids"].append(ids)
                    r["target_mask"].append(mask)
                    r["pixel_values"].append(moved)
                    stats["rows"][split] += 1
                    stats["tokens"][split] += int((ids != self.pad).sum())
                    stats["targets"][split] += int(mask.sum())
                    stats["bytes"][split] += sum(len(q.encode()) + len(a.encode()) for q, a in used)
            if split == "val":
                by_type: dict[str, list] = {}
                for q, a, t in qa:
                    by_type.setdefault(t, []).append((q, a))
                if task in ("caption", "both") and batch["caption"][i]:
                    by_type["caption"] = [(CAPTION_PROMPT, batch["caption"][i])]
                for t, pairs in sorted(by_type.items()):
                    for q, a in rng.sample(pairs, min(cfg.eval_per_image, len(pairs))):
                        for k, v in zip(ev, (pix, q, a, t, name)):
                            ev[k].append(v)
        first = int(batch["row"][0]) if len(batch["row"]) else 0
        for split, r in rows.items():
            if r["input_ids"]:
                (self.out / split).mkdir(parents=True, exist_ok=True)
                pq.write_table(pa.table({k: ArrowTensorArray.from_numpy(np.stack(v)) for k, v in r.items()}),
                               self.out / split / f"{first:08d}.parquet")
        if ev["question"]:
            (self.out / "eval").mkdir(parents=True, exist_ok=True)
            table = {k: ArrowTensorArray.from_numpy(np.stack(v)) if k == "pixel_values" else pa.array(v)
                     for k, v in ev.items()}
            pq.write_table(pa.table(table), self.out / "eval" / f"{first:08d}.parquet")
        stats["turns_truncated"] = self.truncated
        return {"stats": [json.dumps(stats)]}


# ----------------------------------------------------------------------------------------------
# Build


def cache_key(cfg: ImageDataConfig, seed: int, tokenizer_path: Path) -> str:
    payload = {"format": FORMAT_VERSION, "seed": seed, "data": cfg.model_dump(mode="json"),
               "sources": [source_fingerprint(s) for s in cfg.sources], "tokenizer": file_digest(str(tokenizer_path))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_image_shards(cfg: ImageDataConfig, run_dir: str | Path, tokenizer_path: str | Path, seed: int = 0,
                       progress=print):
    """The cached image-text shards for ``cfg`` (a :class:`Shards`), built on Ray Data when missing.
    ``tokenizer_path``: the pipeline's tokenizer (one vocabulary for plain text and image-text data)."""
    import ray

    from slmlab.data.shards import Shards, _ordered

    for name in ("image_size", "channels"):
        if getattr(cfg, name) is None:  # a vlm_train stage fills both from its model
            raise ValueError(f"data.{name}: expected a value (the model's), found none")
    tokenizer_path = Path(tokenizer_path)
    key = cache_key(cfg, seed, tokenizer_path)
    root = Path(run_dir) / "cache" / "images"
    final = root / key
    if (final / "_SUCCESS").exists():
        progress(f"images: reusing cached shards {final}")
        return Shards(final, key)
    tmp = root / f".{key}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        records, bad_records, labels = [], [], []
        for i, src in enumerate(cfg.sources):
            recs, bad = _read_records(src, i, seed, cfg.val_fraction)
            labels.append(src.kind if not src.path else f"{src.kind}:{src.path}")
            for r in recs:
                r["source"] = i
            records += recs
            bad_records += bad
        random.Random(seed).shuffle(records)  # sources interleave in the rows; same seed, same order
        items = [{"row": j, "seed": seed, "image_id": r["image_id"], "split": r["split"],
                  # bytes and paths in separate columns: one Arrow type each
                  "image_bytes": r["image"] if isinstance(r["image"], bytes) else b"",
                  "image_path": r["image"] if isinstance(r["image"], str) else "",
                  "caption": r["caption"] or "", "qa": json.dumps(r["qa"]), "source": r["source"]}
                 for j, r in enumerate(records)]
        progress(f"images: decoding {len(items):,} images from {len(cfg.sources)} source(s) on Ray Data "
                 f"({cfg.image_size}x{cfg.image_size}, task {cfg.task}"
                 + "".join(f"; {labels[i]}: {src.task}" for i, src in enumerate(cfg.sources) if src.task) + ")")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        if (tokenizer_path.parent / "tokenizer_config.json").exists():
            shutil.copyfile(tokenizer_path.parent / "tokenizer_config.json", tmp / "tokenizer_config.json")
        with _ordered():
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(16, len(items) // 256)))
            args = (str(tmp), str(tmp / "tokenizer.json"), cfg.model_dump(mode="json"))
            stats = ds.map_batches(
                EncodeAndWrite, fn_constructor_args=args,
                batch_size=256, batch_format="numpy", concurrency=1, num_cpus=0.5).take_all()
        summary = _summary(cfg, [json.loads(s["stats"]) for s in stats], labels, records, bad_records, tmp, seed)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        (tmp / "_SUCCESS").write_text(key)
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bad = summary["bad_records"]
    if bad["total"]:
        progress(f"images: {bad['total']} bad record(s)/image(s) skipped: " + "; ".join(bad["examples"][:5]))
    progress(f"images: wrote {summary['train']['blocks']:,} train / {summary['val']['blocks']:,} val rows and "
             f"{summary['eval']['questions']:,} held-out questions to {final}")
    return Shards(final, key)


def _summary(cfg, parts: list[dict], labels, records, bad_records, out: Path, seed: int) -> dict:
    tok = load_tokenizer(out / "tokenizer.json")
    tot: dict = {s: {"documents": 0, "tokens": 0, "bytes": 0, "blocks": 0, "targets": 0} for s in ("train", "val")}
    bad_images: list[str] = []
    dropped = 0
    for p in parts:
        for s in ("train", "val"):
            tot[s]["documents"] += p["images"][s]
            tot[s]["blocks"] += p["rows"][s]
            tot[s]["tokens"] += p["tokens"][s]
            tot[s]["targets"] += p["targets"][s]
            tot[s]["bytes"] += p["bytes"][s]
        bad_images += p["bad"]
        dropped += p["turns_truncated"]
    for s in ("train", "val"):
        t = tot[s]
        t["pad"] = t["blocks"] * cfg.seq_len - t["tokens"]
        t["bytes_per_token"] = t["bytes"] / max(1, t["tokens"])
        t["utilization"] = t["tokens"] / max(1, t["blocks"] * cfg.seq_len)
        if t["blocks"] == 0:
            raise ValueError(f"images: expected {s} rows, found none ({len(bad_images)} unreadable images, "
                             f"{len(bad_records)} bad records)")
    import pyarrow.parquet as pq

    has_eval = (out / "eval").exists()
    qtypes = pq.read_table(out / "eval", columns=["qtype"]).column("qtype").to_pylist() if has_eval else []
    examples = (bad_records + bad_images)[:MAX_EXAMPLES]
    n_imgs = [sum(1 for r in records if r["source"] == i) for i in range(len(labels))]
    share = [n / max(1, len(records)) for n in n_imgs]
    return {
        "format_version": FORMAT_VERSION, "kind": "image-text", "seq_len": cfg.seq_len, "seed": seed,
        "image_size": cfg.image_size, "channels": cfg.channels, "task": cfg.task, "vocab_size": tok.get_vocab_size(),
        "train": tot["train"], "val": tot["val"], "turns_truncated": dropped,
        "eval": {"questions": len(qtypes), "by_qtype": {t: qtypes.count(t) for t in sorted(set(qtypes))}},
        "sources": [{"label": lab, "kind": s.kind, "path": s.path, "documents": n, "requested_share": f,
                     "achieved_share": {"train": f, "val": f},
                     "bad_records": sum(1 for b in bad_records + bad_images if s.path and b.startswith(str(s.path)))}
                    for lab, s, n, f in zip(labels, cfg.sources, n_imgs, share)],
        "bad_records": {"total": len(bad_records) + len(bad_images), "records": len(bad_records),
                        "images": len(bad_images), "by_reason": {"unreadable image": len(bad_images),
                                                                 "bad record": len(bad_records)},
                        "examples": examples, "unreadable_images": bad_images},
        "partitions": None,
    }


def read_eval(shards_root: str | Path) -> dict[str, np.ndarray | list]:
    """The held-out questions of a shard folder: pixel_values (N, C, H, W) and question/answer/qtype lists."""
    import pyarrow.parquet as pq

    table = pq.read_table(str(Path(shards_root) / "eval"))
    cols = {n: table.column(n) for n in table.column_names}
    pix = np.concatenate([np.asarray(c.to_numpy(zero_copy_only=False)) for c in cols.pop("pixel_values").chunks])
    return {"pixel_values": pix, **{k: v.to_pylist() for k, v in cols.items()}}
