// Traces: search requests by id and time, and read one request's full trace (route, timings,
// sampling, tokens, guardrails, the model's provenance) with its retained content if any.

import { h, clear, badge, fmtMs, fmtInt, fmtTime, fmtCost, toLocalInput, fromLocalInput, statusBadge, table, errorBox, empty } from '../dom.js';
import { api, qs } from '../api.js';
import { partsBar } from '../charts.js';

let search = { id: '', from: null, to: null };

export async function render(main, { args }) {
  if (args[0]) return detail(main, args[0]);
  const now = Date.now();
  const id = h('input#trace-id', { type: 'search', placeholder: 'req_… (the x-request-id of a response, or its start)', value: search.id });
  const from = h('input#trace-from', { type: 'datetime-local', value: toLocalInput(search.from || now - 86400e3) });
  const to = h('input#trace-to', { type: 'datetime-local', value: search.to ? toLocalInput(search.to) : '' });
  const results = h('section.card#trace-results');
  const form = h('form.card.toolbar',
    h('label.inline-field.grow', h('span.label', 'Request id'), id),
    h('label.inline-field', h('span.label', 'From'), from),
    h('label.inline-field', h('span.label', 'To'), to),
    h('button.primary', { type: 'submit' }, 'Search'));
  main.append(
    h('header.page-head', h('div', h('h1', 'Traces'), h('p.muted', 'What happened to each request: route, timings, sampling, tokens and the model’s provenance.'))),
    form, results,
  );
  form.addEventListener('submit', (e) => { e.preventDefault(); load(); });

  async function load() {
    search = { id: id.value.trim(), from: fromLocalInput(from.value), to: fromLocalInput(to.value) };
    clear(results).append(h('div.loading', 'Searching…'));
    try {
      const list = await api(`/admin/v1/traces${qs({ id: search.id, from: search.id ? undefined : search.from, to: search.to, limit: 200 })}`);
      clear(results).append(
        h('header.card-head', h('h2', `${list.data.length === 200 ? 'Latest 200' : list.data.length} request${list.data.length === 1 ? '' : 's'}`), search.id ? h('span.muted', 'matching the id, at any time') : null),
        table([
          { label: 'Time', cell: (r) => fmtTime(r.created_at, true) },
          { label: 'Request', cell: (r) => h('code', r.request_id) },
          { label: 'Route', cell: (r) => r.route },
          { label: 'Model', cell: (r) => r.model },
          { label: 'Status', cell: (r) => h('span', statusBadge(r.status), ' ', h('span.muted', r.http_status || '')) },
          { label: 'Tokens', class: 'num', cell: (r) => `${fmtInt(r.prompt_tokens)} → ${fmtInt(r.completion_tokens)}` },
          { label: 'Latency', class: 'num', cell: (r) => fmtMs(r.total_ms) },
        ], list.data, { onRow: (r) => { location.hash = `#/traces/${encodeURIComponent(r.request_id)}`; }, emptyText: 'No traces match. Traces are kept for --trace-retention-hours (72 by default).' }));
    } catch (err) {
      clear(results).append(errorBox(err));
    }
  }
  await load();
}

function kv(pairs) {
  const items = pairs.filter(([, v]) => v !== undefined);
  if (!items.length) return empty('None.');
  return h('dl.props', items.map(([k, v]) => [h('dt', k), h('dd', v === null || v === '' ? h('span.muted', '—') : v)]));
}

function json(value) {
  return typeof value === 'object' && value !== null ? JSON.stringify(value) : String(value);
}

async function fetchTrace(id) {
  // A trace is written just after its response ends: a fresh one may take a moment.
  for (let attempt = 0; ; attempt++) {
    try {
      return await api(`/v1/traces/${encodeURIComponent(id)}`);
    } catch (err) {
      if (err.status !== 404 || attempt >= 6) throw err;
      await new Promise((r) => setTimeout(r, 400));
    }
  }
}

