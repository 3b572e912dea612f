// Playground: chat with streaming and sampling controls, per-token probabilities, and an
// explanation of any answer drawn as a heat map over the prompt (POST /v1/explanations).
// The conversation is kept while the tab is open, so a visit to a trace can come back.

import { h, clear, badge, fmtMs, fmtInt, tooltip, errorBox, field } from '../dom.js';
import { api, request, events, ApiError } from '../api.js';

const state = {
  system: 'You are a helpful assistant.',
  /** {role, content, pieces?: [{text, logprobs}], meta?, explanation?} */
  messages: [],
  params: { model: '', temperature: 0.7, top_p: 1, max_tokens: 256, seed: '', stream: true, logprobs: true, top_logprobs: 3 },
  granularity: 'sentence',
};

/** Amber shading for an unlikely token: none at p = 1, strongest near 0. */
function shade(el, logprob) {
  const p = Math.exp(logprob);
  if (p < 0.95) el.style.backgroundColor = `rgba(245, 158, 11, ${(0.08 + 0.5 * (1 - p)).toFixed(3)})`;
}

function pct(logprob) {
  const p = 100 * Math.exp(logprob);
  return p >= 10 ? `${p.toFixed(0)}%` : p >= 1 ? `${p.toFixed(1)}%` : `${p.toPrecision(1)}%`;
}

function visible(token) {
  return token.replace(/\n/g, '⏎').replace(/ /g, '·') || '∅';
}

/** The alternatives read-out of one token. */
function alternatives(entry) {
  return h('div.alts',
    h('div.alts-head', h('code', visible(entry.token)), ' ', h('b', pct(entry.logprob))),
    (entry.top_logprobs || []).map((alt) => {
      const bar = h('span.alt-bar');
      bar.style.width = `${Math.max(2, 100 * Math.exp(alt.logprob))}%`;
      return h('div.alt', { class: alt.token === entry.token ? 'chosen' : '' }, h('code', visible(alt.token)), h('span.alt-track', bar), h('span.alt-p', pct(alt.logprob)));
    }));
}

/** A span of text carrying the logprobs of the tokens it came from. */
function piece(text, logprobs) {
  const span = h('span.tok', text);
  if (logprobs && logprobs.length) {
    const least = logprobs.reduce((a, b) => (b.logprob < a.logprob ? b : a));
    shade(span, least.logprob);
    span.tabIndex = 0;
    tooltip(span, () => h('div', logprobs.map(alternatives)));
  }
  return span;
}

/** Splits `content` at byte offsets (the explanation's segments are in UTF-8 bytes). */
function byteSlicer(content) {
  const bytes = new TextEncoder().encode(content);
  const decoder = new TextDecoder();
  return (start, end) => decoder.decode(bytes.slice(start, end));
}

