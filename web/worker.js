// The tab's federation client, off the page's thread: it owns the socket
// and the WebAssembly client, and tells the page what happens.
import init, { WasmClient } from './pkg/astraea_client.js';

let client = null;
let socket = null;
let leaving = false;
let backoff = 250;
// Frames are handled one after another, even across awaits (a shard fetch).
let queue = Promise.resolve();

const say = (message) => postMessage(message);

onmessage = async (event) => {
  if (event.data.type === 'join') {
    leaving = false;
    await init();
    connect(event.data.url);
  } else if (event.data.type === 'leave') {
    leaving = true;
    if (socket) {
      socket.send(JSON.stringify({ type: 'leave' }));
      socket.close();
    }
  }
};

function connect(url) {
  client = new WasmClient('flex', 1 << 20, true);
  socket = new WebSocket(url);
  socket.binaryType = 'arraybuffer';
  socket.onopen = () => {
    backoff = 250;
    say({ type: 'status', text: 'connected, joining' });
    queue = queue.then(() => run(client.start()));
  };
  socket.onmessage = (frame) => {
    queue = queue.then(() => {
      const actions = typeof frame.data === 'string'
        ? client.on_text(frame.data)
        : client.on_binary(new Uint8Array(frame.data));
      return run(actions);
    }).catch((error) => say({ type: 'error', text: String(error) }));
  };
  socket.onclose = () => {
    if (leaving) {
      say({ type: 'left' });
      return;
    }
    say({ type: 'disconnected', retryMs: backoff });
    setTimeout(() => connect(url), backoff);
    backoff = Math.min(backoff * 2, 5000);
  };
}

async function run(actions) {
  for (const action of actions) {
    switch (action.kind) {
      case 'send':
        socket.send(action.text);
        break;
      case 'send-binary':
        for (const frame of action.frames) socket.send(frame);
        break;
      case 'load-shard': {
        say({ type: 'status', text: `loading a shard of ${action.indices.length} samples` });
        const response = await fetch(`/api/shard/${client.client_id()}`);
        const bytes = new Uint8Array(await response.arrayBuffer());
        await run(client.set_shard(bytes));
        say({ type: 'data', samples: action.indices.length });
        break;
      }
      case 'apply-plan':
        await run(client.apply_plan(action.ratios, action.seed));
        say({ type: 'status', text: 'augmentation plan applied' });
        break;
      case 'train': {
        const task = JSON.parse(action.task);
        say({ type: 'training', round: task.round, hop: task.hop });
        const started = performance.now();
        const answer = client.train(action.task, action.weights);
        const update = JSON.parse(answer[0].text);
        say({ type: 'trained', round: task.round, samples: update.samples * task.epochs,
              loss: update.loss, seconds: (performance.now() - started) / 1000 });
        await run(answer);
        break;
      }
      case 'round-done':
        say({ type: 'round', round: action.round, accuracy: action.accuracy });
        break;
      case 'close':
        leaving = true;
        say({ type: 'error', text: action.reason });
        socket.close();
        break;
    }
  }
}
