// The page: loads a checkpoint into the worker, sends sampling and forward-process requests, and
// draws what comes back. URL parameters preset the controls (num, seed, steps, solver, class,
// guidance); auto=1 samples as soon as the model is loaded. document.body.dataset.state tells a
// test where the page is: loading, ready, sampling, done or error.
const $ = (id) => document.getElementById(id);
const DEFAULT_SOURCE = 'The default model';
const worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
const params = new URLSearchParams(location.search);
let info = null;
let forwardImage = null;
let forwardPending = false;
let forwardWanted = null;
let autoSample = params.get('auto') === '1';
let modelSource = '';
let sampling = false;

for (const id of ['num', 'seed', 'steps', 'solver', 'guidance']) {
  if (params.has(id)) $(id).value = params.get(id);
}

function setState(state) { document.body.dataset.state = state; }
function showError(message) { $('error').textContent = message; setState('error'); }

function draw(canvas, width, height, rgba) {
  canvas.width = width;
  canvas.height = height;
  const pixels = new ImageData(new Uint8ClampedArray(rgba.buffer, rgba.byteOffset, rgba.byteLength), width, height);
  canvas.getContext('2d').putImageData(pixels, 0, 0);
}

function describe(i, source) {
  const classes = i.num_classes ? `${i.num_classes} classes${i.guided ? ', classifier-free guidance' : ''}` : 'unconditional';
  const step = i.step != null ? `, training step ${i.step}` : '';
  return `${source}: ${i.parameters.toLocaleString('en')} parameters, ${i.channels}×${i.height}×${i.width} images, ` +
    `${classes}, T = ${i.diffusion_steps}${step}.`;
}

function onLoaded(newInfo, source) {
  info = newInfo;
  modelSource = source;
  $('model-info').textContent = describe(info, source);
  const select = $('class');
  select.replaceChildren(new Option('random', '-1'));
  for (let c = 0; c < (info.num_classes || 0); c++) {
    const name = info.class_names && info.class_names[c] !== undefined ? info.class_names[c] : String(c);
    select.add(new Option(name, String(c)));
  }
  // The URL's class applies to the model the page opens with, not to one picked later.
  if (params.has('class') && source === DEFAULT_SOURCE) select.value = params.get('class');
  if (select.selectedIndex < 0) select.value = '-1';
  $('class-label').hidden = !info.num_classes;
  $('guidance-label').hidden = !info.guided;
  if (info.guided && !params.has('guidance')) $('guidance').value = info.default_guidance_scale;
  $('t').max = String(info.diffusion_steps - 1);
  $('sample').disabled = false;
  $('error').textContent = '';
  setState('ready');
  loadForwardDigit();
  if (autoSample) { autoSample = false; sample(); }
}

function sample() {
  const num = Number($('num').value);
  const seed = Number($('seed').value);
  const steps = Number($('steps').value);
  if ($('num').value === '' || !Number.isInteger(num) || num < 1 || num > 64) return showError('Samples must be a whole number from 1 to 64.');
  if ($('seed').value === '' || !Number.isInteger(seed) || seed < 0 || seed > 4294967295) return showError('The seed must be a whole number from 0 to 4294967295.');
  if ($('steps').value === '' || !Number.isInteger(steps) || steps < 1) return showError('Steps must be a whole number, 1 or more.');
  const guidance = info.guided ? Number($('guidance').value) : NaN;
  if (info.guided && ($('guidance').value === '' || !(guidance >= 0))) return showError('The guidance scale must be a number, 0 or more.');
  $('sample').disabled = true;
  sampling = true;
  $('error').textContent = '';
  $('progress').value = 0;
  $('status').textContent = 'starting…';
  setState('sampling');
  worker.postMessage({ kind: 'sample', num, seed, steps, solver: $('solver').value,
    cls: info.num_classes ? Number($('class').value) : -1, guidance });
}

// The forward panel noises a real digit (digit.png, an MNIST test image) when the model takes
// 28x28 gray images, or else the first sample once there is one.
function loadForwardDigit() {
  forwardImage = null;
  if (info.channels !== 1 || info.height !== 28 || info.width !== 28) return;
  const img = new Image();
  img.onload = () => {
    const c = document.createElement('canvas');
    c.width = 28; c.height = 28;
    const ctx = c.getContext('2d');
    ctx.drawImage(img, 0, 0);
    const rgba = ctx.getImageData(0, 0, 28, 28).data;
    forwardImage = new Uint8Array(28 * 28).map((_, i) => rgba[4 * i]);
    requestForward();
  };
  img.src = 'digit.png';
}

