//! The products of decode and prefill on the CPU whose input is quantized to Q8_0: q8_0 × q8_0
//! and q5_0 × q8_0 (most of a q4_k model's projections: candle's `QMatMul` has no SIMD body for
//! Q5_0), as llama.cpp and candle's `QMatMul` compute them: the input rows quantized to Q8_0 by
//! candle (`BlockQ8_0::from_float`, the `VecDotType` of both), an exact integer sum per pair of
//! blocks, then `acc += f32(sum) · (d_w · d_x)` block by block.
//!
//! The weight rows are stored in groups of eight (`Q8Group`, llama.cpp's repacked layouts do
//! the same on ARM): for each block, the eight rows' scales, then the block's bytes in eight
//! chunks of four bytes per row, chunk `c` of row `j` at `32c + 4j`, each byte offset by 128.
//! One `vpdpbusd` (AVX-512 VNNI) then multiplies four bytes of an input row, broadcast, with
//! four bytes of each of the eight rows and adds them into eight lanes, one lane per weight
//! row; a block's eight such instructions leave its eight exact sums in one register, and the
//! f32 work (convert, scale, accumulate) is done once per eight outputs, not once per output.
//! The offset makes the weights the unsigned operand: `Σ(w + 128)·x = Σw·x + 128·Σx`, and
//! each sum starts at `−128·Σx`, the input block's own (`Q8Input::start`), exact.
//!
//! Q5_0 weights (`Q5Group`) keep their 5.5 bits per value: a group's block holds the low four
//! bits of its values in chunk pairs and their fifth bits in one 32-byte plane, and each chunk
//! is unpacked in registers to the unsigned `w + 16` (0..=31) in the q8_0 chunk order; its sums
//! start at `−16·Σx` (`start / 8`).
//!
//! Without VNNI the same sums come from AVX2's `maddubs` on `|w|` and `sign(x, w)`, and
//! without AVX2 from a plain loop: exact integers either way, and the same f32 operations in
//! the same order, so the results are the same bits with any instruction set, and a row's
//! results do not depend on the other rows of the product.

use super::matmul::{get_threads, simd, Dst, Simd, SERIAL_BELOW};
use candle_core::{Result, Tensor};

/// One block of candle's `Q8_0` (`k_quants::BlockQ8_0`, the same `repr(C)` layout): 32 values
/// `d · qs[i]`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8 {
    pub d: half::f16,
    pub qs: [i8; 32],
}

const _: () = assert!(
    std::mem::size_of::<BlockQ8>()
        == std::mem::size_of::<candle_core::quantized::k_quants::BlockQ8_0>()
        && std::mem::align_of::<BlockQ8>()
            == std::mem::align_of::<candle_core::quantized::k_quants::BlockQ8_0>()
);

/// `x` (`[m, k]`, `k` a multiple of 32) quantized row by row to Q8_0 by candle
/// (`BlockQ8_0::from_float`, what its `QMatMul` and llama.cpp do to the input of a q8_0 product).
pub(crate) fn quantize_rows(x: &[f32], k: usize) -> Vec<BlockQ8> {
    use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
    let mut q = vec![BlockQ8_0::zeros(); x.len() / 32];
    for (x, q) in x.chunks_exact(k).zip(q.chunks_exact_mut(k / 32)) {
        BlockQ8_0::from_float(x, q);
    }
    // SAFETY: both types are `repr(C)` { f16, [i8; 32] } of one size and alignment (asserted
    // above; `quantized_rows_are_candles_blocks` checks the bytes against candle's own)
    q.iter()
        .map(|b| unsafe { std::ptr::read(b as *const BlockQ8_0 as *const BlockQ8) })
        .collect()
}

/// Values of input rows per parallel piece of `Q8Input::quantize` (a row of 576 or more is a
/// piece of its own: a decode step's eight rows are quantized on both threads).
const QUANTIZE_PIECE: usize = 512;

/// Input rows in Q8_0 as the kernels read them: per row, the bytes (`k`), and per block its
/// scale widened to f32 and `−128 ·` the sum of its bytes (where a VNNI sum starts).
pub(crate) struct Q8Input {
    qs: Vec<i8>,
    d: Vec<f32>,
    start: Vec<i32>,
    m: usize,
    k: usize,
}

/// One input row of a `Q8Input`.
#[derive(Clone, Copy)]
struct XRow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    start: &'a [i32],
}

