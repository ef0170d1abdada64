"""Dispatcher settings shared with `doctor`, read from the environment. A bad value gives one
warning and the default: a typo in an environment variable must not break every call."""

from __future__ import annotations

import logging
import os

SETTLE_MARGIN_ENV = "COMFY_ENV_ATTN_SETTLE_MARGIN"
SETTLE_MARGIN_DEFAULT = 0.08
_warned: set[str] = set()


def settle_margin() -> float:
    """Backends whose lock throughputs are this close are timed on the real input at first
    use (a fraction, 0 to 1)."""
    raw = os.environ.get(SETTLE_MARGIN_ENV)
    if raw is None:
        return SETTLE_MARGIN_DEFAULT
    try:
        value = float(raw)
        if not 0.0 <= value <= 1.0:
            raise ValueError
        return value
    except ValueError:
        if raw not in _warned:
            _warned.add(raw)
            logging.getLogger("comfy_env_attn").warning(
                "comfy-env-attn: %s=%r is not a fraction between 0 and 1; using %s",
                SETTLE_MARGIN_ENV, raw, SETTLE_MARGIN_DEFAULT)
        return SETTLE_MARGIN_DEFAULT
