"""Framing corpus, part 1: single requests -- bodies, methods, Content-Length and
Transfer-Encoding, field names and values, line endings, chunks, trailers, head
sizes, request targets, Host (see framing_corpus_kit for the vocabulary)."""
from __future__ import annotations

from framing_corpus_kit import *  # noqa: F401,F403
# --- ordinary requests, bodies of various sizes, in pieces
ok("get", get())
ok("get-path-query", get(target=b"/x/y?a=1&b=%20"), Seen(target=b"/x/y?a=1&b=%20"))
ok("head", head(b"HEAD"), Seen(b"HEAD"), head_only=(0,))
ok("options-path", head(b"OPTIONS", b"/x"), Seen(b"OPTIONS", b"/x"))
ok("delete", head(b"DELETE", b"/x"), Seen(b"DELETE", b"/x"))
for n in (0, 1, 5, 1000, 65536):
    ok(f"post-cl-{n}", post(payload(n)), Seen(b"POST", b"/p", body=payload(n)))
ok("put-cl", head(b"PUT", b"/p", b"HTTP/1.1", b"Content-Length: 5") + HELLO,
   Seen(b"PUT", b"/p", body=HELLO))
ok("get-with-cl-body", get(b"Content-Length: 3") + b"abc", Seen(body=b"abc"))
ok("get-with-chunked-body", get(b"Transfer-Encoding: chunked") + CHUNKED_HELLO, Seen(body=HELLO))
for name, parts in [("one", [HELLO]), ("several", [b"a", b"bc", b"def" * 100, b"g"]),
                    ("none", []), ("64k", [payload(65536)]),
                    ("many-small", [b"%d" % i for i in range(50)])]:
    ok(f"chunked-{name}", post_chunked(chunked(*parts)), Seen(b"POST", b"/p", body=b"".join(parts)))
ok("chunk-size-uppercase-hex", post_chunked(b"A\r\n0123456789\r\n0\r\n\r\n"),
   Seen(b"POST", b"/p", body=b"0123456789"))
ok("chunk-size-leading-zeros", post_chunked(b"0005\r\nhello\r\n000\r\n\r\n"), POSTED)
ok("cl-body-in-second-piece", (post(HELLO)[:-5], HELLO), POSTED)
ok("head-in-three-pieces", (b"GET / HT", b"TP/1.1\r\nHost: a.ex", b"ample\r\n\r\n"))
ok("chunked-in-pieces", (post_chunked(b"5\r"), b"\nhel", b"lo\r\n0\r\n\r\n"), POSTED)

# --- methods: those framing.METHODS lists are forwarded; another token is 501; a
# method that is no token is 400
for name, method in [("purge", b"PURGE"), ("mkcol", b"MKCOL"), ("query", b"QUERY"),
                     ("m-search", b"M-SEARCH")]:
    ok(f"method-token-{name}", head(method), Seen(method))
for name, method in [("unknown", b"FOO"), ("lowercase", b"get"), ("dashed", b"X-CUSTOM"),
                     ("every-tchar", b"!#$%&'*+-.^_`|~09azAZ")]:
    refused(f"method-token-{name}", head(method), 501)
for name, line in [("paren", b"G(T / HTTP/1.1"), ("at", b"GE@T / HTTP/1.1"),
                   ("non-ascii", b"G\xc3\x89T / HTTP/1.1"), ("brackets", b"[GET] / HTTP/1.1"),
                   ("comma", b"GE,T / HTTP/1.1"), ("quote", b'G"T / HTTP/1.1'),
                   ("empty", b" / HTTP/1.1"), ("leading-space", b" GET / HTTP/1.1"),
                   ("double-space", b"GET  / HTTP/1.1"), ("tabs", b"GET\t/\tHTTP/1.1"),
                   ("method-only", b"GET"), ("no-method", b"/ HTTP/1.1")]:
    refused(f"bad-request-line-{name}", line + b"\r\nHost: a.example\r\n\r\n")

