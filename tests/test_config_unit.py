"""Sans-io tests for lb.config: defaults, every kind of error, and properties.

Only `parse` (on dicts) and `load` (on files in tmp_path) are exercised here,
plus a few `python -m lb --check` subprocesses for the command-line contract.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.config import (
    SECTIONS,
    BackendConfig,
    Config,
    ConfigError,
    Limits,
    Listen,
    Log,
    Pool,
    Timeouts,
    load,
    parse,
)

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "lb.toml"

ONE_BACKEND = [{"name": "gpu0", "url": "http://127.0.0.1:6093"}]


def minimal(**sections) -> dict:
    """A valid raw document: one backend plus the given sections."""
    raw = {"backend": copy.deepcopy(ONE_BACKEND)}
    raw.update(copy.deepcopy(sections))
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
)


def test_defaults_with_only_a_backend():
    config = parse(minimal())
    assert isinstance(config, Config)
    for section, expected in EXPECTED_DEFAULTS.items():
        assert getattr(config, section) == expected, section
    assert config.backends == (BackendConfig(name="gpu0", url="http://127.0.0.1:6093",
                                             host="127.0.0.1", port=6093),)


def test_default_timeouts_are_floats():
    config = parse(minimal())
    for value in (*vars(config.timeouts).values(), config.pool.idle_timeout):
        assert type(value) is float


def test_shipped_config_loads_and_matches_the_defaults():
    config = load(str(CONF))
    for section, expected in EXPECTED_DEFAULTS.items():
        assert getattr(config, section) == expected, section
    assert [(b.name, b.host, b.port) for b in config.backends] == [
        ("gpu0", "127.0.0.1", 6093), ("gpu1", "127.0.0.1", 6094)]


def test_shipped_config_equals_parse_of_only_its_backends():
    shipped = load(str(CONF))
    bare = parse({"backend": [{"name": "gpu0", "url": "http://127.0.0.1:6093"},
                              {"name": "gpu1", "url": "http://127.0.0.1:6094"}]})
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
    assert "cannot read" in info.value.reason


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
    ("log", "acess"), ("listen", "port"),
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
    exc = error_of(minimal(**{section: 5}))
    assert exc.key == section
    assert "must be a table" in exc.reason


def test_unknown_key_in_backend():
    raw = {"backend": [{"name": "a", "url": "http://h:1", "weight": 2}]}
    exc = error_of(raw)
    assert exc.key == "backend[0].weight"
    assert "unknown key" in exc.reason


# --- parse(): wrong types and ranges


INT_KEYS = [("limits", k) for k in SECTIONS["limits"]] + [("pool", "max_idle")]
SECONDS_KEYS = [("timeouts", k) for k in SECTIONS["timeouts"]] + [("pool", "idle_timeout")]


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
])
def test_integer_range_bounds_are_inclusive(section, key, good):
    config = parse(minimal(**{section: {key: good}}))
    assert getattr(getattr(config, section), key) == good


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
    assert getattr(getattr(parse(minimal(**{section: {key: 3}})), section), key) == 3.0
    assert getattr(getattr(parse(minimal(**{section: {key: 0.001}})), section), key) == 0.001


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
    ("http://user@127.0.0.1:6093", "must be scheme://host:port only"),
    ("http://user:pw@127.0.0.1:6093", "must be scheme://host:port only"),
    ("http://127.0.0.1:99999", "cannot parse URL"),
    ("http://127.0.0.1:65536", "cannot parse URL"),
    ("http://127.0.0.1:port", "cannot parse URL"),
    ("http://127.0.0.1:-1", "cannot parse URL"),
    ("http://[::1:6093", "cannot parse URL"),
])
def test_bad_backend_url(url, reason):
    exc = error_of({"backend": [{"name": "a", "url": "http://h:1"},
                                {"name": "b", "url": url}]})
    assert exc.key == "backend[1].url"
    assert reason in exc.reason
    assert repr(url) in exc.reason


@pytest.mark.parametrize("url,shown", [(None, "missing"), (6093, "integer"),
                                       (["http://h:1"], "array"), (True, "boolean")])
def test_backend_url_not_a_string(url, shown):
    entry = {"name": "a"} if url is None else {"name": "a", "url": url}
    exc = error_of({"backend": [entry]})
    assert exc.key == "backend[0].url"
    assert "must be a string" in exc.reason and shown in exc.reason


def test_backend_url_port_zero_rejected():
    exc = error_of({"backend": [{"name": "a", "url": "http://127.0.0.1:0"}]})
    assert exc.key == "backend[0].url"


def test_backend_url_password_without_user_rejected():
    exc = error_of({"backend": [{"name": "a", "url": "http://:secret@127.0.0.1:6093"}]})
    assert exc.key == "backend[0].url"


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
    "backend[0].name", "backend[0].url", "backend[1].name", "backend[1].url"]
CONTAINER_PATHS = [*SECTIONS, "backend", "backend[0]", "backend[1]"]


def base_document() -> dict:
    return {
        "listen": {"address": "127.0.0.1:6095"},
        "limits": {"nofile": 1024},
        "timeouts": {"connect": 1.5},
        "pool": {"max_idle": 4},
        "log": {"access": False},
        "backend": [{"name": "a", "url": "http://127.0.0.1:1"},
                    {"name": "b", "url": "http://127.0.0.1:2"}],
    }


def plant(raw: dict, path: str, value) -> None:
    if path.startswith("backend["):
        index = int(path[len("backend["):path.index("]")])
        rest = path[path.index("]") + 1:]
        if not rest:
            raw["backend"][index] = value
        else:
            raw["backend"][index][rest[1:]] = value
    elif "." in path:
        section, key = path.split(".")
        raw[section][key] = value
    else:
        raw[path] = value


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
        else:
            assert exc.key == path, (exc.key, str(exc))
        assert exc.reason
        assert "\n" not in exc.reason


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(CONTAINER_PATHS), value=JUNK)
def test_junk_in_place_of_a_table_is_a_config_error_under_that_key(path, value):
    raw = base_document()
    plant(raw, path, value)
    try:
        parse(raw)
    except ConfigError as exc:
        assert exc.key == path or exc.key.startswith((path + ".", path + "[")) or (
            # a replaced backend[0] may collide with backend[1]'s name
            path.startswith("backend[") and exc.key.startswith("backend[")), (exc.key, str(exc))


@settings(max_examples=100, deadline=None)
@given(extra=st.dictionaries(st.text(min_size=1, max_size=10), JUNK, min_size=1, max_size=3),
       section=st.sampled_from(sorted(SECTIONS)))
def test_unknown_keys_are_named(extra, section):
    extra = {k: v for k, v in extra.items() if k not in SECTIONS[section]}
    if not extra:
        return
    raw = base_document()
    raw[section].update(extra)
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
    ('[[backend]]\nname = "a"\nurl = "https://h:1"\n', "backend[0].url", "scheme must be http"),
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
    assert info.value.key == "backend[0].url" and "invalid host name" in info.value.reason
