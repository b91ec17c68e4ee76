//! The encoder's linear layers, `x·W + b (+ residual)`, with W packed once
//! at load time into panels of 32 output columns.
//!
//! Why not the `gemm` crate here (it still runs attention): the encoder's
//! weights (42 MB in f32) do not fit this machine's 32 MB L3, so a forward
//! pass streams them from memory, and gemm's widest AVX-512 tile covers 6
//! token rows: a single 11-token input read every weight twice, and 93% of
//! its time was in gemm's two microkernels (perf, one thread). The tile
//! here covers 12 rows with 24 of AVX-512's 32 registers, so up to 12
//! tokens read each weight once, and larger batches re-read a panel from
//! L2, not from memory. ONNX Runtime's MLAS does the same (prepacked
//! weights, 12-row kernels). Each tile starts from the bias (plus the
//! residual) and writes its output once, so neither costs a pass of its
//! own. Figures in docs/benchmarks-backend.md.

use std::sync::Arc;

use rayon::prelude::*;

/// Output columns per panel: two AVX-512 vectors.
const PANEL: usize = 32;
/// Token rows per tile: 12 rows × 2 vectors are 24 accumulators.
const TILE_ROWS: usize = 12;
/// Bytes of input rows one task works through, which every panel re-reads:
/// they should stay in L2 (1 MB per core on the Zen 4 measured) next to the
/// panel. Within that, the fewer tasks the better, since each task reads
/// the weights of its panels from L3 or memory once more: one long input
/// (115 tokens) in one task per panel group took 13.7-15.8 ms against
/// 16.3-17.3 ms in 96-row tasks, and a 120-row budget on a 1536-wide input
/// (737 KB) made a 16-input batch 20% slower.
const CHUNK_BYTES: usize = 512 * 1024;
/// f32s per 64-byte cache line: panels start on a line.
const LINE: usize = 16;

/// The encoder's panels live together in one buffer on 2 MiB pages
/// ([`Linear::share_huge_pages`]). A lone short input streams all 42 MB of
/// weights, otherwise through about ten thousand 4 KiB pages, with as many
/// TLB misses per forward pass. `model_path --only 1short` (1000 inputs a
/// run, six runs alternating with the build before): 1.64-1.93 ms (median
/// of the medians 1.67) against 1.70-2.26 ms (2.01), faster in five of the
/// six pairs; RSS 127 MB against 113. Advising only each layer's whole huge
/// pages did not help, and one buffer per layer, each rounded up to whole
/// pages, cost 31 MB of RSS. Long inputs and batches of 32, which reuse
/// each panel from cache, showed no difference.
const HUGE_PAGE: usize = 2 << 20;

/// A linear layer of (inputs, outputs). W is stored panel by panel: panel
/// p holds, for each input k, the 32 weights W[k, 32p..32p+32] side by
/// side, zero past `outputs`.
pub struct Linear {
    /// The panels, alone or shared with the other layers.
    storage: Arc<Vec<f32>>,
    /// Where the first panel starts in `storage`, on a cache line.
    start: usize,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

impl Linear {
    /// Packs `weight_t`, (inputs, outputs) row-major.
    pub fn new(weight_t: &[f32], bias: Vec<f32>, inputs: usize, outputs: usize) -> Self {
        assert_eq!(weight_t.len(), inputs * outputs, "weight shape");
        assert_eq!(bias.len(), outputs, "bias shape");
        let panel_len = inputs * PANEL;
        let len = outputs.div_ceil(PANEL) * panel_len;
        let mut storage = vec![0f32; len + LINE];
        let start = storage.as_ptr().align_offset(LINE * 4).min(LINE);
        for (p, panel) in storage[start..][..len]
            .chunks_exact_mut(panel_len)
            .enumerate()
        {
            let first = p * PANEL;
            let cols = (outputs - first).min(PANEL);
            for (k, row) in panel.chunks_exact_mut(PANEL).enumerate() {
                row[..cols].copy_from_slice(&weight_t[k * outputs + first..][..cols]);
            }
        }
        Linear {
            storage: Arc::new(storage),
            start,
            bias,
            inputs,
            outputs,
        }
    }

