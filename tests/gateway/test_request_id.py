"""Request ids: uuid4's format (the ledger, the x-ccgate-request-id header and the server keep
them), unique, and never shared with a forked child."""

from __future__ import annotations

import os
import sys
import uuid

import pytest

from ccgate.gateway import proxy


def test_an_id_is_a_version_4_uuid_in_32_hex_digits_and_none_repeats() -> None:
    ids = [proxy._request_id() for _ in range(2_000)]  # several random batches
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert parsed.hex == value and len(value) == 32
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


@pytest.mark.skipif(sys.platform == "win32", reason="no fork")
def test_a_forked_child_draws_its_own_ids() -> None:
    proxy._request_id()  # a batch is half used in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, proxy._request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert uuid.UUID(child).version == 4
    assert child != proxy._request_id()
