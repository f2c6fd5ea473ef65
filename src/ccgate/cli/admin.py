"""``ccgate admin``: manage a ccgate server over its admin API.

Every command builds one request with ``ccgate.client.admin`` and renders the answer: JSON with
``--json``, a table otherwise. Where the server is and the admin token come from the group's
options or their environment variables (prefer the variable: a token on the command line is
visible to other local users in the process list).
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from ccgate._format import format_utc
from ccgate.cli import console
from ccgate.client.admin import CCGATE_ADMIN_TOKEN, CCGATE_SERVER_URL, DEFAULT_SERVER_URL

if TYPE_CHECKING:
    from ccgate.client.admin import AdminClient

app = typer.Typer(
    help="Administer a ccgate server: providers, customers, teams, keys, usage, audit.",
    no_args_is_help=True,
)
providers_app = typer.Typer(
    help="Upstream provider keys the server hands out sealed.", no_args_is_help=True
)
customers_app = typer.Typer(help="Customers: the top budget level.", no_args_is_help=True)
teams_app = typer.Typer(help="Teams: keys share their budget.", no_args_is_help=True)
prices_app = typer.Typer(
    help="A price table override that bundles carry to every daemon.", no_args_is_help=True
)
keys_app = typer.Typer(help="Virtual keys (sk-cg-...) for developers and CI.", no_args_is_help=True)
app.add_typer(providers_app, name="providers")
app.add_typer(customers_app, name="customers")
app.add_typer(teams_app, name="teams")
devices_app = typer.Typer(
    help="Devices enrolled for keys: approve or revoke them.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
app.add_typer(devices_app, name="devices")
app.add_typer(prices_app, name="prices")

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
BudgetOption = Annotated[
    str | None, typer.Option("--budget", help="Spend limit in USD per period, e.g. 50 or 12.5.")
]
PeriodOption = Annotated[
    str | None, typer.Option("--period", help="Budget period: 1d, 1w or 1M (calendar UTC).")
]
RollingOption = Annotated[
    bool, typer.Option("--rolling", help="Rolling window (last 24h / 7d / 30d) instead.")
]


@dataclass(frozen=True)
class _Conn:
    server: str
    token: str | None


@app.callback()
def _root(
    ctx: typer.Context,
    server: Annotated[
        str,
        typer.Option("--server", help="The ccgate server URL.", envvar=CCGATE_SERVER_URL),
    ] = DEFAULT_SERVER_URL,
    admin_token: Annotated[
        str | None,
        typer.Option(
            "--admin-token",
            help="Admin token from `ccgate server init` (prefer the environment variable).",
            envvar=CCGATE_ADMIN_TOKEN,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Talk to a ccgate server's admin API."""
    ctx.obj = _Conn(server=server, token=admin_token)


@contextmanager
def _client(ctx: typer.Context) -> Iterator[AdminClient]:
    from ccgate.client.admin import AdminClient

    conn = ctx.find_object(_Conn)
    assert conn is not None  # set by the group callback
    with AdminClient(base_url=conn.server, token=conn.token) as client:
        yield client


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], *, empty: str) -> None:
    from rich.table import Table

    if not rows:
        console.info(empty)
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.out.print(table)


def _as_json(data: Any, json_output: bool) -> bool:
    """Print the server's answer as JSON when --json was given; True if it was printed."""
    if json_output:
        console.print_json(data)
    return json_output


def _cell(value: Any) -> str:
    from rich.markup import escape

    if value is None:
        return "-"
    if isinstance(value, list):
        return escape(", ".join(map(str, value))) or "all"
    if isinstance(value, dict) and "limit_micros" in value:
        return _budget_text(value)
    return escape(str(value))


def _budget_text(budget: dict[str, Any]) -> str:
    from ccgate.cli.render import per_period, usd

    period = per_period(budget["period"], rolling=bool(budget.get("rolling")))
    return f"{usd(budget['limit_micros'] / 1_000_000)} {period}"


def _when(ts: float | None) -> str:
    return "-" if ts is None else format_utc(ts)


# ------------------------------------------------------------------------ providers


AnthropicKeyIdOption = Annotated[
    str | None,
    typer.Option(
        "--anthropic-key-id",
        help="The key's id at Anthropic (apikey_..., Console > API keys), for `admin reconcile`.",
    ),
]


