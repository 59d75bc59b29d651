//! Random weights of the real size: a candle `SimpleBackend` that answers every weight a
//! model constructor asks for with a random tensor of the asked shape (norm gains 1, biases and
//! BatchNorm means 0, variances 1, everything else uniform in ±1/sqrt(fan_in) at bf16 precision,
//! as the released klein checkpoints are stored), and can keep what it handed out so it can be
//! written as a diffusers checkpoint.

use std::sync::Mutex;

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::{Init, var_builder::SimpleBackend};

/// Hands out random weights; optionally remembers them by name.
pub struct RandomWeights {
    keep: bool,
    kept: Mutex<Vec<(String, Tensor)>>,
    generator: Option<Device>,
}

impl RandomWeights {
    /// A backend; `keep` retains every tensor for [`Self::take`].
    pub fn new(keep: bool) -> Self {
        Self {
            keep,
            kept: Mutex::new(Vec::new()),
            generator: None,
        }
    }

    /// Draws every tensor on `device` and copies it to the device asked for: a model that
    /// quantizes its weights reads them on the host, where drawing billions of numbers takes
    /// minutes.
    pub fn drawn_on(mut self, device: &Device) -> Self {
        self.generator = Some(device.clone());
        self
    }

    /// The tensors handed out so far, by checkpoint key.
    pub fn take(&self) -> Vec<(String, Tensor)> {
        std::mem::take(&mut *self.kept.lock().expect("not poisoned"))
    }
}

fn random(name: &str, shape: &Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
    let dims = shape.dims();
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if name.ends_with("running_var") {
        return Tensor::ones(shape, dtype, dev);
    }
    if name.ends_with("running_mean") || leaf == "bias" {
        return Tensor::zeros(shape, dtype, dev);
    }
    if dims.len() == 1 {
        // Norm gains (LayerNorm, GroupNorm, RMSNorm, QK norms).
        return Tensor::ones(shape, dtype, dev);
    }
    let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
    let bound = 1.0 / (fan_in as f64).sqrt();
    Tensor::rand(-bound as f32, bound as f32, shape, dev)?
        .to_dtype(DType::BF16)?
        .to_dtype(dtype)
}

impl SimpleBackend for RandomWeights {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = random(name, &s, dtype, self.generator.as_ref().unwrap_or(dev))?.to_device(dev)?;
        if self.keep {
            self.kept
                .lock()
                .expect("not poisoned")
                .push((name.to_owned(), t.clone()));
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}
