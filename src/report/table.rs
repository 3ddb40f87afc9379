//! The report's tables: cells that link to the runs behind them, and the
//! number formats every table shares.

use super::runs::Run;
use crate::experiments::stats;

/// A table cell: text plus links (label, relative path) to the runs behind it.
#[derive(Debug, Clone, Default)]
pub(super) struct TableCell {
    pub text: String,
    pub links: Vec<(String, String)>,
}

impl From<String> for TableCell {
    fn from(text: String) -> Self {
        TableCell {
            text,
            links: vec![],
        }
    }
}

impl TableCell {
    /// `text`, linked to the summary.json of each of `runs`.
    pub fn linked(text: String, runs: &[&Run]) -> Self {
        TableCell {
            text,
            links: summary_links(runs),
        }
    }
}

/// A titled table with a note under it.
pub(super) struct Table {
    pub title: String,
    pub header: Vec<&'static str>,
    pub rows: Vec<Vec<TableCell>>,
    pub note: String,
}

/// Links `s<seed>` to each run's summary.json; none for a pool of runs that
/// share seeds or are too many to list (e.g. step 0 over every λ), where
/// `s42` would not say which run it is.
fn summary_links(runs: &[&Run]) -> Vec<(String, String)> {
    const MAX_LINKS: usize = 8;
    let mut seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    seeds.sort_unstable();
    seeds.dedup();
    if runs.len() > MAX_LINKS || seeds.len() < runs.len() {
        return Vec::new();
    }
    runs.iter()
        .map(|r| {
            (
                format!("s{}", r.seed),
                format!("runs/{}/summary.json", r.id),
            )
        })
        .collect()
}

/// A number with 5 significant digits (at most 4 decimals), or in scientific
/// notation when very small or large.
pub(super) fn num(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        let int_digits = if v.abs() < 1.0 {
            1
        } else {
            v.abs().log10().floor() as usize + 1
        };
        let decimals = 5usize.saturating_sub(int_digits).min(4);
        format!("{v:.decimals$}")
    }
}

/// `mean ± sd` (just the mean for one value, `n/a` for none).
pub(super) fn mean_sd(xs: &[f64]) -> String {
    if xs.is_empty() {
        return "n/a".into();
    }
    if xs.len() < 2 {
        return num(stats::mean(xs));
    }
    format!("{} ± {}", num(stats::mean(xs)), num(stats::sd(xs)))
}

/// A λ as written in the sweep.
pub(super) fn lam(v: f64) -> String {
    format!("{v}")
}

/// A file-name-safe stem of `s` (at most its last 40 characters).
pub(super) fn sanitize(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    s.trim_matches('-')
        .chars()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::num;

    #[test]
    fn numbers_keep_five_significant_digits() {
        assert_eq!(num(4.859_312), "4.8593");
        assert_eq!(num(128.940_71), "128.94");
        assert_eq!(num(10_326.08), "10326");
        assert_eq!(num(0.092_44), "0.0924");
        assert_eq!(num(0.0), "0.0000");
        assert_eq!(num(-7.5), "-7.5000");
        assert_eq!(num(2.5e-4), "2.500e-4");
        assert_eq!(num(1.5e6), "1.500e6");
        assert_eq!(num(f64::NAN), "n/a");
    }
}
