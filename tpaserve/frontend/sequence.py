"""One of a request's n sequences as its client sees it: incremental text, stop strings
matched across token boundaries, logprobs, the finish reason.

A stop string is searched in the text not yet released; text that could still be the
start of a stop string is held back until the next tokens decide it, so a stream never
shows part of a stop string and the stop string itself is never returned (unless
include_stop_str_in_output). The core knows nothing of stop strings: when one is hit, the
frontend finishes the sequence and aborts it in the core (tokens the core made after it
are dropped here).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tpaserve.engine.contracts import Logprob
from tpaserve.frontend.outputs import CompletionOutput
from tpaserve.sampling_params import SamplingParams


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...], include_stop: bool):
        self.stops, self.include = stops, include_stop
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """New text -> (text to release now, the stop string hit or None)."""
        if not self.stops:
            return text, None
        buf = self.pending + text
        hit_at, hit = len(buf) + 1, None
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and i < hit_at:
                hit_at, hit = i, s
        if hit is not None:
            self.pending = ""
            return buf[:hit_at + (len(hit) if self.include else 0)], hit
        keep = 0        # longest suffix of buf that is a proper prefix of some stop string
        for k in range(min(self.hold, len(buf)), 0, -1):
            if any(s.startswith(buf[-k:]) for s in self.stops):
                keep = k
                break
        self.pending = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out



@dataclass
class SequenceState:
    index: int
    params: SamplingParams
    detok: object | None                     # IncrementalDetokenizer, None without a tokenizer
    stops: StopStringMatcher
    out: CompletionOutput = field(init=False)

    def __post_init__(self) -> None:
        want = self.params.logprobs is not None
        self.out = CompletionOutput(index=self.index, logprobs=[] if want else None,
                                    cumulative_logprob=0.0 if want else None)

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    def clear_delta(self) -> None:
        o = self.out
        o.token_ids_delta, o.logprobs_delta, o.text_delta = [], [], ""

    def advance(self, new: list[int], logprobs: list[Logprob] | None,
                finish_reason: str | None, stop_reason: int | str | None) -> str | None:
        """Take this output's new tokens; returns a stop string if one was hit (the caller
        aborts the sequence in the core). Fills the cumulative and delta fields."""
        o = self.out
        logprobs = logprobs or []
        hit, text = None, ""
        if self.detok is not None and new:
            if self.stops.stops and len(new) > 1:
                # several tokens at once (a multi-step round): a stop string ends the output
                # at the token that completes it, so feed them one at a time
                for i, tok in enumerate(new):
                    part, hit = self.stops.feed(self.detok.step([tok]))
                    text += part
                    if hit is not None:
                        new, logprobs = new[:i + 1], logprobs[:i + 1]
                        break
            else:
                text, hit = self.stops.feed(self.detok.step(new))
        o.token_ids_delta, o.logprobs_delta, o.text_delta = list(new), list(logprobs), text
        o.token_ids.extend(new)
        if o.logprobs is not None:
            o.logprobs.extend(logprobs)
            o.cumulative_logprob += sum(lp for lp, _ in logprobs)
        if hit is not None:
            o.finish_reason, o.stop_reason = "stop", hit
        elif finish_reason is not None:
            if self.detok is not None:
                tail, hit2 = self.stops.feed(self.detok.finish())
                o.text_delta += tail if hit2 is not None else tail + self.stops.flush()
                if hit2 is not None:
                    finish_reason, stop_reason = "stop", hit2
            o.finish_reason, o.stop_reason = finish_reason, stop_reason
        o.text += o.text_delta
        return hit
