//! The statistics of a sweep report (docs/MEASURES.md "Statistics of sweeps"):
//! mean, sample standard deviation, paired and Welch t-tests (two-sided),
//! Pearson r and Spearman ρ with p-values and Fisher-z 95% intervals, relative
//! change with its paired 95% interval, the paired effect size d_z, Holm's
//! correction for multiple tests and the Brown–Forsythe test of equal variances.
//! The t and F distributions and the median come from `statrs`.

use statrs::distribution::{ContinuousCDF, FisherSnedecor, StudentsT};
use statrs::statistics::{Data, Median};

/// Arithmetic mean (NaN for no data).
pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.iter().sum::<f64>() / x.len() as f64
}

/// Sample standard deviation (n − 1); NaN for fewer than two values.
pub fn sd(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return f64::NAN;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

/// Two-sided p-value of a t statistic with `df` degrees of freedom.
pub fn t_two_sided_p(t: f64, df: f64) -> f64 {
    if !t.is_finite() {
        return if t.is_nan() { f64::NAN } else { 0.0 };
    }
    match StudentsT::new(0.0, 1.0, df) {
        Ok(d) => (2.0 * (1.0 - d.cdf(t.abs()))).clamp(0.0, 1.0),
        Err(_) => f64::NAN,
    }
}

/// A t-test result.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TTest {
    pub t: f64,
    pub df: f64,
    pub p: f64,
    pub n: usize,
}

/// Paired t-test of `treated − base` (pairs in the same order, e.g. by seed):
/// t = mean(d) / (sd(d)/√n), df = n − 1. None for fewer than two pairs.
pub fn paired_t(base: &[f64], treated: &[f64]) -> Option<TTest> {
    if base.len() != treated.len() || base.len() < 2 {
        return None;
    }
    let d: Vec<f64> = treated.iter().zip(base).map(|(a, b)| a - b).collect();
    let n = d.len() as f64;
    let t = mean(&d) / (sd(&d) / n.sqrt());
    let df = n - 1.0;
    Some(TTest {
        t,
        df,
        p: t_two_sided_p(t, df),
        n: d.len(),
    })
}

/// Welch's unequal-variance t-test (two-sided). None when a group has fewer than two values.
pub fn welch_t(a: &[f64], b: &[f64]) -> Option<TTest> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let (va, vb) = (sd(a).powi(2) / na, sd(b).powi(2) / nb);
    let t = (mean(b) - mean(a)) / (va + vb).sqrt();
    let df = (va + vb).powi(2) / (va * va / (na - 1.0) + vb * vb / (nb - 1.0));
    Some(TTest {
        t,
        df,
        p: t_two_sided_p(t, df),
        n: a.len() + b.len(),
    })
}

/// Pearson correlation with p (t = r·√((n−2)/(1−r²)), df = n−2) and the Fisher-z 95% CI.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Pearson {
    pub r: f64,
    pub p: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub n: usize,
}

/// Pearson r of paired samples; None for fewer than three pairs or zero variance.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<Pearson> {
    let n = x.len();
    if n != y.len() || n < 3 {
        return None;
    }
    let (mx, my) = (mean(x), mean(y));
    let sxy: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let syy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    if sxx == 0.0 || syy == 0.0 {
        return None;
    }
    let r = (sxy / (sxx * syy).sqrt()).clamp(-1.0, 1.0);
    Some(pearson_from_r(r, n))
}

/// p-value and Fisher-z CI of a given r over n pairs.
pub fn pearson_from_r(r: f64, n: usize) -> Pearson {
    let nf = n as f64;
    let p = if r.abs() >= 1.0 {
        0.0
    } else {
        t_two_sided_p(r * ((nf - 2.0) / (1.0 - r * r)).sqrt(), nf - 2.0)
    };
    let (lo, hi) = if n > 3 && r.abs() < 1.0 {
        let z = r.atanh();
        let h = 1.959964 / (nf - 3.0).sqrt();
        ((z - h).tanh(), (z + h).tanh())
    } else {
        (f64::NAN, f64::NAN)
    };
    Pearson {
        r,
        p,
        ci_low: lo,
        ci_high: hi,
        n,
    }
}

