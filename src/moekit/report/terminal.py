"""Token colouring for the terminal: each token on the background of its top-1 expert.

The colours are the report's (`expert_colour`) as 24-bit ANSI colours: the 256-colour
palette has too few light shades to keep 16 experts apart. Without colour, each token is
followed by its expert id in brackets. Newlines and tabs show as visible marks so one layer stays on
one line.
"""

from __future__ import annotations

import colorsys
import re

from .routing import TokenRouting

VISIBLE = str.maketrans({"\n": "⏎", "\t": "⇥", "\r": "␍"})
RESET = "\x1b[0m"


def expert_rgb(expert: int, num_experts: int) -> tuple[int, int, int]:
    """The report's colour of an expert as 0-255 RGB."""
    from .html import expert_colour

    hue, saturation, lightness = map(
        float, re.findall(r"[\d.]+", expert_colour(expert, num_experts))
    )
    r, g, b = colorsys.hls_to_rgb(hue / 360, lightness / 100, saturation / 100)
    return round(r * 255), round(g * 255), round(b * 255)


def _paint(text: str, expert: int, num_experts: int) -> str:
    r, g, b = expert_rgb(expert, num_experts)
    return f"\x1b[30;48;2;{r};{g};{b}m{text}{RESET}"


def format_routing(
    routing: TokenRouting,
    num_experts: int,
    *,
    colour: bool,
    layers: list[int] | None = None,
) -> str:
    """A legend, then one line per MoE layer (or per chosen layer) of coloured tokens.

    Args:
        routing: the routed text.
        num_experts: experts per layer (for the colours).
        colour: ANSI colours; False gives `token[expert]`.
        layers: model layer indices to show (None = every MoE layer).
    """
    shown = routing.layers if layers is None else layers
    lines = []
    if colour:
        lines.append(
            "experts: " + " ".join(_paint(f" {e} ", e, num_experts) for e in range(num_experts))
        )
    for layer in shown:
        position = routing.layers.index(layer)
        top1_T = routing.top1(position)
        tokens = []
        for piece, expert in zip(routing.pieces, top1_T):
            text = piece.translate(VISIBLE)
            tokens.append(_paint(text, int(expert), num_experts) if colour else f"{text}[{expert}]")
        lines.append(f"layer {layer}: " + "".join(tokens))
    return "\n".join(lines)
