"""Shared set-up of the model lifecycle tests: a repository copy, API keys, a scoring client."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt

from service.repository import ModelRepository

KEY_HOLDERS: dict[str, tuple[list[Any], list[str] | None]] = {
    "ml-admin": (["admin"], None),
    "ad-server": (["scorer"], None),
    "acme-ad-server": (["scorer"], ["acme"]),
}


@dataclass(frozen=True)
class Setup:
    """A private repository copy, a key file and the keys in it, and a request to score."""

    repository: ModelRepository
    name: str
    keys_file: Path
    keys: dict[str, str]
    redis_url: str
    user_id: str
    ad_ids: list[str]

    def auth(self, holder: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[holder]}"}

    def settings(self) -> dict[str, object]:
        return {
            "model_repository": self.repository.root,
            "redis_url": self.redis_url,
            "api_keys_file": self.keys_file,
            "repository_poll_seconds": 0.2,
        }

    def body(self, user_id: str | None = None, tenant: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "user_id": user_id or self.user_id,
            "candidates": [{"ad_id": a} for a in self.ad_ids],
        }
        if tenant is not None:
            body["tenant"] = tenant
        return body

    def score(
        self, client: httpx.Client, user_id: str | None = None, tenant: str | None = None
    ) -> tuple[int, npt.NDArray[np.float64]]:
        """(model_version, scores) of one request scored with the unbound scorer key."""
        response = client.post(
            "/v1/score", json=self.body(user_id, tenant), headers=self.auth("ad-server")
        )
        assert response.status_code == 200, response.text
        body = response.json()
        return body["model_version"], np.asarray(body["scores"])


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text, or None when it is absent."""
    label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    selector = rf"{re.escape(name)}\{{{re.escape(label_text)}\}}" if labels else re.escape(name)
    match = re.search(rf"^{selector} (\S+)$", text, re.MULTILINE)
    return None if match is None else float(match.group(1))


def shifted(scores: npt.NDArray[np.float64], intercept_shift: float) -> npt.NDArray[np.float64]:
    """What a publish_variant version with this shift scores where the source scored `scores`."""
    result: npt.NDArray[np.float64] = 1 / (
        1 + np.exp(-(np.log(scores / (1 - scores)) + intercept_shift))
    )
    return result
