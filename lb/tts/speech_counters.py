"""What the OpenAI front door did, for /lb-stats ("speech") and /metrics."""

from __future__ import annotations

from collections import Counter

# How a call on an openai route was served.
PASSED_THROUGH = "passthrough"    # to OpenAI-style servers, as it came
FRONT_DOOR = "front_door"         # made by the balancer in each backend's API
REFUSED = "refused"               # a 400 before any backend was touched
SERVED = (PASSED_THROUGH, FRONT_DOOR, REFUSED)


class SpeechCounters:
    def __init__(self):
        self.calls: Counter[str] = Counter()
        self.pieces = 0             # backend calls made for front-door calls' pieces
        self.split_calls = 0        # front-door calls cut into more than one piece
        self.piece_retries = 0      # pieces tried again on another backend
        self.cut = 0                # answers cut after audio was sent

    def snapshot(self) -> dict:
        return {"calls": {k: self.calls[k] for k in SERVED}, "split_calls": self.split_calls,
                "pieces": self.pieces, "piece_retries": self.piece_retries, "cut": self.cut}


def metrics(family, snap: dict) -> None:
    """The front door's families (`family` as in endpoints.metrics)."""
    family("speech_calls_total", "counter",
           "Calls on openai routes, by how they were served.",
           [(f'{{served="{k}"}}', n) for k, n in snap["calls"].items()])
    family("speech_split_calls_total", "counter",
           "Front-door calls cut into pieces synthesized in parallel.", [("", snap["split_calls"])])
    family("speech_pieces_total", "counter",
           "Pieces of front-door calls synthesized (one per backend call).",
           [("", snap["pieces"])])
    family("speech_piece_retries_total", "counter",
           "Pieces tried again on another backend before any of their audio was sent.",
           [("", snap["piece_retries"])])
    family("speech_cut_total", "counter",
           "Front-door answers cut after audio was sent (a piece failed).", [("", snap["cut"])])
