//! Device selection (`cpu`, `cuda`, `cuda:N`).

use crate::{Error, Result};
use candle_core::Device;

/// Parse a device name. `cuda` needs the `cuda` cargo feature.
pub fn parse_device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ord: usize = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| {
                    Error::config("train.device", format!("bad CUDA ordinal in `{s}`"))
                })?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::config(
                    "train.device",
                    "CUDA requested but this binary was built without it: rebuild with `cargo build --release --features cuda`",
                ));
            }
            Ok(Device::new_cuda(ord)?)
        }
        other => Err(Error::config(
            "train.device",
            format!("unknown device `{other}` (expected cpu, cuda or cuda:N)"),
        )),
    }
}
