"""One structured log line per change to what serves: who, what, when, from -> to."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import orjson

from service.auth import Principal

audit_logger = logging.getLogger("adscore.audit")


def audit(who: Principal, action: str, target: str, before: object, after: object) -> None:
    """Log a change as JSON on the `adscore.audit` logger (never a key, only its name)."""
    line = {
        "audit": action,
        "who": who.name,
        "target": target,
        "from": before,
        "to": after,
        "at": datetime.now(UTC).isoformat(),
    }
    audit_logger.info(orjson.dumps(line).decode())