/// Δ% = 100 · (treated − base) / base.
pub fn delta_pct(base: f64, treated: f64) -> f64 {
    100.0 * (treated - base) / base
}

/// The `prob` quantile of Student's t with `df` degrees of freedom
/// (t_{0.975, df} for a two-sided 95% interval); NaN for an invalid `df` or `prob`.
pub fn t_quantile(prob: f64, df: f64) -> f64 {
    if !(0.0..=1.0).contains(&prob) {
        return f64::NAN;
    }
    match StudentsT::new(0.0, 1.0, df) {
        Ok(d) => d.inverse_cdf(prob),
        Err(_) => f64::NAN,
    }
}

/// Two-sided 95% t interval of the mean of `x`:
/// mean(x) ± t_{0.975, n−1} · sd(x)/√n. None for fewer than two values.
pub fn mean_ci95(x: &[f64]) -> Option<(f64, f64)> {
    if x.len() < 2 {
        return None;
    }
    let n = x.len() as f64;
    let half = t_quantile(0.975, n - 1.0) * sd(x) / n.sqrt();
    Some((mean(x) - half, mean(x) + half))
}

/// The paired differences `treated − base`; None unless both have the same length ≥ 2.
fn paired_differences(base: &[f64], treated: &[f64]) -> Option<Vec<f64>> {
    (base.len() == treated.len() && base.len() >= 2)
        .then(|| treated.iter().zip(base).map(|(t, b)| t - b).collect())
}

/// Cohen's d_z, the effect size of a paired design: d_z = mean(d) / sd(d) of the
/// differences d = treated − base (pairs in the same order, e.g. by seed), with the
/// sample sd (n − 1). It equals t/√n of the paired t-test. Unlike d of two
/// independent groups it standardises by the spread of the differences, not of the
/// groups. None for fewer than two pairs or differences without spread.
pub fn paired_cohens_d(base: &[f64], treated: &[f64]) -> Option<f64> {
    let d = paired_differences(base, treated)?;
    let s = sd(&d);
    (s > 0.0 && s.is_finite()).then(|| mean(&d) / s)
}

/// A relative change in percent with its 95% confidence interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DeltaCi {
    pub pct: f64,
    pub ci_low: f64,
    pub ci_high: f64,
}

/// Δ% = 100 · (mean(treated) − mean(base)) / mean(base), with the 95% interval
/// 100 · [mean(d) ± t_{0.975, n−1} · sd(d)/√n] / mean(base) of the paired
/// differences d = treated − base. The denominator mean(base) is treated as a fixed
/// number (its own uncertainty is ignored): a simple choice that keeps the interval
/// the paired t interval, rescaled. None for fewer than two pairs or mean(base) = 0.
pub fn delta_pct_ci(base: &[f64], treated: &[f64]) -> Option<DeltaCi> {
    let d = paired_differences(base, treated)?;
    let m_base = mean(base);
    if m_base == 0.0 || !m_base.is_finite() {
        return None;
    }
    let (lo, hi) = mean_ci95(&d)?;
    let scale = 100.0 / m_base;
    // A negative base mean flips the ordering of the bounds.
    let (lo, hi) = (lo * scale, hi * scale);
    Some(DeltaCi {
        pct: delta_pct(m_base, mean(treated)),
        ci_low: lo.min(hi),
        ci_high: lo.max(hi),
    })
}

/// Ranks 1..=n of `x`, ties sharing the mean of the ranks they span (mid-ranks).
/// Values must be comparable (no NaN).
fn mid_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut ranks = vec![0.0; x.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && x[order[end]] == x[order[start]] {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their mean is (start+1+end)/2.
        let rank = (start + 1 + end) as f64 / 2.0;
        for &i in &order[start..end] {
            ranks[i] = rank;
        }
        start = end;
    }
    ranks
}