    /// Moves the panels of `layers` into one buffer on huge pages (see
    /// [`HUGE_PAGE`]), each layer's starting on a cache line. One buffer
    /// leaves at most one huge page partly used, where one per layer
    /// leaves one per layer. Each layer's own buffer is freed after the
    /// copy; the allocator keeps some of that memory (RSS was 14 MB over
    /// the 4 KiB layout, not measured further), and loading briefly holds
    /// both copies.
    pub fn share_huge_pages<'a>(layers: impl IntoIterator<Item = &'a mut Linear>) {
        let mut layers: Vec<&mut Linear> = layers.into_iter().collect();
        if layers.is_empty() {
            return;
        }
        let len = |l: &Linear| l.panels() * l.inputs * PANEL;
        let total = layers.iter().map(|l| len(l).next_multiple_of(LINE)).sum();
        let (mut shared, mut at) = huge_page_buffer(total);
        let mut starts = Vec::with_capacity(layers.len());
        for layer in &layers {
            let n = len(layer);
            shared[at..][..n].copy_from_slice(&layer.storage[layer.start..][..n]);
            starts.push(at);
            at += n.next_multiple_of(LINE);
        }
        let shared = Arc::new(shared);
        for (layer, start) in layers.iter_mut().zip(starts) {
            layer.storage = shared.clone();
            layer.start = start;
        }
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    fn panels(&self) -> usize {
        self.outputs.div_ceil(PANEL)
    }

    fn panel(&self, p: usize) -> &[f32] {
        let len = self.inputs * PANEL;
        &self.storage[self.start + p * len..][..len]
    }

    /// out = x·W + b (+ `residual`), for x of (rows, inputs) and a residual
    /// of (rows, outputs), both row-major; `out`'s old contents go, its
    /// allocation is reused. Spread over the calling rayon pool: by rows
    /// for a large batch, by panels for a small one, so two threads share
    /// even a one-token product.
    pub fn forward(&self, x: &[f32], residual: Option<&[f32]>, out: &mut Vec<f32>) {
        self.forward_with(Kernel::selected(), x, residual, out)
    }

    fn forward_with(
        &self,
        kernel: Kernel,
        x: &[f32],
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
    ) {
        let rows = x.len() / self.inputs;
        assert_eq!(x.len(), rows * self.inputs, "input shape");
        if let Some(residual) = residual {
            assert_eq!(residual.len(), rows * self.outputs, "residual shape");
        }
        out.clear();
        if rows == 0 {
            return;
        }
        out.reserve(rows * self.outputs);
        let max_rows = (CHUNK_BYTES / (4 * self.inputs) / TILE_ROWS).max(1) * TILE_ROWS;
        let chunks = rows.div_ceil(max_rows);
        // Chunks of nearly equal size, whole tiles but the last.
        let chunk_rows = rows.div_ceil(chunks).div_ceil(TILE_ROWS) * TILE_ROWS;
        // Enough tasks that the last ones to finish leave the other
        // threads idle only briefly (2 per thread left 11 tasks of a large
        // batch for 2 threads, and cost it 5%).
        let wanted = 8 * rayon::current_num_threads();
        let groups = wanted.div_ceil(chunks).clamp(1, self.panels());
        let per_group = self.panels().div_ceil(groups);
        let dst = SharedOut(out.as_mut_ptr());
        (0..chunks * groups).into_par_iter().for_each(|task| {
            let (chunk, group) = (task / groups, task % groups);
            let first_row = chunk * chunk_rows;
            let rows = (rows - first_row).min(chunk_rows);
            let panels = group * per_group..((group + 1) * per_group).min(self.panels());
            let block = Block {
                x: &x[first_row * self.inputs..][..rows * self.inputs],
                residual: residual.map(|r| &r[first_row * self.outputs..][..rows * self.outputs]),
                rows,
                out: dst.at(first_row * self.outputs),
            };
            // SAFETY: the task writes rows first_row..first_row+rows of
            // `out`, columns of its own panels only; no two tasks share a
            // (chunk, panel) pair, and `out` has capacity for every row.
            unsafe { self.block(kernel, &block, panels) };
        });
        // SAFETY: the (chunk, panel) pairs cover every row and column, and
        // every tile writes each of its elements.
        unsafe { out.set_len(rows * self.outputs) };
    }

    /// One task: a chunk of rows against some panels.
    ///
    /// # Safety
    /// `block.out` must point at `block.rows` rows of `outputs` f32s that
    /// nobody else writes in the panels' columns meanwhile.
    unsafe fn block(&self, kernel: Kernel, block: &Block, panels: std::ops::Range<usize>) {
        for p in panels {
            let cols = (self.outputs - p * PANEL).min(PANEL);
            let first_col = p * PANEL;
            for first in (0..block.rows).step_by(TILE_ROWS) {
                let tile = Tile {
                    depth: self.inputs,
                    x: block.x[first * self.inputs..].as_ptr(),
                    x_stride: self.inputs,
                    weights: self.panel(p).as_ptr(),
                    bias: self.bias[first_col..].as_ptr(),
                    residual: block
                        .residual
                        .map(|r| r[first * self.outputs + first_col..].as_ptr()),
                    out: block.out.wrapping_add(first * self.outputs + first_col),
                    stride: self.outputs,
                    cols,
                };
                // SAFETY: x holds rows first..first+n, `weights` a whole
                // panel, bias and residual the tile's columns, and `out`
                // those rows, per the caller.
                unsafe { tile.run(kernel, (block.rows - first).min(TILE_ROWS)) };
            }
        }
    }
}

/// One task's rows.
struct Block<'a> {
    x: &'a [f32],
    residual: Option<&'a [f32]>,
    rows: usize,
    out: *mut f32,
}