@providers_app.command("add")
def providers_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Provider (pool) name, e.g. anthropic.")],
    base_url: Annotated[
        str | None,
        typer.Option(
            "--base-url",
            help="The provider's API base URL (bedrock, vertex, foundry: derived from the "
            "region, location or resource unless given).",
        ),
    ] = None,
    api_key_stdin: Annotated[
        bool, typer.Option("--api-key-stdin", help="Read the provider API key from stdin.")
    ] = False,
    kind: Annotated[
        str | None,
        typer.Option(
            "--kind",
            help="anthropic, bedrock, vertex or foundry (default: NAME when it is one). Bedrock "
            "and Vertex take no key: each daemon uses its machine's AWS or Google credentials.",
        ),
    ] = None,
    priority: Annotated[
        int, typer.Option("--priority", min=0, help="Lower numbers are tried first.")
    ] = 0,
    weight: Annotated[int, typer.Option("--weight", min=1, help="Share within a priority.")] = 1,
    anthropic_key_id: AnthropicKeyIdOption = None,
    connect_timeout: Annotated[
        float | None,
        typer.Option("--connect-timeout", min=0.001, help="Seconds to connect [default: 10]."),
    ] = None,
    first_byte_timeout: Annotated[
        float | None,
        typer.Option(
            "--first-byte-timeout",
            min=0.001,
            help="Seconds until a non-streaming answer starts [default: 600].",
        ),
    ] = None,
    stream_first_byte_timeout: Annotated[
        float | None,
        typer.Option(
            "--stream-first-byte-timeout",
            min=0.001,
            help="Seconds until a stream's headers and first event [default: 60].",
        ),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout", min=0.001, help="Seconds of silence within an answer [default: 300]."
        ),
    ] = None,
    region: Annotated[str | None, typer.Option("--region", help="bedrock: AWS region.")] = None,
    profile_prefix: Annotated[
        str | None,
        typer.Option(
            "--profile-prefix",
            help="bedrock: inference-profile prefix (global, us, eu, apac, jp, au, us-gov).",
        ),
    ] = None,
    aws_profile: Annotated[
        str | None,
        typer.Option("--aws-profile", help="bedrock: named profile of the machines' AWS config."),
    ] = None,
    project: Annotated[
        str | None, typer.Option("--project", help="vertex: Google Cloud project id.")
    ] = None,
    location: Annotated[
        str | None, typer.Option("--location", help="vertex: region, or global.")
    ] = None,
    resource: Annotated[
        str | None, typer.Option("--resource", help="foundry: the Foundry resource name.")
    ] = None,
    model_map: Annotated[
        list[str] | None,
        typer.Option(
            "--model-map",
            help="CLAUDE_ID=PROVIDER_ID, repeatable: extends the shipped model table.",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Add a provider entry; several adds under one NAME form a pool. The key is never shown."""
    from ccgate.errors import CcgateError
    from ccgate.policy import provider_kinds

    options: dict[str, object] = {
        option: value
        for option, value in (
            ("region", region),
            ("profile_prefix", profile_prefix),
            ("aws_profile", aws_profile),
            ("project", project),
            ("location", location),
            ("resource", resource),
        )
        if value is not None
    }
    if model_map:
        pairs = [entry.partition("=") for entry in model_map]
        if any(not sep or not a or not b for a, sep, b in pairs):
            raise CcgateError("--model-map takes CLAUDE_ID=PROVIDER_ID.")
        options["models"] = {a.strip(): b.strip() for a, _, b in pairs}
    body: dict[str, object] = {"name": name, "priority": priority, "weight": weight}
    body |= ({"kind": kind} if kind else {}) | ({"options": options} if options else {})
    if base_url is not None:
        body["base_url"] = base_url
    if provider_kinds.needs_key(kind or name) or api_key_stdin:
        if not api_key_stdin:
            raise CcgateError(
                "Pass --api-key-stdin and pipe the key in, so it stays out of history."
            )
        api_key = sys.stdin.readline().strip()
        if not api_key:
            raise CcgateError("No API key on stdin.")
        body["api_key"] = api_key
    if anthropic_key_id:
        body["anthropic_key_id"] = anthropic_key_id
    timeouts = {
        "connect_s": connect_timeout,
        "first_byte_s": first_byte_timeout,
        "stream_first_byte_s": stream_first_byte_timeout,
        "idle_s": idle_timeout,
    }
    if any(v is not None for v in timeouts.values()):
        body["timeouts"] = {k: v for k, v in timeouts.items() if v is not None}
    with _client(ctx) as client:
        provider = client.add_provider(body)
    if json_output:
        console.print_json(provider)
    else:
        console.info(
            f"Added provider {provider['name']} ({provider['id']}, {provider['base_url']})."
        )


@providers_app.command("list")
def providers_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Provider entries, by name then priority (never a key)."""
    with _client(ctx) as client:
        data = client.providers()
    if not _as_json(data, json_output):
        rows = [
            {**p, "key id": p.get("anthropic_key_id"), "key": _key_status(p)}
            for p in data["providers"]
        ]
        columns = ("name", "id", "base_url", "priority", "weight", "key id", "key")
        _table(rows, columns, empty="No providers yet.")


def _key_status(provider: dict[str, Any]) -> str:
    """ "ok", or the status a daemon saw and when: "401 at 2026-11-30 16:00 UTC"."""
    if provider.get("key_status") != "failing":
        return "ok"
    at = provider.get("key_failed_at")
    when = f" at {format_utc(at)}" if isinstance(at, int | float) else ""
    return f"{provider.get('key_failed_status') or 'failing'}{when}"


@providers_app.command("update")
def providers_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Provider (pool) name.")],
    anthropic_key_id: Annotated[
        str,
        typer.Option(
            "--anthropic-key-id",
            help="The key's id at Anthropic (apikey_...), or none to clear it.",
        ),
    ],
    provider_id: Annotated[
        str | None, typer.Option("--id", help="The entry, when the pool has several.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Record which Anthropic API key an entry holds, so `admin reconcile` can match the usage
    report's api_key_id to it."""
    value = None if anthropic_key_id.strip().lower() == "none" else anthropic_key_id.strip()
    with _client(ctx) as client:
        data = client.update_provider(name, {"anthropic_key_id": value}, provider_id=provider_id)
    if not _as_json(data, json_output):
        console.info(
            f"Provider {data['name']} ({data['id']}): Anthropic key id "
            f"{data['anthropic_key_id'] or 'cleared'}."
        )


@providers_app.command("remove")
def providers_remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Provider (pool) name.")],
    provider_id: Annotated[
        str | None, typer.Option("--id", help="Remove only this entry of the pool.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Remove a provider pool, or one entry of it."""
    with _client(ctx) as client:
        data = client.remove_provider(name, provider_id=provider_id)
    if not _as_json(data, json_output):
        console.info(
            f"Removed {data['removed']} provider entr{'y' if data['removed'] == 1 else 'ies'}."
        )


# ------------------------------------------------------------------------ customers and teams


@customers_app.command("create")
def customers_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Customer name.")],
    budget: BudgetOption = None,
    period: PeriodOption = None,
    rolling: RollingOption = False,
    json_output: JsonOption = False,
) -> None:
    """Create a customer, optionally with a budget."""
    from ccgate.client.admin import budget_body

    body = {"name": name, "budget": budget_body(budget, period=period, rolling=rolling)}
    with _client(ctx) as client:
        data = client.create_customer(body)
    if not _as_json(data, json_output):
        console.info(f"Created customer {data['name']} ({data['id']}).")


@customers_app.command("list")
def customers_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Customers and their budgets."""
    with _client(ctx) as client:
        data = client.customers()
    if not _as_json(data, json_output):
        _table(data["customers"], ("name", "id", "budget"), empty="No customers yet.")


@teams_app.command("create")
def teams_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Team name.")],
    customer: Annotated[
        str | None, typer.Option("--customer", help="The customer the team belongs to.")
    ] = None,
    budget: BudgetOption = None,
    period: PeriodOption = None,
    rolling: RollingOption = False,
    repo_attribution: RepoAttributionOption = None,
    session_budget: SessionBudgetOption = None,
    session_rpm: SessionRpmOption = None,
    json_output: JsonOption = False,
) -> None:
    """Create a team, optionally under a customer and with a budget."""
    from ccgate.client.admin import budget_body

    body: dict[str, Any] = {
        "name": name,
        "customer": customer,
        "budget": budget_body(budget, period=period, rolling=rolling),
    }
    if repo_attribution is not None:
        body["repo_attribution"] = repo_attribution
    body |= _session_cap_fields(session_budget, session_rpm)
    with _client(ctx) as client:
        data = client.create_team(body)
    if not _as_json(data, json_output):
        console.info(f"Created team {data['name']} ({data['id']}).")


@teams_app.command("list")
def teams_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Teams, their customers and budgets."""
    with _client(ctx) as client:
        data = client.teams()
    if not _as_json(data, json_output):
        rows = [{**t, "session caps": _session_caps_text(t)} for t in data["teams"]]
        columns: tuple[str, ...] = ("name", "id", "customer", "budget")
        if any(r["session caps"] != "-" for r in rows):  # a column only when some team has caps
            columns += ("session caps",)
        _table(rows, columns, empty="No teams yet.")


@teams_app.command("update")
def teams_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Team name.")],
    budget: BudgetOption = None,
    period: PeriodOption = None,
    rolling: RollingOption = False,
    repo_attribution: RepoAttributionOption = None,
    session_budget: SessionBudgetOption = None,
    session_rpm: SessionRpmOption = None,
    json_output: JsonOption = False,
) -> None:
    """Change a team: only the options given change. `none` clears --budget and
    --session-budget; 0 clears --session-rpm."""
    from ccgate.client.admin import budget_body
    from ccgate.errors import CcgateError

    body: dict[str, Any] = {}
    if budget is not None and budget.lower() == "none":
        body["budget"] = None
    elif budget is not None or period is not None or rolling:
        body["budget"] = budget_body(budget, period=period, rolling=rolling)
    if repo_attribution is not None:
        body["repo_attribution"] = repo_attribution
    body |= _session_cap_fields(session_budget, session_rpm)
    if not body:
        raise CcgateError("Nothing to change: give at least one option (see --help).")
    with _client(ctx) as client:
        data = client.update_team(name, body)
    if _as_json(data, json_output):
        return
    attribution = "on" if data["repo_attribution"] else "off"
    console.info(
        f"Updated team {data['name']}: budget {_cell(data['budget'])}, repository attribution "
        f"{attribution}, session caps {_session_caps_text(data)}."
    )


# ------------------------------------------------------------------------ keys

TeamOption = Annotated[str | None, typer.Option("--team", help="Team the key belongs to.")]
CustomerOption = Annotated[
    str | None, typer.Option("--customer", help="Customer the key belongs to (without a team).")
]
ModelsOption = Annotated[
    str | None,
    typer.Option(
        "--models", help="Allowed models, comma separated; patterns like claude-sonnet-*."
    ),
]
RpmOption = Annotated[int | None, typer.Option("--rpm", min=0, help="Requests per minute.")]
TpmOption = Annotated[int | None, typer.Option("--tpm", min=0, help="Tokens per minute.")]
ExpiresOption = Annotated[
    str | None, typer.Option("--expires", help="Expiry: YYYY-MM-DD[THH:MM] UTC, or never.")
]
GraceOption = Annotated[
    str | None,
    typer.Option(
        "--offline-grace",
        help="USD a daemon may spend beyond its budget lease while the server is unreachable "
        "(default 0; none clears).",
    ),
]
TokenBudgetOption = Annotated[
    str | None,
    typer.Option(
        "--token-budget",
        help="Tokens (input + output + cache writes) per --period, for seat users; none clears. "
        "--period and --rolling apply to it as to --budget.",
    ),
]
AuthOption = Annotated[
    Literal["provider", "passthrough"] | None,
    typer.Option(
        "--auth", help="provider: the server's provider keys; passthrough: the user's own."
    ),
]


MaxDevicesOption = Annotated[
    int | None,
    typer.Option(
        "--max-devices",
        min=1,
        help="Approved devices the key may have (default 1); for a --ci key, enrolments per "
        "24 hours (default 20).",
    ),
]
CiOption = Annotated[
    bool | None,
    typer.Option(
        "--ci/--no-ci",
        help="A CI key: each runner enrols its device without approval, --max-devices a day.",
    ),
]
RepoAttributionOption = Annotated[
    bool | None,
    typer.Option(
        "--repo-attribution/--no-repo-attribution",
        help="Usage records name the git repository and branch of each Claude Code session "
        "(the default); --no-repo-attribution keeps those names off the server.",
    ),
]
SessionBudgetOption = Annotated[
    str | None,
    typer.Option(
        "--session-budget",
        help="USD one Claude Code session may spend; past it the session's requests are "
        "refused (402) until a new session starts. none clears.",
    ),
]
SessionRpmOption = Annotated[
    int | None,
    typer.Option(
        "--session-rpm",
        min=0,
        help="Requests one Claude Code session may make per minute (stops runaway loops; "
        "429). 0 clears.",
    ),
]


def _session_cap_fields(budget: str | None, rpm: int | None) -> dict[str, Any]:
    """--session-budget/--session-rpm as API fields; "none" / 0 clear them (null)."""
    from ccgate.accounting.pricing import usd_micros

    fields: dict[str, Any] = {}
    if budget is not None:
        none = budget.strip().lower() in ("none", "off")
        micros = None if none else usd_micros(budget, option="--session-budget")
        fields["session_budget_micros"] = micros or None
    if rpm is not None:
        fields["session_rpm"] = rpm or None
    return fields


def _session_caps_text(row: dict[str, Any]) -> str:
    from ccgate.cli.render import usd

    parts = []
    if row.get("session_budget_micros"):
        parts.append(f"{usd(row['session_budget_micros'] / 1_000_000)}/session")
    if row.get("session_rpm"):
        parts.append(f"{row['session_rpm']} rpm/session")
    return ", ".join(parts) or "-"


EnrolmentCodeOption = Annotated[
    bool,
    typer.Option(
        "--enrolment-code",
        help="Issue a one-time code (shown once, valid 7 days) that approves one device at "
        "enrolment: `ccgate login --code`. A key that had a code gets no trust-on-first-use.",
    ),
]


def _print_code(data: dict[str, Any]) -> None:
    if data.get("enrolment_code"):
        console.info(
            f"Enrolment code: {data['enrolment_code']} (one device, until "
            f"{_when(data.get('enrolment_code_expires_at'))}; shown only now). The developer "
            "runs `ccgate login ... --code CODE`."
        )


def _key_fields(
    *,
    team: TeamOption = None,
    customer: CustomerOption = None,
    budget: BudgetOption = None,
    period: PeriodOption = None,
    rolling: RollingOption = False,
    models: ModelsOption = None,
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    expires: ExpiresOption = None,
    auth: AuthOption = None,
    offline_grace: GraceOption = None,
    token_budget: TokenBudgetOption = None,
    max_devices: MaxDevicesOption = None,
    ci: CiOption = None,
    enrolment_code: EnrolmentCodeOption = False,
    repo_attribution: RepoAttributionOption = None,
    session_budget: SessionBudgetOption = None,
    session_rpm: SessionRpmOption = None,
) -> dict[str, Any]:
    """The options given, as API fields (none given: none sent). 0 clears --rpm/--tpm.

    Its parameters are also the options of `keys create` and `keys update` (``_key_options``)."""
    from ccgate.client.admin import budget_body, models_list, parse_expiry

    fields: dict[str, Any] = {}
    if team is not None:
        fields["team"] = None if team.lower() == "none" else team
    if customer is not None:
        fields["customer"] = None if customer.lower() == "none" else customer
    if budget is not None and budget.lower() == "none":
        fields["budget"] = None
    elif budget is not None or ((period is not None or rolling) and token_budget is None):
        fields["budget"] = budget_body(budget, period=period, rolling=rolling)
    fields |= _limits_fields(
        offline_grace=offline_grace, token_budget=token_budget, period=period, rolling=rolling
    )
    if models is not None:
        fields["models"] = models_list(models)
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None:
            fields[name] = value or None
    if expires is not None:
        fields["expires_at"] = parse_expiry(expires)
    if auth is not None:
        fields["auth"] = auth
    if max_devices is not None:
        fields["max_devices"] = max_devices
    if ci is not None:
        fields["ci"] = ci
    if enrolment_code:
        fields["enrolment_code"] = True
    if repo_attribution is not None:
        fields["repo_attribution"] = repo_attribution
    fields |= _session_cap_fields(session_budget, session_rpm)
    return fields


def _key_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` the parameters of ``_key_fields`` as options, before its ``--json``.

    `keys create` and `keys update` take the same options; Typer reads a command's
    options from its signature, so they are declared once and the command gets them as
    ``**options``."""
    own = [
        p
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    shared = list(inspect.signature(_key_fields, eval_str=True).parameters.values())
    last = own.pop()  # --json stays the last option, as in every other command
    params = [p.replace(kind=p.POSITIONAL_OR_KEYWORD) for p in (*own, *shared, last)]
    command.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
    return command


def _limits_fields(
    *, offline_grace: str | None, token_budget: str | None, period: str | None, rolling: bool
) -> dict[str, Any]:
    from ccgate.accounting.pricing import usd_micros
    from ccgate.client.admin import token_budget_body

    fields: dict[str, Any] = {}
    if offline_grace is not None:
        none = offline_grace.strip().lower() == "none"
        fields["offline_grace_micros"] = (
            0 if none else usd_micros(offline_grace, option="--offline-grace")
        )
    if token_budget is not None:
        fields["token_budget"] = (
            None
            if token_budget.strip().lower() == "none"
            else token_budget_body(token_budget, period=period, rolling=rolling)
        )
    return fields


@keys_app.command("create")
@_key_options
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Key name, e.g. the developer or the CI job.")],
    json_output: JsonOption = False,
    **options: Any,
) -> None:
    """Create a virtual key. The key is printed once and cannot be shown again.

    Its first device is approved when it enrols (unless --enrolment-code); every further one
    waits for `ccgate admin devices approve`, up to --max-devices."""
    from ccgate.errors import CcgateError

    if options["team"] and options["customer"]:
        raise CcgateError("Give --team or --customer, not both: a team already has its customer.")
    fields = _key_fields(**options)
    with _client(ctx) as client:
        data = client.create_key({"name": name, **fields})
    if _as_json(data, json_output):
        return
    console.out.print(data["key"])
    console.info(
        f"Created key {data['name']} ({data['id']}). This is the only time the key is shown: "
        "store it now, it will not be shown again."
    )
    _print_code(data)


@keys_app.command("list")
def keys_list(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """Virtual keys (their prefixes, never the keys)."""
    with _client(ctx) as client:
        data = client.keys()
    if _as_json(data, json_output):
        return
    rows = [{**k, "state": _key_state(k)} for k in data["keys"]]
    columns = ("name", "prefix", "team", "customer", "budget", "models", "state")
    _table(rows, columns, empty="No keys yet.")


def _grace_text(micros: int | None) -> str:
    from ccgate.cli.render import usd

    return usd((micros or 0) / 1_000_000)


def _token_budget_text(budget: dict[str, Any] | None) -> str:
    if budget is None:
        return "-"
    from ccgate.cli.render import per_period

    period = per_period(budget["period"], rolling=bool(budget.get("rolling")))
    return f"{budget['limit_tokens']:,} tokens {period}"


def _key_state(key: dict[str, Any]) -> str:
    if key["revoked_at"] is not None:
        return f"revoked {_when(key['revoked_at'])}"
    if key["expires_at"] is not None:
        word = "expired" if key["expires_at"] <= time.time() else "expires"
        return f"{word} {_when(key['expires_at'])}"
    return "active"


@keys_app.command("show")
def keys_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Key name.")],
    json_output: JsonOption = False,
) -> None:
    """One key's settings."""
    with _client(ctx) as client:
        data = client.key(name)
    _show_key(data, json_output=json_output)


def _show_key(data: dict[str, Any], *, json_output: bool) -> None:
    from rich.table import Table

    if _as_json(data, json_output):
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for field in ("name", "id", "prefix", "team", "customer", "budget", "models", "rpm", "tpm"):
        table.add_row(field, _cell(data.get(field)))
    table.add_row("auth", data["auth"])
    table.add_row("offline grace", _grace_text(data.get("offline_grace_micros")))
    table.add_row("token budget", _token_budget_text(data.get("token_budget")))
    table.add_row("session caps", _session_caps_text(data))
    kind = "CI, per 24 h" if data.get("ci") else "approved"
    table.add_row("max devices", f"{data.get('max_devices', 1)} ({kind})")
    table.add_row("state", _key_state(data))
    table.add_row("created", _when(data["created_at"]))
    console.out.print(table)


@keys_app.command("update")
@_key_options
def keys_update(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Key name.")],
    json_output: JsonOption = False,
    **options: Any,
) -> None:
    """Change a key: only the options given change. `none` clears --team, --customer,
    --budget; `never` clears --expires; 0 clears --rpm and --tpm; "" allows every model."""
    from ccgate.errors import CcgateError

    fields = _key_fields(**options)
    if not fields:
        raise CcgateError("Nothing to change: give at least one option (see --help).")
    with _client(ctx) as client:
        data = client.update_key(name, fields)
    _show_key(data, json_output=json_output)
    if not json_output:
        _print_code(data)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Key name.")],
    json_output: JsonOption = False,
) -> None:
    """Revoke a key: daemons using it stop at their next sync; the server refuses it at once."""
    with _client(ctx) as client:
        data = client.revoke_key(name)
    if not _as_json(data, json_output):
        console.info(
            f"Revoked key {data['name']} ({data['prefix']}...) at {_when(data['revoked_at'])}."
        )


# ------------------------------------------------------------------------ devices


@devices_app.command("list")
def devices_list(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Option("--key", help="Only this key's devices.")] = None,
    status: Annotated[
        Literal["pending", "approved", "revoked"] | None,
        typer.Option("--status", help="Only devices in this state."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Enrolled devices: which key, which machine, pending, approved or revoked."""
    with _client(ctx) as client:
        data = client.devices(key=key, status=status)
    if _as_json(data, json_output):
        return
    rows = [{**d, "enrolled": _when(d["created_at"])} for d in data["devices"]]
    _table(rows, ("id", "key", "name", "status", "enrolled"), empty="No devices.")


DeviceIdArgument = Annotated[str, typer.Argument(help="Device id (dev_...), from `devices list`.")]


@devices_app.command("approve")
def devices_approve(
    ctx: typer.Context, device_id: DeviceIdArgument, json_output: JsonOption = False
) -> None:
    """Approve a pending device: its next poll gets the key's policy and sealed provider keys."""
    with _client(ctx) as client:
        _device_done(client.approve_device(device_id), "approved", json_output=json_output)


@devices_app.command("revoke")
def devices_revoke(
    ctx: typer.Context, device_id: DeviceIdArgument, json_output: JsonOption = False
) -> None:
    """Revoke a device: the server refuses it at once; its daemon stops at its next poll."""
    with _client(ctx) as client:
        _device_done(client.revoke_device(device_id), "revoked", json_output=json_output)


def _device_done(data: dict[str, Any], state: str, *, json_output: bool) -> None:
    if not _as_json(data, json_output):
        console.info(f"Device {data['id']} ({data['name']}) of key {data['key']}: {state}.")


# ------------------------------------------------------------------------ prices


@prices_app.command("set")
def prices_set(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(help="A price table in the format of ccgate's data/prices.json.")
    ],
    json_output: JsonOption = False,
) -> None:
    """Make every bundle carry this price table instead of the daemons' shipped one."""
    import json

    from ccgate.errors import ConfigError

    try:
        table = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read the price table {file}: {exc}") from None
    with _client(ctx) as client:
        data = client.set_prices(table)
    if not _as_json(data, json_output):
        console.info(f"Bundles now carry the price table from {file}; daemons get it at next sync.")
        _say_repriced(data.get("repriced"))


def _say_repriced(repriced: Any) -> None:
    from ccgate.cli.render import money

    if isinstance(repriced, dict) and repriced.get("rows"):
        console.info(
            f"Re-priced {repriced['rows']} estimated usage record(s) the table now prices "
            f"exactly: {money(repriced['before_micros'])} -> {money(repriced['after_micros'])}."
        )


@prices_app.command("import")
def prices_import(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            help="A ccgate price table, or LiteLLM's model_prices_and_context_window.json."
        ),
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Map and check only: show the table, upload nothing.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Upload a price table; LiteLLM's file is mapped to Claude entries first, and every Claude
    row that could not be mapped is reported with the reason."""
    from ccgate.cli import admin_prices

    admin_prices.run_import(ctx, file, dry_run=dry_run, json_output=json_output)


@prices_app.command("show")
def prices_show(ctx: typer.Context) -> None:
    """Print the override as JSON (null when there is none)."""
    with _client(ctx) as client:
        console.print_json(client.prices())


@prices_app.command("clear")
def prices_clear(ctx: typer.Context) -> None:
    """Remove the override: daemons go back to their shipped price table."""
    with _client(ctx) as client:
        client.clear_prices()
    console.info("Removed the price table override.")


# ------------------------------------------------------------------------ usage and audit


@app.command("seats")
def seats(ctx: typer.Context, json_output: JsonOption = False) -> None:
    """How close each developer (key and device) runs to their seat plan's limits: the latest
    5-hour and 7-day quota their daemon saw (passthrough logins), fullest first."""
    from ccgate.cli.render import money
    from ccgate.cli.render import table as render_table

    with _client(ctx) as client:
        data = client.seats()
    if _as_json(data, json_output):
        return
    if not data["seats"]:
        console.info(
            "No seat quota reported yet: it comes from keys with --auth passthrough, whose "
            "developers sign in to Claude Code with a subscription."
        )
        return
    now = float(data["now"])
    numbers = ["5h", "7d", "resets in", "7d cost"]
    table = render_table("key", "device", *numbers, "plan", "seen", numeric=numbers)
    for seat in data["seats"]:
        table.add_row(
            _cell(seat["key"]),
            _cell(seat["device"]),
            _seat_percent(seat["five_hour"]),
            _seat_percent(seat["seven_day"]),
            _seat_reset(seat, now=now),
            money(seat["cost_micros_7d"]),
            _PLAN_WORDS.get(seat["status"], _cell(seat["status"])),
            _ago(now - float(seat["observed_at"])),
        )
    console.out.print(table)


_PLAN_WORDS = {"allowed": "ok", "allowed_warning": "warning", "rejected": "limited"}


def _seat_percent(window: dict[str, Any]) -> str:
    if window["percent"] is None:
        return "new" if window.get("window_reset") else "-"
    return f"{window['percent']}%"


def _seat_reset(seat: dict[str, Any], *, now: float) -> str:
    """When the binding window (the plan's representative claim) resets; the 5-hour one else."""
    from ccgate.gateway.statusbar import duration

    name = "seven_day" if seat.get("representative_claim") == "seven_day" else "five_hour"
    resets = seat[name].get("resets_at")
    if resets is None:
        return "-"
    window = "7d" if name == "seven_day" else "5h"
    return f"{duration(float(resets) - now)} ({window})"


def _ago(seconds: float) -> str:
    from ccgate.gateway.statusbar import duration

    return f"{duration(seconds)} ago"


@app.command("usage")
def usage(
    ctx: typer.Context,
    by: Annotated[
        Literal["key", "team", "customer", "repo"],
        typer.Option("--by", help="Group rows by this level, or by git repository."),
    ] = "key",
    since: Annotated[
        str, typer.Option("--since", help="Window: 30m, 24h, 7d, 2w, or a date (UTC).")
    ] = "30d",
    json_output: JsonOption = False,
) -> None:
    """Tokens and dollars every daemon reported, by key, team, customer or repository."""
    from ccgate.store import reports

    start = reports.parse_since(since, now=time.time())
    with _client(ctx) as client:
        data = client.usage(by=by, since=start)
    if _as_json(data, json_output):
        return
    _usage_table(data, by=by)


def _usage_table(data: dict[str, Any], *, by: str) -> None:
    from ccgate.cli.render import money, tokens, usd
    from ccgate.cli.render import table as render_table

    labels = {
        "key": ["key", "team", "customer"],
        "team": ["team", "customer"],
        "customer": ["customer"],
        "repo": ["repo"],
    }
    numbers = ["requests", "input", "output", "cache write", "cache read", "cost"]
    table = render_table(*labels[by], *numbers, numeric=numbers)

    def figures(row: dict[str, Any]) -> list[str]:
        return [
            str(row["requests"]),
            tokens(row["input_tokens"]),
            tokens(row["output_tokens"]),
            tokens(row["cache_creation_input_tokens"]),
            tokens(row["cache_read_input_tokens"]),
            usd(row["cost_usd"]),
        ]

    for row in data["rows"]:
        table.add_row(*(_cell(row.get(label)) for label in labels[by]), *figures(row))
    pad = [""] * (len(labels[by]) - 1)
    table.add_row("[bold]total[/bold]", *pad, *figures(data["totals"]))
    console.out.print(table)
    totals = data["totals"]
    if totals.get("estimated_requests"):
        console.out.print(
            f"{totals['estimated_requests']} request(s) priced as estimates (a model the price "
            "table does not name, an unverified price, a regional endpoint; see `ccgate prices`)."
        )
    if totals.get("repriced"):
        console.out.print(
            f"Re-priced: {totals['repriced']} request(s) first priced as estimates were re-priced "
            f"when the price table learned their model ({money(totals['repriced_delta_micros'])}"
            " in all)."
        )


@app.command("reconcile")
def reconcile(
    ctx: typer.Context,
    usage_report: Annotated[
        Path,
        typer.Option(
            "--usage-report",
            help="Anthropic's usage_report/messages JSON (group_by api_key_id and model; one "
            "page or an array of pages).",
        ),
    ],
    cost_report: Annotated[
        Path | None,
        typer.Option("--cost-report", help="Anthropic's cost_report JSON (group_by description)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="First UTC day, YYYY-MM-DD [default: the report's first]."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="Day after the last, YYYY-MM-DD [default: report's end]."),
    ] = None,
    workspace: Annotated[
        str | None,
        typer.Option("--workspace", help="Compare only this workspace's cost rows (wrkspc_...)."),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Compare the server's ledger with Anthropic's usage (and cost) report: tokens by day,
    model and provider key, cost by day and model. Exits 6 and names every differing row."""
    from ccgate.cli import admin_reconcile

    admin_reconcile.run(
        ctx,
        usage_report=usage_report,
        cost_report=cost_report,
        since=since,
        until=until,
        workspace=workspace,
        json_output=json_output,
    )


@app.command("audit")
def audit(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="How many entries.")] = 50,
    json_output: JsonOption = False,
) -> None:
    """Who changed what on the server, oldest of the last N first."""
    import json

    with _client(ctx) as client:
        data = client.audit(limit=limit)
    if _as_json(data, json_output):
        return
    rows = [
        {**e, "at": _when(e["at"]), "detail": json.dumps(e["detail"], sort_keys=True)}
        for e in data["entries"]
    ]
    _table(rows, ("at", "actor", "action", "target", "detail"), empty="No audit entries.")