impl Q8Input {
    /// `x: [m, k]` quantized by candle (`quantize_rows`), pieces of rows in parallel.
    pub(crate) fn quantize(x: &[f32], k: usize) -> Self {
        let kb = k / 32;
        let m = x.len() / k.max(1);
        let per = (QUANTIZE_PIECE / k.max(1)).max(1);
        let mut q = Q8Input {
            qs: vec![0; m * k],
            d: vec![0.0; m * kb],
            start: vec![0; m * kb],
            m,
            k,
        };
        type Piece<'a> = (&'a mut [i8], &'a mut [f32], &'a mut [i32]);
        let pieces: Vec<std::sync::Mutex<Piece>> =
            q.qs.chunks_mut(per * k)
                .zip(q.d.chunks_mut(per * kb))
                .zip(q.start.chunks_mut(per * kb))
                .map(|((qs, d), st)| std::sync::Mutex::new((qs, d, st)))
                .collect();
        let run = |i: usize| {
            let mut p = pieces[i]
                .lock()
                .expect("each piece quantized by one thread");
            let (qs, d, st) = &mut *p;
            let blocks = quantize_rows(&x[i * per * k..][..qs.len()], k);
            for (j, b) in blocks.iter().enumerate() {
                qs[32 * j..][..32].copy_from_slice(&b.qs);
                d[j] = b.d.to_f32();
                st[j] = -128 * b.qs.iter().map(|&q| q as i32).sum::<i32>();
            }
        };
        super::team::par_for(pieces.len(), run);
        drop(pieces);
        q
    }

    /// The rows of an f32 tensor `[m, k]` (on the CPU), quantized.
    pub(crate) fn of(x: &Tensor) -> Result<Self> {
        let (_, k) = x.dims2()?;
        if k % 32 != 0 {
            candle_core::bail!("q8_0 product: rows of {k} values, not a multiple of 32");
        }
        let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
        Ok(Self::quantize(&v, k))
    }

    #[cfg(test)]
    fn from_blocks(blocks: &[BlockQ8], k: usize) -> Self {
        let kb = k / 32;
        Q8Input {
            qs: blocks.iter().flat_map(|b| b.qs).collect(),
            d: blocks.iter().map(|b| b.d.to_f32()).collect(),
            start: blocks
                .iter()
                .map(|b| -128 * b.qs.iter().map(|&q| q as i32).sum::<i32>())
                .collect(),
            m: blocks.len() / kb.max(1),
            k,
        }
    }

    fn row(&self, i: usize) -> XRow<'_> {
        let kb = self.k / 32;
        XRow {
            qs: &self.qs[i * self.k..(i + 1) * self.k],
            d: &self.d[i * kb..(i + 1) * kb],
            start: &self.start[i * kb..(i + 1) * kb],
        }
    }
}

/// Weight rows per group.
const GROUP: usize = 8;

/// Block `b` of eight weight rows: their scales, then their bytes, offset by 128, in chunks of
/// four: byte `4c + t` of row `j` at `qs[32c + 4j + t]`.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Q8Group {
    d: [half::f16; GROUP],
    qs: [u8; 32 * GROUP],
}

/// Block `b` of eight Q5_0 weight rows: their scales; the low four bits of their unsigned
/// values `u = w + 16` in chunk pairs, chunk `2p`'s byte `i` (ordered as in `Q8Group`) in the
/// low half of `lo[32p + i]` and chunk `2p + 1`'s in the high half; and the fifth bits, chunk
/// `c`'s byte `i` as bit `c` of `hi[i]`. 176 bytes, as the eight rows' blocks in candle's Q5_0.
#[derive(Clone, Copy)]
#[repr(C)]
struct Q5Group {
    d: [half::f16; GROUP],
    lo: [u8; 16 * GROUP],
    hi: [u8; 32],
}

/// A block of eight weight rows of one format, as the kernels read it.
trait Group: Copy + Send + Sync {
    /// Row `j`'s value `i` of the block (signed, before its scale).
    fn weight(&self, j: usize, i: usize) -> i32;
    fn scale(&self, j: usize) -> f32;
    /// The products of `R` input rows with the `G` groups `ws` (all of one length) with the
    /// instructions of `level` (detected).
    fn dots<const R: usize, const G: usize>(
        level: Simd,
        xs: &[XRow; R],
        ws: &[&[Self]; G],
    ) -> [[[f32; GROUP]; G]; R];
}

/// `Group` for a block type: its signed values (`$weight`), its scales (`d`), and its kernels.
macro_rules! group {
    ($T:ty, $vnni:ident, $avx2:ident, $weight:expr) => {
        impl Group for $T {
            fn weight(&self, j: usize, i: usize) -> i32 {
                let f: fn(&$T, usize, usize) -> i32 = $weight;
                f(self, j, i)
            }
            fn scale(&self, j: usize) -> f32 {
                self.d[j].to_f32()
            }
            #[inline(always)]
            fn dots<const R: usize, const G: usize>(
                level: Simd,
                xs: &[XRow; R],
                ws: &[&[Self]; G],
            ) -> [[[f32; GROUP]; G]; R] {
                // SAFETY: the level's instructions were detected (the caller's promise); the
                // lengths were checked (`dots_with`)
                #[cfg(target_arch = "x86_64")]
                match level {
                    Simd::Vnni => return unsafe { avx::$vnni(xs, ws) },
                    Simd::Avx2 => return unsafe { avx::$avx2(xs, ws) },
                    Simd::Plain => {}
                }
                dots_plain(xs, ws)
            }
        }
    };
}

group!(Q8Group, dots_vnni, dots_avx2, |g, j, i| {
    (g.qs[32 * (i / 4) + 4 * j + i % 4] ^ 0x80) as i8 as i32
});
group!(Q5Group, dots_vnni_q5, dots_avx2_q5, |g, j, i| {
    let (c, at) = (i / 4, 4 * j + i % 4);
    let lo = g.lo[32 * (c / 2) + at] >> (4 * (c % 2)) & 0x0F;
    let hi = g.hi[at] >> c & 1;
    (lo | hi << 4) as i32 - 16
});

/// A weight's groups, of one format.
enum Groups {
    Q8(Vec<Q8Group>),
    Q5(Vec<Q5Group>),
}

/// A q8_0 or q5_0 weight `[n, k]` in groups of eight rows (the last group padded with zero
/// rows), each group's blocks in order: the weights whose products take a Q8_0 input.
pub struct QRows {
    groups: Groups,
    n: usize,
    k: usize,
}

