"""The metrics' settings read from the environment, checked as the proxy checks them.

Used where no :class:`~trioproxy.config.Settings` is at hand: the process collector of
the monitoring guide's API (created on first use) and a collector created without its
health thresholds.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger("trioproxy.metrics")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    log.warning("metrics: ignoring invalid %s=%r (expected true/false)", name, raw)
    return default


def env_number(name: str, default: float, *, integer: bool = False, minimum: float = 0.0) -> Any:
    """A setting from the environment, checked as the proxy checks it (its range too:
    ``METRICS_MAX_REQUESTS=5000000`` is refused there, so here it is ignored with a
    warning, not taken); the default when it is unset or invalid."""
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < minimum or not _in_range(name, raw):
        log.warning("metrics: ignoring invalid %s=%r", name, raw)
        return default
    return value


def _in_range(name: str, raw: str) -> bool:
    from ..config import ConfigError, parse_setting  # the proxy's own rules for the setting

    try:
        parse_setting(name, raw)
    except ConfigError:
        return False
    except KeyError:  # not one of the proxy's settings: the checks above are all there is
        return True
    return True
