"""Routing traces: record which experts every token took (moekit or transformers), diff
two engines' traces, and replay a trace into a forward or a training step.

docs/traces.md describes the format, the API and the command (`moekit routing`).
"""

from .diff import LayerDiff, TraceDiff, diff_traces
from .format import ModelIdentity, Trace, load_trace, save_trace
from .record import Recorder, record_routing
from .replay import MODES, ReplayBatch, check_trace, padded_batch, replay_routing, replay_rows

__all__ = [
    "MODES",
    "LayerDiff",
    "ModelIdentity",
    "Recorder",
    "ReplayBatch",
    "Trace",
    "TraceDiff",
    "check_trace",
    "diff_traces",
    "load_trace",
    "padded_batch",
    "record_routing",
    "replay_routing",
    "replay_rows",
    "save_trace",
]