export async function render(main) {
  let models = [];
  try {
    models = (await api('/v1/models')).data.filter((m) => m.type !== 'embedding' && m.has_chat_template !== false);
  } catch (err) {
    main.append(errorBox(err));
    return;
  }
  if (!state.params.model || !models.some((m) => m.id === state.params.model)) state.params.model = models[0] ? models[0].id : '';
  const p = state.params;
  let controller = null;

  const transcript = h('div.transcript#transcript', { 'aria-live': 'polite' });
  const input = h('textarea#prompt', { rows: 3, placeholder: 'Ask something… (Enter sends, Shift+Enter for a new line)' });
  const send = h('button.primary#send', { type: 'submit' }, 'Send');
  const composer = h('form.composer', input, send);
  const system = h('textarea#system', { rows: 2, value: state.system, oninput: () => { state.system = system.value; } });
  const explainBox = h('div#explain');

  composer.addEventListener('submit', (e) => { e.preventDefault(); controller ? controller.abort() : submit(); });
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) { e.preventDefault(); if (!controller) submit(); }
  });

  const number = (name, attrs) => h('input', { type: 'number', ...attrs, value: p[name], oninput: (e) => { p[name] = e.target.value; } });
  const slider = (name, min, max, step) => {
    const out = h('output', String(p[name]));
    const range = h('input', { type: 'range', min, max, step, value: p[name], oninput: (e) => { p[name] = Number(e.target.value); out.textContent = e.target.value; } });
    return h('div.slider', range, out);
  };
  const check = (name, label) => h('label.check', h('input', { type: 'checkbox', checked: p[name], onchange: (e) => { p[name] = e.target.checked; } }), label);
  const modelSelect = h('select#model', { onchange: (e) => { p.model = e.target.value; } },
    models.map((m) => h('option', { value: m.id, selected: m.id === p.model }, m.owned_by === 'ferry' ? m.id : `${m.id} (${m.owned_by.replace('ferry-', '')})`)));
  const topSelect = h('select', { onchange: (e) => { p.top_logprobs = Number(e.target.value); } },
    [0, 1, 2, 3, 5, 10].map((n) => h('option', { value: n, selected: n === p.top_logprobs }, String(n))));

  main.append(
    h('header.page-head', h('div', h('h1', 'Playground'), h('p.muted', 'Chat with a model, see how sure it was of each token, and explain what in the prompt drove the answer.')),
      h('div.actions', h('button.ghost', { type: 'button', onclick: () => { state.messages = []; clear(explainBox); draw(); } }, 'New chat'))),
    h('div.playground',
      h('div.chat-col',
        h('section.card.chat',
          h('details.system', { open: true }, h('summary', 'System prompt'), system),
          transcript,
          composer),
        explainBox),
      h('aside.card.params',
        h('h2', 'Parameters'),
        field('Model', modelSelect),
        field('Temperature', slider('temperature', 0, 2, 0.05), '0 always picks the likeliest token.'),
        field('Top p', slider('top_p', 0.05, 1, 0.05)),
        field('Max tokens', number('max_tokens', { min: 1, max: 4096, id: 'max-tokens' })),
        field('Seed', number('seed', { placeholder: 'random' }), 'The same seed and parameters give the same answer.'),
        h('div.checks-col', check('stream', 'Stream the answer'), check('logprobs', 'Token probabilities')),
        field('Alternatives per token', topSelect),
        h('p.fine', 'Hover a shaded token to see the alternatives the model considered.'))),
  );
  draw();

  function draw() {
    clear(transcript);
    if (!state.messages.length) transcript.append(h('div.empty', 'Send a message to start.'));
    state.messages.forEach((m, i) => transcript.append(bubble(m, i)));
    transcript.scrollTop = transcript.scrollHeight;
  }

  function bubble(m, index) {
    const text = h('div.text');
    if (m.pieces) text.append(...m.pieces.map((x) => piece(x.text, x.logprobs)));
    else text.append(m.content);
    if (m.chunks) text.dataset.chunks = String(m.chunks);
    const el = h('div.msg', { class: `${m.role}${m.streaming ? ' streaming' : ''}`, dataset: { index } }, h('div.role', m.role), text);
    if (m.streaming) el.append(h('div.typing', h('span'), h('span'), h('span')));
    if (m.role === 'assistant' && m.meta) el.append(metaBar(m, index));
    if (m.error) el.append(h('div.error-box', m.error));
    m.el = text;
    return el;
  }

  function metaBar(m, index) {
    const meta = m.meta;
    const local = models.find((x) => x.id === meta.model && x.owned_by === 'ferry');
    return h('div.meta',
      meta.finish_reason ? badge(meta.finish_reason, meta.finish_reason === 'stop' ? 'ok' : 'warn') : null,
      meta.usage ? h('span', `${fmtInt(meta.usage.prompt_tokens)} → ${fmtInt(meta.usage.completion_tokens)} tokens`) : null,
      meta.ttft_ms != null ? h('span', `first token ${fmtMs(meta.ttft_ms)}`) : null,
      meta.tps ? h('span', `${meta.tps.toFixed(1)} tok/s`) : null,
      h('span.spacer'),
      h('button.ghost.small.explain-btn', { type: 'button', disabled: !local, title: local ? 'Which parts of the prompt drove this answer' : 'Explanations need a local model', onclick: () => explain(index) }, 'Explain'),
      meta.request_id ? h('a.button.ghost.small.trace-link', { href: `#/traces/${encodeURIComponent(meta.request_id)}`, title: meta.request_id }, 'Trace') : null,
    );
  }

  async function submit() {
    const content = input.value.trim();
    if (!content || !p.model) return;
    input.value = '';
    state.messages.push({ role: 'user', content });
    const answer = { role: 'assistant', content: '', pieces: [], meta: null, streaming: true, chunks: 0 };
    state.messages.push(answer);
    draw();
    const body = {
      model: p.model,
      messages: conversation(state.messages.length - 1),
      temperature: Number(p.temperature),
      top_p: Number(p.top_p),
      max_tokens: Number(p.max_tokens) || 256,
      stream: p.stream,
    };
    if (p.seed !== '' && p.seed !== null) body.seed = Number(p.seed);
    if (p.logprobs) { body.logprobs = true; if (p.top_logprobs) body.top_logprobs = p.top_logprobs; }
    if (p.stream) body.stream_options = { include_usage: true };
    controller = new AbortController();
    send.textContent = 'Stop';
    send.classList.replace('primary', 'danger');
    const started = performance.now();
    const meta = { model: p.model };
    let firstAt = null;
    try {
      const response = await request('/v1/chat/completions', { method: 'POST', body, signal: controller.signal });
      meta.request_id = response.headers.get('x-request-id');
      if (p.stream) {
        for await (const chunk of events(response)) {
          if (chunk.usage) meta.usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (!choice) continue;
          if (choice.finish_reason) meta.finish_reason = choice.finish_reason;
          const text = choice.delta && choice.delta.content;
          if (!text) continue;
          if (firstAt === null) firstAt = performance.now();
          const lp = choice.logprobs && choice.logprobs.content;
          answer.content += text;
          answer.pieces.push({ text, logprobs: lp });
          answer.el.append(piece(text, lp));
          answer.el.dataset.chunks = String(++answer.chunks);
          transcript.scrollTop = transcript.scrollHeight;
        }
      } else {
        const json = await response.json();
        const choice = json.choices[0];
        firstAt = performance.now();
        answer.content = choice.message.content || '';
        meta.usage = json.usage;
        meta.finish_reason = choice.finish_reason;
        const lp = choice.logprobs && choice.logprobs.content;
        answer.pieces = lp && lp.map((t) => t.token).join('') === answer.content
          ? lp.map((t) => ({ text: t.token, logprobs: [t] }))
          : [{ text: answer.content, logprobs: null }];
      }
    } catch (err) {
      if (err.name === 'AbortError') meta.finish_reason = 'stopped';
      else answer.error = err instanceof ApiError ? `${err.status}: ${err.message}` : err.message;
      if (err.requestId) meta.request_id = err.requestId;
    } finally {
      controller = null;
      send.textContent = 'Send';
      send.classList.replace('danger', 'primary');
    }
    const ended = performance.now();
    if (firstAt !== null) meta.ttft_ms = firstAt - started;
    if (meta.usage && firstAt !== null && ended > firstAt && meta.usage.completion_tokens > 1) {
      meta.tps = (meta.usage.completion_tokens - 1) / ((ended - firstAt) / 1000);
    }
    answer.meta = meta;
    answer.streaming = false;
    draw();
    input.focus();
  }

  /** The messages before index `end`, as the API takes them, with the system prompt. */
  function conversation(end) {
    const out = state.system.trim() ? [{ role: 'system', content: state.system.trim() }] : [];
    for (const m of state.messages.slice(0, end)) if (!m.error) out.push({ role: m.role, content: m.content });
    return out;
  }

  async function explain(index) {
    const answer = state.messages[index];
    const messages = conversation(index);
    const granularity = h('div.segmented', ['message', 'sentence', 'token'].map((g) => h('button', {
      type: 'button', 'aria-selected': String(g === state.granularity),
      onclick: () => { state.granularity = g; explain(index); },
    }, g)));
    const out = h('div.explain-body', h('div.loading', h('span.spinner'), ' Measuring each segment’s effect on the answer…'));
    clear(explainBox).append(h('section.card.explain#explanation',
      h('header.card-head', h('div', h('h2', 'Explanation'), h('p.muted', 'How much each part of the prompt supported this answer: the answer’s log-likelihood drop when that part is removed.')), granularity),
      out));
    explainBox.scrollIntoView({ behavior: 'smooth', block: 'start' });
    let result;
    try {
      result = await api('/v1/explanations', { method: 'POST', body: { model: answer.meta.model, messages, completion: answer.content, granularity: state.granularity } });
    } catch (err) {
      clear(out).append(errorBox(err));
      return;
    }
    clear(out).append(heatmap(messages, result));
  }
}

