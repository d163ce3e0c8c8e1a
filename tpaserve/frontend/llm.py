"""Offline generation: LLM(model).generate(prompts, params) -> one RequestOutput each.

    from tpaserve import LLM, SamplingParams
    llm = LLM()                                   # the bundled demo model, as the CLI serves
    llm = LLM("ckpt/", tokenizer="gpt2/", max_num_seqs=256)    # any EngineArgs keyword
    outs = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))

The engine core runs in this process (frontend/llm_engine.py), with async scheduling: the
output processing of one step overlaps the device's work on the next.
"""
from __future__ import annotations

import itertools

from tpaserve.frontend.llm_engine import build_engine
from tpaserve.frontend.outputs import RequestOutput
from tpaserve.sampling_params import SamplingParams


class LLM:
    def __init__(self, model=None, tokenizer=None, **engine_args):
        """model: a checkpoint directory (None: the bundled demo model) or a T6 module;
        engine_args: tpaserve.args.EngineArgs' fields (the CLI's flags, underscored)."""
        self.engine = build_engine(model, tokenizer, **engine_args)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                self.engine.add_request(rid, self._encode(prompt), p)
                order.append(rid)
        except Exception:
            # all or nothing: the prompts added before the bad one would otherwise stay
            # queued and run (unreturned) inside the next generate() call
            for rid in order:
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or a tokenizer")
            return self.engine.tokenizer.encode(prompt)
        return list(prompt)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)
