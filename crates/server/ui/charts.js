// Time-series charts drawn as inline SVG: stacked bars or lines over time buckets, with axes,
// a legend and a hover read-out. Redrawn at the container's width when it changes.

import { h, svg, clear } from './dom.js';

const PAD = { left: 52, right: 14, top: 12, bottom: 26 };

/** The smallest "nice" number (1, 2, 2.5 or 5 × 10^k) at or above x. */
function niceCeil(x) {
  if (x <= 0) return 1;
  const exp = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * exp >= x) return m * exp;
  return 10 * exp;
}

function timeLabel(ms, bucketMs) {
  const d = new Date(ms);
  if (bucketMs >= 86400000) return d.toLocaleDateString(undefined, { month: 'short', day: 'numeric' });
  return d.toLocaleTimeString(undefined, { hour: '2-digit', minute: '2-digit' });
}

/**
 * A chart of `series` ([{name, color, values}]) over `times` (bucket starts, ms).
 * kind: 'bars' (stacked) or 'lines'. format(v) writes a value for the axis and read-out.
 */
export function timeChart({ title, times, bucketMs, series, kind = 'lines', format = String, height = 190 }) {
  const plot = h('div.chart-plot');
  const readout = h('div.chart-readout', { hidden: true });
  const legend = h('div.chart-legend', series.map((s) =>
    h('span.legend-item', h('span.swatch', { dataset: { color: s.color } }), s.name)));
  const box = h('section.card.chart', h('header.chart-head', h('h3', title), legend), h('div.chart-body', plot, readout));
  for (const swatch of legend.querySelectorAll('.swatch')) swatch.style.background = swatch.dataset.color;

  const draw = () => {
    const width = Math.max(240, plot.clientWidth);
    clear(plot).append(render({ width, height, times, bucketMs, series, kind, format, readout }));
  };
  new ResizeObserver(() => draw()).observe(plot);
  queueMicrotask(draw);
  return box;
}

function render({ width, height, times, bucketMs, series, kind, format, readout }) {
  const n = times.length;
  const w = width - PAD.left - PAD.right;
  const ht = height - PAD.top - PAD.bottom;
  const totals = times.map((_, i) => kind === 'bars'
    ? series.reduce((sum, s) => sum + (s.values[i] || 0), 0)
    : Math.max(0, ...series.map((s) => s.values[i] || 0)));
  const max = niceCeil(Math.max(0, ...totals));
  const slot = w / Math.max(1, n);
  const x = (i) => PAD.left + slot * (i + 0.5);
  const y = (v) => PAD.top + ht - (v / max) * ht;
  const root = svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, class: 'chart-svg', role: 'img' });

  // Grid and y axis.
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    root.append(
      svg('line', { x1: PAD.left, x2: width - PAD.right, y1: y(v), y2: y(v), class: k ? 'grid' : 'axis' }),
      svg('text', { x: PAD.left - 8, y: y(v) + 4, class: 'tick', 'text-anchor': 'end' }, document.createTextNode(format(v))),
    );
  }
  // X labels: about one per 90 px.
  const every = Math.max(1, Math.ceil(n / Math.max(1, Math.floor(w / 90))));
  for (let i = 0; i < n; i += every) {
    root.append(svg('text', { x: x(i), y: height - 8, class: 'tick', 'text-anchor': 'middle' },
      document.createTextNode(timeLabel(times[i], bucketMs))));
  }

  if (kind === 'bars') {
    const bw = Math.max(1, Math.min(28, slot * 0.72));
    for (let i = 0; i < n; i++) {
      let base = 0;
      for (const s of series) {
        const v = s.values[i] || 0;
        if (v <= 0) continue;
        root.append(svg('rect', {
          x: x(i) - bw / 2, y: y(base + v), width: bw, height: Math.max(1, y(base) - y(base + v)),
          fill: s.color, rx: bw > 6 ? 2 : 0, class: 'bar',
        }));
        base += v;
      }
    }
  } else {
    for (const s of series) {
      let d = '';
      let pen = false;
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      });
      if (d) root.append(svg('path', { d, fill: 'none', stroke: s.color, 'stroke-width': 2, 'stroke-linejoin': 'round', class: 'line' }));
      s.values.forEach((v, i) => {
        const lonely = (s.values[i - 1] == null) && (s.values[i + 1] == null);
        if (v !== null && v !== undefined && (lonely || n <= 48)) {
          root.append(svg('circle', { cx: x(i), cy: y(v), r: lonely ? 3 : 2.2, fill: s.color }));
        }
      });
    }
  }

  // Hover: a guide at the nearest bucket and its values.
  const guide = svg('line', { y1: PAD.top, y2: PAD.top + ht, class: 'guide', visibility: 'hidden' });
  const overlay = svg('rect', { x: PAD.left, y: PAD.top, width: w, height: ht, fill: 'transparent' });
  root.append(guide, overlay);
  overlay.addEventListener('mousemove', (e) => {
    const rect = root.getBoundingClientRect();
    const i = Math.min(n - 1, Math.max(0, Math.floor((e.clientX - rect.left - PAD.left) / slot)));
    guide.setAttribute('x1', x(i));
    guide.setAttribute('x2', x(i));
    guide.setAttribute('visibility', 'visible');
    clear(readout).append(
      h('div.readout-time', new Date(times[i]).toLocaleString(undefined, {
        month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
      })),
      ...series.map((s) => {
        const row = h('div.readout-row', h('span.swatch'), h('span', s.name), h('b', s.values[i] == null ? '—' : format(s.values[i])));
        row.firstChild.style.background = s.color;
        return row;
      }),
    );
    readout.hidden = false;
    const left = x(i) + 12;
    readout.style.left = `${left + 170 > width ? x(i) - 182 : left}px`;
  });
  overlay.addEventListener('mouseleave', () => {
    guide.setAttribute('visibility', 'hidden');
    readout.hidden = true;
  });
  return root;
}

/** A horizontal stacked bar of parts ([{name, value, color}]) with labels, e.g. timings. */
export function partsBar(parts, format = String) {
  const total = parts.reduce((s, p) => s + (p.value || 0), 0) || 1;
  const bar = h('div.parts-bar');
  for (const p of parts) {
    if (!p.value) continue;
    const seg = h('div.part', { title: `${p.name}: ${format(p.value)}` });
    seg.style.width = `${(100 * p.value) / total}%`;
    seg.style.background = p.color;
    bar.append(seg);
  }
  const legend = h('div.chart-legend', parts.map((p) => {
    const sw = h('span.swatch');
    sw.style.background = p.color;
    return h('span.legend-item', sw, `${p.name} `, h('b', p.value == null ? '—' : format(p.value)));
  }));
  return h('div.parts', bar, legend);
}