function requestForward() {
  if (!forwardImage || !info || document.body.dataset.state === 'loading') return;
  const t = Number($('t').value);
  $('t-value').textContent = String(t);
  if (forwardPending) { forwardWanted = t; return; }
  forwardPending = true;
  worker.postMessage({ kind: 'forward', image: forwardImage, t, seed: 0 });
}

worker.onmessage = (event) => {
  const m = event.data;
  if (m.kind === 'loaded') {
    onLoaded(m.info, m.source);
  } else if (m.kind === 'step') {
    $('progress').value = m.step / m.total;
    $('status').textContent = `step ${m.step} of ${m.total}`;
    draw($('xt'), m.width, m.height, m.xt);
    draw($('x0'), m.width, m.height, m.x0);
  } else if (m.kind === 'sampled') {
    draw($('samples'), m.width, m.height, m.rgba);
    const r = m.request;
    const seconds = (m.ms / 1000).toFixed(2);
    $('status').textContent = `${r.num} samples, ${r.steps} ${r.solver} steps in ${seconds} s`;
    window.ddpmResult = { ms: m.ms, width: m.width, height: m.height, request: r };
    $('sample').disabled = false;
    sampling = false;
    setState('done');
    if (info.channels !== 1 || info.height !== 28 || info.width !== 28) {
      // The first sample, from the grid (one pixel of border), as the forward panel's image.
      const { width, height, channels } = { width: info.width, height: info.height, channels: info.channels };
      forwardImage = new Uint8Array(width * height * channels);
      for (let y = 0; y < height; y++) for (let x = 0; x < width; x++) for (let c = 0; c < channels; c++) {
        forwardImage[(y * width + x) * channels + c] = m.rgba[4 * ((y + 1) * m.width + x + 1) + c];
      }
      requestForward();
    }
  } else if (m.kind === 'forward') {
    forwardPending = false;
    $('forward-error').textContent = '';
    draw($('forward'), info.width + 2, info.height + 2, m.rgba);
    if (forwardWanted !== null) { forwardWanted = null; requestForward(); }
  } else if (m.kind === 'error' && m.request === 'forward') {
    // The slider's own trouble: shown under it, leaving sampling and the page's state alone.
    forwardPending = false;
    forwardWanted = null;
    $('forward-error').textContent = m.message;
  } else if (m.kind === 'error') {
    if (m.request === 'load' && info) {
      // The model loaded before stays loaded and usable.
      $('model-info').textContent = describe(info, modelSource);
    }
    if (m.request === 'sample') sampling = false;
    $('sample').disabled = !info || sampling;
    if (!sampling) $('status').textContent = '';
    showError(m.message);
  }
};
worker.onerror = (event) => showError(`the worker failed: ${event.message || 'could not start (is the page served over http?)'}`);

$('sample').addEventListener('click', sample);
$('t').addEventListener('input', requestForward);

$('files').addEventListener('change', async () => {
  const files = Array.from($('files').files);
  // Picking the same files again must fire 'change' again.
  $('files').value = '';
  const config = files.find((f) => f.name.endsWith('.json'));
  const weights = files.find((f) => !f.name.endsWith('.json'));
  if (files.length !== 2 || !config || !weights) {
    return showError('Pick two files together: the checkpoint\'s config.json and its weights (.safetensors).');
  }
  if (sampling) return showError('Wait for the sampling to finish before loading another model.');
  $('error').textContent = '';
  $('forward-error').textContent = '';
  $('model-info').textContent = `Loading ${config.name} and ${weights.name}…`;
  $('sample').disabled = true;
  forwardImage = null;
  forwardWanted = null;
  setState('loading');
  try {
    const text = await config.text();
    const buffer = await weights.arrayBuffer();
    worker.postMessage({ kind: 'load', config: text, weights: buffer,
      source: `${config.name} + ${weights.name}` }, [buffer]);
  } catch (err) {
    if (info) $('model-info').textContent = describe(info, modelSource);
    $('sample').disabled = !info;
    showError(`cannot read the picked files: ${err.message || err}`);
  }
});

async function loadDefault() {
  try {
    const [config, weights] = await Promise.all([
      fetch('model/config.json').then((r) => { if (!r.ok) throw new Error(`model/config.json: HTTP ${r.status}`); return r.text(); }),
      fetch('model/weights.safetensors').then((r) => { if (!r.ok) throw new Error(`model/weights.safetensors: HTTP ${r.status}`); return r.arrayBuffer(); }),
    ]);
    worker.postMessage({ kind: 'load', config, weights, source: DEFAULT_SOURCE }, [weights]);
  } catch (err) {
    showError(`cannot load the default model: ${err.message}`);
  }
}
loadDefault();
