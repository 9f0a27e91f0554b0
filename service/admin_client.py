"""A small HTTP client of the models API (standard library only, so the serving install has it)."""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


class AdminApiError(Exception):
    """The service answered with an error, or could not be reached."""


class AdminClient:
    def __init__(self, base_url: str, api_key: str | None, timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout

    def _call(
        self, method: str, path: str, body: bytes | None = None, content_type: str | None = None
    ) -> Any:
        request = urllib.request.Request(self.base_url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self._api_key:
            request.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise AdminApiError(f"{method} {path}: {exc.code} {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise AdminApiError(f"cannot reach {self.base_url}: {exc}") from None

    def _json(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        return self._call(method, path, body, "application/json" if body else None)

    def list(self) -> Any:
        return self._json("GET", "/v1/models")

    def show(self, name: str) -> Any:
        return self._json("GET", f"/v1/models/{name}")

    def publish(self, name: str, folder: Path, *, activate: bool) -> Any:
        """Upload folder/model.onnx and folder/metadata.json as a new version."""
        boundary = secrets.token_hex(16)
        parts = []
        for field, filename in (("model", "model.onnx"), ("metadata", "metadata.json")):
            path = folder / filename
            if not path.exists():
                raise AdminApiError(f"{path} does not exist")
            parts.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                + path.read_bytes()
                + b"\r\n"
            )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        query = "?activate=true" if activate else ""
        return self._call(
            "POST",
            f"/v1/models/{name}/versions{query}",
            body,
            f"multipart/form-data; boundary={boundary}",
        )

    def activate(self, name: str, version: int) -> Any:
        return self._json("POST", f"/v1/models/{name}/activate", {"version": version})

    def rollback(self, name: str) -> Any:
        return self._json("POST", f"/v1/models/{name}/rollback")

    def set_canary(self, name: str, version: int, weight: float) -> Any:
        return self._json(
            "PUT", f"/v1/models/{name}/canary", {"version": version, "weight": weight}
        )

    def clear_canary(self, name: str) -> Any:
        return self._json("DELETE", f"/v1/models/{name}/canary")

    def set_shadow(self, name: str, version: int) -> Any:
        return self._json("PUT", f"/v1/models/{name}/shadow", {"version": version})

    def clear_shadow(self, name: str) -> Any:
        return self._json("DELETE", f"/v1/models/{name}/shadow")

    def unload(self, name: str) -> Any:
        return self._json("POST", f"/v1/models/{name}/unload")

    def route_tenant(self, tenant: str, model: str | None) -> Any:
        if model is None:
            return self._json("DELETE", f"/v1/routing/tenants/{tenant}")
        return self._json("PUT", f"/v1/routing/tenants/{tenant}", {"model": model})
