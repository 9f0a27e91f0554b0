"""Route dependencies that authenticate the caller and check its role."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from service.auth import Principal, presented_key
from service.state import ServiceState, StateDep


def caller(
    state: StateDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    return state.keys.authenticate(presented_key(authorization, x_api_key))


def authenticate_scorer(
    state: ServiceState, authorization: str | None, x_api_key: str | None
) -> Principal:
    """The caller, if it may score (role scorer or admin); for routes without dependencies."""
    principal = state.keys.authenticate(presented_key(authorization, x_api_key))
    if "admin" not in principal.roles:
        principal.require("scorer")
    return principal


def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    principal.require("admin")
    return principal


CallerDep = Annotated[Principal, Depends(caller)]
AdminDep = Annotated[Principal, Depends(admin)]
