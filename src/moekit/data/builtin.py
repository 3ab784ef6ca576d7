"""The built-in corpora by name, as `--data builtin:NAME` spells them.

- builtin:default: the default corpus (corpus.py), also what no --data means.
- builtin:packages: the held-out corpus (package_corpus.py), installed packages' docs.
"""

from __future__ import annotations

from pathlib import Path

from moekit.data.corpus import Corpus, CorpusConfig, build_corpus
from moekit.data.package_corpus import PackageCorpusConfig, build_package_corpus

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = {"default": CorpusConfig, "packages": PackageCorpusConfig}


def builtin_corpus_name(data: str | Path | None) -> str | None:
    """Which built-in corpus `data` names: "default" for None, NAME for "builtin:NAME".

    Args:
        data: a --data value: None, "builtin:NAME", or a path.

    Returns:
        The corpus name, or None when data is a path.
    """
    if data is None:
        return "default"
    if not str(data).startswith(BUILTIN_PREFIX):
        return None
    name = str(data).removeprefix(BUILTIN_PREFIX)
    if name not in BUILTIN_CORPORA:
        choices = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
        raise ValueError(f"unknown built-in corpus {str(data)!r}; choose from {choices}")
    return name


def build_builtin_corpus(
    name: str,
    config: CorpusConfig | PackageCorpusConfig | None = None,
    cache_dir: str | Path | None = None,
) -> Corpus:
    """Build (or read from the cache) the built-in corpus called name.

    Args:
        name: "default" or "packages".
        config: that corpus's config (CorpusConfig, PackageCorpusConfig); None for its
            default.
        cache_dir: folder for cached corpora; None uses default_cache_dir().

    Returns:
        The corpus.
    """
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; choose from {list(BUILTIN_CORPORA)}")
    expected = BUILTIN_CORPORA[name]
    if config is not None and not isinstance(config, expected):
        raise ValueError(
            f"the {name!r} corpus takes a {expected.__name__}, got a {type(config).__name__}"
        )
    if name == "packages":
        return build_package_corpus(cache_dir, config)
    return build_corpus(cache_dir, config)
