"""docker-compose.yml's `mmr` service agrees with the CLI: its command parses as `mmr serve`, its
port mapping and health check use the port it serves on, and it reaches the Milvus service. The
`ray` profile's head and worker form one Ray cluster next to Milvus (their `ray start` commands
parse with Ray's own CLI), and the index command it documents parses as `mmr index --ray`."""

import shlex
import tomllib
from pathlib import Path

import click
import pytest
import yaml

from mm_retrieval.cli import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def mmr(compose):
    return compose["services"]["mmr"]


def _flags(args: list[str]) -> dict[str, str]:
    out, i = {}, 0
    while i < len(args):
        assert args[i].startswith("--"), f"unexpected positional argument {args[i]!r} in the mmr command"
        out[args[i]] = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else ""
        i += 2 if out[args[i]] else 1
    return out


def test_command_is_a_valid_mmr_serve_invocation(mmr):
    command = mmr["command"]
    assert command[:2] == ["mmr", "serve"]
    serve = cli.commands["serve"]
    known = {opt for p in serve.params if isinstance(p, click.Option) for opt in p.opts}
    flags = _flags(command[2:])
    assert set(flags) <= known, f"flags the CLI doesn't have: {set(flags) - known}"
    serve.make_context("serve", list(command[2:]), **cli.context_settings)  # parses with the real option types and ranges
    assert flags["--host"] == "0.0.0.0"  # reachable from outside the container


def test_port_mapping_and_health_check_match_the_served_port(mmr):
    default = next(p.default for p in cli.commands["serve"].params if p.name == "port")
    port = _flags(mmr["command"][2:]).get("--port") or str(default)
    container_ports = [str(m).split(":")[-1] for m in mmr["ports"]]
    assert port in container_ports
    health = " ".join(mmr["healthcheck"]["test"])
    assert f"localhost:{port}/healthz" in health


def test_it_talks_to_the_milvus_service(compose, mmr):
    db = _flags(mmr["command"][2:])["--db"]
    host, port = db.split("://", 1)[1].split(":")
    assert host in compose["services"] and host in mmr["depends_on"]
    assert any(str(m).split(":")[-1] == port for m in compose["services"][host]["ports"])
    assert mmr["depends_on"][host]["condition"] == "service_healthy"


def test_gpu_reservation_and_a_volume_for_the_db_and_token_cache(compose, mmr):
    devices = mmr["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    named = {v.split(":")[0]: v.split(":")[1] for v in mmr["volumes"] if not v.startswith((".", "/", "$"))}
    assert named and set(named) <= set(compose["volumes"])
    cache = mmr["environment"]["MMR_CACHE_DIR"]
    assert any(cache.startswith(mount) for mount in named.values()), "the token cache must live in a volume"
    assert "MMR_API_KEY" in mmr["environment"]


def test_the_image_it_builds_exists(mmr):
    if "build" in mmr:
        assert (ROOT / mmr["build"] / "Dockerfile" if isinstance(mmr["build"], str) else ROOT / "Dockerfile").is_file()


# ---- profile "ray" ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_services(compose):
    return compose["services"]["ray-head"], compose["services"]["ray-worker"]


def _ray_start(command: list[str]) -> dict:
    """``ray start ...`` parsed by Ray's own CLI: its parameters by name."""
    scripts = pytest.importorskip("ray.scripts.scripts")
    assert command[:2] == ["ray", "start"]
    return scripts.start.make_context("start", list(command[2:])).params


def _container_path(volume: str) -> str:
    """``HOST:CONTAINER[:MODE]`` -> CONTAINER (HOST may be ``${VAR:-default}``)."""
    spec = volume.removesuffix(":ro").removesuffix(":rw")
    return spec.rsplit(":", 1)[1]


def test_ray_profile_has_a_head_and_a_worker_beside_milvus(compose, ray_services):
    head, worker = ray_services
    assert head["profiles"] == ["ray"] and worker["profiles"] == ["ray"]
    for always in ("etcd", "minio", "milvus"):  # Milvus runs with or without the profile
        assert "profiles" not in compose["services"][always]
    assert head["image"] == worker["image"]  # one Ray and Python version on every node
    assert head["build"] == worker["build"] and '".[ray,bulk]"' in head["build"]["dockerfile_inline"]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"ray", "bulk"} <= set(extras)  # the extras the image installs exist (--ray, --bulk-import)
    for line in head["build"]["dockerfile_inline"].splitlines():  # what it copies exists
        if line.startswith("COPY"):
            assert all((ROOT / src).exists() for src in line.split()[1:-1]), line
    assert head["depends_on"]["milvus"]["condition"] == "service_healthy"
    assert worker["depends_on"]["ray-head"]["condition"] == "service_healthy"


def test_the_worker_joins_the_head_and_the_ports_match(ray_services):
    head, worker = ray_services
    h, w = _ray_start(head["command"]), _ray_start(worker["command"])
    assert h["head"] and h["block"] and not w["head"] and w["block"]
    assert w["address"] == f"ray-head:{h['port']}"
    published = {str(m).split(":")[-1] for m in head["ports"]}
    assert {str(h["ray_client_server_port"]), "8265"} <= published and h["dashboard_host"] == "0.0.0.0"
    assert all(str(m).startswith("127.0.0.1:") for m in head["ports"])  # the job API runs code: local only
    assert str(h["port"]) in " ".join(head["healthcheck"]["test"])
    assert head["shm_size"] and worker["shm_size"]  # the object store lives in /dev/shm


def test_the_documented_index_command_runs_through_them(compose, ray_services):
    head, worker = ray_services
    command = shlex.split(head["labels"]["mmr.index-command"])
    assert command[:2] == ["mmr", "index"]
    # the real options and types, in a context made as `mmr index` makes it (click caches each
    # command's help option on first use: tests/unit/test_docs_commands.py renders it after this)
    ctx = cli.commands["index"].make_context("index", command[2:], **cli.context_settings)
    assert ctx.params["ray_address"] == "auto" and ctx.params["ray_actors"] == 2
    host = ctx.params["db"].split("://", 1)[1].split(":")[0]
    assert host in compose["services"] and host in head["depends_on"]
    source = ctx.params["source"]
    mounts = [{_container_path(v) for v in svc["volumes"]} for svc in (head, worker)]
    assert all(any(source == m or source.startswith(m + "/") for m in ms) for ms in mounts), \
        "the driver (head) and the actors (workers) must see the images at the same path"
    assert " ".join(command) in (ROOT / "docker-compose.yml").read_text()  # and the header comment shows it
    assert "--ray auto" in (ROOT / "docs" / "scaling.md").read_text()


def test_minio_is_reachable_for_bulk_import(compose):
    minio = compose["services"]["minio"]
    assert "127.0.0.1:9000:9000" in minio["ports"]  # --minio http://localhost:9000, the default
    default = next(p.default for p in cli.commands["index"].params if p.name == "minio_endpoint")
    assert default == "http://localhost:9000"
