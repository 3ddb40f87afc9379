//! Pair sets: which expert pairs a pairwise measure averages over, so that
//! routing modes are compared like for like (docs/MEASURES.md, "Pair sets").
//!
//! - `routed`: the pairs the router selected for the token. Under soft
//!   routing every expert takes every token, so `routed` means the pairs a
//!   top-k router would have picked: the top-k experts by gate.
//! - `all`: every pair i < j, unweighted.
//! - `gate_weighted`: every pair, weighted by g_i(x)·g_j(x), with g the
//!   router's softmax over all experts.
//!
//! Token-level measures (activation cos², Jacobian alignment) take, per
//! token, the weighted mean over the set's pairs, then the mean over tokens;
//! a token whose weights sum to zero (top-1 has no routed pair) is left out.
//! Expert-level measures (subspace overlap) take the mean over expert pairs
//! weighted by the set's weight summed over tokens.

use crate::model::moe::NO_EXPERT;
use serde::{Deserialize, Serialize};

/// One value per pair set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairSets<T> {
    pub routed: Option<T>,
    pub all: Option<T>,
    pub gate_weighted: Option<T>,
}

impl<T> Default for PairSets<T> {
    fn default() -> Self {
        PairSets {
            routed: None,
            all: None,
            gate_weighted: None,
        }
    }
}

impl<T> PairSets<T> {
    /// The value of set `s` (0 routed, 1 all, 2 gate_weighted).
    pub fn get(&self, s: usize) -> Option<&T> {
        [&self.routed, &self.all, &self.gate_weighted][s].as_ref()
    }

    /// Build from a function of the set index (0 routed, 1 all, 2 gate_weighted).
    pub fn from_fn(mut f: impl FnMut(usize) -> Option<T>) -> Self {
        PairSets {
            routed: f(0),
            all: f(1),
            gate_weighted: f(2),
        }
    }
}

/// Number of expert pairs i < j.
pub fn n_pairs(e: usize) -> usize {
    e * e.saturating_sub(1) / 2
}

/// Index of the pair (i, j), i < j, in 0..n_pairs(e), in (0,1), (0,2), … order.
pub fn pair_index(e: usize, i: usize, j: usize) -> usize {
    debug_assert!(i < j && j < e);
    i * e - i * (i + 1) / 2 + (j - i - 1)
}

/// Every pair i < j, in [`pair_index`] order.
pub fn all_pairs(e: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..e).flat_map(move |i| (i + 1..e).map(move |j| (i, j)))
}

/// The pairs (i < j) among one token's selected experts ([`NO_EXPERT`] slots skipped).
pub fn selected_pairs(selected: &[u32]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let sel = move || {
        selected
            .iter()
            .filter(|&&x| x != NO_EXPERT)
            .map(|&x| x as usize)
    };
    sel().enumerate().flat_map(move |(a, x)| {
        sel()
            .skip(a + 1)
            .filter(move |&y| y != x)
            .map(move |y| (x.min(y), x.max(y)))
    })
}

/// Pair weights of the sets, per pair in [`pair_index`] order: `routed` (1 for
/// each selected pair) and `gate` (g_i·g_j); the `all` set weighs every pair
/// 1. One token's, or (with [`PairWeights::add`]) summed over tokens.
#[derive(Debug, Clone)]
pub struct PairWeights {
    pub routed: Vec<f64>,
    pub gate: Vec<f64>,
}

impl PairWeights {
    /// `selected`: the token's experts ([`NO_EXPERT`] = empty slot);
    /// `probs`: its router probabilities over all E experts.
    pub fn new(selected: &[u32], probs: &[f32]) -> Self {
        let e = probs.len();
        let mut routed = vec![0.0; n_pairs(e)];
        for (i, j) in selected_pairs(selected) {
            routed[pair_index(e, i, j)] = 1.0;
        }
        let gate = all_pairs(e)
            .map(|(i, j)| probs[i] as f64 * probs[j] as f64)
            .collect();
        PairWeights { routed, gate }
    }

    /// The weights of set `s` (0 routed, 1 all, 2 gate_weighted); `None` = all ones.
    fn weights(&self, s: usize) -> Option<&[f64]> {
        match s {
            0 => Some(&self.routed),
            2 => Some(&self.gate),
            _ => None,
        }
    }
}

/// Mean, mean |·| and mean square of a token-level pairwise measure in one set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SetMean {
    pub mean: f64,
    pub mean_abs: f64,
    pub mean_sq: f64,
    /// Tokens that had at least one pair in the set.
    pub tokens: usize,
}

/// Accumulates a token-level pairwise measure under the three sets.
#[derive(Debug, Clone, Default)]
pub struct PairMeans {
    /// Per set: Σ over tokens of the token's weighted mean of v, |v|, v², and the token count.
    sums: [[f64; 3]; 3],
    tokens: [usize; 3],
}

