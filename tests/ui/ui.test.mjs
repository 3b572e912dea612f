// End-to-end tests of the admin web UI: the release binary on port 0 with the real test
// model, driven in Debian's headless Chromium through playwright-core. Each step asserts a
// real outcome (the new key works with the API, its usage appears, streamed text arrives,
// the heat map has cells, the trace shows the request) and saves a screenshot of the page to
// target/ui-screenshots/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import http from 'node:http';
import { createInterface } from 'node:readline';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BINARY = process.env.FERRY_BIN || path.join(ROOT, 'target', 'release', 'ferry');
const MODELS_DIR = process.env.FERRY_MODELS_DIR || path.join(ROOT, 'models');
const MODEL_ID = 'SmolLM2-135M-Instruct.Q4_1';
const SHOTS = path.join(ROOT, 'target', 'ui-screenshots');
const ADMIN_KEY = `ui-test-admin-${randomBytes(12).toString('hex')}`;
const QUESTION = 'Alice lives in Paris. Bob lives in Rome. Where does Alice live?';

let server;
let base;
/** Serves a blank page, for pages of other origins (tests of CORS). */
let pageServer;
let pagePort;
let browser;
let page;
/** What one step leaves for the next. */
const shared = {};

async function startServer(extraArgs = []) {
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-ui-'));
  const log = fs.openSync(path.join(ROOT, 'target', `ferry-ui-test-${process.pid}.log`), 'w');
  const child = spawn(BINARY, [
    'serve', '--port', '0', '--model', path.join(MODELS_DIR, `${MODEL_ID}.gguf`), '--threads', '2',
    '--data-dir', dataDir, '--ctx-size', '2048', '--parallel', '4', ...extraArgs,
  ], { env: { ...process.env, FERRY_ADMIN_KEY: ADMIN_KEY }, stdio: ['ignore', 'pipe', log] });
  const lines = createInterface({ input: child.stdout });
  const first = await new Promise((resolve, reject) => {
    lines.once('line', resolve);
    child.once('exit', (code) => reject(new Error(`ferry exited with ${code} before listening; see target/ferry-ui-test-${process.pid}.log`)));
  });
  const match = /listening on (https?:\/\/\S+)/.exec(first);
  assert.ok(match, `unexpected first line: ${first}`);
  return { child, url: match[1], dataDir };
}

/** A call to the API with `key`; returns {status, json, headers}. */
async function call(key, method, route, body) {
  const response = await fetch(base + route, {
    method,
    headers: { Authorization: `Bearer ${key}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await response.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: response.status, json, headers: response.headers };
}

async function shot(name) {
  // Let charts and fonts settle before the picture.
  await page.waitForTimeout(150);
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

async function go(hash, heading) {
  await page.click(`nav a[href="#/${hash}"]`);
  await page.waitForSelector(`main h1:text-is("${heading}")`);
}

before(async () => {
  assert.ok(fs.existsSync(BINARY), `${BINARY} is missing: cargo build --release --bin ferry first`);
  fs.mkdirSync(SHOTS, { recursive: true });
  pageServer = http.createServer((_, res) => res.end('<!doctype html><title>another app</title>'));
  await new Promise((resolve) => pageServer.listen(0, '127.0.0.1', resolve));
  pagePort = pageServer.address().port;
  server = await startServer(['--cors-origin', `http://trusted.example:${pagePort}`]);
  base = server.url;
  // Some traffic for the overview: a few answers and one error (an unknown model).
  for (let i = 0; i < 3; i++) {
    const r = await call(ADMIN_KEY, 'POST', '/v1/chat/completions', {
      model: MODEL_ID, messages: [{ role: 'user', content: `Count to ${i + 2}.` }], max_tokens: 8, temperature: 0,
    });
    assert.equal(r.status, 200, JSON.stringify(r.json));
  }
  assert.equal((await call(ADMIN_KEY, 'POST', '/v1/chat/completions', { model: 'no-such-model', messages: [{ role: 'user', content: 'hi' }] })).status, 404);
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true, args: [
    '--no-sandbox',
    // Two more origins for the CORS test, both served by pageServer.
    '--host-resolver-rules=MAP trusted.example 127.0.0.1, MAP untrusted.example 127.0.0.1',
  ] });
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, acceptDownloads: true });
  page = await context.newPage();
  page.on('pageerror', (err) => { shared.pageErrors = [...(shared.pageErrors || []), err.message]; });
});

