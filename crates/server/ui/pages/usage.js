// Usage by model, key, day (and tenant, project) over a date range, with CSV export of
// exactly what is shown.

import { h, clear, fmtInt, fmtCompact, fmtCost, toLocalInput, fromLocalInput, table, errorBox, toast } from '../dom.js';
import { api, request, directory, qs } from '../api.js';

const GROUPS = [
  { id: 'model', label: 'Model' },
  { id: 'key', label: 'Key' },
  { id: 'day', label: 'Day' },
  { id: 'project', label: 'Project' },
  { id: 'tenant', label: 'Tenant' },
];

let chosen = ['model', 'key', 'day'];

export async function render(main, { me }) {
  const now = Date.now();
  const from = h('input#usage-from', { type: 'datetime-local', value: toLocalInput(now - 7 * 86400e3) });
  const to = h('input#usage-to', { type: 'datetime-local', value: toLocalInput(now + 60e3) });
  const groups = GROUPS.filter((g) => me.role === 'admin' || g.id !== 'tenant').map((g) => h('label.chip',
    h('input', { type: 'checkbox', value: g.id, checked: chosen.includes(g.id), onchange: () => { chosen = selected(); load(); } }), g.label));
  const selected = () => groups.map((l) => l.firstChild).filter((c) => c.checked).map((c) => c.value);
  const exportButton = h('button.ghost#export-csv', { type: 'button', onclick: exportCsv }, 'Export CSV');
  const body = h('div.stack');
  main.append(
    h('header.page-head', h('div', h('h1', 'Usage'), h('p.muted', 'Requests, tokens and cost, grouped as you choose.')), h('div.actions', exportButton)),
    h('section.card.toolbar',
      h('div.toolbar-group', h('span.label', 'Group by'), h('div.chips', groups)),
      h('div.toolbar-group', field2('From', from), field2('To', to), h('button.primary', { type: 'button', onclick: () => load() }, 'Apply'))),
    body,
  );

  function field2(label, input) {
    return h('label.inline-field', h('span.label', label), input);
  }

  const params = (format) => qs({ group_by: chosen.join(','), from: fromLocalInput(from.value), to: fromLocalInput(to.value), format });

  async function load() {
    let rows;
    let dir;
    try {
      [rows, dir] = await Promise.all([api(`/admin/v1/usage${params()}`), directory()]);
    } catch (err) {
      clear(body).append(errorBox(err));
      return;
    }
    const data = rows.data;
    const total = data.reduce((t, r) => ({
      requests: t.requests + r.requests, errors: t.errors + r.errors, prompt_tokens: t.prompt_tokens + r.prompt_tokens,
      completion_tokens: t.completion_tokens + r.completion_tokens, cost: t.cost + r.cost,
    }), { requests: 0, errors: 0, prompt_tokens: 0, completion_tokens: 0, cost: 0 });
    const maxTokens = Math.max(1, ...data.map((r) => r.prompt_tokens + r.completion_tokens));
    const named = (id) => (id ? h('span', dir.name(id) || h('span.muted', 'deleted'), ' ', h('code.faint', id)) : h('span.muted', 'none (no key)'));
    const columns = [
      ...chosen.map((g) => ({
        model: { label: 'Model', class: 'nowrap', cell: (r) => r.model },
        key: { label: 'Key', cell: (r) => named(r.key_id) },
        day: { label: 'Day', class: 'nowrap', cell: (r) => r.day },
        project: { label: 'Project', cell: (r) => named(r.project_id) },
        tenant: { label: 'Tenant', cell: (r) => named(r.tenant_id) },
      }[g])),
      { label: 'Requests', class: 'num', cell: (r) => fmtInt(r.requests) },
      { label: 'Errors', class: 'num', cell: (r) => (r.errors ? h('span.bad-text', fmtInt(r.errors)) : '0') },
      { label: 'Prompt', class: 'num', cell: (r) => fmtInt(r.prompt_tokens) },
      { label: 'Completion', class: 'num', cell: (r) => fmtInt(r.completion_tokens) },
      { label: 'Tokens', class: 'bar-cell', cell: (r) => {
        const bar = h('span.mini-bar');
        bar.style.width = `${(100 * (r.prompt_tokens + r.completion_tokens)) / maxTokens}%`;
        return h('span.mini-bar-track', bar);
      } },
      { label: 'Cost', class: 'num', cell: (r) => fmtCost(r.cost) },
    ];
    clear(body).append(
      h('div.stats',
        h('div.stat', h('div.stat-label', 'Requests'), h('div.stat-value', fmtInt(total.requests)), h('div.stat-sub', `${fmtInt(total.errors)} error${total.errors === 1 ? '' : 's'}`)),
        h('div.stat', h('div.stat-label', 'Prompt tokens'), h('div.stat-value', fmtCompact(total.prompt_tokens)), h('div.stat-sub', fmtInt(total.prompt_tokens))),
        h('div.stat', h('div.stat-label', 'Completion tokens'), h('div.stat-value', fmtCompact(total.completion_tokens)), h('div.stat-sub', fmtInt(total.completion_tokens))),
        h('div.stat', h('div.stat-label', 'Cost'), h('div.stat-value', fmtCost(total.cost)), h('div.stat-sub', 'from the price table'))),
      h('section.card#usage-table',
        h('header.card-head', h('h2', `${fmtInt(data.length)} row${data.length === 1 ? '' : 's'}`), h('span.muted', chosen.length ? `by ${chosen.join(', ')}` : 'all usage together')),
        table(columns, data, { emptyText: 'No usage in this range.' })),
    );
  }

  async function exportCsv() {
    try {
      const response = await request(`/admin/v1/usage${params('csv')}`);
      const blob = await response.blob();
      const link = h('a', { href: URL.createObjectURL(blob), download: `ferry-usage-${new Date().toISOString().slice(0, 10)}.csv` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (err) {
      toast(err.message, 'bad');
    }
  }

  await load();
}
