//! The library's error type. Messages name the file and the field at fault and
//! say what to do about it.

use std::path::PathBuf;

/// Errors raised by the moescope library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is invalid (unknown key, impossible shape, ...).
    #[error("invalid configuration: {field}: {msg}")]
    Config { field: String, msg: String },

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file exists but its contents are not what was expected.
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    /// The data given cannot be used for training or evaluation.
    #[error("data: {0}")]
    Data(String),

    /// Any other failure: a folder in use, a worker that cannot start, a
    /// model without MoE layers, a download that is off. The message says what
    /// went wrong and what to do; unlike [`Error::Data`] it blames no data.
    #[error("{0}")]
    Other(String),

    /// A checkpoint does not match the model it is loaded into.
    #[error("checkpoint {}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// Training diverged (NaN/Inf loss or gradients).
    #[error("{0}")]
    Diverged(String),

    /// A loss or gradient norm is not finite (raised by a training step;
    /// the training loop turns it into [`Error::Diverged`] with the step and
    /// the checkpoint kept).
    #[error("{what} is {value}")]
    NonFinite { what: String, value: f64 },

    /// An error from the tensor library.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
}

/// Library result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A configuration error for `field`.
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            msg: msg.into(),
        }
    }
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// A malformed file.
    pub fn bad_file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            msg: msg.into(),
        }
    }
}

thread_local! {
    /// Set while [`contain_panic`] runs on this thread.
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into `Err(message)` without printing
/// it: for third-party parsers that panic on corrupt input (`parquet`,
/// `tokenizers`), so that the user reads our error naming the file and no panic text.
/// The panic hook is wrapped once: panics on other threads, or outside `f`,
/// still reach the hook that was installed before (the default one, or a
/// fuzzer's, which aborts on them).
pub(crate) fn contain_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static WRAP_HOOK: std::sync::Once = std::sync::Once::new();
    WRAP_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINING.with(|c| c.get()) {
                previous(info);
            }
        }));
    });
    CONTAINING.with(|c| c.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(false));
    result.map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".to_string())
    })
}
