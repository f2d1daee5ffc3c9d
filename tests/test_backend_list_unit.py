"""Sans-io tests for lb.backend_list: `--backend` entries and TTS_LB_BACKENDS."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.control.backend_list import ENV_BACKENDS, from_entries, from_environment
from lb.control.config import BACKEND_NAME, ConfigError, parse


def test_the_in_app_list_pastes_as_it_is():
    tables = from_environment({ENV_BACKENDS: "http://a:10129,http://b:10130"})
    assert tables == [{"name": "a-10129", "url": "http://a:10129"},
                      {"name": "b-10130", "url": "http://b:10130"}]


def test_names_spaces_and_bare_host_port():
    tables = from_environment({ENV_BACKENDS: " gpu0=http://10.0.0.5:10129 , 10.0.0.6:10130,"})
    assert tables == [{"name": "gpu0", "url": "http://10.0.0.5:10129"},
                      {"name": "10.0.0.6-10130", "url": "http://10.0.0.6:10130"}]


def test_ipv6_hosts_get_a_valid_name():
    (table,) = from_entries(["http://[::1]:6093"])
    assert BACKEND_NAME.fullmatch(table["name"]) and table["name"].endswith("-6093")


def test_unset_means_the_file_decides():
    assert from_environment({}) is None


@pytest.mark.parametrize("value", ["", " ", ",", " , ,"])
def test_set_but_empty_is_an_error(value):
    with pytest.raises(ConfigError) as info:
        from_environment({ENV_BACKENDS: value})
    assert info.value.key == ENV_BACKENDS and "lists no backends" in info.value.reason


@pytest.mark.parametrize("value, entry, reason", [
    ("http://a:1,ftp://b:2", "entry 2 'ftp://b:2'", "scheme must be http"),
    ("http://a", "entry 1 'http://a'", "needs a port"),
    ("http://a:1,http://a:1", "entry 2", "taken by TTS_LB_BACKENDS entry 1"),
    ("x=http://a:1,x=http://b:2", "entry 2", "'x' is taken"),
    ("-bad=http://a:1", "entry 1", "the name before '='"),
    ("gpu0=", "entry 1", "has no URL"),
    ("http://a:1/v1", "entry 1", "host:port only"),
    ("http://a:99999", "entry 1", "cannot parse URL"),
])
def test_a_bad_entry_is_named(value, entry, reason):
    with pytest.raises(ConfigError) as info:
        from_environment({ENV_BACKENDS: value})
    message = str(info.value)
    assert f"TTS_LB_BACKENDS {entry}" in message and reason in message, message
    assert "\n" not in message


def test_a_password_in_an_entry_is_not_repeated():
    with pytest.raises(ConfigError) as info:
        from_entries(["gpu0=http://me:hunter2secret@h:1"])
    message = str(info.value)
    assert "hunter2secret" not in message and "--backend 'gpu0=http://***@h:1'" in message


def test_tables_pass_the_configs_own_checks():
    tables = from_entries(["http://127.0.0.1:6093", "gpu1=http://127.0.0.1:6094"])
    config = parse({"backend": tables, "balancer": {"max_concurrency": 3},
                    "health": {"active": {"path": "/health"}}})
    assert [(b.name, b.url, b.max_concurrency, b.health_path) for b in config.backends] == [
        ("127.0.0.1-6093", "http://127.0.0.1:6093", 3, "/health"),
        ("gpu1", "http://127.0.0.1:6094", 3, "/health")]


hosts = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,3}", fullmatch=True)


@given(st.lists(st.tuples(hosts, st.integers(1, 65535)), min_size=1, max_size=8, unique=True))
def test_any_list_of_distinct_servers_parses_with_unique_valid_names(servers):
    value = ",".join(f"http://{host}:{port}" for host, port in servers)
    tables = from_environment({ENV_BACKENDS: value})
    names = [t["name"] for t in tables]
    assert len(set(names)) == len(names) == len(servers)
    assert all(BACKEND_NAME.fullmatch(name) for name in names)
    assert [t["url"] for t in tables] == [f"http://{h}:{p}" for h, p in servers]
