"""OpenTelemetry traces: one span per Messages request, exported over OTLP/HTTP.

Off unless configured, by the standard variables the SDK itself reads
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, their ``_HEADERS``,
``_TIMEOUT``, ``_COMPRESSION``; ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` for the
resource; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off), or in
server mode by the signed bundle's ``telemetry`` object (endpoint, and collector headers sealed
to the device), which ``FollowBundle`` follows as bundles change. The environment wins.

The span is built from the final ledger row in the gateway's finish hook, after the answer was
relayed, with the row's own start time and latency, so nothing waits on it. The SDK's
``BatchSpanProcessor`` queues it and exports from its own thread: a collector that is down,
refuses or hangs only fills that bounded queue (spans beyond it are dropped), never a request.

Attributes follow the GenAI semantic conventions (``gen_ai.*``) plus ``ccgate.*`` ones. Never
exported: prompts, answers, key secrets, upstream credentials.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol
from urllib.parse import urlsplit

from ccgate import __version__
from ccgate.gateway.metrics import rejection_reason

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from ccgate.gateway.governor import Governor
    from ccgate.gateway.policy import Policy
    from ccgate.policy.bundle import TelemetryEntry
    from ccgate.store.ledger import RequestRecord

log = logging.getLogger("ccgate.telemetry")

ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
CLOSE_TIMEOUT_S: Final = 3.0  # at shutdown, what a hanging collector may cost the daemon
MAX_PENDING: Final = 2048  # rows waiting for their span (the SDK's own queue holds as many)
TRACED_PATHS: Final = frozenset({"/v1/messages"})
# gen_ai.provider.name's well-known values, from the provider kind of the attempt that served.
_PROVIDER_NAMES: Final = {
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "vertex": "gcp.vertex_ai",
    "foundry": "azure.ai.inference",
}


class SpanSink(Protocol):
    """What the gateway's finish hook hands each final row to."""

    def observe(self, record: RequestRecord) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class TelemetryConfig:
    """Where spans go. ``endpoint`` None: the SDK reads the ``OTEL_*`` variables itself."""

    endpoint: str | None = None
    # Collector credentials (an API key header): never logged, never in a repr.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)

    def shown(self, environ: Mapping[str, str]) -> str:
        """The endpoint for a log line: scheme, host and path, never credentials or a query."""
        url = self.endpoint or next((environ[v] for v in ENDPOINT_VARS if environ.get(v)), "")
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"


def _disabled(environ: Mapping[str, str]) -> bool:
    return (
        environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        or environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none"
    )


def config_from_env(environ: Mapping[str, str]) -> TelemetryConfig | None:
    """A config when the environment asks for OTLP traces, else None."""
    if _disabled(environ):
        return None
    if not any(environ.get(name, "").strip() for name in ENDPOINT_VARS):
        return None
    return TelemetryConfig()


def attributes(record: RequestRecord, *, team: str | None = None) -> dict[str, Any]:
    """The span's attributes for one final row (GenAI conventions, then ccgate's own)."""
    kind = "anthropic"
    if record.attempt_log:
        kind = str(record.attempt_log[-1].get("kind") or "anthropic")
    provider_name = _PROVIDER_NAMES.get(kind, kind)
    cache_write = record.cache_creation_input_tokens
    one_hour = record.cache_creation_1h_input_tokens
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider_name,
        "gen_ai.system": provider_name,  # the older name, still what many backends read
        # The conventions count every input token, cached ones included; Anthropic reports
        # uncached input, cache writes and cache reads apart, so they are summed here.
        "gen_ai.usage.input_tokens": record.input_tokens
        + cache_write
        + record.cache_read_input_tokens,
        "gen_ai.usage.output_tokens": record.output_tokens,
        "gen_ai.usage.cache_creation.input_tokens": cache_write,
        "gen_ai.usage.cache_read.input_tokens": record.cache_read_input_tokens,
        "ccgate.request_id": record.id,
        "ccgate.key_id": record.key_id,
        "ccgate.provider": record.provider,
        "ccgate.attempts": record.attempts,
        "ccgate.outcome": record.outcome,
        "ccgate.streamed": record.streamed,
        "ccgate.cost_usd": record.cost_micros / 1_000_000,
        "ccgate.cost_micros": record.cost_micros,
        "ccgate.price_estimated": record.price_estimated,
        "ccgate.usage.uncached_input_tokens": record.input_tokens,
        "ccgate.usage.cache_write_5m_tokens": cache_write - one_hour,
        "ccgate.usage.cache_write_1h_tokens": one_hour,
    }
    if record.model is not None:
        attrs["gen_ai.request.model"] = record.model
        attrs["gen_ai.response.model"] = record.model
    if record.stop_reason is not None:
        attrs["gen_ai.response.finish_reasons"] = [record.stop_reason]
    if record.status is not None:
        attrs["http.response.status_code"] = record.status
    error = error_type(record)
    if error is not None:
        attrs["error.type"] = error
    if record.ttfb_ms is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = record.ttfb_ms / 1000
    if team is not None:
        attrs["ccgate.team"] = team
    if record.session_id is not None:
        attrs["ccgate.session_id"] = record.session_id[:200]
    return attrs


