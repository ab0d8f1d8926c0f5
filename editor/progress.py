"""Progress callbacks and cancellation, shared by every long-running verb.

A callback is ``callback(done, total) -> bool | None``; returning ``False`` cancels the
run, which raises :class:`Cancelled` (nothing is returned, nothing half-made is kept).
"""

from __future__ import annotations

from collections.abc import Callable

Callback = Callable[[int, int], "bool | None"]


class Cancelled(RuntimeError):
    """Raised when a progress callback returned ``False`` (an inversion or an edit stopped)."""


#: Older names, kept as aliases of the one exception.
InversionCancelled = Cancelled
EditCancelled = Cancelled


class StepHook:
    """``hook(done)`` calls ``callback(done, total)`` and raises :class:`Cancelled` on ``False``."""

    def __init__(self, callback: Callback | None, total: int, what: str) -> None:
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        self.callback, self.total, self.what = callback, int(total), what

    def __call__(self, done: int) -> None:
        if self.callback is not None and self.callback(done, self.total) is False:
            raise Cancelled(f"{self.what} cancelled after {done} of {self.total} steps")


def quiet_libraries() -> None:
    """Keep diffusers/transformers to errors only and hide their loading bars (a face's
    output should be its own lines; the sampling progress bars the engine owns stay)."""
    import warnings

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"diffusers\..*")
