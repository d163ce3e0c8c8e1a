"""What the model runner keeps about the requests it has seen, across steps: each request's
parameters and seeded generator (until it finishes: a preempted request keeps its
generator, so recomputation does not change what it samples next) and its block table, as
one row of a host array (until it finishes or is preempted). Rows are reused; the
SchedulerOutput's diffs (new blocks, resets) keep them current without sending whole
tables every step.

    tables  (rows, max_blocks) int32   row r: the block ids of the request holding row r
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tpaserve.engine.contracts import NewRequest, ScheduledRequest
from tpaserve.sampling_params import SamplingParams


@dataclass
class RequestState:
    params: SamplingParams
    prompt_token_ids: list[int]
    generator: torch.Generator | None
    row: int = -1                 # -1: no table (new, or preempted)
    num_blocks: int = 0


class RequestStates:
    def __init__(self, rows: int, max_blocks: int, device: torch.device):
        self.device = device
        self.states: dict[str, RequestState] = {}
        self.tables = np.zeros((rows, max_blocks), dtype=np.int32)
        self.free_rows = list(range(rows - 1, -1, -1))       # pop() gives the lowest

    @property
    def num_rows(self) -> int:
        return self.tables.shape[0]

    def add(self, new: NewRequest) -> None:
        g = None
        if new.params.seed is not None:
            g = torch.Generator(device=self.device).manual_seed(new.params.seed)
        self.states[new.request_id] = RequestState(new.params, new.prompt_token_ids, g)

    def finish(self, request_id: str) -> None:
        st = self.states.pop(request_id, None)
        if st is not None:
            self._drop_table(st)

    def preempt(self, request_id: str) -> None:
        st = self.states.get(request_id)
        if st is not None:
            self._drop_table(st)

    def _drop_table(self, st: RequestState) -> None:
        if st.row >= 0:
            self.free_rows.append(st.row)
            st.row, st.num_blocks = -1, 0

    def apply(self, r: ScheduledRequest) -> RequestState:
        """Bring the request's table up to date with this step's diff."""
        st = self.states[r.request_id]
        if r.reset_blocks:
            self._drop_table(st)
        if st.row < 0:
            if not self.free_rows:
                self._grow()
            st.row = self.free_rows.pop()
        n, new = st.num_blocks, r.new_block_ids
        if new:
            self.tables[st.row, n:n + len(new)] = new
            st.num_blocks = n + len(new)
        return st

    def _grow(self) -> None:
        old = self.num_rows
        self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
        self.free_rows.extend(range(2 * old - 1, old - 1, -1))