def error_type(record: RequestRecord) -> str | None:
    """``error.type``: low cardinality, as the conventions ask (a reason or a status code)."""
    if record.outcome == "ok":
        return None
    if record.outcome == "rejected":
        return rejection_reason(record.status, record.error)
    if record.status is not None and record.status >= 400:
        return str(record.status)
    return record.outcome  # interrupted, or an upstream error before any status


class Telemetry:
    """A tracer provider of its own (never the process-global one) with a batch exporter.

    The finish hook only queues the row (a bounded queue put, about a microsecond); a thread of
    its own builds the span (tens of microseconds in the SDK) and hands it to the batch
    processor, so neither the span's cost nor the exporter's competes with the event loop in
    the request's path. Rows beyond ``MAX_PENDING`` are dropped, like spans beyond the SDK's
    queue."""

    def __init__(
        self, config: TelemetryConfig, *, policy: Policy, environ: Mapping[str, str]
    ) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.policy = policy
        exporter = OTLPSpanExporter(endpoint=config.endpoint, headers=dict(config.headers) or None)
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win; without them the service is ccgate.
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "ccgate"}))
        self._provider: TracerProvider = TracerProvider(resource=resource)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer: Tracer = self._provider.get_tracer("ccgate", __version__)
        self._failed = False
        self.dropped = 0
        self._rows: queue.Queue[tuple[RequestRecord, str | None] | None] = queue.Queue(
            maxsize=MAX_PENDING
        )
        self._worker = threading.Thread(target=self._run, name="ccgate-otel-spans", daemon=True)
        self._worker.start()
        log.info("exporting request spans over OTLP/HTTP to %s", config.shown(environ))

    def observe(self, record: RequestRecord) -> None:
        """Queue one final row for its span. Never blocks, never raises."""
        if record.path not in TRACED_PATHS:
            return
        try:
            self._rows.put_nowait((record, _team(self.policy)))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while (item := self._rows.get()) is not None:
            try:
                self._span(*item)
            except Exception as exc:  # a broken span loses that span, nothing else
                if not self._failed:
                    self._failed = True
                    log.warning("could not build a request span: %s", type(exc).__name__)

    def _span(self, record: RequestRecord, team: str | None) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        start_ns = int(record.started_at * 1_000_000_000)
        end_ns = start_ns + int((record.latency_ms or 0.0) * 1_000_000)
        attrs = attributes(record, team=team)
        name = f"chat {record.model[:100]}" if record.model else "chat"
        span = self._tracer.start_span(
            name, kind=SpanKind.CLIENT, start_time=start_ns, attributes=attrs
        )
        if "error.type" in attrs:
            span.set_status(Status(StatusCode.ERROR, str(attrs["error.type"])))
        span.end(end_time=end_ns)

    def close(self) -> None:
        """Flush what is queued, waiting at most ``CLOSE_TIMEOUT_S`` for the collector."""

        def drain_then_shut_down() -> None:
            self._rows.put(None)  # after every row already queued
            self._worker.join()
            self._provider.shutdown()

        closing = threading.Thread(target=drain_then_shut_down, name="ccgate-otel-close")
        closing.daemon = True
        closing.start()
        closing.join(CLOSE_TIMEOUT_S)


