"""Logging set-up shared by every workflow script."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def log_to(path: str | Path | None, level: int = logging.INFO) -> logging.Logger:
    """Send the ``ehrcxr`` logger (and uncaught errors) to ``path`` and to stderr."""
    logger = logging.getLogger("ehrcxr")
    logger.setLevel(level)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)

    def _excepthook(exc_type, exc, tb):
        logger.error("uncaught error", exc_info=(exc_type, exc, tb))
        sys.__excepthook__(exc_type, exc, tb)

    sys.excepthook = _excepthook
    return logger
