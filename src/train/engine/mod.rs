//! The fused CPU training engine: NanoGPT-MoE's forward pass, its
//! hand-written backward and AdamW, on flat parameter, gradient and moment
//! buffers, in the style of llm.c.
//!
//! The autodiff model (`crate::model`) is the reference and stays the home
//! of every variant and regulariser. This engine covers the hot path of the
//! study, top-k routed SiLU-MLP experts with optional L_orth on W_up, and the
//! training loop uses it whenever a config needs nothing else
//! (`Config::fused_engine_gap` says what stands in the way otherwise;
//! `train.engine = "autodiff"` forces the reference). What makes it fast:
//!
//! - every gradient buffer is *written* by the op that produces it (a GEMM
//!   with β = 0, a column sum), never zero-filled and then added to;
//! - fused kernels with hand-written backward for LayerNorm, causal softmax,
//!   SiLU and the cross-entropy over the vocabulary (`kernels.rs`, each
//!   checked against float64 finite differences);
//! - dropless dispatch: the tokens of each expert are gathered once into one
//!   packed buffer (expert-major), each expert runs two GEMMs on its own rows,
//!   and the gated outputs are combined back per token;
//! - AdamW in one pass per parameter (moments and weights in place), with the
//!   clipping scale folded in;
//! - one thread pool (rayon's, which the GEMMs use too) and AVX-512 GEMM.
//!
//! Shapes: n = b·t tokens, d = d_model, f = d_ff, E experts, k slots per token,
//! r = n·k routed rows, V = vocabulary.

pub mod gemm;
pub mod kernels;

use crate::config::ModelConfig;
use crate::model::params::ParamStore;
use crate::train::optim::AdamW;
use crate::{Error, Result};
use candle_core::Tensor;
use gemm::{matmul, Par, View};
use kernels::Real;
use rayon::prelude::*;
use std::collections::HashMap;
use std::ops::Range;

/// Where each parameter of one block lives in the flat buffers.
#[derive(Debug, Clone)]
struct BlockIdx {
    ln1_w: Range<usize>,
    ln1_b: Option<Range<usize>>,
    qkv_w: Range<usize>,
    qkv_b: Option<Range<usize>>,
    proj_w: Range<usize>,
    proj_b: Option<Range<usize>>,
    ln2_w: Range<usize>,
    ln2_b: Option<Range<usize>>,
    router: Range<usize>,
    /// Per expert: W_up (f × d), b_up, W_down (d × f), b_down.
    experts: Vec<ExpertIdx>,
}

#[derive(Debug, Clone)]
struct ExpertIdx {
    up_w: Range<usize>,
    up_b: Option<Range<usize>>,
    down_w: Range<usize>,
    down_b: Option<Range<usize>>,
}

/// Activations of one block, kept from the forward pass for the backward.
#[derive(Debug, Default)]
struct BlockActs<T> {
    /// Block input, the residual stream (n × d).
    x: Vec<T>,
    ln1_mean: Vec<T>,
    ln1_rstd: Vec<T>,
    h1: Vec<T>,
    /// (n × 3d): q | k | v, heads side by side within each.
    qkv: Vec<T>,
    /// Attention probabilities (b · heads × t × t).
    att: Vec<T>,
    /// Attention output before the projection (n × d).
    ya: Vec<T>,
    /// Residual stream after attention (n × d).
    xm: Vec<T>,
    ln2_mean: Vec<T>,
    ln2_rstd: Vec<T>,
    h2: Vec<T>,
    /// Router probabilities (n × E).
    probs: Vec<T>,
    /// Experts of each (token, slot), best first (n × k), and their gates.
    sel: Vec<u32>,
    gates: Vec<T>,
    /// Packed row of each (token, slot), and the (token, slot) of each row.
    row_of: Vec<u32>,
    slot_of: Vec<u32>,
    /// Rows of expert e: offsets[e]..offsets[e + 1].
    offsets: Vec<usize>,
    /// Gathered expert inputs (r × d), pre-activations (r × f), activations
    /// (r × f) and expert outputs before gating (r × d).
    xe: Vec<T>,
    u: Vec<T>,
    a: Vec<T>,
    ye: Vec<T>,
}

/// Scratch buffers of the backward pass, reused by every block.
#[derive(Debug, Default)]
struct Scratch<T> {
    dx: Vec<T>,
    dh: Vec<T>,
    dy: Vec<T>,
    dqkv: Vec<T>,
    /// Per (batch, head): dq | dk | dv (3 × t × hd), and ∂L/∂att (t × t).
    dhead: Vec<T>,
    datt: Vec<T>,
    /// Per (batch, head) attention output (t × hd), before interleaving heads.
    yhead: Vec<T>,
    dye: Vec<T>,
    da: Vec<T>,
    dxe: Vec<T>,
    dgate_row: Vec<T>,
    dlogit_r: Vec<T>,
}

/// Wall time per section of the step, summed over steps (see `bench train`).
#[derive(Debug)]
pub struct Profile {
    last: std::time::Instant,
    /// (section, seconds), in first-seen order.
    pub sections: Vec<(&'static str, f64)>,
}

impl Profile {
    fn new() -> Self {
        Profile {
            last: std::time::Instant::now(),
            sections: Vec::new(),
        }
    }
    /// Start timing (the time since the last lap is dropped).
    fn start(&mut self) {
        self.last = std::time::Instant::now();
    }
    /// Charge the time since the last lap to `name`.
    fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        let dt = (now - self.last).as_secs_f64();
        self.last = now;
        match self.sections.iter_mut().find(|(n, _)| *n == name) {
            Some((_, s)) => *s += dt,
            None => self.sections.push((name, dt)),
        }
    }
}

/// AdamW hyper-parameters (PyTorch semantics, as `optim::AdamW`).
#[derive(Debug, Clone, Copy)]
pub struct AdamParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// The fused engine over one model's parameters.
pub struct Engine<T> {
    cfg: ModelConfig,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    ranges: Vec<Range<usize>>,
    /// Flat parameters, gradients and AdamW moments, in ParamStore order.
    pub params: Vec<T>,
    pub grads: Vec<T>,
    m: Vec<T>,
    v: Vec<T>,
    /// AdamW steps taken.
    pub t: usize,
    adam: AdamParams,
    wte: Range<usize>,
    wpe: Range<usize>,
    lnf_w: Range<usize>,
    lnf_b: Option<Range<usize>>,
    blocks: Vec<BlockIdx>,
    acts: Vec<BlockActs<T>>,
    /// Final residual stream, ln_f statistics and output, logits (n × V).
    xf: Vec<T>,
    lnf_mean: Vec<T>,
    lnf_rstd: Vec<T>,
    hf: Vec<T>,
    logits: Vec<T>,
    scratch: Scratch<T>,
    /// The batch shape the buffers are sized for.
    shape: (usize, usize),
    /// Per MoE layer, assignments per expert in the last forward pass.
    pub loads: Vec<Vec<u64>>,
    /// Seconds the last forward pass took (the benchmark's phase split).
    pub last_forward_s: f64,
    /// Time per section, summed over steps.
    pub profile: Profile,
}

fn resize<T: Real>(v: &mut Vec<T>, n: usize) {
    v.resize(n, T::zero());
}

/// Rows of `src` (rows × cols) summed into `dst` (cols): written, or added with `acc`.
fn col_sum<T: Real>(dst: &mut [T], src: &[T], rows: usize, acc: bool) {
    let cols = dst.len();
    let chunk = cols.div_ceil(rayon::current_num_threads().max(1)).max(64);
    dst.par_chunks_mut(chunk).enumerate().for_each(|(c, dst)| {
        let j0 = c * chunk;
        if !acc {
            dst.fill(T::zero());
        }
        for i in 0..rows {
            let s = &src[i * cols + j0..i * cols + j0 + dst.len()];
            for (d, &s) in dst.iter_mut().zip(s) {
                *d = *d + s;
            }
        }
    });
}

