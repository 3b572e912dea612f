// The shell: sign-in, the navigation and a hash router (#/overview, #/traces/req_…) that
// gives each page a fresh main area.

import { h, clear, badge, errorBox } from './dom.js';
import { api, session, ApiError } from './api.js';
import * as overview from './pages/overview.js';
import * as access from './pages/access.js';
import * as usage from './pages/usage.js';
import * as models from './pages/models.js';
import * as playground from './pages/playground.js';
import * as traces from './pages/traces.js';

const PAGES = [
  { path: 'overview', title: 'Overview', icon: 'M3 13h4v8H3zM10 8h4v13h-4zM17 3h4v18h-4z', page: overview },
  { path: 'access', title: 'Tenants & keys', icon: 'M7 14a4 4 0 1 1 3.9-5H22v3h-2v3h-3v-3h-6.1A4 4 0 0 1 7 14zm0-2.5a1.5 1.5 0 1 0 0-3 1.5 1.5 0 0 0 0 3z', page: access },
  { path: 'usage', title: 'Usage', icon: 'M4 4h16v2H4zM4 9h10v2H4zM4 14h16v2H4zM4 19h7v2H4z', page: usage },
  { path: 'models', title: 'Models', icon: 'M12 2l9 5v10l-9 5-9-5V7zm0 2.3L5.5 8 12 11.7 18.5 8zM5 9.7v6.1l6 3.4v-6.1zm14 0l-6 3.4v6.1l6-3.4z', page: models },
  { path: 'playground', title: 'Playground', icon: 'M4 4h16v12H8l-4 4zm4 5v2h8V9z', page: playground },
  { path: 'traces', title: 'Traces', icon: 'M3 5h4v4H3zM10 6h11v2H10zM3 11h4v4H3zM10 12h11v2H10zM3 17h4v4H3zM10 18h11v2H10z', page: traces },
];

const root = document.getElementById('root');
let cleanup = null;
let visits = 0;

function icon(d) {
  const ns = 'http://www.w3.org/2000/svg';
  const s = document.createElementNS(ns, 'svg');
  s.setAttribute('viewBox', '0 0 24 24');
  s.setAttribute('aria-hidden', 'true');
  const p = document.createElementNS(ns, 'path');
  p.setAttribute('d', d);
  s.append(p);
  return s;
}

function logo() {
  const img = h('img.logo', { src: '/ui/favicon.svg', alt: '' });
  return h('div.brand', img, h('span', 'Ferry'));
}

async function whoami() {
  session.me = await api('/admin/v1/whoami');
  return session.me;
}

function signIn(message) {
  if (cleanup) { cleanup(); cleanup = null; }
  const input = h('input#key', { type: 'password', autocomplete: 'off', spellcheck: 'false', placeholder: 'sk-ferry-…', required: true });
  const error = h('div.form-error', { role: 'alert' }, message || '');
  const button = h('button.primary.wide', { type: 'submit' }, 'Sign in');
  const form = h('form.signin-card',
    logo(),
    h('h1', 'Sign in'),
    h('p.muted', 'Use an admin key (the server’s FERRY_ADMIN_KEY) or a tenant admin key.'),
    h('label.field', h('span.label', 'API key'), input),
    error,
    button,
    h('p.fine', 'The key stays in this browser tab only and is forgotten when the tab closes.'),
  );
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    button.disabled = true;
    error.textContent = '';
    session.set(input.value.trim());
    try {
      await whoami();
      if (!location.hash || location.hash === '#/') location.hash = '#/overview';
      shell();
    } catch (err) {
      session.clear();
      error.textContent = err.status === 401 ? 'This key is not valid (wrong, revoked or expired).'
        : err.status === 403 ? 'This key may only call the inference API: the admin UI needs an admin or tenant admin key.'
        : err.message;
      button.disabled = false;
      input.focus();
    }
  });
  clear(root).append(h('div.signin', form));
  input.focus();
}

function roleText(me) {
  if (me.role === 'admin') return 'admin';
  if (me.role === 'tenant_admin') return 'tenant admin';
  return me.role;
}

function shell() {
  const me = session.me;
  const nav = h('nav.nav', PAGES.map((p) => h('a.nav-link', { href: `#/${p.path}`, dataset: { path: p.path } }, icon(p.icon), h('span', p.title))));
  const who = h('div.who',
    h('div.who-line', badge(roleText(me), me.role === 'admin' ? 'accent' : 'info')),
    me.key ? h('div.who-key', { title: me.key.id }, me.key.name, ' · ', h('code', me.key.display_prefix)) : h('div.who-key', 'local (no keys)'),
    session.key ? h('button.ghost.small', { type: 'button', onclick: signOut }, 'Sign out') : null,
  );
  const main = h('main#main.main');
  clear(root).append(h('div.layout', h('aside.sidebar', logo(), nav, who), main));
  route();
}

function signOut() {
  session.clear();
  session.me = null;
  location.hash = '';
  signIn();
}

async function route() {
  const main = document.getElementById('main');
  if (!main || !session.me) return;
  const [path, ...rest] = location.hash.replace(/^#\/?/, '').split('/');
  const entry = PAGES.find((p) => p.path === path) || PAGES[0];
  for (const link of document.querySelectorAll('.nav-link')) {
    link.classList.toggle('active', link.dataset.path === entry.path);
    if (link.dataset.path === entry.path) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
  if (cleanup) { cleanup(); cleanup = null; }
  document.title = `${entry.title} · Ferry`;
  // Each visit renders into its own container: a slower earlier visit finishes into a
  // detached one and is cleaned up at once.
  const visit = ++visits;
  const page = h('div.page');
  clear(main).append(page);
  try {
    const done = (await entry.page.render(page, { me: session.me, args: rest.map(decodeURIComponent) })) || null;
    if (visit === visits) cleanup = done;
    else if (done) done();
  } catch (err) {
    page.append(errorBox(err));
  }
}

window.addEventListener('hashchange', route);
window.addEventListener('ferry:signed-out', () => {
  session.clear();
  signIn('The key stopped working (revoked or expired): sign in again.');
});

async function start() {
  try {
    // A server without keys answers its loopback user without one.
    await whoami();
    if (!location.hash || location.hash === '#/') location.hash = '#/overview';
    shell();
  } catch (err) {
    if (err instanceof ApiError && session.key) session.clear();
    signIn();
  }
}

start();