/// The blocks of eight rows `8g..8g + 8` (rows past `n` padded with `zero`), block by block.
fn grouped<B, T>(
    blocks: &[B],
    (n, k): (usize, usize),
    zero: &B,
    make: impl Fn([&B; GROUP]) -> T,
) -> Vec<T> {
    let kb = k / 32;
    let block = |j: usize, b: usize| if j < n { &blocks[j * kb + b] } else { zero };
    let mut groups = Vec::with_capacity(n.div_ceil(GROUP) * kb);
    for g in 0..n.div_ceil(GROUP) {
        for b in 0..kb {
            groups.push(make(std::array::from_fn(|j| block(GROUP * g + j, b))));
        }
    }
    groups
}

impl QRows {
    /// Whether `from_qtensor` takes a tensor of type `ty` on `dev`.
    pub fn takes(ty: candle_core::quantized::GgmlDType, dev: &candle_core::Device) -> bool {
        use candle_core::quantized::GgmlDType;
        dev.is_cpu() && matches!(ty, GgmlDType::Q8_0 | GgmlDType::Q5_0)
    }

    /// From a quantized tensor of candle's `Q8_0` or `Q5_0` type (`[n, k]`, `k` a multiple of
    /// 32).
    pub fn from_qtensor(q: &candle_core::quantized::QTensor) -> Result<Self> {
        use candle_core::quantized::GgmlDType;
        let (n, k) = q.shape().dims2()?;
        let size = match q.dtype() {
            GgmlDType::Q8_0 => 34,
            GgmlDType::Q5_0 => 22,
            _ => 0,
        };
        if size == 0 || k % 32 != 0 {
            candle_core::bail!("QRows needs a Q8_0 or Q5_0 tensor with rows of a multiple of 32");
        }
        let data = q.data()?;
        if data.len() != n * k / 32 * size {
            candle_core::bail!(
                "{:?} data of {} bytes for [{n}, {k}]",
                q.dtype(),
                data.len()
            );
        }
        let d = |c: &[u8]| half::f16::from_le_bytes([c[0], c[1]]);
        if size == 34 {
            let blocks: Vec<BlockQ8> = data
                .chunks_exact(34)
                .map(|c| BlockQ8 {
                    d: d(c),
                    qs: std::array::from_fn(|i| c[2 + i] as i8),
                })
                .collect();
            return Ok(Self::from_blocks(&blocks, n, k));
        }
        // candle's BlockQ5_0: d, qh (the fifth bits, little-endian), qs (value i's low bits
        // in the low half of qs[i], value i + 16's in the high half)
        let blocks: Vec<BlockQ8> = data
            .chunks_exact(22)
            .map(|c| {
                let qh = u32::from_le_bytes([c[2], c[3], c[4], c[5]]);
                BlockQ8 {
                    d: d(c),
                    qs: std::array::from_fn(|i| {
                        let low = if i < 16 {
                            c[6 + i] & 0x0F
                        } else {
                            c[6 + i - 16] >> 4
                        };
                        ((low | ((qh >> i & 1) as u8) << 4) as i32 - 16) as i8
                    }),
                }
            })
            .collect();
        Ok(Self::from_q5_values(&blocks, n, k))
    }

    /// From the `n · k / 32` blocks of a `[n, k]` weight, row by row.
    fn from_blocks(blocks: &[BlockQ8], n: usize, k: usize) -> Self {
        let zero = BlockQ8 {
            d: half::f16::ZERO,
            qs: [0; 32],
        };
        let groups = grouped(blocks, (n, k), &zero, |rows| Q8Group {
            d: rows.map(|r| r.d),
            qs: std::array::from_fn(|i| {
                let (c, j, t) = (i / 32, i % 32 / 4, i % 4);
                (rows[j].qs[4 * c + t] as u8) ^ 0x80
            }),
        });
        QRows {
            groups: Groups::Q8(groups),
            n,
            k,
        }
    }

    /// From the `n · k / 32` Q5_0 blocks of a `[n, k]` weight, row by row, their values
    /// (`-16..=15`) one per byte.
    fn from_q5_values(blocks: &[BlockQ8], n: usize, k: usize) -> Self {
        let zero = BlockQ8 {
            d: half::f16::ZERO,
            qs: [0; 32],
        };
        let groups = grouped(blocks, (n, k), &zero, |rows| {
            // chunk c's byte 4j + t: row j's value 4c + t, unsigned
            let u = |c: usize, at: usize| (rows[at / 4].qs[4 * c + at % 4] + 16) as u8;
            Q5Group {
                d: rows.map(|r| r.d),
                lo: std::array::from_fn(|i| {
                    let (p, at) = (i / 32, i % 32);
                    (u(2 * p, at) & 0x0F) | (u(2 * p + 1, at) & 0x0F) << 4
                }),
                hi: std::array::from_fn(|at| (0..8).map(|c| (u(c, at) >> 4 & 1) << c).sum()),
            }
        });
        QRows {
            groups: Groups::Q5(groups),
            n,
            k,
        }
    }

    /// Bytes the weight takes (the padding rows of the last group included).
    pub fn bytes(&self) -> usize {
        match &self.groups {
            Groups::Q8(g) => std::mem::size_of_val(g.as_slice()),
            Groups::Q5(g) => std::mem::size_of_val(g.as_slice()),
        }
    }

    /// `x·Wᵀ` for `x: [m, k]` in f32 on the CPU: the rows quantized to Q8_0 as candle's
    /// `QMatMul` quantizes them, then the q8_0 × q8_0 products (each output one sequence of
    /// operations fixed by `k`, whatever the other rows).
    pub fn product(&self, x: &Tensor) -> Result<Tensor> {
        let q = Q8Input::of(&x.contiguous()?)?;
        self.product_of(&q, 0..q.m, x.device())
    }

