"""What a request's output must match (structured outputs), as it crosses every boundary.

Torch-free: the front door builds it from `response_format`, `structured_outputs`, the older
`guided_*` fields or a forced tool call; it travels to the workers as (kind, spec) and each
engine compiles it its own way (ours: engine/grammar.py with xgrammar; vLLM's: its own
structured-output support). `spec` is text for every kind, so the wire form is two strings.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from engine.errors import RequestError

MAX_SPEC_CHARS = 1 << 16  # a schema, pattern or grammar larger than this is refused


class StructuredKind(enum.StrEnum):
    JSON = "json"  # spec: a JSON schema, as JSON text
    JSON_OBJECT = "json_object"  # any JSON object; spec is empty
    REGEX = "regex"  # spec: a regular expression the whole output matches
    CHOICE = "choice"  # spec: a JSON list of the strings the output must be one of
    GRAMMAR = "grammar"  # spec: an EBNF grammar (GBNF-style, root rule `root`)


@dataclass(frozen=True)
class StructuredOutput:
    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "kind", StructuredKind(self.kind))
        except ValueError:
            raise RequestError(f"unknown structured output kind {self.kind!r} (one of: "
                               f"{', '.join(k.value for k in StructuredKind)})", param="structured_outputs") from None
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise RequestError(f"a structured output constraint is text of at most {MAX_SPEC_CHARS} characters",
                               param="structured_outputs")
        if self.kind == StructuredKind.CHOICE:
            choices = json.loads(self.spec) if self.spec else None
            if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
                raise RequestError("choice must be a non-empty list of non-empty strings", param="structured_outputs")
        elif self.kind != StructuredKind.JSON_OBJECT and not self.spec:
            raise RequestError(f"the {self.kind.value} constraint is empty", param="structured_outputs")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "StructuredOutput":
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise RequestError(f"the JSON schema is not valid JSON: {e}", param="structured_outputs") from None
        if not isinstance(schema, (dict, bool)):
            raise RequestError("a JSON schema must be an object", param="structured_outputs")
        return cls(StructuredKind.JSON, json.dumps(schema))

    @classmethod
    def choice(cls, choices: list[str]) -> "StructuredOutput":
        return cls(StructuredKind.CHOICE, json.dumps(choices))

    @property
    def choices(self) -> list[str]:
        return json.loads(self.spec) if self.kind == StructuredKind.CHOICE else []