after(async () => {
  if (browser) await browser.close();
  if (pageServer) pageServer.close();
  if (server) {
    server.child.kill('SIGTERM');
    await new Promise((resolve) => {
      const timer = setTimeout(() => { server.child.kill('SIGKILL'); resolve(); }, 20000);
      server.child.once('exit', () => { clearTimeout(timer); resolve(); });
    });
    fs.rmSync(server.dataDir, { recursive: true, force: true });
  }
});

test('the UI is served by the binary with content types and revalidation', async () => {
  const index = await fetch(`${base}/ui`);
  assert.equal(index.status, 200);
  assert.match(index.headers.get('content-type'), /^text\/html/);
  assert.equal(index.headers.get('cache-control'), 'no-cache');
  const js = await fetch(`${base}/ui/app.js`);
  assert.match(js.headers.get('content-type'), /^text\/javascript/);
  const again = await fetch(`${base}/ui/app.js`, { headers: { 'If-None-Match': js.headers.get('etag') } });
  assert.equal(again.status, 304);
  assert.equal((await fetch(`${base}/ui/nope.js`)).status, 404);
});

test('pages of other origins: loopback and configured ones may call the API, others may not', async () => {
  const context = await browser.newContext();
  const other = await context.newPage();
  const attempt = async (origin) => {
    await other.goto(`${origin}/`);
    return other.evaluate(async ({ base, key, model }) => {
      try {
        const r = await fetch(`${base}/v1/chat/completions`, {
          method: 'POST',
          headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
          body: JSON.stringify({ model, messages: [{ role: 'user', content: 'Say hi.' }], max_tokens: 4 }),
        });
        const json = await r.json();
        return { status: r.status, requestId: r.headers.get('x-request-id'), object: json.object };
      } catch (e) {
        return { blocked: String(e) };
      }
    }, { base, key: ADMIN_KEY, model: MODEL_ID });
  };
  try {
    for (const origin of [`http://localhost:${pagePort}`, `http://trusted.example:${pagePort}`]) {
      const answer = await attempt(origin);
      assert.equal(answer.status, 200, `${origin}: ${JSON.stringify(answer)}`);
      assert.equal(answer.object, 'chat.completion');
      assert.ok(answer.requestId, `${origin}: exposed headers are readable`);
    }
    const refused = await attempt(`http://untrusted.example:${pagePort}`);
    assert.match(refused.blocked ?? JSON.stringify(refused), /Failed to fetch/);
  } finally {
    await context.close();
  }
});

test('sign in: a wrong key is refused, the admin key opens the overview', async () => {
  await page.goto(`${base}/ui`);
  await page.waitForSelector('#key');
  await shot('01-sign-in');
  await page.fill('#key', 'sk-ferry-not-a-key');
  await page.click('button[type=submit]');
  await page.waitForSelector('.form-error:has-text("not valid")');
  await page.fill('#key', ADMIN_KEY);
  await page.click('button[type=submit]');
  await page.waitForSelector('main h1:text-is("Overview")');
  await page.waitForSelector('.stat');
  const requests = await page.textContent('.stat:first-child .stat-value');
  assert.ok(Number(requests.replace(/\D/g, '')) >= 4, `requests stat: ${requests}`);
  await page.waitForSelector('.chart-svg rect.bar');
  await shot('02-overview');
});

