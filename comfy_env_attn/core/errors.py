"""Error kinds. The CLI turns these into one line on stderr: UsageError exits 2, the rest 1."""

from __future__ import annotations


class AttnError(Exception):
    """A failure the message explains; no traceback unless -v."""


class UsageError(AttnError):
    """Bad command-line usage or an unknown name."""


class ProfileError(AttnError):
    """A malformed System profile or config TOML."""


class IndexFetchError(AttnError):
    """An index that cannot be reached or answers something that is not an index."""


class ProbeError(AttnError):
    """The target interpreter cannot be found or does not run."""


class InstallError(AttnError):
    """An install step that failed; the target was restored."""
