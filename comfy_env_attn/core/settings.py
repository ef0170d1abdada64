"""Dispatcher settings shared with `doctor` (which must not import torch)."""

from __future__ import annotations

import os

# Backends whose lock throughputs are this close are timed on the real input at first use.
SETTLE_MARGIN = float(os.environ.get("COMFY_ENV_ATTN_SETTLE_MARGIN", "0.08"))
