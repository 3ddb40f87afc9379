//! Jacobian alignment in f32 arithmetic with f64 reductions: what `analyze`
//! runs unless `--jacobian-precision f64` asks for the reference path of the
//! parent module, which the tests hold this one to.
//!
//! - The experts' weights are read where they are (f32 models are not copied).
//! - **Estimate.** A probe's image under a term's matrix, M_t·v, does not
//!   depend on the token, so it is computed once per expert. What depends on
//!   the token is the product with the coefficients and one product with
//!   W_down: for a chunk of tokens × all probes that is one large GEMM per
//!   expert. Each expert's J·v is formed once per token and shared by every
//!   pair the token is measured on.
//! - **Exact.** K_ij is built a block of rows at a time and only for pairs
//!   that occur, so it needs B × f floats instead of f × f.
//! - Every dot product, row sum and mean is accumulated in f64.

use super::{align_from_probes, std_unbiased, Instances};
use crate::config::Activation;
use crate::kernels::gemm::{matmul, Par, View};
use crate::measures::pairs;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

/// Bytes of J·v images held at a time (a chunk of tokens, all its experts).
const IMAGE_BYTES: usize = 1 << 30;
/// Rows of the (token, probe) × f matrix of coefficients ⊙ images formed at a time.
const H_ROWS: usize = 1024;
/// Rows of K built at a time (exact mode).
const K_ROWS: usize = 256;

/// One expert's weights as row-major f32 slices: W_up and W_gate (f × d),
/// W_down (d × f) and the biases of up and gate.
#[derive(Clone, Copy)]
pub(super) struct ExpertMats<'a> {
    pub up: &'a [f32],
    pub b_up: Option<&'a [f32]>,
    pub gate: Option<&'a [f32]>,
    pub b_gate: Option<&'a [f32]>,
    pub down: &'a [f32],
    pub act: Activation,
}

/// An independently initialised expert (zero biases): see [`Source::Random`].
struct OwnedExpert {
    up: Vec<f32>,
    gate: Option<Vec<f32>>,
    down: Vec<f32>,
    act: Activation,
}

/// An expert as borrowed from the model or generated for the null.
enum Held<'a> {
    Borrowed(ExpertMats<'a>),
    Owned(OwnedExpert),
}

impl Held<'_> {
    fn mats(&self) -> ExpertMats<'_> {
        match self {
            Held::Borrowed(m) => *m,
            Held::Owned(o) => ExpertMats {
                up: &o.up,
                b_up: None,
                gate: o.gate.as_deref(),
                b_gate: None,
                down: &o.down,
                act: o.act,
            },
        }
    }
}

/// Where the experts come from: the model, or independent normal weights
/// with each of its matrices' standard deviations (the random-init null),
/// generated when needed so that no more than one or two are held.
pub(super) enum Source<'a> {
    Model(Vec<ExpertMats<'a>>),
    Random {
        like: Vec<ExpertMats<'a>>,
        seed: u64,
    },
}

impl Source<'_> {
    fn len(&self) -> usize {
        match self {
            Source::Model(v) | Source::Random { like: v, .. } => v.len(),
        }
    }

    fn get(&self, e: usize) -> Held<'_> {
        match self {
            Source::Model(v) => Held::Borrowed(v[e]),
            Source::Random { like, seed } => {
                let src = &like[e];
                let seed = super::random_expert_seed(*seed, e);
                let gen = |w: &[f32], which: u64| {
                    let mut out = vec![0f32; w.len()];
                    fill_normal(&mut out, std_unbiased(w), seed, which);
                    out
                };
                Held::Owned(OwnedExpert {
                    up: gen(src.up, 0),
                    gate: src.gate.map(|g| gen(g, 1)),
                    down: gen(src.down, 2),
                    act: src.act,
                })
            }
        }
    }
}

