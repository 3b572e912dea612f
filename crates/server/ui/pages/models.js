// Models: what this server serves, each model's state and provenance (file hash,
// architecture, size, quantization, licence, source), then gateway aliases and presets.

import { h, clear, badge, fmtBytes, fmtCompact, fmtInt, errorBox, table, toast } from '../dom.js';
import { api, session } from '../api.js';

function row(label, value) {
  return [h('dt', label), h('dd', value === null || value === undefined || value === '' ? h('span.muted', '—') : value)];
}

const STATE_TEXT = { loaded: 'loaded', loading: 'loading…', on_disk: 'on disk' };

function stateBadge(state) {
  return badge(STATE_TEXT[state] || state || 'unknown', state === 'loaded' ? 'ok' : state === 'loading' ? 'warn' : '');
}

function copyable(text) {
  const code = h('code.hash', text);
  const button = h('button.ghost.small', { type: 'button', onclick: async () => {
    try { await navigator.clipboard.writeText(text); toast('Copied'); } catch { window.getSelection().selectAllChildren(code); }
  } }, 'Copy');
  return h('span.copyable', code, button);
}

/** Load or unload buttons, for admins, on generation models. */
function actions(m, reload) {
  if (m.type === 'embedding' || !session.me || session.me.role !== 'admin') return null;
  const act = async (action, button) => {
    button.disabled = true;
    button.textContent = action === 'load' ? 'Loading…' : 'Unloading…';
    try {
      const card = await api(`/admin/v1/models/${encodeURIComponent(m.id)}/${action}`, { method: 'POST' });
      toast(`${m.id} is ${STATE_TEXT[card.state] || card.state}`);
    } catch (err) {
      toast(err.message, 'bad');
    }
    reload();
  };
  if (m.state === 'loaded') {
    const button = h('button.ghost.small.model-unload', { type: 'button', onclick: () => act('unload', button) }, 'Unload');
    return h('div.card-actions', button);
  }
  if (m.state === 'on_disk') {
    const button = h('button.small.model-load', { type: 'button', onclick: () => act('load', button) }, 'Load');
    return h('div.card-actions', button);
  }
  return null;
}

function localCard(m, reload) {
  const embedding = m.type === 'embedding';
  return h('section.card.model-card', { dataset: { model: m.id, state: m.state || '' } },
    h('header.card-head', h('div', h('h2', m.id), h('div.muted', embedding ? 'sentence embeddings' : m.name || '')),
      h('div.card-head-side', stateBadge(m.state), actions(m, reload))),
    h('dl.props',
      embedding ? null : row('File', m.file),
      embedding ? null : row('Memory', m.memory_bytes ? `${fmtBytes(m.memory_bytes)}${m.state === 'loaded' ? '' : ' when loaded'} (weights and KV cache)` : null),
      m.last_error ? row('Last load', h('span.bad-text', m.last_error)) : null,
      row('Architecture', m.architecture),
      embedding ? row('Dimensions', fmtInt(m.dimensions)) : row('Parameters', m.parameters ? fmtCompact(m.parameters) : null),
      embedding ? null : row('Quantization', m.quantization),
      embedding ? null : row('File size', fmtBytes(m.file_size)),
      row('Context', m.context_length ? `${fmtInt(m.context_length)} tokens${m.n_ctx_train ? ` per sequence (trained on ${fmtInt(m.n_ctx_train)})` : ''}` : null),
      embedding ? null : row('Parallel sequences', m.parallel_sequences),
      embedding ? null : row('Layers × width', m.n_layer ? `${m.n_layer} × ${fmtInt(m.n_embd)}` : null),
      row('Vocabulary', fmtInt(m.n_vocab || m.vocab_size)),
      embedding ? null : row('Chat template', m.has_chat_template ? 'from the GGUF file' : 'none (completions only)'),
      embedding ? null : row('Licence', m.license),
      embedding ? null : row('Source', m.source),
      embedding ? null : row('SHA-256', m.sha256 ? copyable(m.sha256) : h('span.muted', m.state === 'loaded' ? 'being computed…' : 'computed after the first load')),
    ),
  );
}

export async function render(main) {
  const body = h('div.stack');
  main.append(
    h('header.page-head', h('div', h('h1', 'Models'), h('p.muted', 'Each configured model with its state and the provenance of its file. A model on disk loads on its first request (or with Load); the least recently used is unloaded when --max-loaded-models or --memory-budget would be exceeded.'))),
    body,
  );
  await fill(body);
}

async function fill(body) {
  let list;
  try {
    list = (await api('/v1/models')).data;
  } catch (err) {
    clear(body).append(errorBox(err));
    return;
  }
  const reload = () => fill(body);
  const local = list.filter((m) => m.owned_by === 'ferry');
  const aliases = list.filter((m) => m.owned_by === 'ferry-gateway');
  const presets = list.filter((m) => m.owned_by === 'ferry-preset');
  clear(body).append(
    h('div.grid-fill', local.map((m) => localCard(m, reload))),
    h('div.grid-2', h('section.card',
      h('header.card-head', h('h2', 'Gateway aliases'), h('span.muted', 'upstream providers behind one name')),
      table([
        { label: 'Alias', cell: (m) => h('b', m.id) },
        { label: 'State', cell: () => badge('routed', 'info') },
      ], aliases, { emptyText: 'No aliases configured ([[aliases]] in the config file).' })),
    h('section.card',
      h('header.card-head', h('h2', 'Presets'), h('span.muted', 'virtual models over a model or an alias')),
      table([
        { label: 'Preset', cell: (m) => h('b', m.id) },
        { label: 'Base', cell: (m) => m.base },
        { label: 'Description', cell: (m) => m.description },
        { label: 'Guardrail policy', cell: (m) => m.guardrail_policy || h('span.muted', 'none') },
      ], presets, { emptyText: 'No presets configured ([[presets]] in the config file).' }))),
  );
}
