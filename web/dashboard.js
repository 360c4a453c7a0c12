// The operator's dashboard: a snapshot of the run arrives over the
// WebSocket every second (and when clients come and go); nothing reloads.
import { lineChart, duration, bytes } from '/chart.js';

const $ = (id) => document.getElementById(id);
const percent = (v) => (v == null ? '–' : `${(v * 100).toFixed(2)} %`);
let last = null;

function connect() {
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const socket = new WebSocket(`${scheme}://${location.host}/ws/dashboard`);
  socket.onopen = () => { $('gone').style.display = 'none'; };
  socket.onmessage = (event) => {
    last = JSON.parse(event.data);
    render(last);
  };
  socket.onclose = () => {
    $('gone').style.display = 'block';
    setTimeout(connect, 1500);
  };
}

function text(id, value) {
  const node = $(id);
  if (node.textContent !== value) node.textContent = value;
}

function mix(counts) {
  const max = Math.max(1, ...counts);
  return `<div class="mix" title="${counts.join(' · ')}">${
    counts.map((c) => `<i style="height:${Math.max(2, (c / max) * 100)}%"></i>`).join('')}</div>`;
}

// Several servers on one run: the leader lists its gateways; a gateway
// says so, with the leader's last round (its own figures are its share).
function federation(status) {
  const gateways = status.gateways || [];
  $('federation-card').hidden = !status.gateway && gateways.length === 0;
  if ($('federation-card').hidden) return;
  const held = gateways.reduce((n, g) => n + g.clients, 0);
  const ready = gateways.reduce((n, g) => n + g.ready, 0);
  text('federation', status.gateway
    ? `This is ${status.gateway}, a gateway of the run: it trains the share of each round the leader places on it. `
      + (status.leader_round == null ? 'The leader has recorded no round yet.'
        : `The leader's last round: ${status.leader_round}, accuracy ${percent(status.leader_accuracy)}.`)
    : `This server leads the run; ${gateways.length} gateway${gateways.length === 1 ? ' holds' : 's hold'} ${held} more clients, ${ready} ready.`);
  $('gateway-list').innerHTML = gateways.length
    ? gateways.map((g) => `<tr><td>${escape(g.name)}${g.name === status.gateway ? ' (this one)' : ''}</td><td>${g.clients}</td><td>${g.ready}</td>`
      + `<td>${g.seen_s_ago.toFixed(1)} s ago</td><td>${g.busy_round == null ? '' : `round ${g.busy_round}`}</td></tr>`).join('')
    : '<tr><td colspan="5">no gateway heard from</td></tr>';
}

