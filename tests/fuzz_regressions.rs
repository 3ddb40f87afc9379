//! The fuzz targets (`moescope::fuzz`, run by cargo-fuzz from `fuzz/`) under
//! stable `cargo test`: every saved input under
//! `tests/fuzz-regressions/<target>/` (crashes the fuzzers found, kept after
//! the fix), then a hand-written seed corpus per target, valid and hostile.
//! Each input must return (an error is fine); a panic fails the test naming
//! the target and the input.
//!
//! `MOESCOPE_WRITE_FUZZ_SEEDS=fuzz/corpus cargo test --test fuzz_regressions`
//! also writes the seeds out as a starting corpus for the fuzzers.

use moescope::fuzz;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

#[allow(dead_code)]
#[path = "common/hf_ref.rs"]
mod hf_ref;

type Entry = fn(&[u8]);

/// Every fuzz target, by the name of its `fuzz/fuzz_targets/<name>.rs`.
const TARGETS: &[(&str, Entry)] = &[
    ("config_toml", fuzz::config_toml),
    ("config_set", fuzz::config_set),
    ("sweep_toml", fuzz::sweep_toml),
    ("safetensors", fuzz::safetensors),
    ("checkpoint_config_json", fuzz::checkpoint_config_json),
    ("hf_config_json", fuzz::hf_config_json),
    ("hf_index_json", fuzz::hf_index_json),
    ("token_file", fuzz::token_file),
    ("token_ids", fuzz::token_ids),
    ("corpus_text", fuzz::corpus_text),
    ("corpus_parquet", fuzz::corpus_parquet),
    ("tokenizer_json", fuzz::tokenizer_json),
    ("metrics_jsonl", fuzz::metrics_jsonl),
];

type Inputs = Vec<(String, Vec<u8>)>;

