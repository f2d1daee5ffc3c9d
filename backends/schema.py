"""Request validation that answers like FastAPI + pydantic v2: 422 {"detail": [error, ...]}.

A schema is a dict name -> Field.  validate(schema, data) returns the values with defaults
filled in, or raises Invalid whose .errors are pydantic-style dicts:
    {"type": "missing", "loc": ["body", "text"], "msg": "Field required", "input": {...}}
Coercion follows pydantic's lax mode (numeric strings are numbers, 0/1/"true" are booleans),
which is also how FastAPI reads form fields, whose values are all strings.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import orjson

REQUIRED = object()
_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "off", "f", "false", "n", "no"}


class Invalid(Exception):
    def __init__(self, errors: list[dict]):
        super().__init__(errors)
        self.errors = errors

    def body(self) -> dict:
        return {"detail": self.errors}


def _err(kind: str, loc: tuple, msg: str, value: Any, ctx: dict | None = None) -> dict:
    e = {"type": kind, "loc": list(loc), "msg": msg, "input": value}
    if ctx is not None:
        e["ctx"] = ctx
    return e


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


class Field:
    """kind: "str", "float", "int", "bool", "list[str]" or a nested schema dict (an object).
    ge/le bound numbers, min_length/max_length strings, choices + check add value errors
    (check returns a message or None; its value may be rewritten by returning (None, new))."""

    def __init__(self, kind, default=REQUIRED, *, optional=False, ge=None, le=None,
                 min_length=None, max_length=None, check: Callable | None = None,
                 class_name: str = ""):
        self.kind, self.default, self.optional = kind, default, optional
        self.ge, self.le, self.min_length, self.max_length = ge, le, min_length, max_length
        self.check, self.class_name = check, class_name


def validate(schema: dict[str, Field], data: Any, loc: tuple = ("body",),
             class_name: str = "") -> dict:
    if not isinstance(data, dict):
        if class_name:
            raise Invalid([_err("dataclass_type", loc, "Input should be a dictionary or an "
                                f"instance of {class_name}", data, {"class_name": class_name})])
        raise Invalid([_err("model_attributes_type", loc, "Input should be a valid dictionary "
                            "or object to extract fields from", data)])
    out, errors = {}, []
    for name, f in schema.items():
        where = loc + (name,)
        if name not in data:
            if f.default is REQUIRED:
                errors.append(_err("missing", where, "Field required", data))
            else:
                out[name] = f.default
            continue
        try:
            out[name] = _field(f, data[name], where)
        except Invalid as e:
            errors.extend(e.errors)
    if errors:
        raise Invalid(errors)
    return out


def _field(f: Field, v: Any, loc: tuple) -> Any:
    if v is None and f.optional:
        return None
    k = f.kind
    if isinstance(k, dict):
        return validate(k, v, loc, f.class_name or "object")
    if k == "str":
        if not isinstance(v, str):
            raise Invalid([_err("string_type", loc, "Input should be a valid string", v)])
        if f.min_length is not None and len(v) < f.min_length:
            s = "" if f.min_length == 1 else "s"
            raise Invalid([_err("string_too_short", loc, f"String should have at least "
                                f"{f.min_length} character{s}", v, {"min_length": f.min_length})])
        if f.max_length is not None and len(v) > f.max_length:
            raise Invalid([_err("string_too_long", loc, f"String should have at most "
                                f"{f.max_length} characters", v, {"max_length": f.max_length})])
    elif k == "float":
        v = _float(v, loc)
    elif k == "int":
        v = _int(v, loc)
    elif k == "bool":
        v = _bool(v, loc)
    elif k == "list[str]":
        if not isinstance(v, list):
            raise Invalid([_err("list_type", loc, "Input should be a valid list", v)])
        bad = [_err("string_type", loc + (i,), "Input should be a valid string", x)
               for i, x in enumerate(v) if not isinstance(x, str)]
        if bad:
            raise Invalid(bad)
    if k in ("float", "int"):
        if f.ge is not None and v < f.ge:
            raise Invalid([_err("greater_than_equal", loc, f"Input should be greater than or "
                                f"equal to {_num(f.ge)}", v, {"ge": f.ge})])
        if f.le is not None and v > f.le:
            raise Invalid([_err("less_than_equal", loc, f"Input should be less than or equal "
                                f"to {_num(f.le)}", v, {"le": f.le})])
    if f.check is not None:
        msg = f.check(v)
        if isinstance(msg, tuple):
            msg, v = msg
        if msg:
            raise Invalid([_err("value_error", loc, f"Value error, {msg}", v, {"error": {}})])
    return v


def _float(v, loc):
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise Invalid([_err("float_type", loc, "Input should be a valid number", v)])
    if isinstance(v, str):
        try:
            x = float(v.strip())
        except ValueError:
            raise Invalid([_err("float_parsing", loc, "Input should be a valid number, "
                                "unable to parse string as a number", v)]) from None
    else:
        x = float(v)
    if not math.isfinite(x):
        raise Invalid([_err("finite_number", loc, "Input should be a finite number", v)])
    return x


def _int(v, loc):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, str):
        try:
            return int(v.strip())
        except ValueError:
            raise Invalid([_err("int_parsing", loc, "Input should be a valid integer, "
                                "unable to parse string as an integer", v)]) from None
    if isinstance(v, float):
        if not v.is_integer():
            raise Invalid([_err("int_from_float", loc, "Input should be a valid integer, "
                                "got a number with a fractional part", v)])
        return int(v)
    if isinstance(v, int):
        return v
    raise Invalid([_err("int_type", loc, "Input should be a valid integer", v)])


def _bool(v, loc):
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
        return v.strip().lower() in _TRUE
    if isinstance(v, (int, float, str)):
        raise Invalid([_err("bool_parsing", loc, "Input should be a valid boolean, "
                            "unable to interpret input", v)])
    raise Invalid([_err("bool_type", loc, "Input should be a valid boolean", v)])


def json_body(body: bytes) -> Any:
    """The request body as JSON, or Invalid the way FastAPI reports it."""
    if not body.strip():
        raise Invalid([_err("missing", ("body",), "Field required", None)])
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        pos = getattr(e, "pos", 0) or 0
        raise Invalid([_err("json_invalid", ("body", pos), "JSON decode error", {},
                            {"error": e.msg if hasattr(e, "msg") else str(e)})]) from None


def pydantic_summary(errors: list[dict], model: str) -> str:
    """str(pydantic.ValidationError): what a handler that catches it and reports str(e) says."""
    n = len(errors)
    lines = [f"{n} validation error{'s' if n != 1 else ''} for {model}"]
    for e in errors:
        lines.append(".".join(str(p) for p in e["loc"][1:]) or "body")
        v = e["input"]
        lines.append(f"  {e['msg']} [type={e['type']}, input_value={v!r}, "
                     f"input_type={type(v).__name__}]")
    return "\n".join(lines)