function escape(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function render({ status, history }) {
  const phase = $('phase');
  phase.textContent = status.phase;
  phase.className = `phase ${status.phase}`;
  text('strategy', `strategy ${status.strategy}`);
  text('round', `round ${status.round} of ${status.rounds}`);
  text('clock', `up ${duration(status.uptime_s)}`);
  const join = $('join-url');
  if (join.textContent !== status.join_url) {
    join.textContent = status.join_url;
    join.href = status.join_url;
  }
  text('clients', String(status.clients));
  text('ready', String(status.ready));
  text('accuracy', percent(status.accuracy));
  text('best', percent(status.best_accuracy));
  text('traffic', `${bytes(status.bytes_up)} / ${bytes(status.bytes_down)}`);
  text('skips', String(status.skipped_hops));
  text('rejections', String(status.rejections));
  text('eta', status.eta_s == null ? '–' : duration(status.eta_s));
  $('progress').style.width = `${(status.round_progress * 100).toFixed(1)}%`;
  text('progress-text', status.phase === 'training'
    ? `${(status.round_progress * 100).toFixed(0)} % after ${duration(status.round_elapsed_s)}` : '');
  const backends = Object.entries(status.backends).map(([name, n]) => `${n} on ${name === 'flex' ? 'CPU (flex)' : name}`);
  text('backends', backends.length ? `Backends: ${backends.join(', ')}` : 'No clients yet.');
  text('settings', `c = ${status.settings.participants} participants a round, at least ${status.settings.min_clients} ready to start, ${status.settings.hop_deadline_s} s a hop`
    + (status.mode === 'async' ? ' · asynchronous (a round is a new model)' : '')
    + (status.paused ? ' · paused' : '') + (status.stopped ? ' · stopping' : ''));
  // What the volunteers reveal (docs/PRIVACY.md).
  const label = status.privacy && status.privacy.label_epsilon
    ? `label counts reported with noise, epsilon ${status.privacy.label_epsilon} per report`
    : 'label counts reported exactly';
  const model = status.model_epsilon == null
    ? 'the model is not trained under differential privacy'
    : `model privacy spent: epsilon ${status.model_epsilon.toFixed(2)}`
      + (status.model_budget == null ? ', no budget' : ` of ${status.model_budget}`) + ` (delta ${status.model_delta})`;
  const secure = (status.privacy && status.privacy.secure_aggregation
    ? '; mediators\' results summed under secure aggregation (the server sees only their sum)'
    : '')
    + (status.privacy && status.privacy.model && status.privacy.model.distributed
      ? ', the noise added by the chains\' last clients before masking (distributed DP: the server never holds it)'
      : '');
  text('privacy', `Privacy: ${label}; ${model}${secure}.`);

  $('mediators').innerHTML = status.mediators.length
    ? status.mediators.map((m, i) => `<tr><td>${i + 1}</td><td>${m.members.map((id) =>
      (id === m.current ? `<span class="training-now">${id}</span>` : id)).join(' → ')}</td><td>${mix(m.counts)}</td><td>${m.kl.toFixed(3)}</td><td>${m.hops_done}/${m.hops}</td></tr>`).join('')
    : '<tr><td colspan="5">no round yet</td></tr>';
  $('client-list').innerHTML = status.client_list.length
    ? status.client_list.map((c) => `<tr><td>${c.id}</td><td>${c.backend === 'flex' ? 'CPU' : c.backend}</td><td>${c.samples ?? '–'}</td><td>${c.hops}</td><td>${c.samples_trained}</td><td>${c.training ? '<span class="training-now">training</span>' : c.paused ? 'paused' : ''}</td></tr>`).join('')
      + (status.clients > status.client_list.length ? `<tr><td colspan="6">… and ${status.clients - status.client_list.length} more</td></tr>` : '')
    : '<tr><td colspan="6">nobody yet</td></tr>';

  federation(status);

  lineChart($('accuracy-chart'), [{ label: 'accuracy', color: '#d62728', points: history.map((r) => [r.round, r.accuracy * 100]) }],
    { yMin: 0, yMax: 100, xLabel: 'round', yFormat: (v) => `${v.toFixed(0)} %`, empty: 'waiting for the first round' });
  lineChart($('loss-chart'), [{ label: 'test loss', color: '#9467bd', points: history.map((r) => [r.round, r.loss]) }],
    { yMin: 0, xLabel: 'round', empty: 'test loss by round' });
  lineChart($('traffic-chart'), [{ label: 'accuracy', color: '#1f77b4', points: history.map((r) => [(r.bytes_up + r.bytes_down) / 1e6, r.accuracy * 100]) }],
    { yMin: 0, yMax: 100, xLabel: 'MB moved', yFormat: (v) => `${v.toFixed(0)} %`, empty: 'accuracy by traffic' });
  lineChart($('kl-chart'), [{ label: 'mean KL of the groups', color: '#2ca02c', points: history.map((r) => [r.round, r.mean_kl]) }],
    { yMin: 0, xLabel: 'round', yFormat: (v) => v.toFixed(2), empty: 'label skew (KL to uniform) by round' });
}

$('token').value = localStorage.getItem('astraea-admin-token') || '';
for (const button of document.querySelectorAll('[data-action]')) {
  button.onclick = async () => {
    const token = $('token').value.trim();
    localStorage.setItem('astraea-admin-token', token);
    const response = await fetch(`/api/admin/${button.dataset.action}`, {
      method: 'POST', headers: { Authorization: `Bearer ${token}` },
    });
    $('admin-result').textContent = response.ok
      ? `${button.dataset.action}: done`
      : `${button.dataset.action}: ${response.status} ${await response.text()}`;
  };
}
window.addEventListener('resize', () => last && render(last));
connect();
