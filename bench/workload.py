"""What the benchmark sends: a request shaped like Claude Code's, and the answer the fake gives.

Claude Code 2.1 sends 76-115 KB per turn (see /work/shared/claude-code-notes.md): a billing
header text block and cached system blocks, 24 tool definitions with JSON schemas, the
conversation so far, metadata, thinking and context-management options. The proxy forwards
those bytes unchanged but must still read and JSON-parse them, so the body's size and nesting
are what matter here, not its wording. The prose is generated from a fixed seed (the same bytes
on every run) and the long system block is padded so the body is exactly ``target_bytes``.
"""

from __future__ import annotations

import json
import random
import uuid
from typing import Any

from tests.support.fake_upstream import DEFAULT_MODEL, Scenario, Usage

DEFAULT_BODY_BYTES = 100 * 1024
MESSAGES_PATH = "/v1/messages?beta=true"
CLAUDE_CODE_VERSION = "2.1.332"

# The 24 tools Claude Code offers by default; only the count and schema shapes matter here.
TOOL_NAMES = (
    "Task",
    "TaskOutput",
    "Bash",
    "Glob",
    "Grep",
    "ExitPlanMode",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "TodoWrite",
    "WebSearch",
    "KillShell",
    "AskUserQuestion",
    "Skill",
    "EnterPlanMode",
    "SlashCommand",
    "BashOutput",
    "MultiEdit",
    "LS",
    "ListMcpResourcesTool",
    "ReadMcpResourceTool",
    "LSP",
)

_WORDS = (
    "the tool reads files in the working directory and returns their content with line numbers "
    "use absolute paths prefer the dedicated search tools over shell commands when a command "
    "fails explain why before retrying keep edits small and verify them with the test suite "
    "never commit secrets ask the user before destructive operations such as force pushes or "
    "deleting branches output is truncated after a limit so read large files in parts"
).split()


def prose(rng: random.Random, *, words: int) -> str:
    """Sentence-like filler: plain ASCII, so JSON escaping never changes its length."""
    picked = [rng.choice(_WORDS) for _ in range(words)]
    sentences = [" ".join(picked[i : i + 14]).capitalize() + "." for i in range(0, words, 14)]
    return " ".join(sentences)


def _tool(rng: random.Random, name: str) -> dict[str, Any]:
    properties: dict[str, Any] = {
        "description": {"type": "string", "description": prose(rng, words=24)},
        "path": {"type": "string", "description": prose(rng, words=12)},
        "timeout": {"type": "number", "description": prose(rng, words=10)},
        "options": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "value": {"type": "string"},
                    "enabled": {"type": "boolean", "default": True},
                },
                "required": ["key", "value"],
                "additionalProperties": False,
            },
        },
    }
    return {
        "name": name,
        "description": prose(rng, words=420),
        "input_schema": {
            "type": "object",
            "properties": properties,
            "required": ["description"],
            "additionalProperties": False,
            "$schema": "http://json-schema.org/draft-07/schema#",
        },
    }


def _messages(rng: random.Random) -> list[dict[str, Any]]:
    """A short conversation: a question, a tool call, its result, and the next question."""
    tool_use_id = "toolu_01" + "A" * 22
    return [
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "<system-reminder>" + prose(rng, words=220) + "</system-reminder>",
                },
                {"type": "text", "text": "Why does the ledger test fail on CI but not locally?"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": prose(rng, words=30)},
                {
                    "type": "tool_use",
                    "id": tool_use_id,
                    "name": "Read",
                    "input": {"file_path": "/work/project/tests/test_ledger.py"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": tool_use_id,
                    "content": prose(rng, words=900),
                },
                {
                    "type": "text",
                    "text": "Now fix it.",
                    "cache_control": {"type": "ephemeral"},
                },
            ],
        },
    ]


def _body(*, system_text: str, stream: bool) -> dict[str, Any]:
    rng = random.Random(2_197)
    session = str(uuid.UUID(int=rng.getrandbits(128)))
    return {
        "model": DEFAULT_MODEL,
        "messages": _messages(rng),
        "system": [
            {
                "type": "text",
                "text": f"x-anthropic-billing-header: cc_version={CLAUDE_CODE_VERSION}; "
                "cc_entrypoint=sdk-cli",
            },
            {
                "type": "text",
                "text": "You are Claude Code, Anthropic's official CLI for Claude.",
                "cache_control": {"type": "ephemeral"},
            },
            {"type": "text", "text": system_text, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [_tool(rng, name) for name in TOOL_NAMES],
        "metadata": {"user_id": f"user_{'0' * 64}_account__session_{session}"},
        "max_tokens": 32000,
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "stream": stream,
    }


def _encode(body: dict[str, Any]) -> bytes:
    # Claude Code (a JavaScript program) sends compact JSON.
    return json.dumps(body, separators=(",", ":")).encode()


def request_body(*, stream: bool, target_bytes: int = DEFAULT_BODY_BYTES) -> bytes:
    """The JSON body, exactly ``target_bytes`` long (or its natural size if that is larger)."""
    system_text = prose(random.Random(7), words=40)
    base = len(_encode(_body(system_text=system_text, stream=stream)))
    padding = max(0, target_bytes - base)
    filler = (prose(random.Random(11), words=padding // 4 + 8) + " ")[:padding]
    return _encode(_body(system_text=system_text + filler, stream=stream))


def claude_code_headers(*, token: str, session_id: str) -> dict[str, str]:
    """The headers Claude Code sends with ``ANTHROPIC_AUTH_TOKEN`` set."""
    return {
        "authorization": f"Bearer {token}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
        "fine-grained-tool-streaming-2025-05-14,context-management-2025-06-27",
        "content-type": "application/json",
        "accept": "application/json",
        "x-app": "cli",
        "user-agent": f"claude-cli/{CLAUDE_CODE_VERSION} (external, sdk-cli)",
        "x-claude-code-session-id": session_id,
        "x-stainless-lang": "js",
        "x-stainless-retry-count": "0",
        "x-stainless-timeout": "600",
    }


def answer_scenario(*, text_chars: int) -> Scenario:
    """A typical short answer: ~``text_chars`` of streamed text on a mostly cached prompt."""
    text = prose(random.Random(3), words=text_chars // 4 + 8)[:text_chars]
    usage = Usage(
        input_tokens=3,
        output_tokens=max(1, text_chars // 4),
        cache_creation_input_tokens=1_520,
        cache_read_input_tokens=24_800,
    )
    return Scenario(text=text, usage=usage)
