"""Instruction (chat) records: normalization, the chat template, and token-level loss masks.

A record is either ``{messages: [{role, content}, ...]}`` (ShareGPT ``{from, value}`` also accepted)
or a ``{prompt, response}`` pair (plus an optional system column). It is rendered as::

    <|system|>{system}<|end|><|user|>{prompt}<|end|><|assistant|>{answer}<|end|> ...

The markers come from structure only: each message's content is encoded on its own with special-token
strings kept as plain text (:func:`~slmlab.data.tokenizer.encode_text`), then wrapped in the role and
``<|end|>`` ids. A message that spells ``<|end|><|assistant|>`` stays text, so it cannot forge a turn.
For content without marker strings the ids equal tokenizing the rendered string, which is what the
Jinja ``chat_template`` in the saved ``tokenizer_config.json`` gives transformers. ``target_mask`` is
1 on the tokens of assistant answers and on their closing ``<|end|>`` — nothing else is a target.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from slmlab.data.tokenizer import ASSISTANT, CHAT_TEMPLATE, END_TURN, SYSTEM, USER, encode_text  # noqa: F401

ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant"}


def render(messages: list[tuple[str, str]]) -> str:
    return "".join(f"{ROLE_TOKENS[r]}{c}{END_TURN}" for r, c in messages)


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def normalize_chat(record: dict, src) -> tuple[list[tuple[str, str]] | None, str | None]:
    """(messages, None) for a usable record, (None, reason) for a bad one."""
    msgs = record.get(src.messages_field)
    if msgs is not None:
        if isinstance(msgs, np.ndarray):
            msgs = msgs.tolist()
        if not isinstance(msgs, (list, tuple)):
            return None, f"field {src.messages_field!r} is {_type(msgs)}, expected a list of messages"
        out = []
        for m in msgs:
            if not isinstance(m, dict):
                return None, f"a message in {src.messages_field!r} is {_type(m)}, expected an object"
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            role = _ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
            if role not in ROLE_TOKENS:
                return None, f"message role {role!r} is not one of system/user/assistant"
            if not isinstance(content, str):
                return None, f"message content is {_type(content)}, expected a string"
            out.append((role, content))
    elif src.prompt_field in record or src.response_field in record:
        prompt, response = record.get(src.prompt_field), record.get(src.response_field)
        for name, value in ((src.prompt_field, prompt), (src.response_field, response)):
            if not isinstance(value, str):
                return None, f"field {name!r} is {_type(value)}, expected a string"
        out = []
        if src.system_field and isinstance(record.get(src.system_field), str) and record[src.system_field]:
            out.append(("system", record[src.system_field]))
        out += [("user", prompt), ("assistant", response)]
    else:
        return None, f"missing field {src.messages_field!r} (or {src.prompt_field!r}/{src.response_field!r})"
    if not any(r == "assistant" and c.strip() for r, c in out):
        return None, "no non-empty assistant message"
    return out, None


def dumps(messages: list[tuple[str, str]]) -> str:
    return json.dumps(messages, ensure_ascii=False)


def loads(text: str) -> list[tuple[str, str]]:
    return [tuple(m) for m in json.loads(text)]


def content_bytes(messages: list[tuple[str, str]]) -> int:
    return sum(len(c.encode("utf-8")) for _, c in messages)


def encode_chats(tok, chats: list[list[tuple[str, str]]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids and target masks of each rendered example (contents encoded in one batch call)."""
    ids_of = {role: tok.token_to_id(t) for role, t in ROLE_TOKENS.items()}
    end = tok.token_to_id(END_TURN)
    contents = [c for chat in chats for _, c in chat]
    encoded = encode_text(tok, contents)
    out, i = [], 0
    for chat in chats:
        ids, mask = [], []
        for role, _ in chat:
            piece = encoded[i]
            i += 1
            target = 1 if role == "assistant" else 0
            ids.append(ids_of[role])
            mask.append(0)
            ids.extend(piece)
            mask.extend([target] * len(piece))
            ids.append(end)
            mask.append(target)
        out.append((np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=np.int8)))
    return out


def prompt_ids(tok, messages: list[tuple[str, str]]) -> list[int]:
    """Ids of a generation prompt: the messages, then the assistant marker (markers from structure)."""
    [(ids, _)] = encode_chats(tok, [messages])
    return ids.tolist() + [tok.token_to_id(ASSISTANT)]
