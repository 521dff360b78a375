"""Requests per second of `mmr serve` under concurrent rerank load, with and without dynamic batching.

Starts two `mmr serve` processes on 127.0.0.1 -- one batching (``--max-batch 64``), one not
(``--max-batch 1``), each on its own copy of a Milvus Lite database -- and sends both the same
load in alternating rounds (so background load on a shared machine hits both alike):
``--concurrency`` clients, each posting vLLM-style rerank requests (``--docs`` indexed documents,
a distinct query per request). Prints one JSON document.

    python benchmarks/server_batching.py                         # the tiny demo collection, offline
    python benchmarks/server_batching.py --db mmr.db --rerank reranker/ --docs 100

Without --db it builds the demo collection of :mod:`mm_retrieval.server.testing` in a temporary
folder (tiny seeded model; the numbers show the batching mechanism, not real-model speed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

WORDS = ["red", "green", "blue", "small", "large", "circle", "square", "left of", "right of", "a", "the", "bright"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, max_batch: int, db: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "mm_retrieval", "serve", "--db", db, "--port", str(port), "--max-batch", str(max_batch),
           "--batch-wait-ms", str(args.wait_ms), "--max-documents", str(max(args.docs, 1000)), "--device", args.device]
    if args.rerank:
        cmd += ["--rerank", args.rerank]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mmr serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("mmr serve did not become ready")


async def _load(url: str, docs: list[str], args, n: int, offset: int) -> tuple[float, list[float]]:
    """``n`` requests from ``--concurrency`` clients; returns (wall seconds, latencies)."""
    counter = iter(range(offset, offset + n))
    latencies: list[float] = []

    async def client(c: httpx.AsyncClient):
        for i in counter:
            query = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 4)) + f" {i}"  # distinct queries
            t = time.perf_counter()
            r = await c.post("/v1/rerank", json={"model": "mmr", "query": query, "documents": docs})
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:500]}")
            latencies.append(time.perf_counter() - t)

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=args.concurrency)) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(args.concurrency)))
        return time.perf_counter() - t0, latencies


def _summary(wall: float, latencies: list[float], url: str) -> dict:
    latencies = sorted(latencies)
    stats = httpx.get(f"{url}/readyz", timeout=30).json().get("batching", {})
    return {"requests_per_s": round(len(latencies) / wall, 1), "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "p95_ms": round(1000 * latencies[max(0, int(len(latencies) * 0.95) - 1)], 1), "wall_s": round(wall, 2),
            "mean_batch": stats.get("mean_batch"), "largest_batch": stats.get("largest_batch")}


def _replica(db: str) -> str:
    """A copy of a Milvus Lite database (file or folder, plus its token caches); a server URI as is."""
    if "://" in db:
        return db
    src = Path(db)
    dst = Path(tempfile.mkdtemp(prefix="mmr-bench-copy-")) / src.name
    for a, b in ((src, dst), (src.with_name(src.name + ".mmr"), dst.with_name(dst.name + ".mmr"))):
        if a.is_dir():
            shutil.copytree(a, b)
        elif a.exists():
            shutil.copy2(a, b)
    return str(dst)


def _documents(url: str, n: int) -> list[str]:
    """``n`` references to indexed items, picked by a first-stage search (repeated when the
    collection is smaller)."""
    hits = httpx.post(f"{url}/search", json={"query": "a picture", "k": n, "rerank": False}, timeout=120).json()["hits"]
    paths = [h["path"] for h in hits]
    return [paths[i % len(paths)] for i in range(n)]


def run(args) -> dict:
    if not args.db:  # built in a child process: Milvus Lite lets one process at a time open the file
        root = tempfile.mkdtemp(prefix="mmr-bench-")
        code = "import sys; from mm_retrieval.server.testing import make_demo_collection; make_demo_collection(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, root], check=True, stderr=subprocess.DEVNULL)
        args.db, args.rerank = str(Path(root) / "mmr.db"), str(Path(root) / "reranker")
    modes = {"batched": 64, "unbatched": 1}
    dbs = {"batched": args.db, "unbatched": _replica(args.db)}
    servers = {}
    try:
        for name, max_batch in modes.items():
            servers[name] = _start(args, max_batch, dbs[name])
        docs = _documents(servers["batched"][1], args.docs)
        walls = {name: 0.0 for name in modes}
        lats: dict[str, list[float]] = {name: [] for name in modes}
        per_round = max(args.concurrency, args.requests // args.rounds)
        for name in modes:  # warm-up round, not counted
            asyncio.run(_load(servers[name][1], docs, args, args.concurrency, 10**6))
        for r in range(args.rounds):
            for name in (modes if r % 2 == 0 else reversed(list(modes))):
                wall, lat = asyncio.run(_load(servers[name][1], docs, args, per_round, r * per_round))
                walls[name] += wall
                lats[name] += lat
        out = {"docs_per_request": args.docs, "concurrency": args.concurrency, "requests_per_mode": per_round * args.rounds,
               "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
        for name in modes:
            out[name] = _summary(walls[name], lats[name], servers[name][1])
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    out["speedup"] = round(out["batched"]["requests_per_s"] / out["unbatched"]["requests_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", help="Milvus URI of an indexed collection (default: a fresh demo collection)")
    p.add_argument("--rerank", help="reranker checkpoint dir")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--docs", type=int, default=32, help="documents per request")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per mode")
    p.add_argument("--wait-ms", type=float, default=2.0)
    p.add_argument("--device", default="auto")
    doc = run(p.parse_args(argv))
    print(json.dumps(doc, indent=2))
    return doc


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
