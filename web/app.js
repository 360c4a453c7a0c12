// The volunteer page: Join and Leave, and what this tab is doing. The
// federation client runs in a Web Worker (worker.js), so training never
// freezes the page. `window.astraea` holds the figures the page shows, for
// the end-to-end tests and for anyone curious in the console.
import { lineChart, duration } from '/chart.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const worker = new Worker('worker.js', { type: 'module' });
/** What the page says when the browser keeps no copy of the shard. */
function storageNote() {
  return page.cacheProblem
    ? `. This browser keeps no copy of them (${page.cacheProblem}): the tab trains from memory, and a reload fetches them again`
    : '';
}
/**
 * What the page says of client-level DP on the model (the welcome's
 * privacy.model, docs/PRIVACY.md), with the epsilon spent so far when a
 * round has reported it.
 */
function modelPrivacyText(epsilon) {
  const dp = page.modelPrivacy;
  if (!dp) return 'none: the models this run releases are not differentially private';
  const who = dp.distributed
    ? 'the last client of each chain before masking its result (so the server never holds it)'
    : 'the server';
  const spent = epsilon == null
    ? 'nothing spent yet'
    : `spent so far: epsilon ${epsilon.toFixed(2)} at delta ${dp.delta}`;
  return `each round, a group's update may move the model at most ${dp.clip} (L2), and Gaussian noise`
    + ` scaled to that bound (multiplier ${dp.noise_multiplier.toPrecision(3)}) is added by ${who}: the released models`
    + ` are differentially private for every volunteer. ${spent}`
    + (dp.budget != null ? ` of a budget of ${dp.budget}` : '') + '.';
}

const page = window.astraea = {
  backend: null, clientId: null, firstStepMs: null, readyMs: null, steps: 0,
  hops: 0, samples: 0, seconds: 0, loopSeconds: 0, losses: [], accuracies: [], drawn: 0, shardCached: null,
  modelPrivacy: null,
};
let counts = [];

// Charts are redrawn at most once a frame, however many messages arrive.
let chartsPending = false;
function scheduleCharts() {
  if (chartsPending) return;
  chartsPending = true;
  requestAnimationFrame(() => { chartsPending = false; drawCharts(); });
}

function drawCharts() {
  const stride = Math.max(1, Math.ceil(page.losses.length / 600));
  const points = [];
  for (let i = 0; i < page.losses.length; i += stride) points.push([i + 1, page.losses[i]]);
  lineChart($('loss-chart'), [{ label: 'training loss', color: '#ff7f0e', points }],
    { yMin: 0, xLabel: 'step', empty: 'the loss of each training step' });
  lineChart($('accuracy-chart'), [{ label: 'accuracy', color: '#d62728', points: page.accuracies.map(([r, a]) => [r, a * 100]) }],
    { yMin: 0, yMax: 100, xLabel: 'round', yFormat: (v) => `${v.toFixed(0)} %`, empty: 'after the first round' });
}

function drawMix() {
  const max = Math.max(1, ...counts);
  $('mix').innerHTML = counts.map((c) => `<div style="height:${(c / max) * 100}%" title="${c}"></div>`).join('');
  $('mix-labels').innerHTML = counts.map((_, i) => `<span>${i}</span>`).join('');
  const select = $('digit');
  if (select.options.length !== counts.length) {
    select.innerHTML = counts.map((_, i) => `<option>${i}</option>`).join('');
  }
}

function banner(text, kind) {
  const node = $('banner');
  node.textContent = text || '';
  node.className = text ? `banner ${kind}` : 'banner';
}

