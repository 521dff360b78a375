"""Stand-ins for what a bulk import talks to besides Milvus: MinIO (S3, objects kept in memory:
HEAD/PUT/DELETE, what pymilvus' RemoteBulkWriter and minio's client send) and Milvus' REST import
API (``/v2/vectordb/jobs/import/{list,create,describe}``, answering with the documented fields).
Real HTTP servers on 127.0.0.1: pymilvus' own clients make real requests to them. Used by
tests/integration/indexing/test_bulk_import.py and the store contract of the bulk-import store."""

from __future__ import annotations

import email.utils
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BUCKET = "a-bucket"


class S3(BaseHTTPRequestHandler):
    """Path-style S3 as minio's client uses it for RemoteBulkWriter: HEAD bucket/object, PUT, DELETE."""

    def log_message(self, *args):
        pass

    def _target(self):
        bucket, _, key = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/").partition("/")
        return bucket, key

    def _reply(self, status, headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        bucket, key = self._target()
        objects = self.server.objects
        if bucket != BUCKET or (key and key not in objects):
            return self._reply(404)
        self._reply(200, [("ETag", '"0"'), ("Last-Modified", email.utils.formatdate(usegmt=True))] if key else [])

    def do_PUT(self):
        _, key = self._target()
        self.server.objects[key] = self.rfile.read(int(self.headers["Content-Length"]))
        self._reply(200, [("ETag", '"0"')])

    def do_DELETE(self):
        self.server.objects.pop(self._target()[1], None)
        self._reply(204)


class MilvusRest(BaseHTTPRequestHandler):
    """Milvus' REST import API: list, create (a job id), describe (``server.describe(poll)``).
    With ``server.importer`` set, create also calls it with the collection and the file keys (a
    real import, for tests that read the rows back)."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        verb = self.path.rsplit("/", 1)[1]
        self.server.requests.append((verb, body))
        if verb == "describe":
            self.server.polls += 1
            data = self.server.describe(self.server.polls)
        else:
            if verb == "create" and getattr(self.server, "importer", None) is not None:
                self.server.importer(body["collectionName"], [f for group in body["files"] for f in group])
            data = {"jobId": "4242"} if verb == "create" else {"records": []}
        out = json.dumps({"code": 0, "data": data}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def serve(handler, **state):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for k, v in state.items():
        setattr(server, k, v)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
