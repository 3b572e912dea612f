// Tenants, projects and keys: create them (a new key's secret is shown once), revoke keys
// and set limits on each level.

import { h, clear, badge, fmtTime, fmtCompact, modal, field, table, toast, errorBox } from '../dom.js';
import { api, directory } from '../api.js';

const LIMITS = [
  { name: 'rpm', label: 'Requests / minute', unit: 'rpm' },
  { name: 'tpm', label: 'Tokens / minute', unit: 'tpm' },
  { name: 'tokens_per_day', label: 'Tokens / day', unit: 'tok/day' },
  { name: 'tokens_per_month', label: 'Tokens / month', unit: 'tok/month' },
  { name: 'cost_per_day', label: 'Cost / day', unit: '/day', money: true },
  { name: 'cost_per_month', label: 'Cost / month', unit: '/month', money: true },
];

let tenantFilter = '';

function limitsText(limits) {
  const parts = LIMITS.filter((l) => limits && limits[l.name] != null)
    .map((l) => (l.money ? `${limits[l.name]} ${l.unit}` : `${fmtCompact(limits[l.name])} ${l.unit}`));
  return parts.length ? h('span.limits', parts.join(' · ')) : h('span.muted', 'no limits');
}

function keyState(k) {
  if (k.revoked_at) return badge('revoked', 'bad');
  if (k.expires_at && k.expires_at < Date.now()) return badge('expired', 'warn');
  return badge('active', 'ok');
}

/** Edits `limits` in a dialog; resolves to the new limits or undefined. */
function editLimits(title, limits) {
  return modal(title, (close) => {
    const inputs = LIMITS.map((l) => h('input', {
      type: 'number', min: 0, step: l.money ? 'any' : 1, name: l.name, placeholder: 'no limit',
      value: limits && limits[l.name] != null ? limits[l.name] : '',
    }));
    const form = h('form.form',
      h('p.muted', 'Empty means no limit at this level. A request must fit the key’s, its project’s and its tenant’s limits.'),
      h('div.form-grid', LIMITS.map((l, i) => field(l.label, inputs[i]))),
      h('footer.dialog-actions', h('button.ghost', { type: 'button', onclick: () => close() }, 'Cancel'), h('button.primary', { type: 'submit' }, 'Save limits')),
    );
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const out = {};
      LIMITS.forEach((l, i) => { if (inputs[i].value !== '') out[l.name] = Number(inputs[i].value); });
      close(out);
    });
    return form;
  });
}

async function submitting(form, work) {
  const error = form.querySelector('.form-error');
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  error.textContent = '';
  try {
    await work();
  } catch (err) {
    error.textContent = err.message;
    button.disabled = false;
  }
}

