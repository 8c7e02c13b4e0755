"""Fail a test when *our* code calls something deprecated, whichever library emits the warning.

pytest's `filterwarnings = error:::illume` only catches warnings attributed to our modules, but a library's
deprecation is attributed to its own wrapper: transformers' `past_key_values` warning names
`transformers/utils/generic.py`, and its deprecated output attributes only log through `logger.warning_once`.
So this guard looks at the call stack when a deprecation is raised or logged: it steps out of the emitting
module and of pure call plumbing (decorators, `nn.Module.__call__`, logging) and asks who called. If that
caller is ours (illume, reward, policies, tests, scripts), the test fails at the call site; a deprecation
that one library triggers inside another (PEFT reading a deprecated transformers property) is left alone,
since we cannot fix it. `tests/test_deprecation_guard.py` checks both sides.
"""

from __future__ import annotations

import logging
import sys
import warnings
from types import FrameType

OUR_PACKAGES = ("illume", "reward", "policies", "tests", "scripts")
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# Between a deprecation notice and the function that issued it: warnings/logging machinery.
NOTICE_MACHINERY = ("warnings", "logging", "functools", "transformers.utils.logging", "tests.deprecation_guard")
# Between the function that issued it and its caller: modules that only forward a call (decorators, module
# dispatch). Never the caller we look for.
CALL_PLUMBING = ("functools", "contextlib", "torch.nn.modules.module", "torch.utils._contextlib",
                 "transformers.utils.generic", "transformers.utils.deprecation",
                 "transformers.utils.output_capturing")


class OurDeprecationError(Exception):
    """Our code called a deprecated API."""


def _module(frame: FrameType) -> str:
    return frame.f_globals.get("__name__", "")


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def deprecated_call_site(frame: FrameType | None) -> str | None:
    """`file:line` of our code that made the deprecated call noticed at `frame`, else None.

    The emitter is the first frame outside the warnings/logging machinery (the function that warned or
    logged, e.g. transformers' `deprecate_kwarg` wrapper); the caller is the first frame after it that is in
    neither the emitter's module nor the call plumbing."""
    while frame is not None and _in(_module(frame), NOTICE_MACHINERY):
        frame = frame.f_back
    if frame is None:
        return None
    emitter = _module(frame)
    while frame is not None and (_module(frame) == emitter or _in(_module(frame), CALL_PLUMBING)):
        frame = frame.f_back
    if frame is None or not _in(_module(frame), OUR_PACKAGES):
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class _LoggedDeprecations(logging.Handler):
    """Raises on a library's logged deprecation notice when our code made the call. A handler on the
    library's root logger sees its modules' records too (a logger's own filters would not); it runs inside the
    logging call, so the deprecated call is still on the stack."""

    def __init__(self):
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        if "deprecat" in record.getMessage().lower():
            site = deprecated_call_site(sys._getframe(1))
            if site is not None:
                raise OurDeprecationError(f"{site} calls a deprecated API: {record.getMessage()}")


class DeprecationGuard:
    """Install for one test with `start()`, remove with `stop()` (the conftest fixture does both)."""

    def __init__(self, loggers: tuple[str, ...] = ("transformers", "peft", "trl", "accelerate", "datasets")):
        self.loggers = [logging.getLogger(name) for name in loggers]
        self.handler = _LoggedDeprecations()
        self._showwarning = None

    def start(self) -> None:
        # `showwarning` runs inside the `warnings.warn` call, so the deprecated call is still on the stack.
        previous = self._showwarning = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DEPRECATIONS):
                site = deprecated_call_site(sys._getframe(1))
                if site is not None:
                    raise OurDeprecationError(f"{site} calls a deprecated API: {message}")
            previous(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        # Every time, not once per place, so each test's calls are seen (appended: explicit filters still win;
        # pytest already shows every DeprecationWarning).
        warnings.simplefilter("always", FutureWarning, append=True)
        for logger in self.loggers:
            logger.addHandler(self.handler)

    def stop(self) -> None:
        warnings.showwarning = self._showwarning
        for logger in self.loggers:
            logger.removeHandler(self.handler)
