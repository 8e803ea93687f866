"""Issue 12: every denial the policy can give, produced and read as a client reads it.

Each template of `proxy/policy/engine.py` (`self.deny(...)`, `Decision(False, ...)`) and
`proxy/gate.py` is listed here with a statement that produces it (or, for the few that
guard states no statement reaches, a constructed one). A denial must be an English
sentence that opens with the role it was decided for (the client sees it after
`permission denied by strongroom: `), names the kind or object, and never repeats a
value (a literal) of the statement. A source scan fails when a template is added
without a row here.
"""

from __future__ import annotations

import re
from pathlib import Path

from proxy.policy import Environment, Policy, decide
from proxy.policy.engine import _Checker
from proxy.sql import analyze
from proxy.sql.info import ConfigCall, StatementInfo
from tests.integration.policy_env import POLICY as POLICY_DICT
from tests.integration.policy_env import literal_values

ROOT = Path(__file__).resolve().parents[2]
POLICY = Policy.from_dict(POLICY_DICT)
VIEWS = Policy.from_dict({**POLICY_DICT, "expand_views": True})
ENV = Environment(existing_schemas=frozenset({"public", "reporting"}))
PATH = ("$user", "public")

# (template marker: a fragment of its source text, role, statement, words the reason has)
ROWS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("is not in the policy", "unlisted_user", "SELECT 1", ("not in the policy",)),
    ("inside {kind.upper()}", "ops_admin",
     "PREPARE p AS SELECT set_config('role', 'analyst', false)", ("PREPARE",)),
    ("EXECUTE of prepared statement", "support_agent", "EXECUTE nope", ("nope",)),
    ("statements are not allowed", "support_agent", "CREATE TABLE public.x (a int)",
     ("ddl", "needs allow: ddl")),
    ("TRUNCATE ... CASCADE", "ops_admin", "TRUNCATE public.customers CASCADE",
     ("CASCADE",)),
    ("is not a constant", "support_agent",
     "SELECT set_config(current_user, 'secret-value-1', false)", ("set_config",)),
    ("as a statement of its own", "support_agent",
     "SELECT set_config('search_path', 'public', false) FROM public.customers",
     ("search_path",)),
    ("is a set_role, which", "support_agent", "SELECT set_config('role', 'analyst', false)",
     ("set_role",)),
    ("cross-database reference", "support_agent", "SELECT * FROM otherdb.public.customers",
     ("otherdb",)),
    ("does not resolve in search_path", "support_agent", "SELECT * FROM nowhere_table",
     ("nowhere_table",)),
    ("(holds secrets)", "support_agent", "SELECT * FROM pg_catalog.pg_authid",
     ("pg_authid",)),
    ("is not allowed{note}", "analyst", "SELECT * FROM public.customers",
     ("select", "public.customers")),
    ("the statement reads denied column", "support_agent",
     "SELECT tax_id FROM public.customers WHERE name = 'Secret Name'",
     ("public.customers.tax_id",)),
    ("whole-row reference or *)", "support_agent", "SELECT * FROM public.customers",
     ("public.customers", "tax_id")),
    ("used in an expression, predicate", "support_agent",
     "SELECT id FROM public.cards WHERE pan LIKE '4000999%'", ("masked", "public.cards.pan")),
    ("compared by equality without lookup", "support_agent",
     "SELECT id FROM public.cards WHERE pan = '4000999988887777'",
     ("masked", "public.cards.pan")),
    ("cross-database function reference", "support_agent", "SELECT otherdb.public.f()",
     ("otherdb",)),
    ("function {fn} is not allowed", "support_agent",
     "SELECT public.exfiltrate('secret-value-2')", ("public.exfiltrate",)),
    ("(may resolve to", "support_agent", "SELECT exfiltrate('secret-value-3')",
     ("exfiltrate",)),
    ("large-object function", "support_agent", "SELECT lo_creat(-1)", ("lo_creat",)),
    ("admin function", "support_agent", "SELECT pg_terminate_backend(1)",
     ("pg_terminate_backend",)),
    ("pg_notify sends", "support_agent", "SELECT pg_notify('chan', 'secret-payload')",
     ("pg_notify",)),
]

# Templates no statement reaches (guards of the engine's own invariants, or session
# states made by reloads): produced here from constructed facts.
CONSTRUCTED: list[tuple[str, str, StatementInfo | None, tuple[str, ...]]] = [
    ("could not be classified", "support_agent",
     StatementInfo("unknown", detail="AlterFooStmt"), ("AlterFooStmt",)),
    ("without a statement to check", "support_agent", StatementInfo("explain"),
     ("EXPLAIN",)),
    ("statement kind {kind} is not allowed", "support_agent",
     StatementInfo("savepointx"), ("savepointx",)),  # type: ignore[arg-type]
    # (a non-constant value is refused earlier: only a call alone with constants is exact)
    ("set_config('search_path') with a value", "support_agent",
     StatementInfo("select", config_calls=(
         ConfigCall(param="search_path", values=None, is_local=False, exact=True),)),
     ("search_path",)),
]

