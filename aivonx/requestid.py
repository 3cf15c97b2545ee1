"""Request ids: taken from a well-formed incoming X-Request-Id (so a
caller's id follows the request through its logs), else made from a
per-process random prefix and a counter, which costs well under a
microsecond, unlike uuid4."""
from __future__ import annotations

import itertools
import os
import re

HEADER = "X-Request-Id"
# Token characters only, bounded: the id lands in logs and a header.
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}")
_PREFIX = os.urandom(4).hex()
_counter = itertools.count(1)


def new_id() -> str:
    return f"{_PREFIX}-{next(_counter):x}"


def request_id(incoming: str | None) -> str:
    """The caller's id when it is well formed, a fresh one otherwise."""
    if incoming and _WELL_FORMED.fullmatch(incoming):
        return incoming
    return new_id()
