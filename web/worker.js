// The tab's federation client, off the page's thread: it owns the socket,
// the WebAssembly client and the chosen backend, and tells the page what
// happens. Training blocks this worker, never the page.
import init, { Backend, WasmClient, WasmLocalReplica, WasmReplica, choose_backend, rejoin_delay_ms } from './pkg/astraea_client.js';

let client = null;
let socket = null;
let resumeToken = null;
// The last noisy label report (JSON), reused after a reload: same data, same
// report, no epsilon spent again.
let labelReport = null;
let backend = null;
let leaving = false;
// Attempts to join that failed since the tab last held a session, and
// the window its server last asked returning clients to spread over (pace
// steering): core's pace::rejoin_delay decides each wait, as natively.
let failures = 0;
let rejoinWithin = 0;
let url = null;
// Digits the volunteer drew, kept here until the tab has its data.
const drawn = { images: [], labels: [] };
// Frames are handled one after another, even across awaits (shard fetch, training).
let queue = Promise.resolve();

const say = (message, transfer) => postMessage(message, transfer || []);

// --- Every promise the tab waits on from the browser has a time limit. ---
// A call that never answers (an IndexedDB open whose request fires
// neither success nor error, an adapter request that never settles, a
// fetch that stalls) is the same failure as one that throws, and takes
// the same fallback.
const LIMITS = {
  module: 120000, // compiling the 14 MB module on a slow phone
  adapter: 5000,
  backend: 60000, // the backend trial: a few batches on each backend
  storage: 3000,
  shard: 30000,
  connect: 15000,
  hop: 60000, // a hop without a step, when the server sets no stall timeout
};

/**
 * A hop's training, or a rejection once no step has come for `ms`
 * (`lastStep()`: when the last one came): a GPU whose read back never
 * returns leaves the hop's promise pending for ever.
 */
function watched(training, ms, lastStep) {
  return new Promise((resolve, reject) => {
    const timer = setInterval(() => {
      if (performance.now() - lastStep() > ms) {
        clearInterval(timer);
        reject(new HopStalled(`the training stopped answering for ${ms / 1000} s`));
      }
    }, 250);
    training.then((v) => { clearInterval(timer); resolve(v); }, (e) => { clearInterval(timer); reject(e); });
  });
}

class HopStalled extends Error {}

/** `promise`, or a rejection naming `what` once `ms` have passed without an answer. */
function within(promise, ms, what) {
  let timer;
  const late = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not answer within ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

// The page's `?hang=storage,adapter,shard`: those browser calls never
// answer (the way to see, and test, that the tab goes on without them).
// A shard fetch hangs once.
const hang = new Set();
const never = () => new Promise(() => {});

// --- Cores lent: a hop on the CPU trained by several workers at once. ---
// This worker holds replica 0 of the hop; each helper (replica.js) one
// other. Every step each computes the gradients of its slice of the batch,
// this worker adds them up and every replica takes the same Adam step with
// the sum: the update is the one a single worker makes (up to the order of
// float sums; core::train::Replica). The page says how many cores the
// volunteer lends (`lend`); it takes effect at the next hop.
let lent = 1;
// How a hop is shared between workers: 'slices' (every batch split, the
// gradients summed each step: the single hop's update) or 'local' (local
// SGD: batches dealt, weights averaged every `sync` rounds, 0 once a hop;
// faster, but another update). The page's `?split=slices|local[:sync]`.
let splitWay = { mode: 'slices', sync: 0 };
function splitOf(text) {
  const [mode, sync] = String(text).split(':');
  if (mode !== 'local') return { mode: 'slices', sync: 0 };
  // Rounds between averages: a whole number (0 or none: once a hop).
  const k = Math.floor(Number(sync));
  return { mode, sync: Number.isFinite(k) && k > 0 ? Math.min(k, 2 ** 31) : 0 };
}
// Most workers a hop is split between.
const MAX_WORKERS = 8;
let helpers = [];
let hopSeq = 0;
// The compiled training module (loadModule), sent to every helper.
let wasmModule = null;
// The page's `?break-worker=throw|silent`: a helper is made to throw, or
// is ended without a word, after the first step of the next split hop
// (the way to see, and test, that the hop survives it).
let breakWorker = null;
// A helper that has not answered a step after this long (or half the
// server's stall timeout, if shorter: the hop must not be skipped as
// stalled meanwhile) is taken as gone: a worker that never answers is the
// same failure as one that throws.
const STEP_LIMIT_MS = 4000;

// A helper's failure, as opposed to any other error of a split hop.
class HelperFailed extends Error {}

function spawnHelper() {
  const helper = {
    worker: new Worker('replica.js', { type: 'module' }), inbox: [], wake: null, ready: false, broken: false,
  };
  const deliver = (message) => {
    if (message.type === 'ready') {
      helper.ready = true;
      say({ type: 'helper', ms: message.ms });
      return;
    }
    // A failure outside any hop (its module did not load): never ready.
    if (message.type === 'failed' && message.seq === undefined) helper.broken = true;
    helper.inbox.push(message);
    if (helper.wake) helper.wake();
  };
  helper.worker.onmessage = (e) => deliver(e.data);
  helper.worker.onerror = (e) => { e.preventDefault(); deliver({ type: 'failed', error: e.message || 'the worker failed' }); };
  helper.worker.onmessageerror = () => deliver({ type: 'failed', error: 'a message could not be read' });
  helper.worker.postMessage({ type: 'load', module: wasmModule });
  return helper;
}

/** The helper's next message of hop `seq`, or a failure after `ms`. */
function receive(helper, seq, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { helper.wake = null; reject(new HelperFailed('a training worker did not answer')); }, ms);
    const look = () => {
      while (helper.inbox.length) {
        const m = helper.inbox.shift();
        if (m.type === 'failed' && (m.seq === undefined || m.seq === seq)) {
          clearTimeout(timer); helper.wake = null; reject(new HelperFailed(m.error)); return;
        }
        if (m.seq === seq) { clearTimeout(timer); helper.wake = null; resolve(m); return; }
      }
      helper.wake = look;
    };
    look();
  });
}