    /// The products of rows `rows` of an input quantized once (`Q8Input::of`) for all the
    /// weights that read it: `[rows, n]`.
    pub(crate) fn product_of(
        &self,
        x: &Q8Input,
        rows: std::ops::Range<usize>,
        dev: &candle_core::Device,
    ) -> Result<Tensor> {
        Ok(products_of(&[self], x, rows, dev)?.remove(0))
    }

    /// `dst[i·n + j] = dot(x_i, w_j)` with the instructions of `level` (at most `simd()`).
    #[cfg(test)]
    fn product_into(
        &self,
        level: Simd,
        x: &Q8Input,
        rows: std::ops::Range<usize>,
        dst: &mut [f32],
    ) {
        products_into(level, &mut [(self, dst)], x, rows)
    }

    /// Groups `gs` of the product into `out` (`[rows, n]`).
    fn groups_into(
        &self,
        level: Simd,
        x: &Q8Input,
        rows: (usize, usize),
        gs: std::ops::Range<usize>,
        out: Dst,
    ) {
        match &self.groups {
            Groups::Q8(g) => groups_into(g, (self.n, self.k), level, x, rows, gs, out),
            Groups::Q5(g) => groups_into(g, (self.n, self.k), level, x, rows, gs, out),
        }
    }
}

/// Groups `gs` of a weight's `groups` (`[n, k]`) into `out` (`[rows, n]`): each group read once
/// for all the rows, two groups against eight input rows at a time with VNNI (AVX-512's 32
/// registers hold the sixteen sums and accumulators; a decode step of eight reads each weight
/// once), four otherwise.
fn groups_into<T: Group>(
    groups: &[T],
    (n, k): (usize, usize),
    level: Simd,
    x: &Q8Input,
    (first, m): (usize, usize),
    gs: std::ops::Range<usize>,
    out: Dst,
) {
    let kb = k / 32;
    let group = |g: usize| &groups[g * kb..(g + 1) * kb];
    let put = |i: usize, g: usize, v: &[f32; GROUP]| {
        // the padding rows of the last group are left out
        for (j, &v) in v.iter().enumerate().take(n - GROUP * g) {
            // SAFETY: (i, 8g + j) is inside the m × n destination; each group belongs
            // to one block
            unsafe { *out.ptr().add(i * n + GROUP * g + j) = v };
        }
    };
    let mut g = gs.start;
    while g < gs.end {
        let two = g + 2 <= gs.end;
        let mut i = 0;
        while i < m {
            let four = i + 4 <= m;
            macro_rules! go {
                ($r:literal, $g:literal) => {{
                    let xs: [XRow; $r] = std::array::from_fn(|r| x.row(first + i + r));
                    let ws: [&[T]; $g] = std::array::from_fn(|h| group(g + h));
                    let v = dots_with(level, &xs, &ws);
                    for r in 0..$r {
                        for h in 0..$g {
                            put(i + r, g + h, &v[r][h]);
                        }
                    }
                }};
            }
            if i + 8 <= m && level == Simd::Vnni {
                if two {
                    go!(8, 2)
                } else {
                    go!(8, 1)
                }
                i += 8;
                continue;
            }
            match (four, two) {
                (true, true) => go!(4, 2),
                (true, false) => go!(4, 1),
                (false, true) => go!(1, 2),
                (false, false) => go!(1, 1),
            }
            i += if four { 4 } else { 1 };
        }
        g += if two { 2 } else { 1 };
    }
}

/// The products of rows `rows` of one quantized input with several weights (q, k and v; gate
/// and up) in one parallel pass over all their groups: the pool is woken once, not once per
/// weight, and the threads share out the work of all of them. `[rows, n]` each.
pub(crate) fn products_of(
    ws: &[&QRows],
    x: &Q8Input,
    rows: std::ops::Range<usize>,
    dev: &candle_core::Device,
) -> Result<Vec<Tensor>> {
    for w in ws {
        if x.k != w.k || rows.end > x.m {
            candle_core::bail!(
                "q8_0 product: rows {rows:?} of [{}, {}] x [{}, {}]ᵀ",
                x.m,
                x.k,
                w.n,
                w.k
            );
        }
    }
    let m = rows.len();
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.n]).collect();
    let mut pairs: Vec<(&QRows, &mut [f32])> = ws
        .iter()
        .copied()
        .zip(outs.iter_mut().map(|o| o.as_mut_slice()))
        .collect();
    products_into(simd(), &mut pairs, x, rows);
    outs.into_iter()
        .zip(ws)
        .map(|(o, w)| Tensor::from_vec(o, (m, w.n), dev))
        .collect()
}

