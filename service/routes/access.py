"""Route dependencies that authenticate the caller and check its role."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, Header

from service.auth import Principal, Role, presented_key
from service.state import ServiceState, StateDep


def caller(
    state: StateDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    return state.keys.authenticate(presented_key(authorization, x_api_key))


def authenticate(state: ServiceState, headers: Mapping[str, str], role: Role) -> Principal:
    """The caller, if it holds `role` (admin may also score); for routes without dependencies,
    where FastAPI's dependency resolution would cost time on the hot path."""
    principal = state.keys.authenticate(
        presented_key(headers.get("authorization"), headers.get("x-api-key"))
    )
    if role == "admin" or "admin" not in principal.roles:
        principal.require(role)
    return principal


def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    principal.require("admin")
    return principal


CallerDep = Annotated[Principal, Depends(caller)]
AdminDep = Annotated[Principal, Depends(admin)]