/// An output buffer written by many rayon tasks at once, each to its own
/// elements (here, and by attention's heads in `bert`).
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: every user has its tasks write disjoint elements.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// One tile: up to 12 rows of x against one panel, written to out as
/// bias (+ residual) + x·W.
#[derive(Clone, Copy)]
struct Tile {
    depth: usize,
    x: *const f32,
    x_stride: usize,
    /// `depth` rows of PANEL weights.
    weights: *const f32,
    /// The panel's `cols` biases.
    bias: *const f32,
    /// The tile's rows of the residual, `stride` apart, if there is one.
    residual: Option<*const f32>,
    out: *mut f32,
    /// Between rows of the residual and of out.
    stride: usize,
    /// Output columns that exist, at most PANEL.
    cols: usize,
}

impl Tile {
    /// Row r's starting values: bias, plus the residual's row r.
    ///
    /// # Safety
    /// The tile's bias and residual pointers are valid for `cols` values.
    unsafe fn start(&self, r: usize) -> [f32; PANEL] {
        let mut row = [0f32; PANEL];
        // SAFETY: the caller's contract.
        let bias = unsafe { std::slice::from_raw_parts(self.bias, self.cols) };
        row[..self.cols].copy_from_slice(bias);
        if let Some(residual) = self.residual {
            // SAFETY: the caller's contract.
            let residual =
                unsafe { std::slice::from_raw_parts(residual.add(r * self.stride), self.cols) };
            row.iter_mut().zip(residual).for_each(|(v, r)| *v += r);
        }
        row
    }

    /// # Safety
    /// Row r of out has `cols` writable elements.
    unsafe fn finish(&self, r: usize, row: &[f32; PANEL]) {
        // SAFETY: the caller's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(row.as_ptr(), self.out.add(r * self.stride), self.cols)
        };
    }
}

macro_rules! by_rows {
    ($rows:expr, $f:ident, $($arg:expr),*) => {
        match $rows {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            _ => $f::<12>($($arg),*),
        }
    };
}

/// The tile kernels, slowest first. `SWITCHYARD_MATMUL_KERNEL` (avx512, avx2
/// or portable) caps the choice, to measure or test a slower one on a CPU
/// that has a faster one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// What `SWITCHYARD_MATMUL_KERNEL` may name, slowest first.
const CAP_NAMES: [&str; 3] = ["portable", "avx2", "avx512"];