test('create a tenant, a project and a key; the key is shown once and works with the API', async () => {
  await go('access', 'Tenants & keys');
  await page.click('button:has-text("New tenant")');
  await page.fill('dialog input[name=name]', 'acme');
  await page.click('dialog button:has-text("Create tenant")');
  await page.waitForSelector('#tenants td:has-text("acme")');
  await page.click('button:has-text("New project")');
  await page.fill('dialog input[name=name]', 'web');
  await page.click('dialog button:has-text("Create project")');
  await page.waitForSelector('#projects td:has-text("web")');
  await page.click('button:has-text("New key")');
  await page.fill('dialog input[name=name]', 'ui-test-key');
  await page.selectOption('dialog select[name=role]', 'member');
  await page.click('dialog button:has-text("Create key")');
  const secret = (await page.textContent('#new-key-secret', { timeout: 10000 })).trim();
  assert.match(secret, /^sk-ferry-[0-9a-f]{64}$/);
  await shot('03-key-created');
  await page.click('dialog button:has-text("Done")');
  await page.waitForSelector('#keys td:has-text("ui-test-key")');
  assert.equal(await page.locator('#new-key-secret').count(), 0, 'the secret is not shown again');
  const keys = await call(ADMIN_KEY, 'GET', '/admin/v1/keys');
  const key = keys.json.data.find((k) => k.name === 'ui-test-key');
  assert.equal(key.role, 'member');
  shared.secret = secret;
  shared.keyId = key.id;

  // Limits set in the UI are the key's limits.
  const row = page.locator('#keys tr', { hasText: 'ui-test-key' });
  await row.locator('button:has-text("Limits")').click();
  await page.fill('dialog input[name=rpm]', '120');
  await page.fill('dialog input[name=tokens_per_day]', '500000');
  await page.click('dialog button:has-text("Save limits")');
  await page.waitForSelector('#keys tr:has-text("ui-test-key") .limits:has-text("120 rpm")');
  const updated = await call(ADMIN_KEY, 'GET', `/admin/v1/keys/${key.id}`);
  assert.deepEqual(updated.json.limits, { rpm: 120, tokens_per_day: 500000 });
  await shot('04-tenants-and-keys');

  // The new key works with the API, as a member key.
  const answer = await call(secret, 'POST', '/v1/chat/completions', {
    model: MODEL_ID, messages: [{ role: 'user', content: 'Say hello.' }], max_tokens: 12, temperature: 0,
  });
  assert.equal(answer.status, 200, JSON.stringify(answer.json));
  assert.ok(answer.json.choices[0].message.content.length > 0);
  assert.equal(answer.headers.get('x-ratelimit-limit-requests'), '120');
  assert.equal((await call(secret, 'GET', '/admin/v1/whoami')).status, 403, 'a member key is not an admin key');
});

test('usage by model, key and day shows the new key, and exports as CSV', async () => {
  await go('usage', 'Usage');
  const row = page.locator('#usage-table tbody tr', { hasText: 'ui-test-key' });
  await row.waitFor();
  const cells = await row.locator('td').allTextContents();
  assert.equal(cells[0], MODEL_ID);
  assert.match(cells[2], /^\d{4}-\d{2}-\d{2}$/, `a day: ${cells[2]}`);
  assert.equal(cells[3], '1', 'one request with the new key');
  await shot('05-usage');
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#export-csv')]);
  const csv = fs.readFileSync(await download.path(), 'utf8');
  const [header, ...lines] = csv.trim().split('\n');
  assert.equal(header, 'model,key_id,day,requests,errors,prompt_tokens,completion_tokens,cached_tokens,cost');
  assert.ok(lines.some((l) => l.startsWith(`${MODEL_ID},${shared.keyId},`)), csv);
});