function dismissHelpers() {
  for (const helper of helpers) helper.worker.terminate();
  helpers = [];
}

/**
 * Whether every helper of `team` has loaded, waiting at most `ms` for
 * them; throws if one never will.
 */
async function helpersReady(team, ms) {
  const until = performance.now() + ms;
  for (;;) {
    if (team.some((h) => h.broken)) throw new HelperFailed('a training worker did not load');
    if (team.every((h) => h.ready)) return true;
    if (performance.now() >= until) return false;
    await new Promise((resolve) => { setTimeout(resolve, 25); });
  }
}

// A split hop is under way: the helpers it uses are not changed until it ends.
let splitting = false;
// More workers only where they are faster: whole-hop samples per second,
// by the number of workers that trained the hop (the latest of each).
// Once a split hop and a hop alone were both measured, the tab keeps the
// faster; lending again measures again.
let rates = {};
let lentDecided = false;
// Counts the volunteer's lends: a hop's trial that began before one is
// not the new count's to decide.
let lendSeq = 0;
// Whether the last split hop went on alone midway (a helper failed, or it
// was weighed): not counted as a split hop.
let wentAlone = false;
let splitWarm = false;

/** Starts or ends helpers so that there are `lent - 1`, loading meanwhile (after a split hop ends). */
function staffHelpers() {
  if (splitting) return;
  while (helpers.length < lent - 1) helpers.push(spawnHelper());
  while (helpers.length > lent - 1) helpers.pop().worker.terminate();
}

/**
 * Sends hop `action` of client `c` to the helpers of `team` (helper i
 * holds replica i + 1; `how` adds the split's own fields): the hop's
 * sequence number, replica count, model and data, and when it began.
 */
function startTeam(c, team, action, how) {
  const hop = {
    n: team.length + 1, model: c.model_json(), data: c.training_data(), seq: ++hopSeq, started: performance.now(),
  };
  team.forEach((helper, i) => {
    helper.inbox = [];
    helper.worker.postMessage({
      type: 'hop', ...how, seq: hop.seq, model: hop.model, task: action.task, weights: action.weights,
      images: hop.data.images, labels: hop.data.labels, index: i + 1, of: hop.n,
    });
  });
  return hop;
}

