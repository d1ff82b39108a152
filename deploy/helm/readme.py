"""Writes deploy/helm/pdserve/README.md from values.yaml: every value with its default and the
`# -- ` comment above it (a comment may run on over the following `#` lines). A test checks
that the README is current and that every value has a description.

    python deploy/helm/readme.py
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent / "pdserve"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")

HEADER = """# pdserve Helm chart

Disaggregated LLM serving on KubeRay: a RayCluster whose head runs pdserve's front door and
global scheduler, and two worker groups, the prefill and the decode pool (one worker per
pod). With `ray.external.enabled` the chart runs only the front door and joins a Ray cluster
managed elsewhere.

```bash
helm install pdserve deploy/helm/pdserve                       # CPU, the small default model
helm install pdserve deploy/helm/pdserve -f deploy/helm/pdserve/ci/gpu-values.yaml
```

The install prints how to reach the service (`NOTES.txt`). `values.schema.json` refuses a
value of the wrong type and any key it does not know, at every level, naming it. Pods run as
user 1000 with a read-only root filesystem (Ray and pdserve write under an emptyDir at /tmp),
no privilege escalation and no capabilities; the API key reaches the server from its Secret as
the `PDSERVE_API_KEY` environment variable, never on a command line. The front door has a
startup probe that allows for model loading (`/version`), a liveness probe on `/version` and a
readiness probe on `/health`, which fails while no worker of a pool can serve; worker pods are
probed through the node's Ray agent. A PodDisruptionBudget covers each pool of more than one
pod (all but one kept through a drain, or `podDisruptionBudget.minAvailable`); a pool of one
pod gets none, since a budget there would block every drain or protect nothing.

Generated from `values.yaml` by `python deploy/helm/readme.py`.

## Values

| key | default | description |
|---|---|---|
"""


@dataclass(frozen=True)
class Row:
    key: str
    default: object
    description: str


def rows(values_text: str) -> list[Row]:
    """Every value in file order: its dotted key, default and description. A mapping with a
    description is one value (its keys get no rows of their own); one without is a section."""
    values = yaml.safe_load(values_text)
    out: list[Row] = []
    stack: list[tuple[int, str, bool]] = []  # enclosing mappings: (indent, key, documented as one value)
    comment: list[str] | None = None
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# -- "):
            comment = [stripped[5:]]
            continue
        if stripped.startswith("#"):
            if comment is not None:
                comment.append(stripped[1:].strip())
            continue
        m = KEY.match(line)
        if m is None:  # a list item or a blank line
            comment = None if not stripped else comment
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = [key for _, key, _ in stack] + [m["key"]]
        inside_value = any(documented for _, _, documented in stack)
        default = _at(values, path)
        section = isinstance(default, dict) and bool(default)
        if not inside_value and (comment is not None or not section):
            out.append(Row(".".join(path), default, " ".join(comment or [])))
        if section:
            stack.append((indent, m["key"], comment is not None or inside_value))
        comment = None
    return out


def _at(values: dict, path: list[str]):
    for key in path:
        values = values[key]
    return values


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(values_text: str) -> str:
    lines = [HEADER]
    for r in rows(values_text):
        default = '""' if r.default == "" else json.dumps(r.default)
        lines.append(f"| `{r.key}` | `{_cell(default)}` | {_cell(r.description)} |\n")
    return "".join(lines)


if __name__ == "__main__":
    (CHART / "README.md").write_text(render((CHART / "values.yaml").read_text()))
    print(f"wrote {CHART / 'README.md'}")
