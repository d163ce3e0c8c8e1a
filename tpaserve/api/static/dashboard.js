// tpaserve status page: polls /metrics, parses the Prometheus text, draws the numbers and
// three SVG charts. It reads only `tpaserve:` metrics (frontend/metrics.py defines them all),
// so it shows exactly what /metrics shows. Rates and percentiles are over the samples this
// page has seen in the last WINDOW_S seconds, as Prometheus' rate() and histogram_quantile()
// would compute them from the same scrapes.
"use strict";

const POLL_MS = 1000;       // one scrape a second: cheap (a few KB), and the charts stay live
const TIMEOUT_MS = 3000;    // a scrape slower than this counts as unreachable
const WINDOW_S = 300;       // history kept: the charts' width, the percentiles' window

// ---- Prometheus text format -> [{name, labels, value}] --------------------------------
const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
const UNESCAPE = { n: "\n", "\\": "\\", '"': '"' };

function parseValue(s) {
  if (s === "+Inf") return Infinity;
  if (s === "-Inf") return -Infinity;
  return Number(s);      // "NaN" -> NaN
}

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line.startsWith("tpaserve:")) continue;    // comments, and metrics not ours
    const m = LINE.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(LABEL))
      labels[k] = v.replace(/\\(.)/g, (_, c) => UNESCAPE[c] ?? c);
    samples.push({ name: m[1], labels, value: parseValue(m[3]) });
  }
  return samples;
}

// ---- one scrape -> the numbers the page shows ------------------------------------------
function snapshot(samples) {
  const info = samples.find(s => s.name === "tpaserve:cache_config_info");
  if (!info) return null;
  const model = info.labels.model_name;       // one engine per server: its first name
  const mine = samples.filter(s => s.labels.model_name === model);
  const get = name => mine.filter(s => s.name === name).reduce((a, s) => a + s.value, 0);
  const buckets = name => mine.filter(s => s.name === name)
    .map(s => [parseValue(s.labels.le), s.value]).sort((a, b) => a[0] - b[0]);
  // full names, so that a test can check each against frontend/metrics.py
  return {
    model, dtype: info.labels.dtype, blockSize: Number(info.labels.block_size),
    prefixCaching: info.labels.enable_prefix_caching === "true",
    running: get("tpaserve:num_requests_running"),
    waiting: get("tpaserve:num_requests_waiting"),
    usage: get("tpaserve:factor_cache_usage_perc"),
    blocksUsed: get("tpaserve:factor_cache_blocks_used"),
    blocksTotal: get("tpaserve:factor_cache_blocks_total"),
    bytesUsed: get("tpaserve:factor_cache_bytes_used"),
    bytesTotal: get("tpaserve:factor_cache_bytes_total"),
    bytesPerToken: get("tpaserve:factor_cache_bytes_per_token"),
    mhaBytesPerToken: get("tpaserve:mha_equivalent_bytes_per_token"),
    mhaBytesUsed: get("tpaserve:mha_equivalent_cache_used_bytes"),
    prompt: get("tpaserve:prompt_tokens_total"),
    gen: get("tpaserve:generation_tokens_total"),
    preemptions: get("tpaserve:num_preemptions_total"),
    prefixQueries: get("tpaserve:prefix_cache_queries_total"),
    prefixHits: get("tpaserve:prefix_cache_hits_total"),
    start: get("tpaserve:server_start_time_seconds"),
    ttft: buckets("tpaserve:time_to_first_token_seconds_bucket"),
    itl: buckets("tpaserve:inter_token_latency_seconds_bucket"),
  };
}

// histogram_quantile() over cumulative buckets [[le, count]] (Prometheus' interpolation:
// linear inside the bucket, 0 as the first bucket's lower bound, the last finite bound
// when the rank falls in +Inf). NaN when there was no observation.
function quantile(q, buckets) {
  const total = buckets.length ? buckets[buckets.length - 1][1] : 0;
  if (!(total > 0)) return NaN;
  const rank = q * total;
  let i = buckets.findIndex(([, c]) => c >= rank);
  if (buckets[i][0] === Infinity) return buckets[buckets.length - 2][0];
  const [upper, count] = buckets[i];
  const [lower, below] = i > 0 ? buckets[i - 1] : [0, 0];
  return lower + (upper - lower) * (rank - below) / (count - below);
}

