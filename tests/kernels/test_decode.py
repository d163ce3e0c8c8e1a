"""Paged decode kernel vs reference.paged_attention_ref on awkward shapes: lengths around
block boundaries, h = 47 and 5, ranks 1/2/6, d_h 64/48/16, block sizes 1/8/16, shuffled
block tables, split-K on and off; outputs poisoned with NaN before every run."""
import dataclasses

import pytest
import torch

from tests.kernels.paged_case import TOL, make_case, rel_err
from tpaserve.kernels import _validate
from tpaserve.kernels.decode import DecodeConfig, decode_attention, make_workspace, workspace_numel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _decode(c, num_splits=None, workspace=None, scale=None, config=None):
    out = torch.full_like(c.q, float("nan"))
    return decode_attention(c.q, *c.caches(), *c.metadata(), c.max_seq_len, scale=scale,
                            workspace=workspace, num_splits=num_splits, out=out, config=config)


CASES = [  # (lens, h, d_h, R_K, R_V, block_size, dtype)
    ([1, 15, 16, 17, 50], 47, 64, 2, 2, 16, torch.float32),
    ([1, 7, 8, 9, 33], 5, 16, 1, 6, 8, torch.float16),
    ([3, 20], 47, 32, 6, 1, 1, torch.float32),
    ([16, 31], 5, 48, 2, 2, 16, torch.float16),
]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("lens,h,d_h,r_k,r_v,bs,dtype", CASES)
def test_decode_matches_reference(lens, h, d_h, r_k, r_v, bs, dtype, splits):
    c = make_case(lens, [1] * len(lens), h, d_h, r_k, r_v, bs, dtype, DEV, seed=len(lens) + h)
    err = rel_err(_decode(c, num_splits=splits), c.reference())
    assert err < TOL[dtype], f"relative error {err:.2e}"


def test_batched_equals_per_request():
    c = make_case([5, 40, 17], [1, 1, 1], 5, 16, 2, 2, 8, torch.float32, DEV, seed=3)
    got = _decode(c, num_splits=2)
    for i in range(3):
        qs = slice(i, i + 1)
        one = decode_attention(c.q[qs], *c.caches(), c.block_tables[qs], c.seq_lens[qs],
                               torch.tensor([0, 1], dtype=torch.int32, device=DEV),
                               c.max_seq_len, num_splits=2)
        torch.testing.assert_close(got[qs], one, atol=0, rtol=0)


def test_preallocated_workspace_reused_and_scale():
    c = make_case([9, 26], [1, 1], 47, 16, 2, 1, 16, torch.float32, DEV, seed=5)
    one = make_case([30], [1], 47, 16, 2, 1, 16, torch.float32, DEV, seed=8)
    ws = make_workspace(2, 47, 16, 4, device=DEV).fill_(float("nan"))   # any contents
    # reuse across calls that lay the workspace out differently (batch, splits)
    for case, splits in ((c, 4), (one, 2), (c, 3), (c, 4)):
        err = rel_err(_decode(case, num_splits=splits, workspace=ws, scale=0.3),
                      case.reference(scale=0.3))
        assert err < 1e-4
    with pytest.raises(_validate.KernelInputError, match="workspace"):
        _decode(c, num_splits=4, workspace=ws[:10])


def test_sequence_without_query_is_left_alone():
    c = make_case([12, 7, 30], [1, 0, 1], 5, 16, 2, 2, 8, torch.float32, DEV, seed=6)
    got = _decode(c, num_splits=2)                 # 2 query rows: sequence 1 has none
    assert got.shape[0] == 2
    assert rel_err(got, c.reference()) < 1e-4


def test_split_lengths_follow_each_sequence():
    # a grid sized for a long context (as a CUDA graph captured for max_model_len is):
    # each sequence spreads its own length over the splits (short ones use few, some
    # splits empty), and min_split bounds how short a split gets
    c = make_case([1, 17, 40, 130], [1] * 4, 5, 16, 2, 2, 8, torch.float32, DEV, seed=9)
    for cfg in (None, DecodeConfig(16, 16, 4, 1, min_split=32), DecodeConfig(16, 16, 4, 1, min_split=1)):
        out = torch.full_like(c.q, float("nan"))
        out = decode_attention(c.q, *c.caches(), *c.metadata(), 4096, num_splits=7, out=out,
                               config=cfg)
        assert rel_err(out, c.reference()) < 1e-4


