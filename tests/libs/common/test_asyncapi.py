"""The AsyncAPI document: generated from the declarations, committed, complete."""

import yaml

from flywheel.contract import CLIENTS, declarations, render
from libs.common import events, topology
from libs.common.asyncapi import ASYNCAPI_PATH, build_asyncapi
from services.gatekeeper.schemas import json_schemas


def test_committed_document_is_up_to_date():
    assert ASYNCAPI_PATH.read_text() == render(), "run `flywheel asyncapi` and commit docs/asyncapi.yaml"


def test_every_event_and_subject_is_documented():
    doc = yaml.safe_load(render())
    assert doc["asyncapi"].startswith("3.")
    messages = doc["components"]["messages"]
    for kind in events.EVENT_TYPES:
        assert kind.__name__ in messages, f"{kind.__name__} is published by no declared service"
        assert messages[kind.__name__]["payload"]["$ref"].endswith(kind.__name__)
    addresses = {c["address"] for c in doc["channels"].values()}
    for subject in (topology.DATASET_SUBMITTED, topology.CHECKPOINT_SAVED, topology.EVAL_SCORED,
                    topology.MODEL_DEPLOYED, topology.DATASET_ACCEPTED, topology.CONTROL_TRAINER_ACTION):
        assert subject in addresses


def test_operations_are_the_declared_subscriptions_and_publications():
    doc = build_asyncapi(declarations(), CLIENTS, json_schemas())
    operations = doc["operations"]
    assert operations["trainer.receive.datasetAccepted"]["summary"].startswith("trainer consumes")
    assert "every replica" in operations["inference.receive.modelDeployed"]["summary"]
    assert operations["trainer.receive.controlTrainer"]["reply"]["messages"][0]["$ref"].endswith("ControlReply")
    assert {"gatekeeper.send.datasetAccepted", "curriculum.send.datasetSubmitted",
            "flywheel-CLI.send.datasetSubmitted"} <= set(operations)
    for service in declarations():
        for sub in service.subscriptions:
            assert any(op.startswith(f"{service.name}.receive.") for op in operations), service.name
    assert doc["channels"]["datasetAccepted"]["parameters"]["priority"]["enum"] == ["high", "normal", "low"]


def test_dataset_submitted_schema_is_usable_by_other_languages():
    schema = build_asyncapi(declarations(), CLIENTS, json_schemas())["components"]["schemas"]
    submitted = schema["DatasetSubmitted"]
    assert "name" in submitted["required"]
    assert set(submitted["properties"]) >= {"type", "id", "time", "source", "schema_version", "rows", "uri", "priority"}
    assert "chat_sft_v1" in schema
