"""The two log streams as a log shipper reads them: the access log is pure
logfmt on stdout, one line per request; diagnostics go to stderr."""

from __future__ import annotations

import http.client
import re
import subprocess
import sys

from conftest import ROOT, lb_config

PAIR = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"]+)')


def logfmt(line: str) -> dict[str, str]:
    """The pairs of a logfmt line; AssertionError if anything else is in it."""
    pairs, pos = {}, 0
    while pos < len(line):
        match = PAIR.match(line, pos)
        assert match, f"not logfmt at {line[pos:]!r} in {line!r}"
        pairs[match.group(1)] = match.group(2)
        pos = match.end()
        if pos < len(line):
            assert line[pos] == " ", line
            pos += 1
    return pairs


def test_access_lines_are_pure_logfmt_on_stdout(tmp_path, backend):
    path = tmp_path / "lb.toml"
    path.write_text(lb_config([backend.url]))
    proc = subprocess.Popen([sys.executable, "-m", "lb", "-c", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        port = None
        for line in proc.stderr:
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "balancer did not start"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for path_ in ('/echo?x="quoted"', "/health", "/nothing-here"):
            conn.request("GET", path_, headers={"X-Request-ID": f"rid-{len(path_)}"})
            conn.getresponse().read()
        conn.close()
    finally:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=15)
    lines = stdout.strip().splitlines()
    assert len(lines) == 3, stdout
    for line in lines:
        pairs = logfmt(line)
        assert list(pairs)[:2] == ["ts", "rid"], line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", pairs["ts"])
        assert pairs["status"].isdigit()
    assert logfmt(lines[0])["path"] == r'"/echo?x=\"quoted\""'
    assert "rid=" not in stderr and "lb.access" not in stderr and "INFO lb:" in stderr
