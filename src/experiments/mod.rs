//! Experiments: sweeps over config keys, the results store, statistics and
//! the presets of `moescope reproduce`.

pub mod reproduce;
pub mod results;
pub mod stats;
pub mod sweep;
