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
                    "CUDA requested but this binary was built without it: build one with `scripts/build_cuda.sh`",
                ));
            }
            open_cuda(ord)
        }
        other => Err(Error::config(
            "train.device",
            format!("unknown device `{other}` (expected cpu, cuda or cuda:N)"),
        )),
    }
}

/// A library a CUDA device needs: what it is, the names cudarc tries, and
/// what to do when none loads.
struct CudaLibrary {
    what: &'static str,
    names: &'static [&'static str],
    fix: &'static str,
}

/// The libraries a CUDA build loads at run time (cudarc's names): the
/// driver, then the toolkit libraries NVIDIA's wheels ship.
const CUDA_LIBRARIES: &[CudaLibrary] = &[
    CudaLibrary {
        what: "the NVIDIA driver (libcuda)",
        names: &["libcuda.so.1", "libcuda.so"],
        fix: "this machine has no NVIDIA driver on the loader's path; run on a GPU node, \
              or use --device cpu",
    },
    from_wheels("cuBLAS", &["libcublas.so.13", "libcublas.so"]),
    from_wheels("cuBLASLt", &["libcublasLt.so.13", "libcublasLt.so"]),
    from_wheels("cuRAND", &["libcurand.so.10", "libcurand.so"]),
    from_wheels("NVRTC", &["libnvrtc.so.13", "libnvrtc.so"]),
];

/// A toolkit library, found where NVIDIA's wheels keep it.
const fn from_wheels(what: &'static str, names: &'static [&'static str]) -> CudaLibrary {
    CudaLibrary {
        what,
        names,
        fix: "put the folder holding it on LD_LIBRARY_PATH (with NVIDIA's wheels, \
              e.g. beside torch: site-packages/nvidia/cu13/lib)",
    }
}

/// The first CUDA library that cannot be loaded.
fn missing_cuda_library() -> Option<&'static CudaLibrary> {
    CUDA_LIBRARIES
        .iter()
        .find(|lib| !lib.names.iter().any(|n| loadable(n)))
}

/// Whether the dynamic loader finds and opens `name` (closed again at once).
fn loadable(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: dlopen with a valid C string; a non-null handle is closed once.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if h.is_null() {
            return false;
        }
        libc::dlclose(h);
    }
    true
}

/// CUDA device `ord`: the libraries are checked first, so that a machine
/// without a driver or without cuBLAS gets a message rather than a panic
/// inside cudarc (which loads them lazily and panics when it cannot); a
/// panic that still happens during initialisation is turned into an error.
fn open_cuda(ord: usize) -> Result<Device> {
    if let Some(lib) = missing_cuda_library() {
        return Err(Error::config(
            "train.device",
            format!(
                "CUDA requested but {} cannot be loaded (tried {}): {}",
                lib.what,
                lib.names.join(", "),
                lib.fix
            ),
        ));
    }
    match std::panic::catch_unwind(|| Device::new_cuda(ord)) {
        Ok(dev) => Ok(dev?),
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("a panic in the CUDA runtime");
            Err(Error::config(
                "train.device",
                format!("CUDA device {ord} could not be opened: {why}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_probe_tells_present_from_absent_libraries() {
        assert!(loadable("libc.so.6"));
        assert!(!loadable("libmoescope-no-such-library.so.7"));
    }

    #[test]
    fn bad_device_names_are_config_errors() {
        for (name, expect) in [("gpu", "unknown device"), ("cuda:x", "bad CUDA ordinal")] {
            let e = parse_device(name).unwrap_err().to_string();
            assert!(e.contains(expect), "{name}: {e}");
        }
    }
}