/// Spearman's ρ: the Pearson r of the ranks of x and of y, ties given mid-ranks
/// (so it stays correct with ties, unlike 1 − 6Σd²/(n(n²−1))). Its p-value uses the
/// same t approximation as [`pearson_from_r`] (t = ρ·√((n−2)/(1−ρ²)), df = n−2, as
/// R's `cor.test(exact = FALSE)` and scipy's `spearmanr` do), and its 95% interval
/// the Fisher z transform with SE 1/√(n−3), which for ρ is only approximate.
/// None for fewer than three pairs, a non-finite value, or a constant variable.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<Pearson> {
    if x.len() != y.len() || x.iter().chain(y).any(|v| !v.is_finite()) {
        return None;
    }
    pearson(&mid_ranks(x), &mid_ranks(y))
}

/// Holm–Bonferroni adjusted p-values, in the input order. With the m non-NaN
/// p-values sorted ascending, p_(1) ≤ … ≤ p_(m), the adjusted value of the i-th is
/// max_{j ≤ i} min(1, (m − j + 1) · p_(j)) (the step-down maximum keeps the order
/// monotone), as R's `p.adjust(method = "holm")`. A NaN stays NaN and does not
/// count in m. Rejecting where the adjusted p ≤ α controls the family-wise error at α.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p.len()).filter(|&i| !p[i].is_nan()).collect();
    order.sort_by(|&a, &b| p[a].total_cmp(&p[b]));
    let m = order.len();
    let mut adjusted = vec![f64::NAN; p.len()];
    let mut running_max = 0.0f64;
    for (j, &i) in order.iter().enumerate() {
        running_max = running_max.max(((m - j) as f64 * p[i]).min(1.0));
        adjusted[i] = running_max;
    }
    adjusted
}

/// An F test result: the statistic, its degrees of freedom and the upper-tail p.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct FTest {
    pub f: f64,
    pub df1: f64,
    pub df2: f64,
    pub p: f64,
}

