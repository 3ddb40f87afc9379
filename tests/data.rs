//! Data pipeline: formats, splits, named-dataset cache layout (offline),
//! tokeniser round trips on real corpora.

mod common;

use moescope::config::DataConfig;
use moescope::data::corpus::{read_text, RecordJoin};
use moescope::data::tokenizer::Tokenizer;
use moescope::data::Dataset;
use std::path::Path;
use std::sync::Arc;

/// Write a Parquet file with a `text` column (and an `id` column), as
/// Hugging Face datasets lay them out.
fn write_parquet(path: &Path, texts: &[&str]) {
    use parquet::basic::{Compression, ConvertedType, Repetition, Type as PhysicalType};
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;
    let schema = Arc::new(
        Type::group_type_builder("schema")
            .with_fields(vec![
                Arc::new(
                    Type::primitive_type_builder("id", PhysicalType::INT64)
                        .with_repetition(Repetition::REQUIRED)
                        .build()
                        .unwrap(),
                ),
                Arc::new(
                    Type::primitive_type_builder("text", PhysicalType::BYTE_ARRAY)
                        .with_converted_type(ConvertedType::UTF8)
                        .with_repetition(Repetition::REQUIRED)
                        .build()
                        .unwrap(),
                ),
            ])
            .build()
            .unwrap(),
    );
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    let mut rg = w.next_row_group().unwrap();
    let ids: Vec<i64> = (0..texts.len() as i64).collect();
    let mut c = rg.next_column().unwrap().unwrap();
    c.typed::<Int64Type>()
        .write_batch(&ids, None, None)
        .unwrap();
    c.close().unwrap();
    let vals: Vec<ByteArray> = texts.iter().map(|t| ByteArray::from(*t)).collect();
    let mut c = rg.next_column().unwrap().unwrap();
    c.typed::<ByteArrayType>()
        .write_batch(&vals, None, None)
        .unwrap();
    c.close().unwrap();
    rg.close().unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_and_jsonl_read_the_text_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("train-00000-of-00001.parquet");
    write_parquet(&p, &["One story.", "Two stories."]);
    assert_eq!(
        read_text(&p, RecordJoin::Documents).unwrap(),
        "One story.<|endoftext|>Two stories."
    );
    assert_eq!(
        read_text(&p, RecordJoin::Concatenate).unwrap(),
        "One story.Two stories."
    );
    std::fs::write(d.path().join("bad.parquet"), b"PAR1 not really").unwrap();
    let e = read_text(&d.path().join("bad.parquet"), RecordJoin::Documents)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad.parquet") && e.contains("Parquet"), "{e}");
}

#[test]
fn folder_of_jsonl_splits_trains_on_train_and_validates_on_valid() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("corpus");
    std::fs::create_dir_all(&data).unwrap();
    let line = |t: &str| format!("{{\"text\": \"{t}\"}}\n");
    std::fs::write(data.join("train.jsonl"), line("aaaa bbbb").repeat(50)).unwrap();
    std::fs::write(data.join("validation.jsonl"), line("cccc").repeat(5)).unwrap();
    std::fs::write(data.join("README.md"), "not corpus").unwrap();
    let cfg = DataConfig {
        path: data.display().to_string(),
        tokenizer: "bytes".into(),
        cache_dir: d.path().join("c").display().to_string(),
        ..Default::default()
    };
    let ds = Dataset::load(&cfg, false).unwrap();
    // 50 documents of 9 bytes, 49 separators.
    assert_eq!(ds.train.len(), 50 * 9 + 49);
    assert_eq!(ds.valid.len(), 5 * 4 + 4);
    assert!(ds
        .valid
        .to_vec()
        .iter()
        .all(|&t| t == b'c' as u32 || t == 256));
}

#[test]
fn single_file_gets_a_deterministic_holdout_and_cache_reuse() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("notes.txt");
    std::fs::write(&f, "abcdefghij".repeat(100)).unwrap();
    let cfg = DataConfig {
        path: f.display().to_string(),
        tokenizer: "bytes".into(),
        val_fraction: 0.1,
        cache_dir: d.path().join("c").display().to_string(),
        ..Default::default()
    };
    let ds = Dataset::load(&cfg, false).unwrap();
    assert_eq!((ds.train.len(), ds.valid.len()), (900, 100));
    let cached = ds.train.path.clone();
    let mtime = std::fs::metadata(&cached).unwrap().modified().unwrap();
    let ds2 = Dataset::load(&cfg, false).unwrap();
    assert_eq!(ds2.train.path, cached);
    assert_eq!(
        std::fs::metadata(&cached).unwrap().modified().unwrap(),
        mtime,
        "cache was rebuilt"
    );
    // Changing the source changes the cache key.
    std::fs::write(&f, "zyxwvutsrq".repeat(100)).unwrap();
    let ds3 = Dataset::load(&cfg, false).unwrap();
    assert_eq!(ds3.train.get(0), b'z' as u32);
}