# --- Content-Length with Transfer-Encoding: never both
for value, vname in [(b"chunked", "plain"), (b"Chunked", "capital"), (b"CHUNKED", "upper"),
                     (b"  chunked", "leading-spaces"), (b"chunked ", "trailing-space"),
                     (b"\tchunked\t", "tabs")]:
    te, cl = b"Transfer-Encoding: " + value, b"Content-Length: 5"
    refused(f"cl-then-te-{vname}", post_head(cl, te) + CHUNKED_HELLO)
    refused(f"te-then-cl-{vname}", post_head(te, cl) + CHUNKED_HELLO)
for name in (b"transfer-encoding", b"TRANSFER-ENCODING", b"tRaNsFeR-eNcOdInG"):
    refused(f"cl-and-te-name-{name.decode()}",
            post_head(b"content-length: 5", name + b": chunked") + CHUNKED_HELLO)
refused("cl-0-and-te", post_chunked(CHUNKED_HELLO, b"Content-Length: 0"))
refused("cl-and-te-gzip", post_chunked(CHUNKED_HELLO, b"Content-Length: 5",
                                       b"Transfer-Encoding: gzip"))

# --- Transfer-Encoding: exactly one coding, chunked (lists may hold empty elements)
for name, value in [("capital", b"Chunked"), ("upper", b"CHUNKED"), ("spaces", b"  chunked  ")]:
    ok(f"te-{name}", post_head(b"Transfer-Encoding: " + value) + CHUNKED_HELLO, POSTED)
# An empty list element is refused: a lenient reading of Transfer-Encoding smuggles
for name, value in [("empty-element-after", b"chunked,"), ("empty-element-before", b", chunked")]:
    refused(f"te-{name}", post_head(b"Transfer-Encoding: " + value) + CHUNKED_HELLO)
for name, values in [("gzip", [b"gzip"]), ("chunked-gzip", [b"chunked, gzip"]),
                     ("gzip-chunked", [b"gzip, chunked"]), ("identity", [b"identity"]),
                     ("chunked-chunked", [b"chunked, chunked"]), ("deflate", [b"deflate"]),
                     ("empty", [b""]), ("chunkedx", [b"chunkedx"]),
                     ("chunked-with-param", [b"chunked;q=1"]),
                     ("two-headers-chunked", [b"chunked", b"chunked"]),
                     ("two-headers-gzip-chunked", [b"gzip", b"chunked"]),
                     ("two-headers-chunked-gzip", [b"chunked", b"gzip"]),
                     ("two-headers-identity-chunked", [b"identity", b"chunked"])]:
    fields = [b"Transfer-Encoding: " + v for v in values]
    refused(f"te-refused-{name}", post_head(*fields) + CHUNKED_HELLO)
for name, fields in [("chunked", [b"Transfer-Encoding: chunked"]),
                     ("gzip", [b"Transfer-Encoding: gzip"]),
                     ("chunked-and-cl", [b"Transfer-Encoding: chunked", b"Content-Length: 5"])]:
    refused(f"te-http10-{name}", post_head(*fields, version=b"HTTP/1.0") + CHUNKED_HELLO)

# --- Content-Length: one header, digits only (optional whitespace around them)
for name, value in [("two-spaces", b"  5"), ("trailing-space", b" 5 "), ("tabs", b" \t5\t"),
                    ("leading-zeros", b" 005"), ("no-space", b"5")]:
    ok(f"cl-ok-{name}", post_head(b"Content-Length:" + value) + HELLO, POSTED)
for name, value in [("plus", b"+5"), ("minus", b"-5"), ("inner-space", b"5 5"), ("hex", b"0x5"),
                    ("hex-digit", b"a"), ("suffix", b"5a"), ("decimal", b"5.0"),
                    ("list", b"5,5"), ("list-spaced", b"5, 5"), ("empty", b""),
                    ("twenty-digits", b"9" * 20), ("exponent", b"5e0"),
                    ("fullwidth-digit", b"\xef\xbc\x95")]:
    refused(f"cl-bad-{name}", post_head(b"Content-Length: " + value) + HELLO)
for name, value in [("eighteen-digits", b"9" * 18), ("just-over-max-body", b"10485761")]:
    refused(f"cl-413-{name}", post_head(b"Content-Length: " + value), 413)
