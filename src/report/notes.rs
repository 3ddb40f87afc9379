//! How to read the report's statistics: chance levels, effect sizes and the
//! multiple-test correction, once, as a table at the end of the report's
//! study tables.

use super::table::{Table, TableCell};
use super::Section;

const TERMS: [(&str, &str); 6] = [
    (
        "chance level (1/L)",
        "E[cos²] of two independent random directions in L dimensions is 1/L: the value an MSO takes with no structure at all. L is P = d_ff·d_model for a flattened weight matrix, d_model for rows of W_up and for expert outputs, d_ff for columns of W_up and for hidden activations, d_ff − 1 for their LayerNorm (the centring removes one dimension).",
    ),
    (
        "Δ% [95% CI]",
        "Change of the mean against λ = 0 (or `none`), in percent of the baseline mean; the CI is the t interval of the mean paired difference by seed, scaled by the baseline mean.",
    ),
    (
        "d_z",
        "Paired effect size (Cohen's d for paired samples): mean of the per-seed differences divided by their sd. Independent of n, unlike t = d_z·√n.",
    ),
    (
        "p, p (Holm)",
        "Two-sided paired t-test by seed (Welch's t where the seed sets differ). Holm's step-down correction controls the family-wise error over the λ > 0 tests within one table.",
    ),
    (
        "Pearson r, Spearman ρ",
        "Linear and rank correlation, each over the per-λ means (n = number of λ) and over individual runs (n = λ × seeds); CI by Fisher's z.",
    ),
    (
        "Brown–Forsythe F",
        "Test of equal variance across the λ groups: one-way ANOVA of the absolute deviations from each group's median.",
    ),
];

/// The glossary table (only when the report has study tables to read).
pub(super) fn section(has_tables: bool) -> Section {
    let mut s = Section::default();
    if has_tables {
        s.tables.push(Table {
            title: "Notes: chance levels, effect sizes and corrections".into(),
            header: vec!["term", "meaning"],
            rows: TERMS
                .iter()
                .map(|(t, m)| {
                    vec![
                        TableCell::from(t.to_string()),
                        TableCell::from(m.to_string()),
                    ]
                })
                .collect(),
            note: "Definitions of every measure: docs/MEASURES.md.".into(),
        });
    }
    s
}