// A split hop weighs itself against the same hop alone (before a split
// and a hop alone were both measured): after SPLIT_WARM shared steps,
// SPLIT_TRIAL shared steps are timed, then this worker's replica goes on
// alone (core's Replica::alone: the same update) and SPLIT_TRIAL steps
// alone are timed; the faster way is kept from the next hop on. Side by
// side in one hop, on the same batches, with whatever else shares the
// machine at that moment (the demo's tabs on one laptop): the trial costs
// a few dozen steps, not whole hops. Hops too short for it are compared
// whole (chooseWorkers).
const SPLIT_WARM = 8;
const SPLIT_TRIAL = 16;

/**
 * Trains the hop with `c` and the helpers of `team` (every batch split,
 * their gradients added up: the one-worker update); the update's actions.
 * A helper that fails mid-hop costs its cores, never the hop: this
 * worker's replica goes on alone from the step in flight (taken again on
 * the whole batch), the update unchanged. With `weigh`, the split is
 * weighed against itself alone (SPLIT_TRIAL) and the tab keeps the faster.
 */
async function trainReplicated(c, team, action, onStep, limitMs, weigh) {
  const { n, model, data, seq, started } = startTeam(c, team, action, {});
  const own = new WasmReplica(model, action.task, action.weights, data.images, data.labels, 0, n);
  const lends = lendSeq;
  let lossSum = 0;
  let steps = 0;
  let shared = true;
  wentAlone = false;
  // The trial's clock: when the timed shared steps began, and their time.
  let trialFrom = null;
  let sharedMs = null;
  const step1 = (step) => { lossSum += step.loss; steps += 1; onStep(step); };
  const goAlone = () => {
    shared = false;
    wentAlone = true;
    for (const helper of team) helper.worker.postMessage({ type: 'stop' });
    return own.alone();
  };
  try {
    while (shared) {
      const step = own.gradients();
      let replies;
      try {
        replies = await Promise.all(team.map((h) => receive(h, seq, limitMs)));
        for (const reply of replies) {
          if (reply.type !== (step === null ? 'done' : 'grads') || (step !== null && reply.grads.length !== step.grads.length)) {
            throw new HelperFailed('a training worker fell out of step');
          }
        }
      } catch (e) {
        if (!(e instanceof HelperFailed)) throw e;
        // The cores it lent are given up, from this step on.
        lent = 1;
        say({ type: 'workers', n: 1, reason: `a training worker failed (${e.message || e}); this tab now trains on one core` });
        const loss = goAlone();
        if (step !== null) step1({ ...step, grads: undefined, loss });
        break;
      }
      if (step === null) break;
      const sum = step.grads;
      let loss = step.loss;
      for (const reply of replies) {
        const grads = reply.grads;
        for (let k = 0; k < sum.length; k += 1) sum[k] += grads[k];
        loss += reply.loss;
      }
      if (weigh && steps === 0 && step.epochs * step.batches < SPLIT_WARM + 2 * SPLIT_TRIAL + 1) weigh = false;
      // The trial's last shared step: the helpers are stopped rather than
      // sent the sum (they would compute the next step meanwhile, on the
      // same cores as the steps alone being timed).
      const last = weigh && steps + 1 === SPLIT_WARM + SPLIT_TRIAL;
      if (last) sharedMs = performance.now() - trialFrom;
      else for (const helper of team) helper.worker.postMessage({ type: 'sum', seq, values: sum });
      own.apply(sum);
      if (breakWorker && team.length) {
        if (breakWorker === 'silent') team[0].worker.terminate();
        else team[0].worker.postMessage({ type: 'sum', seq, values: new Float32Array(1) });
        breakWorker = null;
      }
      step1({ epoch: step.epoch, epochs: step.epochs, batch: step.batch, batches: step.batches, loss, progress: step.progress });
      if (weigh && steps === SPLIT_WARM) trialFrom = performance.now();
      if (last) goAlone();
    }
    // Alone: the rest of the hop (a helper failed, or the trial goes on).
    const aloneFrom = performance.now();
    let aloneSteps = 0;
    let since = aloneFrom;
    for (let step = shared ? null : own.step(); step !== null; step = own.step()) {
      step1(step);
      aloneSteps += 1;
      if (sharedMs !== null && aloneSteps === SPLIT_TRIAL) {
        const batch = JSON.parse(action.task).batch_size;
        const rate = (ms) => (SPLIT_TRIAL * batch) / Math.max(ms / 1000, 1e-6);
        // Not if the volunteer lent anew meanwhile: that count is measured
        // afresh.
        if (lends === lendSeq && !lentDecided) keepFaster(rate(sharedMs), rate(performance.now() - aloneFrom), n);
        sharedMs = null;
      }
      // The socket and the page's messages wait for this worker's turn.
      if (performance.now() - since > 200) { await yieldNow(); since = performance.now(); }
    }
    const weights = own.finish();
    return c.finish_hop(action.task, weights, steps ? lossSum / steps : 0, (performance.now() - started) / 1000);
  } finally {
    own.free();
    // A hop given up midway (any error) leaves no helper training it.
    if (shared) for (const helper of team) helper.worker.postMessage({ type: 'stop' });
  }
}

