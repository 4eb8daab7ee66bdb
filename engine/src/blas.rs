//! The f32 matrix product behind every frozen-weight linear layer (the projections and
//! the output head, forward and input-gradient), which is most of a training step.
//!
//! Three backends compute the same `dst = lhs · rhs (+ dst)`:
//! - [`crate::kernels`], our own kernels, on x86-64 CPUs with AVX-512F (240-310 GFLOP/s
//!   on 2 AMD Zen 5 cores for the benchmark's shapes) or AVX2 + FMA;
//! - a system BLAS loaded at run time (`cblas_sgemm`): OpenBLAS (Debian/Ubuntu
//!   `libopenblas0-pthread`; 155-230 GFLOP/s on the same cores, where it runs its AVX2
//!   kernels) or Intel MKL (`libmkl_rt`);
//! - the `gemm` crate that candle uses (always there; 55-115 GFLOP/s on the same cores).
//!
//! `LORAFLEET_BLAS` picks: unset = the built-in kernels on the best instruction set the
//! CPU has (AVX-512F, else AVX2 + FMA), else the first of `libopenblas.so.0`,
//! `libopenblas.so`, `libmkl_rt.so.2`, `libmkl_rt.so` the loader finds, else the `gemm`
//! crate; `avx512` or `avx2` = the built-in kernels on that instruction set (on a CPU
//! without it: a warning, then as unset); `system` = the library search only; `off` =
//! the `gemm` crate; anything else = the path of a library exporting `cblas_sgemm`.
//! Nothing is linked at build time, so a binary runs (more slowly) on machines without a
//! BLAS.

use std::ffi::c_int;
use std::sync::OnceLock;

use tracing::{info, warn};

use crate::kernels::Isa;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type CblasSgemm = unsafe extern "C" fn(
    layout: c_int,
    transa: c_int,
    transb: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

/// A loaded BLAS library.
pub struct Blas {
    // Keeps the library mapped for as long as `sgemm` may be called.
    _lib: libloading::Library,
    sgemm: CblasSgemm,
    /// What was loaded (file name or path).
    pub name: String,
}

const CANDIDATES: &[&str] = &["libopenblas.so.0", "libopenblas.so", "libmkl_rt.so.2", "libmkl_rt.so"];

impl Blas {
    /// Load `name` (a file name the dynamic loader resolves, or a path).
    pub fn load(name: &str) -> Result<Self, String> {
        // SAFETY: loading a shared library runs its initialisers; the candidates are
        // BLAS libraries, and an explicit path is the user's choice.
        let lib = unsafe { libloading::Library::new(name) }.map_err(|e| format!("{name}: {e}"))?;
        // SAFETY: `cblas_sgemm` has this signature in every CBLAS.
        let sgemm: CblasSgemm = unsafe { *lib.get::<CblasSgemm>(b"cblas_sgemm\0").map_err(|e| format!("{name}: no cblas_sgemm: {e}"))? };
        let threads = candle_core::utils::get_num_threads() as c_int;
        // OpenBLAS and MKL size their own thread pools; match candle's.
        for sym in [&b"openblas_set_num_threads\0"[..], &b"MKL_Set_Num_Threads\0"[..]] {
            // SAFETY: both take one int and return nothing.
            if let Ok(f) = unsafe { lib.get::<unsafe extern "C" fn(c_int)>(sym) } {
                unsafe { f(threads) };
            }
        }
        Ok(Self { _lib: lib, sgemm, name: name.to_string() })
    }

    /// `dst[m, n] = lhs[m, k] · rhs (+ dst if accumulate)`, row-major, where `rhs` is
    /// `[k, n]` (`rhs_t == false`) or the transpose of a `[n, k]` matrix (`rhs_t`).
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(&self, m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: &[f32], rhs: &[f32], rhs_t: bool) {
        assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
        let int = |v: usize| c_int::try_from(v).expect("matrix dimension fits a C int");
        let (transb, ldb) = if rhs_t { (TRANS, int(k)) } else { (NO_TRANS, int(n)) };
        // SAFETY: the assert bounds every element the strides reach.
        unsafe {
            (self.sgemm)(
                ROW_MAJOR,
                NO_TRANS,
                transb,
                int(m),
                int(n),
                int(k),
                1.0,
                lhs.as_ptr(),
                int(k),
                rhs.as_ptr(),
                ldb,
                if accumulate { 1.0 } else { 0.0 },
                dst.as_mut_ptr(),
                int(n),
            )
        }
    }
}

/// Call first thing in `main`, before any other thread exists: sets
/// `OPENBLAS_THREAD_TIMEOUT=4` unless the user set it (OpenBLAS reads it when the library
/// is loaded; its default keeps idle BLAS threads spinning for ~0.1 s after every call,
/// which on a 2-core machine takes a core away from the element-wise ops in between:
/// 480-540 -> 630-680 tokens/s in `lorafleet bench train`) and `RAYON_NUM_THREADS` to
/// candle's own thread count (see below), then loads the BLAS.
pub fn init_early() {
    keep_freed_memory();
    if std::env::var_os("OPENBLAS_THREAD_TIMEOUT").is_none() {
        // Single-threaded here (see above), so no other thread reads the environment.
        std::env::set_var("OPENBLAS_THREAD_TIMEOUT", "4");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // candle asks for its thread count before every parallel op, and without this
        // variable each answer parses /proc/cpuinfo (num_cpus::get_physical): tens of
        // thousands of reads in a short run, ~10% of decoding. The same count, once.
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    if !matches!(backend(), Backend::GemmCrate) && std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // candle's worker threads spin 25,000 times before parking between ops; with
        // the BLAS threads needing the same cores that spinning costs another ~10%.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
}

/// Makes glibc's malloc keep freed memory for reuse. A training step allocates and frees
/// hundreds of activation buffers of 0.5-30 MiB; by default glibc maps each large one
/// with `mmap` and unmaps it on free, so every step pays for fresh zeroed pages, page
/// faults and TLB shoot-downs across threads (~25% of a step in `perf`). With the mmap
/// and trim thresholds raised, freed buffers go back to the heap and are reused; peak RSS
/// does not grow, since the same high-water mark is reached either way (`lorafleet bench
/// train`: 636 -> 840-860 tokens/s, 537 -> 540 MiB). A `MALLOC_MMAP_THRESHOLD_` or
/// `MALLOC_TRIM_THRESHOLD_` set by the user wins.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const LIMIT: libc::c_int = 1 << 30;
        if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
            // SAFETY: mallopt only changes allocator parameters.
            unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, LIMIT) };
        }
        if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
            // SAFETY: as above.
            unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, LIMIT) };
        }
    }
}

