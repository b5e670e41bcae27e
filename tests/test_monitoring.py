"""What operators monitor with: the README's metric table and log lines, the shipped alert rules
and Grafana dashboard, all held to the code.

promtool (Debian's ``prometheus`` package; ``.ci/run`` installs it when it can) checks and
unit-tests the rules; those two tests skip when it is absent.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from relay.service.logs import JsonFormatter, TextFormatter
from relay.service.metrics import Metrics
from tests.test_readme import code_blocks, section

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "contrib" / "prometheus" / "outbox-relay.rules.yml"
RULES_TEST = ROOT / "tests" / "outbox-relay.rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "outbox-relay.json"
PROMETHEUS_OWN = {"up"}  # series Prometheus adds to every scrape target itself


def families() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each metric family the relay's registry exports, as the README names it: (type, labels)."""
    registry = Metrics(targets=["default"]).registry
    found = {}
    for collector in list(registry._collector_to_names):
        kind, name = collector._type, collector._name
        shown = f"{name}_total" if kind == "counter" else name
        found[shown] = (kind, tuple(collector._labelnames))
    exposition = Metrics(targets=["default"]).exposition().decode()
    assert set(re.findall(r"^# TYPE (\w+) ", exposition, re.MULTILINE)) == set(found)
    return found


def series_names() -> set[str]:
    """Every series name a scrape of the relay can return."""
    names = set()
    for shown, (kind, _) in families().items():
        if kind == "histogram":
            names |= {f"{shown}_bucket", f"{shown}_sum", f"{shown}_count", f"{shown}_created"}
        elif kind == "counter":
            names |= {shown, shown.removesuffix("_total") + "_created"}
        else:
            names.add(shown)
    return names


# -- the README ---------------------------------------------------------------------------------
def test_the_readme_lists_exactly_the_exported_metric_families_with_type_and_labels() -> None:
    rows = re.findall(r"^\| `(outbox_relay_\w+)` \| (\w+) \| ([^|]*) \| [^|]+ \|$", section("Metrics"), re.M)
    table = {name: (kind, tuple(re.findall(r"`(\w+)`", labels))) for name, kind, labels in rows}
    assert len(rows) == len(table)
    assert table == families()


LINE = re.compile(r"^\S+Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) (relay\.\w+) (.*)$")
SOURCE = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "relay").rglob("*.py"))


def _logged(level: str, logger: str, message: str) -> bool:
    """Whether the relay's code logs ``message`` at ``level`` (through a logger named ``logger``)."""
    # log.error("message", ...), or log.log(level, "message", ...) where the level is chosen at run time
    call = rf'log\.(?:{level.lower()}\(|log\(\s*[\w.]+,)\s*"{re.escape(message)}"'
    modules = [
        p.read_text(encoding="utf-8")
        for p in (ROOT / "relay").rglob("*.py")
        if f'getLogger("{logger}")' in p.read_text(encoding="utf-8")
    ]
    return any(re.search(call, text) for text in modules)


def test_every_example_log_line_is_one_the_relay_writes() -> None:
    blocks = code_blocks(section("Log lines"))
    text_lines, json_lines = blocks[0], blocks[1]
    assert len(text_lines) >= 15
    for line in text_lines:
        match = LINE.match(line)
        assert match, line
        level, logger, rest = match.groups()
        message = re.split(r" \w+=", rest, maxsplit=1)[0]
        assert _logged(level, logger, message), line
    for state_change in ("target paused", "target still paused", "target resumed", "row dead-lettered"):
        assert any(f" {state_change} " in line for line in text_lines), state_change

    # The json lines say the same as text lines of the first block, field for field.
    assert len(json_lines) >= 5
    for line in json_lines:
        doc = json.loads(line)
        record = logging.LogRecord(
            doc["logger"], getattr(logging, doc["level"]), "x", 0, doc["msg"], None, None
        )
        for key, value in doc.items():
            if key not in ("ts", "level", "logger", "msg"):
                setattr(record, key, value)
        assert JsonFormatter().format(record).split(", ", 1)[1] == line.split(", ", 1)[1]
        rendered = TextFormatter().format(record).split(" ", 1)[1]
        assert any(t.split(" ", 1)[1] == rendered and t.startswith(doc["ts"]) for t in text_lines), line


# -- PromQL -------------------------------------------------------------------------------------
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords and labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if match.group(2) is None and match.group(1) not in KEYWORDS:
            names.add(match.group(1))
    return names