for name, fields in [("same", [b"Content-Length: 5", b"Content-Length: 5"]),
                     ("differing", [b"Content-Length: 5", b"Content-Length: 6"]),
                     ("differing-smaller-first", [b"Content-Length: 3", b"Content-Length: 5"]),
                     ("same-other-case", [b"Content-Length: 5", b"content-length: 5"]),
                     ("same-with-space", [b"Content-Length: 5", b"Content-Length:  5 "]),
                     ("apart", [b"Content-Length: 5", b"X-A: b", b"Content-Length: 5"])]:
    refused(f"cl-repeated-{name}", post_head(*fields) + HELLO)
ABC = Seen(b"POST", b"/p", body=b"abc")
refused("cl-shorter-than-data", post(b"abc") + b"XYZ\r\n\r\n", before=[ABC])
ok("cl-then-pipelined", post(b"abc") + get(target=b"/2"), ABC, Seen(target=b"/2"))
ok("cl-body-holds-a-request", post(get(target=b"/admin")),
   Seen(b"POST", b"/p", body=get(target=b"/admin")))

# --- obs-fold: a line starting with whitespace is refused, whole or in pieces
FOLDED = get(b"X-A: a", b" b")
for name, data in [("space", FOLDED), ("tab", get(b"X-A: a", b"\tb")),
                   ("host", head(b"GET", b"/", b"HTTP/1.1", b"Host: a", b" .example", host=None)),
                   ("content-length", post_head(b"Content-Length: 5", b" 0") + HELLO),
                   ("transfer-encoding", post_head(b"Transfer-Encoding: gzip", b" chunked")
                    + CHUNKED_HELLO),
                   ("first-line", b"GET / HTTP/1.1\r\n X-A: b\r\nHost: a.example\r\n\r\n"),
                   ("empty-continuation", get(b"X-A: a", b" ")),
                   *[(f"split-{where}", (FOLDED[:FOLDED.index(at)], FOLDED[FOLDED.index(at):]))
                     for where, at in [("after-crlf", b" b"), ("inside-crlf", b"\n b"),
                                       ("before-crlf", b"\r\n b")]]]:
    refused(f"obs-fold-{name}", data)

# --- field values: no NUL, CR, LF or other controls; tab and obs-text are fine
for name, byte in [("nul", b"\x00"), ("soh", b"\x01"), ("vt", b"\x0b"), ("ff", b"\x0c"),
                   ("esc", b"\x1b"), ("us", b"\x1f"), ("del", b"\x7f"), ("cr", b"\r"),
                   ("lf", b"\n")]:
    refused(f"value-{name}", get(b"X-A: a" + byte + b"b"))
refused("host-value-nul", get(host=b"a.example\x00.evil"))
refused("host-value-cr-injection", get(host=b"a.example\rX-Injected: 1"))
ok("value-inner-tab", get(b"X-A: a\tb"), Seen(headers=((b"x-a", b"a\tb"),)))
ok("value-obs-text", get(b"X-A: caf\xc3\xa9"), Seen(headers=((b"x-a", b"caf\xc3\xa9"),)))
ok("value-empty", get(b"X-A:"), Seen(headers=((b"x-a", b""),)))
ok("value-trailing-whitespace", get(b"X-A: b \t "), Seen(headers=((b"x-a", b"b"),)))

# --- line endings: CRLF only
for name, data in [("bare-cr", b"GET / HTTP/1.1\rHost: a.example\r\r"),
                   ("bare-lf", b"GET / HTTP/1.1\nHost: a.example\n\n"),
                   ("lf-after-request-line", b"GET / HTTP/1.1\nHost: a.example\r\n\r\n"),
                   ("lf-after-a-field", b"GET / HTTP/1.1\r\nHost: a.example\nX-A: b\r\n\r\n"),
                   ("lf-empty-line", b"GET / HTTP/1.1\r\nHost: a.example\r\n\n"),
                   ("lf-then-crlf-end", b"GET / HTTP/1.1\r\nHost: a.example\n\r\n"),
                   ("cr-cr-lf", b"GET / HTTP/1.1\r\r\nHost: a.example\r\n\r\n"),
                   ("cr-in-target", b"GET /a\rb HTTP/1.1\r\nHost: a.example\r\n\r\n"),
                   ("bare-lf-in-pieces", (b"GET / HTTP/1.1\r\nHost: a.example\n", b"\n"))]:
    refused(f"line-ending-{name}", data)