fn entry(target: &str) -> Entry {
    TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .expect("a target")
        .1
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Run every input through `target`; fail naming each input that panicked.
fn check(target: &str, inputs: Inputs) {
    if let Some(dir) = std::env::var_os("MOESCOPE_WRITE_FUZZ_SEEDS") {
        let dir = Path::new(&dir).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &inputs {
            let safe: String = name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .take(100)
                .collect();
            std::fs::write(dir.join(format!("seed-{safe}")), bytes).unwrap();
        }
    }
    let f = entry(target);
    let failed: Vec<String> = inputs
        .iter()
        .filter_map(|(name, bytes)| {
            let r = catch_unwind(AssertUnwindSafe(|| f(bytes)));
            r.err()
                .map(|e| format!("{target}/{name}: {}", panic_message(&*e)))
        })
        .collect();
    assert!(failed.is_empty(), "panicked:\n{}", failed.join("\n"));
}

fn named(pairs: &[(&str, &[u8])]) -> Inputs {
    pairs
        .iter()
        .map(|(n, b)| (n.to_string(), b.to_vec()))
        .collect()
}

/// `n` copies of `open`, then `n` of `close`.
fn nested(open: &str, close: &str, n: usize) -> Vec<u8> {
    format!("{}{}", open.repeat(n), close.repeat(n)).into_bytes()
}

/// Inputs every parser must refuse calmly.
fn hostile_common() -> Inputs {
    named(&[
        ("empty", b""),
        ("non-utf8", b"\xff\xfe\x00\x80garbage\xc3"),
        ("nul", b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0"),
        ("bom", "\u{feff}{}".as_bytes()),
        ("deep-brackets", &nested("[", "]", 10_000)),
        ("deep-braces", &nested("{\"a\":", "}", 10_000)),
        ("deep-inline-tables", &nested("a = {b = ", "}", 10_000)),
        ("deep-open-only", "[".repeat(10_000).as_bytes()),
    ])
}

/// Each byte of `valid` flipped in turn, and `valid` cut at each length.
fn mutations(name: &str, valid: &[u8]) -> Inputs {
    let mut out = Vec::new();
    for i in 0..valid.len() {
        let mut b = valid.to_vec();
        b[i] ^= 0xff;
        out.push((format!("{name}-flip{i}"), b));
        out.push((format!("{name}-cut{i}"), valid[..i].to_vec()));
    }
    out
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn saved_regression_inputs_do_not_panic() {
    for (target, _) in TARGETS {
        let dir = repo("tests/fuzz-regressions").join(target);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let inputs: Inputs = rd
            .map(|e| e.unwrap().path())
            .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
            .collect();
        check(target, inputs);
    }
}

/// Values no config key should take, as TOML.
const BAD_VALUES: &[&str] = &[
    "nan",
    "inf",
    "-inf",
    "-1",
    "0",
    "1e300",
    "9223372036854775807",
    "18446744073709551616",
    "1000000000000",
    "\"\"",
    "\"\\u0000\"",
    "[]",
    "{}",
    "true",
    "[[[[[[[[1]]]]]]]]",
];

/// (section, key) of every key of the resolved `tiny` config.
fn config_keys() -> Vec<(String, String)> {
    let cfg = moescope::config::Config::resolve(Some("tiny"), None, &[]).unwrap();
    let table: toml::Table = toml::from_str(&cfg.to_toml()).unwrap();
    let mut keys = Vec::new();
    for (section, v) in &table {
        match v.as_table() {
            Some(t) => keys.extend(t.keys().map(|k| (section.clone(), k.clone()))),
            None => keys.push((String::new(), section.clone())),
        }
    }
    keys
}

#[test]
fn config_toml_seeds() {
    let mut inputs = hostile_common();
    for f in ["configs/paper.toml", "configs/small-ptb.toml"] {
        inputs.push((f.into(), std::fs::read(repo(f)).unwrap()));
    }
    let cfg = moescope::config::Config::resolve(Some("tiny"), None, &[]).unwrap();
    inputs.push(("resolved-tiny".into(), cfg.to_toml().into_bytes()));
    for (section, key) in config_keys() {
        for v in BAD_VALUES {
            let text = match section.as_str() {
                "" => format!("{key} = {v}\n"),
                s => format!("[{s}]\n{key} = {v}\n"),
            };
            inputs.push((format!("{section}.{key}={v}"), text.into_bytes()));
        }
    }
    inputs.extend(named(&[
        ("unknown-preset", b"preset = \"nope\"\n"),
        ("unknown-section", b"[nope]\na = 1\n"),
        (
            "deep-array",
            &[b"a = ".as_slice(), &nested("[", "]", 10_000)].concat(),
        ),
    ]));
    check("config_toml", inputs);
}

#[test]
fn config_set_seeds() {
    let mut inputs = hostile_common();
    for (section, key) in config_keys() {
        let key = match section.as_str() {
            "" => key,
            s => format!("{s}.{key}"),
        };
        for v in BAD_VALUES {
            inputs.push((format!("{key}={v}"), format!("{key}={v}").into_bytes()));
        }
    }
    inputs.extend(named(&[
        ("ok", b"train.max_steps=7"),
        ("no-equals", b"train.max_steps"),
        ("empty-key", b"=1"),
        ("dots", b"...=1"),
        ("deep-key", "a.".repeat(10_000).as_bytes()),
        ("newline", b"train.max_steps=1\n[model]"),
        (
            "deep-value",
            &[b"train.seed=".as_slice(), &nested("[", "]", 10_000)].concat(),
        ),
    ]));
    check("config_set", inputs);
}

/// A grid of `axes` lists of two values each.
fn wide_grid(axes: usize) -> String {
    let mut s = String::from("[grid]\n");
    for i in 0..axes {
        s.push_str(&format!("\"k{i}\" = [0, 1]\n"));
    }
    s
}

#[test]
fn sweep_toml_seeds() {
    let mut inputs = hostile_common();
    for e in std::fs::read_dir(repo("configs/sweeps")).unwrap() {
        let p = e.unwrap().path();
        inputs.push((p.display().to_string(), std::fs::read(&p).unwrap()));
    }
    for n in [1, 6, 40, 64, 65, 200] {
        inputs.push((format!("grid-{n}-axes"), wide_grid(n).into_bytes()));
    }
    let many: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
    let long_list = format!("[grid]\n\"train.seed\" = [{}]\n", many.join(", "));
    inputs.extend(named(&[
        (
            "equal-values",
            b"[grid]\n\"reg.orth_lambda\" = [0.1, 0.10]\n",
        ),
        ("nan-values", b"[grid]\n\"reg.orth_lambda\" = [nan, nan]\n"),
        ("inf-values", b"[grid]\n\"reg.orth_lambda\" = [inf, -inf]\n"),
        ("empty-list", b"[grid]\n\"train.seed\" = []\n"),
        ("not-a-list", b"[grid]\n\"train.seed\" = 3\n"),
        ("empty-key", b"[grid]\n\"\" = [1, 2]\n"),
        ("empty-variants", b"[grid]\nmodel = [{}, {}]\n"),
        (
            "variant-deep",
            &[
                b"[grid]\nvariant = [".as_slice(),
                &nested("{a = ", "}", 2000),
                b"]",
            ]
            .concat(),
        ),
        (
            "huge-ints",
            b"[grid]\n\"train.seed\" = [18446744073709551615, -9223372036854775808]\n",
        ),
        (
            "base-dev-zero",
            b"base = \"/dev/zero\"\n[grid]\n\"train.seed\" = [0]\n",
        ),
        ("unknown-field", b"grids = 1\n"),
        ("long-list", long_list.as_bytes()),
    ]));
    check("sweep_toml", inputs);
}

#[test]
fn huge_grids_are_refused_not_a_panic_or_an_abort() {
    use moescope::experiments::sweep::{SweepSpec, MAX_RUNS};
    for axes in [17, 40, 64, 65] {
        let spec = SweepSpec::from_text(&wide_grid(axes), Path::new("s.toml")).unwrap();
        let e = spec.cells().unwrap_err().to_string();
        assert!(
            e.contains("grid") && e.contains(&MAX_RUNS.to_string()),
            "{e}"
        );
        assert!(spec.run_count().is_err());
    }
    let spec = SweepSpec::from_text(&wide_grid(6), Path::new("s.toml")).unwrap();
    assert_eq!(spec.run_count().unwrap(), 64);
}

/// A safetensors file with one tensor `t` (header JSON given whole).
fn safetensors_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

fn tiny_safetensors() -> Vec<u8> {
    use candle_core::{Device, Tensor};
    let t = Tensor::arange(0f32, 6.0, &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let s = Tensor::new(&[1.5f64], &Device::Cpu).unwrap();
    moescope::checkpoint::safetensors_bytes(&[("w".into(), t), ("s".into(), s)], None).unwrap()
}

#[test]
fn safetensors_seeds() {
    let valid = tiny_safetensors();
    let read = moescope::checkpoint::read_safetensors_bytes(
        &valid,
        Path::new("m.safetensors"),
        &candle_core::Device::Cpu,
    );
    assert_eq!(read.unwrap().len(), 2);
    let mut inputs = hostile_common();
    inputs.push(("valid".into(), valid.clone()));
    inputs.extend(mutations("valid", &valid));
    for len in [u64::MAX, 1 << 40, u32::MAX as u64, 0, 1] {
        let mut b = len.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        inputs.push((format!("header-len-{len}"), b));
    }
    let dtypes = [
        "F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL",
        "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "E8M0", "C64", "Q4", "",
    ];
    for dt in dtypes {
        for n in [0usize, 1, 2, 3, 4, 8, 16] {
            let h = format!(r#"{{"t":{{"dtype":"{dt}","shape":[2],"data_offsets":[0,{n}]}}}}"#);
            inputs.push((
                format!("dtype-{dt}-{n}"),
                safetensors_with_header(&h, &vec![7u8; n]),
            ));
        }
    }
    for (name, h, n) in [
        (
            "shape-overflow",
            r#"{"t":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}}"#,
            0,
        ),
        (
            "shape-huge",
            r#"{"t":{"dtype":"F32","shape":[1099511627776],"data_offsets":[0,4398046511104]}}"#,
            0,
        ),
        (
            "shape-zero",
            r#"{"t":{"dtype":"F32","shape":[0,5],"data_offsets":[0,0]}}"#,
            0,
        ),
        (
            "shape-scalar",
            r#"{"t":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#,
            4,
        ),
        (
            "shape-negative",
            r#"{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
            4,
        ),
        (
            "offsets-reversed",
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
            4,
        ),
        (
            "offsets-huge",
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551615]}}"#,
            4,
        ),
        (
            "metadata-not-strings",
            r#"{"__metadata__":{"a":1},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ),
        (
            "duplicate-names",
            r#"{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            4,
        ),
        ("not-an-object", "[1,2,3]", 0),
    ] {
        inputs.push((name.into(), safetensors_with_header(h, &vec![0u8; n])));
    }
    check("safetensors", inputs);
}

#[test]
fn checkpoint_config_json_seeds() {
    let m = moescope::config::Config::resolve(Some("tiny"), None, &[])
        .unwrap()
        .model;
    let valid = moescope::checkpoint::hf_config_json(&m);
    let text = valid.to_string();
    assert!(moescope::checkpoint::parse_config_json(&text, Path::new("config.json")).is_ok());
    let mut inputs = hostile_common();
    inputs.push(("valid".into(), text.into_bytes()));
    let bad: Vec<serde_json::Value> = serde_json::from_str(
        r#"[-1, 0, 1e300, 18446744073709551616, 1000000000000000000, "x", null, [], {}, true]"#,
    )
    .unwrap();
    for key in valid["moescope"].as_object().unwrap().keys() {
        for (i, b) in bad.iter().enumerate() {
            let mut v = valid.clone();
            v["moescope"][key] = b.clone();
            inputs.push((format!("{key}-{i}"), v.to_string().into_bytes()));
        }
    }
    check("checkpoint_config_json", inputs);
}

#[test]
fn hf_config_json_seeds() {
    let mut inputs = hostile_common();
    let bad: Vec<serde_json::Value> = serde_json::from_str(
        r#"[-1, 0, 1, 3, 1e300, 18446744073709551615, 18446744073709551616, 1000000000000000000, 4611686018427387904, "x", null, [], {}, true, [1, 2]]"#,
    )
    .unwrap();
    for arch in ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek"] {
        let valid = hf_ref::config(arch);
        let path = Path::new("config.json");
        assert!(moescope::hf::config::HfConfig::from_text(&valid.to_string(), path).is_ok());
        inputs.push((arch.into(), valid.to_string().into_bytes()));
        let mut keys: Vec<String> = valid.as_object().unwrap().keys().cloned().collect();
        keys.extend(
            [
                "head_dim",
                "decoder_sparse_step",
                "moe_layer_freq",
                "first_k_dense_replace",
                "rope_scaling",
                "rope_parameters",
                "n_shared_experts",
            ]
            .map(String::from),
        );
        for key in keys {
            for (i, b) in bad.iter().enumerate() {
                let mut v = valid.clone();
                v[&key] = b.clone();
                inputs.push((format!("{arch}-{key}-{i}"), v.to_string().into_bytes()));
            }
        }
    }
    let mut deepseek = hf_ref::config("deepseek");
    deepseek["n_shared_experts"] = 4611686018427387904u64.into();
    deepseek["moe_intermediate_size"] = 16.into();
    inputs.push((
        "deepseek-shared-overflow".into(),
        deepseek.to_string().into_bytes(),
    ));
    check("hf_config_json", inputs);
}

#[test]
fn hf_index_json_seeds() {
    let mut inputs = hostile_common();
    inputs.extend(named(&[
        ("valid", br#"{"metadata":{"total_size":8},"weight_map":{"a":"model-00001-of-00002.safetensors","b":"model-00002-of-00002.safetensors"}}"#),
        ("parent", br#"{"weight_map":{"a":"../x.safetensors"}}"#),
        ("absolute", br#"{"weight_map":{"a":"/etc/passwd"}}"#),
        ("not-a-string", br#"{"weight_map":{"a":1}}"#),
        ("list", br#"{"weight_map":[]}"#),
        ("no-map", br#"{}"#),
        ("nul-name", br#"{"weight_map":{"a":"x\u0000.safetensors"}}"#),
    ]));
    check("hf_index_json", inputs);
}

/// A token file written by the crate's own writer.
fn token_file_bytes(tokens: &[u32]) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.bin");
    moescope::data::cache::TokenFile::write(&p, tokens, "bytes", "abc", "train").unwrap();
    std::fs::read(p).unwrap()
}

/// The token file layout with `header` as its JSON and `data` after it.
fn token_file_with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"MOESTOK1".to_vec();
    b.extend_from_slice(&(header.len() as u32).to_le_bytes());
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn token_file_seeds() {
    use moescope::data::cache::{TokenFile, TokenLayout};
    let narrow = token_file_bytes(&[1, 2, 3, 65535]);
    let wide = token_file_bytes(&[1, 70000]);
    assert_eq!(TokenLayout::parse(&narrow).unwrap().header.count, 4);
    assert_eq!(TokenLayout::parse(&wide).unwrap().width, 4);
    let mut inputs = hostile_common();
    inputs.push(("u16".into(), narrow.clone()));
    inputs.push(("u32".into(), wide.clone()));
    inputs.extend(mutations("u16", &narrow));
    let header = |count: &str, dtype: &str| {
        format!(
            r#"{{"tokenizer":"bytes","dtype":"{dtype}","count":{count},"source_hash":"x","split":"train"}}"#
        )
    };
    for (count, dtype) in [
        ("1099511627776", "u16"),
        ("18446744073709551615", "u32"),
        ("9223372036854775808", "u16"),
        ("4611686018427387904", "u32"),
        ("-1", "u16"),
        ("1e3", "u16"),
        ("2", "u64"),
    ] {
        let name = format!("count-{count}-{dtype}");
        inputs.push((name, token_file_with_header(&header(count, dtype), &[0; 4])));
    }
    let mut huge_hlen = b"MOESTOK1".to_vec();
    huge_hlen.extend_from_slice(&u32::MAX.to_le_bytes());
    inputs.push(("header-len-u32-max".into(), huge_hlen));
    check("token_file", inputs);

    // The path-level reader says the same through its error.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("t.bin");
    let overflow = token_file_with_header(&header("18446744073709551615", "u32"), &[0; 4]);
    std::fs::write(&p, overflow).unwrap();
    let e = TokenFile::open(&p).unwrap_err().to_string();
    assert!(
        e.contains("t.bin") && e.contains("size does not match the token count"),
        "{e}"
    );
}

/// A version-1 `.npy` with `header_dict` as its header.
fn npy(header_dict: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header_dict.as_bytes().to_vec();
    h.push(b'\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(&h);
    b.extend_from_slice(data);
    b
}

fn npy_dict(descr: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

#[test]
fn token_ids_seeds() {
    use moescope::data::token_ids::parse_token_ids;
    let u16s: Vec<u8> = [1u16, 2, 3].iter().flat_map(|v| v.to_le_bytes()).collect();
    let valid = npy(&npy_dict("<u2", "(3,)"), &u16s);
    assert_eq!(
        parse_token_ids(&valid, Path::new("ids.npy")).unwrap(),
        [1, 2, 3]
    );
    let mut inputs = hostile_common();
    inputs.push(("valid-npy".into(), valid.clone()));
    inputs.extend(mutations("valid-npy", &valid));
    for (name, dict) in [
        ("shape-paren", "{'descr': '<u2', 'shape': ), }".to_string()),
        (
            "shape-multibyte",
            "{'descr': '<u2', 'shape': é), }".to_string(),
        ),
        ("shape-empty", "{'descr': '<u2', 'shape': ".to_string()),
        (
            "shape-usize-max",
            npy_dict("<i8", &format!("({},)", usize::MAX)),
        ),
        (
            "shape-overflow",
            npy_dict("<u2", &format!("({},)", usize::MAX / 2 + 1)),
        ),
        ("shape-negative", npy_dict("<u2", "(-3,)")),
        ("shape-2d", npy_dict("<u2", "(3, 1)")),
        ("descr-float", npy_dict("<f4", "(3,)")),
        (
            "descr-unquoted",
            "{'descr': <u2, 'shape': (3,), }".to_string(),
        ),
        ("descr-at-end", "{'descr'".to_string()),
        (
            "fortran",
            "{'descr': '<u2', 'fortran_order': True, 'shape': (3,), }".to_string(),
        ),
    ] {
        inputs.push((name.into(), npy(&dict, &u16s)));
    }
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&u32::MAX.to_le_bytes());
    inputs.push(("v2-header-len-u32-max".into(), v2));
    inputs.extend(named(&[
        ("json", b"[1, 2, 3]"),
        ("json-negative", b"[1, -1]"),
        ("json-float", b"[1.5, 1e400]"),
        ("json-overflow", b"[18446744073709551616, 4294967296]"),
        ("json-object", b"{\"a\": 1}"),
        ("version-9", b"\x93NUMPY\x09\x00\x00\x00"),
        ("magic-only", b"\x93NUMPY"),
    ]));
    check("token_ids", inputs);
}

#[test]
fn corpus_text_seeds() {
    let mut inputs = hostile_common();
    inputs.extend(named(&[
        (
            "jsonl",
            b"{\"text\": \"a\"}\n{\"text\": \"b<|endoftext|>c\"}\n",
        ),
        (
            "jsonl-crlf",
            b"{\"text\": \"a\"}\r\n\r\n{\"text\": \"b\"}\r\n",
        ),
        ("jsonl-no-text", b"{\"txt\": \"a\"}\n"),
        ("jsonl-text-number", b"{\"text\": 1e999}\n"),
        ("jsonl-lone-surrogate", b"{\"text\": \"\\ud800\"}\n"),
        ("jsonl-torn", b"{\"text\": \"a\"}\n{\"text\": \"b"),
        ("text", "plain text, é, 字\n".as_bytes()),
    ]));
    check("corpus_text", inputs);
}

/// A Parquet file with one `text` column.
fn parquet_bytes(texts: &[&str]) -> Vec<u8> {
    use parquet::basic::{ConvertedType, Repetition, Type as PhysicalType};
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;
    use std::sync::Arc;
    let text = Type::primitive_type_builder("text", PhysicalType::BYTE_ARRAY)
        .with_converted_type(ConvertedType::UTF8)
        .with_repetition(Repetition::REQUIRED)
        .build()
        .unwrap();
    let schema = Type::group_type_builder("schema")
        .with_fields(vec![Arc::new(text)])
        .build()
        .unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut w = SerializedFileWriter::new(Vec::new(), Arc::new(schema), props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let vals: Vec<ByteArray> = texts.iter().map(|t| ByteArray::from(*t)).collect();
    let mut c = rg.next_column().unwrap().unwrap();
    c.typed::<ByteArrayType>()
        .write_batch(&vals, None, None)
        .unwrap();
    c.close().unwrap();
    rg.close().unwrap();
    w.into_inner().unwrap()
}

#[test]
fn corpus_parquet_seeds() {
    let valid = parquet_bytes(&["hello", "world"]);
    let mut inputs = hostile_common();
    inputs.push(("valid".into(), valid.clone()));
    inputs.extend(mutations("valid", &valid));
    check("corpus_parquet", inputs);
}

#[test]
fn tokenizer_json_seeds() {
    let mut vocab = serde_json::Map::new();
    for (i, w) in ["[UNK]", "<|endoftext|>", "hello", "world"]
        .iter()
        .enumerate()
    {
        vocab.insert(w.to_string(), i.into());
    }
    let word_level = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let valid = word_level.to_string().into_bytes();
    let tok = moescope::data::tokenizer::Tokenizer::from_json_bytes(&valid, Path::new("t.json"));
    assert_eq!(tok.unwrap().eot(), Some(1));
    let mut inputs = hostile_common();
    inputs.push(("word-level".into(), valid));
    let mut no_unk = word_level.clone();
    no_unk["model"]["unk_token"] = "<missing>".into();
    inputs.push(("unk-not-in-vocab".into(), no_unk.to_string().into_bytes()));
    let bpe = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": true,
                  "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b", "x y"]}
    });
    inputs.push(("bpe-bad-merge".into(), bpe.to_string().into_bytes()));
    let mut trunc = word_level.clone();
    trunc["truncation"] = serde_json::json!({"max_length": 0, "stride": 18446744073709551615u64, "strategy": "LongestFirst", "direction": "Right"});
    inputs.push(("truncation-stride".into(), trunc.to_string().into_bytes()));
    let mut added = word_level;
    added["added_tokens"] = serde_json::json!([{"id": 4294967295u32, "content": "", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}]);
    inputs.push(("added-token-max-id".into(), added.to_string().into_bytes()));
    check("tokenizer_json", inputs);
}

#[test]
fn metrics_jsonl_seeds() {
    let mut inputs = hostile_common();
    inputs.extend(named(&[
        ("start", br#"{"kind":"start","params_active":81312,"params_total":139680,"source":"x","step":0,"tokenizer":"bytes","train_tokens":54000,"unigram_entropy":3.9,"valid_tokens":6000,"vocab_size":320}
"#),
        ("train-nulls", br#"{"elapsed_s":1.25,"grad_norm":null,"kind":"train","lm_loss":5.5,"loss":null,"lr":0.0006,"orth_lambda":0.0,"orth_loss":null,"step":10,"tokens":1280,"tokens_per_s":1024.0}
"#),
        ("eval-measures-bad", br#"{"kind":"eval","step":1,"measure_tokens":"x"}
"#),
        ("step-negative", br#"{"kind":"train","step":-1}
"#),
        ("step-overflow", br#"{"kind":"train","step":18446744073709551616}
"#),
        ("torn-tail", br#"{"kind":"train","st"#),
        ("unknown-kind", br#"{"kind":"bogus"}
"#),
    ]));
    check("metrics_jsonl", inputs);
}