/// Fill `out` with N(0, sd²) draws: blocks of 2¹⁶ values, block b from
/// ChaCha8 seeded by `seed` on stream (matrix, b), so that generation runs
/// in parallel and gives the same values in f32 and f64.
pub(super) fn fill_normal<T: num_traits::Float + Send>(
    out: &mut [T],
    sd: f64,
    seed: u64,
    matrix: u64,
) {
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream((matrix << 40) | b as u64);
            for v in chunk {
                let z: f64 = StandardNormal.sample(&mut rng);
                *v = T::from(sd * z).expect("finite");
            }
        });
}

/// x·Wᵀ + b for rows x (n × d) and W (f × d): n × f.
fn linear(x: &[f32], n: usize, d: usize, w: &[f32], b: Option<&[f32]>, f: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * f];
    if let Some(b) = b {
        out.par_chunks_mut(f).for_each(|row| row.copy_from_slice(b));
    }
    let (x, w) = (View::new(x, n, d), View::new(w, f, d).t());
    matmul(&mut out, f, x, w, b.is_some(), Par::Pool);
    out
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn silu_grad(z: f64) -> f64 {
    let s = sigmoid(z);
    s * (1.0 + z * (1.0 - s))
}

/// d/dz of the tanh approximation of GELU.
fn gelu_grad(z: f64) -> f64 {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let th = (k * (z + 0.044715 * z * z * z)).tanh();
    0.5 * (1.0 + th) + 0.5 * z * (1.0 - th * th) * k * (1.0 + 3.0 * 0.044715 * z * z)
}

/// The coefficients c_t (n × f) of the expert's Jacobian terms at rows x
/// (n × d), each with its matrix M_t (f × d); see the parent module.
fn terms<'a>(
    ex: &ExpertMats<'a>,
    x: &[f32],
    n: usize,
    d: usize,
    f: usize,
) -> Vec<(Vec<f32>, &'a [f32])> {
    let mut u = linear(x, n, d, ex.up, ex.b_up, f);
    match ex.gate {
        Some(wg) => {
            let g = linear(x, n, d, wg, ex.b_gate, f);
            let mut c2 = vec![0f32; n * f];
            u.par_iter_mut()
                .zip(c2.par_iter_mut())
                .zip(g.par_iter())
                .for_each(|((u, c2), &g)| {
                    let g = g as f64;
                    *c2 = (g * sigmoid(g)) as f32;
                    *u = (silu_grad(g) * *u as f64) as f32;
                });
            vec![(u, wg), (c2, ex.up)]
        }
        None => {
            let grad = match ex.act {
                Activation::Silu => silu_grad,
                Activation::Gelu => gelu_grad,
            };
            u.par_iter_mut().for_each(|z| *z = grad(*z as f64) as f32);
            vec![(u, ex.up)]
        }
    }
}

/// Σ a_i b_i in f64.
pub(super) fn dot64(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] as f64 * y[l] as f64;
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// Shapes shared by every call below.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub n: usize,
    pub d: usize,
    pub f: usize,
}

/// Which pairs each token is measured on, and which experts it needs.
struct TokenPlan {
    /// Per token: (pair index, i, j).
    pairs: Vec<Vec<(usize, usize, usize)>>,
    /// need[t·E + e]: token t's J_e·v is needed.
    need: Vec<bool>,
}

impl TokenPlan {
    fn new(inst: &Instances, n: usize, e_n: usize) -> Self {
        let mut pairs = vec![Vec::new(); n];
        for ((i, j), toks) in &inst.by_pair {
            let p = pairs::pair_index(e_n, *i, *j);
            for &t in toks {
                pairs[t as usize].push((p, *i, *j));
            }
        }
        TokenPlan {
            pairs,
            need: inst.needed(n, e_n),
        }
    }
}

/// Tokens per chunk of the estimate: all experts' J·v for all probes of a
/// chunk's tokens take at most `IMAGE_BYTES`.
pub(super) fn chunk_tokens(experts: usize, m: usize, d: usize) -> usize {
    (IMAGE_BYTES / (experts * m * d * 4).max(1)).max(1)
}