impl Kernel {
    /// The one this process uses, chosen once: the fastest this CPU runs,
    /// capped by `SWITCHYARD_MATMUL_KERNEL`. The server checks the variable
    /// at startup ([`Kernel::configured`]), so an unknown name stops it
    /// there rather than falling back here.
    pub fn selected() -> Kernel {
        static SELECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| Kernel::configured().unwrap_or_else(|_| Kernel::fastest(None)))
    }

    /// The kernel `SWITCHYARD_MATMUL_KERNEL` asks for, or an error naming
    /// the variable and the names it accepts.
    pub fn configured() -> Result<Kernel, String> {
        let Some(cap) = std::env::var_os("SWITCHYARD_MATMUL_KERNEL") else {
            return Ok(Kernel::fastest(None));
        };
        let cap = cap.to_string_lossy();
        match CAP_NAMES.iter().position(|n| *n == cap) {
            Some(rank) => Ok(Kernel::fastest(Some(rank))),
            None => Err(format!(
                "SWITCHYARD_MATMUL_KERNEL={cap:?}: expected one of {}",
                CAP_NAMES.join(", ")
            )),
        }
    }

    /// The fastest supported kernel whose rank in [`CAP_NAMES`] is at most
    /// `cap` (a CPU without AVX-512 asked for it gets AVX2).
    fn fastest(cap: Option<usize>) -> Kernel {
        Kernel::supported()
            .into_iter()
            .filter(|k| cap.is_none_or(|cap| CAP_NAMES[..=cap].contains(&k.name())))
            .max()
            .unwrap_or(Kernel::Portable)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => "avx512",
        }
    }

    /// Those this CPU can run.
    pub fn supported() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
        }
        kernels
    }
}

impl Tile {
    /// # Safety
    /// `kernel` among `Kernel::supported()`; `rows` rows (1..=12) of x, of
    /// the residual if any, and of out, `depth` panel rows and `cols`
    /// biases, all readable (and out writable) at the strides given.
    unsafe fn run(&self, kernel: Kernel, rows: usize) {
        match kernel {
            // SAFETY: the caller's contract.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { by_rows!(rows, avx512_tile, self) },
            // AVX2 has 16 registers: three rows × four vectors at a time.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                for first in (0..rows).step_by(3) {
                    let part = self.rows_after(first);
                    // SAFETY: rows first.. of this tile, as above.
                    unsafe {
                        match rows - first {
                            1 => avx2::tile::<1>(&part),
                            2 => avx2::tile::<2>(&part),
                            _ => avx2::tile::<3>(&part),
                        }
                    }
                }
            }
            // SAFETY: the caller's contract.
            Kernel::Portable => unsafe { by_rows!(rows, portable_tile, self) },
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn rows_after(&self, row: usize) -> Tile {
        Tile {
            x: self.x.wrapping_add(row * self.x_stride),
            residual: self.residual.map(|r| r.wrapping_add(row * self.stride)),
            out: self.out.wrapping_add(row * self.stride),
            ..*self
        }
    }
}