worker.onmessage = (event) => {
  const m = event.data;
  switch (m.type) {
    case 'status': $('status').textContent = m.text; break;
    case 'backend': {
      page.backend = m;
      const name = m.name === 'webgpu' ? `WebGPU (${m.adapter || 'adapter'})` : 'CPU (burn flex, WebAssembly)';
      const rates = [m.cpuRate && `CPU ${m.cpuRate.toFixed(0)}`, m.gpuRate && `WebGPU ${m.gpuRate.toFixed(0)}`].filter(Boolean);
      $('backend').textContent = rates.length ? `${name}; trial: ${rates.join(', ')} samples/s` : name;
      $('backend-reason').textContent = m.reason;
      if (m.name !== 'webgpu' && !self.isSecureContext) {
        banner('This page is not served over HTTPS, so the browser hides the GPU: this tab trains on the CPU. Ask the organiser for the https:// address (astraea serve --tls).', 'note');
      }
      break;
    }
    case 'helper':
      // A helper worker loaded: ms from its start to ready.
      (page.helperReadyMs = page.helperReadyMs || []).push(Math.round(m.ms));
      break;
    case 'workers':
      page.workers = m.n;
      if (m.split) page.split = m.split;
      if (m.chosen) page.workersChosen = m.chosen;
      // A hop split between workers (the message after each, without a reason).
      if (m.n > 1 && !m.reason) page.splitHops = (page.splitHops || 0) + 1;
      $('cores').value = String(m.n);
      $('cores-note').textContent = `training on ${m.n} core${m.n === 1 ? '' : 's'}`
        + (m.n > 1 && m.split === 'local' ? ' by local SGD (weights averaged, not the one-core update)' : '')
        + (m.reason ? ` (${m.reason})` : '');
      break;
    case 'connected': banner(''); $('status').textContent = 'connected, joining'; break;
    case 'welcome':
      page.clientId = m.clientId;
      $('client').textContent = `#${m.clientId}`;
      // A reload of this tab comes back as the same client (same shard).
      page.resume = m.resume || null;
      try { if (m.resume) sessionStorage.setItem('astraea-resume', m.resume); } catch (e) { /* storage off */ }
      // What this run learns of the volunteer (docs/PRIVACY.md).
      $('leaves').textContent = 'the weights after each training hop (never your images)'
        + (m.secureAggregation
          ? ', except the last of your group\'s chain, which leaves masked: the server learns only the sum of all groups\' results (secure aggregation); '
          : '; ')
        + (m.labelEpsilon
          ? `how many images of each label you hold, with random noise added (label privacy: epsilon ${m.labelEpsilon} per report, give or take ${(Math.sqrt(2 * Math.exp(-m.labelEpsilon)) / (1 - Math.exp(-m.labelEpsilon))).toFixed(1)} images a label)`
          : 'how many images of each label you hold, exactly (this run asks for no label privacy)')
        + (self.isSecureContext ? '' : '. This connection is not encrypted (http): others on the network can read it');
      page.modelPrivacy = m.modelPrivacy || null;
      $('model-privacy').textContent = modelPrivacyText(page.modelPrivacy ? page.modelPrivacy.spent ?? null : null);
      break;
    case 'data':
      counts = m.counts;
      page.shardCached = m.cached ?? page.shardCached;
      page.readyMs = page.readyMs ?? performance.now();
      $('data').textContent = `${counts.reduce((a, b) => a + b, 0)} samples (never leave this tab)`
        + (m.cached === true ? ', from this browser\'s cache' : m.cached === false ? `, fetched (${(m.bytes / 1024).toFixed(0)} KiB)` : '')
        + (m.drawn ? `, ${m.drawn} drawn by you` : '');
      page.cacheProblem = m.cacheProblem ?? page.cacheProblem ?? null;
      $('data').textContent += storageNote();
      $('status').textContent = 'ready: waiting for a task';
      try { if (m.labelReport) sessionStorage.setItem('astraea-label-report', m.labelReport); } catch (e) { /* storage off */ }
      if (m.labelSpent) {
        $('leaves').dataset.spent = ` Label privacy spent by this tab so far: epsilon ${m.labelSpent.toFixed(1)} (each report of new counts spends it again).`;
        if (!$('leaves').textContent.includes('spent by this tab')) $('leaves').textContent += $('leaves').dataset.spent;
        else $('leaves').textContent = $('leaves').textContent.replace(/ Label privacy spent.*$/, $('leaves').dataset.spent);
      }
      drawMix();
      break;
    case 'plan':
      counts = m.counts;
      $('data').textContent = `${counts.reduce((a, b) => a + b, 0)} samples after the server's augmentation plan (made here, never sent)` + storageNote();
      drawMix();
      break;
    case 'task': {
      $('status').textContent = `training round ${m.round}`;
      $('round').textContent = m.round;
      const p = m.place;
      $('place').textContent = p
        ? `${p.mediator} of ${p.mediators}; place ${p.position} of ${p.members} in its chain, pass ${p.pass} of ${p.passes}`
        : 'a FedAvg participant';
      break;
    }
    case 'step': {
      page.steps += m.losses.length;
      page.losses.push(...m.losses);
      if (page.firstStepMs === null) page.firstStepMs = performance.now();
      const done = (m.epoch * m.batches + m.batch + 1) / (m.epochs * m.batches);
      $('epoch-text').textContent = `${m.epoch + 1} of ${m.epochs}`;
      $('batch-text').textContent = `${m.batch + 1} of ${m.batches}`;
      $('epoch-bar').style.width = `${(done * 100).toFixed(1)}%`;
      $('batch-bar').style.width = `${(((m.batch + 1) / m.batches) * 100).toFixed(1)}%`;
      $('eta').textContent = done < 1 ? `about ${duration((m.elapsed * (1 - done)) / done)} left` : 'done';
      $('step-loss').textContent = `loss ${m.loss.toFixed(3)}`;
      scheduleCharts();
      break;
    }
    case 'trained':
      page.hops += 1; page.samples += m.samples; page.seconds += m.seconds; page.loopSeconds += m.loopSeconds;
      $('contributed').textContent =
        `${page.hops} hops, ${page.samples} samples in ${duration(page.seconds)} (${(page.samples / Math.max(page.seconds, 1e-3)).toFixed(0)} samples/s)`;
      $('status').textContent = `sent the round ${m.round} update (mean loss ${m.loss.toFixed(3)})`;
      break;
    case 'ack':
      $('status').textContent = m.outcome === 'accepted'
        ? `the server took the round ${m.round} update`
        : `the server did not take the round ${m.round} update (${m.outcome}${m.reason ? `: ${m.reason}` : ''})`;
      break;
    case 'round':
      if (m.epsilon != null) $('model-privacy').textContent = modelPrivacyText(m.epsilon);
      page.accuracies.push([m.round, m.accuracy]);
      $('accuracy').textContent = `${(m.accuracy * 100).toFixed(2)} % after round ${m.round}`;
      if (m.last) {
        page.runOver = true;
        banner(`The run is over after round ${m.round}: thank you for lending this tab. You can close it.`, 'note');
        $('status').textContent = 'the run is over';
      }
      scheduleCharts();
      break;
    case 'drawn':
      page.drawn = m.count;
      $('drawn').textContent = `${m.count} drawn digit${m.count === 1 ? '' : 's'} in this tab's data`;
      break;
    case 'disconnected':
      banner(`The server is gone; reconnecting in ${duration(m.retryMs / 1000)}…`, 'gone');
      $('status').textContent = 'disconnected';
      break;
    case 'left': $('status').textContent = 'left the federation'; break;
    case 'error': $('status').textContent = `error: ${m.text}`; break;
    case 'note':
      // Something the browser did not do (a call that never answered),
      // and what the tab did instead.
      (page.notes = page.notes || []).push(m.text);
      banner(m.text, 'note');
      break;
  }
};

