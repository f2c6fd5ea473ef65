"""`ccgate server run --otlp-endpoint` and CCGATE_OTLP_HEADERS: read strictly, values never
shown in an error."""

from __future__ import annotations

import pytest

from ccgate.server.errors import ServerStateError
from ccgate.server.runner import check_otlp_endpoint, otlp_headers


def test_headers_are_read_like_otel_exporter_otlp_headers() -> None:
    environ = {"CCGATE_OTLP_HEADERS": "X-Api-Key=abc%3D%3D, dataset = ccgate ,,"}
    assert otlp_headers(environ) == {"x-api-key": "abc==", "dataset": "ccgate"}
    assert otlp_headers({}) == {}


@pytest.mark.parametrize("raw", ["no-equals-secretvalue", "=secretvalue"])
def test_a_malformed_header_list_is_refused_without_showing_a_value(raw: str) -> None:
    with pytest.raises(ServerStateError) as refused:
        otlp_headers({"CCGATE_OTLP_HEADERS": f"ok=1,{raw}"})
    assert "CCGATE_OTLP_HEADERS" in str(refused.value)
    assert "entry 2" in str(refused.value)
    assert "secretvalue" not in str(refused.value)


def test_the_endpoint_must_be_an_http_url() -> None:
    assert (
        check_otlp_endpoint(" https://otel.example.com:4318/ ") == "https://otel.example.com:4318"
    )
    for bad in ("otel.example.com:4318", "ftp://x", "https://"):
        with pytest.raises(ServerStateError, match="OTLP endpoint"):
            check_otlp_endpoint(bad)
