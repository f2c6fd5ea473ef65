"""The fake upstream for the benchmark, in its own process: ``python -m bench.upstream``.

``python -m tests.support.fake_upstream`` answers every request with a one-line text, which
makes a stream a dozen events long. The benchmark wants a typical answer (a few hundred tokens,
so a couple of hundred SSE events) because the proxy's per-chunk work is part of what it
measures, so this runs the same ``FakeUpstream`` with that answer as its default scenario, and
without the request log a test reads back (thousands of 100 KB bodies would only grow the
process and skew nothing we report). It prints ``fake upstream on <url>`` once listening and
serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
from collections.abc import Sequence

from bench.workload import answer_scenario
from tests.support.fake_upstream import DEFAULT_API_KEY, FakeUpstream, ReceivedRequest

DEFAULT_TEXT_CHARS = 1_200


class _BenchUpstream(FakeUpstream):
    def _prepare(self) -> None:
        super()._prepare()
        assert self._socket is not None
        # The fake makes its listening socket with protocol 0, and asyncio only turns Nagle
        # off on sockets that say IPPROTO_TCP, so every answer would wait ~40 ms for the
        # client's delayed ACK between its header and body writes. Accepted sockets inherit
        # TCP_NODELAY from the listener (Linux, macOS), so setting it here gives the baseline
        # a fast upstream, as api.anthropic.com is.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _record(self, request: ReceivedRequest) -> None:
        """Keep nothing: no benchmark reads the requests back."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.upstream",
        description="Serve the fake Anthropic API with a typical answer until stopped.",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--text-chars",
        type=int,
        default=DEFAULT_TEXT_CHARS,
        help="length of the streamed answer text (about 4 characters per token)",
    )
    args = parser.parse_args(argv)
    fake = _BenchUpstream(host="127.0.0.1", port=args.port, api_key=DEFAULT_API_KEY)
    fake.default = answer_scenario(text_chars=args.text_chars)
    # uvicorn re-raises the SIGINT it handled once it has shut down cleanly.
    with contextlib.suppress(KeyboardInterrupt):
        fake.serve_forever(announce=lambda url: print(f"fake upstream on {url}", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