/// Brown–Forsythe test of equal variances across k groups (Levene's test centred
/// on the group medians, robust to skew). With z_ij = |y_ij − median_i|, group
/// means z̄_i, grand mean z̄ and N values in all:
/// F = (N − k)/(k − 1) · Σ_i n_i (z̄_i − z̄)² / Σ_i Σ_j (z_ij − z̄_i)²,
/// referred to F(k − 1, N − k) (upper tail). As R's `car::leveneTest` (its default
/// centre) and scipy's `levene` (default `center='median'`).
/// None for fewer than two groups, an empty group, N ≤ k, a non-finite value, or
/// no spread within the groups.
pub fn brown_forsythe(groups: &[Vec<f64>]) -> Option<FTest> {
    let k = groups.len();
    let n_total: usize = groups.iter().map(Vec::len).sum();
    let any_bad = groups.iter().flatten().any(|v| !v.is_finite());
    if k < 2 || n_total <= k || any_bad || groups.iter().any(Vec::is_empty) {
        return None;
    }
    let deviations: Vec<Vec<f64>> = groups
        .iter()
        .map(|g| {
            let med = Data::new(g.clone()).median();
            g.iter().map(|v| (v - med).abs()).collect()
        })
        .collect();
    let grand = deviations.iter().flatten().sum::<f64>() / n_total as f64;
    let (mut between, mut within) = (0.0, 0.0);
    for z in &deviations {
        let zbar = mean(z);
        between += z.len() as f64 * (zbar - grand).powi(2);
        within += z.iter().map(|v| (v - zbar).powi(2)).sum::<f64>();
    }
    if within <= 0.0 {
        return None;
    }
    let (df1, df2) = ((k - 1) as f64, (n_total - k) as f64);
    let f = df2 / df1 * between / within;
    let p = FisherSnedecor::new(df1, df2).ok()?.sf(f);
    Some(FTest { f, df1, df2, p })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pearson_matches_spec_check_values() {
        // docs/MEASURES.md's worked check: r = −0.293, n = 7 -> p = 0.5237, CI [−0.857, 0.590].
        let p = pearson_from_r(-0.293, 7);
        assert!((p.p - 0.5237).abs() < 5e-5, "{}", p.p);
        assert!(
            (p.ci_low + 0.857).abs() < 5e-4 && (p.ci_high - 0.590).abs() < 5e-4,
            "{p:?}"
        );
    }

    #[test]
    fn paired_t_textbook_example() {
        // Student's sleep data (Cushny & Peebles; R's `t.test(extra ~ group, paired = TRUE)`):
        // t = -4.0621, df = 9, p = 0.002833.
        let g1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0];
        let g2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4];
        let t = paired_t(&g2, &g1).unwrap();
        assert!(
            (t.t + 4.0621).abs() < 1e-4 && t.df == 9.0 && (t.p - 0.002833).abs() < 1e-6,
            "{t:?}"
        );
        // Welch on the same groups (R: t = -1.8608, df = 17.776, p = 0.07939).
        let w = welch_t(&g2, &g1).unwrap();
        assert!(
            (w.t + 1.8608).abs() < 1e-4
                && (w.df - 17.776).abs() < 1e-3
                && (w.p - 0.07939).abs() < 1e-5,
            "{w:?}"
        );
    }

    #[test]
    fn pearson_of_data_and_mean_sd() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [2.0, 4.1, 5.9, 8.2, 9.8];
        let p = pearson(&x, &y).unwrap();
        // Independent formula: r = cov / (sx sy) with sample moments.
        let (mx, my) = (3.0, 6.0);
        let cov: f64 = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - mx) * (b - my))
            .sum::<f64>()
            / 4.0;
        assert!((p.r - cov / (sd(&x) * sd(&y))).abs() < 1e-12);
        assert!((sd(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) - 2.138089935).abs() < 1e-9);
        assert!(pearson(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_none());
        assert!((delta_pct(4.0, 3.0) + 25.0).abs() < 1e-12);
    }
    /// Student's sleep data (Cushny & Peebles), as in R's `sleep` data set: group 1, group 2.
    const SLEEP_G1: [f64; 10] = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0];
    const SLEEP_G2: [f64; 10] = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4];

    #[test]
    fn t_quantile_matches_tables() {
        // Student t table (any textbook; R: qt(0.975, 9) = 2.262157, qt(0.975, 1) = 12.7062).
        assert!((t_quantile(0.975, 9.0) - 2.262157).abs() < 1e-6);
        assert!((t_quantile(0.975, 1.0) - 12.7062).abs() < 1e-4);
        assert!(t_quantile(1.5, 9.0).is_nan() && t_quantile(0.975, 0.0).is_nan());
    }

    #[test]
    fn paired_cohens_d_on_sleep_data() {
        // R's `t.test(extra ~ group, data = sleep, paired = TRUE)` prints t = -4.0621 for
        // n = 10 pairs, and d_z = t/√n (Lakens 2013, "Calculating and reporting effect
        // sizes", Frontiers in Psychology, eq. 7): d_z = -4.0621/√10 = -1.28455.
        let d = paired_cohens_d(&SLEEP_G2, &SLEEP_G1).unwrap();
        assert!((d + 4.0621 / 10f64.sqrt()).abs() < 5e-5, "{d}");
        // The sign follows treated − base.
        assert!((paired_cohens_d(&SLEEP_G1, &SLEEP_G2).unwrap() + d).abs() < 1e-12);
        assert!(paired_cohens_d(&[1.0], &[2.0]).is_none());
        assert!(
            paired_cohens_d(&[1.0, 2.0], &[2.0, 3.0]).is_none(),
            "no spread"
        );
        assert!(paired_cohens_d(&[1.0, 2.0], &[2.0]).is_none());
    }

    #[test]
    fn delta_pct_ci_on_sleep_data() {
        // R's paired t.test on `sleep` prints the mean difference -1.58 and its 95%
        // interval [-2.4598858, -0.7001142]; mean(group 2) = 2.33 is the base.
        let c = delta_pct_ci(&SLEEP_G2, &SLEEP_G1).unwrap();
        assert!((c.pct - 100.0 * -1.58 / 2.33).abs() < 1e-9, "{c:?}");
        assert!((c.ci_low * 2.33 / 100.0 + 2.4598858).abs() < 1e-6, "{c:?}");
        assert!((c.ci_high * 2.33 / 100.0 + 0.7001142).abs() < 1e-6, "{c:?}");
        let (lo, hi) =
            mean_ci95(&[-1.2, -2.4, -1.3, -1.3, 0.0, -1.0, -1.8, -0.8, -4.6, -1.4]).unwrap();
        assert!((lo + 2.4598858).abs() < 1e-6 && (hi + 0.7001142).abs() < 1e-6);
        // A negative base keeps ci_low ≤ pct ≤ ci_high.
        let neg: Vec<f64> = SLEEP_G2.iter().map(|v| v - 10.0).collect();
        let c = delta_pct_ci(&neg, &SLEEP_G1.map(|v| v - 10.0)).unwrap();
        assert!(c.ci_low <= c.pct && c.pct <= c.ci_high, "{c:?}");
        assert!(delta_pct_ci(&[1.0], &[2.0]).is_none());
        assert!(
            delta_pct_ci(&[1.0, -1.0], &[2.0, 3.0]).is_none(),
            "zero base mean"
        );
    }

    #[test]
    fn spearman_matches_published_examples() {
        // Wikipedia, "Spearman's rank correlation coefficient", worked example (IQ vs
        // hours of TV per week): ρ = −29/165 = −0.175757…, p = 0.627188 (t distribution).
        let iq = [
            106.0, 100.0, 86.0, 101.0, 99.0, 103.0, 97.0, 113.0, 112.0, 110.0,
        ];
        let tv = [7.0, 27.0, 2.0, 50.0, 28.0, 29.0, 20.0, 12.0, 6.0, 17.0];
        let s = spearman(&iq, &tv).unwrap();
        assert!((s.r + 29.0 / 165.0).abs() < 1e-12, "{s:?}");
        assert!((s.p - 0.627188).abs() < 1e-6, "{s:?}");
        assert_eq!(s.n, 10);
        // With ties: scipy.stats.spearmanr docs (and scipy's test "Cross-check with R:
        // cor.test(c(1,2,3,4,5), c(5,6,7,8,7), method = 'spearman')"):
        // ρ = 0.8207826816681233, p = 0.08858700531354381.
        let s = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5.0, 6.0, 7.0, 8.0, 7.0]).unwrap();
        assert!((s.r - 0.8207826816681233).abs() < 1e-12, "{s:?}");
        assert!((s.p - 0.08858700531354381).abs() < 1e-9, "{s:?}");
        assert!(s.ci_low < s.r && s.r < s.ci_high);
        assert_eq!(
            mid_ranks(&[5.0, 6.0, 7.0, 8.0, 7.0]),
            [1.0, 2.0, 3.5, 5.0, 3.5]
        );
        assert!(spearman(&[1.0, 2.0, f64::NAN], &[1.0, 2.0, 3.0]).is_none());
        assert!(spearman(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_none());
    }

    #[test]
    fn holm_matches_r_p_adjust() {
        // R: p.adjust(c(0.01, 0.02, 0.03, 0.04, 0.05), "holm") -> 0.05 0.08 0.09 0.09 0.09.
        // By hand: 5·0.01, 4·0.02, 3·0.03, then max(0.09, 2·0.04), max(0.09, 1·0.05).
        let a = holm(&[0.01, 0.02, 0.03, 0.04, 0.05]);
        for (got, want) in a.iter().zip([0.05, 0.08, 0.09, 0.09, 0.09]) {
            assert!((got - want).abs() < 1e-12, "{a:?}");
        }
        // Wikipedia, "Holm–Bonferroni method", example: p = (0.01, 0.04, 0.03, 0.005) for
        // H1..H4 at α = 0.05 rejects H4 and H1 only. Adjusted (R's p.adjust, by hand):
        // sorted 0.005, 0.01, 0.03, 0.04 -> 4·0.005 = 0.02, 3·0.01 = 0.03, 2·0.03 = 0.06,
        // max(0.06, 0.04) = 0.06; in input order 0.03, 0.06, 0.06, 0.02.
        let b = holm(&[0.01, 0.04, 0.03, 0.005]);
        for (got, want) in b.iter().zip([0.03, 0.06, 0.06, 0.02]) {
            assert!((got - want).abs() < 1e-12, "{b:?}");
        }
        let rejected: Vec<bool> = b.iter().map(|p| *p <= 0.05).collect();
        assert_eq!(rejected, [true, false, false, true]);
        // NaN passes through and is not counted (m = 2: 2·0.02, then 1·0.6).
        let c = holm(&[0.6, f64::NAN, 0.02]);
        assert!(c[1].is_nan() && (c[0] - 0.6).abs() < 1e-12 && (c[2] - 0.04).abs() < 1e-12);
        // Capped at 1: 2·0.6 = 1.2 -> 1, then max(1, 0.7).
        assert_eq!(holm(&[0.7, 0.6]), [1.0, 1.0]);
        assert!(holm(&[]).is_empty());
    }

    #[test]
    fn brown_forsythe_matches_scipy_levene() {
        // scipy.stats.levene docs example (default center='median', i.e. Brown–Forsythe):
        // statistic 7.584952754501659, p = 0.002431505967249681, on F(2, 27).
        let groups = vec![
            vec![8.88, 9.12, 9.04, 8.98, 9.00, 9.08, 9.01, 8.85, 9.06, 8.99],
            vec![8.88, 8.95, 9.29, 9.44, 9.15, 9.58, 8.36, 9.18, 8.67, 9.05],
            vec![8.95, 9.12, 8.95, 8.85, 9.03, 8.84, 9.07, 8.98, 8.86, 8.98],
        ];
        let t = brown_forsythe(&groups).unwrap();
        assert!((t.f - 7.584952754501659).abs() < 1e-9, "{t:?}");
        assert!((t.p - 0.002431505967249681).abs() < 1e-10, "{t:?}");
        assert_eq!((t.df1, t.df2), (2.0, 27.0));
    }

    #[test]
    fn brown_forsythe_by_hand_and_f_tail() {
        // By hand: medians 2, 4, 5; |y − median| = (1,0,1), (2,0,2), (5,0,5); means 2/3,
        // 4/3, 10/3, grand mean 16/9; between = 3·(100+16+196)/81 = 936/81; within =
        // (6+24+150)/9 = 20; F = (9−3)/(3−1) · (936/81)/20 = 26/15.
        let t = brown_forsythe(&[
            vec![1.0, 2.0, 3.0],
            vec![2.0, 4.0, 6.0],
            vec![0.0, 5.0, 10.0],
        ])
        .unwrap();
        assert!((t.f - 26.0 / 15.0).abs() < 1e-12, "{t:?}");
        // For df1 = 2 the F tail has the closed form P(F > f) = (1 + 2f/ν)^(−ν/2).
        assert!(
            (t.p - (1.0 + 2.0 * t.f / 6.0).powf(-3.0)).abs() < 1e-10,
            "{t:?}"
        );
        // F tables: the upper 5% point of F(2, 12) is 3.885.
        let f212 = FisherSnedecor::new(2.0, 12.0).unwrap();
        assert!((f212.sf(3.885) - 0.05).abs() < 1e-4);
        assert!(
            brown_forsythe(&[vec![1.0, 2.0, 3.0]]).is_none(),
            "one group"
        );
        assert!(
            brown_forsythe(&[vec![1.0, 2.0], vec![]]).is_none(),
            "empty group"
        );
        assert!(
            brown_forsythe(&[vec![1.0, 1.0], vec![2.0, 2.0]]).is_none(),
            "no spread"
        );
    }
}
