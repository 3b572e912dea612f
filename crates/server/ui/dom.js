// Small DOM helpers shared by the pages: an element builder, formatters and a tooltip.

/** h('div.card#x', {onclick, title, ...}, child, [children], 'text') → an element. */
export function h(spec, attrs, ...children) {
  if (attrs === null || typeof attrs !== 'object' || attrs instanceof Node || Array.isArray(attrs)) {
    if (attrs !== undefined) children.unshift(attrs);
    attrs = {};
  }
  const tag = /^[a-z0-9]*/i.exec(spec)[0] || 'div';
  const id = /#([\w-]+)/.exec(spec);
  const classes = [...spec.matchAll(/\.([\w-]+)/g)].map((m) => m[1]);
  const el = document.createElement(tag);
  if (id) el.id = id[1];
  if (classes.length) el.className = classes.join(' ');
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'class') el.classList.add(...String(value).split(' ').filter(Boolean));
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name === 'value') el.value = value;
    else if (name === 'checked') el.checked = value;
    else el.setAttribute(name, value === true ? '' : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : String(child));
  }
}

/** An SVG element with attributes. */
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null) el.setAttribute(name, value);
  }
  for (const child of children.flat()) if (child) el.append(child);
  return el;
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });

export function fmtInt(n) {
  return n === null || n === undefined ? '—' : integer.format(n);
}

/** 1234567 → 1.2M */
export function fmtCompact(n) {
  if (n === null || n === undefined) return '—';
  const abs = Math.abs(n);
  if (abs >= 1e9) return (n / 1e9).toFixed(abs >= 1e10 ? 0 : 1) + 'B';
  if (abs >= 1e6) return (n / 1e6).toFixed(abs >= 1e7 ? 0 : 1) + 'M';
  if (abs >= 1e4) return (n / 1e3).toFixed(0) + 'k';
  if (abs >= 1e3) return (n / 1e3).toFixed(1) + 'k';
  return String(Math.round(n * 100) / 100);
}

export function fmtMs(ms) {
  if (ms === null || ms === undefined) return '—';
  if (ms >= 10000) return (ms / 1000).toFixed(1) + ' s';
  if (ms >= 1000) return (ms / 1000).toFixed(2) + ' s';
  return Math.round(ms) + ' ms';
}

export function fmtCost(c) {
  if (!c) return '0';
  return c < 0.01 ? c.toPrecision(2) : c.toFixed(2);
}

export function fmtBytes(n) {
  if (!n) return '—';
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtTime(ms, withSeconds = false) {
  if (!ms) return '—';
  const d = new Date(ms);
  const opts = { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit' };
  if (d.getFullYear() !== new Date().getFullYear()) opts.year = 'numeric';
  if (withSeconds) opts.second = '2-digit';
  return d.toLocaleString(undefined, opts);
}

/** `new Date` for a datetime-local input's value, and back. */
export function toLocalInput(ms) {
  const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 16);
}

export function fromLocalInput(value) {
  return value ? new Date(value).getTime() : undefined;
}

export function badge(text, kind = '') {
  return h('span.badge', { class: kind }, text);
}

export function statusBadge(status) {
  const kind = { ok: 'ok', error: 'bad', interrupted: 'bad', cancelled: 'warn', started: 'info' }[status] || '';
  return badge(status || '—', kind);
}

/** A message at the top of the page that fades away. */
export function toast(message, kind = 'ok') {
  let box = document.getElementById('toasts');
  if (!box) { box = h('div#toasts'); document.body.append(box); }
  const item = h('div.toast', { class: kind, role: 'status' }, message);
  box.append(item);
  setTimeout(() => item.remove(), kind === 'bad' ? 8000 : 4000);
}

let tipEl;
/** Shows `content()` (a node or text) next to `target` while hovered or focused. */
export function tooltip(target, content) {
  const show = () => {
    if (!tipEl) { tipEl = h('div.tooltip', { role: 'tooltip' }); document.body.append(tipEl); }
    clear(tipEl).append(content());
    tipEl.hidden = false;
    const r = target.getBoundingClientRect();
    const t = tipEl.getBoundingClientRect();
    let left = Math.min(window.innerWidth - t.width - 8, Math.max(8, r.left + r.width / 2 - t.width / 2));
    let top = r.bottom + 6;
    if (top + t.height > window.innerHeight - 8) top = r.top - t.height - 6;
    tipEl.style.left = `${left}px`;
    tipEl.style.top = `${top + window.scrollY}px`;
  };
  const hide = () => { if (tipEl) tipEl.hidden = true; };
  target.addEventListener('mouseenter', show);
  target.addEventListener('mouseleave', hide);
  target.addEventListener('focus', show);
  target.addEventListener('blur', hide);
}

/** A modal dialog; resolves when closed. `build(close)` returns its body. */
export function modal(title, build, { wide = false } = {}) {
  return new Promise((resolve) => {
    const dialog = h('dialog.modal', { class: wide ? 'wide' : '' });
    const close = (value) => { dialog.close(); dialog.remove(); resolve(value); };
    dialog.append(
      h('header', h('h2', title), h('button.icon', { type: 'button', 'aria-label': 'Close', onclick: () => close() }, '×')),
      build(close),
    );
    dialog.addEventListener('cancel', (e) => { e.preventDefault(); close(); });
    document.body.append(dialog);
    dialog.showModal();
  });
}

/** A labelled form field. */
export function field(label, input, hint) {
  return h('label.field', h('span.label', label), input, hint ? h('span.hint', hint) : null);
}

export function empty(text) {
  return h('div.empty', text);
}

export function errorBox(error) {
  return h('div.error-box', { role: 'alert' }, error.message || String(error));
}

/** A table from columns [{label, cell(row), class}] and rows. */
export function table(columns, rows, { onRow, emptyText = 'Nothing here yet.' } = {}) {
  if (!rows.length) return empty(emptyText);
  return h('div.table-wrap', h('table',
    h('thead', h('tr', columns.map((c) => h('th', { class: c.class }, c.label)))),
    h('tbody', rows.map((row) => h('tr', {
      class: onRow ? 'clickable' : '',
      tabindex: onRow ? 0 : undefined,
      onclick: onRow ? () => onRow(row) : undefined,
      onkeydown: onRow ? (e) => { if (e.key === 'Enter') onRow(row); } : undefined,
    }, columns.map((c) => h('td', { class: c.class }, c.cell(row))))))));
}
