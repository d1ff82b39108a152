"""Schemathesis against /openapi.json of a colocated server on the tiny model: bounded
examples per operation, valid and invalid bodies alike. No answer is a 5xx, every answer
is one the schema documents (status, content type, body), and afterwards the server
answers a normal request and holds nothing."""

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.slow

EXAMPLES = 150  # per mode, over every operation
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_every_answer_as_documented(tiny_server, mode):
    schema = schemathesis.openapi.from_url(tiny_server.url + "/openapi.json")

    @given(case=schema.as_strategy(mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(base_url=tiny_server.url, checks=CHECKS, timeout=60)
    fuzz()


def test_the_server_serves_after_the_fuzz(tiny_server):
    r = httpx.post(tiny_server.url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert tiny_server.engine.kv.num_used_blocks == 0 and not tiny_server.engine.has_unfinished()
