"""The error every check before a run raises: a spec (or an argument) that cannot run. It lives
below ``config`` and ``storage`` so that both can raise it (config reads spec files through
storage, storage checks the places a spec names)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A spec that cannot run. The message names the key and says how to fix it."""


__all__ = ["ConfigError"]