/// Where [`sgemm`] runs.
pub enum Backend {
    /// The built-in kernels ([`crate::kernels`]) on this instruction set.
    Kernels(Isa),
    System(Blas),
    GemmCrate,
}

fn search_system() -> Option<Blas> {
    CANDIDATES.iter().find_map(|c| Blas::load(c).ok())
}

/// The system BLAS the library search finds, whichever backend the process uses (loaded
/// once; for benchmarks and tests).
pub fn system_search() -> Option<&'static Blas> {
    static FOUND: OnceLock<Option<Blas>> = OnceLock::new();
    FOUND.get_or_init(search_system).as_ref()
}

/// The process-wide backend (see the module docs), chosen on first use.
pub fn backend() -> &'static Backend {
    static BACKEND: OnceLock<Backend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let choice = std::env::var("LORAFLEET_BLAS").unwrap_or_default();
        let b = match choice.as_str() {
            "off" | "none" | "0" | "gemm" => Backend::GemmCrate,
            "system" => search_system().map(Backend::System).unwrap_or(Backend::GemmCrate),
            "" | "avx512" | "avx2" => {
                let asked = Isa::ALL.into_iter().find(|i| i.name() == choice);
                match asked.filter(|i| i.supported()).or_else(Isa::detect) {
                    Some(isa) => {
                        if asked.is_some_and(|a| a != isa) {
                            warn!(fallback = isa.name(), "LORAFLEET_BLAS={choice} but this CPU does not have it");
                        }
                        Backend::Kernels(isa)
                    }
                    None => {
                        if !choice.is_empty() {
                            warn!("LORAFLEET_BLAS={choice} but this CPU does not have it; looking for a system BLAS");
                        }
                        search_system().map(Backend::System).unwrap_or(Backend::GemmCrate)
                    }
                }
            }
            path => match Blas::load(path) {
                Ok(b) => Backend::System(b),
                Err(e) => {
                    warn!(error = %e, "LORAFLEET_BLAS could not be loaded; matrix products use the gemm crate");
                    Backend::GemmCrate
                }
            },
        };
        match &b {
            Backend::GemmCrate if choice.is_empty() => {
                info!("neither AVX-512 nor AVX2 and no system BLAS (install libopenblas0-pthread for faster training); matrix products use the gemm crate")
            }
            other => info!(backend = %name_of(other), "matrix product backend"),
        }
        b
    })
}

fn name_of(b: &Backend) -> String {
    match b {
        Backend::Kernels(isa) => format!("{} (built-in)", isa.name()),
        Backend::System(l) => l.name.clone(),
        Backend::GemmCrate => "gemm crate".to_string(),
    }
}

