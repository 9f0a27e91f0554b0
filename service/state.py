"""What the lifespan builds and the routes use, behind one typed accessor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from feature_client.store import FeatureStore
from service.admission import AdmissionControl
from service.auth import KeyRing
from service.errors import NotReady
from service.metrics import Metrics
from service.model_manager import ModelManager
from service.scoring import ScoringPipeline
from service.settings import Settings


@dataclass
class ServiceState:
    """The collaborators of one running service."""

    settings: Settings
    metrics: Metrics
    models: ModelManager
    store: FeatureStore
    pipeline: ScoringPipeline
    keys: KeyRing
    admission: AdmissionControl
    shutting_down: bool = False


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "service", None)
    if not isinstance(state, ServiceState):
        raise NotReady("the service is starting: no model is loaded yet")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]
