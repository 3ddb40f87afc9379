//! Sampling text from a model: temperature and top-k over the next-token
//! logits, one token at a time over the last `seq_len` tokens (no KV cache:
//! every step is a full forward pass of the context window).

use super::Gpt;
use crate::Result;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Softmax temperature; 0 (or less) = greedy, the most likely token.
    pub temperature: f64,
    /// Sample among the k most likely tokens (0 = all).
    pub top_k: usize,
    pub seed: u64,
}

/// `n` tokens continuing `prompt` (which must not be empty). Only the first
/// `vocab` logits are candidates: the model's vocabulary is rounded up past
/// the tokeniser's, and ids beyond it cannot be decoded.
pub fn sample(
    model: &Gpt,
    prompt: &[u32],
    n: usize,
    vocab: usize,
    opts: &SampleOptions,
) -> Result<Vec<u32>> {
    let mut ids = prompt.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let device = model.params.device().clone();
    let window = model.cfg.seq_len;
    for _ in 0..n {
        let ctx = &ids[ids.len().saturating_sub(window)..];
        let x = Tensor::new(ctx, &device)?.unsqueeze(0)?;
        let logits = model.forward(&x, false)?.logits;
        let last: Vec<f32> = logits.get(ctx.len() - 1)?.to_vec1()?;
        let last = &last[..vocab.min(last.len())];
        ids.push(next_token(last, opts, &mut rng) as u32);
    }
    Ok(ids.split_off(prompt.len()))
}

/// The index of the token chosen from `logits`.
pub fn next_token(logits: &[f32], opts: &SampleOptions, rng: &mut impl Rng) -> usize {
    if opts.temperature <= 0.0 {
        return (0..logits.len())
            .max_by(|&i, &j| logits[i].total_cmp(&logits[j]))
            .unwrap_or(0);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&i, &j| logits[j].total_cmp(&logits[i]));
    if opts.top_k > 0 {
        idx.truncate(opts.top_k);
    }
    // Softmax weights relative to the largest logit (no overflow).
    let m = logits[idx[0]] as f64;
    let w: Vec<f64> = idx
        .iter()
        .map(|&i| ((logits[i] as f64 - m) / opts.temperature).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let mut u = rng.random::<f64>() * z;
    for (k, &i) in idx.iter().enumerate() {
        u -= w[k];
        if u <= 0.0 {
            return i;
        }
    }
    idx[idx.len() - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use candle_core::{DType, Device};

    fn opts(temperature: f64, top_k: usize) -> SampleOptions {
        SampleOptions {
            temperature,
            top_k,
            seed: 0,
        }
    }

    #[test]
    fn greedy_and_top_k_pick_among_the_most_likely() {
        let logits = [0.1f32, 2.0, -1.0, 1.9, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(next_token(&logits, &opts(0.0, 0), &mut rng), 1);
        // top-1 is greedy whatever the temperature.
        assert_eq!(next_token(&logits, &opts(5.0, 1), &mut rng), 1);
        let mut seen = [0usize; 5];
        for _ in 0..400 {
            seen[next_token(&logits, &opts(1.0, 2), &mut rng)] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4], 0, "{seen:?}");
        assert!(seen[1] > 100 && seen[3] > 100, "{seen:?}");
    }

    #[test]
    fn sampling_is_seeded_and_stays_in_the_vocabulary() {
        let cfg = ModelConfig {
            vocab_size: 64,
            seq_len: 8,
            n_layer: 1,
            n_head: 2,
            d_model: 16,
            d_ff: 16,
            n_experts: 4,
            ..Default::default()
        };
        let model = Gpt::new(&cfg, DType::F32, &Device::Cpu, 0).unwrap();
        let o = SampleOptions {
            temperature: 1.0,
            top_k: 0,
            seed: 3,
        };
        // More tokens than the context window: the window slides.
        let a = sample(&model, &[1, 2, 3], 12, 50, &o).unwrap();
        assert_eq!(a.len(), 12);
        assert!(a.iter().all(|&t| t < 50), "{a:?}");
        assert_eq!(a, sample(&model, &[1, 2, 3], 12, 50, &o).unwrap());
        let greedy = sample(&model, &[1], 4, 64, &opts(0.0, 0)).unwrap();
        assert_eq!(greedy, sample(&model, &[1], 4, 64, &opts(0.0, 0)).unwrap());
    }
}