def test_short_max_seq_len_still_covers_context():
    # max_seq_len only sizes the grid: split lengths come from each sequence's length
    c = make_case([70], [1], 5, 16, 1, 1, 8, torch.float32, DEV, seed=7)
    out = torch.full_like(c.q, float("nan"))
    out = decode_attention(c.q, *c.caches(), *c.metadata(), 20, num_splits=2, out=out)
    assert rel_err(out, c.reference()) < 1e-4


# ---- v6 paths: block-table prefetch, merge step width, self-resetting counters ----
_AWKWARD = [1, 15, 16, 17, 50, 33]      # around block size 16, shuffled tables (make_case)


@pytest.mark.parametrize("cfg", [
    DecodeConfig(16, 16, 4, 1, min_split=16),                                  # v5 paths
    DecodeConfig(16, 16, 4, 1, min_split=16, merge_sb=4),
    DecodeConfig(16, 16, 4, 1, min_split=32, bt_prefetch=2),                   # chunks of 2 tiles
    DecodeConfig(16, 16, 4, 1, min_split=16, bt_prefetch=16, merge_sb=1)])
@pytest.mark.parametrize("splits", [1, 3])
def test_v6_paths(cfg, splits):
    # h 47 = 16 + 16 + 15 (last head block masked), lengths around block size 16
    c = make_case(_AWKWARD, [1] * 6, 47, 32, 2, 2, 16, torch.float32, DEV, seed=21)
    err = rel_err(_decode(c, num_splits=splits, config=cfg), c.reference())
    assert err < 1e-4, f"relative error {err:.2e}"


def test_block_table_prefetch_tile_smaller_than_block():
    # BLOCK_N 16 inside 32-position blocks: two tiles per block-table entry
    c = make_case([1, 31, 32, 33, 100], [1] * 5, 5, 16, 2, 2, 32, torch.float32, DEV, seed=26)
    cfg = DecodeConfig(16, 16, 4, 1, min_split=16, bt_prefetch=4)
    for splits in (1, 3):
        assert rel_err(_decode(c, num_splits=splits, config=cfg), c.reference()) < 1e-4


@pytest.mark.parametrize("cfg", [DecodeConfig(16, 16, 4, 1, min_split=1),
                                 DecodeConfig(16, 16, 4, 1, min_split=1, merge_sb=2),
                                 DecodeConfig(16, 16, 4, 1, min_split=1, merge_sb=8,
                                              bt_prefetch=8)])
def test_many_splits(cfg):
    # 40 splits of one 16-position tile each, next to
    # sequences that use one split (written directly, no partials) or a few
    c = make_case([640, 16, 17, 1, 100], [1] * 5, 20, 16, 2, 1, 16, torch.float32, DEV, seed=22)
    err = rel_err(_decode(c, num_splits=40, config=cfg), c.reference())
    assert err < 1e-4, f"relative error {err:.2e}"


def test_counters_reset_themselves():
    # after a launch the merge counters in the workspace's tail are zero again, so later
    # launches (a CUDA graph replay) need no memset
    c = make_case([40, 70, 3], [1] * 3, 47, 16, 2, 2, 16, torch.float32, DEV, seed=23)
    ws = make_workspace(3, 47, 16, 8, device=DEV).fill_(float("nan"))
    for _ in range(3):
        out = _decode(c, num_splits=4, workspace=ws)
        assert rel_err(out, c.reference()) < 1e-4
        assert (ws[-3 * 3:].view(torch.int32) == 0).all()


def test_workspace_partials_over_another_layouts_counters():
    # a tight workspace: call X's partials (batch 1, 33 splits) reach into the tail where
    # call Y (batch 16, 2 splits) keeps its counters, so Y after X must zero them again
    h, d = 47, 16
    cfg = DecodeConfig(16, 16, 4, 1, min_split=16)
    x = make_case([33 * 16], [1], h, d, 2, 2, 16, torch.float32, DEV, seed=24)
    y = make_case([20] * 16, [1] * 16, h, d, 2, 2, 16, torch.float32, DEV, seed=25)
    ws = torch.full((workspace_numel(1, h, d, 33),), float("nan"), device=DEV)
    assert workspace_numel(16, h, d, 2) <= ws.numel()
    for case, splits in ((y, 2), (x, 33), (y, 2), (x, 33), (y, 2)):
        err = rel_err(_decode(case, num_splits=splits, workspace=ws, config=cfg),
                      case.reference())
        assert err < 1e-4, f"relative error {err:.2e}"
    ws.fill_(float("nan"))                 # modified by torch: the launcher zeroes again
    assert rel_err(_decode(y, num_splits=2, workspace=ws, config=cfg), y.reference()) < 1e-4