/// `dst[i·n + j] = dot(x_i, w_j)` for each `(w, dst)`, with the instructions of `level` (at
/// most `simd()`): blocks of groups of all the weights run in parallel.
fn products_into(
    level: Simd,
    ws: &mut [(&QRows, &mut [f32])],
    x: &Q8Input,
    rows: std::ops::Range<usize>,
) {
    assert!(level <= simd(), "{level:?} is not available here");
    let m = rows.len();
    for (w, dst) in ws.iter() {
        assert!(x.k == w.k && rows.end <= x.m && dst.len() == m * w.n);
    }
    let groups: usize = ws.iter().map(|(w, _)| w.n.div_ceil(GROUP)).sum();
    let per_block = groups.div_ceil(4 * get_threads().max(1)).clamp(4, 192);
    // (weight, its groups) of each block; a block never spans two weights
    let mut blocks = Vec::new();
    for (wi, (w, _)) in ws.iter().enumerate() {
        let gn = w.n.div_ceil(GROUP);
        blocks.extend(
            (0..gn)
                .step_by(per_block)
                .map(|g| (wi, g..(g + per_block).min(gn))),
        );
    }
    let outs: Vec<(&QRows, Dst)> = ws
        .iter_mut()
        .map(|(w, d)| (*w, Dst(d.as_mut_ptr())))
        .collect();
    let run = |(wi, gs): &(usize, std::ops::Range<usize>)| {
        let (w, out) = outs[*wi];
        w.groups_into(level, x, (rows.start, m), gs.clone(), out);
    };
    let macs: usize = ws.iter().map(|(w, _)| m * w.n * w.k).sum();
    // a small product costs less than waking the thread pool
    if macs < SERIAL_BELOW {
        blocks.iter().for_each(run);
    } else {
        super::team::par_for(blocks.len(), |b| run(&blocks[b]));
    }
}

/// The products of `R` input rows with the `G` groups `ws` (eight weight rows each), all of
/// one length, with the instructions of `level`.
#[inline(always)]
fn dots_with<T: Group, const R: usize, const G: usize>(
    level: Simd,
    xs: &[XRow; R],
    ws: &[&[T]; G],
) -> [[[f32; GROUP]; G]; R] {
    let kb = ws[0].len();
    assert!(
        xs.iter()
            .all(|x| x.qs.len() == 32 * kb && x.d.len() == kb && x.start.len() == kb)
            && ws.iter().all(|w| w.len() == kb),
        "q8_0 rows of unequal lengths"
    );
    // the level's instructions were detected (`products_into` asserts it)
    T::dots(level, xs, ws)
}

