"""Structured outputs, tool calls, token filters and the fields pdserve refuses, on the real
SmolLM2 behind a colocated server, through the openai client, LangChain and plain HTTP."""

import json
import logging

import httpx
import jsonschema
import openai
import pytest

from helpers import LiveServer, assert_no_leak

pytestmark = pytest.mark.slow

SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                      "population": {"type": "integer", "minimum": 0, "maximum": 99999999}},
     "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["colors"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "address": {"type": "object", "properties": {"zip": {"type": "string",
                                                                                           "pattern": "^[0-9]{5}$"}},
                                                  "required": ["zip"], "additionalProperties": False}},
     "required": ["name", "address"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4},
]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20},
                                                "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server():
    from engine.config import EngineConfig
    srv = LiveServer(EngineConfig(dtype="float32", max_model_len=1024, num_kv_blocks=256))
    yield srv
    srv.stop()
    assert_no_leak(srv.engine)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_json_schema_output_validates(client, model, schema):
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Answer in JSON."}], max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content), schema)


def test_json_object_structured_outputs_and_guided_fields(client, model):
    out = client.completions.create(model=model, prompt="Is water wet? Answer:", max_tokens=8, temperature=0,
                                    extra_body={"structured_outputs": {"choice": ["certainly", "never"]}})
    assert out.choices[0].text in ("certainly", "never")
    out = client.completions.create(model=model, prompt="My phone number is", max_tokens=16, temperature=0.9, seed=3,
                                    extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert out.choices[0].text[:3].isdigit() and out.choices[0].text[3] == "-" and len(out.choices[0].text) == 8
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    out = client.completions.create(model=model, prompt="Q: Is the sky blue?\nA:", max_tokens=16, temperature=0,
                                    extra_body={"structured_outputs": {"grammar": grammar}})
    assert out.choices[0].text in ("The answer is yes.", "The answer is no.")
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A JSON object please"}],
                                         max_tokens=48, temperature=0, response_format={"type": "json_object"},
                                         extra_body={"min_tokens": 0})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    else:
        assert out.choices[0].message.content.lstrip().startswith("{")


