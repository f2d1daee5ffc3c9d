"""[cluster] and TTS_LB_REDIS_URL, sans-io: the keys, their defaults, every
refusal naming its key, and no password in any message."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lb.config_model import Cluster, ConfigError
from lb.control.config import parse
from lb.control.config_cluster import ENV_REDIS_URL, parse_cluster


def minimal(**cluster) -> dict:
    raw = {"backend": [{"name": "gpu0", "url": "http://127.0.0.1:6093"}]}
    if cluster:
        raw["cluster"] = cluster
    return raw


def refusal(table, environ=None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_cluster(table, environ)
    return info.value


def test_without_a_redis_the_process_is_alone():
    assert parse(minimal()).cluster is None
    assert parse(minimal(fleet="f", replicas=3)).cluster is None    # no redis_url: off
    assert parse_cluster({"redis_url": ""}) is None


def test_defaults_when_a_redis_is_named():
    cfg = parse(minimal(redis_url="redis://127.0.0.1:6379/0", replicas=3)).cluster
    assert cfg == Cluster(redis_url="redis://127.0.0.1:6379/0",
                          shown_url="redis://127.0.0.1:6379/0", fleet="tts-lb", lease=10.0,
                          timeout=0.05, replicas=3)


@pytest.mark.parametrize("url, shown", [
    ("redis://localhost", "redis://localhost:6379/0"),
    ("redis://:s3cret-password@10.0.0.5:6380/2", "redis://10.0.0.5:6380/2"),
    ("rediss://user:s3cret-password@redis.internal:6379", "rediss://redis.internal:6379/0"),
    ("redis://[::1]:6379/0?socket_timeout=1", "redis://[::1]:6379/0"),
    ("unix:///run/redis/redis.sock", "unix:///run/redis/redis.sock"),
])
def test_urls_are_shown_without_password_or_query(url, shown):
    cfg = parse_cluster({"redis_url": url, "replicas": 2})
    assert cfg.redis_url == url and cfg.shown_url == shown


def test_replicas_is_required_with_a_redis():
    exc = refusal({"redis_url": "redis://127.0.0.1:6379/0"})
    assert exc.key == "cluster.replicas" and "required" in exc.reason


@pytest.mark.parametrize("table, key, words", [
    ({"redis_url": "http://127.0.0.1:6379", "replicas": 2}, "cluster.redis_url", "scheme"),
    ({"redis_url": "redis://", "replicas": 2}, "cluster.redis_url", "no host"),
    ({"redis_url": "redis://h:0", "replicas": 2}, "cluster.redis_url", "port 0"),
    ({"redis_url": "redis://h:99999", "replicas": 2}, "cluster.redis_url", "cannot parse"),
    ({"redis_url": "redis://h/zero", "replicas": 2}, "cluster.redis_url", "database number"),
    ({"redis_url": "unix://", "replicas": 2}, "cluster.redis_url", "path"),
    ({"redis_url": 6379, "replicas": 2}, "cluster.redis_url", "must be a string"),
    ({"redis_url": "redis://h", "replicas": 0}, "cluster.replicas", ">= 1"),
    ({"redis_url": "redis://h", "replicas": "3"}, "cluster.replicas", "integer"),
    ({"redis_url": "redis://h", "replicas": 2, "lease": 0.5}, "cluster.lease", "from 1"),
    ({"redis_url": "redis://h", "replicas": 2, "timeout": 0}, "cluster.timeout", "from 0.001"),
    ({"redis_url": "redis://h", "replicas": 2, "lease": 1, "timeout": 0.5}, "cluster.timeout",
     "a tenth"),
    ({"redis_url": "redis://h", "replicas": 2, "fleet": "a b"}, "cluster.fleet", "name"),
    ({"redis_url": "redis://h", "replicas": 2, "fleet": ""}, "cluster.fleet", "name"),
    ({"redis_url": "redis://h", "replicas": 2, "sentinel": True}, "cluster.sentinel", "unknown"),
])
def test_bad_values_name_their_key(table, key, words):
    exc = refusal(table)
    assert exc.key == key and words in exc.reason, exc


def test_a_bad_url_never_shows_its_password():
    exc = refusal({"redis_url": "http://:hunter2-secret@h:6379", "replicas": 2})
    assert "hunter2" not in str(exc)
    exc = refusal({"redis_url": "redis://:hunter2-secret@h:6379/x", "replicas": 2})
    assert "hunter2" not in str(exc)


def test_the_environment_replaces_the_files_redis():
    cfg = parse_cluster({"redis_url": "redis://file:6379/0", "replicas": 2},
                        {ENV_REDIS_URL: "redis://env:6380/1"})
    assert cfg.shown_url == "redis://env:6380/1"
    cfg = parse_cluster({"replicas": 2}, {ENV_REDIS_URL: "redis://env:6380/1"})
    assert cfg.redis_url == "redis://env:6380/1"
    assert parse_cluster({"replicas": 2}, {ENV_REDIS_URL: "  "}) is None   # set but empty: off
    exc = refusal({"replicas": 2}, {ENV_REDIS_URL: "mysql://:pw-secret-1@db"})
    assert exc.key == ENV_REDIS_URL and "pw-secret" not in str(exc)
    assert refusal({}, {ENV_REDIS_URL: "redis://env"}).key == "cluster.replicas"


def test_check_names_the_key_and_exits_2(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('[cluster]\nredis_url = "redis://:pw-secret-2@127.0.0.1:6379/0"\n'
                    '[[backend]]\nname = "gpu0"\nurl = "http://127.0.0.1:6093"\n')
    out = subprocess.run([sys.executable, "-m", "lb", "--check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "cluster.replicas" in out.stderr and "pw-secret" not in out.stderr + out.stdout
    assert "Traceback" not in out.stderr
    path.write_text(path.read_text().replace("[cluster]\n", "[cluster]\nreplicas = 3\n"))
    out = subprocess.run([sys.executable, "-m", "lb", "--check", "-c", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "redis://127.0.0.1:6379/0" in out.stdout and "3 replica(s)" in out.stdout
    assert "pw-secret" not in out.stdout
