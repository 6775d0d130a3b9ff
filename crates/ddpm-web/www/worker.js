// Runs the model off the page's thread: loading, sampling (posting every step) and the forward
// process. Messages in: {kind: 'load' | 'sample' | 'forward', ...}; out: the same kinds' results,
// 'step' during sampling, or {kind: 'error', message, request}.
import init, { Model } from './pkg/ddpm_web.js';

const ready = init();
let model = null;

self.onmessage = async (event) => {
  const msg = event.data;
  try {
    await ready;
    if (msg.kind === 'load') {
      const next = new Model(msg.config, new Uint8Array(msg.weights));
      if (model) model.free();
      model = next;
      self.postMessage({ kind: 'loaded', info: JSON.parse(model.info()), source: msg.source });
    } else if (!model) {
      throw new Error('no model is loaded');
    } else if (msg.kind === 'sample') {
      const t0 = performance.now();
      const rgba = model.sample(msg.num, msg.seed, msg.steps, msg.solver, msg.cls, msg.guidance,
        (step, total, width, height, xt, x0) => {
          self.postMessage({ kind: 'step', step, total, width, height, xt, x0 }, [xt.buffer, x0.buffer]);
        });
      const ms = performance.now() - t0;
      const width = model.grid_width(msg.num);
      const height = model.grid_height(msg.num);
      self.postMessage({ kind: 'sampled', rgba, width, height, ms, request: msg }, [rgba.buffer]);
    } else if (msg.kind === 'forward') {
      const rgba = model.forward(msg.image, msg.t, msg.seed);
      self.postMessage({ kind: 'forward', rgba, t: msg.t }, [rgba.buffer]);
    }
  } catch (err) {
    self.postMessage({ kind: 'error', message: String(err && err.message ? err.message : err), request: msg.kind });
  }
};