/// The Hutchinson table: A and its standard error for every instance of
/// `inst`, with probes v (m × d), `chunk` tokens at a time. Returns (A per
/// token and pair, NaN where not measured; Σ standard errors; instances).
pub(super) fn estimate_table(
    src: &Source,
    x: &[f32],
    dims: Dims,
    inst: &Instances,
    (v, m): (&[f32], usize),
    chunk: usize,
) -> (Vec<f64>, f64, usize) {
    let (n, d) = (dims.n, dims.d);
    let e_n = src.len();
    let np = pairs::n_pairs(e_n);
    let plan = TokenPlan::new(inst, n, e_n);
    let mut values = vec![f64::NAN; n * np];
    let (mut se_sum, mut count) = (0.0, 0);
    let mut probe_images: Vec<Option<Vec<Vec<f32>>>> = (0..e_n).map(|_| None).collect();
    for c0 in (0..n).step_by(chunk) {
        let toks = c0..(c0 + chunk).min(n);
        let images: Vec<Option<ChunkImages>> = (0..e_n)
            .map(|e| {
                chunk_images(
                    src,
                    e,
                    &mut probe_images[e],
                    x,
                    dims,
                    &plan,
                    toks.clone(),
                    v,
                    m,
                )
            })
            .collect();
        let rows: Vec<Vec<(usize, f64, f64)>> = toks
            .clone()
            .into_par_iter()
            .map(|t| token_alignments(t, &plan, &images, m, d))
            .collect();
        for (t, row) in toks.zip(rows) {
            for (p, a, se) in row {
                values[t * np + p] = a;
                se_sum += se;
                count += 1;
            }
        }
    }
    (values, se_sum, count)
}

/// One expert's J·v for the tokens of a chunk that need it, all probes.
struct ChunkImages {
    /// Row block of each token of the chunk (by absolute token index).
    slot: std::collections::HashMap<usize, usize>,
    /// (tokens × m) × d.
    y: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn chunk_images(
    src: &Source,
    e: usize,
    probe_images: &mut Option<Vec<Vec<f32>>>,
    x: &[f32],
    dims: Dims,
    plan: &TokenPlan,
    toks: std::ops::Range<usize>,
    v: &[f32],
    m: usize,
) -> Option<ChunkImages> {
    let (d, f) = (dims.d, dims.f);
    let e_n = src.len();
    let mine: Vec<usize> = toks.filter(|&t| plan.need[t * e_n + e]).collect();
    if mine.is_empty() {
        return None;
    }
    let held = src.get(e);
    let ex = held.mats();
    let xe: Vec<f32> = mine
        .iter()
        .flat_map(|&t| x[t * d..(t + 1) * d].iter().copied())
        .collect();
    let terms = terms(&ex, &xe, mine.len(), d, f);
    let mv = probe_images.get_or_insert_with(|| {
        terms
            .iter()
            .map(|(_, mt)| linear(v, m, d, mt, None, f))
            .collect()
    });
    let y = jv_rows(ex.down, &terms, mv, mine.len() * m, m, d, f);
    let slot = mine.into_iter().enumerate().map(|(s, t)| (t, s)).collect();
    Some(ChunkImages { slot, y })
}

/// J·v for every (token, probe) row r = token·m + probe: H = Σ_t c_t[token]
/// ⊙ (M_t v)[probe], then H·W_downᵀ, `H_ROWS` rows at a time.
fn jv_rows(
    down: &[f32],
    terms: &[(Vec<f32>, &[f32])],
    mv: &[Vec<f32>],
    rows: usize,
    m: usize,
    d: usize,
    f: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; rows * d];
    let mut h = vec![0f32; H_ROWS.min(rows) * f];
    for r0 in (0..rows).step_by(H_ROWS) {
        let nr = H_ROWS.min(rows - r0);
        h[..nr * f]
            .par_chunks_mut(f)
            .enumerate()
            .for_each(|(i, hr)| {
                let (q, p) = ((r0 + i) / m, (r0 + i) % m);
                hr.fill(0.0);
                for ((c, _), mt) in terms.iter().zip(mv) {
                    let (c, mt) = (&c[q * f..][..f], &mt[p * f..][..f]);
                    for j in 0..f {
                        hr[j] += c[j] * mt[j];
                    }
                }
            });
        let down = View::new(down, d, f).t();
        matmul(
            &mut y[r0 * d..],
            d,
            View::new(&h, nr, f),
            down,
            false,
            Par::Pool,
        );
    }
    y
}

