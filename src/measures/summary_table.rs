//! The human-readable table `moescope analyze` prints: per layer, then the
//! pair sets, nulls and model means.

use super::analyze::Report;
use super::jacobian::JacobianReport;
use super::pairs::{PairSets, SetMean};
use super::subspace::SubspaceReport;

/// A short human-readable table of a report.
pub fn summary_table(r: &Report) -> String {
    let f = |v: Option<f64>| {
        v.map(|x| format!("{x:.4}"))
            .unwrap_or_else(|| "null".into())
    };
    let e = |v: Option<f64>| {
        v.map(|x| format!("{x:.3e}"))
            .unwrap_or_else(|| "null".into())
    };
    let mut s = format!(
        "{:>5} {:>10} {:>10} {:>10} {:>9} {:>9} {:>8} {:>5} {:>8}\n",
        "layer",
        "w_mso(up)",
        "act_mso",
        "act_all",
        "gap",
        "H_router",
        "balance",
        "dead",
        "max_viol"
    );
    for l in &r.layers {
        s += &format!(
            "{:>5} {:>10} {:>10} {:>10} {:>9} {:>9.4} {:>8.4} {:>5} {:>8.3}\n",
            l.index,
            e(l.weight_mso.get("up").copied()),
            f(l.act_mso),
            f(l.act_mso_all),
            l.gap_ratio
                .map(|x| format!("{x:.1}"))
                .unwrap_or_else(|| "null".into()),
            l.telemetry.router_entropy,
            l.telemetry.balance,
            l.telemetry.dead_experts.len(),
            l.telemetry.max_violation
        );
    }
    let m = &r.summary;
    for l in &r.layers {
        if let Some(j) = &l.jacobian {
            s += &jacobian_line(l.index, j);
        }
        if let Some(sp) = &l.subspace {
            s += &subspace_line(l.index, sp);
        }
    }
    s += &format!(
        "pair sets (routed / all / gate_weighted): act MSO {}\n",
        sets_text(&m.geometry.act_mso)
    );
    s += &format!(
        "model weight MSO(up) {} | act MSO {} | act MSO (all pairs) {} | gap ratio {} | over {} tokens\n",
        e(m.weight_mso.get("up").copied()),
        f(m.act_mso),
        f(m.act_mso_all),
        m.gap_ratio.map(|x| format!("{x:.1}")).unwrap_or_else(|| "null".into()),
        r.tokens
    );
    s
}

fn opt4(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.4}"))
        .unwrap_or_else(|| "null".into())
}

fn sets_text(p: &PairSets<f64>) -> String {
    format!(
        "{} / {} / {}",
        opt4(p.routed),
        opt4(p.all),
        opt4(p.gate_weighted)
    )
}

/// One layer's Jacobian line: the instance means, the three pair sets and the nulls.
fn jacobian_line(index: usize, j: &JacobianReport) -> String {
    let mean = |p: &PairSets<SetMean>| PairSets {
        routed: p.routed.map(|m| m.mean),
        all: p.all.map(|m| m.mean),
        gate_weighted: p.gate_weighted.map(|m| m.mean),
    };
    let shuffled = &j.null.shuffled_routing;
    format!(
        "layer {index} Jacobian alignment ({}, {} pairs, {} instances): mean {} | mean |A| {} | mean A² {}{}\n  pair sets (routed / all / gate_weighted): {} | shuffled-routing null: routed {} (z {}), gate_weighted {} (z {}) | random-init experts: {}\n",
        j.mode,
        j.pairs,
        j.instances,
        opt4(j.mean),
        opt4(j.mean_abs),
        opt4(j.mean_sq),
        j.stderr.map(|e| format!(" | stderr {e:.4}")).unwrap_or_default(),
        sets_text(&mean(&j.sets)),
        opt4(shuffled.routed.map(|n| n.mean)),
        opt4(shuffled.routed.and_then(|n| n.z)),
        opt4(shuffled.gate_weighted.map(|n| n.mean)),
        opt4(shuffled.gate_weighted.and_then(|n| n.z)),
        opt4(j.null.random_init.map(|m| m.mean)),
    )
}

/// One layer's subspace line, with the pair sets, the permutation null and
/// the degenerate label.
fn subspace_line(index: usize, sp: &SubspaceReport) -> String {
    let null = match &sp.null {
        Some(n) => format!("null {:.4} ± {:.4}, z {}", n.mean_overlap, n.sd, opt4(n.z)),
        None => "null: none".into(),
    };
    let degenerate = sp
        .degenerate
        .as_ref()
        .map(|d| format!("  DEGENERATE: {d}\n"))
        .unwrap_or_default();
    format!(
        "layer {index} subspaces ({}{}): mean overlap {} (random {:.4}) | {null} | mean normalised geodesic {} | skipped {}\n  pair sets (routed / all / gate_weighted): {}\n{degenerate}",
        sp.space,
        if sp.weighted { ", gate-weighted" } else { "" },
        opt4(sp.mean_overlap),
        sp.random_overlap,
        opt4(sp.mean_geodesic_normalised),
        sp.skipped.len(),
        sets_text(&sp.sets),
    )
}
