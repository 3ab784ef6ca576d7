"""Docstrings as prose: cut out of Python source with `ast`, never by importing it.

The default corpus reads each standard-library module once: its docstrings become prose
documents and the rest of its source becomes code, so no text is in both domains. The
held-out corpus reads only the docstrings of installed packages.

A docstring entry is written the way `help()` shows it: the qualified name on one line,
then the cleaned docstring indented by four spaces.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import warnings
from dataclasses import dataclass

_DEFINITIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
# Statement fields that hold nested statements (if/for/while/try/with/match bodies).
_BODIES = ("body", "orelse", "finalbody", "handlers", "cases")


@dataclass(frozen=True)
class Docstring:
    """One docstring: the qualified name it documents and its cleaned text."""

    name: str
    text: str

    def entry(self) -> str:
        """The docstring as help() shows it: name, then the text indented by four spaces."""
        return f"{self.name}\n{textwrap.indent(self.text, '    ')}\n"


def parse_source(source: str) -> ast.Module | None:
    """Parse Python source without importing it; None when it is not valid Python here."""
    try:
        with warnings.catch_warnings():
            # Third-party files hold invalid escape sequences and the like; they still parse.
            warnings.simplefilter("ignore")
            return ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes in the source
        return None


def split_docstrings(source: str, module: str) -> tuple[str, list[Docstring], list[str]]:
    """Cut the module, class and function docstrings out of Python source.

    A docstring that shares a line with other code stays in the source, so the source
    that comes back and the docstrings cut out never hold the same text. A body that
    held only its docstring gets `pass` in its place, so the rest still parses.

    Args:
        source: the text of a .py file (valid Python).
        module: the module's dotted name, the prefix of every qualified name.

    Returns:
        (the source without the cut docstrings, the cut docstrings in source order, the
        texts of the docstrings left in the source).
    """
    tree = parse_source(source)
    if tree is None:
        raise ValueError(f"module {module!r} is not valid Python")
    # ast counts lines at "\n" only; str.splitlines would also break at form feeds.
    lines = source.split("\n")
    replacements: dict[int, str] = {}  # first line (0-based) -> the line written instead
    removed: set[int] = set()
    cut, kept = [], []
    for name, owner in _documented(tree, module):
        node = owner.body[0]
        text = inspect.cleandoc(node.value.value)
        if not _whole_lines(lines, node):
            kept.append(text)
            continue
        cut.append(Docstring(name, text))
        removed.update(range(node.lineno - 1, node.end_lineno))
        if len(owner.body) == 1 and not isinstance(owner, ast.Module):
            replacements[node.lineno - 1] = " " * node.col_offset + "pass"
    code = [replacements.get(i, line) for i, line in enumerate(lines)
            if i not in removed or i in replacements]  # fmt: skip
    return "\n".join(code), cut, kept


def module_docstrings(source: str, module: str) -> list[Docstring]:
    """The docstrings of Python source (all of them, also those sharing a line with code).

    Returns:
        The docstrings in source order; [] when the source does not parse.
    """
    tree = parse_source(source)
    if tree is None:
        return []
    return [
        Docstring(name, inspect.cleandoc(owner.body[0].value.value))
        for name, owner in _documented(tree, module)
    ]


def _documented(tree: ast.Module, module: str) -> list[tuple[str, ast.AST]]:
    """(qualified name, node) of the module and every class or function with a docstring."""
    found = []
    if _has_docstring(tree):
        found.append((module, tree))

    def visit(statements: list, prefix: str) -> None:
        for statement in statements:
            if isinstance(statement, _DEFINITIONS):
                name = f"{prefix}.{statement.name}"
                if _has_docstring(statement):
                    found.append((name, statement))
                visit(statement.body, name)
                continue
            for field in _BODIES:
                nested = getattr(statement, field, None)
                if isinstance(nested, list):
                    visit(nested, prefix)

    visit(tree.body, module)
    return found


def _has_docstring(node) -> bool:
    body = getattr(node, "body", None)
    if not isinstance(body, list) or not body or not isinstance(body[0], ast.Expr):
        return False
    value = body[0].value
    return isinstance(value, ast.Constant) and isinstance(value.value, str)


def _whole_lines(lines: list[str], node: ast.Expr) -> bool:
    """Whether the docstring alone fills its lines (only blanks before and after it)."""
    # Column offsets count UTF-8 bytes, not characters.
    before = lines[node.lineno - 1].encode("utf-8")[: node.col_offset]
    after = lines[node.end_lineno - 1].encode("utf-8")[node.end_col_offset :]
    return not before.strip() and not after.strip()


def chunk_entries(entries: list[str], chunk_chars: int) -> list[str]:
    """Join entries into chunks of whole entries, each just past chunk_chars."""
    chunks, current, current_chars = [], [], 0
    for entry in entries:
        if current and current_chars >= chunk_chars:
            chunks.append("\n".join(current))
            current, current_chars = [], 0
        current.append(entry)
        current_chars += len(entry) + 1
    if current:
        chunks.append("\n".join(current))
    return chunks
