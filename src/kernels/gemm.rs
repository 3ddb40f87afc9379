//! Matrix products on strided row-major views, over the `gemm` crate (its
//! AVX-512 kernels are enabled in Cargo.toml). One thin layer so that the
//! engine reads as `C = A·Bᵀ` rather than as stride arithmetic.

use num_traits::Float;

/// A read-only strided matrix: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> View<'a, T> {
    /// A contiguous row-major (rows × cols) matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        debug_assert!(data.len() >= rows * cols, "view larger than its buffer");
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Rows of length `cols` spaced `rs` apart (a column block of a wider matrix).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize) -> Self {
        debug_assert!(rows == 0 || data.len() >= (rows - 1) * rs + cols);
        View {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// How the product is split over threads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Par {
    /// The calling thread only (inside an outer parallel loop).
    Seq,
    /// rayon's pool.
    Pool,
}

/// `C = A·B` (or `C += A·B` with `acc`). C is row-major (a.rows × b.cols) with
/// row stride `ldc`.
pub fn matmul<T: Float + 'static>(
    c: &mut [T],
    ldc: usize,
    a: View<T>,
    b: View<T>,
    acc: bool,
    par: Par,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "matmul: inner dimensions differ");
    assert!(
        m == 0 || n == 0 || c.len() >= (m - 1) * ldc + n,
        "matmul: C too small"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(T::zero());
            }
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if par == Par::Pool && threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above and the views' constructors bound every index
    // that gemm touches: C by (m-1)·ldc + n, A and B by their strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            acc,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// The f32 GEMM rate this machine sustains with [`matmul`] and the current
/// threads: best of several 2048×512×2048 products (GFLOP/s). About 0.1 s.
pub fn ceiling_gflops() -> f64 {
    let (m, k, n) = (2048, 512, 2048);
    let a = vec![0.5f32; m * k];
    let b = vec![0.25f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let t0 = std::time::Instant::now();
        matmul(
            &mut c,
            n,
            View::new(&a, m, k),
            View::new(&b, k, n),
            false,
            Par::Pool,
        );
        best = best.min(t0.elapsed().as_secs_f64());
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn strided_products_match_loops() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let (m, k, n) = (7, 5, 9);
        let a: Vec<f64> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let bt: Vec<f64> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        // C = A · Btᵀ, then C += same, with C inside a wider buffer.
        let ldc = n + 3;
        let mut c = vec![0.5; m * ldc];
        for (acc, mult) in [(false, 1.0), (true, 2.0)] {
            matmul(
                &mut c,
                ldc,
                View::new(&a, m, k),
                View::new(&bt, n, k).t(),
                acc,
                Par::Pool,
            );
            for i in 0..m {
                for j in 0..n {
                    let r: f64 = (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum();
                    assert!((c[i * ldc + j] - mult * r).abs() < 1e-12);
                }
                assert_eq!(c[i * ldc + n], 0.5, "gemm wrote outside C");
            }
        }
        // A column block of a wider matrix: Aᵀ·A over columns 2..4 of a (m × k).
        let mut g = vec![0.0; 4];
        let blk = View::strided(&a[2..], m, 2, k);
        matmul(&mut g, 2, blk.t(), blk, false, Par::Seq);
        for i in 0..2 {
            for j in 0..2 {
                let r: f64 = (0..m).map(|p| a[p * k + 2 + i] * a[p * k + 2 + j]).sum();
                assert!((g[i * 2 + j] - r).abs() < 1e-12);
            }
        }
    }
}
