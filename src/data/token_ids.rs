//! Token ids from a file: a JSON array of integers or a 1-D `.npy` of
//! integers (`moescope analyze --token-ids`).

use crate::{Error, Result};
use std::path::Path;

/// Read token ids from a JSON array of integers or a 1-D `.npy` of integers.
pub fn read_token_ids(path: &Path) -> Result<Vec<u32>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_token_ids(&bytes, path)
}

/// [`read_token_ids`] on the file's bytes (`path` is only used in messages).
pub fn parse_token_ids(bytes: &[u8], path: &Path) -> Result<Vec<u32>> {
    let bad = |m: String| Error::bad_file(path, m);
    let ids: Vec<i128> = if bytes.starts_with(b"\x93NUMPY") {
        read_npy(bytes).map_err(bad)?
    } else {
        let v: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| bad(format!("neither .npy nor JSON: {e}")))?;
        let arr = v
            .as_array()
            .ok_or_else(|| bad("expected a JSON array of integers".into()))?;
        arr.iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_i64()
                    .map(i128::from)
                    .ok_or_else(|| bad(format!("element {i} is not an integer: {x}")))
            })
            .collect::<Result<_>>()?
    };
    ids.iter()
        .enumerate()
        .map(|(i, &x)| {
            u32::try_from(x).map_err(|_| bad(format!("element {i} = {x} is not a valid token id")))
        })
        .collect()
}

fn read_npy(b: &[u8]) -> std::result::Result<Vec<i128>, String> {
    if b.len() < 10 {
        return Err("truncated .npy header".into());
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = std::str::from_utf8(b.get(start..start + hlen).ok_or("truncated .npy header")?)
        .map_err(|e| e.to_string())?;
    let field = |k: &str| -> Option<String> {
        let i = header.find(&format!("'{k}'"))?;
        let rest = &header[i + k.len() + 2..];
        let rest = rest[rest.find(':')? + 1..].trim_start();
        Some(rest.to_string())
    };
    let descr = field("descr").ok_or("no descr in .npy header")?;
    let descr = descr.trim_start_matches('\'');
    let descr = &descr[..descr.find('\'').ok_or("bad descr")?];
    if field("fortran_order").is_some_and(|f| f.starts_with("True")) {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape = field("shape").ok_or("no shape in .npy header")?;
    let close = shape.find(')').ok_or("bad shape")?;
    // `get`: the shape may be `)` alone or start with a multi-byte character.
    let dims: Vec<usize> = shape
        .get(1..close)
        .ok_or_else(|| format!("bad shape {shape}"))?
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().map_err(|_| format!("bad shape {shape}")))
        .collect::<std::result::Result<_, _>>()?;
    if dims.len() != 1 {
        return Err(format!("expected a 1-D array, found shape {dims:?}"));
    }
    let data = &b[start + hlen..];
    let (width, signed, big) = match descr {
        "|u1" | "<u1" => (1, false, false),
        "|i1" | "<i1" => (1, true, false),
        "<u2" => (2, false, false),
        "<i2" => (2, true, false),
        "<u4" => (4, false, false),
        "<i4" => (4, true, false),
        "<u8" => (8, false, false),
        "<i8" => (8, true, false),
        ">i8" | ">i4" | ">u4" | ">u8" => (0, false, true),
        other => {
            return Err(format!(
                "dtype {other} is not an integer type (expected int8..int64 or uint8..uint64)"
            ))
        }
    };
    if big {
        return Err("big-endian arrays are not supported".into());
    }
    let need = dims[0]
        .checked_mul(width)
        .ok_or_else(|| format!("shape {shape} is too large"))?;
    if data.len() != need {
        return Err(format!(
            "data holds {} bytes, shape needs {need}: truncated file?",
            data.len(),
        ));
    }
    Ok(data
        .chunks_exact(width)
        .map(|c| {
            let mut buf = [0u8; 8];
            buf[..width].copy_from_slice(c);
            let u = u64::from_le_bytes(buf);
            if signed {
                let shift = 64 - 8 * width as u32;
                (((u << shift) as i64) >> shift) as i128
            } else {
                u as i128
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
            .into_bytes();
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(b' ');
        }
        h.push(b'\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(&h);
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn npy_integer_dtypes_and_errors() {
        let u16s: Vec<u8> = [1u16, 65535, 7]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            read_npy(&npy("<u2", "(3,)", &u16s)).unwrap(),
            vec![1, 65535, 7]
        );
        let i32s: Vec<u8> = [5i32, -1].iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(read_npy(&npy("<i4", "(2,)", &i32s)).unwrap(), vec![5, -1]);
        assert_eq!(read_npy(&npy("|u1", "(2,)", &[3, 4])).unwrap(), vec![3, 4]);
        assert!(read_npy(&npy("<f4", "(1,)", &[0, 0, 0, 0]))
            .unwrap_err()
            .contains("not an integer"));
        assert!(read_npy(&npy("<i4", "(1, 2)", &i32s))
            .unwrap_err()
            .contains("1-D"));
        assert!(read_npy(&npy("<i4", "(3,)", &i32s))
            .unwrap_err()
            .contains("truncated"));
        // Negative ids are refused by the caller with the element index.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("neg.npy");
        std::fs::write(&p, npy("<i4", "(2,)", &i32s)).unwrap();
        let e = read_token_ids(&p).unwrap_err().to_string();
        assert!(e.contains("neg.npy") && e.contains("element 1"), "{e}");
    }
}
