//! The typed choices of a config and of the command line: each parses from
//! and prints as the exact string a config file holds (`"topk"`, `"estimate:32"`,
//! `"var:0.9"`), so `config.toml` files of earlier runs still load.
//!
//! This module depends on nothing else in the crate: `model`, `measures`,
//! `train` and the CLI all import their choices from here.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A string that is not a valid value of a choice; the message lists the
/// values it could have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadValue(String);

/// Serialise through `Display` and deserialise through `FromStr`, so a value
/// has one spelling in TOML, JSON and on the command line.
macro_rules! serde_as_string {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// A choice among fixed names: `ALL`, `name()`, `FromStr` (the error lists
/// the names), `Display`, serde and `clap::ValueEnum`. `$what` names the
/// choice in errors ("unknown routing `dense` (known: ...)").
macro_rules! named_choice {
    ($ty:ident, $what:literal, [$($variant:ident => $name:literal),+ $(,)?]) => {
        impl $ty {
            /// Every value, in the order the names are listed.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The value as a config file spells it.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl FromStr for $ty {
            type Err = BadValue;
            fn from_str(s: &str) -> Result<Self, BadValue> {
                $ty::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    let known: Vec<&str> = $ty::ALL.iter().map(|v| v.name()).collect();
                    BadValue(format!(
                        concat!("unknown ", $what, " `{}` (known: {})"),
                        s,
                        known.join(", ")
                    ))
                })
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                $ty::ALL
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.name()))
            }
        }

        serde_as_string!($ty);
    };
}

/// How tokens choose experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// The `top_k` largest router probabilities (ties: lower index first).
    Topk,
    /// Every expert, weighted by the router softmax.
    Soft,
    /// Expert choice (Zhou et al. 2022): each expert takes the C tokens with
    /// the highest router probability for it, C = ⌈cf · n · top_k / E⌉
    /// (cf = `capacity_factor`, 1 when 0); a token may get 0..E experts.
    ExpertChoice,
}
named_choice!(Routing, "routing", [Topk => "topk", Soft => "soft", ExpertChoice => "expert_choice"]);

/// Expert architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertKind {
    /// `W_down · φ(W_up x + b_up) + b_down`.
    Mlp,
    /// `W_down · (silu(W_gate x) ⊙ W_up x)`, no biases.
    Swiglu,
}
named_choice!(ExpertKind, "expert kind", [Mlp => "mlp", Swiglu => "swiglu"]);

/// Activation of `mlp` experts (and dense FFNs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, tanh approximation.
    Gelu,
}
named_choice!(Activation, "activation", [Silu => "silu", Gelu => "gelu"]);

/// A matrix family whose per-expert vectors are compared (weight overlap),
/// regularised (`reg.orth_family`, `reg.grad_family`) or logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// W_up (default).
    Up,
    /// W_gate (SwiGLU experts only).
    Gate,
    /// W_down.
    Down,
    /// The expert's row of the router matrix W_r.
    Router,
}
named_choice!(Family, "family", [Up => "up", Gate => "gate", Down => "down", Router => "router"]);

/// How a weight matrix W (R × C; for W_up R = d_ff, C = d_model) is cut into
/// the vectors whose squared cosines weight overlap and L_orth average.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Granularity {
    /// The whole flattened matrix, one R·C-dimensional vector (chance 1/(R·C)).
    Flat,
    /// Each row: mean over a of cos²(W_i[a,:], W_j[a,:]) (C-dimensional, chance 1/C).
    Rows,
    /// Each column: mean over b of cos²(W_i[:,b], W_j[:,b]) (R-dimensional, chance 1/R).
    Cols,
}
named_choice!(Granularity, "granularity", [Flat => "flat", Rows => "rows", Cols => "cols"]);

/// How L_orth is wired (the study's text admits each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrthVariant {
    /// Σ cos² of the normalised vectors, gradient through the normalisation.
    Normalized,
    /// Σ ⟨w_i, w_j⟩² of the raw vectors (no normalisation).
    Unnormalized,
    /// Σ cos², the norms treated as constants in the gradient.
    DetachedNorm,
}
named_choice!(OrthVariant, "orth variant", [Normalized => "normalized", Unnormalized => "unnormalized", DetachedNorm => "detached_norm"]);

/// The space of an expert's computation in which activation overlap is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActSpace {
    /// The expert's output h_e(x) = W_down φ(W_up x + b) + b (d_model-dimensional).
    Output,
    /// The hidden activation φ(W_up x + b) (SwiGLU: silu(W_gate x) ⊙ W_up x), d_ff-dimensional.
    Hidden,
    /// LayerNorm (no affine) of that hidden activation, the study's eq. 4.
    HiddenLn,
}
named_choice!(ActSpace, "activation space", [Output => "output", Hidden => "hidden", HiddenLn => "hidden_ln"]);