function join() {
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
  let resume = null;
  let labelReport = null;
  try {
    resume = sessionStorage.getItem('astraea-resume');
    labelReport = sessionStorage.getItem('astraea-label-report');
  } catch (e) { /* storage off */ }
  worker.postMessage({
    type: 'join', url, preference: params.get('backend') || 'auto', resume, labelReport,
    loseGpu: params.get('lose-gpu') === '1', workers: Number($('cores').value) || 1,
    hang: params.get('hang'),
    breakWorker: params.get('break-worker'),
    split: params.get('split'),
  });
  $('join').disabled = true;
  $('leave').disabled = false;
  $('status').textContent = 'starting…';
}

// The browser's lifecycle. A page about to be frozen (Chromium freezes
// background tabs; a phone's locked screen stops them) tells the server it
// is pausing, so that its chain moves on at once instead of after the
// stall timeout, and that it is not drawn until it is back. A beacon, not a
// message to the worker: the worker may be mid-step or frozen with the page,
// and the browser delivers a beacon after the page stops. Hidden tabs on a
// desktop keep training in the worker and say nothing; on a phone, where
// the system suspends a hidden page without a `freeze` event (iOS), hiding
// is pausing. docs/PROTOCOL.md, "Pausing".
page.lifecycle = [];
function tellServer(state) {
  if (!page.resume || $('join').disabled === false) return;
  const sent = navigator.sendBeacon('/api/lifecycle', JSON.stringify({ resume: page.resume, state }));
  page.lifecycle.push({ state, sent });
  $('status').textContent = state === 'paused'
    ? 'paused: told the server, which gives this tab\'s work to others until it is back'
    : 'back: waiting for a task';
}
const mobile = navigator.userAgentData?.mobile ?? /Mobi|Android|iPhone|iPad/.test(navigator.userAgent);
document.addEventListener('freeze', () => tellServer('paused'));
document.addEventListener('resume', () => tellServer('active'));
document.addEventListener('visibilitychange', () => {
  if (mobile) tellServer(document.visibilityState === 'hidden' ? 'paused' : 'active');
});