/**
 * The helper's next message of hop `seq` other than a tick. A tick, one a
 * helper's step, restarts the wait and goes to `onTick` (the hop's
 * progress, so the heartbeats go on while this worker waits).
 */
async function receiveWork(helper, seq, ms, onTick) {
  for (;;) {
    const m = await receive(helper, seq, ms);
    if (m.type !== 'tick') return m;
    if (onTick && m.step) onTick(m.step);
  }
}

/** Lets the worker's own messages in (a timer would be clamped). */
function yieldNow() {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    channel.port1.onmessage = () => { channel.port1.close(); resolve(); };
    channel.port2.postMessage(null);
  });
}

/**
 * Trains the hop by local SGD (core::train::LocalReplica) with `c` and
 * the helpers of `team`: the batches dealt between them, weights averaged
 * (by the samples each trained) every `sync` rounds, 0 once at the end.
 * Not the single hop's update; docs/RESULTS.md measures what it costs.
 * The update's actions.
 */
async function trainLocal(c, team, action, onStep, limitMs, sync) {
  const { n, model, data, seq, started } = startTeam(c, team, action, { mode: 'local', sync });
  const own = new WasmLocalReplica(model, action.task, action.weights, data.images, data.labels, 0, n, sync);
  let finished = false;
  try {
    let averaged = null;
    for (;;) {
      let since = performance.now();
      for (let step = own.step(); step !== null; step = own.step()) {
        onStep(step);
        // The helpers' ticks and the socket wait for this worker's turn.
        if (performance.now() - since > 200) { await yieldNow(); since = performance.now(); }
      }
      const parts = [own.weights()];
      for (const helper of team) {
        const reply = await receiveWork(helper, seq, limitMs, onStep);
        if (reply.type !== 'stretch' || reply.weights.length !== parts[0].weights.length) throw new HelperFailed('a training worker fell out of step');
        parts.push(reply);
      }
      // Weighted by samples, summed in doubles: core's average_replicas.
      const total = parts.reduce((sum, p) => sum + p.samples, 0);
      const sum = new Float64Array(parts[0].weights.length);
      for (const part of parts) {
        const w = total > 0 ? part.samples / total : 1 / parts.length;
        const values = part.weights;
        for (let k = 0; k < sum.length; k += 1) sum[k] += w * values[k];
      }
      averaged = Float32Array.from(sum);
      for (const helper of team) helper.worker.postMessage({ type: 'average', seq, values: averaged });
      if (breakWorker && team.length) {
        if (breakWorker === 'silent') team[0].worker.terminate();
        else team[0].worker.postMessage({ type: 'average', seq, values: new Float32Array(1) });
        breakWorker = null;
      }
      let more;
      try {
        more = own.load(averaged);
      } catch (e) {
        // Only a helper's weights can make the average unfit (not finite).
        throw new HelperFailed(`a training worker sent weights that do not fit (${e.message || e})`);
      }
      if (!more) break;
    }
    let { steps, lossSum } = own.finish();
    for (const helper of team) {
      const reply = await receiveWork(helper, seq, limitMs, onStep);
      if (reply.type !== 'done') throw new HelperFailed('a training worker fell out of step');
      steps += reply.steps;
      lossSum += reply.lossSum;
    }
    finished = true;
    return c.finish_hop(action.task, averaged, steps ? lossSum / steps : 0, (performance.now() - started) / 1000);
  } finally {
    own.free();
    // A hop given up midway leaves no helper training it.
    if (!finished) for (const helper of team) helper.worker.postMessage({ type: 'stop' });
  }
}

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
    for (const what of String(m.hang || '').split(',').filter(Boolean)) hang.add(what);
    if (m.workers) lent = Math.max(1, Math.min(MAX_WORKERS, Math.floor(Number(m.workers)) || 1));
    breakWorker = m.breakWorker || null;
    if (m.split) splitWay = splitOf(m.split);
    queue = queue.then(() => join(m.preference)).catch((e) => say({ type: 'error', text: String(e) }));
  } else if (m.type === 'leave') {
    leaving = true;
    if (socket) {
      socket.send(JSON.stringify({ type: 'leave' }));
      socket.close();
    }
  } else if (m.type === 'lend') {
    lendSeq += 1;
    lent = Math.max(1, Math.min(MAX_WORKERS, Math.floor(Number(m.cores)) || 1));
    rates = {};
    lentDecided = false;
    splitWarm = false;
    if (backend && backend.name !== 'webgpu') staffHelpers();
  } else if (m.type === 'add-sample') {
    queue = queue.then(() => addSample(m.pixels, m.label))
      .catch((e) => say({ type: 'error', text: String(e) }));
  }
};

