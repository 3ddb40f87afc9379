//! The statistics of a sweep report (docs/MEASURES.md "Statistics of sweeps"):
//! mean, sample standard deviation, paired and Welch t-tests (two-sided),
//! Pearson r with its p-value and Fisher-z 95% interval, relative change. The t distribution comes from `statrs`.

use statrs::distribution::{ContinuousCDF, StudentsT};

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
}