/// Plain Rust, for CPUs with neither kernel below.
///
/// # Safety
/// `Tile::run`'s contract with R rows.
unsafe fn portable_tile<const R: usize>(tile: &Tile) {
    // SAFETY: the caller's contract, for rows 0..R.
    let mut acc: [[f32; PANEL]; R] = std::array::from_fn(|r| unsafe { tile.start(r) });
    for k in 0..tile.depth {
        // SAFETY: panel row k and element k of each x row exist.
        let w: &[f32; PANEL] = unsafe { &*tile.weights.add(k * PANEL).cast() };
        for (r, acc) in acc.iter_mut().enumerate() {
            let b = unsafe { *tile.x.add(r * tile.x_stride + k) };
            acc.iter_mut().zip(w).for_each(|(a, w)| *a += b * w);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { tile.finish(r, acc) };
    }
}

#[cfg(target_arch = "x86_64")]
unsafe fn avx512_tile<const R: usize>(tile: &Tile) {
    // SAFETY: the caller checked AVX-512F.
    unsafe { avx512::tile::<R>(tile) }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Tile, PANEL};

    /// R rows × 32 columns: 2R accumulators, two weight vectors per step
    /// of k, one broadcast per row.
    ///
    /// # Safety
    /// AVX-512F, and `Tile::run`'s contract with R rows.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const R: usize>(tile: &Tile) {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (r, acc) in acc.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            let start = unsafe { tile.start(r) };
            for (half, acc) in acc.iter_mut().enumerate() {
                // SAFETY: `start` holds PANEL f32s.
                *acc = unsafe { _mm512_loadu_ps(start.as_ptr().add(16 * half)) };
            }
        }
        for k in 0..tile.depth {
            // SAFETY: panel row k holds PANEL f32s.
            let w = unsafe {
                let row = tile.weights.add(k * PANEL);
                [_mm512_loadu_ps(row), _mm512_loadu_ps(row.add(16))]
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: x row r holds `depth` f32s.
                let b = _mm512_set1_ps(unsafe { *tile.x.add(r * tile.x_stride + k) });
                acc[0] = _mm512_fmadd_ps(b, w[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(b, w[1], acc[1]);
            }
        }
        let masks = [
            lane_mask(tile.cols),
            lane_mask(tile.cols.saturating_sub(16)),
        ];
        for (r, acc) in acc.iter().enumerate() {
            let out = tile.out.wrapping_add(r * tile.stride);
            for (half, acc) in acc.iter().enumerate() {
                // SAFETY: the masked lanes lie within row r's `cols`.
                unsafe { _mm512_mask_storeu_ps(out.add(16 * half), masks[half], *acc) };
            }
        }
    }

    fn lane_mask(cols: usize) -> __mmask16 {
        if cols >= 16 {
            0xffff
        } else {
            (1u16 << cols) - 1
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, PANEL};

    /// R (at most 3) rows × 32 columns: 4R accumulators, one weight vector
    /// at a time. Rows start and finish through a buffer, since AVX2's
    /// masked moves work on whole 8-lane vectors only.
    ///
    /// # Safety
    /// AVX2 and FMA, and `Tile::run`'s contract with R rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const R: usize>(tile: &Tile) {
        // SAFETY: the caller's contract, for rows 0..R.
        let mut rows: [[f32; PANEL]; R] = std::array::from_fn(|r| unsafe { tile.start(r) });
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        for (acc, row) in acc.iter_mut().zip(&rows) {
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row holds PANEL f32s.
                *acc = unsafe { _mm256_loadu_ps(row.as_ptr().add(8 * v)) };
            }
        }
        for k in 0..tile.depth {
            // SAFETY: x row r holds `depth` f32s.
            let b: [__m256; R] = std::array::from_fn(|r| {
                _mm256_set1_ps(unsafe { *tile.x.add(r * tile.x_stride + k) })
            });
            for v in 0..4 {
                // SAFETY: panel row k holds PANEL f32s.
                let w = unsafe { _mm256_loadu_ps(tile.weights.add(k * PANEL + 8 * v)) };
                for (acc, b) in acc.iter_mut().zip(&b) {
                    acc[v] = _mm256_fmadd_ps(*b, w, acc[v]);
                }
            }
        }
        for (r, (acc, row)) in acc.iter().zip(rows.iter_mut()).enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                // SAFETY: row holds PANEL f32s.
                unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(8 * v), *acc) };
            }
            // SAFETY: the caller's contract.
            unsafe { tile.finish(r, row) };
        }
    }
}

