// The volunteer page: Join and Leave, and what this tab is doing.
const worker = new Worker('worker.js', { type: 'module' });
const $ = (id) => document.getElementById(id);
const accuracies = [];
let samples = 0;
let seconds = 0;
let hops = 0;

function draw() {
  const canvas = $('curve');
  const ctx = canvas.getContext('2d');
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = '#ddd';
  for (let p = 0; p <= 100; p += 25) {
    const y = height - (p / 100) * height;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(width, y); ctx.stroke();
  }
  if (accuracies.length < 1) return;
  ctx.strokeStyle = '#d62728';
  ctx.lineWidth = 2;
  ctx.beginPath();
  accuracies.forEach((a, i) => {
    const x = accuracies.length === 1 ? width / 2 : (i / (accuracies.length - 1)) * width;
    const y = height - a * height;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

worker.onmessage = (event) => {
  const m = event.data;
  switch (m.type) {
    case 'status': $('status').textContent = m.text; break;
    case 'data': $('data').textContent = `${m.samples} samples (never leave this tab)`; break;
    case 'training': $('status').textContent = `training round ${m.round}, hop ${m.hop}`; break;
    case 'trained':
      hops += 1; samples += m.samples; seconds += m.seconds;
      $('contributed').textContent =
        `${hops} hops, ${samples} samples, ${seconds.toFixed(1)} s (${(samples / Math.max(seconds, 1e-3)).toFixed(0)} samples/s)`;
      $('status').textContent = `sent round ${m.round} update (loss ${m.loss.toFixed(3)})`;
      break;
    case 'round':
      accuracies.push(m.accuracy);
      $('round').textContent = m.round;
      $('accuracy').textContent = `${(m.accuracy * 100).toFixed(2)} %`;
      draw();
      break;
    case 'disconnected':
      $('status').textContent = `the server is gone; reconnecting in ${m.retryMs} ms`;
      break;
    case 'left': $('status').textContent = 'left the federation'; break;
    case 'error': $('status').textContent = `error: ${m.text}`; break;
  }
};

$('join').onclick = () => {
  const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws`;
  worker.postMessage({ type: 'join', url });
  $('join').disabled = true;
  $('leave').disabled = false;
};
$('leave').onclick = () => {
  worker.postMessage({ type: 'leave' });
  $('join').disabled = false;
  $('leave').disabled = true;
};
draw();
