//! The JavaScript face of [`WebModel`], for the page's Web Worker.
//!
//! Errors reach JavaScript as `Error`s whose message is the [`WebError`] text,
//! which the page shows as it is.

#[cfg(doc)]
use crate::WebError;
use crate::{SampleRequest, WebModel};
use wasm_bindgen::prelude::*;

/// Shows Rust panics in the browser console (with their message) instead of "unreachable".
#[wasm_bindgen(start)]
pub fn start() {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    console_error_panic_hook::set_once();
}

/// A loaded checkpoint, as JavaScript sees it.
#[wasm_bindgen(js_name = Model)]
pub struct JsModel(WebModel);

#[wasm_bindgen(js_class = Model)]
impl JsModel {
    /// Loads a checkpoint from its config.json text and the bytes of a safetensors file.
    #[wasm_bindgen(constructor)]
    pub fn new(config_json: &str, weights: &[u8]) -> Result<JsModel, JsError> {
        Ok(Self(WebModel::from_bytes(config_json, weights)?))
    }

    /// [`WebModel::info`] as JSON.
    pub fn info(&self) -> String {
        serde_json::to_string(&self.0.info()).unwrap_or_default()
    }

    /// Samples `num` images; `on_step(step, total, width, height, x_t, pred_x0)` is called after
    /// every step with the two grids' RGBA bytes. `class` < 0 draws random labels; a `guidance`
    /// that is NaN takes the model's default. Returns the samples' grid as RGBA bytes (its width
    /// and height are those of the last call to `on_step`).
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        num: usize,
        seed: u32,
        steps: usize,
        solver: &str,
        class: i32,
        guidance: f64,
        on_step: &js_sys::Function,
    ) -> Result<Vec<u8>, JsError> {
        let request = SampleRequest {
            num,
            seed: seed.into(),
            steps,
            method: solver.parse()?,
            class: u32::try_from(class).ok(),
            guidance_scale: (!guidance.is_nan()).then_some(guidance),
        };
        let mut js_error = None;
        let grid = self.0.sample(&request, |s| {
            if js_error.is_some() {
                return;
            }
            let args = js_sys::Array::new();
            for v in [
                JsValue::from(s.step),
                s.total.into(),
                s.x_t.width.into(),
                s.x_t.height.into(),
                js_sys::Uint8Array::from(&s.x_t.rgba[..]).into(),
                js_sys::Uint8Array::from(&s.pred_x0.rgba[..]).into(),
            ] {
                args.push(&v);
            }
            if let Err(e) = on_step.apply(&JsValue::NULL, &args) {
                js_error = Some(e);
            }
        })?;
        if let Some(e) = js_error {
            return Err(JsError::new(&format!("the step callback failed: {e:?}")));
        }
        Ok(grid.rgba)
    }

    /// The grid width of `num` samples.
    pub fn grid_width(&self, num: usize) -> usize {
        let w = self.0.info().width;
        ((num as f64).sqrt().ceil() as usize).max(1) * (w + 1) + 1
    }

    /// The grid height of `num` samples.
    pub fn grid_height(&self, num: usize) -> usize {
        let h = self.0.info().height;
        let cols = ((num as f64).sqrt().ceil() as usize).max(1);
        num.div_ceil(cols) * (h + 1) + 1
    }

    /// The forward process: `image` (gray or RGB bytes of the model's size) noised to step `t`
    /// with noise from `seed`, as one RGBA cell (width and height of the model's images + 2).
    pub fn forward(&self, image: &[u8], t: usize, seed: u32) -> Result<Vec<u8>, JsError> {
        Ok(self.0.forward(image, t, seed.into())?.rgba)
    }
}