impl PairMeans {
    /// Add one token: `values` per pair ([`pair_index`] order; NaN = not
    /// computed, which leaves the token out of any set that weighs that pair).
    pub fn add(&mut self, values: &[f64], w: &PairWeights) {
        for s in 0..3 {
            let mut acc = [0.0; 3];
            let mut total = 0.0;
            let mut missing = false;
            for (p, &v) in values.iter().enumerate() {
                let wp = w.weights(s).map_or(1.0, |ws| ws[p]);
                if wp <= 0.0 {
                    continue;
                }
                if v.is_nan() {
                    missing = true;
                    break;
                }
                acc[0] += wp * v;
                acc[1] += wp * v.abs();
                acc[2] += wp * v * v;
                total += wp;
            }
            if missing || total <= 0.0 {
                continue;
            }
            for (sum, a) in self.sums[s].iter_mut().zip(acc) {
                *sum += a / total;
            }
            self.tokens[s] += 1;
        }
    }

    /// The three sets' means (`None` for a set no token reached).
    pub fn finish(&self) -> PairSets<SetMean> {
        PairSets::from_fn(|s| {
            let n = self.tokens[s];
            (n > 0).then(|| SetMean {
                mean: self.sums[s][0] / n as f64,
                mean_abs: self.sums[s][1] / n as f64,
                mean_sq: self.sums[s][2] / n as f64,
                tokens: n,
            })
        })
    }
}

impl PairWeights {
    /// Zero weights for E experts (to sum tokens' weights into).
    pub fn zeros(e: usize) -> Self {
        PairWeights {
            routed: vec![0.0; n_pairs(e)],
            gate: vec![0.0; n_pairs(e)],
        }
    }

    /// Add another token's (or total's) weights.
    pub fn add(&mut self, w: &PairWeights) {
        for (a, b) in self.routed.iter_mut().zip(&w.routed) {
            *a += b;
        }
        for (a, b) in self.gate.iter_mut().zip(&w.gate) {
            *a += b;
        }
    }

    /// The weighted mean of `m[i][j]` (pairs where it is `None` left out) in
    /// each set, with these weights summed over tokens (expert-level measures).
    pub fn mean_of(&self, m: &[Vec<Option<f64>>]) -> PairSets<f64> {
        let e = m.len();
        PairSets::from_fn(|s| {
            let (mut sum, mut total) = (0.0, 0.0);
            for (p, (i, j)) in all_pairs(e).enumerate() {
                let w = self.weights(s).map_or(1.0, |ws| ws[p]);
                if let (Some(v), true) = (m[i][j], w > 0.0) {
                    sum += w * v;
                    total += w;
                }
            }
            (total > 0.0).then(|| sum / total)
        })
    }
}

/// Mean and standard deviation (n − 1) of draws, and z = (null mean − x) / sd,
/// positive when x lies below what chance gives (e.g. less overlap: more
/// separated experts than random token sets would be).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NullStats {
    pub mean: f64,
    pub sd: f64,
    /// `None` when the null has no spread (sd = 0) or no draws.
    pub z: Option<f64>,
    pub draws: usize,
}

impl NullStats {
    pub fn new(observed: f64, draws: &[f64]) -> Option<NullStats> {
        let n = draws.len();
        if n == 0 {
            return None;
        }
        let mean = draws.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        let z = (sd > 1e-12 * mean.abs().max(1e-300)).then(|| (mean - observed) / sd);
        Some(NullStats {
            mean,
            sd,
            z,
            draws: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_index_enumerates_pairs_in_order() {
        let e = 5;
        for (p, (i, j)) in all_pairs(e).enumerate() {
            assert_eq!(pair_index(e, i, j), p);
        }
        assert_eq!(all_pairs(e).count(), n_pairs(e));
    }

    #[test]
    fn set_means_follow_their_definitions() {
        // Three experts, two tokens; values per pair (01, 02, 12).
        let probs = [[0.5f32, 0.3, 0.2], [0.1, 0.1, 0.8]];
        let sel = [[0u32, 1], [2, NO_EXPERT]];
        let vals = [[0.2, 0.4, 0.6], [0.1, 0.5, 0.9]];
        let mut pm = PairMeans::default();
        for t in 0..2 {
            pm.add(&vals[t], &PairWeights::new(&sel[t], &probs[t]));
        }
        let r = pm.finish();
        // routed: only token 0 has a pair (0,1).
        assert_eq!(r.routed.unwrap().tokens, 1);
        assert!((r.routed.unwrap().mean - 0.2).abs() < 1e-12);
        let all = (0.4 + 0.5) / 2.0;
        assert!((r.all.unwrap().mean - all).abs() < 1e-12);
        let gw = |p: [f64; 3], v: [f64; 3]| {
            let w = [p[0] * p[1], p[0] * p[2], p[1] * p[2]];
            w.iter().zip(v).map(|(a, b)| a * b).sum::<f64>() / w.iter().sum::<f64>()
        };
        let p = |t: usize| probs[t].map(|x| x as f64);
        let want = (gw(p(0), vals[0]) + gw(p(1), vals[1])) / 2.0;
        assert!((r.gate_weighted.unwrap().mean - want).abs() < 1e-7);
    }

    #[test]
    fn null_z_is_positive_below_chance() {
        let n = NullStats::new(0.2, &[0.5, 0.6, 0.4]).unwrap();
        assert!((n.mean - 0.5).abs() < 1e-12 && (n.sd - 0.1).abs() < 1e-12);
        assert!((n.z.unwrap() - 3.0).abs() < 1e-9);
        assert!(NullStats::new(1.0, &[1.0, 1.0]).unwrap().z.is_none());
    }
}
