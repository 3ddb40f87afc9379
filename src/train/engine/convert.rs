//! The hand-off with the autodiff model: the engine starts from a copy of a
//! `ParamStore`'s weights and an `AdamW`'s moments, and makes a model (and
//! moments) from its state for checkpoints and the weight measures. Both
//! sides are in layout order.

use super::{AdamParams, Engine};
use crate::config::ModelConfig;
use crate::model::params::ParamStore;
use crate::model::Gpt;
use crate::train::optim::{AdamW, Moments};
use crate::Result;
use candle_core::{Device, Tensor};

impl Engine<f32> {
    /// An engine holding a copy of `params` and of the optimiser's state
    /// (fresh moments without one).
    pub fn from_model(
        cfg: &ModelConfig,
        params: &ParamStore,
        opt: Option<&AdamW>,
        adam: AdamParams,
    ) -> Result<Self> {
        let tensors = params
            .names()
            .iter()
            .zip(params.vars())
            .map(|(n, v)| Ok((n.clone(), v.dims().to_vec(), flat(v.as_tensor())?)))
            .collect::<Result<Vec<_>>>()?;
        let mut eng = Engine::new(cfg, tensors, adam)?;
        let Some(opt) = opt else {
            return Ok(eng);
        };
        for (Moments { m, v }, r) in opt.moments().iter().zip(eng.index.params()) {
            eng.m[r.clone()].copy_from_slice(&flat(m)?);
            eng.v[r.clone()].copy_from_slice(&flat(v)?);
        }
        eng.t = opt.t;
        Ok(eng)
    }

    /// A model holding a copy of the engine's weights (on the CPU), made
    /// without initialising it first.
    pub fn to_model(&self) -> Result<Gpt> {
        let values = self
            .layout()
            .map(|(_, shape, r)| Ok(Tensor::from_slice(&self.params[r], shape, &Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        Gpt::from_values(&self.cfg, values)
    }

    /// Copy the weights back into the model (before evaluation and saving).
    pub fn store_weights(&self, params: &ParamStore) -> Result<()> {
        for (var, (_, shape, r)) in params.vars().iter().zip(self.layout()) {
            var.set(&Tensor::from_slice(&self.params[r], shape, var.device())?)?;
        }
        Ok(())
    }

    /// Copy the AdamW moments and step count back into `opt` (before a
    /// checkpoint is written).
    pub fn store_optimizer(&self, params: &ParamStore, opt: &mut AdamW) -> Result<()> {
        let dev = params.device();
        let moments = self
            .layout()
            .map(|(_, shape, r)| {
                Ok(Moments {
                    m: Tensor::from_slice(&self.m[r.clone()], shape, dev)?,
                    v: Tensor::from_slice(&self.v[r], shape, dev)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        opt.set_moments(moments, self.t)
    }
}

/// A tensor's values, flattened, as f32.
fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1()?)
}
