// The TF.js anchor of page-bench: the papers' CNN, the same layers as
// core::model (conv 12@5x5 stride 2, conv 18@3x3 stride 2, dropout 0.5,
// conv 24@2x2, dense 150, dense N; ReLU after all but the last; valid
// padding), trained with Adam 1e-3 and batch 20 on the samples page-bench
// wrote beside this page (data.bin, the shard format: docs/PROTOCOL.md),
// one epoch after a warm-up, on each backend TF.js offers here. The figure
// is samples per second of the timed epoch; window.tfjsResults holds one
// entry per backend, with its error if it could not run.

/* global tf */

async function load() {
  const bytes = new Uint8Array(await (await fetch('data.bin')).arrayBuffer());
  const view = new DataView(bytes.buffer);
  const u32 = (i) => view.getUint32(4 + 4 * i, true);
  const [count, channels, height, width, classes] = [0, 1, 2, 3, 4].map(u32);
  const offset = 24;
  const size = channels * height * width;
  // Channel-major per sample; TF.js wants channels last.
  const pixels = new Float32Array(count * size);
  for (let s = 0; s < count; s += 1) {
    for (let c = 0; c < channels; c += 1) {
      for (let p = 0; p < height * width; p += 1) {
        pixels[s * size + p * channels + c] = bytes[offset + s * size + c * height * width + p] / 255;
      }
    }
  }
  const labels = new Int32Array(count);
  for (let s = 0; s < count; s += 1) labels[s] = view.getUint16(offset + count * size + 2 * s, true);
  return { count, channels, height, width, classes, pixels, labels };
}

function cnn(data) {
  const model = tf.sequential();
  model.add(tf.layers.conv2d({
    inputShape: [data.height, data.width, data.channels], filters: 12, kernelSize: 5, strides: 2, activation: 'relu',
  }));
  model.add(tf.layers.conv2d({ filters: 18, kernelSize: 3, strides: 2, activation: 'relu' }));
  model.add(tf.layers.dropout({ rate: 0.5 }));
  model.add(tf.layers.conv2d({ filters: 24, kernelSize: 2, strides: 1, activation: 'relu' }));
  model.add(tf.layers.flatten());
  model.add(tf.layers.dense({ units: 150, activation: 'relu' }));
  model.add(tf.layers.dense({ units: data.classes }));
  model.compile({ optimizer: tf.train.adam(1e-3), loss: (y, logits) => tf.losses.softmaxCrossEntropy(y, logits) });
  return model;
}

async function trainOn(backend, data) {
  if (!(await tf.setBackend(backend))) throw new Error(`no ${backend} backend here`);
  await tf.ready();
  const x = tf.tensor4d(data.pixels, [data.count, data.height, data.width, data.channels]);
  const y = tf.oneHot(tf.tensor1d(data.labels, 'int32'), data.classes);
  const model = cnn(data);
  try {
    // Warm-up: kernels compiled, buffers allocated.
    const few = Math.min(200, data.count);
    await model.fit(x.slice(0, few), y.slice(0, few), { batchSize: 20, epochs: 1, shuffle: true, verbose: 0 });
    const started = performance.now();
    await model.fit(x, y, { batchSize: 20, epochs: 1, shuffle: true, verbose: 0 });
    const seconds = (performance.now() - started) / 1000;
    return { backend, samples: data.count, seconds, samplesPerS: data.count / seconds };
  } finally {
    model.dispose();
    x.dispose();
    y.dispose();
  }
}

(async () => {
  const results = [];
  try {
    const data = await load();
    for (const backend of ['cpu', 'wasm', 'webgl']) {
      try {
        results.push(await trainOn(backend, data));
      } catch (e) {
        results.push({ backend, error: String(e && e.message ? e.message : e) });
      }
    }
  } catch (e) {
    results.push({ backend: 'none', error: String(e) });
  }
  window.tfjsResults = results;
  document.getElementById('out').textContent = JSON.stringify(results);
})();
