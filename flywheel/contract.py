"""The event contract as a whole: every service's declaration plus the clients outside them.

`flywheel asyncapi` renders docs/asyncapi.yaml from here; tests check the committed file is
what the declarations say. Services declare themselves (services/<name>/service.py); the
clients that publish or request from outside the six services are declared below.
"""

from __future__ import annotations

import importlib

from libs.common import topology
from libs.common.asyncapi import render_asyncapi
from libs.common.events import (
    ControlReply,
    ControlTraining,
    DatasetSubmitted,
    DeployCheckpoint,
    DeployReply,
    RollBackDeployment,
)
from libs.common.service import Client, Publish, Request, Service
from libs.common.settings import SERVICES

CLIENTS = (
    Client("any client", publications=(
        Publish(topology.DATASET_SUBMITTED, DatasetSubmitted,
                "any client in any language publishes a dataset (inline rows or an artifact URI)"),
    )),
    Client("flywheel CLI", publications=(
        Publish(topology.DATASET_SUBMITTED, DatasetSubmitted, "flywheel submit"),
    ), requests=(
        Request(topology.CONTROL_TRAINER_ACTION, ControlTraining, ControlReply, "flywheel pause | resume | stop | skip"),
        Request(topology.CONTROL_DEPLOYER_DEPLOY, DeployCheckpoint, DeployReply, "flywheel deploy CHECKPOINT"),
        Request(topology.CONTROL_DEPLOYER_ROLLBACK, RollBackDeployment, DeployReply, "flywheel deploy --rollback"),
    )),
)


def declarations() -> list[Service]:
    """Every service's declaration (importing its service module, models and all)."""
    return [importlib.import_module(f"services.{name}.service").SERVICE for name in SERVICES]


def render() -> str:
    from services.gatekeeper.schemas import json_schemas

    return render_asyncapi(declarations(), CLIENTS, json_schemas())