def test_decode_rejects_bad_inputs():
    c = make_case([5], [1], 5, 16, 2, 2, 8, torch.float32, DEV)
    with pytest.raises(_validate.KernelInputError, match="q dtype"):
        decode_attention(c.q.half(), *c.caches(), *c.metadata(), 5)
    with pytest.raises(_validate.KernelInputError, match="seq_lens dtype"):
        decode_attention(c.q, *c.caches(), c.block_tables, c.seq_lens.long(),
                         c.query_start_loc, 5)
    with pytest.raises(_validate.KernelInputError, match="q must be"):
        decode_attention(c.q[:, :4], *c.caches(), *c.metadata(), 5)


# ---- real sizes on the GPU (bf16, T6-medium: h 47, d_h 64, R_K = R_V = 2) ----
_T6_REF: dict[int, torch.Tensor] = {}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", [None, DecodeConfig(16, 16, 1, 5), DecodeConfig(16, 16, 2, 3),
                                    DecodeConfig(64, 16, 4, 2), DecodeConfig(16, 32, 1, 3),
                                    DecodeConfig(16, 16, 2, 3, min_split=16, merge_sb=4,
                                                 bt_prefetch=16),
                                    DecodeConfig(16, 16, 1, 5, bt_prefetch=32),
                                    DecodeConfig(16, 16, 4, 3, bt_prefetch=16, merge_sb=16)])
@pytest.mark.parametrize("splits", [None, 1, 16])
@pytest.mark.parametrize("bs", [16, 32])
def test_decode_t6_medium_bf16(bs, splits, config):
    c = make_case([1, bs - 1, bs + 1, 4096, 32768, 1000], [1] * 6, 47, 64, 2, 2, bs,
                  torch.bfloat16, "cuda", seed=11)
    if bs not in _T6_REF:                       # same seeded case per block size
        _T6_REF[bs] = c.reference()
    err = rel_err(_decode(c, num_splits=splits, config=config), _T6_REF[bs])
    assert err < TOL[torch.bfloat16], f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bs", [16, 32])
def test_decode_paper_shape_bf16_batched_equals_per_request(bs):
    c = make_case([777, 4096, 9000], [1] * 3, 32, 64, 1, 1, bs, torch.bfloat16, "cuda", seed=12)
    got = _decode(c, num_splits=8)
    assert rel_err(got, c.reference()) < TOL[torch.bfloat16]
    for i in range(3):
        qs = slice(i, i + 1)
        one = decode_attention(c.q[qs], *c.caches(), c.block_tables[qs], c.seq_lens[qs],
                               torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                               c.max_seq_len, num_splits=8)
        torch.testing.assert_close(got[qs], one, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", [None, DecodeConfig(16, 16, 1, 5),
                                    DecodeConfig(16, 16, 2, 3, merge_sb=2, bt_prefetch=16)])
def test_decode_graph_replays_reuse_counters(config):
    # the engine's pattern: one workspace, a graph captured for a long max_seq_len, replayed
    # with the sequence lengths changed in place; no memset is captured once the counters
    # are known zero, so every replay relies on the merging programs resetting them
    lens = [1, 17, 4000, 700]
    c = make_case(lens, [1] * 4, 47, 64, 2, 2, 16, torch.bfloat16, "cuda", seed=13)
    ws = make_workspace(4, 47, 64, device="cuda").fill_(float("nan"))
    out = torch.full_like(c.q, float("nan"))
    seq_lens = c.seq_lens.clone()

    def step():
        decode_attention(c.q, *c.caches(), c.block_tables, seq_lens, c.query_start_loc,
                         32768, workspace=ws, out=out, config=config)

    step()                                  # warm-up (compile; zeroes the counters once)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for shrink in (0, 1, 5, 0):
        seq_lens.copy_(torch.tensor([max(1, n - shrink * 3) for n in lens], dtype=torch.int32))
        out.fill_(float("nan"))
        g.replay()
        want = dataclasses.replace(c, seq_lens=seq_lens.clone()).reference()
        assert rel_err(out, want) < TOL[torch.bfloat16]