impl ActSpace {
    /// The metric key suffix: `act_mso` + this (`""`, `"_hidden"`, `"_hidden_ln"`).
    pub fn suffix(self) -> &'static str {
        match self {
            ActSpace::Output => "",
            ActSpace::Hidden => "_hidden",
            ActSpace::HiddenLn => "_hidden_ln",
        }
    }
}

impl Granularity {
    /// The metric key suffix: `weight_mso` + this (`""`, `"_rows"`, `"_cols"`).
    pub fn suffix(self) -> &'static str {
        match self {
            Granularity::Flat => "",
            Granularity::Rows => "_rows",
            Granularity::Cols => "_cols",
        }
    }
}

/// Which training step `train` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// The fused CPU engine when it covers the config, else autodiff.
    Auto,
    /// The fused CPU engine, or an error saying what it lacks.
    Fused,
    /// The autodiff reference path (every feature).
    Autodiff,
}
named_choice!(EngineChoice, "engine", [Auto => "auto", Fused => "fused", Autodiff => "autodiff"]);

/// The rows whose principal subspaces `analyze` compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnalysisSpace {
    /// The experts' routed inputs.
    Input,
    /// The experts' outputs h_e.
    Output,
}
named_choice!(AnalysisSpace, "space", [Input => "input", Output => "output"]);

/// The arithmetic of Jacobian alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 products with f64 reductions (the default; checked against `f64`).
    #[default]
    F32,
    /// f64 throughout: the reference, several times slower.
    F64,
}
named_choice!(Precision, "precision", [F32 => "f32", F64 => "f64"]);

/// How cross-expert Jacobian alignment is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JacobianMode {
    Exact,
    /// Hutchinson with this many probe vectors.
    Estimate(usize),
    /// Exact when it is cheap enough, else an estimate.
    Auto,
    Off,
}

impl JacobianMode {
    /// Probe vectors of a bare `estimate`.
    pub const DEFAULT_PROBES: usize = 64;
    /// Fewer probes than this give too noisy an estimate.
    pub const MIN_PROBES: usize = 8;
}

impl FromStr for JacobianMode {
    type Err = BadValue;
    /// `exact`, `estimate` (64 probes), `estimate:M`, `auto`, `off`.
    fn from_str(s: &str) -> Result<Self, BadValue> {
        match s {
            "exact" => Ok(JacobianMode::Exact),
            "auto" => Ok(JacobianMode::Auto),
            "off" => Ok(JacobianMode::Off),
            "estimate" => Ok(JacobianMode::Estimate(Self::DEFAULT_PROBES)),
            s if s.starts_with("estimate:") => s["estimate:".len()..]
                .parse::<usize>()
                .ok()
                .filter(|m| *m >= Self::MIN_PROBES)
                .map(JacobianMode::Estimate)
                .ok_or_else(|| {
                    BadValue(format!(
                        "bad `{s}`: expected estimate:M with M ≥ {} probe vectors",
                        Self::MIN_PROBES
                    ))
                }),
            other => Err(BadValue(format!(
                "unknown Jacobian mode `{other}` (exact, estimate, estimate:M, auto, off)"
            ))),
        }
    }
}

impl fmt::Display for JacobianMode {
    /// The shortest spelling that parses back to the same mode.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JacobianMode::Exact => f.write_str("exact"),
            JacobianMode::Estimate(m) if *m == Self::DEFAULT_PROBES => f.write_str("estimate"),
            JacobianMode::Estimate(m) => write!(f, "estimate:{m}"),
            JacobianMode::Auto => f.write_str("auto"),
            JacobianMode::Off => f.write_str("off"),
        }
    }
}
serde_as_string!(JacobianMode);

/// Subspace rank: fixed, or the smallest reaching a fraction τ of the variance (capped).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    Fixed(usize),
    /// (τ, cap)
    Variance(f64, usize),
    Off,
}

impl RankRule {
    /// The cap of `var:τ` without one (the default fixed rank).
    pub const DEFAULT_CAP: usize = 16;

    /// The rank cap (the number of rows an expert needs is more than this).
    pub fn cap(&self) -> usize {
        match self {
            RankRule::Fixed(r) => *r,
            RankRule::Variance(_, c) => *c,
            RankRule::Off => 0,
        }
    }
}