/**
 * Compiles the training module once and instantiates it here; helpers are
 * sent the compiled module (a WebAssembly.Module is shared between
 * workers, not copied: no helper compiles 14 MB again, and the code V8
 * optimises in one worker runs in all).
 */
async function loadModule() {
  const url = new URL('./pkg/astraea_client_bg.wasm', import.meta.url);
  const response = await fetch(url);
  if (!response.ok) throw new Error(`the training module could not be fetched (${response.status})`);
  // Compiled as it arrives where the server says application/wasm (as
  // ours does), else from the whole bytes (streaming refuses other types).
  const streams = (response.headers.get('Content-Type') || '').split(';')[0].trim() === 'application/wasm';
  const module = streams
    ? await WebAssembly.compileStreaming(response)
    : await WebAssembly.compile(await response.arrayBuffer());
  await init({ module_or_path: module });
  wasmModule = module;
}

async function join(preference) {
  if (!backend) {
    const started = performance.now();
    try {
      await within(loadModule(), LIMITS.module, 'loading the training module');
    } catch (e) {
      say({ type: 'note', text: `${e.message || e}; reload the page to try again` });
      throw e;
    }
    say({ type: 'status', text: 'choosing where to train…' });
    backend = await pickBackend(preference);
    say({
      type: 'backend', name: backend.name, adapter: backend.adapter, reason: backend.reason,
      cpuRate: backend.cpu_rate, gpuRate: backend.gpu_rate, ms: performance.now() - started,
    });
  }
  // The cores lent: helpers load now, so the first hop can be split.
  if (backend.name !== 'webgpu') staffHelpers();
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
      const asked = hang.has('adapter') ? never() : navigator.gpu.requestAdapter();
      const adapter = await within(asked, LIMITS.adapter, 'the browser, asked for a GPU adapter,');
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
  try {
    return await within(choose_backend(preference || 'auto', label, fallback, error), LIMITS.backend, 'the backend trial');
  } catch (e) {
    // WebGPU's device or trial never answered: the CPU needs neither.
    return choose_backend('cpu', label, fallback, String(e.message || e));
  }
}

