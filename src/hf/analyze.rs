//! Every measure of `moescope analyze` on a Hugging Face checkpoint, run
//! layer by layer.
//!
//! Streaming (the default) keeps the hidden states of the analysed tokens
//! (tokens × d floats) and, for each decoder layer in turn, loads its weights,
//! runs every batch through it, measures it and drops it: resident memory is
//! about one layer in f32 plus the activations, whatever the model's size.
//! In-memory mode loads every layer first and runs batch by batch through the
//! whole model; both orders feed each layer's measures the same batches in
//! the same order, so their reports are identical.

use super::model::{self, DecoderLayer, FfnCapture, Head, Rope, SharedCapture};
use super::HfCheckpoint;
use crate::config::Routing;
use crate::measures::analyze::{
    check_tokens, summarize, GeometryOptions, LayerAnalyzer, LayerReport, Options, Perplexity,
    Report, SharedExpertReport, Source, SCHEMA,
};
use crate::measures::{cos2, Family};
use crate::model::layers::cross_entropy_rows;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::time::Instant;

/// How to run the analysis.
#[derive(Debug, Clone)]
pub struct HfOptions {
    /// Tokens analysed (the first N of the input).
    pub tokens: usize,
    /// Context of each window.
    pub seq_len: usize,
    /// Windows per forward pass.
    pub batch: usize,
    /// Block indices to measure (MoE layers only); None = every MoE layer.
    pub layers: Option<Vec<usize>>,
    /// Load every layer up front instead of one at a time.
    pub in_memory: bool,
    pub progress: bool,
}

/// Time and memory of one decoder layer.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTiming {
    pub index: usize,
    /// Reading and converting the layer's weights.
    pub load_s: f64,
    /// Forward passes and measures.
    pub compute_s: f64,
    /// Peak resident memory while this layer was processed (streaming mode).
    pub peak_rss_mb: Option<f64>,
}

/// Accumulates the shared-expert report of one layer.
#[derive(Debug, Default)]
struct SharedAcc {
    cos2: f64,
    pairs: usize,
    ratio: f64,
    ratio_n: usize,
    gate: f64,
    gate_n: usize,
    gated: bool,
}

fn rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl SharedAcc {
    fn add(&mut self, cap: &FfnCapture, s: &SharedCapture) -> Result<()> {
        let d = s.output.dim(1)?;
        let out = rows(&s.output)?;
        let routed = rows(&s.routed)?;
        let norm = |v: &[f32]| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        for (toks, h) in &cap.moe.expert_outputs {
            let Some(h) = h else { continue };
            let h = rows(h)?;
            for (i, &t) in toks.iter().enumerate() {
                let t = t as usize;
                self.cos2 += cos2(&h[i * d..(i + 1) * d], &out[t * d..(t + 1) * d]);
                self.pairs += 1;
            }
        }
        for t in 0..out.len() / d {
            let g = s.gate.as_ref().map_or(1.0, |g| g[t] as f64);
            let nr = norm(&routed[t * d..(t + 1) * d]);
            if nr > 0.0 {
                self.ratio += g * norm(&out[t * d..(t + 1) * d]) / nr;
                self.ratio_n += 1;
            }
        }
        if let Some(g) = &s.gate {
            self.gated = true;
            self.gate += g.iter().map(|&x| x as f64).sum::<f64>();
            self.gate_n += g.len();
        }
        Ok(())
    }

    fn report(&self, d_ff: usize) -> SharedExpertReport {
        let div = |a: f64, n: usize| if n > 0 { a / n as f64 } else { f64::NAN };
        SharedExpertReport {
            d_ff,
            act_cos2_routed: div(self.cos2, self.pairs),
            norm_ratio: div(self.ratio, self.ratio_n),
            gate_mean: self.gated.then(|| div(self.gate, self.gate_n)),
        }
    }
}

/// The per-layer measuring state.
struct Measured {
    an: LayerAnalyzer,
    shared: Option<SharedAcc>,
}