# Gate templates: produced through the real proxy in
# tests/integration/test_denial_messages_live.py (startup options, FunctionCall, user
# code, cursors, role changes inside a string); listed so the scan sees them.
LIVE = (
    "a role startup option is a set_role",
    "is not known to the proxy",
    "set_config in a FunctionCall message",
    "this session ",
    "call of user code",
    "(the query of cursor",
    "_at_statement(found.reason",
    "with a value the proxy cannot track",
    "a cursor declared in a string that",  # tests/integration/test_portal_namespaces.py
    "not a cursor declared with DECLARE",
)
# Engine templates reached only with expand_views and a view map (tested with values in
# tests/unit/test_policy.py's view tables): their wording is checked here directly.
VIEW_ONLY = ("view dependencies were not loaded", "views are nested too deeply",
             "unknown access")


def _sentence(reason: str, role: str, sql: str) -> None:
    """What every denial must look like to the client."""
    message = f"permission denied by strongroom: {reason}"
    assert message.startswith(f'permission denied by strongroom: role "{role}"'), message
    assert not re.search(r"\b(\w+) \1\b", reason), message  # no doubled words
    assert "statement a " not in reason and "  " not in reason, message
    assert "!r" not in reason and "{" not in reason, message  # no unformatted template
    for value in literal_values(sql):
        if value not in ("public", "analyst", "search_path"):
            assert value not in reason, (value, message)


def _decide(role: str, sql: str) -> str:
    d = decide(POLICY, role, analyze(sql), PATH, "app", env=ENV)
    assert not d.allowed, sql
    return d.reason


def test_every_denial_template_reads_as_a_sentence() -> None:
    """One table: each row's statement is denied with its template, worded as required."""
    for _marker, role, sql, words in ROWS:
        reason = _decide(role, sql)
        _sentence(reason, role, sql)
        for word in words:
            assert word in reason, (word, reason)
    for _marker, role, info, words in CONSTRUCTED:
        d = decide(POLICY, role, info, PATH, "app", env=ENV)
        assert not d.allowed
        _sentence(d.reason, role, "")
        for word in words:
            assert word in d.reason, (word, d.reason)
    d = decide(VIEWS, "analyst", analyze("SELECT * FROM public.customer_summary"), PATH,
               "app", env=ENV)  # view map not loaded (expand_views turned on later)
    assert not d.allowed and "view dependencies were not loaded" in d.reason
    _sentence(d.reason, "analyst", "")
    checker = _Checker(VIEWS, VIEWS.role("analyst"), "analyst", "app", ENV, {})
    nested = str(checker.deny("views are nested too deeply under public.v"))
    assert not nested.startswith("role"), nested  # `decide` adds the role, once
    _sentence(f'role "analyst": {nested}', "analyst", "")


def test_a_denied_statement_of_a_string_says_which_after_the_role() -> None:
    sql = "SELECT 1; SELECT tax_id FROM public.customers WHERE name = 'Secret Name'"
    reason = _decide("support_agent", sql)
    _sentence(reason, "support_agent", sql)
    assert reason.startswith('role "support_agent": statement 2: the statement reads denied')
    # the gate's step-by-step decision words it the same way
    from proxy.gate import _at_statement

    single = _decide("support_agent", "SELECT tax_id FROM public.customers")
    assert _at_statement(single, "support_agent", 1) == (
        'role "support_agent": statement 2: ' + single.split(": ", 1)[1])


def test_every_template_in_the_source_has_a_row() -> None:
    """A new `self.deny(...)` / `Decision(False, ...)` must come with a row above."""
    markers = ([r[0] for r in ROWS] + [r[0] for r in CONSTRUCTED] + list(LIVE)
               + list(VIEW_ONLY))
    for path in ("proxy/policy/engine.py", "proxy/gate.py"):
        text = (ROOT / path).read_text()
        for match in re.finditer(r"self\.deny\(|Decision\(False,|_refuse_call\(\s*session"
                                 r"|refuse_all = \(", text):
            site = text[match.start(): match.start() + 260]
            if site.startswith("Decision(False, reason)") or "{where}{denied}" in site:
                continue  # a reason made elsewhere, passed on
            site = site.split("\n\n")[0]
            assert any(m in site for m in markers), (path, site)
