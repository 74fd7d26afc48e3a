"""A real-HTTP S3 for tests: moto's server on 127.0.0.1, a flaky proxy in front of it, and a
recorder of the S3 operations a boto3 client sends. Imported by test_sources / test_sinks.

Nothing here is a fake of Mergeflow's code: requests travel over HTTP to moto's S3 implementation.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

#: The dummy secret key the tests run under; no log line or error message may contain it.
SECRET_KEY = "mergeflow-test-secret-0d4b9e7c"
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "mergeflowtestkeyid",
    "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
_AWS_UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


@contextlib.contextmanager
def aws_test_env() -> Iterator[None]:
    """Dummy AWS credentials and no user profile or endpoint, restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        for name in _AWS_UNSET:
            mp.delenv(name, raising=False)
        yield


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def new_bucket(client, prefix: str = "mf") -> str:
    """Create a bucket with a unique name (the moto server is shared by every test)."""
    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


class FlakyProxy:
    """An HTTP proxy to ``upstream`` that answers ``503 SlowDown`` to the next ``fail`` requests,
    and holds every forwarded request ``delay`` seconds first (a slow server).

    Use as a context manager; ``url`` is the endpoint to give boto3, ``failed`` counts the 503s
    sent and ``forwarded`` the requests passed through.
    """

    def __init__(self, upstream: str, fail: int = 0, delay: float = 0.0) -> None:
        self.upstream = upstream.removeprefix("http://").split("/", 1)[0]
        self.fail = fail
        self.delay = delay
        self.failed = 0
        self.forwarded = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FlakyProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def should_fail(self) -> bool:
        """Count this request as a failure while failures remain."""
        with self._lock:
            if self.failed < self.fail:
                self.failed += 1
                return True
            self.forwarded += 1
            return False

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.should_fail():
                    self._answer(503, {"Content-Type": "application/xml"},
                                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request "
                                 b"rate.</Message></Error>")
                    return
                time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                skip = {"transfer-encoding", "connection", "content-length"}
                headers = {k: v for k, v in response.getheaders() if k.lower() not in skip}
                if self.command == "HEAD":
                    headers["Content-Length"] = response.getheader("Content-Length", "0")
                conn.close()
                self._answer(response.status, headers, data)

            def _answer(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_PATCH = do_DELETE = do_HEAD = _relay

        return Handler


class OperationLog:
    """Records every S3 operation a boto3 client sends (name and Key), in order, from any thread."""

    def __init__(self, client) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.params: list[dict] = []
        self._lock = threading.Lock()
        self._events = client.meta.events
        self._id = f"operation-log-{uuid.uuid4().hex}"
        self._events.register("provide-client-params.s3", self._record, unique_id=self._id)

    def close(self) -> None:
        """Stop recording."""
        self._events.unregister("provide-client-params.s3", unique_id=self._id)

    def _record(self, params, model, **kwargs) -> None:
        with self._lock:
            self.calls.append((model.name, params.get("Key")))
            self.params.append(dict(params))

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()
            self.params.clear()

    def names(self, *operations: str) -> list[str]:
        """The Keys of the recorded calls of these operations, in order."""
        return [key for op, key in self.calls if op in operations]

    def count(self, *operations: str) -> int:
        return sum(op in operations for op, _ in self.calls)
