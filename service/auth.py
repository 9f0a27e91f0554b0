"""API keys with roles: who may score, for which tenants, and who may change models.

The key file holds only SHA-256 digests of keys (keys are 256-bit random strings, so a fast
hash is enough; no salt or KDF is needed against guessing). A presented key is hashed and
compared with every stored digest in constant time. Keys are never logged; the key's name is
what audit lines and errors show.

    {"keys": [{"name": "ad-server", "sha256": "<hex>", "roles": ["scorer"], "tenants": ["acme"]},
              {"name": "ml-oncall", "sha256": "<hex>", "roles": ["admin"]}]}
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import Forbidden, Unauthorized

logger = logging.getLogger("adscore.auth")

KEY_PREFIX = "adsk_"
Role = Literal["scorer", "admin"]


class AuthConfigError(Exception):
    """The key file is missing or malformed."""


class StoredKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    roles: list[Role] = Field(min_length=1)
    tenants: list[str] | None = None
    """Tenants a scorer key may score for; None: any tenant and the default model."""


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[StoredKey] = Field(default_factory=list)


@dataclass(frozen=True)
class Principal:
    """Who made a request, as far as the key says."""

    name: str
    roles: frozenset[str]
    tenants: frozenset[str] | None = None

    def require(self, role: Role) -> None:
        if role not in self.roles:
            raise Forbidden(f"key {self.name!r} lacks the role {role!r}")

    def require_tenant(self, tenant: str | None) -> None:
        if self.tenants is None:
            return
        if tenant is None or tenant not in self.tenants:
            asked = "the default model" if tenant is None else f"tenant {tenant!r}"
            raise Forbidden(f"key {self.name!r} may not score for {asked}")


ANONYMOUS = Principal("anonymous (auth off)", frozenset({"scorer", "admin"}))


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_key_file(path: Path) -> KeyFile:
    try:
        return KeyFile.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise AuthConfigError(f"API key file {path} does not exist") from None
    except ValidationError as exc:
        raise AuthConfigError(f"{path}: not a valid API key file: {exc}") from None


def add_key(path: Path, name: str, roles: list[Role], tenants: list[str] | None) -> str:
    """Create a key, store its digest in `path` (created if absent) and return the key."""
    keys = read_key_file(path) if path.exists() else KeyFile()
    if any(k.name == name for k in keys.keys):
        raise AuthConfigError(f"{path} already holds a key named {name!r}")
    key = new_key()
    keys.keys.append(StoredKey(name=name, sha256=key_digest(key), roles=roles, tenants=tenants))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0o600
    with os.fdopen(fd, "w") as out:
        out.write(keys.model_dump_json(indent=2, exclude_none=True) + "\n")
    os.replace(tmp, path)
    return key


class KeyRing:
    """The API keys of a running service; re-read when the key file changes."""

    def __init__(self, path: Path | None, *, enabled: bool) -> None:
        if enabled and path is None:
            raise AuthConfigError(
                "authentication is on but no API key file is set: set ADSCORE_API_KEYS_FILE "
                "(create keys with `adscore keys create`), or ADSCORE_AUTH_ENABLED=false for a "
                "local demo"
            )
        self.enabled = enabled
        self._path = path
        self._keys: list[tuple[bytes, Principal]] = []
        self._signature: tuple[int, ...] | None = None
        if enabled:
            self.reload_if_changed(strict=True)

    def reload_if_changed(self, *, strict: bool = False) -> bool:
        """Re-read the key file if its size or mtime changed; a bad file keeps the old keys."""
        if not self.enabled or self._path is None:
            return False
        try:
            stat = self._path.stat()
            # A mounted Kubernetes secret changes by swapping a symlink: the inode changes.
            signature = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
            if signature == self._signature:
                return False
            keys = read_key_file(self._path)
        except FileNotFoundError:
            message = f"API key file {self._path} does not exist"
            if strict:
                raise AuthConfigError(message) from None
            logger.error("keeping the current API keys: %s", message)
            return False
        except (OSError, AuthConfigError) as exc:
            if strict:
                raise AuthConfigError(str(exc)) from None
            logger.error("keeping the current API keys: %s", exc)
            return False
        self._keys = [
            (
                bytes.fromhex(k.sha256),
                Principal(
                    k.name, frozenset(k.roles), None if k.tenants is None else frozenset(k.tenants)
                ),
            )
            for k in keys.keys
        ]
        self._signature = signature
        logger.info("loaded %d API keys from %s", len(self._keys), self._path)
        return True

    def authenticate(self, presented: str | None) -> Principal:
        if not self.enabled:
            return ANONYMOUS
        if not presented:
            raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        for stored, principal in self._keys:  # no early exit: time does not depend on the match
            if hmac.compare_digest(digest, stored):
                found = principal
        if found is None:
            raise Unauthorized("the API key is not valid")
        return found


def presented_key(authorization: str | None, api_key_header: str | None) -> str | None:
    """The key from 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."""
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        return credentials.strip()
    return api_key_header