# --- field names: a token, right before the colon
for name, field in [("host", b"Host : a.example"), ("x", b"X-A : b"), ("tab", b"X-A\t: b"),
                    ("empty-name", b": b"), ("no-colon", b"X-A"), ("space-inside", b"X A: b"),
                    ("paren", b"X(A): b"), ("at", b"X@A: b"), ("non-ascii", b"X-\xc3\xa9: b"),
                    ("nul", b"X\x00A: b"), ("slash", b"X/A: b")]:
    refused(f"name-{name}", get(field) if name != "host" else get(field, host=None))
refused("name-space-before-colon-cl", post_head(b"Content-Length : 5") + HELLO)
refused("name-space-before-colon-te", post_head(b"Transfer-Encoding : chunked") + CHUNKED_HELLO)
ok("name-odd-case", head(b"GET", b"/", b"HTTP/1.1", b"hOsT: a.example", b"x-MiXeD: v", host=None),
   Seen(headers=((b"x-mixed", b"v"),)))

# --- chunk sizes and chunk framing
for name, size in [("non-hex", b"zz"), ("negative", b"-5"), ("plus", b"+5"), ("0x", b"0x5"),
                   ("overflow", b"f" * 20), ("overflow-17-digits", b"1" + b"0" * 16),
                   ("leading-space", b" 5"), ("empty-size", b""), ("data-longer-than-size", b"3")]:
    refused(f"chunk-bad-{name}", post_chunked(size + b"\r\nhello\r\n0\r\n\r\n"))
for name, body in [
                   ("no-crlf-after-data", b"5\r\nhelloX\r\n0\r\n\r\n"),
                   ("lf-after-data", b"5\r\nhello\n0\r\n\r\n"),
                   ("lf-after-size", b"5\nhello\r\n0\r\n\r\n"),
                   ("cr-after-size", b"5\rhello\r\n0\r\n\r\n"),
                   ("lf-after-last-chunk", b"5\r\nhello\r\n0\n\r\n"),
                   ("lf-empty-line-after-last-chunk", b"5\r\nhello\r\n0\r\n\n")]:
    refused(f"chunk-bad-{name}", post_chunked(body))
for name, ext in [("name-value", b";a=b"), ("name-only", b";a"), ("quoted", b';a="x y"'),
                  ("two", b";a=b;c=d")]:
    ok(f"chunk-ext-{name}", post_chunked(b"5" + ext + b"\r\nhello\r\n0\r\n\r\n"), POSTED)
ok("chunk-ext-on-last-chunk", post_chunked(b"5\r\nhello\r\n0;a=b\r\n\r\n"), POSTED)
for name, ext in [("empty", b";"), ("no-name", b";=b"), ("space-in-value", b";a=b c"),
                  ("unterminated-quote", b';a="x'), ("nul", b";a=\x00"), ("bare-cr", b";a=b\rc")]:
    refused(f"chunk-ext-bad-{name}", post_chunked(b"5" + ext + b"\r\nhello\r\n0\r\n\r\n"))

# --- trailers: forwarded, except the fields that frame or route; malformed ones refused
for name, lines, kept in [
        ("one", [b"X-T: 1"], ((b"x-t", b"1"),)),
        ("two", [b"X-T: 1", b"X-U: two words"], ((b"x-t", b"1"), (b"x-u", b"two words"))),
        ("empty-value", [b"X-T:"], ((b"x-t", b""),)),
        ("host-dropped", [b"Host: evil.example", b"X-T: 1"], ((b"x-t", b"1"),))]:
    ok(f"trailers-{name}", post_chunked(chunked(HELLO, trailers=lines)),
       Seen(b"POST", b"/p", body=HELLO, trailers=kept))
ok("trailers-with-te-trailers", post_chunked(chunked(HELLO, trailers=[b"X-T: 1"]), b"TE: trailers"),
   Seen(b"POST", b"/p", body=HELLO, trailers=((b"x-t", b"1"),), headers=((b"te", b"trailers"),)))
