"""lb.control.config_file on real files in tmp_path: where the configuration comes
from, and reading that cannot block, blow up or swallow the machine."""

from __future__ import annotations

import os
import time

import pytest

from lb.control import config_file
from lb.control.config import ConfigError
from lb.control.config_file import (ENV_CONFIG, MAX_FILE_BYTES, MAX_ITEMS, PACKAGED_PATH, Loader, find,
                            load, read)

GOOD = '[[backend]]\nname = "a"\nurl = "http://127.0.0.1:7001"\n'


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config_file, "SYSTEM_PATH", str(tmp_path / "etc.toml"))
    assert find(None, {}).path == PACKAGED_PATH and find(None, {}).why == "the packaged default"
    (tmp_path / "etc.toml").write_text(GOOD)
    assert find(None, {}).path == str(tmp_path / "etc.toml")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "lb.toml").write_text(GOOD)
    assert find(None, {}).path == "conf/lb.toml"
    assert find(None, {ENV_CONFIG: "/x/env.toml"}).path == "/x/env.toml"
    assert find("cli.toml", {ENV_CONFIG: "/x/env.toml"}).path == "cli.toml"


def test_a_named_file_must_exist(tmp_path):
    for source in (find(str(tmp_path / "none.toml"), {}),
                   find(None, {ENV_CONFIG: str(tmp_path / "none.toml")})):
        with pytest.raises(ConfigError, match="no such file"):
            Loader(source, [], {}).load()


def test_an_empty_environment_value_is_an_error():
    with pytest.raises(ConfigError) as info:
        find(None, {ENV_CONFIG: ""})
    assert info.value.key == ENV_CONFIG


def test_the_packaged_default_is_the_documented_one():
    config = load(PACKAGED_PATH)
    assert [b.name for b in config.backends] == ["gpu0", "gpu1"]
    assert config.listen.port == 6095 and config.warnings == ()


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "lb.toml"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="a FIFO, not a regular file"):
        read(str(fifo))
    assert time.monotonic() - started < 5   # it did not wait for a writer


def test_a_device_is_refused(tmp_path):
    link = tmp_path / "lb.toml"
    link.symlink_to("/dev/zero")
    with pytest.raises(ConfigError, match="a device, not a regular file"):
        read(str(link))


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="a directory"):
        read(str(tmp_path))


def test_a_file_over_the_cap_is_refused_unread(tmp_path):
    big = tmp_path / "lb.toml"
    with open(big, "wb") as f:
        f.write(GOOD.encode())
        f.truncate(50 << 20)
    with pytest.raises(ConfigError, match="larger than 1024 KiB"):
        read(str(big))


def test_a_file_that_grows_while_read_is_cut_at_the_cap(tmp_path, monkeypatch):
    # fstat said small; the bytes keep coming (a file being written): only
    # MAX_FILE_BYTES + 1 are read, then it is refused.
    path = tmp_path / "lb.toml"
    path.write_text(GOOD)
    real_read = os.read
    monkeypatch.setattr(config_file.os, "read", lambda fd, n: b"#" * min(n, 65536)
                        if n else real_read(fd, n))
    with pytest.raises(ConfigError, match="larger than"):
        read(str(path))


def test_exactly_at_the_cap_is_read(tmp_path):
    path = tmp_path / "lb.toml"
    body = GOOD.encode()
    path.write_bytes(body + b"#" * (MAX_FILE_BYTES - len(body)))
    assert read(str(path))["backend"][0]["name"] == "a"


@pytest.mark.parametrize("where, text", [
    ("admin.allow", "[admin]\nallow = [" + ", ".join(['"10.0.0.1"'] * (MAX_ITEMS + 1)) + "]\n"),
    ("backend", "".join(f'[[backend]]\nname = "b{i}"\nurl = "http://h:{i + 1}"\n'
                        for i in range(MAX_ITEMS + 1))),
    ("fallback.cartesia.voices", "[fallback.cartesia.voices]\n" + "".join(
        f'v{i} = "x"\n' for i in range(MAX_ITEMS + 1))),
])
def test_no_array_or_table_over_the_cap(tmp_path, where, text):
    path = tmp_path / "lb.toml"
    path.write_text(GOOD + text if where != "backend" else text)
    with pytest.raises(ConfigError) as info:
        read(str(path))
    assert info.value.key == where and f"at most {MAX_ITEMS}" in info.value.reason


def test_not_utf8_and_syntax_errors_name_the_file(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_bytes(b'[[backend]]\nname = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8"):
        read(str(path))
    path.write_text("[[backend]\n")
    with pytest.raises(ConfigError, match=f"{path}: TOML syntax error"):
        read(str(path))


def test_the_loader_replaces_the_files_backends_each_time(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_text('[balancer]\nmax_concurrency = 2\n' + GOOD)
    loader = Loader(find(str(path), {}), [], {"TTS_LB_BACKENDS": "http://127.0.0.1:7002"})
    assert loader.backends_from == "TTS_LB_BACKENDS"
    for _ in range(2):   # at start and on every reload
        config = loader.load()
        assert [(b.name, b.max_concurrency) for b in config.backends] == [("127.0.0.1-7002", 2)]
    cli = Loader(find(str(path), {}), ["gpu=http://127.0.0.1:7003"],
                 {"TTS_LB_BACKENDS": "http://127.0.0.1:7002"})
    assert [b.name for b in cli.load().backends] == ["gpu"] and cli.backends_from == "--backend"
    plain = Loader(find(str(path), {}), [], {})
    assert [b.name for b in plain.load().backends] == ["a"] and plain.backends_from == ""