impl Measured {
    fn observe(
        &mut self,
        layer: &DecoderLayer,
        h: &Tensor,
        cap: &FfnCapture,
        geo: &GeometryOptions,
    ) -> Result<()> {
        let moe = layer.ffn.moe().expect("measured layers are MoE layers");
        self.an.observe(moe, h, &cap.moe, geo)?;
        if let (Some(acc), Some(s)) = (self.shared.as_mut(), cap.shared.as_ref()) {
            acc.add(cap, s)?;
        }
        Ok(())
    }

    fn finish(
        self,
        layer: &DecoderLayer,
        ck: &HfCheckpoint,
        families: &[Family],
        geo: &GeometryOptions,
    ) -> Result<LayerReport> {
        let moe = layer.ffn.moe().expect("measured layers are MoE layers");
        let mut r = self.an.finish(moe, families, geo)?;
        r.shared_expert = match (self.shared, ck.cfg.shared) {
            (Some(acc), Some(spec)) => Some(acc.report(spec.d_ff)),
            _ => None,
        };
        Ok(r)
    }
}

/// The MoE layers to measure, checked against the model.
pub fn select_layers(ck: &HfCheckpoint, layers: Option<&[usize]>) -> Result<Vec<usize>> {
    let moe: Vec<usize> = (0..ck.cfg.n_layers)
        .filter(|&l| ck.cfg.moe_layers[l])
        .collect();
    if moe.is_empty() {
        return Err(Error::Other(
            "the model has no MoE layer: nothing to analyse".into(),
        ));
    }
    let Some(want) = layers else { return Ok(moe) };
    let mut out = Vec::new();
    for &l in want {
        if l >= ck.cfg.n_layers {
            return Err(Error::config(
                "--layers",
                format!(
                    "layer {l} does not exist (the model has {} layers, 0..{})",
                    ck.cfg.n_layers,
                    ck.cfg.n_layers - 1
                ),
            ));
        }
        if !ck.cfg.moe_layers[l] {
            return Err(Error::config(
                "--layers",
                format!("layer {l} is a dense layer; the MoE layers are {moe:?}"),
            ));
        }
        if !out.contains(&l) {
            out.push(l);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Analyse `ck` on the first `opts.tokens` of `tokens`.
pub fn analyze(
    ck: &HfCheckpoint,
    tokens: &[u32],
    opts: &HfOptions,
    families: &[Family],
    geo: &GeometryOptions,
    source: Source,
) -> Result<(Report, Vec<LayerTiming>)> {
    let cfg = &ck.cfg;
    let n = opts.tokens;
    check_tokens(tokens, n, cfg.vocab_size)?;
    if opts.seq_len == 0 || opts.batch == 0 {
        return Err(Error::config("--seq-len / --batch", "must be at least 1"));
    }
    let selected = select_layers(ck, opts.layers.as_deref())?;
    // Without a layer restriction the whole model runs and the loss comes for free.
    let full = opts.layers.is_none();
    let last = if full {
        cfg.n_layers - 1
    } else {
        *selected.last().expect("non-empty")
    };
    let windows = crate::data::eval_windows(n + 1, opts.seq_len, 0);
    let batches = batch_windows(tokens, &windows, opts.batch);
    let rope = Rope::new(cfg.head_dim, cfg.rope_theta, opts.seq_len.min(n.max(1)))?;
    let renorm = cfg.norm_topk;
    let mut measured: Vec<Option<Measured>> = (0..cfg.n_layers)
        .map(|l| {
            selected.contains(&l).then(|| Measured {
                an: LayerAnalyzer::new(l, cfg.n_experts, cfg.top_k, cfg.hidden_size, renorm, geo),
                shared: cfg.shared.map(|_| SharedAcc::default()),
            })
        })
        .collect();
    let run = LayerRun {
        ck,
        batches: &batches,
        rope: &rope,
        families,
        geo,
        last,
        bar: progress_bar(opts.progress, last + 1),
    };
    let mut xs = embed_batches(ck, &batches)?;
    let (reports, timings) = if opts.in_memory {
        run.in_memory(&mut xs, &mut measured)?
    } else {
        run.streaming(&mut xs, &mut measured)?
    };
    run.bar.finish_and_clear();

    let perplexity = if full {
        let head = Head::load(&ck.weights, cfg)?;
        Some(loss(&head, &xs, &batches, &windows, tokens)?)
    } else {
        None
    };
    let summary = summarize(&reports, families);
    let tokens_seen = n.min(windows.iter().map(|w| w.1).sum());
    Ok((
        Report {
            schema: SCHEMA,
            source,
            options: Options::new(
                n,
                families,
                opts.seq_len,
                opts.batch,
                (Routing::Topk, cfg.top_k, cfg.norm_topk),
                geo,
            ),
            tokens: tokens_seen,
            perplexity,
            layers: reports,
            summary,
        },
        timings,
    ))
}

/// One forward pass's worth of windows: (windows, window length, their token
/// ids back to back).
type Batch = (usize, usize, Vec<u32>);

/// Group the `(start, len)` windows into batches of up to `batch` windows of
/// equal length.
fn batch_windows(tokens: &[u32], windows: &[(usize, usize)], batch: usize) -> Vec<Batch> {
    crate::data::batch_ranges(windows, batch, |a, b| a.1 == b.1)
        .into_iter()
        .map(|r| {
            let (b, len) = (r.len(), windows[r.start].1);
            let mut ids = Vec::with_capacity(b * len);
            for &(s, l) in &windows[r] {
                ids.extend_from_slice(&tokens[s..s + l]);
            }
            (b, len, ids)
        })
        .collect()
}

/// The input hidden states of every batch: (b·t, d) each.
fn embed_batches(ck: &HfCheckpoint, batches: &[Batch]) -> Result<Vec<Tensor>> {
    let embed = model::load_embeddings(&ck.weights, &ck.cfg)?;
    batches
        .iter()
        .map(|(_, _, ids)| model::embed(&embed, ids))
        .collect()
}

/// A bar over the decoder layers, or a hidden one.
fn progress_bar(show: bool, layers: usize) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(layers as u64);
    b.set_style(
        ProgressStyle::with_template("{spinner} layer {pos}/{len} [{bar:30}] {elapsed} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    b
}

/// Runs the batches through layers `0..=last`, measuring the selected ones;
/// both orders below produce the same reports.
struct LayerRun<'a> {
    ck: &'a HfCheckpoint,
    batches: &'a [Batch],
    rope: &'a Rope,
    families: &'a [Family],
    geo: &'a GeometryOptions,
    last: usize,
    bar: ProgressBar,
}

impl LayerRun<'_> {
    /// Load every layer first, then run batch by batch through the whole model.
    fn in_memory(
        &self,
        xs: &mut [Tensor],
        measured: &mut [Option<Measured>],
    ) -> Result<(Vec<LayerReport>, Vec<LayerTiming>)> {
        let mut layers = Vec::new();
        let mut timings = Vec::new();
        for l in 0..=self.last {
            let t0 = Instant::now();
            layers.push(DecoderLayer::load(&self.ck.weights, &self.ck.cfg, l)?);
            timings.push(LayerTiming {
                index: l,
                load_s: t0.elapsed().as_secs_f64(),
                compute_s: 0.0,
                peak_rss_mb: None,
            });
            self.bar.set_message(format!("loaded layer {l}"));
            self.bar.inc(1);
        }
        for (x, (b, t, _)) in xs.iter_mut().zip(self.batches) {
            for layer in &layers {
                let t0 = Instant::now();
                let l = layer.index;
                *x = run_layer(layer, x, *b, *t, self.rope, measured[l].as_mut(), self.geo)?;
                timings[l].compute_s += t0.elapsed().as_secs_f64();
            }
        }
        let mut reports = Vec::new();
        for layer in &layers {
            if let Some(m) = measured[layer.index].take() {
                let t0 = Instant::now();
                reports.push(m.finish(layer, self.ck, self.families, self.geo)?);
                timings[layer.index].compute_s += t0.elapsed().as_secs_f64();
            }
        }
        Ok((reports, timings))
    }

    /// One layer at a time: load it, run every batch through it, measure, drop it.
    fn streaming(
        &self,
        xs: &mut [Tensor],
        measured: &mut [Option<Measured>],
    ) -> Result<(Vec<LayerReport>, Vec<LayerTiming>)> {
        let mut reports = Vec::new();
        let mut timings = Vec::new();
        for (l, m) in measured.iter_mut().enumerate().take(self.last + 1) {
            crate::memory::reset_peak_rss();
            let t0 = Instant::now();
            self.bar.set_message(format!("loading layer {l}"));
            let layer = DecoderLayer::load(&self.ck.weights, &self.ck.cfg, l)?;
            let load_s = t0.elapsed().as_secs_f64();
            self.bar
                .set_message(format!("running layer {l} (loaded in {load_s:.1}s)"));
            let t1 = Instant::now();
            for (x, (b, t, _)) in xs.iter_mut().zip(self.batches) {
                *x = run_layer(&layer, x, *b, *t, self.rope, m.as_mut(), self.geo)?;
            }
            if let Some(m) = m.take() {
                reports.push(m.finish(&layer, self.ck, self.families, self.geo)?);
            }
            drop(layer);
            timings.push(LayerTiming {
                index: l,
                load_s,
                compute_s: t1.elapsed().as_secs_f64(),
                peak_rss_mb: crate::memory::peak_rss_bytes().map(|b| b as f64 / (1 << 20) as f64),
            });
            self.bar.inc(1);
        }
        Ok((reports, timings))
    }
}

/// One layer on one batch, measured when `m` is given.
fn run_layer(
    layer: &DecoderLayer,
    x: &Tensor,
    b: usize,
    t: usize,
    rope: &Rope,
    m: Option<&mut Measured>,
    geo: &GeometryOptions,
) -> Result<Tensor> {
    let (y, cap) = layer.forward(x, b, t, rope, m.is_some())?;
    if let (Some(m), Some((h, cap))) = (m, cap) {
        m.observe(layer, &h, &cap, geo)?;
    }
    Ok(y)
}

/// Mean next-token loss over every analysed position whose target exists.
fn loss(
    head: &Head,
    xs: &[Tensor],
    batches: &[Batch],
    windows: &[(usize, usize)],
    tokens: &[u32],
) -> Result<Perplexity> {
    const ROWS: usize = 256; // logits (ROWS, V) at a time
    let mut sum = 0.0f64;
    let mut count = 0usize;
    let mut w = 0usize;
    for (x, (b, t, _)) in xs.iter().zip(batches) {
        let mut rows_idx = Vec::new();
        let mut targets = Vec::new();
        for i in 0..*b {
            let (s, _) = windows[w + i];
            for p in 0..*t {
                if s + p + 1 < tokens.len() {
                    rows_idx.push((i * t + p) as u32);
                    targets.push(tokens[s + p + 1]);
                }
            }
        }
        w += b;
        for (ri, ti) in rows_idx.chunks(ROWS).zip(targets.chunks(ROWS)) {
            let xr = x.index_select(&Tensor::new(ri, &Device::Cpu)?, 0)?;
            let logits = head.logits(&xr)?;
            let l = cross_entropy_rows(&logits, &Tensor::new(ti, &Device::Cpu)?)?;
            sum += l.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            count += ti.len();
        }
    }
    let loss = if count > 0 {
        sum / count as f64
    } else {
        f64::NAN
    };
    Ok(Perplexity {
        loss,
        ppl: loss.exp(),
        tokens: count,
    })
}
