"""The load generator against the stub server (conftest.py): SSE parsing, timing math,
concurrency bound, errors, sweeps and the JSON it writes."""
import asyncio
import json

import numpy as np
import pytest

from bench import serve
from bench.metrics import summarize, tpot
from bench.workload import make_requests


def run(stub, specs, arrivals=None, **kw):
    arrivals = np.zeros(len(specs)) if arrivals is None else arrivals
    return asyncio.run(serve.run_load(stub.url + "/v1", "stub", specs, arrivals, **kw))


def test_timing_math_and_token_counts(stub):
    stub.state.first_delay, stub.state.gap = 0.08, 0.02
    specs = make_requests(6, 16, 10, token_ids=True, vocab_size=50)
    results, duration = run(stub, specs, concurrency=3)
    assert all(r.ok for r in results), results[0].error
    assert sorted(b["prompt"] for b in stub.state.bodies) == sorted(s.prompt for s in specs)
    for r in results:
        assert r.output_tokens == 10 and r.prompt_len == 7          # from the usage chunk
        assert len(r.itl) == 9
        assert 0.08 <= r.ttft < 0.08 + 0.5
        assert r.latency == pytest.approx(r.ttft + sum(r.itl), abs=0.05)
        assert min(r.itl) >= 0.015                                 # sleeps never run short
        assert tpot(r) == pytest.approx((r.latency - r.ttft) / 9)
    row = summarize(results, duration)
    assert 20 <= row["median_itl_ms"] < 200          # upper bounds loose: a busy CI machine
    assert 20 <= row["mean_tpot_ms"] < 200
    assert row["mean_e2el_ms"] >= 80 + 9 * 20
    # 6 requests, 3 at a time: two waves of at least 0.08 + 9 * 0.02 s each
    assert duration >= 2 * 0.26
    assert row["output_throughput"] == pytest.approx(60 / duration)


def test_without_usage_tokens_are_counted_by_arrival(stub):
    stub.state.usage = False
    results, _ = run(stub, make_requests(2, 4, 5, token_ids=True))
    assert [r.output_tokens for r in results] == [5, 5]
    assert all(r.prompt_len == 4 for r in results)                 # the workload's count


def test_chat_role_chunk_is_not_the_first_token(stub):
    stub.state.first_delay = 0.1
    results, _ = run(stub, make_requests(2, 8, 4), endpoint="chat")
    assert all(r.ok and r.ttft >= 0.1 and len(r.itl) == 3 for r in results)
    assert stub.state.bodies[0]["messages"][0]["role"] == "user"


def test_concurrency_bound_is_respected(stub):
    stub.state.first_delay = 0.03
    results, _ = run(stub, make_requests(8, 4, 3, token_ids=True), concurrency=2)
    assert all(r.ok for r in results)
    assert stub.state.max_in_flight == 2
    stub.state.reset()
    stub.state.first_delay = 0.3          # long enough for all eight to be open at once
    run(stub, make_requests(8, 4, 3, token_ids=True))              # unbounded: all at once
    assert stub.state.max_in_flight == 8


def test_errors_counted_by_status(stub):
    stub.state.fail_every = 3
    results, duration = run(stub, make_requests(9, 4, 2, token_ids=True), concurrency=1)
    row = summarize(results, duration)
    assert (row["completed"], row["failed"]) == (6, 3)
    assert row["errors"] == {"503": 3}
    assert "overloaded" in row["first_error"]


def test_connection_refused_is_an_error_not_a_crash():
    specs = make_requests(2, 4, 2, token_ids=True)
    results, _ = asyncio.run(serve.run_load("http://127.0.0.1:9", "m", specs, np.zeros(2)))
    assert not any(r.ok for r in results)
    assert all(r.status == "ConnectError" for r in results)


def test_poisson_schedule_is_followed(stub):
    specs = make_requests(6, 4, 2, token_ids=True)
    arrivals = np.array([0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
    results, duration = run(stub, specs, arrivals)
    starts = np.array([r.start for r in results])
    # never sent early (late is possible on a busy machine: the schedule then catches up)
    assert np.all(starts - starts[0] >= arrivals - 0.005)
    assert duration >= 0.3


def test_max_time_stops_sending(stub):
    specs = make_requests(50, 4, 2, token_ids=True)
    results, _ = run(stub, specs, np.arange(50) * 0.05, max_time=0.2)
    assert 2 <= len(results) <= 8 and all(r.ok for r in results)


def test_cli_sweep_writes_one_json_with_all_rows(stub, tmp_path, capsys):
    out = tmp_path / "sweep.json"
    rows = serve.main(["--base-url", stub.url, "--model", "stub", "--token-ids",
                       "--vocab-size", "64", "--input-len", "8", "--output-len", "4",
                       "--concurrency", "1,3", "--num-prompts", "2,6", "--warmup", "1",
                       "--api-key", "secret", "--label", "stub", "--json", str(out)])
    assert [(r["concurrency"], r["num_prompts"], r["completed"]) for r in rows] == [
        (1, 2, 2), (3, 6, 6)]
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows
    assert saved["config"]["request_rate"] == ["inf"] and "api_key" not in saved["config"]
    assert "secret" not in out.read_text()
    assert stub.state.max_in_flight == 3
    assert len(stub.state.bodies) == 1 + 2 + 6                      # warm-up included
    assert "output token throughput" in capsys.readouterr().out


def test_cli_rate_sweep(stub):
    rows = serve.main(["--base-url", stub.url, "--model", "stub", "--input-len", "8",
                       "--output-len", "3", "--request-rate", "50,100", "--concurrency", "0,2",
                       "--num-prompts", "5"])
    assert [(r["request_rate"], r["concurrency"]) for r in rows] == [
        (50.0, None), (50.0, 2), (100.0, None), (100.0, 2)]
    assert all(r["completed"] == 5 for r in rows)


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.metrics import batch_row
    from bench.plots import plot_serving
    rows = [dict(batch_row("a", c, 8, 4, 0.1, 1.0), label="a") for c in (1, 4)]
    rows += [dict(batch_row("b", 2, 8, 4, 0.1, 1.0), request_rate=r) for r in (1.0, 2.0)]
    plot_serving(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_cli_rejects_token_ids_with_chat():
    with pytest.raises(SystemExit):
        serve.parse_args(["--model", "m", "--endpoint", "chat", "--token-ids"])
    with pytest.raises(SystemExit, match="one per point"):
        serve.sweep_points(serve.parse_args(["--model", "m", "--concurrency", "1,2,4",
                                             "--num-prompts", "1,2"]))