async function detail(main, id) {
  main.append(h('header.page-head', h('div', h('a.link.back', { href: '#/traces' }, '← Traces'), h('h1', 'Trace'), h('p', h('code#trace-request-id', id)))));
  const body = h('div.stack', h('div.loading', 'Loading…'));
  main.append(body);
  let t;
  try {
    t = await fetchTrace(id);
  } catch (err) {
    clear(body).append(errorBox(err));
    return;
  }
  const timings = t.timings || {};
  const tokens = t.tokens || {};
  const routing = t.routing || {};
  const guard = t.guardrails || {};
  const card = t.model_card;
  const content = h('div', h('button.ghost.small', { type: 'button', onclick: loadContent }, 'Show retained prompt and answer'));

  async function loadContent() {
    try {
      const c = await api(`/admin/v1/requests/${encodeURIComponent(id)}/content`);
      const pretty = (s) => { try { return JSON.stringify(JSON.parse(s), null, 2); } catch { return s; } };
      clear(content).append(h('h3', 'Request'), h('pre.code', pretty(c.request)), h('h3', 'Response'), h('pre.code', pretty(c.response)));
    } catch (err) {
      clear(content).append(h('p.muted', err.status === 404 ? 'Not retained: this request’s tenant does not keep content (or it was purged).' : err.message));
    }
  }

  const timingParts = [
    { name: 'queue', value: timings.queue_ms, color: '#94a3b8' },
    { name: 'prefill', value: timings.prefill_ms, color: '#6366f1' },
    { name: 'decode', value: timings.decode_ms, color: '#14b8a6' },
  ];
  const hasEngine = timingParts.some((p) => p.value != null);
  clear(body).append(
    h('div.stats',
      h('div.stat', h('div.stat-label', 'Status'), h('div.stat-value', statusBadge(t.status), ' ', h('span.muted', t.http_status || '')), h('div.stat-sub', t.route)),
      h('div.stat', h('div.stat-label', 'Model'), h('div.stat-value.small', t.model || '—'), h('div.stat-sub', routing.provider || '')),
      h('div.stat', h('div.stat-label', 'Latency'), h('div.stat-value', fmtMs(timings.total_ms)), h('div.stat-sub', `first token ${fmtMs(timings.first_token_ms)}`)),
      h('div.stat', h('div.stat-label', 'Tokens'), h('div.stat-value', `${fmtInt(tokens.prompt)} → ${fmtInt(tokens.completion)}`), h('div.stat-sub', `cost ${fmtCost(t.cost)}${tokens.cached ? ` · ${fmtInt(tokens.cached)} cached` : ''}`))),
    h('div.grid-2',
      h('section.card', h('h2', 'Timings'),
        hasEngine ? partsBar(timingParts, fmtMs) : null,
        kv([['Total', fmtMs(timings.total_ms)], ['First token', fmtMs(timings.first_token_ms)], ['Queue', timings.queue_ms != null ? fmtMs(timings.queue_ms) : undefined],
          ['Prefill', timings.prefill_ms != null ? fmtMs(timings.prefill_ms) : undefined], ['Decode', timings.decode_ms != null ? fmtMs(timings.decode_ms) : undefined],
          ['Upstream', timings.upstream_ms != null ? fmtMs(timings.upstream_ms) : undefined]])),
      h('section.card', h('h2', 'Route'),
        kv([['Provider', routing.provider], ['Target', routing.target], ['Attempts', routing.attempts], ['Fallbacks', routing.fallbacks],
          ['Cache', routing.cache_hit ? badge('hit', 'ok') : 'miss'], ['Tenant', t.tenant_id ? h('code', t.tenant_id) : null],
          ['Project', t.project_id ? h('code', t.project_id) : null], ['Key', t.key_id ? h('code', t.key_id) : null]])),
      h('section.card', h('h2', 'Sampling (as sent)'),
        kv(Object.entries(t.sampling || {}).map(([k, v]) => [k, json(v)]))),
      h('section.card', h('h2', 'Guardrails'),
        kv([['Policy', guard.policy || h('span.muted', 'none')], ...Object.entries(guard.counts || {}).map(([k, n]) => [k, String(n)])]))),
    card ? h('section.card', h('h2', 'Model provenance'),
      kv([['Model', card.id], ['Architecture', card.architecture], ['Parameters', card.n_params ? fmtInt(card.n_params) : null], ['File', card.path ? h('code', card.path) : null],
        ['Quantization', card.quantization], ['Licence', card.license], ['Source', card.source], ['SHA-256', card.sha256 ? h('code.hash', card.sha256) : null]])) : null,
    h('section.card', h('h2', 'Content'), content),
    h('details.card.raw', h('summary', 'Raw trace (JSON)'), h('pre.code', JSON.stringify(t, null, 2))),
  );
}