/// Each row of `dst` (rows × bias.len()) set to `bias`, in parallel.
fn fill_rows<T: Real>(dst: &mut [T], bias: &[T]) {
    dst.par_chunks_mut(bias.len() * 64)
        .for_each(|c| fill_rows_seq(c, Some(bias)));
}

/// `y = x·Wᵀ + b` for x (n × i), W (o × i): y (n × o), written.
fn linear<T: Real>(y: &mut [T], x: &[T], w: &[T], b: Option<&[T]>, n: usize, i: usize, o: usize) {
    if let Some(b) = b {
        fill_rows(&mut y[..n * o], b);
    }
    matmul(
        y,
        o,
        View::new(x, n, i),
        View::new(w, o, i).t(),
        b.is_some(),
        Par::Pool,
    );
}

/// Backward of [`linear`]: dW (o × i) and db written (added with `acc`);
/// dx = dy·W written (added with `dx_acc`).
#[allow(clippy::too_many_arguments)]
fn linear_backward<T: Real>(
    dy: &[T],
    x: &[T],
    w: &[T],
    dw: &mut [T],
    db: Option<&mut [T]>,
    dx: Option<&mut [T]>,
    n: usize,
    i: usize,
    o: usize,
    acc: bool,
    dx_acc: bool,
) {
    matmul(
        dw,
        i,
        View::new(dy, n, o).t(),
        View::new(x, n, i),
        acc,
        Par::Pool,
    );
    if let Some(db) = db {
        col_sum(db, dy, n, acc);
    }
    if let Some(dx) = dx {
        matmul(
            dx,
            i,
            View::new(dy, n, o),
            View::new(w, o, i),
            dx_acc,
            Par::Pool,
        );
    }
}

/// [`fill_rows`] on the calling thread.
fn fill_rows_seq<T: Real>(dst: &mut [T], bias: Option<&[T]>) {
    if let Some(b) = bias {
        dst.chunks_exact_mut(b.len())
            .for_each(|r| r.copy_from_slice(b));
    }
}

/// [`col_sum`] on the calling thread.
fn col_sum_seq<T: Real>(dst: &mut [T], src: &[T], rows: usize, acc: bool) {
    if !acc {
        dst.fill(T::zero());
    }
    let cols = dst.len();
    for i in 0..rows {
        for (d, &s) in dst.iter_mut().zip(&src[i * cols..(i + 1) * cols]) {
            *d = *d + s;
        }
    }
}

/// The forward pass's expert tasks: (expert, rows), each expert's rows cut
/// into near-equal blocks of at most max(256, rows / (2·threads)) so that
/// the threads stay busy when routing is uneven.
fn expert_tasks(offsets: &[usize], threads: usize) -> Vec<(usize, Range<usize>)> {
    let total = offsets[offsets.len() - 1];
    let cap = (total / (2 * threads.max(1))).max(256);
    let mut tasks = Vec::new();
    for x in 0..offsets.len() - 1 {
        let (a, b) = (offsets[x], offsets[x + 1]);
        let pieces = (b - a).div_ceil(cap);
        for p in 0..pieces {
            tasks.push((x, a + (b - a) * p / pieces..a + (b - a) * (p + 1) / pieces));
        }
    }
    tasks
}

/// Runs `f` on every item on all of rayon's threads, each thread taking the
/// largest item left (longest-processing-time-first: expert loads are uneven,
/// and a plain parallel iterator splits by count, not by work).
fn largest_first<I: Send>(mut items: Vec<(usize, I)>, f: impl Fn(I) + Sync) {
    items.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    let queue = std::sync::Mutex::new(items.into_iter());
    let next = || queue.lock().unwrap_or_else(|e| e.into_inner()).next();
    rayon::scope(|s| {
        for _ in 0..rayon::current_num_threads() {
            s.spawn(|_| {
                while let Some((_, item)) = next() {
                    f(item);
                }
            });
        }
    });
}

/// One expert's gradient buffers.
struct ExpertGrads<'a, T> {
    up_w: &'a mut [T],
    up_b: Option<&'a mut [T]>,
    down_w: &'a mut [T],
    down_b: Option<&'a mut [T]>,
}

/// Every expert's gradient buffers of one layer, split from the flat gradients.
fn expert_grads<'a, T>(g: &'a mut [T], experts: &[ExpertIdx]) -> Vec<ExpertGrads<'a, T>> {
    // (range, expert, which) sorted by position, split, then handed out.
    let mut parts: Vec<(Range<usize>, usize, u8)> = Vec::new();
    for (x, ex) in experts.iter().enumerate() {
        parts.push((ex.up_w.clone(), x, 0));
        parts.extend(ex.up_b.clone().map(|r| (r, x, 1)));
        parts.push((ex.down_w.clone(), x, 2));
        parts.extend(ex.down_b.clone().map(|r| (r, x, 3)));
    }
    parts.sort_by_key(|p| p.0.start);
    let ranges: Vec<Range<usize>> = parts.iter().map(|p| p.0.clone()).collect();
    let mut slots: Vec<[Option<&'a mut [T]>; 4]> = (0..experts.len())
        .map(|_| [None, None, None, None])
        .collect();
    for (slice, (_, x, which)) in split_ranges(g, &ranges).into_iter().zip(&parts) {
        slots[*x][*which as usize] = Some(slice);
    }
    slots
        .into_iter()
        .map(|[uw, ub, dw, db]| ExpertGrads {
            up_w: uw.expect("every expert has W_up"),
            up_b: ub,
            down_w: dw.expect("every expert has W_down"),
            down_b: db,
        })
        .collect()
}

/// Disjoint mutable slices of `buf` at sorted, non-overlapping `ranges`.
fn split_ranges<'a, T>(mut buf: &'a mut [T], ranges: &[Range<usize>]) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(ranges.len());
    let mut base = 0;
    for r in ranges {
        let (_, rest) = std::mem::take(&mut buf).split_at_mut(r.start - base);
        let (mid, rest) = rest.split_at_mut(r.len());
        out.push(mid);
        buf = rest;
        base = r.end;
    }
    out
}

