"""What a reload keeps of the backends (HTTP or [[tcp]]) and what it makes anew."""

from __future__ import annotations

from typing import Callable, Sequence


def carry_over(current: Sequence, wanted: Sequence, *, same: Callable[[object, object], bool],
               make: Callable[[object], object]) -> tuple[list, list, list, list]:
    """A reload's backends (HTTP or [[tcp]]): one in `current` whose name is
    still `wanted` and `same(backend, cfg)` is kept, with its state; the
    others are removed (the caller drains them: what they hold finishes);
    names not there before are made with `make(cfg)`.

    -> (the backends in the wanted order, [(kept backend, its new cfg)],
        added, removed)"""
    by_name = {cfg.name: cfg for cfg in wanted}
    kept, removed = [], []
    for backend in current:
        cfg = by_name.get(backend.name)
        if cfg is not None and same(backend, cfg):
            kept.append((backend, cfg))
        else:
            removed.append(backend)
    known = {backend.name for backend, _ in kept}
    added = [make(cfg) for cfg in wanted if cfg.name not in known]
    now = {b.name: b for b in [*(backend for backend, _ in kept), *added]}
    return [now[cfg.name] for cfg in wanted], kept, added, removed
