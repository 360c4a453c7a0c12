// The tab's federation client, off the page's thread: it owns the socket,
// the WebAssembly client and the chosen backend, and tells the page what
// happens. Training blocks this worker, never the page.
import init, { WasmClient, choose_backend } from './pkg/astraea_client.js';

let client = null;
let socket = null;
let resumeToken = null;
// The last noisy label report (JSON), reused after a reload: same data, same
// report, no epsilon spent again.
let labelReport = null;
let backend = null;
let leaving = false;
let backoff = 250;
let url = null;
// Digits the volunteer drew, kept here until the tab has its data.
const drawn = { images: [], labels: [] };
// Frames are handled one after another, even across awaits (shard fetch, training).
let queue = Promise.resolve();

const say = (message, transfer) => postMessage(message, transfer || []);

// The WebGPU device wgpu asked the browser for, kept so that the page's
// `?lose-gpu=1` can destroy it in the first hop: the way to see (and test)
// the fallback to the CPU without a GPU that crashes.
let gpuDevice = null;
let loseGpu = false;
if (self.GPUAdapter) {
  const requestDevice = GPUAdapter.prototype.requestDevice;
  GPUAdapter.prototype.requestDevice = async function keepDevice(...args) {
    gpuDevice = await requestDevice.apply(this, args);
    return gpuDevice;
  };
}

onmessage = (event) => {
  const m = event.data;
  if (m.type === 'join') {
    leaving = false;
    url = m.url;
    // The page keeps the token across reloads (sessionStorage).
    resumeToken = m.resume || null;
    labelReport = m.labelReport || null;
    loseGpu = Boolean(m.loseGpu);
    queue = queue.then(() => join(m.preference)).catch((e) => say({ type: 'error', text: String(e) }));
  } else if (m.type === 'leave') {
    leaving = true;
    if (socket) {
      socket.send(JSON.stringify({ type: 'leave' }));
      socket.close();
    }
  } else if (m.type === 'add-sample') {
    queue = queue.then(() => addSample(m.pixels, m.label))
      .catch((e) => say({ type: 'error', text: String(e) }));
  }
};

async function join(preference) {
  if (!backend) {
    const started = performance.now();
    await init();
    say({ type: 'status', text: 'choosing where to train…' });
    backend = await pickBackend(preference);
    say({
      type: 'backend', name: backend.name, adapter: backend.adapter, reason: backend.reason,
      cpuRate: backend.cpu_rate, gpuRate: backend.gpu_rate, ms: performance.now() - started,
    });
  }
  connect();
}

/** What the browser offers for WebGPU, then the measured choice. */
async function pickBackend(preference) {
  let label = '';
  let fallback = false;
  let error = null;
  if (!self.isSecureContext) {
    error = 'this page is not a secure context (open it over HTTPS, or on localhost)';
  } else if (!('gpu' in navigator)) {
    error = 'this browser has no WebGPU';
  } else {
    try {
      const adapter = await navigator.gpu.requestAdapter();
      if (!adapter) {
        error = 'the browser offered no adapter';
      } else {
        const info = adapter.info || {};
        label = [info.vendor, info.architecture, info.description].filter(Boolean).join(' ') || 'unnamed adapter';
        fallback = Boolean(adapter.isFallbackAdapter || info.isFallbackAdapter);
      }
    } catch (e) {
      error = `asking for an adapter failed: ${e}`;
    }
  }
  return choose_backend(preference || 'auto', label, fallback, error);
}

function connect() {
  // Every reconnect asks to be the same client again.
  client = new WasmClient(backend, 1 << 20, true, resumeToken);
  if (labelReport) client.reuse_label_report(labelReport);
  socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  socket.onopen = () => {
    backoff = 250;
    say({ type: 'connected' });
    queue = queue.then(() => run(client.start()));
  };
  socket.onmessage = (frame) => {
    queue = queue.then(() => {
      const actions = typeof frame.data === 'string'
        ? client.on_text(frame.data)
        : client.on_binary(new Uint8Array(frame.data));
      if (typeof frame.data === 'string' && frame.data.includes('"welcome"')) {
        resumeToken = client.resume_token() || resumeToken;
        say({ type: 'welcome', clientId: client.client_id(), resume: resumeToken, labelEpsilon: client.label_epsilon() ?? null, secureAggregation: client.secure_aggregation(), modelPrivacy: JSON.parse(client.model_privacy() ?? 'null') });
      }
      return run(actions);
    }).catch((error) => say({ type: 'error', text: String(error) }));
  };
  socket.onclose = () => {
    if (leaving) {
      say({ type: 'left' });
      return;
    }
    say({ type: 'disconnected', retryMs: backoff });
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 5000);
  };
}

async function addSample(pixels, label) {
  if (client && client.label_counts().length) {
    await run(client.add_samples(pixels, new Uint32Array([label])));
    say({ type: 'data', counts: Array.from(client.label_counts()), drawn: drawn.labels.length + 1, labelSpent: client.label_epsilon_spent(), labelReport: keepReport() });
  }
  drawn.images.push(pixels);
  drawn.labels.push(label);
  say({ type: 'drawn', count: drawn.labels.length });
}

// --- The shard cache: IndexedDB, so a reload does not fetch it again. ---

function openCache() {
  return new Promise((resolve, reject) => {
    const request = indexedDB.open('astraea', 1);
    request.onupgradeneeded = () => request.result.createObjectStore('shards');
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
  });
}