/// The instruction set of the built-in kernels, when they are the backend (the fused
/// LoRA and attention ops run on them).
pub fn kernel_isa() -> Option<Isa> {
    match backend() {
        Backend::Kernels(isa) => Some(*isa),
        _ => None,
    }
}

/// The loaded system BLAS, when that is the backend.
pub fn system() -> Option<&'static Blas> {
    match backend() {
        Backend::System(b) => Some(b),
        _ => None,
    }
}

/// Which backend [`sgemm`] uses: `avx512 (built-in)`, `avx2 (built-in)`, the BLAS
/// library's name, or
/// `gemm crate`.
pub fn backend_name() -> String {
    name_of(backend())
}

/// `dst[m, n] = lhs[m, k] · rhs (+ dst)` with the process-wide [`backend`]. `rhs` as in
/// [`Blas::sgemm`].
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: &[f32], rhs: &[f32], rhs_t: bool) {
    match backend() {
        Backend::Kernels(isa) => crate::kernels::sgemm(*isa, m, n, k, dst, accumulate, lhs, rhs, rhs_t),
        Backend::System(b) => b.sgemm(m, n, k, dst, accumulate, lhs, rhs, rhs_t),
        Backend::GemmCrate => sgemm_portable(m, n, k, dst, accumulate, lhs, rhs, rhs_t),
    }
}

/// The `gemm` crate backend (what candle's own matmul uses).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_portable(m: usize, n: usize, k: usize, dst: &mut [f32], accumulate: bool, lhs: &[f32], rhs: &[f32], rhs_t: bool) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    // rhs element (kk, nn): `rhs[kk * n + nn]`, or `rhs[nn * k + kk]` when transposed.
    let (rhs_rs, rhs_cs) = if rhs_t { (1isize, k as isize) } else { (n as isize, 1isize) };
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the assert above bounds every index the strides reach.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `lhs · rhs` in f64 (`rhs` `[k, n]`, or the transpose of `[n, k]` when `rhs_t`).
    pub(crate) fn reference(m: usize, n: usize, k: usize, lhs: &[f32], rhs: &[f32], rhs_t: bool) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    let r = if rhs_t { rhs[j * k + kk] } else { rhs[kk * n + j] };
                    s += lhs[i * k + kk] as f64 * r as f64;
                }
                out[i * n + j] = s;
            }
        }
        out
    }

    fn check(f: impl Fn(usize, usize, usize, &mut [f32], bool, &[f32], &[f32], bool), what: &str) {
        // Odd sizes, both layouts, with and without accumulation.
        for &(m, n, k) in &[(1, 1, 1), (7, 13, 5), (33, 65, 129), (64, 96, 64)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            for rhs_t in [false, true] {
                for accumulate in [false, true] {
                    let mut dst: Vec<f32> = (0..m * n).map(|i| i as f32 * 0.01).collect();
                    let before = dst.clone();
                    f(m, n, k, &mut dst, accumulate, &lhs, &rhs, rhs_t);
                    let want = reference(m, n, k, &lhs, &rhs, rhs_t);
                    for i in 0..m * n {
                        let w = want[i] + if accumulate { before[i] as f64 } else { 0.0 };
                        assert!((dst[i] as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{what} {m}x{n}x{k} t={rhs_t} acc={accumulate} [{i}]: {} vs {w}", dst[i]);
                    }
                }
            }
        }
    }

    #[test]
    fn portable_backend_is_right() {
        check(sgemm_portable, "gemm crate");
    }

    #[test]
    fn system_backend_is_right_when_present() {
        // The BLAS path is checked wherever one is installed (scripts/test.sh installs
        // OpenBLAS when it can), whichever backend the process would pick.
        match search_system() {
            Some(b) => check(|m, n, k, d, a, l, r, t| b.sgemm(m, n, k, d, a, l, r, t), &b.name),
            None => {
                // scripts/test.sh sets this when it found or installed OpenBLAS.
                assert!(std::env::var_os("LORAFLEET_REQUIRE_BLAS").is_none(), "LORAFLEET_REQUIRE_BLAS is set but no BLAS loaded");
                eprintln!("no system BLAS on this machine: only the gemm crate was checked");
            }
        }
    }

    #[test]
    fn chosen_backend_is_right() {
        check(sgemm, &backend_name());
    }

    #[test]
    fn a_missing_library_is_a_clear_error() {
        let e = Blas::load("/nonexistent/libnoblas.so").err().unwrap();
        assert!(e.contains("/nonexistent/libnoblas.so"), "{e}");
    }
}
