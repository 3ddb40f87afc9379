//! Named, trainable parameters and their seeded initialisation.

use super::layout::{ModelLayout, ParamSpec};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::collections::HashMap;

/// An ordered set of named parameters (the order of creation is the order of
/// the checkpoint and of the optimiser state).
#[derive(Debug)]
pub struct ParamStore {
    names: Vec<String>,
    vars: Vec<Var>,
    index: HashMap<String, usize>,
    dtype: DType,
    device: Device,
    rng: ChaCha8Rng,
    /// The parameters the model must create, in order (see [`ParamStore::for_layout`]).
    expected: Option<Vec<ParamSpec>>,
    /// Values to take, in creation order, instead of initialising (see
    /// [`ParamStore::with_values`]).
    given: Option<std::vec::IntoIter<Tensor>>,
}

impl ParamStore {
    /// An empty store; `seed` drives the initialisation.
    pub fn new(dtype: DType, device: &Device, seed: u64) -> Self {
        ParamStore {
            names: vec![],
            vars: vec![],
            index: HashMap::new(),
            dtype,
            device: device.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed),
            expected: None,
            given: None,
        }
    }

    /// A store for `layout` whose parameters take `values` (in layout order)
    /// instead of being initialised: a model made from weights held
    /// elsewhere (the training engine's), without drawing and overwriting.
    pub fn with_values(layout: &ModelLayout, values: Vec<Tensor>) -> Result<Self> {
        let first = values
            .first()
            .ok_or_else(|| Error::Data("a model from values needs its parameters".into()))?;
        let (dtype, device) = (first.dtype(), first.device().clone());
        Ok(ParamStore {
            given: Some(values.into_iter()),
            ..ParamStore::for_layout(layout, dtype, &device, 0)
        })
    }

    /// An empty store that admits exactly the parameters of `layout`, in its
    /// order: the model's constructors and `model::layout` cannot drift apart.
    pub fn for_layout(layout: &ModelLayout, dtype: DType, device: &Device, seed: u64) -> Self {
        ParamStore {
            expected: Some(layout.params().into_iter().cloned().collect()),
            ..ParamStore::new(dtype, device, seed)
        }
    }

    /// Panics unless every parameter of the layout was created.
    pub fn assert_complete(&self) {
        if let Some(want) = &self.expected {
            assert_eq!(
                self.names.len(),
                want.len(),
                "the model created {} parameters, model::layout lists {}",
                self.names.len(),
                want.len()
            );
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn push(&mut self, name: &str, t: Tensor) -> Result<Tensor> {
        assert!(
            !self.index.contains_key(name),
            "parameter {name} created twice"
        );
        if let Some(want) = &self.expected {
            let got = ParamSpec {
                name: name.to_string(),
                shape: t.dims().to_vec(),
            };
            assert_eq!(
                want.get(self.vars.len()),
                Some(&got),
                "the model and model::layout disagree at parameter {}",
                self.vars.len()
            );
        }
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.index.insert(name.to_string(), self.vars.len());
        self.names.push(name.to_string());
        self.vars.push(var);
        Ok(out)
    }

    /// The next given value for `name` (None when the store initialises).
    fn next_given(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        let Some(given) = self.given.as_mut() else {
            return Ok(None);
        };
        match given.next() {
            Some(t) if t.dims() == shape => Ok(Some(t)),
            Some(t) => Err(Error::Data(format!(
                "parameter {name}: a value of shape {:?} given for shape {shape:?}",
                t.dims()
            ))),
            None => Err(Error::Data(format!("parameter {name}: no value given"))),
        }
    }

    /// A parameter drawn from N(0, std²), seeded (or the given value).
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f64) -> Result<Tensor> {
        if let Some(t) = self.next_given(name, shape)? {
            return self.push(name, t);
        }
        let n: usize = shape.iter().product();
        let dist = Normal::new(0.0, std).expect("std > 0");
        let v: Vec<f64> = (0..n).map(|_| dist.sample(&mut self.rng)).collect();
        let t = Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?;
        self.push(name, t)
    }

    /// A parameter filled with `value` (or the given value).
    pub fn constant(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Tensor> {
        if let Some(t) = self.next_given(name, shape)? {
            return self.push(name, t);
        }
        let t = (Tensor::ones(shape, self.dtype, &self.device)? * value)?;
        self.push(name, t)
    }

    /// Parameter names in creation order.
    pub fn names(&self) -> &[String] {
        &self.names
    }
    /// Variables in creation order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }
    /// The position of a parameter in [`ParamStore::vars`].
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }
    /// A parameter by name.
    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.vars[i])
    }
    /// Total number of scalars.
    pub fn num_params(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Named tensors, for saving.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .cloned()
            .zip(self.vars.iter().map(|v| v.as_tensor().clone()))
            .collect()
    }

    /// Overwrite every parameter from `tensors`. Every name must be present
    /// with the right shape; extra names are an error too. `origin` names the
    /// file for error messages.
    pub fn load(&self, tensors: &HashMap<String, Tensor>, origin: &std::path::Path) -> Result<()> {
        for (name, var) in self.names.iter().zip(&self.vars) {
            let t = tensors.get(name).ok_or_else(|| Error::Checkpoint {
                path: origin.into(),
                msg: format!("tensor `{name}` is missing: the checkpoint was written for another model config"),
            })?;
            if t.dims() != var.dims() {
                return Err(Error::Checkpoint {
                    path: origin.into(),
                    msg: format!(
                        "tensor `{name}` has shape {:?} but this model expects {:?}: the checkpoint was written for another model config",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t.to_dtype(self.dtype)?.to_device(&self.device)?)?;
        }
        if let Some(extra) = tensors.keys().find(|k| !self.index.contains_key(*k)) {
            return Err(Error::Checkpoint {
                path: origin.into(),
                msg: format!("unexpected tensor `{extra}`: the checkpoint was written for another model config"),
            });
        }
        Ok(())
    }
}
