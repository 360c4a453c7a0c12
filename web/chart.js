// Line charts on a canvas, shared by the volunteer page and the dashboard.
// No library: nothing is fetched from a CDN, and a few lines draw what we need.

/** Draws `series` ([{label, color, points: [[x, y], ...]}]) on `canvas`.
 *  Options: yMin, yMax (default: from the data), xLabel, yLabel,
 *  yFormat (a function for the axis ticks). */
export function lineChart(canvas, series, options = {}) {
  const ratio = window.devicePixelRatio || 1;
  const cssWidth = canvas.clientWidth || canvas.width;
  const cssHeight = canvas.clientHeight || canvas.height;
  if (canvas.width !== Math.round(cssWidth * ratio)) {
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssWidth, cssHeight);
  const pad = { left: 44, right: 10, top: 10, bottom: 24 };
  const w = cssWidth - pad.left - pad.right;
  const h = cssHeight - pad.top - pad.bottom;
  const all = series.flatMap((s) => s.points);
  const xs = all.map((p) => p[0]);
  const ys = all.map((p) => p[1]).filter(Number.isFinite);
  const xMin = xs.length ? Math.min(...xs) : 0;
  const xMax = xs.length ? Math.max(...xs) : 1;
  let yMin = options.yMin ?? (ys.length ? Math.min(...ys) : 0);
  let yMax = options.yMax ?? (ys.length ? Math.max(...ys) : 1);
  if (yMax - yMin < 1e-9) { yMax += 0.5; yMin -= 0.5; }
  const fmt = options.yFormat || ((v) => v.toFixed(2));
  const x = (v) => pad.left + (xMax === xMin ? w / 2 : ((v - xMin) / (xMax - xMin)) * w);
  const y = (v) => pad.top + h - ((v - yMin) / (yMax - yMin)) * h;

  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = '#777';
  ctx.strokeStyle = '#e5e5e5';
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i += 1) {
    const v = yMin + ((yMax - yMin) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, y(v)); ctx.lineTo(pad.left + w, y(v)); ctx.stroke();
    ctx.fillText(fmt(v), 2, y(v) + 4);
  }
  if (options.xLabel) ctx.fillText(options.xLabel, pad.left + w - ctx.measureText(options.xLabel).width, cssHeight - 6);
  if (xs.length) {
    ctx.fillText(String(Math.round(xMin)), pad.left, cssHeight - 6);
  }
  if (!all.length) {
    ctx.fillText(options.empty || 'no data yet', pad.left + 8, pad.top + h / 2);
    return;
  }
  let legendX = pad.left + 8;
  for (const s of series) {
    ctx.strokeStyle = s.color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    s.points.forEach(([px, py], i) => {
      if (i === 0) ctx.moveTo(x(px), y(py)); else ctx.lineTo(x(px), y(py));
    });
    ctx.stroke();
    if (s.points.length === 1) {
      ctx.fillStyle = s.color;
      ctx.beginPath(); ctx.arc(x(s.points[0][0]), y(s.points[0][1]), 3, 0, 2 * Math.PI); ctx.fill();
    }
    if (s.label && series.length > 1) {
      ctx.fillStyle = s.color;
      ctx.fillText(s.label, legendX, pad.top + 12);
      legendX += ctx.measureText(s.label).width + 14;
    }
  }
}

/** "1 min 05 s", "42 s", "3.2 s". */
export function duration(seconds) {
  if (!Number.isFinite(seconds)) return '–';
  if (seconds < 10) return `${seconds.toFixed(1)} s`;
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const m = Math.floor(seconds / 60);
  const s = Math.round(seconds % 60);
  if (m < 60) return `${m} min ${String(s).padStart(2, '0')} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
}

/** "1.4 MB". */
export function bytes(n) {
  if (n < 1e3) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}