// Resolves once the transaction has committed (a write refused for want of
// quota aborts the transaction after its request succeeded).
function cacheOp(mode, op) {
  return openCache().then((db) => new Promise((resolve, reject) => {
    const tx = db.transaction('shards', mode);
    const request = op(tx.objectStore('shards'));
    tx.oncomplete = () => resolve(request.result);
    tx.onabort = () => reject(tx.error || request.error || new Error('the transaction was aborted'));
    tx.onerror = () => reject(tx.error || request.error);
  }));
}

/** A key naming the shard's content: dataset, size and a hash of its indices. */
function shardKey(dataset, indices) {
  let hash = 0x811c9dc5;
  for (const i of indices) {
    hash ^= i;
    hash = Math.imul(hash, 0x01000193) >>> 0;
  }
  return `${dataset}:${indices.length}:${hash.toString(16)}`;
}

async function loadShard(action) {
  const key = shardKey(action.dataset, action.indices);
  let bytes = null;
  // Why the browser keeps no copy of the shard, if it does not (IndexedDB
  // blocked, private mode, no quota): the tab then trains from memory and
  // says so; a reload fetches the shard again.
  let cacheProblem = null;
  try {
    const cached = await cacheOp('readonly', (store) => store.get(key));
    if (cached) bytes = new Uint8Array(cached);
  } catch (e) { cacheProblem = (e && (e.name || e.message)) || String(e); }
  const cached = bytes !== null;
  if (!cached) {
    say({ type: 'status', text: `fetching a shard of ${action.indices.length} samples` });
    const response = await fetch(`/api/shard/${client.client_id()}`);
    if (!response.ok) throw new Error(`shard: ${response.status} ${await response.text()}`);
    bytes = new Uint8Array(await response.arrayBuffer());
    try {
      await cacheOp('readwrite', (store) => store.put(bytes.buffer, key));
    } catch (e) { cacheProblem = cacheProblem || (e && (e.name || e.message)) || String(e); }
  }
  await run(client.set_shard(bytes));
  if (drawn.labels.length) {
    const flat = new Float32Array(drawn.images.reduce((n, p) => n + p.length, 0));
    let offset = 0;
    for (const p of drawn.images) { flat.set(p, offset); offset += p.length; }
    await run(client.add_samples(flat, new Uint32Array(drawn.labels)));
  }
  say({ type: 'data', counts: Array.from(client.label_counts()), cached, bytes: bytes.length, drawn: drawn.labels.length, labelSpent: client.label_epsilon_spent(), labelReport: keepReport(), cacheProblem });
}

async function train(action) {
  const task = JSON.parse(action.task);
  say({ type: 'task', round: task.round, hop: task.hop, place: task.place || null, epochs: task.epochs });
  const started = performance.now();
  let lastPost = 0;
  let lastBeat = 0; // the first step beats at once
  let losses = [];
  const onStep = (p) => {
    losses.push(p.loss);
    if (loseGpu && gpuDevice && backend.name === 'webgpu') {
      const device = gpuDevice;
      loseGpu = false;
      setTimeout(() => device.destroy(), 0);
    }
    const now = performance.now();
    // The heartbeat, from the worker itself (the page's timers are
    // throttled in a hidden tab): at most one a second, well inside the
    // server's task.stall_ms.
    if (now - lastBeat > 1000 && socket && socket.readyState === WebSocket.OPEN) {
      lastBeat = now;
      socket.send(p.progress);
    }
    const last = p.epoch === p.epochs - 1 && p.batch === p.batches - 1;
    // At most ~8 messages a second: a fast CPU takes hundreds of steps a
    // second, and every message costs the page a redraw on the same cores.
    if (now - lastPost > 125 || last) {
      lastPost = now;
      say({ type: 'step', ...p, losses, elapsed: (now - started) / 1000 });
      losses = [];
    }
  };
  const answer = await client.train(action.task, action.weights, onStep);
  // WebGPU failed mid-hop and the hop was trained again on the CPU: the
  // tab stays there, on this connection and the next.
  const fell = client.take_fallback();
  if (fell) {
    backend = fell;
    say({ type: 'backend', name: fell.name, adapter: fell.adapter, reason: fell.reason, fellBack: true });
  }
  const update = JSON.parse(answer[0].text);
  say({
    type: 'trained', round: task.round, samples: update.samples * task.epochs, loopSeconds: update.seconds,
    loss: update.loss, seconds: (performance.now() - started) / 1000,
  });
  await run(answer);
}

async function run(actions) {
  for (const action of actions) {
    switch (action.kind) {
      case 'send':
        // A closed socket drops the message; the rejoin reports afresh.
        if (socket.readyState === WebSocket.OPEN) socket.send(action.text);
        break;
      case 'send-binary':
        if (socket.readyState === WebSocket.OPEN) for (const frame of action.frames) socket.send(frame);
        break;
      case 'load-shard':
        await loadShard(action);
        break;
      case 'apply-plan':
        await run(client.apply_plan(action.ratios, action.seed));
        say({ type: 'plan', counts: Array.from(client.label_counts()) });
        break;
      case 'train':
        await train(action);
        break;
      case 'round-done':
        say({ type: 'round', round: action.round, accuracy: action.accuracy, epsilon: action.epsilon ?? null });
        break;
      case 'ack':
        // What the server did with this tab's last update (accepted, stale, refused).
        say({ type: 'ack', round: action.round, hop: action.hop, outcome: action.outcome, reason: action.reason });
        break;
      case 'close':
        leaving = true;
        say({ type: 'error', text: action.reason });
        socket.close();
        break;
    }
  }
}

// This session's noisy label report, kept for the next connection too.
function keepReport() {
  labelReport = client.label_report() || labelReport;
  return labelReport;
}
