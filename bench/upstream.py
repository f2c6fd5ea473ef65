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
from tests.support.fake_upstream import DEFAULT_API_KEY, FakeUpstream, ReceivedRequest, Scenario

DEFAULT_TEXT_CHARS = 1_200
# A request carrying this header gets a slow stream: events spaced by its value in ms. The
# slow-stream phase (Claude Code's subagent fan-out) sends it; ccgate forwards it unchanged.
SLOW_HEADER = "x-bench-event-delay-ms"
SLOW_TEXT_CHARS = 80  # about 20 SSE events, so one slow stream lasts about a second at 50 ms


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

    _slow: Scenario | None = None

    def _record(self, request: ReceivedRequest) -> None:
        """Keep nothing: no benchmark reads the requests back; only note a slow-stream ask.

        ``_record`` and ``_next_scenario`` run back to back for each request on the fake's one
        event loop, with no await between them, so the note cannot leak to another request.
        """
        delay = request.headers.get(SLOW_HEADER)
        self._slow = None
        if delay is not None:
            slow = answer_scenario(text_chars=SLOW_TEXT_CHARS)
            self._slow = Scenario(text=slow.text, usage=slow.usage, delay_s=float(delay) / 1000)

    def _next_scenario(self) -> Scenario:
        slow, self._slow = self._slow, None
        return slow if slow is not None else super()._next_scenario()


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