export async function render(main, { me }) {
  const isAdmin = me.role === 'admin';
  const body = h('div.stack');
  const filter = h('select#tenant-filter', { 'aria-label': 'Tenant', onchange: () => { tenantFilter = filter.value; load(); } });
  main.append(
    h('header.page-head', h('div', h('h1', 'Tenants & keys'), h('p.muted', 'Tenants own projects, projects own keys. Limits apply at every level.')),
      h('div.actions', isAdmin ? h('label.inline-row', h('span.label', 'Show'), filter) : null)),
    body,
  );

  async function load() {
    let dir;
    try {
      dir = await directory();
    } catch (err) {
      clear(body).append(errorBox(err));
      return;
    }
    clear(filter).append(h('option', { value: '' }, 'All tenants'), dir.tenants.map((t) => h('option', { value: t.id }, t.name)));
    filter.value = dir.tenants.some((t) => t.id === tenantFilter) ? tenantFilter : '';
    const inTenant = (id) => !filter.value || id === filter.value;
    const tenants = dir.tenants.filter((t) => inTenant(t.id));
    const projects = dir.projects.filter((p) => inTenant(p.tenant_id));
    const keys = dir.keys.filter((k) => inTenant(k.tenant_id)).sort((a, b) => b.created_at - a.created_at);

    const tenantCard = h('section.card#tenants',
      h('header.card-head', h('h2', 'Tenants'), isAdmin ? h('button.primary.small', { type: 'button', onclick: newTenant }, '+ New tenant') : null),
      table([
        { label: 'Name', cell: (t) => h('b', t.name) },
        { label: 'Id', cell: (t) => h('code', t.id) },
        { label: 'Limits', cell: (t) => limitsText(t.limits) },
        { label: 'Content', cell: (t) => (t.retain_content ? badge(`kept ${t.retention_days || 30} d`, 'warn') : h('span.muted', 'not kept')) },
        { label: 'Created', cell: (t) => fmtTime(t.created_at) },
        { label: '', class: 'row-actions', cell: (t) => (isAdmin ? h('button.ghost.small', { type: 'button', onclick: () => limitsFor('tenant', t) }, 'Limits…') : null) },
      ], tenants, { emptyText: 'No tenants yet.' }),
    );
    const projectCard = h('section.card#projects',
      h('header.card-head', h('h2', 'Projects'), h('button.primary.small', { type: 'button', disabled: !dir.tenants.length, onclick: () => newProject(dir) }, '+ New project')),
      table([
        { label: 'Name', cell: (p) => h('b', p.name) },
        { label: 'Tenant', cell: (p) => dir.name(p.tenant_id) || p.tenant_id },
        { label: 'Id', cell: (p) => h('code', p.id) },
        { label: 'Limits', cell: (p) => limitsText(p.limits) },
        { label: 'Created', cell: (p) => fmtTime(p.created_at) },
        { label: '', class: 'row-actions', cell: (p) => h('button.ghost.small', { type: 'button', onclick: () => limitsFor('project', p) }, 'Limits…') },
      ], projects, { emptyText: dir.tenants.length ? 'No projects yet.' : 'Create a tenant first.' }),
    );
    const keyCard = h('section.card#keys',
      h('header.card-head', h('h2', 'API keys'), h('button.primary.small', { type: 'button', onclick: () => newKey(dir) }, '+ New key')),
      table([
        { label: 'Name', cell: (k) => h('b', k.name) },
        { label: 'Key', cell: (k) => h('code', k.display_prefix, '…') },
        { label: 'Role', cell: (k) => badge(k.role.replace('_', ' '), k.role === 'admin' ? 'accent' : k.role === 'tenant_admin' ? 'info' : '') },
        { label: 'Scope', cell: (k) => (k.project_id ? `${dir.name(k.tenant_id) || ''} / ${dir.name(k.project_id) || k.project_id}` : k.tenant_id ? dir.name(k.tenant_id) || k.tenant_id : h('span.muted', 'all tenants')) },
        { label: 'Models', cell: (k) => (k.models ? k.models.join(', ') : h('span.muted', 'all')) },
        { label: 'Limits', cell: (k) => limitsText(k.limits) },
        { label: 'State', cell: keyState },
        { label: 'Created', cell: (k) => fmtTime(k.created_at) },
        { label: '', class: 'row-actions', cell: (k) => h('span.row-buttons',
          h('button.ghost.small', { type: 'button', disabled: !!k.revoked_at, onclick: () => limitsFor('key', k) }, 'Limits…'),
          me.key && me.key.id === k.id ? null : h('button.danger.small', { type: 'button', disabled: !!k.revoked_at, onclick: () => revoke(k) }, 'Revoke')) },
      ], keys, { emptyText: 'No keys yet.' }),
    );
    clear(body).append(tenantCard, projectCard, keyCard);
  }

  async function limitsFor(kind, thing) {
    const limits = await editLimits(`Limits of ${kind} “${thing.name}”`, thing.limits);
    if (!limits) return;
    const path = { tenant: 'tenants', project: 'projects', key: 'keys' }[kind];
    try {
      await api(`/admin/v1/${path}/${thing.id}`, { method: 'PATCH', body: { limits } });
      toast(`Limits of ${thing.name} saved`);
    } catch (err) {
      toast(err.message, 'bad');
    }
    load();
  }

  async function revoke(k) {
    const confirmed = await modal('Revoke key', (close) => h('div.form',
      h('p', 'Revoke ', h('b', k.name), ' (', h('code', k.display_prefix, '…'), ')? Requests with it will be refused at once. This cannot be undone.'),
      h('footer.dialog-actions', h('button.ghost', { type: 'button', onclick: () => close(false) }, 'Cancel'),
        h('button.danger', { type: 'button', onclick: () => close(true) }, 'Revoke key'))));
    if (!confirmed) return;
    try {
      await api(`/admin/v1/keys/${k.id}/revoke`, { method: 'POST' });
      toast(`Key ${k.name} revoked`);
    } catch (err) {
      toast(err.message, 'bad');
    }
    load();
  }

  async function newTenant() {
    await modal('New tenant', (close) => {
      const name = h('input', { name: 'name', required: true, placeholder: 'acme' });
      const form = h('form.form',
        field('Name', name, 'Unique; shown in usage and traces.'),
        h('div.form-error', { role: 'alert' }),
        h('footer.dialog-actions', h('button.ghost', { type: 'button', onclick: () => close() }, 'Cancel'), h('button.primary', { type: 'submit' }, 'Create tenant')));
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        submitting(form, async () => {
          const t = await api('/admin/v1/tenants', { method: 'POST', body: { name: name.value.trim() } });
          toast(`Tenant ${t.name} created`);
          close(t);
        });
      });
      queueMicrotask(() => name.focus());
      return form;
    });
    load();
  }

  async function newProject(dir) {
    await modal('New project', (close) => {
      const name = h('input', { name: 'name', required: true, placeholder: 'web' });
      const tenant = h('select', { name: 'tenant' }, dir.tenants.map((t) => h('option', { value: t.id }, t.name)));
      if (filter.value) tenant.value = filter.value;
      const form = h('form.form',
        field('Tenant', tenant),
        field('Name', name, 'Unique within its tenant.'),
        h('div.form-error', { role: 'alert' }),
        h('footer.dialog-actions', h('button.ghost', { type: 'button', onclick: () => close() }, 'Cancel'), h('button.primary', { type: 'submit' }, 'Create project')));
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        submitting(form, async () => {
          const p = await api('/admin/v1/projects', { method: 'POST', body: { tenant_id: tenant.value, name: name.value.trim() } });
          toast(`Project ${p.name} created`);
          close(p);
        });
      });
      queueMicrotask(() => name.focus());
      return form;
    });
    load();
  }

  async function newKey(dir) {
    let models = [];
    try { models = (await api('/v1/models')).data.map((m) => m.id); } catch { /* shown as free text */ }
    await modal('New API key', (close) => {
      const name = h('input', { name: 'name', required: true, placeholder: 'web-backend' });
      const roles = isAdmin ? ['member', 'tenant_admin', 'admin'] : ['member', 'tenant_admin'];
      const role = h('select', { name: 'role' }, roles.map((r) => h('option', { value: r }, { member: 'member — inference only', tenant_admin: 'tenant admin — manages its tenant', admin: 'admin — everything' }[r])));
      const project = h('select', { name: 'project' }, dir.projects.map((p) => h('option', { value: p.id }, `${dir.name(p.tenant_id) || p.tenant_id} / ${p.name}`)));
      const tenant = h('select', { name: 'tenant' }, dir.tenants.map((t) => h('option', { value: t.id }, t.name)));
      if (filter.value) {
        tenant.value = filter.value;
        const first = dir.projects.find((p) => p.tenant_id === filter.value);
        if (first) project.value = first.id;
      }
      const modelBoxes = models.map((m) => h('label.check', h('input', { type: 'checkbox', value: m }), m));
      const expires = h('input', { type: 'date', name: 'expires' });
      const projectField = field('Project', project);
      const tenantField = field('Tenant', tenant);
      const sync = () => {
        projectField.hidden = role.value !== 'member';
        tenantField.hidden = role.value !== 'tenant_admin';
      };
      role.addEventListener('change', sync);
      sync();
      const form = h('form.form',
        field('Name', name),
        field('Role', role),
        projectField,
        tenantField,
        models.length ? h('fieldset.field', h('legend.label', 'Models (none checked: all)'), h('div.checks', modelBoxes)) : null,
        field('Expires', expires, 'Optional; the key stops working at the start of that day (UTC).'),
        h('div.form-error', { role: 'alert' }),
        h('footer.dialog-actions', h('button.ghost', { type: 'button', onclick: () => close() }, 'Cancel'), h('button.primary', { type: 'submit' }, 'Create key')));
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        submitting(form, async () => {
          const body = { name: name.value.trim(), role: role.value };
          if (role.value === 'member') body.project_id = project.value;
          if (role.value === 'tenant_admin') body.tenant_id = tenant.value;
          const chosen = modelBoxes.map((l) => l.firstChild).filter((c) => c.checked).map((c) => c.value);
          if (chosen.length) body.models = chosen;
          if (expires.value) body.expires_at = Date.parse(`${expires.value}T00:00:00Z`);
          const created = await api('/admin/v1/keys', { method: 'POST', body });
          form.replaceWith(showSecret(created, close));
        });
      });
      queueMicrotask(() => name.focus());
      return form;
    });
    load();
  }

  await load();
}

/** The new key's secret, shown this once, with a copy button. */
function showSecret(created, close) {
  const secret = h('code#new-key-secret.secret', created.key);
  const copy = h('button.ghost.small', { type: 'button', onclick: async () => {
    try { await navigator.clipboard.writeText(created.key); copy.textContent = 'Copied'; } catch { window.getSelection().selectAllChildren(secret); copy.textContent = 'Selected: press Ctrl+C'; }
  } }, 'Copy');
  return h('div.form.key-created',
    h('p', 'Key ', h('b', created.name), ' was created. Copy it now: ', h('b', 'this is the only time it is shown.')),
    h('div.secret-row', secret, copy),
    h('p.muted', 'Use it as ', h('code', 'Authorization: Bearer …'), ' with any OpenAI SDK pointed at this server’s /v1.'),
    h('footer.dialog-actions', h('button.primary', { type: 'button', onclick: () => close(created) }, 'Done')));
}