$('join').onclick = join;
$('leave').onclick = () => {
  worker.postMessage({ type: 'leave' });
  $('join').disabled = false;
  $('leave').disabled = true;
};

// --- Drawing digits: white on black like MNIST, scaled down to 28x28. ---
const pad = $('pad');
const ink = pad.getContext('2d');
function clearPad() { ink.fillStyle = 'black'; ink.fillRect(0, 0, pad.width, pad.height); }
clearPad();
let drawing = false;
const at = (e) => {
  const r = pad.getBoundingClientRect();
  return [((e.clientX - r.left) / r.width) * pad.width, ((e.clientY - r.top) / r.height) * pad.height];
};
pad.onpointerdown = (e) => { drawing = true; pad.setPointerCapture(e.pointerId); ink.beginPath(); ink.moveTo(...at(e)); };
pad.onpointermove = (e) => {
  if (!drawing) return;
  ink.strokeStyle = 'white'; ink.lineWidth = 16; ink.lineCap = 'round'; ink.lineJoin = 'round';
  ink.lineTo(...at(e)); ink.stroke();
};
pad.onpointerup = () => { drawing = false; };
$('clear').onclick = clearPad;
$('add').onclick = () => {
  const small = new OffscreenCanvas(28, 28);
  const ctx = small.getContext('2d');
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(pad, 0, 0, 28, 28);
  const rgba = ctx.getImageData(0, 0, 28, 28).data;
  const pixels = new Float32Array(28 * 28);
  for (let i = 0; i < pixels.length; i += 1) pixels[i] = rgba[i * 4] / 255;
  worker.postMessage({ type: 'add-sample', pixels, label: Number($('digit').value || 0) });
  clearPad();
};
counts = new Array(10).fill(0);
drawMix();
drawCharts();
window.addEventListener('resize', drawCharts);
// Cores the volunteer lends: up to what the browser reports, at most 8.
// By default half of them, at most 4, where the browser reports 4 or more
// (the rest stay with the browser and the volunteer), else one; the tab
// then measures a split hop against a hop alone and keeps the faster.
// ?workers=N or the volunteer's pick overrides it.
{
  const most = Math.max(1, Math.min(8, navigator.hardwareConcurrency || 1));
  const suggested = most >= 4 ? Math.min(4, Math.floor(most / 2)) : 1;
  const asked = Math.max(1, Math.min(most, Number(params.get('workers')) || suggested));
  $('cores').innerHTML = Array.from({ length: most }, (_, i) => `<option>${i + 1}</option>`).join('');
  $('cores').value = String(asked);
  $('cores-note').textContent = `of ${most}; a hop on the CPU is split between them`;
  $('cores').onchange = () => worker.postMessage({ type: 'lend', cores: Number($('cores').value) });
}

if (params.get('join') === '1') join();