/// `len` zeroed f32s from a huge-page boundary on, as (the buffer, the
/// offset of the first). The buffer is `len` rounded up to whole huge
/// pages, plus one, so the boundary and the rounded range after it lie
/// inside it. The zeroed pages stay untouched until the panels are
/// copied in, so the advice comes before the first fault, while it can
/// still take effect. It is best effort: a kernel without THP, or with it
/// off, leaves 4 KiB pages and the same answers.
fn huge_page_buffer(len: usize) -> (Vec<f32>, usize) {
    let bytes = (len * 4).next_multiple_of(HUGE_PAGE);
    #[cfg_attr(not(target_os = "linux"), allow(unused_mut))]
    let mut buffer = vec![0f32; (bytes + HUGE_PAGE) / 4];
    let start = buffer.as_ptr().align_offset(HUGE_PAGE);
    debug_assert!(start < HUGE_PAGE / 4, "an f32 buffer aligns within a page");
    #[cfg(target_os = "linux")]
    // SAFETY: the range lies inside the buffer: it starts under HUGE_PAGE
    // bytes in and is `bytes` long, of `bytes + HUGE_PAGE`. madvise
    // changes only how the range is paged, not its contents.
    unsafe {
        let first = buffer.as_mut_ptr().add(start);
        if libc::madvise(first.cast(), bytes, libc::MADV_HUGEPAGE) != 0 {
            let error = std::io::Error::last_os_error();
            tracing::debug!(%error, "madvise(MADV_HUGEPAGE) refused; weights stay on 4 KiB pages");
        }
    }
    (buffer, start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w_t: &[f32], out: &mut [f32], inputs: usize, outputs: usize) {
        for (xr, or) in x.chunks(inputs).zip(out.chunks_mut(outputs)) {
            for (o, acc) in or.iter_mut().enumerate() {
                *acc += (0..inputs)
                    .map(|k| xr[k] * w_t[k * outputs + o])
                    .sum::<f32>();
            }
        }
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn a_cap_selects_the_fastest_kernel_at_or_below_it() {
        let best = *Kernel::supported().iter().max().unwrap();
        assert_eq!(Kernel::fastest(None), best);
        assert_eq!(Kernel::fastest(Some(0)), Kernel::Portable);
        assert_eq!(Kernel::fastest(Some(CAP_NAMES.len() - 1)), best);
        #[cfg(target_arch = "x86_64")]
        if best == Kernel::Avx512 {
            assert_eq!(Kernel::fastest(Some(1)), Kernel::Avx2);
        }
    }

    /// Every kernel this CPU can run, not only the one selected; every row
    /// count a tile can end on, and batches larger than a task; output
    /// widths that leave a partial panel and a partial vector; inputs wide
    /// enough to split 341 rows into several chunks; with and without a
    /// residual; each layer alone, then all of them in one shared buffer.
    #[test]
    fn matches_a_naive_product_for_every_kernel_and_shape() {
        let shapes = [(7, 5), (33, 40), (64, 96), (20, 17), (1536, 40)];
        let mut layers: Vec<(Linear, Vec<f32>)> = (shapes.iter())
            .map(|&(inputs, outputs)| {
                let w_t = values(inputs * outputs, 1);
                (Linear::new(&w_t, values(outputs, 2), inputs, outputs), w_t)
            })
            .collect();
        layers
            .iter()
            .for_each(|(linear, w_t)| matches_naive(linear, w_t));
        let before: Vec<*const f32> = layers.iter().map(|(l, _)| l.panel(0).as_ptr()).collect();
        Linear::share_huge_pages(layers.iter_mut().map(|(l, _)| l));
        let first = layers[0].0.panel(0).as_ptr() as usize;
        assert_eq!(
            first % HUGE_PAGE,
            0,
            "the shared buffer starts on a huge page"
        );
        for ((linear, w_t), old) in layers.iter().zip(before) {
            assert_ne!(
                linear.panel(0).as_ptr(),
                old,
                "moved into the shared buffer"
            );
            assert_eq!(linear.panel(0).as_ptr() as usize % 64, 0, "on a cache line");
            assert!(Arc::ptr_eq(&linear.storage, &layers[0].0.storage));
            matches_naive(linear, w_t);
        }
    }

    fn matches_naive(linear: &Linear, w_t: &[f32]) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let (inputs, outputs, bias) = (linear.inputs, linear.outputs, &linear.bias);
        for rows in (1..=25).chain([341, 1000]) {
            let x = values(rows * inputs, 3);
            let residual = values(rows * outputs, 4);
            let biases = bias.iter().cycle().take(rows * outputs);
            for with_residual in [false, true] {
                let mut want: Vec<f32> = match with_residual {
                    true => biases.clone().zip(&residual).map(|(b, r)| b + r).collect(),
                    false => biases.clone().copied().collect(),
                };
                naive(&x, w_t, &mut want, inputs, outputs);
                let residual = with_residual.then_some(&residual[..]);
                for kernel in Kernel::supported() {
                    let mut got = vec![f32::NAN; 3];
                    pool.install(|| linear.forward_with(kernel, &x, residual, &mut got));
                    assert_eq!(got.len(), want.len());
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() < 1e-4 * (1.0 + w.abs()),
                            "{} kernel, {inputs}x{outputs}, {rows} rows, residual {with_residual}, element {i}: {g} != {w}",
                            kernel.name()
                        );
                    }
                }
            }
        }
    }
}
