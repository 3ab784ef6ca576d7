"""An instruction set built offline and deterministically from what the machine holds.

Task families (the "family" of each Conversation):
    math-KIND          the math generator's problems (data/math_problems.py), one family per
                       template; the response is the worked solution and "Answer: ..."
    python-explain     "What does json.dumps do?" -> the docstring's first paragraph
    python-signature   "Write the call signature of json.dumps." -> json.dumps(obj, *, ...)
    chat-TOPIC         chatterbot-corpus English conversations, turns as user / assistant
HELD_OUT families are kept out of training entirely and only evaluated: two math
templates (their answers are checkable by exact match), the signature task, and two chat
topics. The same arguments give the same conversations, in the same order.
"""

from __future__ import annotations

import importlib
import inspect
import random
from pathlib import Path

from ..data import generate_problems
from ..data.corpus import _load_yaml
from .chat import Conversation

HELD_OUT = ("math-division", "math-percent", "python-signature", "chat-food", "chat-history")
STDLIB_MODULES = ("json", "textwrap", "string", "shutil", "os.path", "statistics", "fnmatch",
                  "base64", "difflib", "heapq", "bisect", "calendar", "html", "glob")  # fmt: skip
_MATH_ASKS = (
    "{q}",
    "Solve this and show your working: {q}",
    "Work it out step by step. {q}",
    "Please help with this problem: {q}",
)


def math_conversations(num_problems: int, seed: int) -> list[Conversation]:
    """Generated problems as instructions; the response ends with the checkable answer."""
    rng = random.Random(seed)
    conversations = []
    for i, problem in enumerate(generate_problems(num_problems, seed=seed)):
        ask = rng.choice(_MATH_ASKS).format(q=problem.question)
        answer = f"{problem.solution}\nAnswer: {problem.answer}"
        conversations.append(_pair(ask, answer, f"math-{problem.kind}", f"math#{i}"))
    return conversations


def math_answer(response: str) -> str | None:
    """The final answer in a math response ("Answer: 42" -> "42"), or None."""
    marker = "Answer:"
    if marker not in response:
        return None
    lines = response.rsplit(marker, 1)[1].strip().splitlines()
    return lines[0].strip() if lines else ""


def python_conversations(modules: tuple[str, ...] = STDLIB_MODULES) -> list[Conversation]:
    """Public documented functions of standard-library modules as explain / signature tasks."""
    conversations = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in sorted(vars(module)):
            function = getattr(module, name)
            if name.startswith("_") or not inspect.isfunction(function):
                continue
            if function.__module__ != module.__name__ or not function.__doc__:
                continue
            qualified = f"{module_name}.{name}"
            summary = inspect.cleandoc(function.__doc__).split("\n\n")[0].strip()
            if summary:
                ask = f"What does the Python function {qualified} do?"
                conversations.append(_pair(ask, summary, "python-explain", qualified))
            try:
                signature = f"{qualified}{inspect.signature(function)}"
            except (TypeError, ValueError):
                continue
            if " at 0x" in signature:  # a default printed with its address: not reproducible
                continue
            ask = f"Write the call signature of the Python function {qualified}."
            conversations.append(_pair(ask, signature, "python-signature", qualified))
    return conversations


def chat_conversations() -> list[Conversation]:
    """chatterbot-corpus English conversations of two or more turns, by topic."""
    import chatterbot_corpus

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    conversations = []
    for file in sorted(folder.glob("*.yml")):
        for i, turns in enumerate(_load_yaml(file).get("conversations") or []):
            if not isinstance(turns, list) or len(turns) < 2:
                continue
            turns = [str(t).strip() for t in turns][: len(turns) // 2 * 2]
            if not all(turns):
                continue
            messages = [
                {"role": ("user", "assistant")[k % 2], "content": text}
                for k, text in enumerate(turns)
            ]
            conversations.append(Conversation(messages, f"chat-{file.stem}", f"{file.stem}#{i}"))
    return conversations


def build_instructions(
    num_math: int = 2000, seed: int = 1
) -> tuple[list[Conversation], list[Conversation]]:
    """(training conversations, held-out conversations), shuffled by seed.

    Args:
        num_math: math problems generated (spread over the templates).
        seed: the math generator's and the shuffle's seed; the default corpus's math uses
            seed 0, so the default problems here are not the pretraining text's.
    """
    everything = math_conversations(num_math, seed) + python_conversations()
    everything += chat_conversations()
    random.Random(seed).shuffle(everything)
    train = [c for c in everything if c.family not in HELD_OUT]
    held_out = [c for c in everything if c.family in HELD_OUT]
    return train, held_out


def _pair(prompt: str, response: str, family: str, source: str) -> Conversation:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return Conversation(messages, family, source)