def test_the_promql_name_reader_finds_names_and_only_names() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, target) (rate(a_bucket{target=~"$target"}[$__rate_interval])))'
        " / on (instance) b > 0.8 * 43200 unless c offset 5m"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}


def rule_expressions() -> dict[str, str]:
    """Each alert's expression, from the rules file (one-line ``expr:`` or a ``|`` block)."""
    lines = RULES.read_text(encoding="utf-8").splitlines()
    found: dict[str, str] = {}
    alert = None
    for i, line in enumerate(lines):
        if m := re.match(r"\s*- alert: (\w+)$", line):
            alert = m.group(1)
        elif (m := re.match(r"(\s*)expr: (.*)$", line)) and alert:
            if m.group(2) != "|":
                found[alert] = m.group(2)
                continue
            indent = len(m.group(1))
            block = []
            for following in lines[i + 1 :]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                block.append(following.strip())
            found[alert] = " ".join(block).strip()
    assert len(found) == len(re.findall(r"^\s*- alert: ", "\n".join(lines), re.MULTILINE))
    return found


def dashboard_expressions(dashboard: dict[str, Any]) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_rules_and_dashboard_read_only_metrics_the_relay_exports() -> None:
    exported = series_names() | PROMETHEUS_OWN
    expressions = [*rule_expressions().values(), *dashboard_expressions(json.loads(DASHBOARD.read_text()))]
    used = set().union(*(metric_names(e) for e in expressions))
    assert used - exported == set()
    # and the dashboard shows every family
    dashboard_used = set().union(
        *(metric_names(e) for e in dashboard_expressions(json.loads(DASHBOARD.read_text())))
    )
    shown = {name for name in families() if any(u.startswith(name) for u in dashboard_used)}
    assert shown == set(families())


def test_the_rules_cover_what_operators_asked_for() -> None:
    rules = rule_expressions()
    wanted = {
        "OutboxRelayOldestPendingNearMaxAge": "outbox_relay_oldest_pending_seconds",
        "OutboxRelayDeadLetters": "outbox_relay_dead_total",
        "OutboxRelayTargetPaused": "outbox_relay_target_paused_seconds",
        "OutboxRelayTargetUnserved": "outbox_relay_pending",
        "OutboxRelayCredentialsRefused": "outbox_relay_requests_total",
        "OutboxRelayTokenRenewals": "outbox_relay_requests_total",
        "OutboxRelayNoHeartbeat": "outbox_relay_last_drain_timestamp_seconds",
    }
    for alert, metric in wanted.items():
        assert metric in metric_names(rules[alert]), alert


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return found


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in result.stdout


def test_the_alerts_fire_on_the_series_they_are_for() -> None:
    """tests/outbox-relay.rules.test.yml: each alert fires on its condition, and not before ``for``."""
    result = subprocess.run(
        [promtool(), "test", "rules", str(RULES_TEST)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text(encoding="utf-8")))
    assert tested == set(rule_expressions())


# -- the dashboard ------------------------------------------------------------------------------
DASHBOARD_SCHEMA = ROOT / "contrib" / "grafana" / "dashboard.schema.json"


def dashboard_problems(doc: Any) -> list[str]:
    """Where the dashboard breaks its JSON schema (contrib/grafana/dashboard.schema.json: what
    Grafana needs to import and draw it), and panel ids that are not unique (which a JSON
    schema cannot say)."""
    schema = json.loads(DASHBOARD_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]
    ids = [p.get("id") for p in doc.get("panels", []) if isinstance(p, dict)] if isinstance(doc, dict) else []
    if len(ids) != len(set(ids)):
        problems.append("panels: ids not unique")
    return problems


def test_the_dashboard_is_well_formed_and_the_check_can_fail() -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard_problems(doc) == []
    assert len(doc["panels"]) >= 8
    broken = copy.deepcopy(doc)
    del broken["uid"]
    broken["panels"][0]["targets"] = [{"refId": "A"}]
    broken["panels"][1]["id"] = broken["panels"][2]["id"]
    assert dashboard_problems(broken) == [
        "(top): 'uid' is a required property",
        "panels/0/targets/0: 'expr' is a required property",
        "panels: ids not unique",
    ]
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert {"datasource", "target"} <= variables
    assert all("$target" in e for e in dashboard_expressions(doc) if "target" in e and "{" in e)