#[test]
fn named_dataset_uses_files_already_in_the_cache_offline() {
    // Lay the files out as the downloader would, then load by name: no network.
    let Some(shared) = common::shared_data() else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("datasets/ptb");
    std::fs::create_dir_all(&dir).unwrap();
    for s in ["train", "valid", "test"] {
        // A slice of the real files keeps the test fast.
        let text = std::fs::read_to_string(shared.join(format!("ptb/ptb.{s}.txt"))).unwrap();
        std::fs::write(dir.join(format!("ptb.{s}.txt")), &text[..20_000]).unwrap();
    }
    let cfg = DataConfig {
        dataset: "ptb".into(),
        tokenizer: "gpt2".into(),
        cache_dir: d.path().display().to_string(),
        ..Default::default()
    };
    let ds = Dataset::load(&cfg, false).unwrap();
    assert!(ds.train.len() > 3000 && ds.valid.len() > 3000 && ds.test.is_some());
    let text = ds.tokenizer.decode(&ds.valid.to_vec());
    assert!(text.contains("<unk>"));

    // A missing file: the error says which file, where, and how to work around it.
    std::fs::remove_file(dir.join("ptb.test.txt")).unwrap();
    std::env::set_var("MOESCOPE_OFFLINE", "1"); // make sure nothing is fetched
    let e = Dataset::load(&cfg, false).unwrap_err().to_string();
    assert!(e.contains("ptb.test.txt") && e.contains("--data"), "{e}");
}

#[test]
fn tokenizers_round_trip_real_corpora() {
    let Some(shared) = common::shared_data() else {
        return;
    };
    let ts = std::fs::read_to_string(shared.join("tinystories/tinystories_sample.txt")).unwrap();
    let ptb = std::fs::read_to_string(shared.join("ptb/ptb.valid.txt")).unwrap();
    let wiki = std::fs::read_to_string(shared.join("wikitext-2/wiki.valid.tokens")).unwrap();
    for spec in ["gpt2", "bytes"] {
        let t = Tokenizer::from_spec(spec).unwrap();
        for text in [&ts, &ptb[..50_000].to_string(), &wiki[..50_000].to_string()] {
            let ids = t.encode_with_eot(text).unwrap();
            assert_eq!(t.decode(&ids), *text, "{spec}");
        }
    }
    // Parallel tokenisation with chunking equals the plain encoder.
    let t = Tokenizer::from_spec("gpt2").unwrap();
    let big = wiki.repeat(2);
    let par =
        moescope::data::tokenize_parallel(&t, &big, &indicatif::ProgressBar::hidden()).unwrap();
    assert_eq!(par, t.encode(&big).unwrap());
}

#[test]
fn hugging_face_tokenizer_json_loads_and_round_trips() {
    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
    let d = tempfile::tempdir().unwrap();
    let vocab: std::collections::HashMap<String, u32> = [
        ("[UNK]", 0),
        ("<|endoftext|>", 1),
        ("the", 2),
        ("cat", 3),
        ("sat", 4),
    ]
    .iter()
    .map(|(w, i)| (w.to_string(), *i))
    .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("[UNK]".into())
        .build()
        .unwrap();
    let mut tk = tokenizers::Tokenizer::new(model);
    tk.with_pre_tokenizer(Some(WhitespaceSplit));
    let path = d.path().join("tokenizer.json");
    tk.save(&path, false).unwrap();
    let t = Tokenizer::from_file(&path).unwrap();
    assert_eq!(t.vocab_size(), 5);
    assert_eq!(t.eot(), Some(1));
    assert_eq!(
        t.encode_with_eot("the cat<|endoftext|>sat").unwrap(),
        vec![2, 3, 1, 4]
    );
    std::fs::write(&path, "{\"not\": \"a tokenizer\"}").unwrap();
    let e = Tokenizer::from_file(&path).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn shared_corpora_split_files_are_recognised() {
    let Some(shared) = common::shared_data() else {
        return;
    };
    use moescope::data::corpus::discover;
    let ptb = discover(&shared.join("ptb")).unwrap();
    assert_eq!(
        (ptb.train.len(), ptb.valid.len(), ptb.test.len()),
        (1, 1, 1)
    );
    let ts = discover(&shared.join("tinystories")).unwrap();
    assert_eq!(
        (ts.train.len(), ts.valid.len(), ts.unsplit.len()),
        (1, 1, 0),
        "{ts:?}"
    );
    // WikiText-2 offline has validation and test only: a clear error, not a silent holdout.
    let e = discover(&shared.join("wikitext-2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no training file"), "{e}");
}