/// The products without SIMD: the same exact block sums, then the same f32 operations.
fn dots_plain<T: Group, const R: usize, const G: usize>(
    xs: &[XRow; R],
    ws: &[&[T]; G],
) -> [[[f32; GROUP]; G]; R] {
    let mut out = [[[0f32; GROUP]; G]; R];
    for (x, out) in xs.iter().zip(out.iter_mut()) {
        for (w, out) in ws.iter().zip(out.iter_mut()) {
            for (b, blk) in w.iter().enumerate() {
                let xq = &x.qs[32 * b..32 * b + 32];
                for (j, acc) in out.iter_mut().enumerate() {
                    let s: i32 = (0..32).map(|i| blk.weight(j, i) * xq[i] as i32).sum();
                    *acc = (s as f32).mul_add(blk.scale(j) * x.d[b], *acc);
                }
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use super::{Q5Group, Q8Group, XRow, GROUP};
    use crate::model::matmul::prefetch_span;
    use std::arch::x86_64::*;

    /// A group's eight scales, widened.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales(d: &[half::f16; GROUP]) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i))
    }

    /// Chunk `c` of a Q5_0 group's block, unpacked: the unsigned values `w + 16` in the order
    /// of a q8_0 chunk. The fifth bits' plane is shifted within 16-bit lanes so that bit `c` of
    /// each byte lands on its bit 4, which never takes a bit of the other byte of the lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk5(g: &Q5Group, c: usize) -> __m256i {
        let pair = _mm256_loadu_si256(g.lo.as_ptr().add(32 * (c / 2)) as *const __m256i);
        let pair = if c.is_multiple_of(2) {
            pair
        } else {
            _mm256_srli_epi16::<4>(pair)
        };
        let low = _mm256_and_si256(pair, _mm256_set1_epi8(0x0F));
        let h = _mm256_loadu_si256(g.hi.as_ptr() as *const __m256i);
        let h = match c {
            0 => _mm256_slli_epi16::<4>(h),
            1 => _mm256_slli_epi16::<3>(h),
            2 => _mm256_slli_epi16::<2>(h),
            3 => _mm256_slli_epi16::<1>(h),
            4 => h,
            5 => _mm256_srli_epi16::<1>(h),
            6 => _mm256_srli_epi16::<2>(h),
            _ => _mm256_srli_epi16::<3>(h),
        };
        _mm256_or_si256(low, _mm256_and_si256(h, _mm256_set1_epi8(0x10)))
    }

    /// Chunk `c` of a group's block: four bytes of each of its eight rows.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk(g: &Q8Group, c: usize) -> __m256i {
        _mm256_loadu_si256(g.qs.as_ptr().add(32 * c) as *const __m256i)
    }

    /// Bytes `4c..4c + 4` of an input row's block, in every lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn bytes4(x: &XRow, b: usize, c: usize) -> __m256i {
        _mm256_set1_epi32((x.qs.as_ptr().add(32 * b + 4 * c) as *const i32).read_unaligned())
    }

    /// Per block: the exact sums (`$sums`), then `acc += f32(sums) · (d_w · d_x)`.
    macro_rules! dots {
        ($name:ident, $T:ty, $features:literal, $sums:ident) => {
            /// # Safety
            /// The features named; every row of `xs` and `ws` the same number of blocks.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name<const R: usize, const G: usize>(
                xs: &[XRow; R],
                ws: &[&[$T]; G],
            ) -> [[[f32; GROUP]; G]; R] {
                let kb = ws[0].len();
                let mut acc = [[_mm256_setzero_ps(); G]; R];
                for b in 0..kb {
                    let blk: [&$T; G] = std::array::from_fn(|h| ws[h].get_unchecked(b));
                    for p in blk {
                        prefetch_span(p as *const $T as *const u8, std::mem::size_of::<$T>());
                    }
                    let s = $sums(xs, &blk, b);
                    let dw: [__m256; G] = std::array::from_fn(|h| scales(&blk[h].d));
                    for r in 0..R {
                        let dx = _mm256_set1_ps(*xs[r].d.get_unchecked(b));
                        for h in 0..G {
                            let f = _mm256_cvtepi32_ps(s[r][h]);
                            acc[r][h] = _mm256_fmadd_ps(f, _mm256_mul_ps(dw[h], dx), acc[r][h]);
                        }
                    }
                }
                let mut out = [[[0f32; GROUP]; G]; R];
                for r in 0..R {
                    for h in 0..G {
                        _mm256_storeu_ps(out[r][h].as_mut_ptr(), acc[r][h]);
                    }
                }
                out
            }
        };
    }

    /// VNNI: from `−offset·Σx` (`start >> $shift`), `vpdpbusd` adds the unsigned
    /// `(w + offset)·x` four bytes at a time.
    macro_rules! sums_vnni {
        ($name:ident, $T:ty, $chunk:ident, $shift:literal) => {
            #[inline]
            #[target_feature(enable = "avx2,avx512f,avx512vl,avx512vnni")]
            unsafe fn $name<const R: usize, const G: usize>(
                xs: &[XRow; R],
                blk: &[&$T; G],
                b: usize,
            ) -> [[__m256i; G]; R] {
                let mut s: [[__m256i; G]; R] = std::array::from_fn(|r| {
                    [_mm256_set1_epi32(*xs[r].start.get_unchecked(b) >> $shift); G]
                });
                for c in 0..8 {
                    let w: [__m256i; G] = std::array::from_fn(|h| $chunk(blk[h], c));
                    for r in 0..R {
                        let x = bytes4(&xs[r], b, c);
                        for h in 0..G {
                            s[r][h] = _mm256_dpbusd_epi32(s[r][h], w[h], x);
                        }
                    }
                }
                s
            }
        };
    }
    // q8_0: offset 128; q5_0: offset 16
    sums_vnni!(sums_vnni, Q8Group, chunk, 0);
    sums_vnni!(sums_vnni_q5, Q5Group, chunk5, 3);

    /// AVX2: `maddubs(|w|, sign(x, w))` adds pairs into i16 (|w| ≤ 128, |x| ≤ 127: no
    /// saturation), `madd` by ones the pairs into i32.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sums_avx2<const R: usize, const G: usize>(
        xs: &[XRow; R],
        blk: &[&Q8Group; G],
        b: usize,
    ) -> [[__m256i; G]; R] {
        let mut s = [[_mm256_setzero_si256(); G]; R];
        let ones = _mm256_set1_epi16(1);
        for c in 0..8 {
            let w: [__m256i; G] =
                std::array::from_fn(|h| _mm256_xor_si256(chunk(blk[h], c), _mm256_set1_epi8(-128)));
            let wabs: [__m256i; G] = std::array::from_fn(|h| _mm256_sign_epi8(w[h], w[h]));
            for r in 0..R {
                let x = bytes4(&xs[r], b, c);
                for h in 0..G {
                    let p = _mm256_maddubs_epi16(wabs[h], _mm256_sign_epi8(x, w[h]));
                    s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        s
    }

    /// AVX2 on Q5_0: `maddubs(w + 16, x)` adds pairs into i16 (31 · 127 · 2: no saturation),
    /// `madd` by ones the pairs into i32, from `−16·Σx`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sums_avx2_q5<const R: usize, const G: usize>(
        xs: &[XRow; R],
        blk: &[&Q5Group; G],
        b: usize,
    ) -> [[__m256i; G]; R] {
        let mut s: [[__m256i; G]; R] =
            std::array::from_fn(|r| [_mm256_set1_epi32(*xs[r].start.get_unchecked(b) >> 3); G]);
        let ones = _mm256_set1_epi16(1);
        for c in 0..8 {
            let w: [__m256i; G] = std::array::from_fn(|h| chunk5(blk[h], c));
            for r in 0..R {
                let x = bytes4(&xs[r], b, c);
                for h in 0..G {
                    let p = _mm256_maddubs_epi16(w[h], x);
                    s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(p, ones));
                }
            }
        }
        s
    }

    dots!(
        dots_vnni,
        Q8Group,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        sums_vnni
    );
    dots!(dots_avx2, Q8Group, "avx2,fma,f16c", sums_avx2);
    dots!(
        dots_vnni_q5,
        Q5Group,
        "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
        sums_vnni_q5
    );
    dots!(dots_avx2_q5, Q5Group, "avx2,fma,f16c", sums_avx2_q5);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// The pieces quantized in parallel make up the input quantized in one go.
    #[test]
    fn an_input_quantized_in_pieces_is_the_input_quantized_whole() {
        for (m, k) in [(9usize, 96usize), (9, 576), (1, 1536), (40, 64)] {
            let x = Tensor::rand(-3f32, 3f32, (m, k), &Device::Cpu).unwrap();
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let whole = Q8Input::from_blocks(&quantize_rows(&v, k), k);
            let run = || Q8Input::quantize(&v, k);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            for q in [run(), pool.install(|| super::super::team::step(run))] {
                assert_eq!((q.m, q.k), (m, k));
                assert_eq!(q.qs, whole.qs);
                assert_eq!(bits(&q.d), bits(&whole.d));
                assert_eq!(q.start, whole.start);
            }
        }
    }

    #[test]
    fn quantized_rows_are_candles_blocks() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let x = Tensor::rand(-3f32, 3f32, (5, 96), &Device::Cpu).unwrap();
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let ours: Vec<u8> = quantize_rows(&v, 96)
            .iter()
            .flat_map(|b| {
                let mut o = b.d.to_le_bytes().to_vec();
                o.extend(b.qs.iter().map(|&q| q as u8));
                o
            })
            .collect();
        let q = QTensor::quantize(&x, GgmlDType::Q8_0).unwrap();
        assert_eq!(ours, q.data().unwrap().to_vec());
    }

    /// Both formats: the products are those of the dequantized input (Q8_0) and weights, and
    /// candle's `QMatMul`'s.
    #[test]
    fn q8_0_and_q5_0_rows_are_the_product_of_their_quantized_inputs_and_weights() {
        use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
        let dev = Device::Cpu;
        // 70 rows: eight groups and a padded ninth; 300: past the serial threshold
        for ((n, k), ty) in [(70usize, 96usize), (300, 96), (40, 1536), (576, 1536)]
            .into_iter()
            .flat_map(|s| [(s, GgmlDType::Q8_0), (s, GgmlDType::Q5_0)])
        {
            let x = Tensor::rand(-1f32, 1f32, (9, k), &dev).unwrap();
            let w = Tensor::rand(-1f32, 1f32, (n, k), &dev).unwrap();
            let q = QTensor::quantize(&w, ty).unwrap();
            let wq = q.dequantize(&dev).unwrap();
            let rows = QRows::from_qtensor(&q).unwrap();
            let got = rows.product(&x).unwrap();
            // the exact product of the dequantized input rows and weights
            let f64s = |t: Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
            let xq = QTensor::quantize(&x, GgmlDType::Q8_0).unwrap();
            let want = f64s(xq.dequantize(&dev).unwrap())
                .matmul(&f64s(wq).t().unwrap())
                .unwrap();
            let got64 = got.to_dtype(candle_core::DType::F64).unwrap();
            let d = crate::testing::max_abs_diff(&got64, &want);
            assert!(d < 1e-8 * (n * k) as f64, "{ty:?} [{n}, {k}]: {d}");
            // candle's QMatMul computes the same products (in another order) on small
            // weights; on [576, 1536] its result is not the product of the quantized input
            // (0.2 off, where ours is 1e-5 off the exact product)
            if n * k < 100_000 {
                let theirs =
                    candle_core::Module::forward(&QMatMul::from_qtensor(q).unwrap(), &x).unwrap();
                assert!(crate::testing::max_abs_diff(&got, &theirs) < 1e-8 * (n * k) as f64);
            }
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (s, m) in [(0usize, 1usize), (4, 1), (2, 5), (0, 9)] {
                let part = rows.product(&x.narrow(0, s, m).unwrap()).unwrap();
                assert_eq!(
                    bits(&flat(&part)),
                    bits(&flat(&got.narrow(0, s, m).unwrap()))
                );
            }
            let block = if ty == GgmlDType::Q8_0 { 34 } else { 22 };
            assert_eq!(rows.bytes(), n.div_ceil(8) * k / 32 * 8 * block);
        }
    }

    #[test]
    fn products_in_one_pass_are_each_weights_own() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        // 4 × 257 × 256 multiply-adds: past the serial threshold
        let x = Tensor::rand(-1f32, 1f32, (6, 256), &dev).unwrap();
        // a q8_0 × q8_0 and q5_0 × q8_0 products in one pass, as q, k and v of a q4_k model
        let ws: Vec<QRows> = [
            (200usize, GgmlDType::Q5_0),
            (40, GgmlDType::Q8_0),
            (17, GgmlDType::Q5_0),
        ]
        .iter()
        .map(|&(n, ty)| {
            let w = Tensor::rand(-1f32, 1f32, (n, 256), &dev).unwrap();
            QRows::from_qtensor(&QTensor::quantize(&w, ty).unwrap()).unwrap()
        })
        .collect();
        let q = Q8Input::of(&x).unwrap();
        let refs: Vec<&QRows> = ws.iter().collect();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let together = products_of(&refs, &q, 1..5, &dev).unwrap();
        for (w, y) in ws.iter().zip(&together) {
            let alone = w.product(&x.narrow(0, 1, 4).unwrap()).unwrap();
            assert_eq!(bits(&flat(y)), bits(&flat(&alone)));
        }
        assert!(products_of(&refs, &q, 0..7, &dev).is_err());
    }

    /// A pseudo-random byte stream.
    fn bytes(mut seed: u64) -> impl FnMut() -> i8 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8 as i8
        }
    }

    /// The products of input blocks `xb` (`m` rows) with the weight `w` made of blocks `wb`
    /// (`n` rows): the plain loop's are the exact sums (in f64) to rounding, and every
    /// instruction set here gives the plain loop's bits.
    fn check_levels(xb: &[BlockQ8], wb: &[BlockQ8], w: &QRows, (m, n): (usize, usize)) {
        let kb = w.k / 32;
        let x = Q8Input::from_blocks(xb, w.k);
        let run = |level| {
            let mut out = vec![0f32; m * n];
            w.product_into(level, &x, 0..m, &mut out);
            out
        };
        let plain = run(Simd::Plain);
        for i in 0..m {
            for j in 0..n {
                let exact: f64 = (0..kb)
                    .map(|b| {
                        let (x, w) = (&xb[i * kb + b], &wb[j * kb + b]);
                        let s: i32 = (0..32).map(|t| x.qs[t] as i32 * w.qs[t] as i32).sum();
                        s as f64 * x.d.to_f64() * w.d.to_f64()
                    })
                    .sum();
                let got = plain[i * n + j] as f64;
                assert!(
                    (got - exact).abs() < 1e-4 * exact.abs().max(1.0),
                    "{got} {exact}"
                );
            }
        }
        for level in [Simd::Avx2, Simd::Vnni] {
            if level <= simd() {
                assert_eq!(bits(&run(level)), bits(&plain), "{level:?}");
            }
        }
    }

    /// 11 rows: with VNNI a pass of eight, then of one.
    #[test]
    fn q8_0_products_are_the_same_bits_with_every_instruction_set() {
        // extreme bytes included: -128 and 127 in the weights, ±127 in the inputs
        let mut byte = bytes(7);
        let mut block = |lo: i8| {
            let mut qs = [0i8; 32];
            qs.iter_mut().for_each(|q| *q = byte().max(lo));
            qs[0] = lo;
            qs[1] = 127;
            let d = half::f16::from_f32((byte() as f32).abs() / 1000.0 + 1e-3);
            BlockQ8 { d, qs }
        };
        let (m, n, kb) = (11usize, 21usize, 5usize);
        let xb: Vec<BlockQ8> = (0..m * kb).map(|_| block(-127)).collect();
        let wb: Vec<BlockQ8> = (0..n * kb).map(|_| block(-128)).collect();
        let w = QRows::from_blocks(&wb, n, 32 * kb);
        check_levels(&xb, &wb, &w, (m, n));
    }

    /// The Q5_0 layout and kernels: every value of -16..=15 in every position of a chunk
    /// (the fifth bits of all eight chunks), each instruction set the exact sums' same bits.
    #[test]
    fn q5_0_products_are_the_same_bits_with_every_instruction_set() {
        let mut byte = bytes(11);
        let (m, n, kb) = (13usize, 19usize, 4usize);
        let xb: Vec<BlockQ8> = (0..m * kb)
            .map(|b| {
                let mut qs = [0i8; 32];
                qs.iter_mut().for_each(|q| *q = byte().max(-127));
                qs[b % 32] = 127;
                qs[(b + 7) % 32] = -127;
                let d = half::f16::from_f32((byte() as f32).abs() / 1000.0 + 1e-3);
                BlockQ8 { d, qs }
            })
            .collect();
        let wb: Vec<BlockQ8> = (0..n * kb)
            .map(|b| {
                let qs = std::array::from_fn(|i| ((i + b) % 32) as i8 - 16);
                let d = half::f16::from_f32((byte() as f32).abs() / 1000.0 + 1e-3);
                BlockQ8 { d, qs }
            })
            .collect();
        let w = QRows::from_q5_values(&wb, n, 32 * kb);
        let Groups::Q5(groups) = &w.groups else {
            panic!("Q5_0 groups")
        };
        for (g, blk) in groups.iter().enumerate() {
            let (gr, b) = (g / kb, g % kb);
            for j in 0..GROUP.min(n - GROUP * gr) {
                for i in 0..32 {
                    assert_eq!(blk.weight(j, i), wb[(GROUP * gr + j) * kb + b].qs[i] as i32);
                }
            }
        }
        check_levels(&xb, &wb, &w, (m, n));
    }
}