const minus = (a, b) => a.map(([le, c], i) => [le, c - (b[i] ? b[i][1] : 0)]);

// ---- formatting ----------------------------------------------------------------------
function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}
const int = n => Math.round(n).toLocaleString("en-US");
const percent = f => (100 * f).toFixed(1) + " %";
const rate = r => r.toFixed(r < 10 ? 1 : 0);
function seconds(s) {
  if (Number.isNaN(s)) return "-";
  return s < 1 ? (1000 * s).toFixed(s < 0.01 ? 2 : 1) + " ms" : s.toFixed(2) + " s";
}
function duration(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + (d || h || m ? m + "m " : "") +
    (s % 60) + "s";
}

// Shows `text`; data-value keeps the number it came from, for tests and for copying.
function show(id, value, text) {
  const el = document.getElementById(id);
  el.textContent = text;
  el.dataset.value = String(value);
}

// ---- SVG line chart ------------------------------------------------------------------
const SVG = "http://www.w3.org/2000/svg";

function svgEl(parent, tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  parent.appendChild(el);
  return el;
}

function niceMax(v) {   // 1, 2, 4, 6, 8 x 10^k at or above v: its half is round too
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  return [1, 2, 4, 6, 8, 10].map(m => m * p).find(m => m >= v);
}

