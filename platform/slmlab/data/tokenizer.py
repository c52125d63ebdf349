"""Byte-level BPE tokenizer trained with Hugging Face ``tokenizers``.

Byte-level means every string is encodable (no unknown token) and every non-special token
stands for a fixed byte string — which is what lets bits-per-byte be computed exactly from
token ids (:func:`token_byte_lengths`).

Document text is encoded with :func:`encode_text`, which treats special-token strings as plain
text: a corpus that literally contains ``<|end|>`` gets the 7 bytes, never the control token (which
would count 0 bytes in bits per byte and could forge chat turns). Control tokens come only from
structure (EOS between documents, role markers around chat messages).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END_TURN]  # PAD first so its id is 0

# the chat rendering of slmlab.data.chat, as a Jinja template for transformers' apply_chat_template
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int, out: Path) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, out)
    write_transformers_config(out.parent)
    return out


def write_transformers_config(folder: Path) -> None:
    """tokenizer_config.json so ``AutoTokenizer.from_pretrained(folder)`` yields a fast tokenizer."""
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END_TURN],
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))


def load_tokenizer(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))


def encode_text(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, special-token strings encoded as the plain text they spell.

    ``encode_special_tokens`` is a runtime switch of the tokenizer, not saved in tokenizer.json
    (transformers' chat template must still map rendered markers to control tokens), so it is set
    around the call and restored."""
    if not texts:
        return []
    before = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        return [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
    finally:
        tok.encode_special_tokens = before


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}


def token_byte_lengths(tok: Tokenizer) -> list[int]:
    """UTF-8 bytes each token id stands for (0 for special tokens). In byte-level BPE every
    byte is one printable character of the token string, so the length is len(token)."""
    specials = set(SPECIAL_TOKENS)
    lengths = [0] * tok.get_vocab_size()
    for token, idx in tok.get_vocab().items():
        lengths[idx] = 0 if token in specials else len(token)
    return lengths
