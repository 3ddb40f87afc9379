//! The built-in corpus: a seeded mixture of synthetic "topics".
//!
//! Each topic has its own lexicon (pseudo-words built from a topic-specific
//! syllable inventory, in four word classes: function words, nouns, verbs,
//! adjectives) and its own grammar (a small set of sentence templates over
//! those classes, with a topic-specific word order). Words are drawn from a
//! Zipf distribution within their class. A document is 3–8 sentences of one
//! topic; documents are separated by `<|endoftext|>`.
//!
//! Every document records its topic, so every token has a true topic label
//! (end-of-text tokens get [`NO_TOPIC`]): measures can ask whether experts
//! specialise to topics. The corpus depends only on its size, topic count and
//! generator version, never on the training seed, so all runs of a sweep see
//! the same text.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Version of the generator (part of the cache key).
pub const GENERATOR_VERSION: u32 = 1;
/// Topic label of tokens that belong to no document (separators).
pub const NO_TOPIC: u8 = u8::MAX;

const CONSONANTS: &[&str] = &[
    "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "th",
    "sh", "ch", "qu", "br", "tr", "kl", "st",
];
const VOWELS: &[&str] = &["a", "e", "i", "o", "u", "y", "ai", "ou", "ee", "oa"];

/// A document of the built-in corpus.
#[derive(Debug, Clone)]
pub struct Document {
    pub topic: u8,
    pub text: String,
}

struct Topic {
    classes: [Vec<String>; 4], // function, noun, verb, adjective
    templates: Vec<Vec<usize>>,
}

fn make_word(rng: &mut ChaCha8Rng, cons: &[&str], vows: &[&str], syllables: usize) -> String {
    let mut w = String::new();
    for _ in 0..syllables {
        w.push_str(cons[rng.random_range(0..cons.len())]);
        w.push_str(vows[rng.random_range(0..vows.len())]);
    }
    if rng.random_bool(0.4) {
        w.push_str(cons[rng.random_range(0..cons.len())]);
    }
    w
}

fn make_topic(rng: &mut ChaCha8Rng, t: usize) -> Topic {
    // A topic-specific subset of the syllable inventory: distinct spelling statistics.
    let cons: Vec<&str> = CONSONANTS
        .iter()
        .copied()
        .filter(|_| rng.random_bool(0.45))
        .collect();
    let cons = if cons.len() < 4 {
        CONSONANTS[t % 8..t % 8 + 6].to_vec()
    } else {
        cons
    };
    let vows: Vec<&str> = VOWELS
        .iter()
        .copied()
        .filter(|_| rng.random_bool(0.5))
        .collect();
    let vows = if vows.len() < 2 {
        VOWELS[t % 4..t % 4 + 3].to_vec()
    } else {
        vows
    };
    let sizes = [12, 120, 60, 40];
    let classes = std::array::from_fn(|c| {
        (0..sizes[c])
            .map(|_| {
                let syl = if c == 0 { 1 } else { rng.random_range(1..=3) };
                make_word(rng, &cons, &vows, syl)
            })
            .collect()
    });
    // Word orders: SVO-like, SOV-like or VSO-like per topic, with optional adjectives.
    const F: usize = 0;
    const N: usize = 1;
    const V: usize = 2;
    const A: usize = 3;
    let orders: [&[&[usize]]; 3] = [
        &[
            &[F, N, V, F, N],
            &[F, A, N, V, F, N],
            &[F, N, V, F, A, N, F, N],
        ],
        &[&[F, N, F, N, V], &[F, A, N, F, N, V], &[N, F, A, N, V]],
        &[&[V, F, N, F, N], &[V, F, A, N, F, N], &[V, N, F, N, A]],
    ];
    let templates = orders[t % 3].iter().map(|s| s.to_vec()).collect();
    Topic { classes, templates }
}

/// Zipf-distributed index in 0..n (exponent 1.1).
fn zipf(rng: &mut ChaCha8Rng, cdf: &[f64]) -> usize {
    let u: f64 = rng.random();
    cdf.partition_point(|&c| c < u).min(cdf.len() - 1)
}

fn zipf_cdf(n: usize) -> Vec<f64> {
    let w: Vec<f64> = (1..=n).map(|r| 1.0 / (r as f64).powf(1.1)).collect();
    let z: f64 = w.iter().sum();
    let mut acc = 0.0;
    w.iter()
        .map(|x| {
            acc += x / z;
            acc
        })
        .collect()
}

/// Generate documents totalling about `bytes` bytes of text over `topics` topics.
pub fn generate(bytes: usize, topics: usize) -> Vec<Document> {
    let topics = topics.clamp(1, 200);
    let mut rng = ChaCha8Rng::seed_from_u64(0x6d6f_6573_636f_7065 ^ GENERATOR_VERSION as u64);
    let lex: Vec<Topic> = (0..topics).map(|t| make_topic(&mut rng, t)).collect();
    let cdfs: Vec<Vec<f64>> = lex[0].classes.iter().map(|c| zipf_cdf(c.len())).collect();
    let mut docs = Vec::new();
    let mut total = 0;
    while total < bytes {
        let t = rng.random_range(0..topics);
        let topic = &lex[t];
        let mut text = String::new();
        for _ in 0..rng.random_range(3..=8) {
            let tpl = &topic.templates[rng.random_range(0..topic.templates.len())];
            let mut sentence: Vec<&str> = tpl
                .iter()
                .map(|&c| topic.classes[c][zipf(&mut rng, &cdfs[c])].as_str())
                .collect();
            if rng.random_bool(0.3) {
                // a subordinate clause: function word + noun + verb
                sentence.push(topic.classes[0][zipf(&mut rng, &cdfs[0])].as_str());
                sentence.push(topic.classes[1][zipf(&mut rng, &cdfs[1])].as_str());
                sentence.push(topic.classes[2][zipf(&mut rng, &cdfs[2])].as_str());
            }
            let mut s = sentence.join(" ");
            if let Some(first) = s.get(0..1) {
                s.replace_range(0..1, &first.to_uppercase());
            }
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(&s);
            text.push('.');
        }
        total += text.len() + 1;
        docs.push(Document {
            topic: t as u8,
            text,
        });
    }
    docs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_sized_and_topical() {
        let a = generate(50_000, 4);
        let b = generate(50_000, 4);
        assert_eq!(a.len(), b.len());
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.text == y.text && x.topic == y.topic));
        let total: usize = a.iter().map(|d| d.text.len()).sum();
        assert!((45_000..60_000).contains(&total), "{total}");
        let mut seen = [0usize; 4];
        for d in &a {
            seen[d.topic as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 10), "{seen:?}");
        // Topics use different words: the vocabularies of topic 0 and 1 barely overlap.
        let words = |t: u8| -> std::collections::HashSet<String> {
            a.iter()
                .filter(|d| d.topic == t)
                .flat_map(|d| {
                    d.text
                        .to_lowercase()
                        .split([' ', '.'])
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (w0, w1) = (words(0), words(1));
        let shared = w0.intersection(&w1).count();
        assert!(
            shared * 5 < w0.len().min(w1.len()),
            "shared {shared} of {} / {}",
            w0.len(),
            w1.len()
        );
    }
}
