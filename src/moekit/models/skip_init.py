"""Construct modules without running torch.nn.init's initialisers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

_INITIALISERS = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")


@contextlib.contextmanager
def skipped_initialisers() -> Iterator[None]:
    """Within the context the torch.nn.init initialisers leave tensors as they are.

    Two uses: a meta model has no values to set (and a meta normal_ imports torch._dynamo,
    which takes seconds); and modules built only to be initialised later (the decoder's
    MTP modules) must not draw from the global generator, so that the weights built before
    them and drawn by init_weights stay those of the same seed without them.
    """
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in _INITIALISERS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)
