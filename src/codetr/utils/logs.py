"""The run's log file: Hydra configures the root logger (console + ``<run dir>/<task>.log``) when the job
starts, but Lightning, imported earlier, gave its own loggers a console handler and stopped them from
propagating, so nothing of theirs reached the file. :func:`route_library_logs` hands them back to the root
logger; :func:`log_to_files` writes text (the metric tables, printed to the console with rich) to the log
files only."""

from __future__ import annotations

import logging

LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


def route_library_logs() -> None:
    """Makes Lightning's loggers propagate to the root logger (Hydra's console and file handlers) instead of
    their own console handler, once the root logger has handlers (otherwise nothing would print them)."""
    if not logging.getLogger().handlers:
        return
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # Lightning's console handler; file handlers stay
                logger.removeHandler(handler)
        logger.propagate = True


def log_to_files(text: str, name: str = "codetr") -> None:
    """Writes ``text`` as an INFO record of logger ``name`` to the root logger's file handlers only (the
    console already shows it)."""
    record = logging.getLogger(name).makeRecord(name, logging.INFO, __file__, 0, "%s", (text,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)