# Trailers that frame are refused (llhttp refuses them; the balancer does with h11 too)
for name, lines in [("content-length", [b"Content-Length: 5", b"X-T: 1"]),
                    ("transfer-encoding", [b"Transfer-Encoding: chunked", b"X-T: 1"])]:
    refused(f"trailers-framing-{name}", post_chunked(chunked(HELLO, trailers=lines)))
for name, lines in [("obs-fold", [b"X-T: 1", b" 2"]), ("bare-lf", [b"X-T: 1\nX-U: 2"]),
                    ("space-before-colon", [b"X-T : 1"]), ("no-colon", [b"X-T"]),
                    ("nul", [b"X-T: a\x00b"])]:
    refused(f"trailers-bad-{name}", post_chunked(chunked(HELLO, trailers=lines)))

# --- heads over limits.max_header_bytes -> 431, whole or in pieces
BIG = get(b"X-Big: " + b"a" * 17000)
refused("431-one-header", BIG, 431)
refused("431-many-headers", get(*[b"X-H%03d: %s" % (i, b"v" * 90) for i in range(200)]), 431)
refused("431-long-target", get(target=b"/" + b"a" * 17000), 431)
refused("431-in-three-pieces", (BIG[:6000], BIG[6000:12000], BIG[12000:]), 431)
refused("431-in-pieces-never-ending", (BIG[:9000], BIG[9000:LIMIT + 100]), 431)
PAD = b"p" * (LIMIT - (len(get()) - 2) - len(b"X-Pad: \r\n"))
AT_LIMIT = get(b"X-Pad: " + PAD)
assert len(AT_LIMIT) - 2 == LIMIT   # a head counts up to its last field's CRLF
ok("head-exactly-at-limit", AT_LIMIT, Seen(headers=((b"x-pad", PAD),)))
# The limit is on the head's bytes, however its fields are spaced.
ok("head-compact-fields-under-limit", get(*[b"X:a"] * 3000))
refused("head-ows-padding-over-limit", get(b"X-A:" + b" " * 17000 + b"a"), 431)
refused("head-one-over-limit", AT_LIMIT.replace(b"X-Pad: p", b"X-Pad: pp"), 431)

# --- request targets: origin-form; absolute-form forwarded in origin-form with its Host
ABS = b"http://a.example/x"
# HTTP/1.1 needs Host even with an absolute-form target (RFC 9112 §3.2); 1.0 may omit it
refused("absolute-no-host", head(b"GET", ABS, b"HTTP/1.1", host=None))
for name, target, fields, version, seen in [
        ("matching-host", ABS, [b"Host: a.example"], b"HTTP/1.1", Seen(target=b"/x")),
        ("host-other-case", ABS, [b"Host: A.Example"], b"HTTP/1.1", Seen(target=b"/x")),
        ("no-path", b"http://a.example", [b"Host: a.example"], b"HTTP/1.1", Seen()),
        ("query-only", b"http://a.example?q=1", [b"Host: a.example"], b"HTTP/1.1",
         Seen(target=b"/?q=1")),
        ("path-query", b"http://a.example/x?q=1", [b"Host: a.example"], b"HTTP/1.1",
         Seen(target=b"/x?q=1")),
        ("port", b"http://a.example:8080/x", [b"Host: a.example:8080"], b"HTTP/1.1",
         Seen(target=b"/x", host=b"a.example:8080")),
        ("https", b"https://a.example/x", [b"Host: a.example"], b"HTTP/1.1", Seen(target=b"/x")),
        ("upper-case-scheme", b"HTTP://A.EXAMPLE/x", [b"Host: a.example"], b"HTTP/1.1",
         Seen(target=b"/x", host=b"A.EXAMPLE")),
        ("ipv6", b"http://[::1]:8080/x", [b"Host: [::1]:8080"], b"HTTP/1.1",
         Seen(target=b"/x", host=b"[::1]:8080")),
        ("http10-no-host", ABS, [], b"HTTP/1.0", Seen(target=b"/x"))]:
    ok(f"absolute-{name}", head(b"GET", target, version, *fields, host=None), seen,
       closes=version == b"HTTP/1.0")