test('models show their state and provenance', async () => {
  await go('models', 'Models');
  const card = page.locator(`.model-card[data-model="${MODEL_ID}"]`);
  await card.waitFor();
  assert.equal(await card.locator('.badge').textContent(), 'loaded');
  const text = await card.textContent();
  assert.match(text, /Q4_1/);
  assert.match(text, /llama/);
  assert.match(text, /[0-9a-f]{64}/, 'the file sha256');
  await shot('06-models');
  // Unload it, then load it again, from its card; the API agrees on each state.
  await card.locator('.model-unload').click();
  await page.locator(`.model-card[data-model="${MODEL_ID}"][data-state="on_disk"]`).waitFor();
  let listed = await call(ADMIN_KEY, 'GET', `/v1/models/${MODEL_ID}`);
  assert.equal(listed.json.state, 'on_disk');
  await shot('06b-models-unloaded');
  await page.locator(`.model-card[data-model="${MODEL_ID}"] .model-load`).click();
  await page.locator(`.model-card[data-model="${MODEL_ID}"][data-state="loaded"]`).waitFor({ timeout: 60000 });
  listed = await call(ADMIN_KEY, 'GET', `/v1/models/${MODEL_ID}`);
  assert.equal(listed.json.state, 'loaded');
  const audit = await call(ADMIN_KEY, 'GET', '/admin/v1/audit?limit=5');
  const actions = audit.json.data.map((e) => e.action);
  assert.ok(actions.includes('model.unload') && actions.includes('model.load'), JSON.stringify(actions));
});

test('playground: a streamed chat with token probabilities', async () => {
  await go('playground', 'Playground');
  await page.fill('#max-tokens', '40');
  await page.fill('#prompt', QUESTION);
  // Streaming: tokens are on the page while the answer is still being written. An observer
  // sees each change to the page as it is made; polling for a selector can miss a short
  // answer that streams in faster than the browser draws (it did, on a busy machine).
  await page.evaluate(() => {
    window.sawStreamingToken = false;
    new MutationObserver(() => {
      if (document.querySelector('.msg.assistant.streaming .tok')) window.sawStreamingToken = true;
    }).observe(document.body, { childList: true, subtree: true, attributes: true });
  });
  await page.click('#send');
  const meta = page.locator('.msg.assistant .meta');
  await meta.waitFor({ timeout: 60000 });
  assert.ok(await page.evaluate(() => window.sawStreamingToken), 'tokens were on the page while the answer streamed');
  const text = await page.textContent('.msg.assistant .text');
  assert.ok(text.trim().length > 0, 'the answer has text');
  const chunks = Number(await page.getAttribute('.msg.assistant .text', 'data-chunks'));
  assert.ok(chunks > 1, `streamed in ${chunks} chunks`);
  assert.equal(await page.locator('.msg.assistant .tok[tabindex]').count(), chunks, 'every chunk carries its logprobs');
  assert.match(await meta.textContent(), /tokens/);
  shared.requestId = await page.getAttribute('.trace-link', 'title');
  assert.match(shared.requestId, /^req_/);
  await page.hover('.msg.assistant .tok[tabindex] >> nth=1');
  await page.waitForSelector('.tooltip .alt');
  await shot('07-playground');
});

test('explain draws the attribution as a heat map over the prompt', async () => {
  await page.mouse.move(0, 0);
  await page.click('.explain-btn');
  await page.waitForSelector('.heat-seg', { timeout: 120000 });
  // Sentence granularity: the system prompt's sentence and the question's three.
  const cells = await page.locator('.heat-seg').count();
  assert.equal(cells, 4);
  const heatText = await page.locator('.heat-map').textContent();
  assert.ok(heatText.includes('Alice lives in Paris.'), heatText);
  const scores = await page.locator('.heat-seg').evaluateAll((els) => els.map((e) => Number(e.dataset.score)));
  assert.ok(scores.every(Number.isFinite) && scores.some((s) => s !== 0), `scores ${scores}`);
  const paris = page.locator('.heat-seg', { hasText: 'Alice lives in Paris.' });
  await paris.hover();
  await page.waitForSelector('.tooltip:has-text("nats")');
  await page.locator('#explanation').scrollIntoViewIfNeeded();
  await shot('08-explanation');
});

test('the answer\'s trace shows the request in full', async () => {
  await page.mouse.move(0, 0);
  await page.click('.trace-link');
  await page.waitForSelector('#trace-request-id');
  assert.equal(await page.textContent('#trace-request-id'), shared.requestId);
  await page.waitForSelector('h2:text-is("Timings")', { timeout: 15000 });
  const body = await page.textContent('main');
  assert.match(body, /\/v1\/chat\/completions/);
  assert.match(body, new RegExp(MODEL_ID.replace('.', '\\.')));
  assert.match(body, /Model provenance/);
  assert.match(body, /prefill/i);
  await shot('09-trace');
});

