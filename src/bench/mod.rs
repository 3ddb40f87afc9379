//! `moescope bench`: five benchmarks and checks, one file each, and the helpers they share.
//!
//! - [`bench_train`] (`train.rs`): full training steps, measured as the PyTorch peer measures itself;
//! - [`bench_eval`] (`eval.rs`): the cost of logging the measures in an evaluation pass;
//! - [`bench_jacobian`] (`jacobian.rs`): Jacobian alignment, exact vs estimate vs naive;
//! - [`bench_hf`] (`hf.rs`): streaming analysis of a random Hugging Face checkpoint;
//! - [`device_check`] (`device.rs`): loss and gradients on a device against the CPU.

mod device;
mod eval;
mod hf;
mod jacobian;
mod train;

pub use device::{device_check, DeviceCheck};
pub use eval::{bench_eval, EvalBenchResult};
pub use hf::{bench_hf, HfBenchResult};
pub use jacobian::{bench_jacobian, JacobianBenchResult};
pub use train::{bench_train, BenchOptions, BenchResult};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Tokens from a random sparse Markov chain (each token has 4 successors), as the peer uses.
struct Markov {
    next: Vec<[u32; 4]>,
    rng: ChaCha8Rng,
}

impl Markov {
    fn new(vocab: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
        let next = (0..vocab)
            .map(|_| std::array::from_fn(|_| rng.random_range(0..vocab as u32)))
            .collect();
        Markov { next, rng }
    }
    fn batch(&mut self, b: usize, t: usize) -> (Vec<u32>, Vec<u32>) {
        let (mut x, mut y) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for _ in 0..b {
            let mut cur = self.rng.random_range(0..self.next.len() as u32);
            for _ in 0..t {
                let nxt = self.next[cur as usize][self.rng.random_range(0..4)];
                x.push(cur);
                y.push(nxt);
                cur = nxt;
            }
        }
        (x, y)
    }
}

/// CPU seconds used by this process so far (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// `--set`s that turn a preset into the PyTorch peer's config of the same
/// name (`tiny` is already the same; `small` is the peer's, not the training
/// preset's): applied before the user's own.
pub fn peer_sets(preset: &str) -> &'static [&'static str] {
    match preset {
        "small" => &[
            "model.vocab_size=8192",
            "model.d_model=512",
            "model.n_layer=6",
            "model.n_head=8",
            "model.n_experts=8",
            "model.top_k=2",
            "model.d_ff=2048",
            "model.seq_len=256",
            "train.batch_size=4",
        ],
        // The peer's `paper` (a GPU config): the study's model, GPT-2's
        // vocabulary padded to 50,304, batch 16 × 512.
        "paper" => &["model.vocab_size=50304"],
        _ => &[],
    }
}

pub use crate::kernels::gemm::ceiling_gflops as gemm_ceiling_gflops;