ok("absolute-post-body", head(b"POST", ABS, b"HTTP/1.1", b"Content-Length: 5") + HELLO,
   Seen(b"POST", b"/x", body=HELLO))
for name, target, fields in [
        ("disagreeing-host", ABS, [b"Host: b.example"]),
        ("port-vs-host-without", b"http://a.example:8080/x", [b"Host: a.example"]),
        ("two-hosts", ABS, [b"Host: a.example", b"Host: a.example"]),
        ("empty-host-header", ABS, [b"Host:"]),
        ("userinfo", b"http://user@a.example/x", []), ("empty-authority", b"http:///x", []),
        ("ftp", b"ftp://a.example/x", []), ("bad-authority", b"http://a.exa<mple/x", []),
        ("fragment", b"http://a.example/x#f", [])]:
    refused(f"absolute-bad-{name}", head(b"GET", target, b"HTTP/1.1", *fields, host=None))
refused("authority-form-get", head(b"GET", b"a.example:443"))
refused("authority-form-post", head(b"POST", b"a.example:443", b"HTTP/1.1", b"Content-Length: 0"))
for name, data in [("authority", head(b"CONNECT", b"a.example:443", host=b"a.example:443")),
                   ("no-host", head(b"CONNECT", b"a.example:443", host=None)),
                   ("origin-form", head(b"CONNECT", b"/x")),
                   ("asterisk", head(b"CONNECT", b"*")),
                   ("http10", head(b"CONNECT", b"a.example:443", b"HTTP/1.0", host=None)),
                   ("then-pipelined", head(b"CONNECT", b"a.example:443") + get())]:
    refused(f"connect-{name}", data, 405)
refused("connect-origin-form-with-body",
        head(b"CONNECT", b"/x", b"HTTP/1.1", b"Content-Length: 5") + HELLO + get(target=b"/2"), 405)
ok("options-asterisk", head(b"OPTIONS", b"*"), Seen(b"OPTIONS", b"*"))
for method in (b"GET", b"POST", b"HEAD"):
    refused(f"asterisk-{method.decode().lower()}", head(method, b"*"))
refused("asterisk-with-path", head(b"OPTIONS", b"*x"))
for name, target in [("word", b"x"), ("relative-path", b"x/y"), ("query", b"?q=1"),
                     ("dot-dot", b"../etc/passwd"), ("host-only", b"a.example"),
                     ("encoded-slash", b"%2F"), ("backslash", b"\\x"),
                     ("non-ascii", b"/caf\xc3\xa9"), ("control", b"/a\x01b"), ("del", b"/a\x7fb"),
                     ("nul", b"/a\x00b")]:
    refused(f"target-{name}", head(b"GET", target))

# --- Host: required in HTTP/1.1, one, a valid uri-host[:port]
refused("host-missing", get(host=None))
ok("host-missing-http10", head(b"GET", b"/", b"HTTP/1.0", host=None), Seen(host=BACKEND_HOST),
   closes=True)
ok("host-http10", head(b"GET", b"/", b"HTTP/1.0"), closes=True)
ok("http10-post-cl", post_head(b"Content-Length: 5", version=b"HTTP/1.0") + HELLO, POSTED,
   closes=True)
for name, host in [("port", b"a.example:8080"), ("ipv6", b"[::1]:8080"), ("ipv4", b"127.0.0.1"),
                   ("empty", b"")]:
    ok(f"host-{name}", get(host=host), Seen(host=host))
ok("host-trailing-whitespace", get(host=b"a.example \t"))
for name, host in [("space", b"a b"), ("userinfo", b"user@evil.example"), ("path", b"a.example/x"),
                   ("bad-port", b"a.example:8x"), ("backslash", b"a.example\\x"),
                   ("angle", b"a<b")]:
    refused(f"host-bad-{name}", get(host=host))
refused("host-two", get(b"Host: b.example"))
refused("host-two-same", get(b"Host: a.example"))
refused("host-two-http10", head(b"GET", b"/", b"HTTP/1.0", b"Host: b.example"))
