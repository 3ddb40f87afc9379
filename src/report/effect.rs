//! A treatment's effect against its baseline runs, the way every table reports
//! it: Δ% of the means with its paired 95% CI, the paired effect size d_z, the
//! t-test's p, and Holm's adjustment across the tests of one table.

use super::runs::{compare, paired_by_seed, vals, Run};
use super::table::TableCell;
use crate::experiments::stats;

/// The comparison of one group of runs with the baseline on one measure.
#[derive(Debug, Clone)]
pub(super) struct Effect {
    /// Δ% of the group mean against the baseline mean.
    pub delta_pct: f64,
    /// 95% CI of Δ% from the paired differences (None unless paired by seed).
    pub ci: Option<(f64, f64)>,
    /// Paired Cohen's d_z: mean difference / sd of the differences.
    pub d_z: Option<f64>,
    /// Paired t by seed (Welch where the seeds differ), with the test's name.
    pub test: Option<(stats::TTest, &'static str)>,
    /// Seed pairs when paired, else the smaller group's size.
    pub n: usize,
}

/// `treated` against `base` on `f`; None when either group lacks the value.
pub(super) fn effect(
    base: &[&Run],
    treated: &[&Run],
    f: impl Fn(&Run) -> Option<f64>,
) -> Option<Effect> {
    let (bv, tv) = (vals(base, &f), vals(treated, &f));
    if bv.is_empty() || tv.is_empty() {
        return None;
    }
    let paired = paired_by_seed(base, treated, &f);
    let (ci, d_z, n) = match &paired {
        Some((b, t)) => (
            stats::delta_pct_ci(b, t).map(|d| (d.ci_low, d.ci_high)),
            stats::paired_cohens_d(b, t),
            b.len(),
        ),
        None => (None, None, bv.len().min(tv.len())),
    };
    Some(Effect {
        delta_pct: stats::delta_pct(stats::mean(&bv), stats::mean(&tv)),
        ci,
        d_z,
        test: compare(base, treated, &f),
        n,
    })
}

impl Effect {
    /// `+12.3% [+5.1, +19.4]`, or `+12.3% (n = 1, no test)` for a single pair.
    pub fn delta_text(&self, decimals: usize) -> String {
        let d = format!("{:+.*}%", decimals, self.delta_pct);
        match self.ci {
            Some((lo, hi)) => format!("{d} [{lo:+.decimals$}, {hi:+.decimals$}]"),
            None if self.n < 2 => format!("{d} (n = {}, no test)", self.n),
            None => d,
        }
    }

    pub fn d_z_text(&self) -> String {
        self.d_z.map_or("—".into(), |d| format!("{d:.2}"))
    }

    pub fn p(&self) -> Option<f64> {
        self.test.map(|(t, _)| t.p)
    }
}

/// A p-value in 4 decimals (scientific below 1e-4; "< 1e-16" where it
/// underflows to 0), "—" when there is none.
pub(super) fn p_text(p: Option<f64>) -> String {
    match p {
        Some(0.0) => "< 1e-16".into(),
        Some(p) if p.is_finite() && p < 1e-4 => format!("{p:.1e}"),
        Some(p) if p.is_finite() => format!("{p:.4}"),
        _ => "—".into(),
    }
}

/// Holm-adjusted p-values of the tests that exist; the family is the present
/// ones (a row without a test is not a test).
pub(super) fn holm(ps: &[Option<f64>]) -> Vec<Option<f64>> {
    let raw: Vec<f64> = ps.iter().map(|p| p.unwrap_or(f64::NAN)).collect();
    stats::holm(&raw)
        .into_iter()
        .map(|p| Some(p).filter(|p| p.is_finite()))
        .collect()
}

/// The cells [Δ% [CI], d_z, p (test), p (Holm)] of each group against the
/// baseline, "—" for the baseline itself; Holm runs over the groups' tests.
pub(super) fn effect_cells(
    base: Option<&[&Run]>,
    groups: &[(bool, &[&Run])],
    f: &dyn Fn(&Run) -> Option<f64>,
    decimals: usize,
) -> Vec<[TableCell; 4]> {
    let effects: Vec<Option<Effect>> = groups
        .iter()
        .map(|(is_base, g)| match (base, is_base) {
            (Some(b), false) => effect(b, g, f),
            _ => None,
        })
        .collect();
    let adjusted = holm(&effects.iter().map(|e| e.as_ref()?.p()).collect::<Vec<_>>());
    let dash = || TableCell::from("—".to_string());
    effects
        .iter()
        .zip(adjusted)
        .map(|(e, holm_p)| match e {
            None => [dash(), dash(), dash(), dash()],
            Some(e) => [
                TableCell::from(e.delta_text(decimals)),
                TableCell::from(e.d_z_text()),
                TableCell::from(
                    e.test
                        .map(|(t, name)| {
                            format!(
                                "{} ({name}, t = {:.2}, df = {:.1})",
                                p_text(Some(t.p)),
                                t.t,
                                t.df
                            )
                        })
                        .unwrap_or_else(|| "—".into()),
                ),
                TableCell::from(p_text(holm_p)),
            ],
        })
        .collect()
}
