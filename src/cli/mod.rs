//! One module per command: its flags (clap `Args`) and its `run`, which turns
//! the flags into library calls and prints the outcome. Errors get their
//! context here (anyhow); the library's own errors already name the key or
//! file at fault.

pub mod analyze;
pub mod bench;
pub mod eval;
pub mod generate;
pub mod sweep;
pub mod train;

use std::io::IsTerminal;

/// Use `n` CPU threads (0 = all cores).
pub fn set_threads(n: usize) {
    if n > 0 {
        // candle and gemm read RAYON_NUM_THREADS; rayon's global pool is built from it.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global();
    }
}

/// Whether progress bars can be drawn.
pub fn progress() -> bool {
    std::io::stderr().is_terminal()
}

pub use moescope::analysis::run_data_config;
