"""Shared by the examples: a server to talk to -- yours (--url) or the offline demo collection."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import tempfile


def parse(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", help="a running `mmr serve` (default: start one on the offline demo collection)")
    p.add_argument("--api-key", default=os.environ.get("MMR_API_KEY"), help="the server's API key [env MMR_API_KEY]")
    p.add_argument("--query", default="a red picture")
    p.add_argument("documents", nargs="*", help="indexed paths or ids to rerank (default: the demo's images)")
    return p.parse_args()


@contextlib.contextmanager
def server(args):
    """Yields (base URL, documents, demo collection or None)."""
    if args.url:
        yield args.url.rstrip("/"), args.documents, None
        return
    logging.getLogger("mm_retrieval").setLevel(logging.ERROR)  # the tiny demo model warns about its random weights
    from mm_retrieval.server.testing import serve_demo

    with tempfile.TemporaryDirectory() as root, serve_demo(root) as (srv, demo):
        yield srv.url, args.documents or demo.paths, demo