function connect() {
  // Every reconnect asks to be the same client again.
  client = new WasmClient(backend, 1 << 20, true, resumeToken);
  if (labelReport) client.reuse_label_report(labelReport);
  socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  // A connection that neither opens nor fails is given up like one that
  // fails: closing it retries with back-off.
  const opening = socket;
  setTimeout(() => { if (opening.readyState === WebSocket.CONNECTING) opening.close(); }, LIMITS.connect);
  socket.onopen = () => {
    say({ type: 'connected' });
    queue = queue.then(() => run(client.start()));
  };
  socket.onmessage = (frame) => {
    queue = queue.then(() => {
      const actions = typeof frame.data === 'string'
        ? client.on_text(frame.data)
        : client.on_binary(new Uint8Array(frame.data));
      if (typeof frame.data === 'string' && frame.data.includes('"welcome"')) {
        failures = 0;
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
    // A welcomed session's server speaks for the window (none: back-off).
    if (client && client.client_id() != null) rejoinWithin = client.rejoin_within_ms() ?? 0;
    const wait = rejoin_delay_ms(rejoinWithin, failures, Math.random());
    failures += 1;
    say({ type: 'disconnected', retryMs: Math.round(wait) });
    setTimeout(connect, wait);
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
  if (hang.has('storage')) return within(never(), LIMITS.storage, 'the browser\'s storage');
  return within(new Promise((resolve, reject) => {
    const request = indexedDB.open('astraea', 1);
    request.onupgradeneeded = () => request.result.createObjectStore('shards');
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error);
    request.onblocked = () => reject(new Error('the browser\'s storage is blocked by another tab'));
  }), LIMITS.storage, 'the browser\'s storage');
}

// Resolves once the transaction has committed (a write refused for want of
// quota aborts the transaction after its request succeeded).
function cacheOp(mode, op) {
  return openCache().then((db) => within(new Promise((resolve, reject) => {
    const tx = db.transaction('shards', mode);
    const request = op(tx.objectStore('shards'));
    tx.oncomplete = () => resolve(request.result);
    tx.onabort = () => reject(tx.error || request.error || new Error('the transaction was aborted'));
    tx.onerror = () => reject(tx.error || request.error);
  }), LIMITS.storage, 'the browser\'s storage'));
}

/** What went wrong with storage, in words: a DOMException's name, else the message. */
function storageProblem(e) {
  if (e && e.name && e.name !== 'Error') return e.name;
  return (e && e.message) || String(e);
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
  } catch (e) { cacheProblem = storageProblem(e); }
  const cached = bytes !== null;
  if (!cached) {
    say({ type: 'status', text: `fetching a shard of ${action.indices.length} samples` });
    // A fetch given up is aborted, not left to download.
    const fetching = new AbortController();
    try {
      const asked = hang.has('shard') ? never() : fetch(`/api/shard/${client.client_id()}`, { signal: fetching.signal });
      hang.delete('shard');
      bytes = await within(asked.then(async (response) => {
        if (!response.ok) throw new Error(`shard: ${response.status} ${await response.text()}`);
        return new Uint8Array(await response.arrayBuffer());
      }), LIMITS.shard, 'fetching the shard');
    } catch (e) {
      fetching.abort();
      // Without its data the tab cannot report ready, and the server
      // would wait on it: it leaves and joins again as itself (its
      // token), which sends the shard's spec afresh.
      say({ type: 'note', text: `${e.message || e}; joining again` });
      if (socket) socket.close();
      return;
    }
    // Storage that failed or never answered a moment ago is not asked again.
    if (!cacheProblem) {
      try {
        await cacheOp('readwrite', (store) => store.put(bytes.buffer, key));
      } catch (e) { cacheProblem = storageProblem(e); }
    }
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

/**
 * Notes the whole-hop rate of a hop trained by `n` workers; once a split
 * hop and a hop alone were both measured, keeps the faster and says so.
 */
function chooseWorkers(n, rate) {
  if (lent === 1 || lentDecided || backend.name === 'webgpu') return;
  // The first split hop since cores were lent warms the helpers up (V8
  // optimises a module's hot code after some use): not counted.
  if (n > 1 && !splitWarm) {
    splitWarm = true;
    return;
  }
  rates[n] = rate;
  const split = rates[lent];
  const alone = rates[1];
  if (split === undefined || alone === undefined) return;
  keepFaster(split, alone, lent);
}

/**
 * Keeps the lent `n` workers if `split` (samples/s with them) beats
 * `alone` (one worker), else one; says both rates.
 */
function keepFaster(split, alone, n) {
  lentDecided = true;
  const measured = `${n} workers trained ${split.toFixed(0)} samples/s, one ${alone.toFixed(0)}`;
  if (split > alone) {
    say({ type: 'workers', n, chosen: { n, split, alone }, reason: `${measured}: this tab keeps ${n}` });
  } else {
    lent = 1;
    staffHelpers();
    say({ type: 'workers', n: 1, chosen: { n: 1, split, alone }, reason: `${measured}: this tab keeps one` });
  }
}

async function train(action) {
  const task = JSON.parse(action.task);
  say({ type: 'task', round: task.round, hop: task.hop, place: task.place || null, epochs: task.epochs });
  const started = performance.now();
  // The client and socket of this hop: a reconnection meanwhile replaces
  // the globals, and this hop's update belongs to the client it came to.
  const c = client;
  const mySocket = socket;
  let lastPost = 0;
  let lastBeat = 0; // the first step beats at once
  let lastStepAt = started;
  let abandoned = false;
  let losses = [];
  const onStep = (p) => {
    // A hop given up as stalled that steps after all says nothing more.
    if (abandoned) return;
    lastStepAt = performance.now();
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
    if (now - lastBeat > 1000 && mySocket && mySocket.readyState === WebSocket.OPEN) {
      lastBeat = now;
      mySocket.send(p.progress);
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
  let workers = backend.name === 'webgpu' ? 1 : lent;
  // A split hop was measured but no hop alone yet: this one trains alone,
  // for the comparison.
  if (workers > 1 && !lentDecided && rates[workers] !== undefined && rates[1] === undefined) workers = 1;
  let answer = null;
  let trainingFrom = started;
  const limitMs = Math.min(STEP_LIMIT_MS, task.stall_ms ? task.stall_ms / 2 : STEP_LIMIT_MS);
  // Split only between helpers that have loaded (they started loading when
  // the cores were lent; a hop waits a little for them, else trains alone).
  // The helpers of this hop, whatever the volunteer lends meanwhile (it
  // takes effect once the hop is over).
  const team = helpers.slice();
  if (workers > 1 && team.length === workers - 1) {
    splitting = true;
    try {
      if (await helpersReady(team, limitMs)) {
        // The hop alone and the split one are compared from here: waiting
        // for helpers to load happens once, not every hop.
        trainingFrom = performance.now();
        answer = splitWay.mode === 'local'
          ? await trainLocal(c, team, action, onStep, limitMs, splitWay.sync)
          : await trainReplicated(c, team, action, onStep, limitMs, !lentDecided);
        // (Not when it went on alone: a helper failed, or the trial
        // kept one, and said so.)
        if (lent > 1 && !(splitWay.mode !== 'local' && wentAlone)) say({ type: 'workers', n: workers, split: splitWay.mode });
      }
    } catch (e) {
      if (!(e instanceof HelperFailed)) throw e;
      // A helper died, threw, went silent or never loaded, in a hop by
      // local SGD or before the split began (a split of every batch goes
      // on alone by itself): the cores it lent are given up, and the hop
      // is trained again here, alone; the hop is never lost.
      lent = 1;
      say({ type: 'workers', n: 1, reason: `a training worker failed (${e.message || e}); this tab now trains on one core` });
      losses = [];
    } finally {
      splitting = false;
      staffHelpers();
    }
  }
  if (answer === null) {
    // Trained alone after all (no split, or helpers not ready or failed):
    // compared as a hop alone, timed from here.
    workers = 1;
    trainingFrom = performance.now();
    // A hop that stops stepping (the server skips it after the stall
    // timeout) is given up here too: the module is stuck inside it, so a
    // fresh client on the CPU joins again as this tab (its token).
    const training = hang.has('hop') ? never() : c.train(action.task, action.weights, onStep);
    hang.delete('hop');
    try {
      answer = await watched(training, task.stall_ms || LIMITS.hop, () => lastStepAt);
    } catch (e) {
      if (!(e instanceof HopStalled)) throw e;
      abandoned = true;
      const reason = `${e.message}; this tab now trains on the CPU`;
      backend = Backend.cpu();
      say({ type: 'backend', name: backend.name, adapter: '', reason, fellBack: true });
      say({ type: 'note', text: `${reason}, and joins again` });
      if (mySocket) mySocket.close();
      return;
    }
  }
  // WebGPU failed mid-hop and the hop was trained again on the CPU: the
  // tab stays there, on this connection and the next.
  const fell = c.take_fallback();
  if (fell) {
    backend = fell;
    say({ type: 'backend', name: fell.name, adapter: fell.adapter, reason: fell.reason, fellBack: true });
  }
  const update = JSON.parse(answer[0].text);
  const seconds = (performance.now() - started) / 1000;
  say({
    type: 'trained', round: task.round, samples: update.samples * task.epochs, loopSeconds: update.seconds,
    loss: update.loss, seconds,
  });
  const trainingSeconds = (performance.now() - trainingFrom) / 1000;
  chooseWorkers(workers, (update.samples * task.epochs) / Math.max(trainingSeconds, 1e-3));
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
        say({ type: 'round', round: action.round, accuracy: action.accuracy, epsilon: action.epsilon ?? null, last: Boolean(action.last) });
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
