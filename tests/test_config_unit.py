"""Sans-io tests for lb.config: defaults, every kind of error, and properties.

Only `parse` (on dicts) and `load` (on files in tmp_path) are exercised here,
plus a few `python -m lb --check` subprocesses for the command-line contract.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lb.scheduling.policy
from lb.control.config import (
    BACKEND_KEYS,
    ROUTE_KINDS,
    SECTIONS,
    Active,
    Admin,
    BackendConfig,
    Balancing,
    Cartesia,
    Config,
    ConfigError,
    Limits,
    Listen,
    Log,
    Passive,
    Pool,
    Retry,
    Route,
    Timeouts,
    parse,
)
from lb.control.config_file import load
from lb.config_model import Speech

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "lb.toml"

ONE_BACKEND = [{"name": "gpu0", "url": "http://127.0.0.1:6093"}]
UUID = "a0e99841-438c-4a64-b679-ae501e7d6091"   # the shape of a Cartesia voice id


# Sections written [a.b] in TOML live in SECTIONS as "a.b" and in Config under
# their own attribute; the rest have the attribute of the same name.
ATTRS = {"health.passive": "passive", "health.active": "active",
         "fallback.cartesia": "cartesia"}


def table_of(raw: dict, section: str) -> dict:
    """The table for `section` in a raw document, nested as TOML nests [a.b]."""
    for part in section.split("."):
        raw = raw.setdefault(part, {})
    return raw


def put(raw: dict, section: str, value) -> None:
    """Set a whole section: raw["health"]["active"] for "health.active"."""
    parent, _, child = section.rpartition(".")
    (table_of(raw, parent) if parent else raw)[child] = value


def section_of(config: Config, section: str):
    return getattr(config, ATTRS.get(section, section))


def minimal(**sections) -> dict:
    """A valid raw document: one backend plus the given sections.

    A dotted name (``**{"health.active": {...}}``) is placed as the nested table
    TOML's ``[health.active]`` produces, never as a literal top-level key.
    """
    raw = {"backend": copy.deepcopy(ONE_BACKEND)}
    for section, value in sections.items():
        put(raw, section, copy.deepcopy(value))
    return raw


def error_of(raw: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(raw)
    return info.value


# --- defaults


EXPECTED_DEFAULTS = dict(
    listen=Listen(host="0.0.0.0", port=6095),
    limits=Limits(nofile=65536, max_connections=0, max_header_bytes=16384,
                  max_body_bytes=10485760, write_buffer_high=262144),
    timeouts=Timeouts(client_header=10.0, connect=2.0, first_byte=60.0, idle=60.0),
    pool=Pool(max_idle=32, idle_timeout=4.0),
    log=Log(access=True, level="info"),
    balancer=Balancing(policy="least_conn", max_concurrency=4, queue_limit=1024,
                       queue_timeout=10.0, slow_start=10.0),
    passive=Passive(consecutive_failures=3, consecutive_5xx=5, statuses=(500, 502, 503, 504),
                    base_ejection=10.0, max_ejection=120.0, jitter=0.1,
                    max_ejected_percent=50),
    active=Active(interval=2.0, timeout=1.0, rise=2, fall=3),
    retry=Retry(attempts=2, statuses=(502, 503, 504), budget_percent=20, budget_min=3,
                backoff_base=0.025, backoff_max=0.25, replay_max_bytes=1048576),
    admin=Admin(allow=(ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))),
    cartesia=Cartesia(enabled=False, url="https://api.cartesia.ai", api_key_env="CARTESIA_API_KEY",
                      version="2026-03-01", model_id="sonic-3", language="en",
                      max_concurrency=3, timeout=30.0, spillover=False, ca_file="", voices={}),
)

# The [[route]] tables the shipped conf/lb.toml declares, in order.
def route_of(path: str, kind: str = "", slot: bool = True) -> Route:
    """A route as parsed with no front-door keys: an openai one has the default door."""
    return Route(path, kind, slot, speech=Speech() if kind == "openai" else None)


SHIPPED_ROUTES = (
    route_of("/synthesize-json", "chatterbox"), route_of("/synthesize", "chatterbox"),
    route_of("/v1/audio/speech", "openai"), route_of("/v1/audio/speech/stream", "openai"),
    route_of("/generate_voice", "chattts"),
)

FLOAT_FIELDS = [("timeouts", k) for k in SECTIONS["timeouts"]] + [
    ("pool", "idle_timeout"), ("balancer", "queue_timeout"), ("balancer", "slow_start"),
    ("passive", "base_ejection"), ("passive", "max_ejection"), ("passive", "jitter"),
    ("active", "interval"), ("active", "timeout"),
    ("retry", "backoff_base"), ("retry", "backoff_max"), ("cartesia", "timeout"),
]


def test_defaults_with_only_a_backend():
    config = parse(minimal())
    assert isinstance(config, Config)
    for section, expected in EXPECTED_DEFAULTS.items():
        assert getattr(config, section) == expected, section
    assert config.backends == (BackendConfig(name="gpu0", url="http://127.0.0.1:6093",
                                             host="127.0.0.1", port=6093, max_concurrency=4,
                                             weight=1, health_path=""),)
    assert config.routes == ()   # no [[route]]: no call can fall back


def test_expected_defaults_cover_every_config_field():
    # backends, routes and tcp come from arrays of tables, not from SECTIONS;
    # cluster from its own parser (tests/test_config_cluster_unit.py).
    assert set(EXPECTED_DEFAULTS) | {"backends", "routes", "tcp", "cluster", "warnings"} == set(Config.__dataclass_fields__)
    assert {ATTRS.get(name, name) for name in SECTIONS} == set(EXPECTED_DEFAULTS)


def test_default_timeouts_are_floats():
    config = parse(minimal())
    for attr, field in FLOAT_FIELDS:
        assert type(getattr(getattr(config, attr), field)) is float, (attr, field)


def test_default_status_lists_are_tuples():
    config = parse(minimal())
    assert type(config.passive.statuses) is tuple and type(config.retry.statuses) is tuple
    assert type(config.admin.allow) is tuple


def test_shipped_config_loads_and_matches_the_defaults():
    config = load(str(CONF))
    for section, expected in EXPECTED_DEFAULTS.items():
        assert getattr(config, section) == expected, section
    assert [(b.name, b.host, b.port) for b in config.backends] == [
        ("gpu0", "127.0.0.1", 6093), ("gpu1", "127.0.0.1", 6094)]
    assert config.routes == SHIPPED_ROUTES
    # The fallback ships disabled, with no voices (so no default is required yet).
    assert config.cartesia.enabled is False and config.cartesia.voices == {}


def test_shipped_config_equals_parse_of_only_its_backends_and_routes():
    shipped = load(str(CONF))
    bare = parse({"backend": [
        {"name": "gpu0", "url": "http://127.0.0.1:6093", "health_path": "/health",
         "api": "chatterbox"},
        {"name": "gpu1", "url": "http://127.0.0.1:6094", "health_path": "/health",
         "api": "chatterbox"}],
        "route": [{"path": r.path, "kind": r.kind} for r in SHIPPED_ROUTES]})
    assert shipped == bare


def test_load_relative_default_path(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load("conf/lb.toml").listen.port == 6095


def test_config_is_frozen():
    config = parse(minimal())
    with pytest.raises(Exception):
        config.timeouts.connect = 5.0  # type: ignore[misc]


def test_backend_url_is_normalised():
    config = parse({"backend": [{"name": "a", "url": "http://LocalHost:7000/"},
                                {"name": "b", "url": "http://[::1]:7001"},
                                {"name": "c", "url": "http://10.0.0.1"}]})
    assert config.backends[0] == BackendConfig("a", "http://localhost:7000", "localhost", 7000)
    assert config.backends[0].max_concurrency == 4 and config.backends[0].weight == 1
    assert config.backends[1] == BackendConfig("b", "http://[::1]:7001", "::1", 7001)
    assert config.backends[2] == BackendConfig("c", "http://10.0.0.1:80", "10.0.0.1", 80)


# --- load(): file-level errors


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.key == ""
    assert "no such file" in info.value.reason
    assert str(path) in str(info.value)


def test_load_directory_is_a_read_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path))
    assert info.value.key == ""
    assert "not a regular file" in info.value.reason


def test_load_toml_syntax_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[timeouts]\nconnect = = 2\n')
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.key == ""
    assert "TOML syntax error" in info.value.reason
    assert "line 2" in info.value.reason
    assert "\n" not in str(info.value)


def test_load_reports_key_errors_from_the_file(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('[timeouts]\nconect = 2\n[[backend]]\nname = "a"\nurl = "http://h:1"\n')
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.key == "timeouts.conect"


def test_config_error_str_is_key_colon_reason():
    exc = ConfigError("timeouts.connect", "must be positive")
    assert str(exc) == "timeouts.connect: must be positive"
    assert exc.key == "timeouts.connect" and exc.reason == "must be positive"
    assert str(ConfigError("", "just a reason")) == "just a reason"


# --- parse(): structure errors


def test_unknown_section():
    exc = error_of(minimal(lisen={"address": "0.0.0.0:1"}))
    assert exc.key == "lisen"
    assert "unknown section" in exc.reason


def test_unknown_top_level_key():
    exc = error_of(minimal(backends=[]))
    assert exc.key == "backends"


@pytest.mark.parametrize("section,key", [
    ("timeouts", "conect"), ("limits", "max_conections"), ("pool", "idle"),
    ("log", "acess"), ("listen", "port"), ("balancer", "polcy"),
    ("health.passive", "jiter"), ("health.active", "intervall"), ("retry", "attempt"),
    ("admin", "allowed"), ("fallback.cartesia", "voice"), ("fallback.cartesia", "api_key"),
    ("fallback.cartesia", "model"),
])
def test_unknown_key_in_section(section, key):
    exc = error_of(minimal(**{section: {key: 1}}))
    assert exc.key == f"{section}.{key}"
    assert "unknown key" in exc.reason
    # The reason lists the known keys so the typo is easy to fix.
    for known in SECTIONS[section]:
        assert known in exc.reason


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_section_not_a_table(section):
    raw = minimal(**{section: 5})
    if "." in section:
        parent, child = section.split(".")
        assert raw[parent] == {child: 5} and section not in raw
    exc = error_of(raw)
    assert exc.key == section
    assert "must be a table" in exc.reason


def test_minimal_nests_dotted_sections_side_by_side():
    raw = minimal(**{"health.passive": {"jitter": 0.5}, "health.active": {"rise": 7}})
    assert raw["health"] == {"passive": {"jitter": 0.5}, "active": {"rise": 7}}
    config = parse(raw)
    assert config.passive.jitter == 0.5 and config.active.rise == 7


@pytest.mark.parametrize("value,shown", [(5, "integer"), ("x", "string"), ([{}], "array"),
                                         (True, "boolean")])
def test_health_not_a_table(value, shown):
    exc = error_of(minimal(health=value))
    assert exc.key == "health"
    assert "must be a table" in exc.reason and shown in exc.reason


def test_unknown_health_subsection_is_named():
    exc = error_of(minimal(**{"health.bogus": {"x": 1}}))
    assert exc.key == "health.bogus"
    assert "unknown section" in exc.reason
    assert "active" in exc.reason and "passive" in exc.reason


def test_unknown_health_subsection_that_is_not_a_table_is_named():
    exc = error_of(minimal(health={"passive": {}, "interval": 2}))
    assert exc.key == "health.interval"
    assert "unknown section" in exc.reason


def test_literal_dotted_top_level_key_is_unknown():
    # TOML's quoted key "health.active" = {...} is not the [health.active] table.
    raw = minimal()
    raw["health.active"] = {"interval": 2}
    exc = error_of(raw)
    assert exc.key == "health.active"
    assert "unknown section" in exc.reason
    assert "health" in exc.reason


def test_unknown_top_level_reason_lists_the_new_sections():
    exc = error_of(minimal(balancr={}))
    assert exc.key == "balancr"
    for name in ("admin", "backend", "balancer", "fallback", "health", "retry", "route"):
        assert name in exc.reason


def test_empty_health_table_gives_defaults():
    config = parse(minimal(health={}))
    assert config.passive == EXPECTED_DEFAULTS["passive"]
    assert config.active == EXPECTED_DEFAULTS["active"]


def test_unknown_key_in_backend():
    raw = {"backend": [{"name": "a", "url": "http://h:1", "wieght": 2}]}
    exc = error_of(raw)
    assert exc.key == "backend[0].wieght"
    assert "unknown key" in exc.reason
    # The reason names every key a backend may have.
    for known in ("name", "url", *BACKEND_KEYS):
        assert known in exc.reason
    assert set(BACKEND_KEYS) == {"max_concurrency", "weight", "health_path", "api", "formats",
                                 "max_chars"}


def test_unknown_key_in_a_later_backend_names_its_index():
    exc = error_of({"backend": [{"name": "a", "url": "http://h:1"},
                                {"name": "b", "url": "http://h:2", "health": "/h"}]})
    assert exc.key == "backend[1].health"


# --- parse(): wrong types and ranges


INT_KEYS = [("limits", k) for k in SECTIONS["limits"]] + [("pool", "max_idle")] + [
    ("balancer", "max_concurrency"), ("balancer", "queue_limit"),
    ("health.passive", "consecutive_failures"), ("health.passive", "consecutive_5xx"),
    ("health.passive", "max_ejected_percent"),
    ("health.active", "rise"), ("health.active", "fall"),
    ("retry", "attempts"), ("retry", "budget_percent"), ("retry", "budget_min"),
    ("retry", "replay_max_bytes"), ("fallback.cartesia", "max_concurrency"),
]
SECONDS_KEYS = [("timeouts", k) for k in SECTIONS["timeouts"]] + [("pool", "idle_timeout")] + [
    ("balancer", "queue_timeout"),
    ("health.passive", "base_ejection"), ("health.passive", "max_ejection"),
    ("health.active", "interval"), ("health.active", "timeout"),
    ("retry", "backoff_base"), ("retry", "backoff_max"), ("fallback.cartesia", "timeout"),
    ("listen", "drain_timeout"),
]
# Keys checked against another one (max >= base): setting one alone to an
# arbitrary good value may break the pair, so the other is set to match.
PARTNER = {
    ("health.passive", "base_ejection"): "max_ejection",
    ("health.passive", "max_ejection"): "base_ejection",
    ("retry", "backoff_base"): "backoff_max",
    ("retry", "backoff_max"): "backoff_base",
}


def with_value(section: str, key: str, value) -> dict:
    """minimal() with section.key = value (and its partner, if any, equal to it)."""
    table = {key: value}
    if (section, key) in PARTNER:
        table[PARTNER[section, key]] = value
    return minimal(**{section: table})


def test_every_int_and_seconds_key_is_listed():
    """INT_KEYS/SECONDS_KEYS cover every integer and seconds key of every section."""
    listed = set(INT_KEYS) | set(SECONDS_KEYS)
    for section, keys in SECTIONS.items():
        for key, (default, _) in keys.items():
            if (section, key) == ("listen", "workers"):
                continue   # also takes "auto": see test_listen_workers_*
            if type(default) is int or (type(default) is float and key != "jitter"
                                        and (section, key) != ("balancer", "slow_start")):
                assert (section, key) in listed, (section, key)


@pytest.mark.parametrize("section,key", INT_KEYS)
@pytest.mark.parametrize("value,shown", [
    ("65536", "string"), (True, "boolean"), (False, "boolean"), (1.5, "number"),
    (65536.0, "number"), ([1], "array"), ({"a": 1}, "table"),
])
def test_integer_keys_reject_other_types(section, key, value, shown):
    exc = error_of(minimal(**{section: {key: value}}))
    assert exc.key == f"{section}.{key}"
    assert "must be an integer" in exc.reason
    assert shown in exc.reason


@pytest.mark.parametrize("section,key,bad", [
    ("limits", "nofile", 0), ("limits", "nofile", -1),
    ("limits", "max_connections", -1),
    ("limits", "max_header_bytes", 1023), ("limits", "max_header_bytes", (1 << 20) + 1),
    ("limits", "max_body_bytes", -1),
    ("limits", "write_buffer_high", 4095), ("limits", "write_buffer_high", (64 << 20) + 1),
    ("pool", "max_idle", -1),
    ("balancer", "max_concurrency", 0), ("balancer", "max_concurrency", 100_001),
    ("balancer", "queue_limit", -1), ("balancer", "queue_limit", 1_000_001),
    ("health.passive", "consecutive_failures", -1), ("health.passive", "consecutive_5xx", -1),
    ("health.passive", "max_ejected_percent", -1), ("health.passive", "max_ejected_percent", 101),
    ("health.active", "rise", 0), ("health.active", "rise", 101),
    ("health.active", "fall", 0), ("health.active", "fall", 101),
    ("retry", "attempts", 0), ("retry", "attempts", -1), ("retry", "attempts", 11),
    ("retry", "budget_percent", -1), ("retry", "budget_percent", 101),
    ("retry", "budget_min", -1), ("retry", "replay_max_bytes", -1),
    ("fallback.cartesia", "max_concurrency", 0), ("fallback.cartesia", "max_concurrency", 10_001),
])
def test_integer_ranges(section, key, bad):
    exc = error_of(minimal(**{section: {key: bad}}))
    assert exc.key == f"{section}.{key}"
    assert "must be >=" in exc.reason
    assert str(bad) in exc.reason


@pytest.mark.parametrize("section,key,good", [
    ("limits", "max_connections", 0), ("limits", "max_body_bytes", 0),
    ("limits", "max_header_bytes", 1024), ("limits", "max_header_bytes", 1 << 20),
    ("limits", "write_buffer_high", 4096), ("limits", "write_buffer_high", 64 << 20),
    ("pool", "max_idle", 0), ("limits", "nofile", 1),
    ("balancer", "max_concurrency", 1), ("balancer", "max_concurrency", 100_000),
    ("balancer", "queue_limit", 0), ("balancer", "queue_limit", 1_000_000),
    ("health.passive", "consecutive_failures", 0), ("health.passive", "consecutive_5xx", 0),
    ("health.passive", "max_ejected_percent", 0), ("health.passive", "max_ejected_percent", 100),
    ("health.active", "rise", 1), ("health.active", "rise", 100),
    ("health.active", "fall", 1), ("health.active", "fall", 100),
    ("retry", "attempts", 1), ("retry", "attempts", 10),
    ("retry", "budget_percent", 0), ("retry", "budget_percent", 100),
    ("retry", "budget_min", 0), ("retry", "replay_max_bytes", 0),
    ("fallback.cartesia", "max_concurrency", 1), ("fallback.cartesia", "max_concurrency", 10_000),
])
def test_integer_range_bounds_are_inclusive(section, key, good):
    config = parse(minimal(**{section: {key: good}}))
    assert getattr(section_of(config, section), key) == good


@pytest.mark.parametrize("section,key", SECONDS_KEYS)
@pytest.mark.parametrize("bad", [0, 0.0, -1, -0.5, float("nan")])
def test_timeouts_must_be_positive(section, key, bad):
    exc = error_of(minimal(**{section: {key: bad}}))
    assert exc.key == f"{section}.{key}"
    assert "positive" in exc.reason


@pytest.mark.parametrize("section,key", SECONDS_KEYS)
@pytest.mark.parametrize("bad,shown", [("2", "string"), (True, "boolean"), ([2], "array")])
def test_timeouts_must_be_numbers(section, key, bad, shown):
    exc = error_of(minimal(**{section: {key: bad}}))
    assert exc.key == f"{section}.{key}"
    assert "number of seconds" in exc.reason
    assert shown in exc.reason


@pytest.mark.parametrize("section,key", SECONDS_KEYS)
def test_timeouts_accept_ints_and_small_floats(section, key):
    value = getattr(section_of(parse(with_value(section, key, 3)), section), key)
    assert value == 3.0 and type(value) is float
    assert getattr(section_of(parse(with_value(section, key, 0.001)), section), key) == 0.001


@pytest.mark.parametrize("section,key", SECONDS_KEYS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_timeouts_must_be_finite(section, key, bad):
    exc = error_of(minimal(**{section: {key: bad}}))
    assert exc.key == f"{section}.{key}"
    assert "finite" in exc.reason


@pytest.mark.parametrize("bad", [1, "yes", "true", None])
def test_log_access_must_be_boolean(bad):
    exc = error_of(minimal(log={"access": bad}))
    assert exc.key == "log.access"
    assert "true or false" in exc.reason


@pytest.mark.parametrize("bad", ["INFO", "trace", "", 1, ["info"]])
def test_log_level_choice(bad):
    exc = error_of(minimal(log={"level": bad}))
    assert exc.key == "log.level"
    assert "must be one of debug, info, warning, error" in exc.reason


# --- [balancer]


POLICY_NAMES = ["least_conn", "p2c", "random", "round_robin"]


def test_policy_names_match_lb_policy():
    assert sorted(lb.scheduling.policy.POLICIES) == POLICY_NAMES
    # The reason for a bad policy lists exactly what config accepts.
    exc = error_of(minimal(balancer={"policy": "nope"}))
    listed = re.fullmatch(r"must be one of (.*), got string 'nope'", exc.reason)
    assert listed, exc.reason
    assert listed.group(1).split(", ") == sorted(lb.scheduling.policy.POLICIES)


@pytest.mark.parametrize("name", sorted(lb.scheduling.policy.POLICIES))
def test_every_lb_policy_is_accepted(name):
    assert parse(minimal(balancer={"policy": name})).balancer.policy == name
    assert lb.scheduling.policy.make(name).name == name


@pytest.mark.parametrize("bad", ["LEAST_CONN", "least-conn", "roundrobin", "", "p2c ",
                                 1, True, ["p2c"], {"name": "p2c"}])
def test_balancer_policy_choice(bad):
    exc = error_of(minimal(balancer={"policy": bad}))
    assert exc.key == "balancer.policy"
    assert "must be one of least_conn, p2c, random, round_robin" in exc.reason


@pytest.mark.parametrize("good", [0, 0.0, 0.5, 30, 1e6])
def test_slow_start_accepts_zero_and_positive(good):
    value = parse(minimal(balancer={"slow_start": good})).balancer.slow_start
    assert value == good and type(value) is float


@pytest.mark.parametrize("bad", [-1, -0.001, float("nan"), float("inf")])
def test_slow_start_rejects_negative_and_non_finite(bad):
    exc = error_of(minimal(balancer={"slow_start": bad}))
    assert exc.key == "balancer.slow_start"
    assert f"got {bad}" in exc.reason


@pytest.mark.parametrize("bad,shown", [("10", "string"), (False, "boolean"), (True, "boolean"),
                                       ([0], "array")])
def test_slow_start_rejects_other_types(bad, shown):
    exc = error_of(minimal(balancer={"slow_start": bad}))
    assert exc.key == "balancer.slow_start"
    assert "number of seconds" in exc.reason and shown in exc.reason


# --- [health.passive] and [retry]: fractions, status lists, cross-key checks


@pytest.mark.parametrize("good", [0, 0.0, 0.25, 1, 1.0])
def test_jitter_accepts_zero_to_one(good):
    value = parse(minimal(**{"health.passive": {"jitter": good}})).passive.jitter
    assert value == good and type(value) is float


@pytest.mark.parametrize("bad", [-0.1, -1, 1.01, 2, float("nan"), float("inf")])
def test_jitter_outside_zero_to_one(bad):
    exc = error_of(minimal(**{"health.passive": {"jitter": bad}}))
    assert exc.key == "health.passive.jitter"
    assert "from 0 to 1" in exc.reason and f"got {bad}" in exc.reason


@pytest.mark.parametrize("bad,shown", [("0.1", "string"), (True, "boolean"), ([0.1], "array")])
def test_jitter_must_be_a_number(bad, shown):
    exc = error_of(minimal(**{"health.passive": {"jitter": bad}}))
    assert exc.key == "health.passive.jitter"
    assert "number from 0 to 1" in exc.reason and shown in exc.reason


STATUS_SECTIONS = ["health.passive", "retry"]


@pytest.mark.parametrize("section", STATUS_SECTIONS)
@pytest.mark.parametrize("bad,shown", [
    ([500, 404], "integer 404"), ([499], "integer 499"), ([600], "integer 600"),
    ([200], "integer 200"), (["500"], "string '500'"), ([502, "503"], "string '503'"),
    ([True], "boolean True"), ([500.0], "number 500.0"), ([[500]], "array"),
])
def test_statuses_hold_5xx_codes_only(section, bad, shown):
    exc = error_of(minimal(**{section: {"statuses": bad}}))
    assert exc.key == f"{section}.statuses"
    assert "status codes from 500 to 599" in exc.reason and shown in exc.reason


@pytest.mark.parametrize("section", STATUS_SECTIONS)
@pytest.mark.parametrize("bad,shown", [("500,502", "string"), (500, "integer"),
                                       ({"a": 500}, "table")])
def test_statuses_must_be_an_array(section, bad, shown):
    exc = error_of(minimal(**{section: {"statuses": bad}}))
    assert exc.key == f"{section}.statuses"
    assert "must be an array of HTTP status codes" in exc.reason and shown in exc.reason


@pytest.mark.parametrize("section", STATUS_SECTIONS)
def test_statuses_are_deduplicated_and_sorted(section):
    config = parse(minimal(**{section: {"statuses": [504, 500, 503, 500, 599, 504]}}))
    assert section_of(config, section).statuses == (500, 503, 504, 599)


def test_max_ejection_below_base_ejection():
    exc = error_of(minimal(**{"health.passive": {"base_ejection": 30, "max_ejection": 20}}))
    assert exc.key == "health.passive.max_ejection"
    assert "must be >= base_ejection (30)" in exc.reason and "got 20" in exc.reason


def test_base_ejection_above_the_default_max_names_max_ejection():
    exc = error_of(minimal(**{"health.passive": {"base_ejection": 121}}))
    assert exc.key == "health.passive.max_ejection"
    assert "base_ejection (121)" in exc.reason and "got 120" in exc.reason


def test_max_ejection_equal_to_base_is_accepted():
    config = parse(minimal(**{"health.passive": {"base_ejection": 7, "max_ejection": 7}}))
    assert config.passive.base_ejection == config.passive.max_ejection == 7.0


def test_backoff_max_below_backoff_base():
    exc = error_of(minimal(retry={"backoff_base": 0.5, "backoff_max": 0.1}))
    assert exc.key == "retry.backoff_max"
    assert "must be >= backoff_base (0.5)" in exc.reason and "got 0.1" in exc.reason


def test_backoff_base_above_the_default_max_names_backoff_max():
    exc = error_of(minimal(retry={"backoff_base": 1}))
    assert exc.key == "retry.backoff_max"
    assert "backoff_base (1)" in exc.reason


def test_backoff_max_equal_to_base_is_accepted():
    config = parse(minimal(retry={"backoff_base": 0.1, "backoff_max": 0.1}))
    assert config.retry.backoff_base == config.retry.backoff_max == 0.1


def test_cross_key_checks_come_after_the_single_key_checks():
    # A bad value is reported as itself, not as a failed comparison.
    exc = error_of(minimal(**{"health.passive": {"base_ejection": 30, "max_ejection": -1}}))
    assert exc.key == "health.passive.max_ejection" and "positive" in exc.reason
    exc = error_of(minimal(retry={"backoff_base": "x", "backoff_max": 0.1}))
    assert exc.key == "retry.backoff_base"


# --- [admin]


@pytest.mark.parametrize("allow,expected", [
    (["::1"], ["::1/128"]),
    (["127.0.0.1"], ["127.0.0.1/32"]),
    (["10.0.0.0/8", "fd00::/8"], ["10.0.0.0/8", "fd00::/8"]),
    (["192.168.1.0/24", "::1", "127.0.0.1"], ["192.168.1.0/24", "::1/128", "127.0.0.1/32"]),
    (["0.0.0.0/0", "::/0"], ["0.0.0.0/0", "::/0"]),
])
def test_admin_allow_accepts_addresses_and_networks(allow, expected):
    config = parse(minimal(admin={"allow": allow}))
    assert config.admin == Admin(allow=tuple(ipaddress.ip_network(n) for n in expected))
    assert ipaddress.ip_address(allow[0].split("/")[0]) in config.admin.allow[0]


@pytest.mark.parametrize("item", ["not-an-ip", "localhost", "10.0.0.0/33", "::1/129",
                                  "256.0.0.1", "", "10.0.0.0/8 "])
def test_admin_allow_rejects_what_is_not_an_address(item):
    exc = error_of(minimal(admin={"allow": ["127.0.0.1", item]}))
    assert exc.key == "admin.allow"
    assert f"{item!r} is not an IP address or network" in exc.reason


@pytest.mark.parametrize("bad,reason", [
    ("127.0.0.1", "must be an array of addresses or networks, got string"),
    (8, "must be an array of addresses or networks, got integer"),
    ([127], "must hold strings"),
    ([["::1"]], "must hold strings"),
])
def test_admin_allow_must_be_an_array_of_strings(bad, reason):
    exc = error_of(minimal(admin={"allow": bad}))
    assert exc.key == "admin.allow"
    assert reason in exc.reason


# --- [fallback.cartesia]


def cartesia(**keys) -> dict:
    """minimal() with [fallback.cartesia] holding `keys`."""
    return minimal(**{"fallback.cartesia": keys})


def test_cartesia_defaults_without_a_fallback_table():
    assert parse(minimal()).cartesia == EXPECTED_DEFAULTS["cartesia"]
    assert parse(minimal(fallback={})).cartesia == EXPECTED_DEFAULTS["cartesia"]
    assert parse(cartesia()).cartesia == EXPECTED_DEFAULTS["cartesia"]


def test_cartesia_every_key_round_trips():
    raw = cartesia(enabled=True, url="http://127.0.0.1:8443/", api_key_env="MY_TTS_KEY",
                   version="2025-04-16", model_id="sonic-latest", language="pt-BR",
                   max_concurrency=15, timeout=12, spillover=True, ca_file="/etc/ca.pem",
                   voices={"default": UUID, "alloy": "694f9389-aac1-45b6-b726-9d9369183238"})
    before = copy.deepcopy(raw)
    config = parse(raw)
    assert raw == before
    assert config.cartesia == Cartesia(
        enabled=True, url="http://127.0.0.1:8443", api_key_env="MY_TTS_KEY",
        version="2025-04-16", model_id="sonic-latest", language="pt-BR", max_concurrency=15,
        timeout=12.0, spillover=True, ca_file="/etc/ca.pem",
        voices={"default": UUID, "alloy": "694f9389-aac1-45b6-b726-9d9369183238"})
    assert type(config.cartesia.timeout) is float


def test_cartesia_voices_are_not_shared_between_parses():
    first, second = parse(minimal()), parse(minimal())
    first.cartesia.voices["x"] = UUID
    assert second.cartesia.voices == {} and SECTIONS["fallback.cartesia"]["voices"][0] == {}
    raw = cartesia(voices={"default": UUID})
    parse(raw).cartesia.voices["y"] = UUID
    assert raw["fallback"]["cartesia"]["voices"] == {"default": UUID}


def test_unknown_fallback_subsection_is_named():
    exc = error_of(minimal(**{"fallback.elevenlabs": {"enabled": True}}))
    assert exc.key == "fallback.elevenlabs"
    assert "unknown section" in exc.reason and "cartesia" in exc.reason


@pytest.mark.parametrize("value,shown", [(5, "integer"), ("cartesia", "string"), ([{}], "array")])
def test_fallback_not_a_table(value, shown):
    exc = error_of(minimal(fallback=value))
    assert exc.key == "fallback"
    assert "must be a table" in exc.reason and shown in exc.reason


def test_literal_dotted_fallback_key_is_unknown():
    raw = minimal()
    raw["fallback.cartesia"] = {"enabled": False}
    exc = error_of(raw)
    assert exc.key == "fallback.cartesia" and "unknown section" in exc.reason


@pytest.mark.parametrize("key", ["enabled", "spillover"])
@pytest.mark.parametrize("bad", [1, 0, "true", "yes", [True]])
def test_cartesia_booleans(key, bad):
    exc = error_of(cartesia(**{key: bad}))
    assert exc.key == f"fallback.cartesia.{key}"
    assert "must be true or false" in exc.reason


@pytest.mark.parametrize("url,expected", [
    ("https://api.cartesia.ai", "https://api.cartesia.ai"),
    ("https://api.cartesia.ai/", "https://api.cartesia.ai"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://[::1]:8443", "https://[::1]:8443"),
])
def test_cartesia_url_accepted(url, expected):
    assert parse(cartesia(url=url)).cartesia.url == expected


@pytest.mark.parametrize("url,reason", [
    ("https://api.cartesia.ai/tts/bytes", "must be scheme://host[:port] only"),
    ("https://api.cartesia.ai/v1", "must be scheme://host[:port] only"),
    ("https://api.cartesia.ai?x=1", "must be scheme://host[:port] only"),
    ("https://api.cartesia.ai#tts", "must be scheme://host[:port] only"),
    ("https://user:pw@api.cartesia.ai", "must be scheme://host[:port] only"),
    ("wss://api.cartesia.ai", "must be http(s)://host[:port]"),
    ("ftp://api.cartesia.ai", "must be http(s)://host[:port]"),
    ("api.cartesia.ai", "must be http(s)://host[:port]"),
    ("//api.cartesia.ai", "must be http(s)://host[:port]"),
    ("https://", "must be http(s)://host[:port]"),
    ("", "must be http(s)://host[:port]"),
    ("https://api.cartesia.ai:99999", "cannot parse URL"),
    ("https://api.cartesia.ai:port", "cannot parse URL"),
    ("https://[::1", "cannot parse URL"),
])
def test_cartesia_url_rejected(url, reason):
    exc = error_of(cartesia(url=url))
    assert exc.key == "fallback.cartesia.url"
    assert reason in exc.reason and repr(url) in exc.reason


@pytest.mark.parametrize("url,shown", [(443, "integer"), (["https://a"], "array"),
                                       (True, "boolean"), ({"host": "a"}, "table")])
def test_cartesia_url_not_a_string(url, shown):
    exc = error_of(cartesia(url=url))
    assert exc.key == "fallback.cartesia.url"
    assert "must be a URL" in exc.reason and shown in exc.reason


@pytest.mark.parametrize("url", [
    "https://api.cartesia.ai\n",        # a newline would reach log lines and /health
    " https://api.cartesia.ai",
    "https://api.cart\nesia.ai",        # urlsplit drops the newline: host "api.cartesia.ai"
    "https://api cartesia.ai",          # no such host name
    "https://api.cartesia.ai:0",        # cannot be connected to (backend urls reject it)
])
def test_cartesia_url_with_spaces_controls_or_port_zero_rejected(url):
    exc = error_of(cartesia(url=url))
    assert exc.key == "fallback.cartesia.url"


@pytest.mark.parametrize("name", ["CARTESIA_API_KEY", "MY_KEY_2", "_K"])
def test_cartesia_api_key_env_accepted(name):
    assert parse(cartesia(api_key_env=name)).cartesia.api_key_env == name


@pytest.mark.parametrize("name", ["cartesia_key", "_k"])
def test_cartesia_api_key_env_must_be_in_capitals(name):
    # Lower case is refused so that a pasted key (sk_car_...) cannot pass.
    exc = error_of(cartesia(api_key_env=name))
    assert exc.key == "fallback.cartesia.api_key_env" and "in capitals" in exc.reason
    assert name not in exc.reason      # a string here may be the key: never echoed


@pytest.mark.parametrize("bad", [
    "a0e99841-438c-4a64-b679-ae501e7d6091",     # a key, not a variable name
    "sk-car-4Fq9xYzT",
    "Bearer sk_car_x",
    "$CARTESIA_API_KEY",
    "CARTESIA-API-KEY",
    "1KEY",
    "",
    5,
    ["CARTESIA_API_KEY"],
])
def test_cartesia_api_key_env_must_be_a_variable_name(bad):
    exc = error_of(cartesia(api_key_env=bad))
    assert exc.key == "fallback.cartesia.api_key_env"
    assert "environment variable name" in exc.reason
    assert "the key itself never goes in this file" in exc.reason


@pytest.mark.parametrize("key", [
    "sk_car_fake_7Qx2LmN9pR4t",         # the shape of a Cartesia key (tests/test_fake_cartesia.py)
    "sk_car_admin_0123456789abcdef",
])
def test_cartesia_api_key_env_rejects_a_pasted_cartesia_key(key):
    exc = error_of(cartesia(api_key_env=key))
    assert exc.key == "fallback.cartesia.api_key_env"
    assert "the key itself never goes in this file" in exc.reason


@pytest.mark.parametrize("good", ["2026-03-01", "2025-04-16", "2024-06-10"])
def test_cartesia_version_accepted(good):
    assert parse(cartesia(version=good)).cartesia.version == good


@pytest.mark.parametrize("bad", ["latest", "2026-3-1", "20260301", "2026/03/01", " 2026-03-01",
                                 "2026-03-01T00:00", "", 20260301, 2026.0301, None])
def test_cartesia_version_must_be_a_date(bad):
    exc = error_of(cartesia(version=bad))
    assert exc.key == "fallback.cartesia.version"
    assert "must be a dated version" in exc.reason


@pytest.mark.parametrize("bad", ["2026-13-01", "2026-02-30", "2026-00-00",
                                 "\uff12\uff10\uff12\uff16-03-01"])  # full-width digits
def test_cartesia_version_must_be_a_real_ascii_date(bad):
    # Cartesia-Version is a calendar date sent as an ASCII header value.
    exc = error_of(cartesia(version=bad))
    assert exc.key == "fallback.cartesia.version"


def test_cartesia_version_written_as_a_toml_date(tmp_path):
    # version = 2026-03-01 without quotes is a TOML date, not a string.
    path = tmp_path / "lb.toml"
    path.write_text("[fallback.cartesia]\nversion = 2026-03-01\n" + GOOD_BACKEND)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert info.value.key == "fallback.cartesia.version"
    assert "must be a dated version like \"2026-03-01\"" in info.value.reason


@pytest.mark.parametrize("good", ["sonic-3", "sonic-3.5", "sonic-latest"])
def test_cartesia_model_id_accepted(good):
    assert parse(cartesia(model_id=good)).cartesia.model_id == good


@pytest.mark.parametrize("bad", ["sonic-english", "sonic-multilingual", "sonic", "sonic-2",
                                 "Sonic-3", "sonic-3 ", "", 3, ["sonic-3"]])
def test_cartesia_model_id_choice(bad):
    exc = error_of(cartesia(model_id=bad))
    assert exc.key == "fallback.cartesia.model_id"
    assert "must be one of sonic-3, sonic-3.5, sonic-latest" in exc.reason


@pytest.mark.parametrize("good", ["en", "fr", "pt-BR", "zh-Hans", "es"])
def test_cartesia_language_accepted(good):
    assert parse(cartesia(language=good)).cartesia.language == good


@pytest.mark.parametrize("bad", ["English", "EN", "e", "eng", "en_US", "en-", "en-U", " en",
                                 "", 1, ["en"]])
def test_cartesia_language_code(bad):
    exc = error_of(cartesia(language=bad))
    assert exc.key == "fallback.cartesia.language"
    assert "must be a language code like \"en\"" in exc.reason


@pytest.mark.parametrize("good", ["", "/etc/ssl/certs/ca-certificates.crt", "conf/ca.pem"])
def test_cartesia_ca_file_accepted(good):
    assert parse(cartesia(ca_file=good)).cartesia.ca_file == good


@pytest.mark.parametrize("bad,shown", [(False, "boolean"), (0, "integer"), (["a.pem"], "array")])
def test_cartesia_ca_file_must_be_a_string(bad, shown):
    exc = error_of(cartesia(ca_file=bad))
    assert exc.key == "fallback.cartesia.ca_file"
    assert "must be a file path" in exc.reason and shown in exc.reason


@pytest.mark.parametrize("bad,shown", [("default", "string"), ([UUID], "array"), (1, "integer")])
def test_cartesia_voices_must_be_a_table(bad, shown):
    exc = error_of(cartesia(voices=bad))
    assert exc.key == "fallback.cartesia.voices"
    assert "must be a table of voice name = Cartesia voice id" in exc.reason and shown in exc.reason


@pytest.mark.parametrize("voices,name,shown", [
    ({"default": 5}, "default", "integer 5"),
    ({"default": UUID, "alloy": True}, "alloy", "boolean True"),
    ({"alloy": [UUID]}, "alloy", "array"),
    ({"alloy": {"id": UUID}}, "alloy", "table"),
    ({"alloy": ""}, "alloy", "string ''"),
    ({"alloy": "not a uuid"}, "alloy", "string 'not a uuid'"),
    ({"alloy": "x" * 65}, "alloy", "string"),
    ({"alloy": UUID + "\n"}, "alloy", "string"),
])
def test_cartesia_voice_ids(voices, name, shown):
    exc = error_of(cartesia(voices=voices))
    assert exc.key == "fallback.cartesia.voices"
    assert f"voice {name!r} must map to a Cartesia voice id" in exc.reason and shown in exc.reason


def test_cartesia_voice_names_are_free():
    voices = {"default": UUID, "Alloy": UUID, "en-GB narrator": UUID, "": UUID, "x" * 64: UUID}
    assert parse(cartesia(enabled=True, voices=voices)).cartesia.voices == voices


@pytest.mark.parametrize("voices", [None, {}, {"alloy": UUID}, {"Default": UUID}])
def test_enabled_fallback_needs_a_default_voice(voices):
    raw = cartesia(enabled=True) if voices is None else cartesia(enabled=True, voices=voices)
    exc = error_of(raw)
    assert exc.key == "fallback.cartesia.voices.default"
    assert "required when the fallback is enabled" in exc.reason


def test_disabled_fallback_needs_no_default_voice():
    config = parse(cartesia(enabled=False, voices={"alloy": UUID}))
    assert not config.cartesia.enabled and config.cartesia.voices == {"alloy": UUID}


def test_bad_voice_id_is_reported_before_the_missing_default():
    exc = error_of(cartesia(enabled=True, voices={"alloy": 5}))
    assert exc.key == "fallback.cartesia.voices"


def test_cartesia_from_a_real_toml_file(tmp_path):
    # [fallback.cartesia.voices] is three levels deep: raw["fallback"]["cartesia"]["voices"].
    path = tmp_path / "lb.toml"
    path.write_text(
        '[fallback.cartesia]\nenabled = true\nmax_concurrency = 5\ntimeout = 45\n'
        'spillover = true\n'
        f'[fallback.cartesia.voices]\ndefault = "{UUID}"\n"en narrator" = "{UUID}"\n'
        + GOOD_BACKEND)
    config = load(str(path))
    assert config.cartesia == dataclasses.replace(
        EXPECTED_DEFAULTS["cartesia"], enabled=True, max_concurrency=5, timeout=45.0,
        spillover=True, voices={"default": UUID, "en narrator": UUID})


def test_voices_written_inline_and_as_a_subtable_agree(tmp_path):
    inline = tmp_path / "a.toml"
    inline.write_text(f'[fallback.cartesia]\nenabled = true\nvoices = {{ default = "{UUID}" }}\n'
                      + GOOD_BACKEND)
    nested = tmp_path / "b.toml"
    nested.write_text(f'[fallback.cartesia]\nenabled = true\n[fallback.cartesia.voices]\n'
                      f'default = "{UUID}"\n' + GOOD_BACKEND)
    assert load(str(inline)) == load(str(nested))


# --- [[route]]


def routes(*entries) -> dict:
    raw = minimal()
    raw["route"] = copy.deepcopy(list(entries))
    return raw


def test_routes_in_order():
    config = parse(routes({"path": "/synthesize", "kind": "chatterbox"},
                          {"path": "/v1/audio/speech", "kind": "openai"},
                          {"path": "/generate_voice", "kind": "chattts"}))
    assert config.routes == (route_of("/synthesize", "chatterbox"),
                             route_of("/v1/audio/speech", "openai"),
                             route_of("/generate_voice", "chattts"))


def test_empty_route_array_is_no_routes():
    assert parse(routes()).routes == ()


def test_route_kinds():
    assert ROUTE_KINDS == ("chatterbox", "openai", "chattts")
    assert {r.kind for r in SHIPPED_ROUTES} == set(ROUTE_KINDS)


@pytest.mark.parametrize("path", ["/", "/synthesize-json", "/v1/audio/speech/stream",
                                  "/a_b.c~d!$&'()*+,;=:@%20"])
def test_route_path_accepted(path):
    assert parse(routes({"path": path, "kind": "openai"})).routes == (route_of(path, "openai"),)


@pytest.mark.parametrize("path,shown", [
    ("synthesize", "'synthesize'"), ("", "''"), ("/a b", "'/a b'"), (" /a", "' /a'"),
    ("/tts?voice=x", "'/tts?voice=x'"), ("/tts?", "'/tts?'"), ("/tts#x", "'/tts#x'"),
    ("http://h/tts", "'http://h/tts'"), ("/t\tts", "string"), ("/t\x7fts", "string"),
    ("/t\u00e9", "string"), (5, "integer 5"), (["/tts"], "array"), (None, "missing"),
])
def test_route_path_rejected(path, shown):
    entry = {"kind": "openai"} if path is None else {"path": path, "kind": "openai"}
    exc = error_of(routes({"path": "/ok", "kind": "openai"}, entry))
    assert exc.key == "route[1].path"
    assert "must be a path starting with '/', without spaces, '?' or '#'" in exc.reason
    assert shown in exc.reason


@pytest.mark.parametrize("kind,shown", [("cartesia", "'cartesia'"), ("OpenAI", "'OpenAI'"),
                                        ("", "''"), (1, "integer"), (["openai"], "array"),
                                        (None, "missing")])
def test_route_kind_rejected(kind, shown):
    entry = {"path": "/tts"} if kind is None else {"path": "/tts", "kind": kind}
    exc = error_of(routes(entry))
    assert exc.key == "route[0].kind"
    assert "must be one of chatterbox, openai, chattts" in exc.reason and shown in exc.reason


@pytest.mark.parametrize("kind", ["openai", "chatterbox"])
def test_duplicate_route_path(kind):
    exc = error_of(routes({"path": "/a", "kind": "openai"}, {"path": "/b", "kind": "openai"},
                          {"path": "/a", "kind": kind}))
    assert exc.key == "route[2].path"
    assert "duplicate route '/a'" in exc.reason


def test_route_paths_are_exact_not_normalised():
    config = parse(routes({"path": "/tts", "kind": "openai"}, {"path": "/tts/", "kind": "openai"},
                          {"path": "/TTS", "kind": "chattts"}))
    assert [r.path for r in config.routes] == ["/tts", "/tts/", "/TTS"]


@pytest.mark.parametrize("key", ["method", "Path", "backend", "fallback"])
def test_unknown_key_in_route(key):
    exc = error_of(routes({"path": "/a", "kind": "openai"},
                          {"path": "/b", "kind": "openai", key: "x"}))
    assert exc.key == f"route[1].{key}"
    assert ("unknown key (known: path, kind, slot, voices, pass_unknown_voices, models, "
            "max_input, split)") in exc.reason


@pytest.mark.parametrize("value", [{"path": "/a", "kind": "openai"}, "/a", 1, True])
def test_route_not_an_array(value):
    raw = minimal()
    raw["route"] = value
    exc = error_of(raw)
    assert exc.key == "route"
    assert "must be an array of tables ([[route]])" in exc.reason


@pytest.mark.parametrize("entry", ["/a", 1, ["/a", "openai"], None])
def test_route_entry_not_a_table(entry):
    exc = error_of(routes({"path": "/ok", "kind": "openai"}, entry))
    assert exc.key == "route[1]"
    assert "must be a table" in exc.reason


def test_routes_are_checked_after_backends():
    raw = routes({"path": "bad", "kind": "openai"})
    raw["backend"] = []
    assert error_of(raw).key == "backend"


# --- per-backend keys


def two_backends(**first) -> dict:
    return {"backend": [{"name": "a", "url": "http://h:1", **first},
                        {"name": "b", "url": "http://h:2"}]}


def test_backend_max_concurrency_defaults_to_the_balancer_one():
    raw = two_backends(max_concurrency=2)
    raw["balancer"] = {"max_concurrency": 9}
    a, b = parse(raw).backends
    assert a.max_concurrency == 2   # its own
    assert b.max_concurrency == 9   # inherited from [balancer]


def test_backend_max_concurrency_default_without_a_balancer_table():
    a, b = parse(two_backends(max_concurrency=11)).backends
    assert (a.max_concurrency, b.max_concurrency) == (11, 4)


def test_backend_keys_round_trip():
    a, b = parse(two_backends(max_concurrency=3, weight=5, health_path="/health")).backends
    assert a == BackendConfig("a", "http://h:1", "h", 1, max_concurrency=3, weight=5,
                              health_path="/health")
    assert b == BackendConfig("b", "http://h:2", "h", 2, max_concurrency=4, weight=1,
                              health_path="")


@pytest.mark.parametrize("key,bad", [
    ("weight", 0), ("weight", -1), ("weight", 1001),
    ("max_concurrency", 0), ("max_concurrency", 100_001),
])
def test_backend_integer_ranges(key, bad):
    exc = error_of(two_backends(**{key: bad}))
    assert exc.key == f'backend "a".{key}'
    assert "must be >=" in exc.reason and f"got {bad}" in exc.reason


@pytest.mark.parametrize("key,good", [("weight", 1), ("weight", 1000),
                                      ("max_concurrency", 1), ("max_concurrency", 100_000)])
def test_backend_integer_bounds_are_inclusive(key, good):
    assert getattr(parse(two_backends(**{key: good})).backends[0], key) == good


@pytest.mark.parametrize("key", ["weight", "max_concurrency"])
@pytest.mark.parametrize("bad,shown", [("2", "string"), (True, "boolean"), (2.0, "number"),
                                       ([2], "array")])
def test_backend_integer_keys_reject_other_types(key, bad, shown):
    exc = error_of({"backend": [{"name": "a", "url": "http://h:1"},
                                {"name": "b", "url": "http://h:2", key: bad}]})
    assert exc.key == f'backend "b".{key}'
    assert "must be an integer" in exc.reason and shown in exc.reason


@pytest.mark.parametrize("good", ["/health", "/", "/v1/health?full=1", "/ready-ish_.~", ""])
def test_health_path_accepted(good):
    assert parse(two_backends(health_path=good)).backends[0].health_path == good


@pytest.mark.parametrize("bad", ["health", "health/", " /health", "/health check", "/h\t", "/h#x",
                                 "/h\x00", "/h\x7f", "http://h:1/health"])
def test_health_path_must_start_with_a_slash(bad):
    exc = error_of(two_backends(health_path=bad))
    assert exc.key == 'backend "a".health_path'
    assert "must start with '/'" in exc.reason and repr(bad) in exc.reason


@pytest.mark.parametrize("bad,shown", [(1, "integer"), (["/h"], "array"), (True, "boolean")])
def test_health_path_must_be_a_string(bad, shown):
    exc = error_of(two_backends(health_path=bad))
    assert exc.key == 'backend "a".health_path'
    assert "must be a path" in exc.reason and shown in exc.reason


def test_nested_tables_from_a_real_toml_file(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text(
        '[balancer]\npolicy = "round_robin"\nmax_concurrency = 6\nslow_start = 0\n'
        '[health.passive]\nstatuses = [503, 500, 503]\njitter = 0\n'
        '[health.active]\ninterval = 5\nrise = 1\n'
        '[retry]\nattempts = 3\nbackoff_base = 0.1\nbackoff_max = 1\n'
        '[admin]\nallow = ["::1", "10.0.0.0/8"]\n'
        '[[backend]]\nname = "a"\nurl = "http://127.0.0.1:1"\nweight = 3\n'
        'health_path = "/health"\n'
        '[[backend]]\nname = "b"\nurl = "http://127.0.0.1:2"\nmax_concurrency = 1\n')
    config = load(str(path))
    assert config.balancer == Balancing("round_robin", 6, 1024, 10.0, 0.0)
    assert config.passive.statuses == (500, 503) and config.passive.jitter == 0.0
    assert config.active == Active(interval=5.0, timeout=1.0, rise=1, fall=3)
    assert (config.retry.attempts, config.retry.backoff_base, config.retry.backoff_max) == (
        3, 0.1, 1.0)
    assert config.admin.allow == (ipaddress.ip_network("::1"), ipaddress.ip_network("10.0.0.0/8"))
    assert [(b.name, b.max_concurrency, b.weight, b.health_path) for b in config.backends] == [
        ("a", 6, 3, "/health"), ("b", 1, 1, "")]



# --- listen address


@pytest.mark.parametrize("address,host,port", [
    ("0.0.0.0:6095", "0.0.0.0", 6095),
    ("127.0.0.1:0", "127.0.0.1", 0),
    ("localhost:65535", "localhost", 65535),
    ("[::1]:6095", "::1", 6095),
    ("[::]:6095", "::", 6095),
    ("[fe80::1:2]:80", "fe80::1:2", 80),
])
def test_listen_address_accepted(address, host, port):
    config = parse(minimal(listen={"address": address}))
    assert config.listen == Listen(host=host, port=port)


@pytest.mark.parametrize("address", [
    "localhost", "6095", ":6095", "0.0.0.0:", "::1:6095", "[::1]", "[::1]6095",
    "0.0.0.0:port", "0.0.0.0:-1", "", "[]:80", "[::1]:", "host:80:90", "[local]:80",
])
def test_listen_address_bad_forms(address):
    exc = error_of(minimal(listen={"address": address}))
    assert exc.key == "listen.address"
    assert "HOST:PORT" in exc.reason


@pytest.mark.parametrize("address", ["0.0.0.0:65536", "[::1]:99999", "h:1000000"])
def test_listen_port_out_of_range(address):
    exc = error_of(minimal(listen={"address": address}))
    assert exc.key == "listen.address"
    assert "port must be 0-65535" in exc.reason


@pytest.mark.parametrize("bad,shown", [(6095, "integer"), (None, "missing"), (["a"], "array")])
def test_listen_address_not_a_string(bad, shown):
    exc = error_of(minimal(listen={"address": bad}))
    assert exc.key == "listen.address"
    assert "must be a string" in exc.reason and shown in exc.reason


# --- backends


def test_no_backends_missing():
    exc = error_of({})
    assert exc.key == "backend"
    assert "no backends configured" in exc.reason


def test_no_backends_empty_list():
    exc = error_of({"backend": []})
    assert exc.key == "backend"
    assert "no backends configured" in exc.reason


def test_backend_as_single_table():
    exc = error_of({"backend": {"name": "a", "url": "http://h:1"}})
    assert exc.key == "backend"
    assert "array of tables" in exc.reason


def test_backend_entry_not_a_table():
    exc = error_of({"backend": [{"name": "a", "url": "http://h:1"}, "http://h:2"]})
    assert exc.key == "backend[1]"
    assert "must be a table" in exc.reason


def test_duplicate_backend_name():
    exc = error_of({"backend": [{"name": "gpu0", "url": "http://h:1"},
                                {"name": "gpu1", "url": "http://h:2"},
                                {"name": "gpu0", "url": "http://h:3"}]})
    assert exc.key == "backend[2].name"
    assert "duplicate backend name 'gpu0'" in exc.reason


@pytest.mark.parametrize("name", [None, "", "-gpu", "gpu 0", "g/0", "x" * 65, 7, "é"])
def test_bad_backend_name(name):
    entry = {"url": "http://h:1"} if name is None else {"name": name, "url": "http://h:1"}
    exc = error_of({"backend": [entry]})
    assert exc.key == "backend[0].name"
    assert "must be 1-64 letters" in exc.reason


@pytest.mark.parametrize("name", ["a", "GPU-0.east_1", "0", "x" * 64])
def test_good_backend_names(name):
    assert parse({"backend": [{"name": name, "url": "http://h:1"}]}).backends[0].name == name


@pytest.mark.parametrize("url,reason", [
    ("https://127.0.0.1:6093", "scheme must be http"),
    ("ftp://127.0.0.1:6093", "scheme must be http"),
    ("127.0.0.1:6093", "scheme must be http"),
    ("//127.0.0.1:6093", "scheme must be http"),
    ("http://", "no host"),
    ("http://:6093", "no host"),
    ("http:/h:1", "no host"),
    ("http://127.0.0.1:6093/tts", "must be scheme://host:port only"),
    ("http://127.0.0.1:6093/?x=1", "must be scheme://host:port only"),
    ("http://127.0.0.1:6093#frag", "must be scheme://host:port only"),
    ("http://user@127.0.0.1:6093", "must not hold a user or password"),
    ("http://user:pw@127.0.0.1:6093", "must not hold a user or password"),
    ("http://127.0.0.1:99999", "cannot parse URL"),
    ("http://127.0.0.1:65536", "cannot parse URL"),
    ("http://127.0.0.1:port", "cannot parse URL"),
    ("http://127.0.0.1:-1", "cannot parse URL"),
    ("http://[::1:6093", "cannot parse URL"),
])
def test_bad_backend_url(url, reason):
    exc = error_of({"backend": [{"name": "a", "url": "http://h:1"},
                                {"name": "b", "url": url}]})
    assert exc.key == 'backend "b".url'
    assert reason in exc.reason
    if "@" in url:   # the URL is quoted, but not a password it may hold
        assert "user@" not in exc.reason and ":pw" not in exc.reason and "//***@" in exc.reason
    else:
        assert repr(url) in exc.reason


@pytest.mark.parametrize("url,shown", [(None, "missing"), (6093, "integer"),
                                       (["http://h:1"], "array"), (True, "boolean")])
def test_backend_url_not_a_string(url, shown):
    entry = {"name": "a"} if url is None else {"name": "a", "url": url}
    exc = error_of({"backend": [entry]})
    assert exc.key == 'backend "a".url'
    assert "must be a string" in exc.reason and shown in exc.reason


def test_backend_url_port_zero_rejected():
    exc = error_of({"backend": [{"name": "a", "url": "http://127.0.0.1:0"}]})
    assert exc.key == 'backend "a".url'


def test_backend_url_password_without_user_rejected():
    exc = error_of({"backend": [{"name": "a", "url": "http://:secret@127.0.0.1:6093"}]})
    assert exc.key == 'backend "a".url'


# --- properties

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

# Junk placed at one known key: (path, how to plant it).
LEAF_PATHS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys] + [
    f"backend[{i}].{key}" for i in (0, 1) for key in ("name", "url", *BACKEND_KEYS)] + [
    f"route[{i}].{key}" for i in (0, 1) for key in ("path", "kind")]
# "health" is the parent of [health.passive] and [health.active]; "fallback" of
# [fallback.cartesia].
PARENTS = sorted({section.split(".")[0] for section in SECTIONS if "." in section})
ARRAYS = ("backend", "route")   # [[backend]] and [[route]]: arrays of tables
CONTAINER_PATHS = [*SECTIONS, *PARENTS, *(f"{a}{i}" for a in ARRAYS for i in ("", "[0]", "[1]"))]
# Junk at the first key may be a good value that fails the comparison with the
# second; that error is reported at the second key.
COMPARED = {"health.passive.base_ejection": "health.passive.max_ejection",
            "retry.backoff_base": "retry.backoff_max",
            # voices is table-valued: a junk table may be a good one that lacks the
            # "default" an enabled fallback requires.
            "fallback.cartesia.voices": "fallback.cartesia.voices.default"}
# One level deeper, inside the table-valued key [fallback.cartesia.voices]
# (raw["fallback"]["cartesia"]["voices"][name]): any name is allowed, and a bad
# id is reported at the voices key itself, with the voice's name in the reason.
VOICE_PATHS = ["fallback.cartesia.voices.default", "fallback.cartesia.voices.alloy"]


def base_document() -> dict:
    """Every section present (so junk can be planted in each), all values good."""
    return {
        "listen": {"address": "127.0.0.1:6095"},
        "limits": {"nofile": 1024},
        "timeouts": {"connect": 1.5},
        "pool": {"max_idle": 4},
        "log": {"access": False},
        "balancer": {"policy": "p2c", "max_concurrency": 2},
        "health": {"passive": {"base_ejection": 5, "max_ejection": 60, "statuses": [503]},
                   "active": {"rise": 1}},
        "retry": {"attempts": 3, "backoff_base": 0.05, "backoff_max": 0.5},
        "admin": {"allow": ["10.0.0.0/8"]},
        # Enabled, so that the cross-key rule (voices.default) is live.
        "fallback": {"cartesia": {"enabled": True, "model_id": "sonic-3.5", "timeout": 20,
                                  "voices": {"default": UUID, "alloy": UUID}}},
        "backend": [{"name": "a", "url": "http://127.0.0.1:1", "weight": 2},
                    {"name": "b", "url": "http://127.0.0.1:2", "health_path": "/health"}],
        "route": [{"path": "/synthesize", "kind": "chatterbox"},
                  {"path": "/v1/audio/speech", "kind": "openai"}],
    }


def test_base_document_is_valid_and_has_every_section():
    raw = base_document()
    parse(raw)
    for section in SECTIONS:
        assert isinstance(table_of(raw, section), dict)
    assert raw == base_document()
    config = parse(raw)
    assert config.cartesia.enabled and config.cartesia.voices == {"default": UUID, "alloy": UUID}
    assert len(config.routes) == 2


def plant(raw: dict, path: str, value) -> None:
    array = path.split("[", 1)[0]
    if array in ARRAYS and "[" in path:
        index = int(path[len(array) + 1:path.index("]")])
        rest = path[path.index("]") + 1:]
        if not rest:
            raw[array][index] = value
        else:
            raw[array][index][rest[1:]] = value
    elif path in SECTIONS or path in PARENTS or path in ARRAYS:
        put(raw, path, value)
    else:
        section, key = path.rsplit(".", 1)
        table_of(raw, section)[key] = value


def test_plant_places_dotted_paths_as_nested_tables():
    raw = base_document()
    plant(raw, "health.passive.jitter", 0.5)
    plant(raw, "health.active", {"rise": 9})
    plant(raw, "backend[1].weight", 3)
    assert raw["health"]["passive"]["jitter"] == 0.5
    assert raw["health"]["active"] == {"rise": 9}
    assert "health.passive" not in raw and "health.active" not in raw
    config = parse(raw)
    assert (config.passive.jitter, config.active.rise, config.backends[1].weight) == (0.5, 9, 3)


def test_plant_reaches_three_levels_and_routes():
    raw = base_document()
    plant(raw, "fallback.cartesia.voices.nova", UUID)
    plant(raw, "fallback.cartesia.language", "fr")
    plant(raw, "route[1].kind", "chattts")
    assert raw["fallback"]["cartesia"]["voices"]["nova"] == UUID
    assert "fallback.cartesia" not in raw and "fallback.cartesia.voices" not in raw
    config = parse(raw)
    assert config.cartesia.voices["nova"] == UUID and config.cartesia.language == "fr"
    assert config.routes[1] == route_of("/v1/audio/speech", "chattts")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(LEAF_PATHS), value=JUNK)
def test_junk_at_a_key_is_a_config_error_naming_that_key(path, value):
    raw = base_document()
    plant(raw, path, value)
    try:
        parse(raw)
    except ConfigError as exc:
        if path.endswith(".name") and exc.key.startswith("backend["):
            # A junk name equal to the other backend's is reported at the later one.
            assert exc.key in (path, "backend[1].name")
        elif path.endswith(".path") and exc.key.startswith("route["):
            # Likewise a junk path equal to the other route's.
            assert exc.key in (path, "route[1].path"), (exc.key, str(exc))
        elif path in COMPARED:
            assert exc.key in (path, COMPARED[path]), (exc.key, str(exc))
        elif path.startswith("backend["):
            # Past its name, a backend is named by name: backend[1].url -> backend "b".url
            index, key = re.fullmatch(r"backend\[(\d)\]\.(\w+)", path).groups()
            assert exc.key == f'backend "{"ab"[int(index)]}".{key}', (exc.key, str(exc))
        else:
            assert exc.key == path, (exc.key, str(exc))
        assert exc.reason
        assert "\n" not in exc.reason


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(VOICE_PATHS), value=JUNK)
def test_junk_voice_id_is_reported_at_the_voices_key(path, value):
    raw = base_document()
    plant(raw, path, value)
    try:
        config = parse(raw)
    except ConfigError as exc:
        assert exc.key == "fallback.cartesia.voices", (exc.key, str(exc))
        assert repr(path.rsplit(".", 1)[1]) in exc.reason and "\n" not in exc.reason
    else:
        assert config.cartesia.voices[path.rsplit(".", 1)[1]] == value


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(CONTAINER_PATHS), value=JUNK)
def test_junk_in_place_of_a_table_is_a_config_error_under_that_key(path, value):
    raw = base_document()
    plant(raw, path, value)
    try:
        parse(raw)
    except ConfigError as exc:
        assert exc.key == path or exc.key.startswith((path + ".", path + "[")) or (
            # a replaced backend[0] may collide with backend[1]'s name (route[0] with
            # route[1]'s path)
            path.startswith(("backend[", "route[")) and exc.key.startswith(
                path.split("[", 1)[0] + "[")), (exc.key, str(exc))


@settings(max_examples=100, deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1, max_size=10), JUNK, min_size=1, max_size=3),
       section=st.sampled_from(sorted(SECTIONS)))
def test_unknown_keys_are_named(extra, section):
    extra = {k: v for k, v in extra.items() if k not in SECTIONS[section]}
    if not extra:
        return
    raw = base_document()
    table_of(raw, section).update(extra)
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert info.value.key == f"{section}.{sorted(extra)[0]}"


positive_seconds = (st.integers(min_value=1, max_value=10**9)
                    | st.floats(min_value=0.0, exclude_min=True, max_value=1e9,
                                allow_nan=False, allow_infinity=False))


@settings(max_examples=100, deadline=None)
@given(
    timeouts=st.fixed_dictionaries({k: positive_seconds for k in SECTIONS["timeouts"]}),
    limits=st.fixed_dictionaries({
        "nofile": st.integers(1, 2**31),
        "max_connections": st.integers(0, 2**31),
        "max_header_bytes": st.integers(1024, 1 << 20),
        "max_body_bytes": st.integers(0, 2**40),
        "write_buffer_high": st.integers(4096, 64 << 20),
    }),
    pool=st.fixed_dictionaries({"max_idle": st.integers(0, 10**6),
                                "idle_timeout": positive_seconds}),
    log=st.fixed_dictionaries({"access": st.booleans(),
                               "level": st.sampled_from(["debug", "info", "warning", "error"])}),
    port=st.integers(0, 65535),
    host=st.sampled_from(["0.0.0.0", "127.0.0.1", "localhost", "[::]", "[::1]"]),
)
def test_valid_values_round_trip(timeouts, limits, pool, log, port, host):
    raw = {"listen": {"address": f"{host}:{port}"}, "timeouts": timeouts, "limits": limits,
           "pool": pool, "log": log, "backend": copy.deepcopy(ONE_BACKEND)}
    config = parse(raw)
    assert config.listen == Listen(host=host.strip("[]"), port=port)
    assert config.timeouts == Timeouts(**{k: float(v) for k, v in timeouts.items()})
    assert all(type(v) is float for v in vars(config.timeouts).values())
    assert config.limits == Limits(**limits)
    assert config.pool == Pool(max_idle=pool["max_idle"], idle_timeout=float(pool["idle_timeout"]))
    assert config.log == Log(**log)
    assert math.isfinite(config.pool.idle_timeout)


status_lists = st.lists(st.integers(500, 599), max_size=8)
ordered_pair = st.tuples(positive_seconds, positive_seconds).map(sorted)
networks = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).flatmap(lambda a: st.integers(0, 32).map(
        lambda n: str(ipaddress.ip_network(f"{a}/{n}", strict=False)))),
    st.ip_addresses(v=6).flatmap(lambda a: st.integers(0, 128).map(
        lambda n: str(ipaddress.ip_network(f"{a}/{n}", strict=False)))),
)


@settings(max_examples=100, deadline=None)
@given(
    balancer=st.fixed_dictionaries({
        "policy": st.sampled_from(sorted(lb.scheduling.policy.POLICIES)),
        "max_concurrency": st.integers(1, 100_000),
        "queue_limit": st.integers(0, 1_000_000),
        "queue_timeout": positive_seconds,
        "slow_start": st.just(0) | positive_seconds,
    }),
    ejection=ordered_pair,
    passive=st.fixed_dictionaries({
        "consecutive_failures": st.integers(0, 10**6),
        "consecutive_5xx": st.integers(0, 10**6),
        "statuses": status_lists,
        "jitter": st.floats(0, 1) | st.sampled_from([0, 1]),
        "max_ejected_percent": st.integers(0, 100),
    }),
    active=st.fixed_dictionaries({"interval": positive_seconds, "timeout": positive_seconds,
                                  "rise": st.integers(1, 100), "fall": st.integers(1, 100)}),
    backoff=ordered_pair,
    retry=st.fixed_dictionaries({
        "attempts": st.integers(1, 10), "statuses": status_lists,
        "budget_percent": st.integers(0, 100), "budget_min": st.integers(0, 10**6),
        "replay_max_bytes": st.integers(0, 2**40),
    }),
    allow=st.lists(networks, max_size=5),
    overrides=st.lists(st.fixed_dictionaries({}, optional={
        "max_concurrency": st.integers(1, 100_000), "weight": st.integers(1, 1000),
        "health_path": st.just("") | st.text(st.characters(min_codepoint=0x21,
                                                            max_codepoint=0x7e,
                                                            blacklist_characters="#"),
                                             max_size=20).map(lambda t: "/" + t),
    }), min_size=1, max_size=4),
)
def test_new_sections_round_trip(balancer, ejection, passive, active, backoff, retry, allow,
                                 overrides):
    passive = {**passive, "base_ejection": ejection[0], "max_ejection": ejection[1]}
    retry = {**retry, "backoff_base": backoff[0], "backoff_max": backoff[1]}
    raw = {"balancer": balancer, "health": {"passive": passive, "active": active},
           "retry": retry, "admin": {"allow": allow},
           "backend": [{"name": f"b{i}", "url": f"http://10.0.0.1:{i + 1}", **extra}
                       for i, extra in enumerate(overrides)]}
    before = copy.deepcopy(raw)
    config = parse(raw)
    assert raw == before   # parse does not modify its input
    seconds = {"queue_timeout", "slow_start", "base_ejection", "max_ejection", "jitter",
               "interval", "timeout", "backoff_base", "backoff_max"}

    def clean(table):
        return {k: (float(v) if k in seconds else tuple(sorted(set(v))) if k == "statuses"
                    else v) for k, v in table.items()}

    assert config.balancer == Balancing(**clean(balancer))
    assert config.passive == Passive(**clean(passive))
    assert config.active == Active(**clean(active))
    assert config.retry == Retry(**clean(retry))
    assert config.admin == Admin(allow=tuple(ipaddress.ip_network(n) for n in allow))
    for attr, field in [f for f in FLOAT_FIELDS if f[0] not in ("timeouts", "pool")]:
        assert type(getattr(getattr(config, attr), field)) is float, (attr, field)
    for backend, extra in zip(config.backends, overrides):
        assert backend.max_concurrency == extra.get("max_concurrency",
                                                    balancer["max_concurrency"])
        assert backend.weight == extra.get("weight", 1)
        assert backend.health_path == extra.get("health_path", "")


@settings(max_examples=100, deadline=None)
@given(names=st.lists(st.builds(lambda a, b: a + b,
                                st.sampled_from("aZ09"), st.text("aZ09_.-", max_size=20)),
                      min_size=1, max_size=6, unique=True),
       ports=st.lists(st.integers(1, 65535), min_size=6, max_size=6))
def test_backends_round_trip(names, ports):
    raw = {"backend": [{"name": n, "url": f"http://10.0.0.{i}:{p}"}
                       for i, (n, p) in enumerate(zip(names, ports))]}
    config = parse(raw)
    assert [(b.name, b.host, b.port, b.url) for b in config.backends] == [
        (n, f"10.0.0.{i}", p, f"http://10.0.0.{i}:{p}") for i, (n, p) in enumerate(zip(names, ports))]


voice_ids = st.text("0123456789abcdefABCDEF-", min_size=1, max_size=64)


@settings(max_examples=100, deadline=None)
@given(
    keys=st.fixed_dictionaries({}, optional={
        "enabled": st.booleans(),
        "url": st.sampled_from(["https://api.cartesia.ai", "http://127.0.0.1:1",
                                "https://[::1]:443", "http://fake.local"]),
        "api_key_env": st.from_regex(r"[A-Z_][A-Z0-9_]{0,30}", fullmatch=True),
        "version": st.dates().map(lambda d: d.isoformat()).filter(lambda d: len(d) == 10),
        "model_id": st.sampled_from(["sonic-3", "sonic-3.5", "sonic-latest"]),
        "language": st.from_regex(r"[a-z]{2}(-[A-Za-z]{2,4})?", fullmatch=True),
        "max_concurrency": st.integers(1, 10_000),
        "timeout": positive_seconds,
        "spillover": st.booleans(),
        "ca_file": st.text(max_size=40),
    }),
    voices=st.dictionaries(st.text(max_size=20), voice_ids, max_size=5),
    default=voice_ids,
)
def test_cartesia_round_trip(keys, voices, default):
    if keys.get("enabled"):
        voices = {**voices, "default": default}
    raw = cartesia(**keys, voices=voices)
    before = copy.deepcopy(raw)
    config = parse(raw)
    assert raw == before
    expected = {key: value for key, (value, _) in SECTIONS["fallback.cartesia"].items()}
    expected.update(keys, voices=voices)
    expected["timeout"] = float(expected["timeout"])
    assert config.cartesia == Cartesia(**expected)
    assert type(config.cartesia.timeout) is float


@settings(max_examples=100, deadline=None)
@given(entries=st.lists(
    st.tuples(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e,
                                    blacklist_characters="#?"), max_size=20).map(lambda t: "/" + t),
              st.sampled_from(ROUTE_KINDS)),
    max_size=8, unique_by=lambda e: e[0]))
def test_routes_round_trip(entries):
    raw = routes(*({"path": p, "kind": k} for p, k in entries))
    assert parse(raw).routes == tuple(route_of(p, k) for p, k in entries)


# --- python -m lb --check


def run_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lb", "--check", "-c", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


GOOD_BACKEND = '[[backend]]\nname = "a"\nurl = "http://127.0.0.1:6093"\n'


@pytest.mark.parametrize("text,key,reason", [
    ("[timeouts]\nconect = 2\n" + GOOD_BACKEND, "timeouts.conect", "unknown key"),
    ('[limits]\nnofile = "many"\n' + GOOD_BACKEND, "limits.nofile", "must be an integer"),
    ("[timeouts]\nfirst_byte = 0\n" + GOOD_BACKEND, "timeouts.first_byte", "positive"),
    (GOOD_BACKEND + GOOD_BACKEND, "backend[1].name", "duplicate backend name"),
    ('[[backend]]\nname = "a"\nurl = "https://h:1"\n', 'backend "a".url', "scheme must be http"),
    ("[health.passive]\njitter = 2\n" + GOOD_BACKEND, "health.passive.jitter", "from 0 to 1"),
    ("[health.bogus]\nx = 1\n" + GOOD_BACKEND, "health.bogus", "unknown section"),
    ("health = 5\n" + GOOD_BACKEND, "health", "must be a table"),
    ("[health]\npassive = 5\n" + GOOD_BACKEND, "health.passive", "must be a table"),
    ('[balancer]\npolicy = "fastest"\n' + GOOD_BACKEND, "balancer.policy", "must be one of"),
    ("[retry]\nattempts = 0\n" + GOOD_BACKEND, "retry.attempts", "must be >= 1"),
    ("[retry]\nbackoff_base = 1\n" + GOOD_BACKEND, "retry.backoff_max", "backoff_base"),
    ('[admin]\nallow = ["not-an-ip"]\n' + GOOD_BACKEND, "admin.allow", "not an IP address"),
    (GOOD_BACKEND + "weight = 0\n", 'backend "a".weight', "must be >= 1"),
    (GOOD_BACKEND + 'health_path = "health"\n', 'backend "a".health_path', "start with '/'"),
    ("[fallback.cartesia]\nenabled = true\n" + GOOD_BACKEND, "fallback.cartesia.voices.default",
     "required when the fallback is enabled"),
    ('[fallback.cartesia]\nurl = "https://api.cartesia.ai/tts"\n' + GOOD_BACKEND,
     "fallback.cartesia.url", "scheme://host[:port] only"),
    ('[fallback.cartesia]\nmodel_id = "sonic-english"\n' + GOOD_BACKEND,
     "fallback.cartesia.model_id", "must be one of"),
    ("[fallback.cartesia.voices]\ndefault = 5\n" + GOOD_BACKEND, "fallback.cartesia.voices",
     "voice 'default'"),
    (GOOD_BACKEND + '[[route]]\npath = "/tts"\nkind = "piper"\n', "route[0].kind",
     "must be one of chatterbox, openai, chattts"),
    (GOOD_BACKEND + '[[route]]\npath = "/tts?x"\nkind = "openai"\n', "route[0].path",
     "without spaces, '?' or '#'"),
])
def test_check_reports_one_line_and_exits_2(tmp_path, text, key, reason):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    proc = run_check(path)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"lb: config error: {key}: "), lines[0]
    assert reason in lines[0]
    assert proc.stdout == ""


def test_check_syntax_error_exits_2(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[timeouts\n")
    proc = run_check(path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "TOML syntax error" in lines[0] and str(path) in lines[0]


def test_check_missing_file_exits_2(tmp_path):
    proc = run_check(tmp_path / "missing.toml")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "no such file" in lines[0]


def test_check_shipped_config_exits_0():
    proc = run_check(CONF)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "ok (2 backend(s), listen 0.0.0.0:6095)" in proc.stdout


def test_backend_host_that_cannot_be_encoded_is_rejected():
    with pytest.raises(ConfigError) as info:
        parse({"backend": [{"name": "a", "url": "http://a..b:8080"}]})
    assert info.value.key == 'backend "a".url' and "invalid host name" in info.value.reason



@pytest.mark.parametrize("value, expected", [(1, 1), (4, 4), (256, 256)])
def test_listen_workers_takes_a_count(value, expected):
    assert parse(minimal(listen={"workers": value})).listen.workers == expected


def test_listen_workers_auto_is_one_per_usable_cpu():
    import os
    assert parse(minimal(listen={"workers": "auto"})).listen.workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [0, 257, -1, "four", True, 2.0, [2]])
def test_listen_workers_rejects_everything_else(bad):
    exc = error_of(minimal(listen={"workers": bad}))
    assert exc.key == "listen.workers" and '"auto" or a number of processes' in exc.reason