impl<T: Real> Engine<T> {
    /// An engine over named parameters (ParamStore order and names).
    pub fn new(
        cfg: &ModelConfig,
        tensors: Vec<(String, Vec<usize>, Vec<T>)>,
        adam: AdamParams,
    ) -> Result<Self> {
        let mut names = Vec::new();
        let mut shapes = Vec::new();
        let mut ranges = Vec::new();
        let mut params = Vec::new();
        for (name, shape, data) in tensors {
            let n: usize = shape.iter().product();
            if data.len() != n {
                return Err(Error::Data(format!(
                    "engine: parameter `{name}` has {} values for shape {shape:?}",
                    data.len()
                )));
            }
            ranges.push(params.len()..params.len() + n);
            params.extend_from_slice(&data);
            names.push(name);
            shapes.push(shape);
        }
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let (d, f, e, v) = (cfg.d_model, cfg.d_ff, cfg.n_experts, cfg.vocab_size);
        let get = |name: String, shape: &[usize]| -> Result<Range<usize>> {
            let i = *index.get(name.as_str()).ok_or_else(|| {
                Error::Data(format!("engine: the model has no parameter `{name}`"))
            })?;
            if shapes[i] != shape {
                return Err(Error::Data(format!(
                    "engine: parameter `{name}` has shape {:?}, expected {shape:?}",
                    shapes[i]
                )));
            }
            Ok(ranges[i].clone())
        };
        let opt = |name: String, shape: &[usize]| -> Result<Option<Range<usize>>> {
            if cfg.bias {
                get(name, shape).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut blocks = Vec::new();
        for l in 0..cfg.n_layer {
            let p = format!("layers.{l}");
            let experts = (0..e)
                .map(|x| {
                    let q = format!("{p}.moe.experts.{x}");
                    Ok(ExpertIdx {
                        up_w: get(format!("{q}.up.weight"), &[f, d])?,
                        up_b: opt(format!("{q}.up.bias"), &[f])?,
                        down_w: get(format!("{q}.down.weight"), &[d, f])?,
                        down_b: opt(format!("{q}.down.bias"), &[d])?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            blocks.push(BlockIdx {
                ln1_w: get(format!("{p}.ln1.weight"), &[d])?,
                ln1_b: opt(format!("{p}.ln1.bias"), &[d])?,
                qkv_w: get(format!("{p}.attn.qkv.weight"), &[3 * d, d])?,
                qkv_b: opt(format!("{p}.attn.qkv.bias"), &[3 * d])?,
                proj_w: get(format!("{p}.attn.proj.weight"), &[d, d])?,
                proj_b: opt(format!("{p}.attn.proj.bias"), &[d])?,
                ln2_w: get(format!("{p}.ln2.weight"), &[d])?,
                ln2_b: opt(format!("{p}.ln2.bias"), &[d])?,
                router: get(format!("{p}.moe.router.weight"), &[e, d])?,
                experts,
            });
        }
        let total = params.len();
        Ok(Engine {
            cfg: cfg.clone(),
            wte: get("wte.weight".into(), &[v, d])?,
            wpe: get("wpe.weight".into(), &[cfg.seq_len, d])?,
            lnf_w: get("ln_f.weight".into(), &[d])?,
            lnf_b: opt("ln_f.bias".into(), &[d])?,
            names,
            shapes,
            ranges,
            params,
            grads: vec![T::zero(); total],
            m: vec![T::zero(); total],
            v: vec![T::zero(); total],
            t: 0,
            adam,
            blocks,
            acts: Vec::new(),
            xf: Vec::new(),
            lnf_mean: Vec::new(),
            lnf_rstd: Vec::new(),
            hf: Vec::new(),
            logits: Vec::new(),
            scratch: Scratch::default(),
            shape: (0, 0),
            loads: vec![vec![0; e]; cfg.n_layer],
            last_forward_s: 0.0,
            profile: Profile::new(),
        })
    }

    /// Parameter names, shapes and flat ranges, in ParamStore order.
    pub fn layout(&self) -> impl Iterator<Item = (&str, &[usize], Range<usize>)> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.ranges)
            .map(|((n, s), r)| (n.as_str(), s.as_slice(), r.clone()))
    }

    fn size_buffers(&mut self, b: usize, t: usize) {
        if self.shape == (b, t) {
            return;
        }
        self.shape = (b, t);
        let c = &self.cfg;
        let (n, d, f, e, k, h) = (b * t, c.d_model, c.d_ff, c.n_experts, c.top_k, c.n_head);
        let r = n * k;
        self.acts.resize_with(c.n_layer, Default::default);
        for a in &mut self.acts {
            for (buf, len) in [
                (&mut a.x, n * d),
                (&mut a.ln1_mean, n),
                (&mut a.ln1_rstd, n),
                (&mut a.h1, n * d),
                (&mut a.qkv, n * 3 * d),
                (&mut a.att, b * h * t * t),
                (&mut a.ya, n * d),
                (&mut a.xm, n * d),
                (&mut a.ln2_mean, n),
                (&mut a.ln2_rstd, n),
                (&mut a.h2, n * d),
                (&mut a.probs, n * e),
                (&mut a.gates, r),
                (&mut a.xe, r * d),
                (&mut a.u, r * f),
                (&mut a.a, r * f),
                (&mut a.ye, r * d),
            ] {
                resize(buf, len);
            }
            a.sel.resize(r, 0);
            a.row_of.resize(r, 0);
            a.slot_of.resize(r, 0);
            a.offsets.resize(e + 1, 0);
        }
        for (buf, len) in [
            (&mut self.xf, n * d),
            (&mut self.lnf_mean, n),
            (&mut self.lnf_rstd, n),
            (&mut self.hf, n * d),
            (&mut self.logits, n * c.vocab_size),
        ] {
            resize(buf, len);
        }
        let s = &mut self.scratch;
        for (buf, len) in [
            (&mut s.dx, n * d),
            (&mut s.dh, n * d),
            (&mut s.dy, n * d),
            (&mut s.dqkv, n * 3 * d),
            (&mut s.dhead, n * 3 * d),
            (&mut s.datt, b * h * t * t),
            (&mut s.yhead, n * d),
            (&mut s.dye, r * d),
            (&mut s.da, r * f),
            (&mut s.dxe, r * d),
            (&mut s.dgate_row, r),
            (&mut s.dlogit_r, n * e),
        ] {
            resize(buf, len);
        }
    }

    /// Forward and backward of one batch: returns the mean cross-entropy and
    /// leaves `scale ·` ∂(mean CE)/∂θ in [`Engine::grads`] (written, or added
    /// to what is there with `acc`, for gradient accumulation).
    pub fn forward_backward(
        &mut self,
        inputs: &[u32],
        targets: &[u32],
        b: usize,
        t: usize,
        scale: f64,
        acc: bool,
    ) -> Result<f64> {
        let v = self.cfg.vocab_size;
        if t == 0 || b == 0 || t > self.cfg.seq_len {
            return Err(Error::Data(format!(
                "engine: batch of {b} × {t} tokens (seq_len is {})",
                self.cfg.seq_len
            )));
        }
        if inputs.len() != b * t || targets.len() != b * t {
            return Err(Error::Data(format!(
                "engine: {} inputs and {} targets for a {b} × {t} batch",
                inputs.len(),
                targets.len()
            )));
        }
        if let Some(&bad) = inputs.iter().chain(targets).find(|&&x| x as usize >= v) {
            return Err(Error::Data(format!(
                "token id {bad} is outside the model's vocabulary of {v}"
            )));
        }
        self.size_buffers(b, t);
        let t0 = std::time::Instant::now();
        self.profile.start();
        self.forward(inputs, b, t);
        self.last_forward_s = t0.elapsed().as_secs_f64();
        let n = b * t;
        let ce = kernels::cross_entropy(&mut self.logits, targets, v, T::c(scale / n as f64));
        self.profile.lap("cross_entropy");
        self.backward(inputs, b, t, acc);
        Ok(ce / n as f64)
    }

    fn forward(&mut self, tokens: &[u32], b: usize, t: usize) {
        let c = self.cfg.clone();
        let (n, d, v) = (b * t, c.d_model, c.vocab_size);
        // x = wte[token] + wpe[position]
        {
            let (wte, wpe) = (
                &self.params[self.wte.clone()],
                &self.params[self.wpe.clone()],
            );
            let x0 = if c.n_layer > 0 {
                &mut self.acts[0].x
            } else {
                &mut self.xf
            };
            x0.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
                let (tok, pos) = (tokens[i] as usize, i % t);
                let (a, p) = (&wte[tok * d..(tok + 1) * d], &wpe[pos * d..(pos + 1) * d]);
                for j in 0..d {
                    row[j] = a[j] + p[j];
                }
            });
        }
        self.profile.lap("embed");
        for l in 0..c.n_layer {
            self.block_forward(l, b, t);
        }
        let (w, bias) = (
            &self.params[self.lnf_w.clone()],
            self.lnf_b.clone().map(|r| &self.params[r]),
        );
        kernels::layer_norm(
            &self.xf,
            w,
            bias,
            &mut self.hf,
            &mut self.lnf_mean,
            &mut self.lnf_rstd,
        );
        self.profile.lap("ln");
        // logits = h_f · wteᵀ (tied)
        let wte = &self.params[self.wte.clone()];
        matmul(
            &mut self.logits,
            v,
            View::new(&self.hf, n, d),
            View::new(wte, v, d).t(),
            false,
            Par::Pool,
        );
        self.profile.lap("lm_head");
    }

    fn block_forward(&mut self, l: usize, b: usize, t: usize) {
        let c = &self.cfg;
        let (n, d, f, e, k, nh) = (b * t, c.d_model, c.d_ff, c.n_experts, c.top_k, c.n_head);
        let hd = d / nh;
        let p = &self.params;
        let ix = &self.blocks[l];
        let (acts, rest) = self.acts.split_at_mut(l + 1);
        let a = &mut acts[l];
        let pr = |r: &Range<usize>| &p[r.clone()];
        let po = |r: &Option<Range<usize>>| r.as_ref().map(|r| &p[r.clone()]);

        // Attention: h1 = ln1(x); qkv = h1·W_qkvᵀ + b
        kernels::layer_norm(
            &a.x,
            pr(&ix.ln1_w),
            po(&ix.ln1_b),
            &mut a.h1,
            &mut a.ln1_mean,
            &mut a.ln1_rstd,
        );
        linear(&mut a.qkv, &a.h1, pr(&ix.qkv_w), po(&ix.qkv_b), n, d, 3 * d);
        self.profile.lap("ln_qkv");
        // Per (batch, head): att = causal_softmax(q·kᵀ / √hd); y = att·v  (t × hd)
        let scale = T::c(1.0 / (hd as f64).sqrt());
        let qkv = &a.qkv;
        a.att
            .par_chunks_mut(t * t)
            .zip(self.scratch.yhead.par_chunks_mut(t * hd))
            .enumerate()
            .for_each(|(bh, (att, y))| {
                let (bi, hi) = (bh / nh, bh % nh);
                let base = bi * t * 3 * d + hi * hd;
                let q = View::strided(&qkv[base..], t, hd, 3 * d);
                let kk = View::strided(&qkv[base + d..], t, hd, 3 * d);
                let vv = View::strided(&qkv[base + 2 * d..], t, hd, 3 * d);
                matmul(att, t, q, kk.t(), false, Par::Seq);
                kernels::causal_softmax(att, t, scale);
                matmul(y, hd, View::new(att, t, t), vv, false, Par::Seq);
            });
        // Heads side by side: ya[(bi, ti), hi·hd + j] = y[bi, hi][ti, j]
        let yhead = &self.scratch.yhead;
        a.ya.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            let (bi, ti) = (i / t, i % t);
            for hi in 0..nh {
                let src = &yhead[((bi * nh + hi) * t + ti) * hd..][..hd];
                row[hi * hd..(hi + 1) * hd].copy_from_slice(src);
            }
        });
        self.profile.lap("attention");
        // xm = x + ya·W_projᵀ + b
        {
            let (x, xm) = (&a.x, &mut a.xm);
            match po(&ix.proj_b) {
                Some(bias) => xm
                    .par_chunks_mut(d)
                    .zip(x.par_chunks(d))
                    .for_each(|(o, x)| {
                        for j in 0..d {
                            o[j] = x[j] + bias[j];
                        }
                    }),
                None => xm.copy_from_slice(x),
            }
            matmul(
                xm,
                d,
                View::new(&a.ya, n, d),
                View::new(pr(&ix.proj_w), d, d).t(),
                true,
                Par::Pool,
            );
        }

        self.profile.lap("proj");
        // MoE: h2 = ln2(xm); p = softmax(h2·W_rᵀ); top-k; gates
        kernels::layer_norm(
            &a.xm,
            pr(&ix.ln2_w),
            po(&ix.ln2_b),
            &mut a.h2,
            &mut a.ln2_mean,
            &mut a.ln2_rstd,
        );
        matmul(
            &mut a.probs,
            e,
            View::new(&a.h2, n, d),
            View::new(pr(&ix.router), e, d).t(),
            false,
            Par::Pool,
        );
        let norm = c.norm_topk;
        a.probs
            .par_chunks_mut(e)
            .zip(a.sel.par_chunks_mut(k).zip(a.gates.par_chunks_mut(k)))
            .for_each(|(p, (sel, g))| {
                kernels::softmax_rows(p, e);
                // Largest first; ties to the lower index (as model::moe::top_k_rows).
                for s in 0..k {
                    let mut best = usize::MAX;
                    for x in 0..e {
                        if sel[..s].contains(&(x as u32)) {
                            continue;
                        }
                        if best == usize::MAX || p[x] > p[best] {
                            best = x;
                        }
                    }
                    sel[s] = best as u32;
                    g[s] = p[best];
                }
                if norm {
                    let z: T = g.iter().copied().sum();
                    g.iter_mut().for_each(|g| *g = *g / z);
                }
            });
        self.profile.lap("ln_router");
        // Dispatch plan: rows expert-major, tokens ascending within an expert.
        let mut counts = vec![0usize; e];
        for &x in &a.sel {
            counts[x as usize] += 1;
        }
        a.offsets[0] = 0;
        for (x, c) in counts.iter().enumerate() {
            a.offsets[x + 1] = a.offsets[x] + c;
        }
        self.loads[l] = counts.iter().map(|&c| c as u64).collect();
        let mut cursor = a.offsets.clone();
        for (slot, &x) in a.sel.iter().enumerate() {
            let row = cursor[x as usize];
            cursor[x as usize] += 1;
            a.row_of[slot] = row as u32;
            a.slot_of[row] = slot as u32;
        }
        // Gather the routed rows once.
        let (h2, slot_of) = (&a.h2, &a.slot_of);
        a.xe.par_chunks_mut(d).enumerate().for_each(|(row, dst)| {
            let tok = slot_of[row] as usize / k;
            dst.copy_from_slice(&h2[tok * d..(tok + 1) * d]);
        });
        self.profile.lap("dispatch");
        // Each expert on its own rows: u = xe·W_upᵀ + b; a = SiLU(u); ye = a·W_downᵀ + b.
        // Experts (or row blocks of busy ones) run side by side, one thread each.
        let tasks = expert_tasks(&a.offsets, rayon::current_num_threads());
        let rows = |w: usize| -> Vec<Range<usize>> {
            tasks.iter().map(|(_, r)| r.start * w..r.end * w).collect()
        };
        let (us, acts_, ys) = (
            split_ranges(&mut a.u, &rows(f)),
            split_ranges(&mut a.a, &rows(f)),
            split_ranges(&mut a.ye, &rows(d)),
        );
        let xe = &a.xe;
        let items = tasks
            .iter()
            .zip(us.into_iter().zip(acts_.into_iter().zip(ys)))
            .map(|(task, bufs)| (task.1.len(), (task, bufs)))
            .collect();
        largest_first(items, |((x, r), (u, (act, y)))| {
            let ex = &ix.experts[*x];
            let ne = r.len();
            let xin = View::new(&xe[r.start * d..r.end * d], ne, d);
            fill_rows_seq(u, po(&ex.up_b));
            matmul(
                u,
                f,
                xin,
                View::new(pr(&ex.up_w), f, d).t(),
                ex.up_b.is_some(),
                Par::Seq,
            );
            kernels::silu_seq(u, act);
            fill_rows_seq(y, po(&ex.down_b));
            matmul(
                y,
                d,
                View::new(act, ne, f),
                View::new(pr(&ex.down_w), d, f).t(),
                ex.down_b.is_some(),
                Par::Seq,
            );
        });
        self.profile.lap("experts");
        // Combine: x_next = xm + Σ_s gate_s · ye[row(t, s)]
        let next = match rest.first_mut() {
            Some(nb) => &mut nb.x,
            None => &mut self.xf,
        };
        let (xm, ye, gates, row_of) = (&a.xm, &a.ye, &a.gates, &a.row_of);
        next.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            o.copy_from_slice(&xm[i * d..(i + 1) * d]);
            for s in 0..k {
                let g = gates[i * k + s];
                let y = &ye[row_of[i * k + s] as usize * d..][..d];
                for j in 0..d {
                    o[j] = o[j] + g * y[j];
                }
            }
        });
        self.profile.lap("combine");
    }

    fn backward(&mut self, tokens: &[u32], b: usize, t: usize, acc: bool) {
        let c = self.cfg.clone();
        let (n, d, v) = (b * t, c.d_model, c.vocab_size);
        let grads = &mut self.grads;
        let p = &self.params;
        // logits = h_f · wteᵀ: dwte = dlogitsᵀ·h_f, dh_f = dlogits·wte
        matmul(
            &mut grads[self.wte.clone()],
            d,
            View::new(&self.logits, n, v).t(),
            View::new(&self.hf, n, d),
            acc,
            Par::Pool,
        );
        let s = &mut self.scratch;
        matmul(
            &mut s.dh,
            d,
            View::new(&self.logits, n, v),
            View::new(&p[self.wte.clone()], v, d),
            false,
            Par::Pool,
        );
        s.dx.fill(T::zero()); // ln_f's backward adds into it
        self.profile.lap("lm_head_bwd");
        {
            let (dw, db) = split2(grads, &self.lnf_w, self.lnf_b.as_ref());
            kernels::layer_norm_backward(
                &s.dh,
                &self.xf,
                &self.lnf_mean,
                &self.lnf_rstd,
                &p[self.lnf_w.clone()],
                &mut s.dx,
                dw,
                db,
                acc,
            );
        }
        self.profile.lap("ln_bwd");
        for l in (0..c.n_layer).rev() {
            self.block_backward(l, b, t, acc);
        }
        // Embeddings: dwte[token] += dx; dwpe[pos] = Σ_batch dx
        let (grads, s) = (&mut self.grads, &self.scratch);
        {
            let dwte = &mut grads[self.wte.clone()];
            for (i, &tok) in tokens.iter().enumerate() {
                let (dst, src) = (&mut dwte[tok as usize * d..][..d], &s.dx[i * d..][..d]);
                for j in 0..d {
                    dst[j] = dst[j] + src[j];
                }
            }
        }
        let dwpe = &mut grads[self.wpe.clone()];
        dwpe.par_chunks_mut(d).enumerate().for_each(|(pos, dst)| {
            if !acc {
                dst.fill(T::zero());
            }
            if pos < t {
                for bi in 0..b {
                    let src = &s.dx[(bi * t + pos) * d..][..d];
                    for j in 0..d {
                        dst[j] = dst[j] + src[j];
                    }
                }
            }
        });
        self.profile.lap("embed_bwd");
    }

    fn block_backward(&mut self, l: usize, b: usize, t: usize, acc: bool) {
        let c = &self.cfg;
        let (n, d, f, e, k, nh) = (b * t, c.d_model, c.d_ff, c.n_experts, c.top_k, c.n_head);
        let hd = d / nh;
        let p = &self.params;
        let ix = &self.blocks[l];
        let a = &self.acts[l];
        let s = &mut self.scratch;
        let g = &mut self.grads;
        let pr = |r: &Range<usize>| &p[r.clone()];

        // ---- MoE. s.dx = ∂L/∂x_next, which is also ∂L/∂xm through the residual.
        // dye[row] = gate · dx[token];  dgate[slot] = ⟨dx[token], ye[row]⟩
        let (dx, gates, slot_of) = (&s.dx, &a.gates, &a.slot_of);
        s.dye
            .par_chunks_mut(d)
            .zip(s.dgate_row.par_iter_mut())
            .zip(a.ye.par_chunks(d))
            .enumerate()
            .for_each(|(row, ((dst, dg), ye))| {
                let slot = slot_of[row] as usize;
                let src = &dx[slot / k * d..][..d];
                let gate = gates[slot];
                let mut dot = T::zero();
                for j in 0..d {
                    dst[j] = gate * src[j];
                    dot = dot + src[j] * ye[j];
                }
                *dg = dot;
            });
        self.profile.lap("combine_bwd");
        // Per expert: dW_down = dyeᵀ·a, da = dye·W_down; du = da ⊙ SiLU'(u);
        // dW_up = duᵀ·xe, dxe = du·W_up. Experts side by side, one thread each,
        // unless one expert holds more than a thread's share of the rows.
        let threads = rayon::current_num_threads();
        let max_rows = (0..e)
            .map(|x| a.offsets[x + 1] - a.offsets[x])
            .max()
            .unwrap_or(0);
        let side_by_side = threads > 1 && max_rows * threads <= n * k;
        let par = if side_by_side { Par::Seq } else { Par::Pool };
        let spans: Vec<Range<usize>> = (0..e).map(|x| a.offsets[x]..a.offsets[x + 1]).collect();
        let das = split_ranges(
            &mut s.da,
            &spans
                .iter()
                .map(|r| r.start * f..r.end * f)
                .collect::<Vec<_>>(),
        );
        let dxes = split_ranges(
            &mut s.dxe,
            &spans
                .iter()
                .map(|r| r.start * d..r.end * d)
                .collect::<Vec<_>>(),
        );
        let egs = expert_grads(g, &ix.experts);
        let dye = &s.dye;
        type Item<'a, T> = (usize, (&'a mut [T], (&'a mut [T], ExpertGrads<'a, T>)));
        let one = |(x, (da, (dxe, eg))): Item<T>| {
            let ex = &ix.experts[x];
            let r = &spans[x];
            let ne = r.len();
            let dy = View::new(&dye[r.start * d..r.end * d], ne, d);
            let act = View::new(&a.a[r.start * f..r.end * f], ne, f);
            let xin = View::new(&a.xe[r.start * d..r.end * d], ne, d);
            matmul(eg.down_w, f, dy.t(), act, acc, par);
            if let Some(db) = eg.down_b {
                col_sum_seq(db, dy.data, ne, acc);
            }
            matmul(da, f, dy, View::new(pr(&ex.down_w), d, f), false, par);
            if side_by_side {
                kernels::silu_backward_seq(&a.u[r.start * f..r.end * f], da);
            } else {
                kernels::silu_backward(&a.u[r.start * f..r.end * f], da);
            }
            let du = View::new(&*da, ne, f);
            matmul(eg.up_w, d, du.t(), xin, acc, par);
            if let Some(db) = eg.up_b {
                col_sum_seq(db, du.data, ne, acc);
            }
            matmul(dxe, d, du, View::new(pr(&ex.up_w), f, d), false, par);
        };
        let items = das.into_iter().zip(dxes.into_iter().zip(egs));
        if side_by_side {
            largest_first(
                items
                    .enumerate()
                    .map(|it| (spans[it.0].len(), it))
                    .collect(),
                one,
            );
        } else {
            items.enumerate().for_each(one);
        }
        self.profile.lap("experts_bwd");
        // Router: gates from probabilities (renormalised top-k), softmax backward.
        let (probs, sel, row_of, dgr) = (&a.probs, &a.sel, &a.row_of, &s.dgate_row);
        let norm = c.norm_topk;
        s.dlogit_r
            .par_chunks_mut(e)
            .enumerate()
            .for_each(|(i, dz)| {
                let pr = &probs[i * e..][..e];
                dz.fill(T::zero());
                let slots = i * k..(i + 1) * k;
                let dg = |s: usize| dgr[row_of[s] as usize];
                if norm {
                    // g_s = p_s / Σ p: dp_s = (dg_s − Σ_j dg_j g_j) / Σ p
                    let z: T = slots.clone().map(|s| pr[sel[s] as usize]).sum();
                    let dot: T = slots.clone().map(|s| dg(s) * pr[sel[s] as usize] / z).sum();
                    for s in slots {
                        dz[sel[s] as usize] = (dg(s) - dot) / z;
                    }
                } else {
                    for s in slots {
                        dz[sel[s] as usize] = dg(s);
                    }
                }
                // softmax: dlogit = p ⊙ (dp − ⟨dp, p⟩)
                let dot: T = dz.iter().zip(pr).map(|(&a, &b)| a * b).sum();
                for j in 0..e {
                    dz[j] = pr[j] * (dz[j] - dot);
                }
            });
        // dh2 = Σ_slots dxe[row] + dlogit·W_r;  dW_r = dlogitᵀ·h2
        let (dxe, row_of) = (&s.dxe, &a.row_of);
        s.dh.par_chunks_mut(d).enumerate().for_each(|(i, dst)| {
            dst.copy_from_slice(&dxe[row_of[i * k] as usize * d..][..d]);
            for sl in 1..k {
                let src = &dxe[row_of[i * k + sl] as usize * d..][..d];
                for j in 0..d {
                    dst[j] = dst[j] + src[j];
                }
            }
        });
        linear_backward(
            &s.dlogit_r,
            &a.h2,
            pr(&ix.router),
            &mut g[ix.router.clone()],
            None,
            Some(&mut s.dh),
            n,
            d,
            e,
            acc,
            true,
        );
        {
            let (dw, db) = split2(g, &ix.ln2_w, ix.ln2_b.as_ref());
            kernels::layer_norm_backward(
                &s.dh,
                &a.xm,
                &a.ln2_mean,
                &a.ln2_rstd,
                pr(&ix.ln2_w),
                &mut s.dx,
                dw,
                db,
                acc,
            );
        }

        self.profile.lap("router_ln_bwd");
        // ---- Attention. s.dx = ∂L/∂xm = ∂L/∂x through the residual.
        {
            let (dw, db) = split2(g, &ix.proj_w, ix.proj_b.as_ref());
            linear_backward(
                &s.dx,
                &a.ya,
                pr(&ix.proj_w),
                dw,
                db,
                Some(&mut s.dy),
                n,
                d,
                d,
                acc,
                false,
            );
        }
        self.profile.lap("proj_bwd");
        let scale = T::c(1.0 / (hd as f64).sqrt());
        let (qkv, dy) = (&a.qkv, &s.dy);
        s.dhead
            .par_chunks_mut(3 * t * hd)
            .zip(s.datt.par_chunks_mut(t * t))
            .zip(a.att.par_chunks(t * t))
            .enumerate()
            .for_each(|(bh, ((dh, datt), att))| {
                let (bi, hi) = (bh / nh, bh % nh);
                let base = bi * t * 3 * d + hi * hd;
                let q = View::strided(&qkv[base..], t, hd, 3 * d);
                let kk = View::strided(&qkv[base + d..], t, hd, 3 * d);
                let vv = View::strided(&qkv[base + 2 * d..], t, hd, 3 * d);
                let dyh = View::strided(&dy[bi * t * d + hi * hd..], t, hd, d);
                let att = View::new(att, t, t);
                let (dq, rest) = dh.split_at_mut(t * hd);
                let (dk, dv) = rest.split_at_mut(t * hd);
                matmul(dv, hd, att.t(), dyh, false, Par::Seq); // dv = attᵀ·dy
                matmul(datt, t, dyh, vv.t(), false, Par::Seq); // datt = dy·vᵀ
                kernels::causal_softmax_backward(att.data, datt, t, scale);
                let ds = View::new(&*datt, t, t);
                matmul(dq, hd, ds, kk, false, Par::Seq); // dq = ds·k
                matmul(dk, hd, ds.t(), q, false, Par::Seq); // dk = dsᵀ·q
            });
        self.profile.lap("attention_bwd");
        // Interleave the heads back into (n × 3d).
        let dhead = &s.dhead;
        s.dqkv
            .par_chunks_mut(3 * d)
            .enumerate()
            .for_each(|(i, row)| {
                let (bi, ti) = (i / t, i % t);
                for hi in 0..nh {
                    let blk = &dhead[(bi * nh + hi) * 3 * t * hd..][..3 * t * hd];
                    for part in 0..3 {
                        let src = &blk[(part * t + ti) * hd..][..hd];
                        row[part * d + hi * hd..][..hd].copy_from_slice(src);
                    }
                }
            });
        {
            let (dw, db) = split2(g, &ix.qkv_w, ix.qkv_b.as_ref());
            linear_backward(
                &s.dqkv,
                &a.h1,
                pr(&ix.qkv_w),
                dw,
                db,
                Some(&mut s.dh),
                n,
                d,
                3 * d,
                acc,
                false,
            );
        }
        let (dw, db) = split2(g, &ix.ln1_w, ix.ln1_b.as_ref());
        kernels::layer_norm_backward(
            &s.dh,
            &a.x,
            &a.ln1_mean,
            &a.ln1_rstd,
            pr(&ix.ln1_w),
            &mut s.dx,
            dw,
            db,
            acc,
        );
        self.profile.lap("qkv_ln_bwd");
    }

    /// Adds λ·∂L_orth/∂W_up to the gradients and returns L_orth = Σ_layers
    /// Σ_{i<j} cos²(w_i, w_j) over the flattened up-projections (SPEC eq. 1).
    pub fn add_orth_grad(&mut self, lambda: f64) -> f64 {
        let mut total = 0.0;
        for ix in &self.blocks {
            let ranges: Vec<Range<usize>> = ix.experts.iter().map(|x| x.up_w.clone()).collect();
            let e = ranges.len();
            let w: Vec<&[T]> = ranges.iter().map(|r| &self.params[r.clone()]).collect();
            let gram = crate::measures::raw_gram(&w);
            let s: Vec<f64> = (0..e).map(|i| gram[i][i].sqrt().max(1e-30)).collect();
            let cos = |i: usize, j: usize| gram[i][j] / (s[i] * s[j]);
            // ∂P/∂w_i = Σ_j A_ij w_j with A_ij = 2c_ij/(s_i s_j) (j ≠ i) and
            // A_ii = −2 Σ_{j≠i} c_ij² / s_i².
            let mut coef = vec![0.0f64; e * e];
            for i in 0..e {
                for j in 0..e {
                    if i != j {
                        let c = cos(i, j);
                        if i < j {
                            total += c * c;
                        }
                        coef[i * e + j] = lambda * 2.0 * c / (s[i] * s[j]);
                        coef[i * e + i] -= lambda * 2.0 * c * c / (s[i] * s[i]);
                    }
                }
            }
            if lambda == 0.0 {
                continue;
            }
            let coef: Vec<T> = coef.iter().map(|&c| T::c(c)).collect();
            let len = ranges[0].len();
            const CH: usize = 1 << 13;
            let gs = split_ranges(&mut self.grads, &ranges);
            // Chunk every expert's gradient the same way; chunk c of all experts together.
            let mut per_chunk: Vec<Vec<&mut [T]>> = (0..len.div_ceil(CH))
                .map(|_| Vec::with_capacity(e))
                .collect();
            for gx in gs {
                for (c, piece) in gx.chunks_mut(CH).enumerate() {
                    per_chunk[c].push(piece);
                }
            }
            per_chunk
                .into_par_iter()
                .enumerate()
                .for_each(|(c, mut gch)| {
                    let o = c * CH;
                    for (i, gi) in gch.iter_mut().enumerate() {
                        for (q, gv) in gi.iter_mut().enumerate() {
                            let mut acc = T::zero();
                            for j in 0..e {
                                acc = acc + coef[i * e + j] * w[j][o + q];
                            }
                            *gv = *gv + acc;
                        }
                    }
                });
        }
        self.profile.lap("orth");
        total
    }

    /// L_orth of the current weights, gradients untouched.
    pub fn orth_value(&mut self) -> f64 {
        self.add_orth_grad(0.0)
    }

    /// ‖∇‖₂ over every gradient (f64 accumulation, fixed order).
    pub fn grad_norm(&self) -> f64 {
        let parts: Vec<f64> = self
            .grads
            .par_chunks(1 << 12)
            .map(|c| kernels::dot(c, c).into())
            .collect();
        parts.iter().sum::<f64>().sqrt()
    }

    /// One AdamW step on every parameter, the gradients multiplied by
    /// `grad_scale` (clipping) first. Matrices decay, vectors do not.
    pub fn adamw_step(&mut self, lr: f64, grad_scale: f64) {
        self.t += 1;
        let ad = self.adam;
        let bc1 = 1.0 - ad.beta1.powi(self.t as i32);
        let bc2 = 1.0 - ad.beta2.powi(self.t as i32);
        let (b1, b2) = (T::c(ad.beta1), T::c(ad.beta2));
        let (c1, c2) = (T::c(1.0 - ad.beta1), T::c(1.0 - ad.beta2));
        let (step, inv_bc2, eps, gs) = (
            T::c(lr / bc1),
            T::c(1.0 / bc2),
            T::c(ad.eps),
            T::c(grad_scale),
        );
        for (r, shape) in self.ranges.iter().zip(&self.shapes) {
            let wd = T::c(if shape.len() >= 2 {
                1.0 - lr * ad.weight_decay
            } else {
                1.0
            });
            let (p, g) = (&mut self.params[r.clone()], &self.grads[r.clone()]);
            let (m, v) = (&mut self.m[r.clone()], &mut self.v[r.clone()]);
            p.par_chunks_mut(1 << 14)
                .zip(g.par_chunks(1 << 14))
                .zip(m.par_chunks_mut(1 << 14).zip(v.par_chunks_mut(1 << 14)))
                .for_each(|((p, g), (m, v))| {
                    for i in 0..p.len() {
                        let g = g[i] * gs;
                        m[i] = b1 * m[i] + c1 * g;
                        v[i] = b2 * v[i] + c2 * g * g;
                        p[i] = wd * p[i] - step * m[i] / ((v[i] * inv_bc2).sqrt() + eps);
                    }
                });
        }
        self.profile.lap("grad_norm_adamw");
    }
}

