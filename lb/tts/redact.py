"""The one masking step every log line passes through.

Whoever reads a secret registers it (`register(key)`, as CartesiaClient does
with the API key it takes from the environment).  From then on `mask(text)`
replaces every run of WINDOW (8) or more consecutive characters of a secret,
in any (ASCII) letter case, with MARKER: the whole key, its `Bearer <key>` form, and
the prefix, suffix, middle or lower-cased copy that a peer's error message
may quote back.  `Filter` applies it to a whole log record (message,
exception text, stack) and is installed on every handler by
`logsetup.configure`, so a secret that reaches a message by any path is not
written.

Cost: with nothing registered the filter returns at once.  Otherwise a text
is lower-cased once and every STRIDE-th 3-character piece of it is looked up
in a set; only around a hit (rare, in text that holds no secret) are the
8-character windows looked up.  Keys are a few dozen characters, so the sets
stay small.
"""

from __future__ import annotations

import logging
import traceback

WINDOW = 8                 # this many consecutive characters of a secret count as the secret
MARKER = "[redacted]"
# Any WINDOW-long piece holds WINDOW - GRAM + 1 GRAM-long pieces at
# consecutive offsets, so looking at every STRIDE-th offset of a text finds
# at least one of them: only the offsets near such a hit are looked at
# window by window.
GRAM = 3
STRIDE = WINDOW - GRAM + 1
# ASCII letters only: str.lower() can change a non-ASCII text's length
# ("İ"), which would shift the spans found in the lowered copy.
_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class Secrets:
    """A set of secrets and the masking of them.  The balancer uses the one
    module-level registry (`register`, `mask`); tests may make their own."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()   # lower-cased
        self._windows: set[str] = set()   # every WINDOW-long piece of every secret, lower-cased
        self._grams: set[str] = set()     # every GRAM-long piece of those
        self._short: set[str] = set()     # secrets shorter than WINDOW: masked whole

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def register(self, secret: str) -> None:
        """Mask `secret` (and its 8-character pieces) from now on."""
        secret = _lower(secret.strip())
        if not secret or secret in self._secrets:
            return
        self._secrets.add(secret)
        if len(secret) < WINDOW:
            self._short.add(secret)
            return
        for i in range(len(secret) - WINDOW + 1):
            window = secret[i:i + WINDOW]
            self._windows.add(window)
            self._grams.update(window[j:j + GRAM] for j in range(STRIDE))

    def mask(self, text: str) -> str:
        """`text` with every piece of a secret replaced by MARKER (`text`
        itself when there is none)."""
        if not self._secrets or not text:
            return text
        low = _lower(text)
        covered: list[tuple[int, int]] = []
        if self._windows:
            grams, windows = self._grams, self._windows
            for at in [i for i in range(0, len(low) - GRAM + 1, STRIDE)
                       if low[i:i + GRAM] in grams]:
                for start in range(max(0, at - WINDOW + GRAM), at + 1):   # windows holding it
                    if low[start:start + WINDOW] in windows:
                        covered.append((start, start + WINDOW))
        for short in self._short:
            at = low.find(short)
            while at >= 0:
                covered.append((at, at + len(short)))
                at = low.find(short, at + 1)
        if not covered:
            return text
        covered.sort()
        out: list[str] = []
        done = 0            # text[:done] is written or masked
        for start, end in covered:
            if start > done or not out:
                out += (text[done:start], MARKER)
            done = max(done, end)    # a span that overlaps or touches the last extends it
        out.append(text[done:])
        return "".join(out)


def _lower(text: str) -> str:
    return text.lower() if text.isascii() else text.translate(_LOWER)


REGISTRY = Secrets()     # what every log line is masked for
register = REGISTRY.register
mask = REGISTRY.mask


class Filter(logging.Filter):
    """Masks a record before any handler formats it: the message (with its
    arguments merged in), the exception text and the stack.  Never drops one."""

    def __init__(self, secrets: Secrets = REGISTRY):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets
        if not secrets:
            return True
        mask = secrets.mask
        try:
            message = record.getMessage()
        except Exception:   # a bad format string: logging would print msg and args raw
            message = f"{record.msg!s} (arguments: {record.args!r})"
        record.msg, record.args = mask(message), ()
        if record.exc_info and not record.exc_text:
            # Formatted here, masked, and kept as text: the formatter uses
            # exc_text as it is, so the raw exception is never written.
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
            record.exc_info = None
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
        return True