// series: [{cls, points: [[t_ms, value]]}]; x: the last `span` ms up to now; y from 0 to
// fixedMax, or to a round number at or above both the data and minMax.
function drawChart(svg, series, now, span, format, { fixedMax, minMax = 0 } = {}) {
  const w = Math.max(svg.clientWidth, 200), h = Math.max(svg.clientHeight, 100);
  const left = 44, bottom = 16, top = 6;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const max = fixedMax ??
    niceMax(Math.max(minMax, ...series.flatMap(s => s.points.map(p => p[1]))));
  const x = t => left + (w - left - 4) * (1 - (now - t) / span);
  const y = v => top + (h - top - bottom) * (1 - v / max);
  for (const f of [0, 0.5, 1]) {
    svgEl(svg, "line", { class: "grid", x1: left, x2: w, y1: y(f * max), y2: y(f * max) });
    svgEl(svg, "text", { x: left - 4, y: y(f * max) + 4, "text-anchor": "end" }, format(f * max));
  }
  for (const [label, t] of [[`-${span / 60000} min`, now - span], ["now", now]])
    svgEl(svg, "text", { x: x(t), y: h - 2, "text-anchor": t === now ? "end" : "start" }, label);
  for (const s of series)
    svgEl(svg, "polyline", { class: s.cls,
      points: s.points.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ") });
}

// ---- the loop ------------------------------------------------------------------------
const history = [];    // [{t: ms (performance.now), s: snapshot}], the last WINDOW_S seconds
let lastOk = null;     // Date of the last good scrape
let polls = 0;

function render(s, serverNow, now) {
  const base = history[0].s, prev = history.length > 1 ? history[history.length - 2] : null;
  show("model", s.model, s.model);
  show("cache-usage", s.usage, percent(s.usage));
  document.getElementById("cache-bar").style.width = percent(s.usage).replace(" ", "");
  show("cache-bytes-used", s.bytesUsed, bytes(s.bytesUsed));
  show("cache-bytes-total", s.bytesTotal, bytes(s.bytesTotal));
  show("cache-blocks-used", s.blocksUsed, int(s.blocksUsed));
  show("cache-blocks-total", s.blocksTotal, int(s.blocksTotal));
  show("block-size", s.blockSize, int(s.blockSize));
  show("tpa-bytes", s.bytesUsed, bytes(s.bytesUsed));
  show("mha-bytes-used", s.mhaBytesUsed, bytes(s.mhaBytesUsed));
  const mhaScale = Math.max(s.mhaBytesUsed, 1);
  document.getElementById("tpa-bar").style.width = (100 * s.bytesUsed / mhaScale) + "%";
  document.getElementById("mha-bar").style.width = (s.mhaBytesUsed > 0 ? 100 : 0) + "%";
  const saving = s.mhaBytesPerToken / s.bytesPerToken;
  show("tpa-saving", saving, saving.toFixed(1) + "x");
  show("tpa-bytes-per-token", s.bytesPerToken, bytes(s.bytesPerToken) + "/token");
  show("mha-bytes-per-token", s.mhaBytesPerToken, bytes(s.mhaBytesPerToken) + "/token");

  const dt = prev ? (now - prev.t) / 1000 : 0;
  const promptRate = dt > 0 ? (s.prompt - prev.s.prompt) / dt : 0;
  const genRate = dt > 0 ? (s.gen - prev.s.gen) / dt : 0;
  history[history.length - 1].rates = [promptRate, genRate];
  show("prompt-rate", promptRate, rate(promptRate));
  show("gen-rate", genRate, rate(genRate));
  show("prompt-total", s.prompt, int(s.prompt));
  show("gen-total", s.gen, int(s.gen));
  show("running", s.running, int(s.running));
  show("waiting", s.waiting, int(s.waiting));
  show("preemptions", s.preemptions, int(s.preemptions));
  const queries = s.prefixQueries - base.prefixQueries;
  const hitRate = queries > 0 ? (s.prefixHits - base.prefixHits) / queries : NaN;
  show("prefix-hit-rate", hitRate, !s.prefixCaching ? "off" :
    Number.isNaN(hitRate) ? "no lookups" : percent(hitRate));
  for (const hist of ["ttft", "itl"]) {
    const window = minus(s[hist], base[hist]);
    for (const q of [50, 95]) {
      const v = quantile(q / 100, window);
      show(`${hist}-p${q}`, v, seconds(v));
    }
  }
  show("window", (now - history[0].t) / 1000,
    `last ${duration(Math.min(WINDOW_S, (now - history[0].t) / 1000))}`);
  show("dtype", s.dtype, s.dtype);
  show("prefix-caching", s.prefixCaching, s.prefixCaching ? "on" : "off");
  const up = serverNow / 1000 - s.start;
  show("uptime", up, duration(up));

  // the charts span what the page has seen, at least a minute (then WINDOW_S)
  const span = Math.min(WINDOW_S, Math.max(60, Math.ceil((now - history[0].t) / 60000) * 60));
  const pts = f => history.map(h => [h.t, f(h)]);
  drawChart(document.getElementById("chart-tokens"), [
    { cls: "prompt", points: pts(h => h.rates ? h.rates[0] : 0) },
    { cls: "gen", points: pts(h => h.rates ? h.rates[1] : 0) }], now, span * 1000, rate,
  { minMax: 10 });
  drawChart(document.getElementById("chart-requests"), [
    { cls: "running", points: pts(h => h.s.running) },
    { cls: "waiting", points: pts(h => h.s.waiting) }], now, span * 1000, int, { minMax: 2 });
  drawChart(document.getElementById("chart-cache"), [
    { cls: "usage", points: pts(h => h.s.usage) }], now, span * 1000,
  f => (100 * f).toFixed(0) + "%", { fixedMax: 1 });
}

function setState(state, message) {
  document.body.dataset.state = state;
  document.getElementById("state").textContent = state;
  const banner = document.getElementById("banner");
  banner.hidden = !message;
  banner.textContent = message || "";
}

async function poll() {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), TIMEOUT_MS);
  try {
    const r = await fetch("metrics", { cache: "no-store", signal: abort.signal });
    if (!r.ok) throw new Error(`/metrics answered ${r.status}`);
    const s = snapshot(parseMetrics(await r.text()));
    if (!s) throw new Error("/metrics shows no tpaserve metrics");
    const now = performance.now();
    // a restarted server: its counters went back; the old history would give negative rates
    const last = history[history.length - 1];
    if (last && (s.start !== last.s.start || s.gen < last.s.gen)) history.length = 0;
    history.push({ t: now, s });
    while (history.length > 1 && now - history[0].t > WINDOW_S * 1000) history.shift();
    // the server's clock for the uptime (its Date header): the browser's may be off
    const serverNow = Date.parse(r.headers.get("Date")) || Date.now();
    render(s, serverNow, now);
    lastOk = new Date();
    polls += 1;
    document.body.dataset.polls = String(polls);
    setState("live", "");
  } catch (err) {
    const since = lastOk ? ` (last data at ${lastOk.toLocaleTimeString()})` : "";
    setState("unreachable", `Server unreachable${since}: ${err.name === "AbortError" ?
      "no answer within " + TIMEOUT_MS / 1000 + " s" : err.message}. Retrying every second.`);
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

poll();