/// Mutable gradient slices of a weight and its optional bias.
fn split2<'a, T>(
    g: &'a mut [T],
    w: &Range<usize>,
    b: Option<&Range<usize>>,
) -> (&'a mut [T], Option<&'a mut [T]>) {
    match b {
        None => (&mut g[w.clone()], None),
        Some(b) if w.start < b.start => {
            let (lo, hi) = g.split_at_mut(b.start);
            (&mut lo[w.clone()], Some(&mut hi[..b.len()]))
        }
        Some(b) => {
            let (lo, hi) = g.split_at_mut(w.start);
            (&mut hi[..w.len()], Some(&mut lo[b.clone()]))
        }
    }
}

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
            .map(|(n, v)| {
                let t = v.as_tensor();
                Ok((
                    n.clone(),
                    t.dims().to_vec(),
                    t.flatten_all()?.to_vec1::<f32>()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut eng = Engine::new(cfg, tensors, adam)?;
        let Some(opt) = opt else {
            return Ok(eng);
        };
        let state: HashMap<String, Tensor> = opt.state(params)?.into_iter().collect();
        for (i, name) in eng.names.clone().iter().enumerate() {
            let r = eng.ranges[i].clone();
            for (key, buf) in [("m", &mut eng.m), ("v", &mut eng.v)] {
                if let Some(t) = state.get(&format!("{key}.{name}")) {
                    buf[r.clone()].copy_from_slice(&t.flatten_all()?.to_vec1::<f32>()?);
                }
            }
        }
        eng.t = opt.t;
        Ok(eng)
    }

    /// Copy the weights back into the model (before evaluation and saving).
    pub fn store_weights(&self, params: &ParamStore) -> Result<()> {
        for (i, var) in params.vars().iter().enumerate() {
            let (r, shape) = (self.ranges[i].clone(), self.shapes[i].as_slice());
            var.set(&Tensor::from_slice(&self.params[r], shape, var.device())?)?;
        }
        Ok(())
    }

    /// Copy the AdamW moments and step count back into `opt` (before a
    /// checkpoint is written).
    pub fn store_optimizer(&self, params: &ParamStore, opt: &mut AdamW) -> Result<()> {
        let mut state = HashMap::new();
        for (i, name) in params.names().iter().enumerate() {
            let (r, shape) = (self.ranges[i].clone(), self.shapes[i].as_slice());
            let dev = params.device();
            state.insert(
                format!("m.{name}"),
                Tensor::from_slice(&self.m[r.clone()], shape, dev)?,
            );
            state.insert(
                format!("v.{name}"),
                Tensor::from_slice(&self.v[r], shape, dev)?,
            );
        }
        state.insert("t".into(), Tensor::new(&[self.t as f32], params.device())?);
        opt.load_state(params, &state, std::path::Path::new("<engine>"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainConfig;
    use crate::model::Gpt;
    use candle_core::{DType, Device};
    use rand::{Rng, SeedableRng};

    fn small_cfg(bias: bool, norm_topk: bool) -> ModelConfig {
        ModelConfig {
            vocab_size: 40,
            seq_len: 8,
            n_layer: 2,
            n_head: 2,
            d_model: 16,
            d_ff: 24,
            n_experts: 4,
            top_k: 2,
            bias,
            norm_topk,
            ..Default::default()
        }
    }

    const ADAM: AdamParams = AdamParams {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    fn tokens(n: usize, v: usize, seed: u64) -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(0..v as u32)).collect()
    }

    /// The autodiff model's parameters in f64, with non-trivial LayerNorm
    /// gains and biases (they start at 1 and 0).
    fn model_f64(cfg: &ModelConfig) -> Gpt {
        let m = Gpt::new(cfg, DType::F64, &Device::Cpu, 3).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        for (name, var) in m.params.names().iter().zip(m.params.vars()) {
            if name.contains("ln") || name.ends_with(".bias") {
                let n = var.elem_count();
                let base = if name.ends_with(".weight") { 1.0 } else { 0.0 };
                let vals: Vec<f64> = (0..n).map(|_| base + rng.random_range(-0.3..0.3)).collect();
                var.set(&Tensor::from_vec(vals, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        m
    }

    fn engine_f64(cfg: &ModelConfig, m: &Gpt) -> Engine<f64> {
        let tensors = m
            .params
            .names()
            .iter()
            .zip(m.params.vars())
            .map(|(n, v)| {
                (
                    n.clone(),
                    v.dims().to_vec(),
                    v.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                )
            })
            .collect();
        Engine::new(cfg, tensors, ADAM).unwrap()
    }

    /// Loss and every gradient equal the autodiff model's (float64), with and
    /// without biases and top-k renormalisation, L_orth included.
    #[test]
    fn gradients_match_the_autodiff_model() {
        for (bias, norm) in [(true, true), (false, false), (true, false)] {
            let cfg = small_cfg(bias, norm);
            let m = model_f64(&cfg);
            let (b, t) = (3, 7); // t < seq_len: positions past t get no gradient
            let x = tokens(b * t, cfg.vocab_size, 1);
            let y = tokens(b * t, cfg.vocab_size, 2);
            let lam = 0.3;
            let xt = Tensor::from_vec(x.clone(), (b, t), &Device::Cpu).unwrap();
            let yt = Tensor::from_vec(y.clone(), (b, t), &Device::Cpu).unwrap();
            let ce = m.loss(&xt, &yt).unwrap();
            let orth = crate::measures::orth_loss(&m, crate::measures::Family::Up).unwrap();
            let total = (&ce + (&orth * lam).unwrap()).unwrap();
            let grads = total.backward().unwrap();

            let mut eng = engine_f64(&cfg, &m);
            let loss = eng.forward_backward(&x, &y, b, t, 1.0, false).unwrap();
            let o = eng.add_orth_grad(lam);
            assert!(
                (loss - ce.to_scalar::<f64>().unwrap()).abs() < 1e-12,
                "loss"
            );
            assert!((o - orth.to_scalar::<f64>().unwrap()).abs() < 1e-12, "orth");
            for (name, var) in m.params.names().iter().zip(m.params.vars()) {
                let want: Vec<f64> = match grads.get(var.as_tensor()) {
                    Some(g) => g.flatten_all().unwrap().to_vec1().unwrap(),
                    None => vec![0.0; var.elem_count()],
                };
                let r = eng.layout().find(|(n, _, _)| n == name).unwrap().2;
                let got = &eng.grads[r];
                let scale = want.iter().fold(1e-8f64, |a, v| a.max(v.abs()));
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-9 * scale,
                        "bias {bias} norm {norm}: {name}[{i}]: {g} vs {w}"
                    );
                }
            }
            // Accumulation: a second pass with acc adds the same again.
            let before = eng.grads.clone();
            eng.forward_backward(&x, &y, b, t, 1.0, true).unwrap();
            eng.add_orth_grad(lam);
            for (a, b0) in eng.grads.iter().zip(&before) {
                assert!((a - 2.0 * b0).abs() <= 1e-12 * (1.0 + b0.abs()));
            }
        }
    }

    /// Directional finite differences of the engine's own float64 loss, one
    /// random direction per parameter tensor.
    #[test]
    fn gradient_matches_finite_differences() {
        let cfg = small_cfg(true, true);
        let m = model_f64(&cfg);
        let mut eng = engine_f64(&cfg, &m);
        let (b, t) = (2, 8);
        let x = tokens(b * t, cfg.vocab_size, 4);
        let y = tokens(b * t, cfg.vocab_size, 5);
        let lam = 0.5;
        let loss_at = |e: &mut Engine<f64>| {
            let ce = e.forward_backward(&x, &y, b, t, 1.0, false).unwrap();
            ce + lam * e.add_orth_grad(lam)
        };
        loss_at(&mut eng);
        let g = eng.grads.clone();
        let p0 = eng.params.clone();
        let layout: Vec<(String, Range<usize>)> =
            eng.layout().map(|(n, _, r)| (n.to_string(), r)).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        for (name, r) in layout {
            let u: Vec<f64> = r.clone().map(|_| rng.random_range(-1.0..1.0)).collect();
            let h = 1e-6;
            let mut at = |s: f64| {
                eng.params = p0.clone();
                for (p, u) in eng.params[r.clone()].iter_mut().zip(&u) {
                    *p += s * u;
                }
                loss_at(&mut eng)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let an: f64 = g[r.clone()].iter().zip(&u).map(|(g, u)| g * u).sum();
            assert!(
                (fd - an).abs() < 1e-7 * (1.0 + an.abs()),
                "{name}: {fd} vs {an}"
            );
        }
    }

    /// The engine's AdamW step equals `optim::AdamW`'s on the same gradients,
    /// and `from_model` / `store_weights` / `store_optimizer` carry parameters
    /// and moments both ways.
    #[test]
    fn adamw_matches_the_reference_optimizer() {
        let cfg = small_cfg(true, true);
        let m = Gpt::new(&cfg, DType::F32, &Device::Cpu, 1).unwrap();
        let tc = TrainConfig::default();
        let adam = AdamParams {
            beta1: tc.beta1,
            beta2: tc.beta2,
            eps: tc.eps,
            weight_decay: tc.weight_decay,
        };
        let mut opt = AdamW::new(&m.params, &tc).unwrap();
        let mut eng = Engine::from_model(&cfg, &m.params, Some(&opt), adam).unwrap();
        let (b, t) = (2, 8);
        let x = tokens(b * t, cfg.vocab_size, 7);
        let y = tokens(b * t, cfg.vocab_size, 8);
        for step in 0..3 {
            eng.forward_backward(&x, &y, b, t, 1.0, false).unwrap();
            let grads: Vec<Option<Tensor>> = eng
                .layout()
                .map(|(_, s, r)| Some(Tensor::from_slice(&eng.grads[r], s, &Device::Cpu).unwrap()))
                .collect();
            let lr = 1e-2 * (step + 1) as f64;
            opt.step(&m.params, &grads, lr).unwrap();
            eng.adamw_step(lr, 1.0);
            // Reference parameters now, and the engine's after a round trip.
            let want: Vec<f32> = m
                .params
                .vars()
                .iter()
                .flat_map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect();
            for (i, (a, w)) in eng.params.iter().zip(&want).enumerate() {
                assert!(
                    (a - w).abs() <= 1e-6 * (1.0 + w.abs()),
                    "step {step} param {i}: {a} vs {w}"
                );
            }
        }
        // store_weights/store_optimizer then from_model() reproduce the engine exactly.
        let mut opt2 = AdamW::new(&m.params, &tc).unwrap();
        eng.store_weights(&m.params).unwrap();
        eng.store_optimizer(&m.params, &mut opt2).unwrap();
        let back = Engine::from_model(&cfg, &m.params, Some(&opt2), adam).unwrap();
        assert_eq!(back.params, eng.params);
        assert_eq!(back.m, eng.m);
        assert_eq!(back.v, eng.v);
        assert_eq!(back.t, 3);
    }

    #[test]
    fn bad_batches_are_errors() {
        let cfg = small_cfg(true, true);
        let m = model_f64(&cfg);
        let mut eng = engine_f64(&cfg, &m);
        let x = tokens(16, cfg.vocab_size, 1);
        let mut bad = x.clone();
        bad[3] = 40;
        let e = eng
            .forward_backward(&bad, &x, 2, 8, 1.0, false)
            .unwrap_err();
        assert!(e.to_string().contains("token id 40"), "{e}");
        let e = eng.forward_backward(&x, &x, 1, 16, 1.0, false).unwrap_err();
        assert!(e.to_string().contains("seq_len"), "{e}");
        let e = eng
            .forward_backward(&x[..15], &x, 2, 8, 1.0, false)
            .unwrap_err();
        assert!(e.to_string().contains("15 inputs"), "{e}");
    }
}
