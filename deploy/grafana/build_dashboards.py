"""The Grafana dashboards, as code (grafana-foundation-sdk, Grafana 11 line).

    .venv/bin/python deploy/grafana/build_dashboards.py           # rewrite the JSON
    .venv/bin/python deploy/grafana/build_dashboards.py --check   # exit 1 if it is stale

The generated JSON is committed (deploy/grafana/dashboards/, provisioned by Grafana as
files); tests/deploy checks that regenerating it gives the same bytes and that every metric
a query names is on a live server's /metrics. Metric names come from the one place that
defines them, tpaserve/frontend/metrics.py: only names defined there may appear here.

Every query filters on the `model_name` variable (multi-select; `=~` takes "All") and
aggregates `by (model_name)`, so several replicas of one model add up and models stay
apart. Rates use $__rate_interval (the datasource's timeInterval is the scrape interval).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders.dashboard import (Dashboard, DatasourceVariable,
                                                        QueryVariable, Row)
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DataSourceRef,
                                                      VariableRefresh, VariableSort)

OUT_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = '{model_name=~"$model_name"}'
BY = "by (model_name)"


def q(expr: str, legend: str = "{{model_name}}") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).datasource(DATASOURCE)


def rate(name: str, extra: str = "") -> str:
    """Per-second rate of a counter, summed per model."""
    sel = SEL[:-1] + (", " + extra if extra else "") + "}"
    return f"sum {BY} (rate({name}{sel}[$__rate_interval]))"


def quantile(phi: float, histogram: str) -> str:
    return (f"histogram_quantile({phi}, sum by (model_name, le) "
            f"(rate({histogram}_bucket{SEL}[$__rate_interval])))")


def mean(histogram: str) -> str:
    return (f"sum {BY} (rate({histogram}_sum{SEL}[$__rate_interval])) / "
            f"sum {BY} (rate({histogram}_count{SEL}[$__rate_interval]))")


def timeseries(title: str, unit: str, *targets: Dataquery, description: str = "",
               width: int = 8, stacked: bool = False, bars: bool = False) -> Timeseries:
    p = (Timeseries().title(title).description(description).unit(unit).span(width).height(8)
         .datasource(DATASOURCE).fill_opacity(10).line_width(1)
         .legend(cb.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                 .placement(common.LegendPlacement.BOTTOM).show_legend(True))
         .tooltip(cb.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                  .sort(common.SortOrder.DESCENDING)))
    if stacked:
        p = p.stacking(cb.StackingConfig().mode(common.StackingMode.NORMAL))
    if bars:
        p = p.draw_style(common.GraphDrawStyle.BARS).fill_opacity(80)
    for t in targets:
        p = p.with_target(t)
    return p


def latency(title: str, histogram: str, description: str) -> Timeseries:
    return timeseries(
        title, "s",
        q(quantile(0.5, histogram), "p50 {{model_name}}"),
        q(quantile(0.9, histogram), "p90 {{model_name}}"),
        q(quantile(0.99, histogram), "p99 {{model_name}}"),
        q(mean(histogram), "mean {{model_name}}"),
        description=description)


def stat(title: str, unit: str, target: Dataquery, description: str = "",
         width: int = 4) -> Stat:
    return (Stat().title(title).description(description).unit(unit).span(width).height(4)
            .datasource(DATASOURCE).graph_mode(common.BigValueGraphMode.AREA)
            .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]))
            .with_target(target))


def overview() -> Dashboard:
    cache_used = f"sum {BY} (tpaserve:factor_cache_bytes_used{SEL})"
    d = (Dashboard("tpaserve overview")
         .uid("tpaserve-overview")
         .description("tpaserve: T6 serving with a paged factor cache - memory, throughput, "
                      "latency, scheduler. Built by deploy/grafana/build_dashboards.py.")
         .tags(["tpaserve", "llm-serving"])
         .editable()
         .tooltip(DashboardCursorSync.CROSSHAIR)
         .refresh("10s")
         .time("now-30m", "now")
         .timezone("browser")
         .with_variable(DatasourceVariable("datasource").label("Data source")
                        .type("prometheus"))
         .with_variable(QueryVariable("model_name").label("Model")
                        .datasource(DATASOURCE)
                        .query("label_values(tpaserve:cache_config_info, model_name)")
                        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
                        .sort(VariableSort.ALPHABETICAL_ASC)
                        .multi(True).include_all(True).all_value(".*")))

    d = (d.with_row(Row("At a glance"))
         .with_panel(stat("Running", "short", q(f"sum {BY} (tpaserve:num_requests_running{SEL})"),
                          "Sequences in the running batch."))
         .with_panel(stat("Waiting", "short", q(f"sum {BY} (tpaserve:num_requests_waiting{SEL})"),
                          "Sequences queued (preempted ones included)."))
         .with_panel(stat("Factor-cache usage", "percentunit",
                          q(f"max {BY} (tpaserve:factor_cache_usage_perc{SEL})"),
                          "Fraction of factor-cache blocks in use (the fullest replica)."))
         .with_panel(stat("Generation", "tok/s", q(rate("tpaserve:generation_tokens_total")),
                          "Generated tokens per second."))
         .with_panel(stat("TTFT p95", "s",
                          q(quantile(0.95, "tpaserve:time_to_first_token_seconds")),
                          "95th percentile of the time to first token."))
         .with_panel(stat("Cache bytes/token vs MHA", "x",
                          q(f"max {BY} (tpaserve:mha_equivalent_bytes_per_token{SEL}) / "
                            f"max {BY} (tpaserve:factor_cache_bytes_per_token{SEL})"),
                          "How many times fewer bytes per token the factor cache holds than "
                          "the KV cache of a multi-head-attention model of the same size.")))

    d = (d.with_row(Row("Factor-cache memory"))
         .with_panel(timeseries(
             "Cache bytes: used vs capacity", "bytes",
             q(cache_used, "used {{model_name}}"),
             q(f"sum {BY} (tpaserve:factor_cache_bytes_total{SEL})", "capacity {{model_name}}"),
             q(f"sum {BY} (tpaserve:mha_equivalent_cache_used_bytes{SEL})",
               "MHA would need {{model_name}}"),
             description="Bytes of the factor-cache blocks in use, all blocks, and what a "
                         "same-size MHA model's KV cache would need for the same token slots."))
         .with_panel(timeseries(
             "Cache usage", "percentunit",
             q(f"max {BY} (tpaserve:factor_cache_usage_perc{SEL})", "max {{model_name}}"),
             q(f"avg {BY} (tpaserve:factor_cache_usage_perc{SEL})", "avg {{model_name}}"),
             description="Fraction of blocks in use, fullest and mean replica.").max(1).min(0))
         .with_panel(timeseries(
             "Cache blocks", "short",
             q(f"sum {BY} (tpaserve:factor_cache_blocks_used{SEL})", "used {{model_name}}"),
             q(f"sum {BY} (tpaserve:factor_cache_blocks_total{SEL})", "total {{model_name}}"),
             description="Blocks of block_size token slots (see cache_config_info)."))
         .with_panel(timeseries(
             "Bytes per token: factor cache vs MHA", "bytes",
             q(f"max {BY} (tpaserve:factor_cache_bytes_per_token{SEL})",
               "T6 factors {{model_name}}"),
             q(f"max {BY} (tpaserve:mha_equivalent_bytes_per_token{SEL})", "MHA {{model_name}}"),
             description="layers * (R_K + R_V)(h + d_h) * itemsize against layers * 2 h d_h * "
                         "itemsize.", width=12))
         .with_panel(timeseries(
             "Saved by factorizing (vs MHA)", "bytes",
             q(f"sum {BY} (tpaserve:mha_equivalent_cache_used_bytes{SEL}) - {cache_used}",
               "{{model_name}}"),
             description="MHA-equivalent bytes minus factor-cache bytes for the blocks in "
                         "use now.", width=12)))

    d = (d.with_row(Row("Throughput"))
         .with_panel(timeseries(
             "Tokens per second", "tok/s",
             q(rate("tpaserve:prompt_tokens_total"), "prompt {{model_name}}"),
             q(rate("tpaserve:generation_tokens_total"), "generation {{model_name}}"),
             description="Prompt tokens (counted when a request returns its first output) "
                         "and generated tokens."))
         .with_panel(timeseries(
             "Finished sequences by reason", "reqps",
             q(f"sum by (model_name, finished_reason) (rate(tpaserve:request_success_total"
               f"{SEL}[$__rate_interval]))", "{{finished_reason}} {{model_name}}"),
             description="stop, length, abort (client went away), error.",
             stacked=True, bars=True))
         .with_panel(timeseries(
             "HTTP responses by route and status", "reqps",
             q(f"sum by (route, status) (rate(tpaserve:http_requests_total{SEL}"
               f"[$__rate_interval]))", "{{status}} {{route}}"),
             description="Route templates, not raw paths.", stacked=True)))

    d = (d.with_row(Row("Latency"))
         .with_panel(latency("Time to first token", "tpaserve:time_to_first_token_seconds",
                             "Arrival at the engine to the first generated token."))
         .with_panel(latency("Inter-token latency", "tpaserve:inter_token_latency_seconds",
                             "Between consecutive tokens of one sequence."))
         .with_panel(latency("End-to-end request latency", "tpaserve:e2e_request_latency_seconds",
                             "Arrival to the last token (aborted requests not included)."))
         .with_panel(latency("Queue time", "tpaserve:request_queue_time_seconds",
                             "Arrival to the first time the scheduler ran the request."))
         .with_panel(timeseries(
             "Request sizes (mean)", "short",
             q(mean("tpaserve:request_prompt_tokens"), "prompt {{model_name}}"),
             q(mean("tpaserve:request_generation_tokens"), "generation {{model_name}}"),
             description="Tokens per finished request.")))

    d = (d.with_row(Row("Scheduler"))
         .with_panel(timeseries(
             "Running and waiting", "short",
             q(f"sum {BY} (tpaserve:num_requests_running{SEL})", "running {{model_name}}"),
             q(f"sum {BY} (tpaserve:num_requests_waiting{SEL})", "waiting {{model_name}}"),
             description="Sequences (a request with n > 1 counts n)."))
         .with_panel(timeseries(
             "Preemptions", "ops",
             q(rate("tpaserve:num_preemptions_total")),
             description="Running sequences whose blocks were freed to be recomputed: the "
                         "cache is too small for the load."))
         .with_panel(timeseries(
             "Prefix-cache hit rate", "percentunit",
             q(f"{rate('tpaserve:prefix_cache_hits_total')} / "
               f"{rate('tpaserve:prefix_cache_queries_total')}"),
             description="Prompt tokens found in the prefix cache over tokens looked up."
             ).max(1).min(0))
         .with_panel(latency("Engine step time", "tpaserve:engine_step_duration_seconds",
                             "schedule + execute + update of one engine step."))
         .with_panel(timeseries(
             "Batch per step (mean)", "short",
             q(mean("tpaserve:engine_step_batch_size"), "sequences {{model_name}}"),
             q(mean("tpaserve:iteration_tokens_total"), "tokens {{model_name}}"),
             description="Sequences and tokens computed per engine step."))
         .with_panel(timeseries(
             "Engine steps per second", "ops",
             q(rate("tpaserve:engine_step_duration_seconds_count")),
             description="Steps that computed at least one token.")))
    return d


DASHBOARDS = {"tpaserve-overview.json": overview}


def render(build) -> str:
    """The dashboard's JSON. Panels get ids in order (stable links: ?viewPanel=N) and
    their queries refIds A, B, ..."""
    model = build().build()
    for i, panel in enumerate(model.panels, start=1):
        panel.id_val = i
        for j, target in enumerate(getattr(panel, "targets", None) or []):
            target.ref_id = chr(ord("A") + j)
    return JSONEncoder(sort_keys=True, indent=2).encode(model) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 if a committed dashboard differs")
    args = ap.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path, text = OUT_DIR / name, render(build)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run {Path(__file__).name}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
