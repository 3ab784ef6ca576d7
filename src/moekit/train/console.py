"""What a training job shows and hears on the terminal: progress bars (tqdm, stderr),
printed lines (stdout, above the bars), and Ctrl-C deferred to a step boundary."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


def discard_line(line: str) -> None:
    """A log that drops its lines (ranks other than 0 under torchrun)."""


@contextlib.contextmanager
def progress_bar(total: int, initial: int, enabled: bool):
    """The training progress bar (tqdm, in steps), shared by every trainer in moekit."""
    bar = open_progress_bar(total, initial, enabled)
    try:
        yield bar
    finally:
        bar.close()


def open_progress_bar(total: int, initial: int, enabled: bool, desc: str | None = None):
    """A tqdm bar in steps on stderr (close it when done)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        desc=desc,
    )


def print_line(line: str) -> None:
    """Print a line to stdout at once, above any open progress bars (they redraw below)."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


@contextlib.contextmanager
def deferred_interrupt():
    """Turn the first Ctrl-C into a flag checked between steps (a second one stops at once).

    A KeyboardInterrupt raised inside optimizer.step() could leave half-updated weights;
    deferring it to the step boundary keeps the saved checkpoint consistent.
    """
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