/** The prompt with each segment shaded by its score, a legend, the top segments and the answer's tokens. */
function heatmap(messages, result) {
  const maxAbs = Math.max(1e-9, ...result.segments.map((s) => Math.abs(s.score)));
  const color = (score) => {
    const a = Math.min(1, Math.abs(score) / maxAbs);
    return score >= 0 ? `rgba(234, 88, 12, ${(0.06 + 0.64 * a).toFixed(3)})` : `rgba(37, 99, 235, ${(0.06 + 0.5 * a).toFixed(3)})`;
  };
  const cell = (segment, text) => {
    const span = h('span.heat-seg', { tabindex: 0, dataset: { score: segment.score.toFixed(4) } }, text);
    span.style.backgroundColor = color(segment.score);
    tooltip(span, () => h('div.alts',
      h('div.alts-head', segment.score >= 0 ? 'Supported the answer' : 'Worked against the answer'),
      h('div', `log-likelihood drop ${segment.score.toFixed(3)} nats`),
      h('div', `share of support ${(100 * segment.share).toFixed(1)}%`)));
    return span;
  };
  const blocks = messages.map((m, i) => {
    const slice = byteSlicer(m.content);
    const segs = result.segments.filter((s) => s.message_index === i).sort((a, b) => a.start - b.start);
    const size = new TextEncoder().encode(m.content).length;
    const parts = [];
    let at = 0;
    for (const s of segs) {
      if (s.start > at) parts.push(slice(at, s.start));
      parts.push(cell(s, slice(s.start, s.end)));
      at = s.end;
    }
    if (at < size) parts.push(slice(at, size));
    return h('div.heat-msg', h('div.role', m.role), h('div.heat-text', parts));
  });
  const top = [...result.segments].sort((a, b) => b.score - a.score).slice(0, 5);
  const maxTop = Math.max(1e-9, ...top.map((s) => Math.abs(s.score)));
  return h('div.explain-grid',
    h('div',
      h('div.heat-legend', h('span', 'worked against'), h('span.gradient'), h('span', 'supported')),
      h('div.heat-map', blocks),
      h('div.heat-answer', h('div.role', 'answer'), h('div.text', result.tokens.map((t) => {
        const span = piece(t.token, [t]);
        span.classList.add('answer-tok');
        return span;
      })))),
    h('div.explain-side',
      h('h3', 'Strongest segments'),
      h('ol.top-segs', top.map((s) => {
        const bar = h('span.alt-bar');
        bar.style.width = `${Math.max(2, (100 * Math.abs(s.score)) / maxTop)}%`;
        bar.style.background = s.score >= 0 ? '#ea580c' : '#2563eb';
        return h('li', h('div.seg-text', s.text.trim() || '∅'), h('div.seg-score', h('span.alt-track', bar), h('span', s.score.toFixed(2))));
      })),
      h('dl.props.compact',
        h('dt', 'Answer log-likelihood'), h('dd', result.total_logprob.toFixed(3)),
        h('dt', 'Variants scored'), h('dd', fmtInt(result.variants)),
        h('dt', 'Engine steps'), h('dd', fmtInt(result.engine_steps)),
        h('dt', 'Time'), h('dd', fmtMs(result.elapsed_ms)))));
}
