"""Which loaded version scores a request: tenant -> model, then a sticky canary split.

A ServingPlan is immutable and replaced whole on a swap, so a request that took one keeps a
consistent view (active, canary, shadow) until it answers, and the versions it holds stay
alive until then.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, Protocol

from service.registry import LoadedModel

CANARY_BUCKETS = 10_000

Role = Literal["active", "canary"]


def canary_bucket(model_name: str, user_id: str) -> int:
    """A user's bucket in [0, CANARY_BUCKETS), stable across replicas, restarts and versions.

    Salted with the model name so that canaries of different models pick different users.
    """
    digest = hashlib.blake2b(f"{model_name}\x00{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % CANARY_BUCKETS


@dataclass(frozen=True)
class ServingPlan:
    """What serves one model name now."""

    name: str
    active: LoadedModel
    canary: LoadedModel | None = None
    canary_weight: float = 0.0
    shadow: LoadedModel | None = None

    def pick(self, user_id: str) -> tuple[LoadedModel, Role]:
        canary = self.canary
        if (
            canary is not None
            and canary_bucket(self.name, user_id) < self.canary_weight * CANARY_BUCKETS
        ):
            return canary, "canary"
        return self.active, "active"

    def versions(self) -> list[LoadedModel]:
        return [m for m in (self.active, self.canary, self.shadow) if m is not None]


@dataclass(frozen=True)
class Route:
    """The version that scores one request, and the shadow that scores it on the side."""

    model: LoadedModel
    role: Role
    shadow: LoadedModel | None


class Router(Protocol):
    def route(self, tenant: str | None, user_id: str) -> Route: ...


class SinglePlanRouter:
    """Routes every request to one plan: for tools and tests that serve a single model."""

    def __init__(self, plan: ServingPlan) -> None:
        self.plan = plan

    def route(self, tenant: str | None, user_id: str) -> Route:
        model, role = self.plan.pick(user_id)
        return Route(model, role, self.plan.shadow)
