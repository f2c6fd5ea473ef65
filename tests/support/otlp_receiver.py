"""A real OTLP/HTTP trace receiver: an ``http.server`` on a free localhost port, in a thread.

It decodes each ``POST /v1/traces`` body as an ``ExportTraceServiceRequest`` (protobuf, gzip
if the exporter compressed it) with the official opentelemetry-proto classes and keeps the
spans, the raw bodies and the headers. ``mode`` makes it a bad collector: ``"hang"`` never
answers until the receiver is closed, ``"fail"`` answers 503 to everything.
"""

from __future__ import annotations

import gzip
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

Mode = Literal["ok", "hang", "fail"]


def plain(value: AnyValue) -> Any:
    """An OTLP attribute value as a Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [plain(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


@dataclass
class ReceivedSpan:
    span: Span
    resource: dict[str, Any]

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.key: plain(a.value) for a in self.span.attributes}


@dataclass
class OtlpReceiver:
    mode: Mode = "ok"
    spans: list[ReceivedSpan] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    posts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _release: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """The base endpoint, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it."""
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length", "0")))
                with receiver._lock:
                    receiver.posts += 1
                if receiver.mode == "hang":
                    receiver._release.wait()
                    return
                if receiver.mode == "fail" or self.path != "/v1/traces":
                    self.send_response(503 if receiver.mode == "fail" else 404)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if self.headers.get("content-encoding") == "gzip":
                    raw = gzip.decompress(raw)
                request = ExportTraceServiceRequest.FromString(raw)
                with receiver._lock:
                    receiver.bodies.append(raw)
                    receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                    for resource_spans in request.resource_spans:
                        resource = {
                            a.key: plain(a.value) for a in resource_spans.resource.attributes
                        }
                        for scope_spans in resource_spans.scope_spans:
                            receiver.spans.extend(
                                ReceivedSpan(span=s, resource=resource) for s in scope_spans.spans
                            )
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    def wait_for(self, count: int, *, timeout: float = 20) -> list[ReceivedSpan]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.spans) >= count:
                    return list(self.spans)
            time.sleep(0.05)
        raise AssertionError(f"{count} spans expected; got {len(self.spans)}")

    def wait_posts(self, count: int, *, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.posts >= count:
                    return
            time.sleep(0.05)
        raise AssertionError(f"{count} export attempts expected; got {self.posts}")
