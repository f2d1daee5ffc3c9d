"""HTML form bodies: multipart/form-data (with file parts) and application/x-www-form-urlencoded.

parse_form(content_type, body) -> {name: Part}; a repeated name keeps its last part, as
FastAPI's Form() does.  A body that is not a well-formed form raises FormError (FastAPI answers
400 {"detail": "There was an error parsing the body"}).  Any other content type gives {}, so
the handler reports its required fields as missing, as FastAPI does.
"""
from __future__ import annotations

from dataclasses import dataclass
from email.message import Message
from urllib.parse import parse_qsl


class FormError(ValueError):
    pass


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _params(header_value: str) -> tuple[str, dict[str, str]]:
    """'form-data; name="a"; filename="b.wav"' -> ("form-data", {"name": "a", ...})."""
    m = Message()
    m["x"] = header_value
    params = m.get_params(header="x") or []
    main = params[0][0].lower() if params else ""
    return main, {k.lower(): (v if isinstance(v, str) else v[2]) for k, v in params[1:]}


def parse_form(content_type: str | None, body: bytes) -> dict[str, Part]:
    kind, params = _params(content_type or "")
    if kind == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError as e:
            raise FormError(str(e)) from None
        return {k: Part(k, v.encode()) for k, v in pairs}
    if kind != "multipart/form-data":
        return {}
    boundary = params.get("boundary")
    if not boundary:
        raise FormError("multipart body without a boundary")
    delim = b"--" + boundary.encode("latin-1")
    pieces = body.split(delim)
    if len(pieces) < 3 or not pieces[-1].startswith(b"--"):
        raise FormError("multipart body is not terminated")
    out: dict[str, Part] = {}
    for piece in pieces[1:-1]:
        if not piece.startswith(b"\r\n") or not piece.endswith(b"\r\n"):
            raise FormError("malformed multipart part")
        head, sep, data = piece[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise FormError("multipart part without a header")
        headers = {}
        for line in head.split(b"\r\n"):
            name, colon, value = line.partition(b":")
            if not colon:
                raise FormError("malformed multipart header")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
        disposition, dparams = _params(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in dparams:
            raise FormError("multipart part without a form-data name")
        name = dparams["name"]
        out[name] = Part(name, data, dparams.get("filename"), headers.get("content-type"))
    return out


def encode_multipart(fields: dict[str, str | tuple[str, bytes, str]],
                     boundary: str = "simtts-boundary-7f3a") -> tuple[str, bytes]:
    """(content_type, body) for a multipart form: a value is text or (filename, data, ctype).
    For tests and clients of the simulated servers."""
    out = []
    for name, value in fields.items():
        out.append(b"--" + boundary.encode() + b"\r\n")
        if isinstance(value, tuple):
            filename, data, ctype = value
            out.append(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                       f"Content-Type: {ctype}\r\n\r\n".encode())
            out.append(data)
        else:
            out.append(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            out.append(value.encode())
        out.append(b"\r\n")
    out.append(b"--" + boundary.encode() + b"--\r\n")
    return f"multipart/form-data; boundary={boundary}", b"".join(out)
