"""Conversations: reading jsonl, the chat template, and the mask of the assistant tokens.

A line of the data is {"messages": [{"role": ..., "content": ...}, ...]} (roles system, user,
assistant) or {"prompt": ..., "response": ...}, optionally with a "family" (a task name,
used to group the evaluation). The chat template is a Jinja template, as transformers
keeps it in tokenizer_config.json's "chat_template" and renders it with
`apply_chat_template`: the same string here and in transformers.

The loss counts the assistant turns only: each turn's text from the end of the prompt that
asks for it (the template with add_generation_prompt) through its end-of-turn token. A
template must render a conversation as the concatenation of its turns (every prefix of the
messages renders to a prefix of the text) and must end each assistant turn with the
tokenizer's end token; otherwise the model could not learn where to stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..data import Tokenizer

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the targets cross entropy skips (prompt tokens and padding)

# Turns as "<|role|>\n" + content + end token + "\n"; a generation prompt is "<|assistant|>\n".
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass
class Conversation:
    """One example: its messages, task family and where it came from ("file.jsonl:12")."""

    messages: list[dict[str, str]]
    family: str = "data"
    source: str = ""


@dataclass
class Encoded:
    """A tokenised conversation: ids, and which of them are assistant tokens (trained)."""

    ids: list[int]
    trained: list[bool]
    family: str = "data"
    truncated: bool = False
    spans: list[tuple[int, int]] = field(default_factory=list)


def read_conversations(path: str | Path) -> list[Conversation]:
    """The conversations of a jsonl file; ValueError naming the first bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read --data {str(path)!r}: {error}") from None
    conversations = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            conversations.append(parse_line(line, f"{path}:{number}"))
    if not conversations:
        raise ValueError(f"--data {str(path)!r} holds no examples")
    return conversations


def parse_line(line: str, source: str) -> Conversation:
    """One jsonl line as a Conversation; ValueError naming source and the problem."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(record).__name__}")
    family = record.get("family", "data")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record and "response" in record:
        messages = [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]},
        ]
    else:
        raise ValueError(
            f'{source}: needs "messages", or "prompt" and "response"; found keys {sorted(record)}'
        )
    check_messages(messages, source)
    return Conversation(messages=messages, family=str(family), source=source)


def check_messages(messages, source: str) -> None:
    """ValueError (naming source) unless messages is a list of role/content strings with a
    non-empty assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{source}: messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"}:
            raise ValueError(f"{source}: message {i} must be {{'role': ..., 'content': ...}}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{source}: message {i} has role {role!r}; roles are {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{source}: message {i} content must be a string")
        if role == "assistant" and not content.strip():
            raise ValueError(f"{source}: message {i} is an empty response")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{source}: no assistant message to train on")


class ChatTemplate:
    """A Jinja chat template bound to a tokenizer's end token, rendered as transformers does.

    Args:
        source: the template text (DEFAULT_TEMPLATE unless the user gives one).
        tokenizer: the model's tokenizer; eos_token is its document separator
            (Tokenizer.eos_token: <|endoftext|> for moekit's own, a converted checkpoint's
            eos_token otherwise).
    Raises:
        ValueError: a template that does not parse.

    The template renders with bos_token "" and, when the tokenizer starts text with a bos
    token (Tokenizer.add_bos, a Llama-style checkpoint), encode puts it first, as the
    tokenizer does with any text: one bos, whether or not a template writes bos_token.
    """

    def __init__(self, source: str, tokenizer: Tokenizer):
        # transformers' settings: trim_blocks and lstrip_blocks, a sandbox.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template does not parse: {error}") from None
        self.source, self.tokenizer = source, tokenizer
        self.eos_token = tokenizer.eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                eos_token=self.eos_token,
                bos_token="",
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"the chat template fails to render: {error}") from None

    def assistant_spans(self, messages: list[dict], source: str = "") -> list[tuple[int, int]]:
        """(start, end) characters of each assistant turn in render(messages).

        Raises:
            ValueError: the template renders turns out of order, or an assistant turn lacks
                the tokenizer's end token.
        """
        text, spans = self.render(messages), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise ValueError(
                    f"{source}: the chat template does not render a conversation turn by turn "
                    "(a prefix of the messages must render to a prefix of the text)"
                )
            turn = upto[len(prompt) :]
            end = turn.rfind(self.eos_token)
            if end < 0:
                raise ValueError(
                    f"the chat template does not fit the tokenizer: an assistant turn does not "
                    f"end with the tokenizer's end token {self.eos_token!r}"
                )
            spans.append((len(prompt), len(prompt) + end + len(self.eos_token)))
        return spans

    def encode(self, conversation: Conversation, max_tokens: int) -> Encoded:
        """Token ids of the rendered conversation and the trained mask (assistant tokens).

        A token is trained when it starts inside an assistant span. Longer conversations are
        cut to max_tokens (truncated=True).
        """
        text = self.render(conversation.messages)
        spans = self.assistant_spans(conversation.messages, conversation.source)
        ids, starts = encode_with_offsets(self.tokenizer, text, self.eos_token)
        trained = [any(a <= s < b for a, b in spans) for s in starts]
        if self.tokenizer.add_bos:
            ids, trained = [self.tokenizer.bos_id, *ids], [False, *trained]
        truncated = len(ids) > max_tokens
        return Encoded(
            ids=ids[:max_tokens],
            trained=trained[:max_tokens],
            family=conversation.family,
            truncated=truncated,
            spans=spans,
        )


def encode_with_offsets(tokenizer: Tokenizer, text: str, special: str) -> tuple[list, list]:
    """Token ids of text with `special` as its one token (as transformers' tokenizer splits
    special tokens out), and each token's start character."""
    special_id = tokenizer.backend.token_to_id(special)
    ids, starts, offset = [], [], 0
    for n, piece in enumerate(text.split(special)):
        if n:
            ids.append(special_id)
            starts.append(offset - len(special))
        encoding = tokenizer.backend.encode(piece, add_special_tokens=False)
        ids += encoding.ids
        starts += [offset + a for a, _ in encoding.offsets]
        offset += len(piece) + len(special)
    return ids, starts


def tokenizer_config(template: str, tokenizer: Tokenizer) -> dict:
    """tokenizer_config.json for transformers: the chat template and the special tokens."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.token(tokenizer.special.pad_id),
        "bos_token": tokenizer.token(tokenizer.bos_id),
        "add_bos_token": tokenizer.add_bos,
        "unk_token": None,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }


def _raise(message: str):
    raise jinja2.TemplateError(message)