test('traces can be searched by id and time', async () => {
  await go('traces', 'Traces');
  await page.waitForSelector(`#trace-results td:has-text("${shared.requestId}")`);
  await page.fill('#trace-id', shared.requestId.slice(0, 12));
  await page.click('form button:has-text("Search")');
  await page.waitForSelector('#trace-results h2:has-text("request")');
  const ids = await page.locator('#trace-results tbody td:nth-child(2)').allTextContents();
  assert.ok(ids.length >= 1 && ids.every((id) => id.startsWith(shared.requestId.slice(0, 12))), ids.join(' '));
  assert.ok(ids.includes(shared.requestId));
  // A window that ended before the server started finds nothing.
  await page.fill('#trace-id', '');
  await page.fill('#trace-from', '2001-01-01T00:00');
  await page.fill('#trace-to', '2001-01-02T00:00');
  await page.click('form button:has-text("Search")');
  await page.waitForSelector('#trace-results .empty');
  await page.fill('#trace-to', '');
  await page.click('form button:has-text("Search")');
  await page.waitForSelector(`#trace-results td:has-text("${shared.requestId}")`);
  await shot('10-traces');
});

test('revoking the key in the UI locks it out of the API', async () => {
  await go('access', 'Tenants & keys');
  await page.locator('#keys tr', { hasText: 'ui-test-key' }).locator('button:has-text("Revoke")').click();
  await page.click('dialog button:has-text("Revoke key")');
  await page.waitForSelector('#keys tr:has-text("ui-test-key") .badge:has-text("revoked")');
  const refused = await call(shared.secret, 'POST', '/v1/chat/completions', {
    model: MODEL_ID, messages: [{ role: 'user', content: 'hi' }], max_tokens: 2,
  });
  assert.equal(refused.status, 401);
  await go('overview', 'Overview');
  await page.waitForSelector('.chart-svg rect.bar');
  await shot('11-overview-after');
  assert.deepEqual(shared.pageErrors || [], [], 'no script errors on any page');
});

test('a tenant admin signs in to its own tenant only', async () => {
  const tenants = await call(ADMIN_KEY, 'GET', '/admin/v1/tenants');
  const acme = tenants.json.data.find((t) => t.name === 'acme');
  assert.equal((await call(ADMIN_KEY, 'POST', '/admin/v1/tenants', { name: 'globex' })).status, 201);
  const created = await call(ADMIN_KEY, 'POST', '/admin/v1/keys', { name: 'acme-admin', role: 'tenant_admin', tenant_id: acme.id });
  assert.equal(created.status, 201);
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const other = await context.newPage();
  try {
    await other.goto(`${base}/ui`);
    await other.fill('#key', created.json.key);
    await other.click('button[type=submit]');
    await other.waitForSelector('.who .badge:has-text("tenant admin")');
    await other.click('nav a[href="#/access"]');
    await other.waitForSelector('#tenants td:has-text("acme")');
    assert.equal(await other.locator('#tenants td:has-text("globex")').count(), 0, 'another tenant is invisible');
    assert.equal(await other.locator('button:has-text("New tenant")').count(), 0);
    await other.waitForSelector('#keys td:has-text("ui-test-key")');
    assert.equal(await other.locator('#keys td:has-text("bootstrap admin")').count(), 0);
    await other.click('nav a[href="#/traces"]');
    await other.waitForSelector(`#trace-results tbody tr`);
    const ids = await other.locator('#trace-results tbody td:nth-child(2)').allTextContents();
    assert.ok(!ids.includes(shared.requestId), 'the admin key\'s requests are not this tenant\'s');
    await other.evaluate(() => window.scrollTo(0, 0));
    await other.screenshot({ path: path.join(SHOTS, '12-tenant-admin-traces.png'), fullPage: true });
  } finally {
    await context.close();
  }
});
