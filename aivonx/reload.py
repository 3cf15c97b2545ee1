"""SIGHUP: re-read the settings and apply those that can change while
running (settings.RELOADABLE); name the others, which wait for a restart."""
from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from . import logs
from .settings import RELOADABLE, Settings, parse_settings

log = logging.getLogger("aivonx")


def reload_settings(current: Settings, argv: Sequence[str]) -> list[str]:
    """Apply the reloadable settings of a fresh parse to `current` in place;
    returns the names of those that changed."""
    try:
        fresh = parse_settings(argv)
    except SystemExit:  # argparse has said why on stderr
        log.error("reload failed: the settings are not valid; keeping the running ones")
        return []
    changed = [name for name in RELOADABLE if getattr(fresh, name) != getattr(current, name)]
    for name in changed:
        setattr(current, name, getattr(fresh, name))
    logs.configure(current.log_level, current.log_format)
    pending = [f.name for f in dataclasses.fields(Settings)
               if f.name not in RELOADABLE and getattr(fresh, f.name) != getattr(current, f.name)]
    log.info("reloaded settings: %s", ", ".join(f"{name}={getattr(current, name)}"
                                                for name in changed) or "nothing changed")
    if pending:
        log.warning("changed, applied only after a restart: %s", ", ".join(pending))
    return changed
