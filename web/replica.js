// A helper of the tab's worker (worker.js): it holds one replica of a hop
// trained by several Web Workers at once, one of two ways.
// - 'slices' (core::train::Replica, the hop's own update): for each step
//   it sends back the gradients of its slice of the batch and waits for
//   every replica's sum, then takes the step.
// - 'local' (core::train::LocalReplica, local SGD: another update): it
//   trains its own batches of a stretch, with a 'tick' a step (its
//   progress: the driver tells it from a silent one, and beats for it),
//   sends its weights, and goes on
//   from the average it is sent, until the hop is done.
// Messages carry the hop's sequence number, so a reply to an abandoned
// hop is recognised.
import init, { WasmLocalReplica, WasmReplica } from './pkg/astraea_client.js';

// Instantiated from the module the tab's worker compiled (its first
// message, 'load'): nothing to compile, and V8 shares a module's code
// between workers, so what it optimised while the tab's worker ran its
// backend trial runs here too (measured: ready in 50-190 ms, against
// 0.5-1.6 s compiling the module and warming it up with the trial's steps
// here, and the split hops as fast).
let ready = null;
let replica = null;
let local = null;
let seq = 0;

/** Instantiates `module`; says when it is ready (ms since this worker began). */
function load(module) {
  ready = init({ module_or_path: module });
  // The tab's worker splits hops only between helpers that said they are ready.
  ready.then(
    () => postMessage({ type: 'ready', ms: performance.now() }),
    (e) => postMessage({ type: 'failed', error: `the module did not load: ${e}` }),
  );
}

function drop() {
  if (replica) replica.free();
  if (local) local.free();
  replica = null;
  local = null;
}

/** Trains this replica's batches of the stretch, then sends its weights. */
function stretch() {
  for (let step = local.step(); step !== null; step = local.step()) postMessage({ type: 'tick', seq, step });
  const mine = local.weights();
  postMessage({ type: 'stretch', seq, weights: mine.weights, samples: mine.samples }, [mine.weights.buffer]);
}

function next() {
  const step = replica.gradients();
  if (step === null) {
    drop();
    postMessage({ type: 'done', seq });
    return;
  }
  postMessage({ type: 'grads', seq, grads: step.grads, loss: step.loss }, [step.grads.buffer]);
}

// A message that cannot be read here (the module, or a hop's data) is a
// failure the tab's worker hears at once, not a helper silent until its
// time limit.
onmessageerror = () => postMessage({ type: 'failed', error: 'a message could not be read by a training worker' });

onmessage = async (event) => {
  const m = event.data;
  if (m.type === 'load') {
    if (!ready) load(m.module);
    return;
  }
  try {
    if (!ready) throw new Error('a message before the module');
    await ready;
    if (m.type === 'hop' && m.mode === 'local') {
      drop();
      seq = m.seq;
      local = new WasmLocalReplica(m.model, m.task, m.weights, m.images, m.labels, m.index, m.of, m.sync);
      stretch();
    } else if (m.type === 'hop') {
      drop();
      seq = m.seq;
      replica = new WasmReplica(m.model, m.task, m.weights, m.images, m.labels, m.index, m.of);
      next();
    } else if (m.type === 'average' && m.seq === seq && local) {
      if (local.load(m.values)) {
        stretch();
      } else {
        const part = local.finish();
        drop();
        postMessage({ type: 'done', seq, steps: part.steps, lossSum: part.lossSum });
      }
    } else if (m.type === 'sum' && m.seq === seq && replica) {
      replica.apply(m.values);
      next();
    } else if (m.type === 'stop') {
      drop();
    }
  } catch (e) {
    drop();
    postMessage({ type: 'failed', seq: m.seq, error: String(e) });
  }
};