/// (pair, A, standard error) for each pair token t is measured on.
fn token_alignments(
    t: usize,
    plan: &TokenPlan,
    images: &[Option<ChunkImages>],
    m: usize,
    d: usize,
) -> Vec<(usize, f64, f64)> {
    let block = |e: usize| -> &[f32] {
        let im = images[e].as_ref().expect("image of a needed expert");
        &im.y[im.slot[&t] * m * d..][..m * d]
    };
    let probes = |a: &[f32], b: &[f32]| -> Vec<f64> {
        (0..m)
            .map(|p| dot64(&a[p * d..][..d], &b[p * d..][..d]))
            .collect()
    };
    let mut norms: std::collections::HashMap<usize, Vec<f64>> = Default::default();
    let mut out = Vec::with_capacity(plan.pairs[t].len());
    for &(p, i, j) in &plan.pairs[t] {
        for e in [i, j] {
            norms.entry(e).or_insert_with(|| probes(block(e), block(e)));
        }
        let pij = probes(block(i), block(j));
        let (a, se) = align_from_probes(&pij, &norms[&i], &norms[&j]);
        out.push((p, a, se));
    }
    out
}

/// Exact ⟨J_a, J_b⟩_F on each of the rows x (rows × d), K_ab built in
/// blocks of `K_ROWS` rows.
fn exact_inner(
    a: &ExpertMats,
    b: &ExpertMats,
    x: &[f32],
    rows: usize,
    d: usize,
    f: usize,
) -> Vec<f64> {
    let ta = terms(a, x, rows, d, f);
    let tb = terms(b, x, rows, d, f);
    let mut s = vec![0f64; rows];
    let mut dd = vec![0f32; K_ROWS.min(f) * f];
    let mut kk = vec![0f32; K_ROWS.min(f) * f];
    let mut p = vec![0f32; rows * f];
    for a0 in (0..f).step_by(K_ROWS) {
        let nb = K_ROWS.min(f - a0);
        // (W_down,aᵀ W_down,b)[a0.., :], then ⊙ (M_a M_bᵀ)[a0.., :] per term pair.
        let da = View::strided(&a.down[a0..], d, nb, f).t();
        matmul(&mut dd, f, da, View::new(b.down, d, f), false, Par::Pool);
        for (ca, ma) in &ta {
            for (cb, mb) in &tb {
                let mb = View::new(mb, f, d).t();
                matmul(
                    &mut kk,
                    f,
                    View::new(&ma[a0 * d..], nb, d),
                    mb,
                    false,
                    Par::Pool,
                );
                kk[..nb * f]
                    .par_iter_mut()
                    .zip(&dd[..nb * f])
                    .for_each(|(k, w)| *k *= w);
                let ca = View::strided(&ca[a0..], rows, nb, f);
                matmul(&mut p, f, ca, View::new(&kk, nb, f), false, Par::Pool);
                s.par_iter_mut()
                    .enumerate()
                    .for_each(|(r, s)| *s += dot64(&p[r * f..][..f], &cb[r * f..][..f]));
            }
        }
    }
    s
}

