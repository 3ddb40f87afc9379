//! Peak resident memory of this process (Linux `/proc`), for per-layer
//! memory reports. Elsewhere the functions return `None`.

/// Reset the peak-RSS counter (`VmHWM`) to the current RSS.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size since start or the last reset, in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// Current resident set size in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_os = "linux")]
    fn peak_is_at_least_current() {
        let v = vec![1u8; 32 << 20];
        let cur = super::rss_bytes().unwrap();
        assert!(super::peak_rss_bytes().unwrap() >= cur);
        assert!(cur > 32 << 20, "{cur}");
        drop(v);
    }
}