/// One shape of the q8_0 product benchmark (`bench-q8`, in `make bench`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ProductTiming {
    pub n: usize,
    pub k: usize,
    /// Input rows.
    pub m: usize,
    /// Median seconds of `QRows::product` (the input quantized, then the products).
    pub ours_s: f64,
    /// Of the quantization alone.
    pub quantize_s: f64,
    /// Of candle's `QMatMul` on the same weight and rows.
    pub candle_s: f64,
    pub weight_bytes: usize,
}

/// Times `x·Wᵀ` for a random Q8_0 weight `[n, k]` and `m` random rows, ours and candle's
/// `QMatMul` alternating, `reps` times each after one untimed run; checks they agree.
pub fn time_product(n: usize, k: usize, m: usize, reps: usize) -> Result<ProductTiming> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    let dev = candle_core::Device::Cpu;
    let w = QTensor::quantize(&Tensor::rand(-1f32, 1f32, (n, k), &dev)?, GgmlDType::Q8_0)?;
    let ours = QRows::from_qtensor(&w)?;
    let theirs = QMatMul::from_qtensor(w)?;
    let x = Tensor::rand(-1f32, 1f32, (m, k), &dev)?;
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    // the same product up to the input's quantization (which candle's skips on some shapes)
    let max = |t: Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
    let y = ours.product(&x)?;
    let diff = max((&y - candle_core::Module::forward(&theirs, &x)?)?)?;
    if diff > 0.02 * max(y)? {
        candle_core::bail!("q8_0 product [{m}, {k}] x [{n}, {k}]ᵀ differs from candle's by {diff}");
    }
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t = std::time::Instant::now();
        f()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let (mut a, mut b, mut q) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        a.push(time(&mut || ours.product(&x).map(drop))?);
        b.push(time(&mut || {
            candle_core::Module::forward(&theirs, &x).map(drop)
        })?);
        q.push(time(&mut || {
            std::hint::black_box(Q8Input::quantize(&v, k));
            Ok(())
        })?);
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(ProductTiming {
        n,
        k,
        m,
        ours_s: median(a),
        quantize_s: median(q),
        candle_s: median(b),
        weight_bytes: ours.bytes(),
    })
}