/// The exact table: A for every instance of `inst` (NaN where not measured).
pub(super) fn exact_table(src: &Source, x: &[f32], dims: Dims, inst: &Instances) -> Vec<f64> {
    let (n, d, f) = (dims.n, dims.d, dims.f);
    let e_n = src.len();
    let np = pairs::n_pairs(e_n);
    let gather = |toks: &[u32]| -> Vec<f32> {
        toks.iter()
            .flat_map(|&t| x[t as usize * d..][..d].iter().copied())
            .collect()
    };
    // ‖J_e‖² on every token expert e takes part in.
    let mut norms: Vec<std::collections::HashMap<u32, f64>> = vec![Default::default(); e_n];
    for (e, norm) in norms.iter_mut().enumerate() {
        let toks = inst.tokens_of(e);
        if toks.is_empty() {
            continue;
        }
        let held = src.get(e);
        let v = exact_inner(&held.mats(), &held.mats(), &gather(&toks), toks.len(), d, f);
        *norm = toks.into_iter().zip(v).collect();
    }
    let mut values = vec![f64::NAN; n * np];
    let mut held_i: Option<(usize, Held)> = None;
    for ((i, j), toks) in &inst.by_pair {
        if toks.is_empty() {
            continue;
        }
        if held_i.as_ref().map(|h| h.0) != Some(*i) {
            held_i = Some((*i, src.get(*i)));
        }
        let hi = &held_i.as_ref().expect("held").1;
        let hj = src.get(*j);
        let ij = exact_inner(&hi.mats(), &hj.mats(), &gather(toks), toks.len(), d, f);
        let p = pairs::pair_index(e_n, *i, *j);
        for (&t, v) in toks.iter().zip(ij) {
            values[t as usize * np + p] = super::align(v, norms[*i][&t], norms[*j][&t]);
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(n: usize, seed: u64) -> Vec<f32> {
        let mut v = vec![0f32; n];
        fill_normal(&mut v, 0.5, seed, 0);
        v
    }

    /// Chunks of 3 tokens give what one chunk gives: no token is lost or
    /// misaligned at a chunk boundary, and experts needed by no token of a
    /// chunk are skipped there.
    #[test]
    fn chunked_estimate_equals_one_chunk() {
        let (e_n, n, d, f, m) = (3, 11, 5, 7, 16);
        let ws: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..e_n as u64)
            .map(|e| {
                (
                    randn(f * d, 10 + e),
                    randn(f * d, 20 + e),
                    randn(d * f, 30 + e),
                )
            })
            .collect();
        let mats: Vec<ExpertMats> = ws
            .iter()
            .map(|(up, gate, down)| ExpertMats {
                up,
                b_up: None,
                gate: Some(gate),
                b_gate: None,
                down,
                act: Activation::Silu,
            })
            .collect();
        let src = Source::Model(mats);
        let x = randn(n * d, 1);
        let v = randn(m * d, 2);
        // Routed pairs: token t on (t mod 3, (t + 1) mod 3).
        let sel: Vec<u32> = (0..n as u32).flat_map(|t| [t % 3, (t + 1) % 3]).collect();
        let inst = Instances::new(&sel, 2, n, e_n, false);
        let dims = Dims { n, d, f };
        let (one, se1, c1) = estimate_table(&src, &x, dims, &inst, (&v, m), n);
        let (three, se3, c3) = estimate_table(&src, &x, dims, &inst, (&v, m), 3);
        assert_eq!(c1, n);
        assert_eq!(c1, c3);
        assert!((se1 - se3).abs() <= 1e-6 * se1.abs());
        for (a, b) in one.iter().zip(&three) {
            assert_eq!(a.is_nan(), b.is_nan());
            if !a.is_nan() {
                assert!((a - b).abs() < 1e-6, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn dot64_sums_every_element() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b = vec![2f32; 19];
        assert_eq!(dot64(&a, &b), 2.0 * (0..19).sum::<i32>() as f64);
    }
}