class FollowBundle:
    """Server mode without ``OTEL_*`` variables: export where the current bundle says, if it
    says anything, and move when a new bundle names another collector (or none).

    A new exporter is built on a thread (the first one imports the SDK: a fifth of a second the
    event loop must not spend); rows finishing meanwhile are held, then handed to it."""

    def __init__(self, governor: Governor, environ: Mapping[str, str]) -> None:
        self.governor = governor
        self.environ = environ
        self._entry: TelemetryEntry | None = None
        self._config: TelemetryConfig | None = None
        self._current: Telemetry | None = None
        self._lock = threading.Lock()  # the handover from the building thread
        self._generation = 0
        self._building = False
        self._held: list[RequestRecord] = []

    def observe(self, record: RequestRecord) -> None:
        bundle = self.governor.bundle
        entry = bundle.telemetry if bundle is not None else None
        if entry is not self._entry:  # a new bundle: a cheap identity check per request
            self._entry = entry
            self._switch(entry)
        current = self._current
        if current is not None:
            current.observe(record)
            return
        with self._lock:
            if self._current is not None:
                self._current.observe(record)
            elif self._building and len(self._held) < MAX_PENDING:
                self._held.append(record)

    def _switch(self, entry: TelemetryEntry | None) -> None:
        config = None
        if entry is not None:
            try:
                config = bundle_config(self.governor, entry)
            except Exception as exc:  # a bad entry costs the spans, never the request
                log.warning("cannot use the bundle's telemetry settings: %s", type(exc).__name__)
        if config == self._config:
            return  # re-signed, same collector: keep the exporter and its queue
        self._config = config
        with self._lock:
            self._generation += 1
            old, self._current = self._current, None
            self._building = config is not None
            self._held = []
        if old is not None:
            threading.Thread(target=old.close, name="ccgate-otel-close", daemon=True).start()
        if config is not None:
            threading.Thread(
                target=self._build, args=(config, self._generation), name="ccgate-otel-start",
                daemon=True,
            ).start()  # fmt: skip

    def _build(self, config: TelemetryConfig, generation: int) -> None:
        try:
            built: Telemetry | None = Telemetry(config, policy=self.governor, environ=self.environ)
        except ImportError as exc:
            log.warning("the bundle asks for OTLP export, but %s cannot be imported", exc.name)
            built = None
        except Exception as exc:
            log.warning("cannot start OTLP export: %s", type(exc).__name__)
            built = None
        with self._lock:
            stale = generation != self._generation
            if not stale:
                self._building = False
                if built is not None:
                    for record in self._held:
                        built.observe(record)
                    self._current = built
                self._held = []
        if stale and built is not None:
            built.close()  # the bundle moved on while it was starting

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            current, self._current = self._current, None
            self._building = False
        if current is not None:
            current.close()


def bundle_config(governor: Governor, entry: TelemetryEntry) -> TelemetryConfig:
    """The bundle's telemetry object as exporter settings, its headers unsealed."""
    from ccgate.policy.bundle import unseal

    headers: dict[str, str] = {}
    bundle = governor.bundle
    if entry.sealed_headers is not None and bundle is not None:
        opened = json.loads(
            unseal(entry.sealed_headers, device=governor.device, device_id=bundle.device_id)
        )
        headers = {str(k): str(v) for k, v in opened.items()}
    return TelemetryConfig(endpoint=entry.endpoint.rstrip("/") + "/v1/traces", headers=headers)


def _team(policy: Policy) -> str | None:
    if policy.mode != "server":
        return None
    bundle = getattr(policy, "bundle", None)  # the governor's current bundle
    team = getattr(bundle, "team", None)
    name = getattr(team, "name", None)
    return name if isinstance(name, str) else None


def start(policy: Policy, environ: Mapping[str, str]) -> SpanSink | None:
    """The telemetry the environment configures; else in server mode the bundle's; else None
    (also when the SDK is missing, or the environment turns it off)."""
    config = config_from_env(environ)
    if config is None:
        # The mode first: importing the governor brings the bundle's crypto (cryptography's
        # Rust library, 8 MB of a standalone daemon's memory) into a daemon that never uses it.
        if _disabled(environ) or policy.mode != "server":
            return None
        from ccgate.gateway.governor import Governor

        if not isinstance(policy, Governor):
            return None
        return FollowBundle(policy, environ)
    try:
        return Telemetry(config, policy=policy, environ=environ)
    except ImportError as exc:
        log.warning(
            "OTLP export is configured but the OpenTelemetry SDK cannot be imported (%s); "
            "reinstall ccgate to get opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http",
            exc.name,
        )
        return None