def test_constrained_and_free_requests_share_a_batch(server, client, model):
    """A free request's greedy output is the same whether a constrained one runs beside it."""
    from concurrent.futures import ThreadPoolExecutor
    free = dict(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    alone = client.completions.create(**free).choices[0].text
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: client.completions.create(**free) if i % 2 else client.completions.create(
            model=model, prompt="Pick:", max_tokens=6, temperature=0, extra_body={"guided_choice": ["a", "b"]}),
            range(4)))
    assert [o.choices[0].text for o in outs[1::2]] == [alone, alone]
    assert all(o.choices[0].text in ("a", "b") for o in outs[::2])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "structured_outputs"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": 'root ::= "a'}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "guided_choice"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"allowed_token_ids": [10 ** 7]}, "allowed_token_ids"),
])
def test_bad_constraints_are_400s_naming_the_problem(server, model, body, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and isinstance(r.json()["error"]["code"], str)


@pytest.mark.parametrize("stream", [False, True])
def test_a_constraint_its_own_filters_leave_no_token_for_is_a_400(server, model, stream):
    """Token 0 is the end-of-text token, which the choice's grammar does not allow first."""
    body = {"model": model, "prompt": "Pick:", "max_tokens": 4, "guided_choice": ["yes"], "allowed_token_ids": [0],
            "stream": stream}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "no token is left" in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/v1/completions", json={**body, "allowed_token_ids": None, "stream": False}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "yes"


def test_named_and_required_tool_choice(client, model):
    out = client.chat.completions.create(model=model, messages=ASK, max_tokens=48, temperature=0, tools=[WEATHER],
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    out = client.chat.completions.create(model=model, messages=ASK, max_tokens=64, temperature=0, tools=[WEATHER],
                                         tool_choice="required", parallel_tool_calls=False)
    (call,) = out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(client, model):
    kw = dict(model=model, messages=ASK, max_tokens=48, temperature=0, tools=[WEATHER],
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    chunks = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].function.name == "get_weather" and all(p.index == 0 for p in pieces)
    assert "".join(p.function.arguments or "" for p in pieces) == whole.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_call_history_reaches_the_template(server, model):
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    r = httpx.post(server.url + "/tokenize", json={"model": model, "messages": messages}, timeout=60)
    assert r.status_code == 200
    text = httpx.post(server.url + "/detokenize", json={"model": model, "tokens": r.json()["tokens"]}).json()["prompt"]
    assert "21 C and sunny" in text
    bad = [*ASK, {"role": "tool", "content": "x"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": bad}, timeout=60)
    assert r.status_code == 400 and "tool_call_id" in r.json()["error"]["message"]


def test_langchain_structured_output_and_bind_tools(server, model):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        """Current weather of a city."""

        city: str = Field(max_length=20)
        celsius: int

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=model, temperature=0, max_tokens=48,
                     max_retries=0, timeout=120)
    for method in ("json_schema", "function_calling"):
        got = llm.with_structured_output(Weather, method=method).invoke("Weather in Paris as data")
        assert isinstance(got, Weather), method
    msg = llm.bind_tools([Weather], tool_choice="Weather").invoke("Weather in Paris")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "Weather" and set(msg.tool_calls[0]["args"]) == {"city",
                                                                                                          "celsius"}


def test_logit_bias_allowed_tokens_and_bad_words(server, client, model):
    kw = dict(model=model, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=1)
    plain = client.completions.create(**kw).choices[0].logprobs
    first = plain.tokens[0]
    assert plain.text_offset == [sum(len(t) for t in plain.tokens[:i]) for i in range(len(plain.tokens))]
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices[0].logprobs]
    assert [o for lp in streamed for o in lp.text_offset] == plain.text_offset
    greedy = httpx.post(server.url + "/tokenize", json={"prompt": first, "add_special_tokens": False}).json()["tokens"]
    assert len(greedy) == 1
    greedy = greedy[0]
    pushed = client.completions.create(**kw, logit_bias={str(greedy): -100}).choices[0]
    assert pushed.logprobs.tokens[0] != first
    forced = client.completions.create(**kw, logit_bias={"42": 100})
    assert forced.choices[0].text == ":" * 4
    allowed = client.completions.create(**kw, extra_body={"allowed_token_ids": [42, 43]})
    assert set(allowed.choices[0].text) <= {":", ";"}
    banned = client.completions.create(**kw, extra_body={"bad_words": [first.strip()]})
    assert first.strip() not in banned.choices[0].text


def test_never_supported_fields_refused_and_unknown_ones_logged_once(server, model, caplog):
    from scheduler.api.protocol import NEVER_SUPPORTED
    for name in NEVER_SUPPORTED:
        value = {"prompt_logprobs": 1, "best_of": 2}.get(name, True)
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 1,
                                                                   name: value}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)
    with caplog.at_level(logging.WARNING, logger="scheduler.api.server"):
        for _ in range(3):
            r = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1,
                                                                  "temprature": 0.3}, timeout=60)
            assert r.status_code == 200
    assert sum("'temprature'" in rec.getMessage() for rec in caplog.records) == 1
    text = httpx.get(server.url + "/metrics").text
    assert 'pdserve_request_unknown_fields_total{field="temprature"} 3.0' in text


def test_echo_with_logprobs_equals_a_forward_over_the_prompt(server, client, model, smollm2_hf):
    """What loglikelihood harnesses send: echo + logprobs (max_tokens 0 or more)."""
    import torch
    import transformers

    prompt = "The capital of France is Paris, and the capital of Italy is"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=0, temperature=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == prompt and choice.logprobs.token_logprobs[0] is None
    ids = httpx.post(server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(choice.logprobs.tokens) == len(ids) and "".join(choice.logprobs.tokens) == prompt
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    del hf
    expected = [float(ref[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    more = client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    assert more.choices[0].text.startswith(prompt) and len(more.choices[0].logprobs.tokens) == len(ids) + 3
    assert more.choices[0].logprobs.token_logprobs[1:len(ids)] == pytest.approx(expected, abs=1e-4)
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                              logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == more.choices[0].text
    raw = httpx.post(server.url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1,
                                                           "prompt_logprobs": 0}, timeout=60).json()
    entries = raw["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(ids)
    assert [e[str(t)]["logprob"] for e, t in zip(entries[1:], ids[1:])] == pytest.approx(expected, abs=1e-4)
