// Overview: requests, tokens, errors and latency percentiles over time, headline numbers
// for the range, and the latest requests.

import { h, clear, fmtCompact, fmtInt, fmtMs, fmtTime, statusBadge, errorBox, table } from '../dom.js';
import { api, qs } from '../api.js';
import { timeChart } from '../charts.js';

const RANGES = [
  { id: '1h', label: 'Last hour', bucket: 'minute', span: 3600e3 },
  { id: '24h', label: 'Last 24 hours', bucket: 'hour', span: 24 * 3600e3 },
  { id: '30d', label: 'Last 30 days', bucket: 'day', span: 30 * 86400e3 },
];

let chosen = '1h';

export async function render(main) {
  const body = h('div.stack');
  const refresh = h('button.ghost', { type: 'button', onclick: () => load() }, 'Refresh');
  const tabs = h('div.segmented', { role: 'tablist' }, RANGES.map((r) => h('button', {
    type: 'button', role: 'tab', dataset: { range: r.id },
    'aria-selected': String(r.id === chosen),
    onclick: () => { chosen = r.id; for (const b of tabs.children) b.setAttribute('aria-selected', String(b.dataset.range === chosen)); load(); },
  }, r.label)));
  main.append(
    h('header.page-head', h('div', h('h1', 'Overview'), h('p.muted', 'Traffic, tokens, errors and latency across this server.')), h('div.actions', tabs, refresh)),
    body,
  );

  async function load() {
    const range = RANGES.find((r) => r.id === chosen);
    const to = Date.now();
    try {
      const [series, recent] = await Promise.all([
        api(`/admin/v1/usage/series${qs({ bucket: range.bucket, from: to - range.span, to })}`),
        api(`/admin/v1/traces${qs({ limit: 8 })}`),
      ]);
      draw(series, recent.data);
    } catch (err) {
      clear(body).append(errorBox(err));
    }
  }

  function draw(series, recent) {
    const points = series.data;
    const times = points.map((p) => p.start);
    const t = series.total;
    const errorRate = t.requests ? (100 * t.errors) / t.requests : 0;
    const stat = (label, value, sub, kind = '') => h('div.stat', { class: kind }, h('div.stat-label', label), h('div.stat-value', value), h('div.stat-sub', sub));
    const col = (name) => points.map((p) => p[name]);
    clear(body).append(
      h('div.stats',
        stat('Requests', fmtInt(t.requests), `${fmtCompact(t.requests / Math.max(1, points.length))} per ${series.bucket} on average`),
        stat('Errors', `${errorRate.toFixed(errorRate && errorRate < 1 ? 2 : 1)}%`, `${fmtInt(t.errors)} failed`, t.errors ? 'bad' : ''),
        stat('Tokens', fmtCompact(t.prompt_tokens + t.completion_tokens), `${fmtCompact(t.prompt_tokens)} prompt · ${fmtCompact(t.completion_tokens)} completion`),
        stat('Latency p50 / p95', `${fmtMs(t.latency_p50_ms)} / ${fmtMs(t.latency_p95_ms)}`, `first token p50 ${fmtMs(t.ttft_p50_ms)}`),
      ),
      h('div.grid-2',
        timeChart({ title: 'Requests', times, bucketMs: series.bucket_ms, kind: 'bars', format: fmtCompact, series: [
          { name: 'succeeded', color: '#6366f1', values: points.map((p) => p.requests - p.errors) },
          { name: 'errors', color: '#ef4444', values: col('errors') },
        ] }),
        timeChart({ title: 'Tokens', times, bucketMs: series.bucket_ms, kind: 'bars', format: fmtCompact, series: [
          { name: 'prompt', color: '#0ea5e9', values: col('prompt_tokens') },
          { name: 'completion', color: '#14b8a6', values: col('completion_tokens') },
        ] }),
        timeChart({ title: 'Latency', times, bucketMs: series.bucket_ms, kind: 'lines', format: fmtMs, series: [
          { name: 'p50', color: '#6366f1', values: col('latency_p50_ms') },
          { name: 'p95', color: '#f59e0b', values: col('latency_p95_ms') },
          { name: 'p99', color: '#ef4444', values: col('latency_p99_ms') },
          { name: 'first token p50', color: '#14b8a6', values: col('ttft_p50_ms') },
        ] }),
        timeChart({ title: 'Error rate', times, bucketMs: series.bucket_ms, kind: 'lines', format: (v) => `${Math.round(v * 10) / 10}%`, series: [
          { name: 'errors / requests', color: '#ef4444', values: points.map((p) => (p.requests ? (100 * p.errors) / p.requests : null)) },
        ] }),
      ),
      h('section.card',
        h('header.card-head', h('h2', 'Latest requests'), h('a.link', { href: '#/traces' }, 'All traces →')),
        table([
          { label: 'Time', cell: (r) => fmtTime(r.created_at, true) },
          { label: 'Request', cell: (r) => h('code', r.request_id) },
          { label: 'Route', cell: (r) => r.route },
          { label: 'Model', cell: (r) => r.model },
          { label: 'Status', cell: (r) => statusBadge(r.status) },
          { label: 'Tokens', class: 'num', cell: (r) => fmtInt((r.prompt_tokens || 0) + (r.completion_tokens || 0)) },
          { label: 'Latency', class: 'num', cell: (r) => fmtMs(r.total_ms) },
        ], recent, { onRow: (r) => { location.hash = `#/traces/${encodeURIComponent(r.request_id)}`; }, emptyText: 'No requests yet. Try the playground.' }),
      ),
    );
  }

  await load();
  const timer = setInterval(() => { if (!document.hidden && !document.querySelector('dialog[open]')) load(); }, 15000);
  return () => clearInterval(timer);
}