impl FromStr for RankRule {
    type Err = BadValue;
    /// `16`, `var:0.9` (cap 16), `var:0.9:32`, `off`.
    fn from_str(s: &str) -> Result<Self, BadValue> {
        if s == "off" {
            return Ok(RankRule::Off);
        }
        if let Some(rest) = s.strip_prefix("var:") {
            let mut it = rest.split(':');
            let tau: f64 = it
                .next()
                .and_then(|v| v.parse().ok())
                .filter(|t: &f64| *t > 0.0 && *t <= 1.0)
                .ok_or_else(|| BadValue(format!("bad `{s}`: τ must lie in (0, 1]")))?;
            let cap = match it.next() {
                Some(c) => c
                    .parse()
                    .map_err(|_| BadValue(format!("bad cap in `{s}`")))?,
                None => Self::DEFAULT_CAP,
            };
            return Ok(RankRule::Variance(tau, cap));
        }
        s.parse::<usize>()
            .ok()
            .filter(|r| *r > 0)
            .map(RankRule::Fixed)
            .ok_or_else(|| {
                BadValue(format!(
                    "bad subspace option `{s}` (RANK, var:τ, var:τ:CAP or off)"
                ))
            })
    }
}

impl fmt::Display for RankRule {
    /// The shortest spelling that parses back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RankRule::Fixed(r) => write!(f, "{r}"),
            RankRule::Variance(t, c) if *c == Self::DEFAULT_CAP => write!(f, "var:{t}"),
            RankRule::Variance(t, c) => write!(f, "var:{t}:{c}"),
            RankRule::Off => f.write_str("off"),
        }
    }
}
serde_as_string!(RankRule);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every spelling a config file may hold prints back unchanged.
    fn round_trips<T: FromStr + fmt::Display>(spellings: &[&str])
    where
        T::Err: fmt::Debug,
    {
        for s in spellings {
            assert_eq!(s.parse::<T>().unwrap().to_string(), *s);
        }
    }

    #[test]
    fn config_spellings_round_trip() {
        round_trips::<Routing>(&["topk", "soft", "expert_choice"]);
        round_trips::<ExpertKind>(&["mlp", "swiglu"]);
        round_trips::<Activation>(&["silu", "gelu"]);
        round_trips::<Family>(&["up", "gate", "down", "router"]);
        round_trips::<EngineChoice>(&["auto", "fused", "autodiff"]);
        round_trips::<AnalysisSpace>(&["input", "output"]);
        round_trips::<JacobianMode>(&["exact", "estimate", "estimate:32", "auto", "off"]);
        round_trips::<RankRule>(&["16", "var:0.9", "var:0.95:32", "off"]);
    }

    #[test]
    fn unknown_values_list_the_known_ones() {
        let e = "jit".parse::<EngineChoice>().unwrap_err().to_string();
        assert!(
            e.contains("`jit`") && e.contains("auto, fused, autodiff"),
            "{e}"
        );
        let e = "dense".parse::<Routing>().unwrap_err().to_string();
        assert!(e.contains("dense") && e.contains("expert_choice"), "{e}");
        assert!("estimate:4".parse::<JacobianMode>().is_err());
        assert!("fast".parse::<JacobianMode>().is_err());
    }

    #[test]
    fn modes_parse() {
        assert_eq!(
            "estimate:128".parse::<JacobianMode>().unwrap(),
            JacobianMode::Estimate(128)
        );
        assert!("estimate:2".parse::<JacobianMode>().is_err());
        assert!("fast".parse::<JacobianMode>().is_err());
    }

    #[test]
    fn rank_rules_parse() {
        assert_eq!("8".parse::<RankRule>().unwrap(), RankRule::Fixed(8));
        assert_eq!(
            "var:0.9".parse::<RankRule>().unwrap(),
            RankRule::Variance(0.9, 16)
        );
        assert_eq!("off".parse::<RankRule>().unwrap(), RankRule::Off);
        assert!("var:1.5".parse::<RankRule>().is_err() && "0".parse::<RankRule>().is_err());
    }

    #[test]
    fn serde_uses_the_config_spelling() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct T {
            r: Routing,
            j: JacobianMode,
            s: RankRule,
            f: Vec<Family>,
        }
        let t = T {
            r: Routing::ExpertChoice,
            j: JacobianMode::Estimate(32),
            s: RankRule::Fixed(16),
            f: vec![Family::Up, Family::Router],
        };
        let text = toml::to_string(&t).unwrap();
        assert_eq!(
            text,
            "r = \"expert_choice\"\nj = \"estimate:32\"\ns = \"16\"\nf = [\"up\", \"router\"]\n"
        );
        assert_eq!(toml::from_str::<T>(&text).unwrap(), t);
    }
}
