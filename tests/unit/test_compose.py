"""docker-compose.yml's `mmr` service agrees with the CLI: its command parses as `mmr serve`, its
port mapping and health check use the port it serves on, and it reaches the Milvus service."""

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
    serve.make_context("serve", list(command[2:]))  # parses with the real option types and ranges
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
