"""The synchronous engine: an OutputProcessor over an in-process engine core, stepped by its
caller. It is what the offline `LLM` drives and what the engine tests and benchmarks use;
the HTTP server uses AsyncLLM (the same processor, the core in its own process).

    add_request(id, prompt ids, params)  -> RequestRejected / QueueFull raise at once
    step()                               -> the RequestOutputs of the requests with news
    abort_request(id)

With async scheduling a step() returns the outputs of the step launched by the previous
call (the first returns none), so the device computes while the caller handles outputs.
"""
from __future__ import annotations

from tpaserve.args import EngineArgs, engine_args_from
from tpaserve.config import EngineConfig
from tpaserve.engine.messages import EngineInfo
from tpaserve.exceptions import EngineDeadError, RequestRejected
from tpaserve.frontend.async_llm import refusal
from tpaserve.frontend.core_client import InprocClient
from tpaserve.frontend.output_processor import OutputProcessor
from tpaserve.frontend.outputs import RequestOutput
from tpaserve.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, model=None):
        """`model`: a T6, DenseLM (MHA / GQA / MQA) or MLA module to serve instead of loading
        config.model."""
        self.tokenizer = tokenizer
        self.client = InprocClient(config, model)
        self.info: EngineInfo = self.client.info
        self.processor = OutputProcessor(tokenizer)

    @classmethod
    def from_engine_args(cls, args: EngineArgs, model=None, tokenizer=None) -> LLMEngine:
        if model is None:
            args.check_model()
        if tokenizer is None and (model is None or args.tokenizer is not None):
            tokenizer = args.load_tokenizer()
        return cls(args.create_engine_config(tokenizer), tokenizer, model)

    # views for tests and benchmarks: the core's parts
    @property
    def core(self):
        return self.client.core

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> None:
        """Validate and queue; on error (RequestRejected, QueueFull, SamplingParamsError)
        nothing is queued."""
        params = params or SamplingParams()
        if request_id in self.processor.requests:
            raise RequestRejected(f"request id {request_id!r} is already in flight", "request_id")
        reqs = self.processor.add_request(request_id, prompt_token_ids, params, arrival_time,
                                          priority)
        refused = self.client.add(reqs)
        if refused:
            self.processor.fail_request(request_id)
            raise refusal(refused[0].error)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are free when this returns."""
        self.client.abort(self.processor.abort_request(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.processor.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Raises EngineDeadError (and forgets every request) when the core cannot go on."""
        try:
            outs = self.client.step()
        except EngineDeadError:
            for rid in list(self.processor.requests):
                self.processor.fail_request(rid)
            raise
        processed = self.processor.process(outs)
        if processed.aborts:
            self.client.abort(processed.aborts)
        return processed.request_outputs


def build_engine(model=None, tokenizer=None, **kwargs) -> LLMEngine:
    """LLMEngine from a checkpoint directory (or a T6 / DenseLM / MLA module) and EngineArgs'
    keywords."""
    args, module, tok = engine_args_from(model, tokenizer, **kwargs)
    return LLMEngine.from_engine_args(args, model=module, tokenizer=tok)
