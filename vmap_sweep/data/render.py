"""Conversations -> token ids and supervision mask, exactly as nanochat's SFT renders them.

<|bos|>(0); user: <|user_start|>(0) content(0) <|user_end|>(0);
assistant: <|assistant_start|>(0) content(1) <|assistant_end|>(1). A leading system message is merged
into the first user message as system + "\\n\\n" + user. Mask 1 = the model is trained to predict it.
"""

from __future__ import annotations

from vmap_sweep.errors import DataError
from vmap_sweep.model.tokenizer import Tokenizer


def _where(index: int | None, source: str | None) -> str:
    src = source or "conversations"
    return f"{src} row {index}" if index is not None else src


def validate_conversation(conversation: object, index: int | None = None, source: str | None = None) -> list[dict]:
    """The conversation's messages after merging a leading system message; DataError if malformed.

    `index` and `source` only name the row in the error message.
    """
    where = _where(index, source)
    if not isinstance(conversation, dict) or "messages" not in conversation:
        raise DataError(f"{where}: no `messages` field; each row must be {{\"messages\": [{{role, content}}, ...]}}")
    messages = conversation["messages"]
    if not isinstance(messages, list | tuple):
        raise DataError(f"{where}: `messages` is a {type(messages).__name__}, not a list of {{role, content}}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: message {k} lacks `role` or `content`; each message needs both")
        for field in ("role", "content"):
            if not isinstance(m[field], str):
                raise DataError(f"{where}: message {k} {field} is a {type(m[field]).__name__}, not a string")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON) is no character of any text
            raise DataError(f"{where}: message {k} content holds {m['content'][e.start:e.end]!r}, a lone UTF-16 "
                            "surrogate that is not text; fix the escape in the file") from None
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise DataError(f"{where}: a system message must be followed by a user message")
        merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [merged] + messages[2:]
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(
                f"{where}: message {k} has role {m['role']!r}, expected {expected!r}; "
                "roles must alternate user/assistant starting with user (after an optional system message)"
            )
    if len(messages) < 2:
        raise DataError(f"{where}: no assistant turn, so nothing to train on")
    return messages


def render_conversation(
    tokenizer: Tokenizer,
    conversation: dict,
    max_len: int | None = None,
    *,
    index: int | None = None,
    source: str | None = None,
) -> tuple[list[int], list[int]]:
    """(ids, mask) of one conversation, truncated to max_len tokens."""
    messages = validate_conversation(conversation, index, source)
    sp = tokenizer.special_id
    ids, mask = [tokenizer.bos_id], [0]

    def add(tokens: list[int], m: int) -> None:
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    for m in messages:
        content = tokenizer.encode(m["content"])
        if m["role"] == "user":
            add([sp("<|user_start|>")] + content + [sp("<|user_end|>")], 0)
        else:
            add([sp("<|assistant_start|>")], 0)
            add(content + [sp("<|assistant_end|>")], 1)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask
