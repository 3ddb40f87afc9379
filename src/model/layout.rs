//! The model's parameters (names, shapes, order), derived from
//! [`ModelConfig`] in one place.
//!
//! The names are the safetensors tensor names of FORMAT.md; the order is the
//! order in which `Gpt::new` creates the parameters, which is also the order
//! of the checkpoint, of the optimiser state and of the fused engine's flat
//! buffers. `ParamStore` checks every parameter the model creates against
//! this layout, and the fused engine builds its index from it.
//!
//! The layout is a tree generic over what each parameter holds: a
//! [`ParamSpec`] here, a range of a flat buffer or a slice in the engine
//! (see [`ModelLayout::map`]).

/// Whether the parameter `name` is an expert matrix (W_up, W_gate, W_down of
/// an MoE layer's expert): the group `train.weight_decay_experts` decays.
pub fn is_expert_matrix(name: &str) -> bool {
    name.contains(".moe.experts.") && name.ends_with(".weight")
}

use crate::config::{ExpertKind, ModelConfig};

/// One parameter: its tensor name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    fn new(name: String, shape: &[usize]) -> Self {
        ParamSpec {
            name,
            shape: shape.to_vec(),
        }
    }
    /// Number of scalars.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A weight and its optional bias (a linear layer `y = x·Wᵀ + b`, W: (out,
/// in), or a LayerNorm's gain and shift).
#[derive(Debug, Clone)]
pub struct Affine<S> {
    pub weight: S,
    pub bias: Option<S>,
}

/// One expert (or a dense FFN): `down(act(up(x)))`, or SwiGLU with `gate`.
#[derive(Debug, Clone)]
pub struct ExpertLayout<S> {
    /// W_gate (d_ff × d), SwiGLU only.
    pub gate: Option<S>,
    /// W_up (d_ff × d), b_up.
    pub up: Affine<S>,
    /// W_down (d × d_ff), b_down.
    pub down: Affine<S>,
}

/// The feed-forward part of a block.
#[derive(Debug, Clone)]
pub enum FfnLayout<S> {
    Moe {
        /// W_r (E × d), no bias.
        router: S,
        experts: Vec<ExpertLayout<S>>,
        /// Loss-free balancing bias (E), with `model.balance_bias` only.
        balance_bias: Option<S>,
    },
    Dense(ExpertLayout<S>),
}

/// One pre-LayerNorm transformer block.
#[derive(Debug, Clone)]
pub struct BlockLayout<S> {
    pub ln1: Affine<S>,
    /// Fused q, k, v (3d × d).
    pub qkv: Affine<S>,
    pub proj: Affine<S>,
    pub ln2: Affine<S>,
    pub ffn: FfnLayout<S>,
}

/// Every parameter of the model.
#[derive(Debug, Clone)]
pub struct ModelLayout<S = ParamSpec> {
    /// Token embeddings (V × d), tied with the output projection.
    pub wte: S,
    /// Position embeddings (seq_len × d).
    pub wpe: S,
    pub blocks: Vec<BlockLayout<S>>,
    pub ln_f: Affine<S>,
}

impl ModelLayout<ParamSpec> {
    /// The parameters of the model `cfg` describes.
    pub fn new(cfg: &ModelConfig) -> Self {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        let spec = |name: String, shape: &[usize]| ParamSpec::new(name, shape);
        let affine = |name: &str, shape_w: &[usize], n_out: usize, bias: bool| Affine {
            weight: spec(format!("{name}.weight"), shape_w),
            bias: bias.then(|| spec(format!("{name}.bias"), &[n_out])),
        };
        let expert = |name: &str, kind: ExpertKind| {
            let bias = cfg.bias && kind == ExpertKind::Mlp;
            ExpertLayout {
                gate: (kind == ExpertKind::Swiglu)
                    .then(|| spec(format!("{name}.gate.weight"), &[f, d])),
                up: affine(&format!("{name}.up"), &[f, d], f, bias),
                down: affine(&format!("{name}.down"), &[d, f], d, bias),
            }
        };
        let block = |l: usize| {
            let p = format!("layers.{l}");
            let ffn = if cfg.is_moe_layer(l) {
                let e = cfg.n_experts;
                FfnLayout::Moe {
                    router: spec(format!("{p}.moe.router.weight"), &[e, d]),
                    experts: (0..e)
                        .map(|x| expert(&format!("{p}.moe.experts.{x}"), cfg.expert))
                        .collect(),
                    balance_bias: cfg
                        .balance_bias
                        .then(|| spec(format!("{p}.moe.balance_bias"), &[e])),
                }
            } else {
                FfnLayout::Dense(expert(&format!("{p}.mlp"), ExpertKind::Mlp))
            };
            BlockLayout {
                ln1: affine(&format!("{p}.ln1"), &[d], d, cfg.bias),
                qkv: affine(&format!("{p}.attn.qkv"), &[3 * d, d], 3 * d, cfg.bias),
                proj: affine(&format!("{p}.attn.proj"), &[d, d], d, cfg.bias),
                ln2: affine(&format!("{p}.ln2"), &[d], d, cfg.bias),
                ffn,
            }
        };
        ModelLayout {
            wte: spec("wte.weight".into(), &[cfg.vocab_size, d]),
            wpe: spec("wpe.weight".into(), &[cfg.seq_len, d]),
            blocks: (0..cfg.n_layer).map(block).collect(),
            ln_f: affine("ln_f", &[d], d, cfg.bias),
        }
    }
}

impl<S> Affine<S> {
    fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a S) -> U) -> Affine<U> {
        let weight = f(&self.weight);
        Affine {
            weight,
            bias: self.bias.as_ref().map(f),
        }
    }
}

impl<S> ExpertLayout<S> {
    fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a S) -> U) -> ExpertLayout<U> {
        let gate = self.gate.as_ref().map(&mut *f);
        let up = self.up.map(f);
        ExpertLayout {
            gate,
            up,
            down: self.down.map(f),
        }
    }
}

impl<S> BlockLayout<S> {
    fn map<'a, U>(&'a self, f: &mut impl FnMut(&'a S) -> U) -> BlockLayout<U> {
        let (ln1, qkv, proj, ln2) = (
            self.ln1.map(f),
            self.qkv.map(f),
            self.proj.map(f),
            self.ln2.map(f),
        );
        let ffn = match &self.ffn {
            FfnLayout::Moe {
                router,
                experts,
                balance_bias,
            } => {
                let router = f(router);
                let experts = experts.iter().map(|x| x.map(f)).collect();
                FfnLayout::Moe {
                    router,
                    experts,
                    balance_bias: balance_bias.as_ref().map(f),
                }
            }
            FfnLayout::Dense(mlp) => FfnLayout::Dense(mlp.map(f)),
        };
        BlockLayout {
            ln1,
            qkv,
            proj,
            ln2,
            ffn,
        }
    }
}

impl<S> ModelLayout<S> {
    /// The same tree with `f` applied to every parameter, visited in
    /// creation order (so `f` may hand out consecutive pieces of a flat buffer).
    pub fn map<'a, U>(&'a self, mut f: impl FnMut(&'a S) -> U) -> ModelLayout<U> {
        let (wte, wpe) = (f(&self.wte), f(&self.wpe));
        let blocks = self.blocks.iter().map(|b| b.map(&mut f)).collect();
        ModelLayout {
            wte,
            wpe,
            blocks,
            ln_f: self.ln_f.map(&mut f),
        }
    }

    /// Every parameter, in creation order.
    pub fn params(&self) -> Vec<&S> {
        let mut out = Vec::new();
        self.map(|s| out.push(s));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Routing;

    /// The tensor names of FORMAT.md's weights table, `{l}`/`{e}` kept,
    /// `.bias`-style suffixes and `{a,b}` alternatives expanded.
    fn documented_names() -> Vec<String> {
        let doc = include_str!("../../FORMAT.md");
        let table = doc
            .split("## Weights")
            .nth(1)
            .and_then(|s| s.split("\n## ").next())
            .expect("FORMAT.md has a weights section");
        let mut out: Vec<String> = Vec::new();
        for row in table.lines().filter(|l| l.starts_with("| `")) {
            let first_cell = row.split('|').nth(1).unwrap_or("");
            for tok in first_cell.split('`').skip(1).step_by(2) {
                let full = match tok.strip_prefix('.') {
                    // `.bias` after `x.weight`: the same tensor path, another leaf.
                    Some(leaf) => {
                        let prev = out.last().expect("a suffix follows a name");
                        format!("{}.{leaf}", prev.rsplit_once('.').unwrap().0)
                    }
                    None => tok.to_string(),
                };
                out.extend(expand(&full));
            }
        }
        out
    }

    /// `a.{x,y}.b` → `a.x.b`, `a.y.b` (placeholders like `{l}` stay).
    fn expand(name: &str) -> Vec<String> {
        let Some(open) = name.find('{').filter(|&i| name[i..].contains(',')) else {
            return vec![name.to_string()];
        };
        let close = open + name[open..].find('}').unwrap();
        let (head, alts, tail) = (&name[..open], &name[open + 1..close], &name[close + 1..]);
        if !alts.contains(',') {
            let rest = expand(tail);
            return rest
                .iter()
                .map(|r| format!("{head}{{{alts}}}{r}"))
                .collect();
        }
        alts.split(',')
            .flat_map(|a| expand(&format!("{head}{a}{tail}")))
            .collect()
    }

    /// `layers.3.moe.experts.5.up.weight` → `layers.{l}.moe.experts.{e}.up.weight`.
    fn pattern(name: &str) -> String {
        let parts: Vec<&str> = name.split('.').collect();
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let numeric = p.chars().all(|c| c.is_ascii_digit());
            out.push(match (numeric, i.checked_sub(1).map(|j| parts[j])) {
                (true, Some("layers")) => "{l}".to_string(),
                (true, Some("experts")) => "{e}".to_string(),
                _ => p.to_string(),
            });
        }
        out.join(".")
    }

    /// Every tensor any config creates is in FORMAT.md's table, and every
    /// name in the table is created by some config.
    #[test]
    fn format_md_lists_exactly_the_layout_names() {
        let documented = documented_names();
        let mut seen = std::collections::BTreeSet::new();
        for (bias, expert, moe_every, balance) in [
            (true, ExpertKind::Mlp, 1, false),
            (false, ExpertKind::Swiglu, 2, true),
            (true, ExpertKind::Swiglu, 2, false),
        ] {
            let cfg = ModelConfig {
                vocab_size: 11,
                n_layer: 2,
                bias,
                expert,
                moe_every,
                balance_bias: balance,
                routing: Routing::Topk,
                ..Default::default()
            };
            for p in ModelLayout::new(&cfg).params() {
                let pat = pattern(&p.name);
                assert!(
                    documented.contains(&pat),
                    "{} ({pat}) is not in FORMAT.md",
                    p.name
                );
                seen.insert(pat);
            }
        }
        for d in &documented {
            assert!(seen.contains(d), "FORMAT.md lists {d}, which no model has");
        }
    }

    /// The layout is what `Gpt::new` creates (names, shapes, order).
    #[test]
    fn the_model_creates_the_layout() {
        let cfg = ModelConfig {
            vocab_size: 11,
            n_layer: 3,
            moe_every: 2,
            expert: ExpertKind::Swiglu,
            ..Default::default()
        };
        let m = crate::model::Gpt::new(&cfg, candle_core::DType::F32, &candle_core::Device::Cpu, 0)
            .unwrap();
        let layout = ModelLayout::new(&cfg);
        let specs = layout.params();
        assert_eq!(m.params.names().len(), specs.len());
        for ((name, var), spec) in m.params.names().iter().zip(m.params.vars()).zip(specs) {
            assert_eq!((name, var.dims()), (&spec.name, spec.shape.as_slice()));
        }
    }
}
