import yaml

from libs.common import events, topology
from libs.common.asyncapi import ASYNCAPI_PATH, build_asyncapi, render_asyncapi
from services.gatekeeper.schemas import json_schemas


def test_committed_document_is_up_to_date():
    assert ASYNCAPI_PATH.read_text() == render_asyncapi(json_schemas()), "run `flywheel asyncapi` and commit docs/asyncapi.yaml"


def test_every_event_and_subject_is_documented():
    doc = yaml.safe_load(render_asyncapi(json_schemas()))
    assert doc["asyncapi"].startswith("3.")
    messages = doc["components"]["messages"]
    for kind in events.EVENT_TYPES:
        assert kind.__name__ in messages
        assert messages[kind.__name__]["payload"]["$ref"].endswith(kind.__name__)
    addresses = {c["address"] for c in doc["channels"].values()}
    for subject in (topology.DATASET_SUBMITTED, topology.CHECKPOINT_SAVED, topology.EVAL_SCORED, topology.MODEL_DEPLOYED):
        assert subject in addresses


def test_dataset_submitted_schema_is_usable_by_other_languages():
    schema = build_asyncapi(json_schemas())["components"]["schemas"]["DatasetSubmitted"]
    assert "name" in schema["required"]
    assert set(schema["properties"]) >= {"type", "id", "time", "source", "schema_version", "rows", "uri", "priority"}
    assert "chat_sft_v1" in build_asyncapi(json_schemas())["components"]["schemas"]
