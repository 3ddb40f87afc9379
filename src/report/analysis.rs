//! Figures of one `analyze` report (`moescope analyze --figures DIR`): the
//! measures by layer, and the expert-by-expert matrices of a few layers.

use super::svg::{heatmap, Chart, Series};
use crate::fsutil::write_atomic;
use crate::measures::analyze::{LayerReport, Report};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// At most this many layers get their E×E heatmaps (evenly spread, first and last included).
pub const HEATMAP_LAYERS: usize = 6;

fn series(
    name: &str,
    layers: &[LayerReport],
    f: impl Fn(&LayerReport) -> Option<f64>,
) -> Option<Series> {
    let points: Vec<(f64, f64, Option<f64>)> = layers
        .iter()
        .filter_map(|l| {
            f(l).filter(|v| v.is_finite())
                .map(|v| (l.index as f64, v, None))
        })
        .collect();
    (!points.is_empty()).then(|| Series {
        name: name.into(),
        points,
        line: true,
    })
}

/// The layers whose matrices are drawn.
pub fn heatmap_layers(n: usize) -> Vec<usize> {
    if n <= HEATMAP_LAYERS {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..HEATMAP_LAYERS)
        .map(|i| (i * (n - 1) + (HEATMAP_LAYERS - 1) / 2) / (HEATMAP_LAYERS - 1))
        .collect();
    v.dedup();
    v
}

fn range(m: &[Vec<Option<f64>>]) -> (f64, f64) {
    let vals: Vec<f64> = m.iter().flatten().flatten().copied().collect();
    let lo = vals.iter().copied().fold(0.0f64, f64::min);
    let hi = vals.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
    (lo, hi)
}

/// Write the figures of `r` into `dir` (created); returns the files written.
pub fn analysis_figures(r: &Report, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let layers = &r.layers;
    let mut files: Vec<(String, String)> = Vec::new();
    // Integer ticks at the analysed layers (at most ~12 labels).
    let step = layers.len().div_ceil(12).max(1);
    let ticks: Vec<(f64, String)> = layers
        .iter()
        .step_by(step)
        .map(|l| (l.index as f64, l.index.to_string()))
        .collect();
    let chart = |title: &str, y: &str| {
        let mut c = Chart::new(title, "layer", y);
        c.x_ticks = Some(ticks.clone());
        c
    };

    let mut c = chart("Expert overlap by layer", "overlap");
    c.series.extend(
        [
            series("act MSO (routed)", layers, |l| l.act_mso),
            series("act MSO (all)", layers, |l| l.act_mso_all),
            series("Jacobian |A|", layers, |l| {
                l.jacobian.as_ref().and_then(|j| j.mean_abs)
            }),
            series("subspace overlap", layers, |l| {
                l.subspace.as_ref().and_then(|s| s.mean_overlap)
            }),
            series("random r/d", layers, |l| {
                l.subspace.as_ref().map(|s| s.random_overlap)
            }),
        ]
        .into_iter()
        .flatten(),
    );
    files.push(("overlap-by-layer.svg".into(), c.svg()));

    let mut c = chart("Weight overlap by layer", "weight MSO");
    let mut fams: Vec<&str> = layers
        .iter()
        .flat_map(|l| l.weight_mso.keys().copied())
        .collect();
    fams.sort_unstable();
    fams.dedup();
    for f in fams {
        c.series
            .extend(series(f, layers, |l| l.weight_mso.get(f).copied()));
    }
    files.push(("weight-overlap-by-layer.svg".into(), c.svg()));

    let mut c = chart(
        "Routing by layer (balance = exp(H(load))/E)",
        "fraction of the maximum",
    );
    c.series.extend(
        [
            series("balance", layers, |l| Some(l.telemetry.balance)),
            series("entropy / ln E", layers, |l| {
                let e = l.telemetry.load.len() as f64;
                (e > 1.0).then(|| l.telemetry.router_entropy / e.ln())
            }),
            series("dead / E", layers, |l| {
                Some(l.telemetry.dead_experts.len() as f64 / l.telemetry.load.len().max(1) as f64)
            }),
        ]
        .into_iter()
        .flatten(),
    );
    files.push(("routing-by-layer.svg".into(), c.svg()));

    for i in heatmap_layers(layers.len()) {
        let l = &layers[i];
        let idx = l.index;
        let m = &l.act_overlap;
        if m.iter().flatten().any(Option::is_some) {
            let (lo, hi) = range(m);
            files.push((
                format!("layer{idx}-activation-overlap.svg"),
                heatmap(
                    &format!("Layer {idx}: mean cos² of co-routed expert outputs"),
                    m,
                    lo,
                    hi,
                ),
            ));
        }
        if let Some(w) = l.weight_overlap.get("up") {
            let sq: Vec<Vec<Option<f64>>> = w
                .iter()
                .map(|r| r.iter().map(|v| v.map(|c| c * c)).collect())
                .collect();
            let (lo, hi) = range(&sq);
            files.push((
                format!("layer{idx}-weight-overlap-up.svg"),
                heatmap(&format!("Layer {idx}: G_ij² of W_up"), &sq, lo, hi),
            ));
        }
        if let Some(j) = &l.jacobian {
            let (lo, hi) = range(&j.matrix);
            files.push((
                format!("layer{idx}-jacobian.svg"),
                heatmap(
                    &format!("Layer {idx}: Jacobian alignment A_ij ({})", j.mode),
                    &j.matrix,
                    lo,
                    hi,
                ),
            ));
        }
        if let Some(s) = &l.subspace {
            files.push((
                format!("layer{idx}-subspace-overlap.svg"),
                heatmap(
                    &format!(
                        "Layer {idx}: subspace overlap (random {:.3})",
                        s.random_overlap
                    ),
                    &s.overlap,
                    0.0,
                    1.0,
                ),
            ));
        }
    }
    let mut out = Vec::new();
    for (name, svg) in files {
        let p = dir.join(name);
        write_atomic(&p, svg.as_bytes())?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heatmap_layers_spread_and_keep_ends() {
        assert_eq!(heatmap_layers(3), vec![0, 1, 2]);
        let v = heatmap_layers(32);
        assert_eq!(v.len(), HEATMAP_LAYERS);
        assert_eq!((v[0], *v.last().unwrap()), (0, 31));
        assert!(v.windows(2).all(|w| w[0] < w[1]));
    }
}
