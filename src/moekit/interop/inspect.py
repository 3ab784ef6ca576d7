"""`moekit inspect`'s report: an Accounting plus, for the published MoEs, their figures."""

from __future__ import annotations

from pathlib import Path

from .accounting import config_from_file, count_by_part
from .famous import FAMOUS, PUBLISHED


def inspect_target(target: str) -> dict:
    """The accounting of a published MoE, a moekit preset, or a config file, as a dict.

    Args:
        target: a name in famous.FAMOUS or models.PRESETS, or a path (run directory,
            moekit config.json, Hugging Face config.json).
    Returns:
        Accounting.as_dict() plus "kind" and, for a published MoE, "published" (its
        figures, their source and the relative error of the count against each).
    Raises:
        ValueError: an unknown name or an unreadable config.
    """
    from ..models import PRESETS

    if target in FAMOUS:
        report = FAMOUS[target]().as_dict() | {"kind": "published MoE"}
        report["published"] = _published(target, report)
        return report
    if target in PRESETS:
        return count_by_part(PRESETS[target](), target).as_dict() | {"kind": "moekit preset"}
    if Path(target).exists():
        config, kind = config_from_file(target)
        return count_by_part(config, str(target)).as_dict() | {"kind": kind}
    raise ValueError(
        f"{target!r} is not a preset ({', '.join([*FAMOUS, *PRESETS])}) nor an existing path"
    )


def _published(name: str, report: dict) -> dict:
    figures = PUBLISHED[name]
    active = report[
        "active_without_input_embedding" if figures.active_without_input_embedding else "active"
    ]
    out = {
        "total": figures.total,
        "active": figures.active,
        "source": figures.source,
        "active_without_input_embedding": figures.active_without_input_embedding,
    }
    if figures.total is not None:
        out["total_error"] = report["total"] / figures.total - 1
    if figures.active is not None:
        out["active_error"] = active / figures.active - 1
    return out
