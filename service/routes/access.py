"""Route dependencies that authenticate the caller and check its role."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header

from service.auth import Principal, presented_key
from service.state import StateDep


def caller(
    state: StateDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    x_api_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Principal:
    return state.keys.authenticate(presented_key(authorization, x_api_key))


def scorer(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    if "admin" not in principal.roles:
        principal.require("scorer")
    return principal


def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    principal.require("admin")
    return principal


CallerDep = Annotated[Principal, Depends(caller)]
ScorerDep = Annotated[Principal, Depends(scorer)]
AdminDep = Annotated[Principal, Depends(admin)]
