"""Tool-call planning and parsing (torch-free): the constraint each tool_choice decodes under,
the parsers' readings of model text, streamed text held while it may be a call; and the serve
flags checked before any model loads."""

import json

import pytest

from engine.errors import RequestError
from scheduler.api.tools import ToolPlan, ToolStream, plan_tools, read_calls, template_messages

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                    "properties": {"x": {"type": "integer"}}}}}


def test_each_tool_choice_plans_its_constraint():
    plan, forced, shown = plan_tools([TOOL], {"type": "function", "function": {"name": "f"}}, True, None)
    assert plan.forced == "f" and json.loads(forced.spec) == TOOL["function"]["parameters"] and shown == [TOOL]
    plan, forced, _ = plan_tools([TOOL], "required", False, None)
    schema = json.loads(forced.spec)
    assert plan.required and schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "f"}
    assert plan_tools([TOOL], "none", True, "hermes") == (ToolPlan(), None, None)
    assert plan_tools([TOOL], None, True, "hermes")[0].parser == "hermes"
    for bad in ({"type": "function", "function": {"name": "g"}}, "sometimes"):
        with pytest.raises(RequestError):
            plan_tools([TOOL], bad, True, "hermes")
    with pytest.raises(RequestError, match="--tool-call-parser"):
        plan_tools([TOOL], "auto", True, None)


def test_parsers_read_calls_and_leave_plain_text():
    hermes = ToolPlan(parser="hermes")
    content, calls = read_calls(hermes, 'Sure. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>')
    assert content == "Sure. " and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1})]
    _, calls = read_calls(hermes, '<tool_call>[{"name": "f", "arguments": {}}, {"name": "g", "arguments": {}}]</tool_call>')
    assert [c.name for c in calls] == ["f", "g"]
    assert read_calls(hermes, "<tool_call>{not json</tool_call>") == ("<tool_call>{not json</tool_call>", [])
    llama = ToolPlan(parser="llama3_json")
    _, calls = read_calls(llama, '<|python_tag|>{"name": "f", "parameters": {"x": 2}}; {"name": "g", "parameters": {}}')
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 2}), ("g", {})]
    assert read_calls(llama, "Hello there") == ("Hello there", [])


def test_streamed_text_is_held_only_while_it_may_be_a_call():
    s = ToolStream(ToolPlan(parser="hermes"))
    assert s.feed("Let me check. <tool") == "Let me check. "
    assert s.feed("_call>{\"name\": \"f\", \"arguments\": {}}") == ""
    assert s.feed("</tool_call>") == ""
    held, calls = s.finish()
    assert held == "" and [c.name for c in calls] == ["f"]
    s = ToolStream(ToolPlan(parser="hermes"))
    assert s.feed("Plain <b>text</b>") == "Plain <b>text</b>"
    assert s.finish() == ("", [])
    s = ToolStream(ToolPlan(parser="llama3_json"))
    assert s.feed(" {\"name\"") == "" and s.feed(": \"f\", \"parameters\": {}}") == ""
    assert [c.name for c in s.finish()[1]] == ["f"]
    s = ToolStream(ToolPlan(parser="llama3_json"))
    assert s.feed("Hi {x}") == "Hi {x}" and s.finish() == ("", [])


def test_history_arguments_reach_templates_as_objects():
    msgs = template_messages([{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}])
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    with pytest.raises(RequestError, match="not JSON"):
        template_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}])


def test_new_sampling_fields_cross_the_wire_unchanged():
    from engine.sampling_params import SamplingParams
    from engine.structured_output import StructuredOutput
    from engine.worker.wire import params_from_proto, params_to_proto
    params = SamplingParams(logit_bias={5: -100.0, 9: 2.5}, allowed_token_ids=(1, 2), bad_words_ids=((3, 4), (7,)),
                            structured=StructuredOutput.json_schema({"type": "object"}))
    back = params_from_proto(params_to_proto(params))
    assert back == params and back.structured == params.structured
    with pytest.raises(RequestError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
    from engine.outputs import StepOutput, TokenLogprobs
    from engine.worker.wire import delta_to_output, output_to_delta
    out = StepOutput("r", 0, [5], prompt_logprobs=[None, TokenLogprobs(7, -1.5, [(8, -0.5)])])
    assert delta_to_output(output_to_delta(out)).prompt_logprobs == out.prompt_logprobs
    assert delta_to_output(output_to_delta(StepOutput("r", 0, [5], prompt_logprobs=[None]))).prompt_logprobs == [None]
    assert delta_to_output(output_to_delta(StepOutput("r", 0, [5]))).prompt_logprobs is None
    with pytest.raises(RequestError, match="choice"):
        StructuredOutput.choice([])


def test_serve_flags_are_checked_before_the_model_loads(capsys):
    import socket

    from scheduler.cli import main
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("pdserve ")
    assert main(["serve", "--log-level", "loud"]) == 2
    assert "--log-level 'loud' is unknown" in capsys.readouterr().err
    assert main(["serve", "--port", "70000"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["serve", "--tool-call-parser", "mine"]) == 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--mode", "colocated", "--port", str(busy.getsockname()[1])]) == 2
    assert "Address already in use" in capsys.readouterr().err


def _command_parsers():
    """(name, parser) of every `pdserve` command."""
    import argparse

    from bench.config import build_parser as bench_parser
    from bench.lab.latency_profile import build_parser as profile_parser
    from engine.kvpred.cli import build_parser as kvpred_parser
    from scheduler.cli import build_parser
    from scheduler.planner.cli import build_parser as plan_parser
    def subs(parser):
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    yield "serve", subs(build_parser())["serve"]
    yield "bench", bench_parser()
    yield "plan", plan_parser()
    yield "profile", profile_parser()
    for name, parser in subs(kvpred_parser()).items():
        yield f"kvpred {name}", parser


def test_every_command_help_shows_each_default(capsys):
    import argparse

    from scheduler.cli import main
    checked = 0
    for name, parser in _command_parsers():
        with pytest.raises(SystemExit) as e:
            main(name.split() + ["--help"])
        assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: pdserve"), name
        for action in parser._actions:
            if (action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
                    and not isinstance(action, argparse._HelpAction)):
                assert "default" in parser._get_formatter()._format_action(action), (name, action.option_strings)
                checked += 1
    assert checked > 60
