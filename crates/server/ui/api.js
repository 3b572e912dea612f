// Calls Ferry's APIs with the signed-in key. The key lives in sessionStorage: it is gone when
// the tab closes and is never sent anywhere but this server.

const KEY = 'ferry.key';

export const session = {
  get key() { return sessionStorage.getItem(KEY); },
  set(key) { sessionStorage.setItem(KEY, key); },
  clear() { sessionStorage.removeItem(KEY); },
  /** whoami's answer, filled in at sign-in. */
  me: null,
};

export class ApiError extends Error {
  constructor(status, message, requestId) {
    super(message);
    this.status = status;
    this.requestId = requestId;
  }
}

function headers(body) {
  const out = {};
  if (session.key) out.Authorization = `Bearer ${session.key}`;
  if (body !== undefined) out['Content-Type'] = 'application/json';
  return out;
}

/** Sends a request and returns the raw response, throwing ApiError on a non-2xx status. */
export async function request(path, { method = 'GET', body, signal } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(body),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const json = await response.json();
      if (json.error && json.error.message) message = json.error.message;
    } catch { /* not JSON */ }
    if (response.status === 401 && session.key && session.me) {
      window.dispatchEvent(new CustomEvent('ferry:signed-out'));
    }
    throw new ApiError(response.status, message, response.headers.get('x-request-id'));
  }
  return response;
}

export async function api(path, options) {
  const response = await request(path, options);
  return response.json();
}

/** A query string from an object, skipping empty values. */
export function qs(params) {
  const search = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') search.set(k, v);
  }
  const s = search.toString();
  return s ? `?${s}` : '';
}

/** The JSON payloads of a server-sent event stream, until `[DONE]`. */
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, '');
      const data = block.split(/\r?\n/).filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
      if (!data) continue;
      if (data === '[DONE]') return;
      yield JSON.parse(data);
    }
  }
}

/** Names for ids (tenants, projects, keys), loaded once per page view. */
export async function directory() {
  const [tenants, projects, keys] = await Promise.all([
    api('/admin/v1/tenants'), api('/admin/v1/projects'), api('/admin/v1/keys'),
  ]);
  const names = new Map();
  for (const t of tenants.data) names.set(t.id, t.name);
  for (const p of projects.data) names.set(p.id, p.name);
  for (const k of keys.data) names.set(k.id, k.name);
  return { tenants: tenants.data, projects: projects.data, keys: keys.data, name: (id) => names.get(id) };
}
