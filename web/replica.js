// A helper of the tab's worker (worker.js): it holds one replica of a hop
// trained by several Web Workers at once (core::train::Replica). For each
// step it sends back the gradients of its slice of the batch and waits
// for every replica's sum, then takes the step. Messages carry the hop's
// sequence number, so a reply to an abandoned hop is recognised.
import init, { WasmReplica } from './pkg/astraea_client.js';

const ready = init();
let replica = null;
let seq = 0;
// Compiling the module takes a while on a slow device: the tab's worker
// splits hops only between helpers that said they are ready.
ready.then(
  () => postMessage({ type: 'ready' }),
  (e) => postMessage({ type: 'failed', error: `the module did not load: ${e}` }),
);

function drop() {
  if (replica) replica.free();
  replica = null;
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

onmessage = async (event) => {
  const m = event.data;
  try {
    await ready;
    if (m.type === 'hop') {
      drop();
      seq = m.seq;
      replica = new WasmReplica(m.model, m.task, m.weights, m.images, m.labels, m.index, m.of);
      next();
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
