//! The key/value cache of incremental decoding, and on the CPU in f32 the attention of cached
//! sequences: one pass over every sequence of a step (`attend_host`), instead of some fifteen
//! tensor ops per sequence and layer (a decode step of 8 sequences would make 3600).
//!
//! Per query row at position `p` and query head `h` (key/value head `h / rep`):
//!
//! ```text
//! q' = rope(q, p)                      k' = rope(k, p), appended to the cache with v
//! s_u = q'·K_u   for u = 0..=p         (causal: the cached positions and those before it)
//! P = softmax(c · s)                   c = 1/sqrt(head_dim)
//! o = Σ_u P_u V_u
//! ```
//!
//! Each output row is computed on its own, in an order fixed by its position alone, so a
//! sequence's attention does not depend on what else shares the step, nor on how its prompt was
//! cut into chunks.

use super::matmul::{get_threads, simd, Dst, Simd};
use super::ops::{f32_slice, softmax_row};
use candle_core::{Result, Storage, Tensor};

/// Positions candle's cache (the tensor path's) makes room for at a time.
const CACHE_BLOCK: usize = 256;

/// Query rows per parallel task of `attend_host`.
const ROWS_PER_TASK: usize = 8;

/// Multiply-adds below which `attend_host` runs on the calling thread (waking the pool costs
/// more than a short decode step's attention).
const SERIAL_BELOW: usize = 1 << 18;

/// A layer's key/value cache. It takes its kind from its first use: on the CPU in f32 `Host`,
/// per key/value head the roped keys and the values of its positions (`[positions, hd]` each,
/// appended in place); elsewhere candle's cache of `[B, KVH, positions, hd]` tensors, which
/// grows by `CACHE_BLOCK` positions at a time.
pub(crate) enum LayerCache {
    Empty,
    Host(HostCache),
    Tensors(candle_nn::kv_cache::KvCache),
}

pub(crate) struct HostCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl LayerCache {
    pub(crate) fn current_seq_len(&self) -> usize {
        match self {
            LayerCache::Empty => 0,
            LayerCache::Host(c) => c.len,
            LayerCache::Tensors(c) => c.current_seq_len(),
        }
    }

    pub(crate) fn reset(&mut self) {
        *self = LayerCache::Empty;
    }

    /// A copy of the first `n` positions (a prefix another sequence reuses), for caches of the
    /// CPU's kind (and empty ones); `None` for candle's.
    pub(crate) fn prefix(&self, n: usize) -> Option<LayerCache> {
        match self {
            LayerCache::Empty if n == 0 => Some(LayerCache::Empty),
            LayerCache::Host(c) if n <= c.len => {
                let cut = |v: &Vec<Vec<f32>>| -> Vec<Vec<f32>> {
                    v.iter()
                        .map(|h| h[..n * (h.len() / c.len.max(1))].to_vec())
                        .collect()
                };
                Some(LayerCache::Host(HostCache {
                    k: cut(&c.k),
                    v: cut(&c.v),
                    len: n,
                }))
            }
            _ => None,
        }
    }

    /// Bytes of keys and values held.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            LayerCache::Empty => 0,
            LayerCache::Host(c) => {
                let n: usize = c.k.iter().chain(&c.v).map(|h| h.capacity()).sum();
                n * 4
            }
            LayerCache::Tensors(c) => c
                .k_cache()
                .all_data()
                .iter()
                .chain(c.v_cache().all_data())
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum(),
        }
    }

    /// Whether `attend_host` serves this cache for inputs like `q`.
    pub(crate) fn host_for(&self, q: &Tensor) -> bool {
        match self {
            LayerCache::Empty => super::ops::fused(&[q]),
            LayerCache::Host(_) => super::ops::is_cpu_f32(q),
            LayerCache::Tensors(_) => false,
        }
    }

    fn host(&mut self, kv_heads: usize) -> Result<&mut HostCache> {
        if let LayerCache::Empty = self {
            *self = LayerCache::Host(HostCache {
                k: vec![Vec::new(); kv_heads],
                v: vec![Vec::new(); kv_heads],
                len: 0,
            });
        }
        match self {
            LayerCache::Host(c) if c.k.len() == kv_heads => Ok(c),
            _ => candle_core::bail!("a key/value cache of another kind or shape"),
        }
    }

    /// The tensor path: appends `k`, `v` (`[B, KVH, t, hd]`, contiguous) and returns the cached
    /// positions and these, as views of the cache.
    pub(crate) fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if let LayerCache::Empty = self {
            *self = LayerCache::Tensors(candle_nn::kv_cache::KvCache::new(2, CACHE_BLOCK));
        }
        match self {
            LayerCache::Tensors(c) => c.append(k, v),
            _ => candle_core::bail!("a key/value cache of the CPU's kind on the tensor path"),
        }
    }
}

/// The shape of grouped-query attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Rotary tables as f32 rows of `head_dim / 2` per position.
pub(crate) struct HostRope<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// The contiguous f32 data of a CPU tensor.
fn host_data<'a>(s: &'a Storage, t: &Tensor) -> Result<&'a [f32]> {
    match s {
        Storage::Cpu(s) if t.is_contiguous() => f32_slice(s, t.layout()),
        _ => candle_core::bail!("attend_host: a tensor that is not contiguous f32 on the CPU"),
    }
}

/// The attention of a step's rows on their own caches: `q: [rows, H·hd]`, `k`, `v`:
/// `[rows, KVH·hd]` (projections, not yet roped); `seqs` each sequence's first row, its rows and
/// its layer cache, tiling the rows in order. Appends each sequence's roped keys and values to
/// its cache and returns `[rows, H·hd]` (the output projection's input).
pub(crate) fn attend_host(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    seqs: &mut [(usize, usize, &mut LayerCache)],
    rope: &HostRope,
    g: Heads,
) -> Result<Tensor> {
    let hd = g.head_dim;
    let (qd, kd) = (g.heads * hd, g.kv_heads * hd);
    let rows = q.dim(0)?;
    if !g.heads.is_multiple_of(g.kv_heads) || !hd.is_multiple_of(2) || q.dims() != [rows, qd] {
        candle_core::bail!("attend_host: queries {:?} for {g:?}", q.dims());
    }
    if k.dims() != [rows, kd] || v.dims() != [rows, kd] {
        candle_core::bail!(
            "attend_host: keys {:?}, values {:?} for {g:?}",
            k.dims(),
            v.dims()
        );
    }
    let (qs, ks, vs) = (
        q.storage_and_layout(),
        k.storage_and_layout(),
        v.storage_and_layout(),
    );
    let (qv, kv, vv) = (
        host_data(&qs.0, q)?,
        host_data(&ks.0, k)?,
        host_data(&vs.0, v)?,
    );
    let half = hd / 2;
    let positions = rope.cos.len() / half;
    // the new positions' roped keys and values into each cache
    let mut next = 0;
    let mut pasts = Vec::with_capacity(seqs.len());
    for (start, t, cache) in seqs.iter_mut() {
        let (start, t) = (*start, *t);
        if start != next || start + t > rows {
            candle_core::bail!("attend_host: sequences must tile the {rows} rows in order");
        }
        next = start + t;
        let c = cache.host(g.kv_heads)?;
        if c.len + t > positions {
            candle_core::bail!(
                "sequence of {} positions exceeds max_position_embeddings {positions}",
                c.len + t
            );
        }
        for i in 0..t {
            let p = c.len + i;
            let (cos, sin) = (&rope.cos[p * half..][..half], &rope.sin[p * half..][..half]);
            let row = (start + i) * kd;
            for h in 0..g.kv_heads {
                let src = &kv[row + h * hd..][..hd];
                let dst = &mut c.k[h];
                let at = dst.len();
                dst.resize(at + hd, 0.0);
                rotate(src, cos, sin, &mut dst[at..]);
                c.v[h].extend_from_slice(&vv[row + h * hd..][..hd]);
            }
        }
        pasts.push(c.len);
        c.len += t;
    }
    if next != rows {
        candle_core::bail!("attend_host: sequences cover {next} of {rows} rows");
    }
    // tasks of up to ROWS_PER_TASK rows of one sequence and some of its query heads; with few
    // rows (a decode step of one or two sequences) one head each, so that every thread has some
    let mut out = vec![0f32; rows * qd];
    let mut chunks = Vec::new();
    let mut work = 0;
    for (s, ((_, t, cache), &past)) in seqs.iter().zip(&pasts).enumerate() {
        let LayerCache::Host(c) = &**cache else {
            unreachable!("made a host cache above")
        };
        work += t * (past + t) * 2 * qd;
        for i0 in (0..*t).step_by(ROWS_PER_TASK) {
            chunks.push((s, c, i0, ROWS_PER_TASK.min(t - i0)));
        }
    }
    let per = if chunks.len() >= 4 * get_threads() {
        g.heads
    } else {
        1
    };
    let tasks: Vec<_> = chunks
        .iter()
        .flat_map(|&(s, c, i0, n)| {
            (0..g.heads)
                .step_by(per)
                .map(move |h| (s, c, i0, n, h..(h + per).min(g.heads)))
        })
        .collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let starts: Vec<usize> = seqs.iter().map(|s| s.0).collect();
    let dst = Dst(out.as_mut_ptr());
    let run = |(s, c, i0, n, heads): (usize, &HostCache, usize, usize, std::ops::Range<usize>)| {
        let first = starts[s] + i0;
        let task = Task {
            q: &qv[first * qd..][..n * qd],
            cache: c,
            p0: pasts[s] + i0,
            rope,
            g,
            scale,
        };
        // SAFETY: rows first..first + n of the output, heads `heads`: no other task's
        let o = unsafe { dst.ptr().add(first * qd) };
        #[cfg(target_arch = "x86_64")]
        if simd() >= Simd::Avx2 {
            // SAFETY: AVX2 and FMA were detected
            return unsafe { task.run_avx2(o, heads) };
        }
        unsafe { task.run::<false>(o, heads) }
    };
    if work < SERIAL_BELOW {
        tasks.into_iter().for_each(run);
    } else {
        super::team::par_for(tasks.len(), |i| run(tasks[i].clone()));
    }
    drop((qs, ks, vs));
    Tensor::from_vec(out, (rows, qd), q.device())
}

/// HF's rotate-half rotary embedding of one head's `x` with one position's tables (candle's
/// own arithmetic, so the cache holds the keys its tensor path would hold).
#[inline(always)]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = (x[i], x[i + half]);
        out[i] = a * cos[i] - b * sin[i];
        out[i + half] = a * sin[i] + b * cos[i];
    }
}

/// Consecutive query rows of one sequence from position `p0`, all heads.
struct Task<'a> {
    q: &'a [f32],
    cache: &'a HostCache,
    p0: usize,
    rope: &'a HostRope<'a>,
    g: Heads,
    scale: f32,
}

impl Task<'_> {
    /// # Safety
    /// AVX2 and FMA; as `run`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, dst: *mut f32, heads: std::ops::Range<usize>) {
        self.run::<true>(dst, heads)
    }

    /// Heads `heads` of the rows' outputs into `dst` (`[n, H·hd]`, the rows' part of the
    /// output), the other heads left alone.
    ///
    /// # Safety
    /// `dst` is valid for the rows' `n · H·hd` values, and no one else touches heads `heads`
    /// of them meanwhile.
    #[inline(always)]
    unsafe fn run<const FMA: bool>(&self, dst: *mut f32, heads: std::ops::Range<usize>) {
        let g = self.g;
        let (hd, rep) = (g.head_dim, g.heads / g.kv_heads);
        let half = hd / 2;
        let qd = g.heads * hd;
        let mut qr = vec![0f32; hd];
        let mut scores = Vec::new();
        for (i, q) in self.q.chunks(qd).enumerate() {
            let p = self.p0 + i;
            let n = p + 1;
            let cos = &self.rope.cos[p * half..][..half];
            let sin = &self.rope.sin[p * half..][..half];
            scores.resize(n, 0.0);
            for h in heads.clone() {
                rotate(&q[h * hd..][..hd], cos, sin, &mut qr);
                let keys = &self.cache.k[h / rep][..n * hd];
                let values = &self.cache.v[h / rep][..n * hd];
                // SAFETY: head h of row i, inside the rows' part (the caller's promise)
                let out = unsafe { std::slice::from_raw_parts_mut(dst.add(i * qd + h * hd), hd) };
                #[cfg(target_arch = "x86_64")]
                if FMA && (hd == 64 || hd == 128) {
                    // SAFETY: FMA is only set on the path that detected AVX2 and FMA (run_avx2);
                    // every key and value row is hd long
                    unsafe {
                        match hd {
                            64 => avx::head::<8>(&qr, keys, values, &mut scores, self.scale, out),
                            _ => avx::head::<16>(&qr, keys, values, &mut scores, self.scale, out),
                        }
                    }
                    continue;
                }
                for (s, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
                    *s = dot::<FMA>(&qr, key);
                }
                softmax_row(&mut scores, self.scale);
                out.fill(0.0);
                for (&pu, val) in scores.iter().zip(values.chunks_exact(hd)) {
                    axpy::<FMA>(pu, val, out);
                }
            }
        }
    }
}

/// One query head's attention with the head held in registers, `L` vectors of eight.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// The lanes of each of eight vectors summed, into one: lane `j` is `Σ v[j]`, pairs
    /// (0+1, 2+3, 4+5, 6+7), then (01+23, 45+67), then 0123+4567.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum8(v: &[__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(v[0], v[1]);
        let t1 = _mm256_hadd_ps(v[2], v[3]);
        let t2 = _mm256_hadd_ps(v[4], v[5]);
        let t3 = _mm256_hadd_ps(v[6], v[7]);
        // [0, 1, 2, 3 | 0, 1, 2, 3] halves' sums of vectors 0-3, and of 4-7
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    /// # Safety
    /// AVX2 and FMA; `q` and `out` `8·L` long, `keys` and `values` `scores.len()` rows of `8·L`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn head<const L: usize>(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        scores: &mut [f32],
        scale: f32,
        out: &mut [f32],
    ) {
        let hd = 8 * L;
        let qv: [__m256; L] = std::array::from_fn(|i| _mm256_loadu_ps(q.as_ptr().add(8 * i)));
        // key u's products with the query in eight lanes, in two chains
        let lanes = |u: usize| {
            let k = keys.as_ptr().add(u * hd);
            let mut a = _mm256_mul_ps(qv[0], _mm256_loadu_ps(k));
            let mut b = _mm256_mul_ps(qv[1], _mm256_loadu_ps(k.add(8)));
            for i in (2..L).step_by(2) {
                a = _mm256_fmadd_ps(qv[i], _mm256_loadu_ps(k.add(8 * i)), a);
                b = _mm256_fmadd_ps(qv[i + 1], _mm256_loadu_ps(k.add(8 * i + 8)), b);
            }
            _mm256_add_ps(a, b)
        };
        // eight keys' lanes summed at once (`sum8`), the last keys padded with zeros: each
        // score the same sums in the same order wherever its key falls
        let n = scores.len();
        for u in (0..n).step_by(8) {
            let m = (n - u).min(8);
            let v: [__m256; 8] = std::array::from_fn(|j| {
                if j < m {
                    lanes(u + j)
                } else {
                    _mm256_setzero_ps()
                }
            });
            let mut s = [0f32; 8];
            _mm256_storeu_ps(s.as_mut_ptr(), sum8(&v));
            scores[u..u + m].copy_from_slice(&s[..m]);
        }
        super::super::ops::softmax_row(scores, scale);
        let mut acc = [_mm256_setzero_ps(); L];
        for (u, &p) in scores.iter().enumerate() {
            let v = values.as_ptr().add(u * hd);
            let p = _mm256_set1_ps(p);
            for (i, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * i)), *a);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * i), *a);
        }
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `a · b` in eight lanes, summed pairwise.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let q = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    (q[0] + q[2]) + (q[1] + q[3]) + tail
}

/// `out += a · x`.
#[inline(always)]
fn axpy<const FMA: bool>(a: f32, x: &[f32], out: &mut [f32]) {
    for (o, &x) in out.iter_mut().zip(x) {
        *o = madd::<FMA>(a, x, *o);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};
    use rand::{Rng, SeedableRng};

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max)
    }

    fn random(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Rotary tables of `positions` rows of `hd / 2`.
    fn tables(positions: usize, hd: usize) -> (Vec<f32>, Vec<f32>) {
        let half = hd / 2;
        let angle = |p: usize, i: usize| p as f32 * 10000f32.powf(-(i as f32) / half as f32);
        let cos = (0..positions * half).map(|j| angle(j / half, j % half).cos());
        let sin = (0..positions * half).map(|j| angle(j / half, j % half).sin());
        (cos.collect(), sin.collect())
    }

    /// One sequence's projections for positions `0..n`: queries `[n, H·hd]`, keys and values
    /// `[n, KVH·hd]`.
    struct Seq {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
    }

    fn seq(n: usize, g: Heads, rng: &mut rand::rngs::StdRng) -> Seq {
        let (qd, kd) = (g.heads * g.head_dim, g.kv_heads * g.head_dim);
        Seq {
            q: random(n * qd, rng),
            k: random(n * kd, rng),
            v: random(n * kd, rng),
        }
    }

    /// The attention of positions `0..n` by candle's tensor ops (rope, repeated keys and
    /// values, a causal mask, softmax), `[n, H·hd]`.
    fn reference(s: &Seq, n: usize, g: Heads, rope: &HostRope) -> Vec<f32> {
        let (h, kvh, hd) = (g.heads, g.kv_heads, g.head_dim);
        let dev = Device::Cpu;
        let t = |v: &[f32], heads: usize| {
            Tensor::from_slice(&v[..n * heads * hd], (1, n, heads, hd), &dev)?
                .transpose(1, 2)?
                .contiguous()
        };
        let cos = Tensor::from_slice(&rope.cos[..n * hd / 2], (n, hd / 2), &dev).unwrap();
        let sin = Tensor::from_slice(&rope.sin[..n * hd / 2], (n, hd / 2), &dev).unwrap();
        let q = candle_nn::rotary_emb::rope(&t(&s.q, h).unwrap(), &cos, &sin).unwrap();
        let k = candle_nn::rotary_emb::rope(&t(&s.k, kvh).unwrap(), &cos, &sin).unwrap();
        let v = t(&s.v, kvh).unwrap();
        let rep = h / kvh;
        let idx: Vec<u32> = (0..h).map(|i| (i / rep) as u32).collect();
        let idx = Tensor::new(idx.as_slice(), &dev).unwrap();
        let (k, v) = (
            k.index_select(&idx, 1).unwrap(),
            v.index_select(&idx, 1).unwrap(),
        );
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (n, n), &dev).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax(&s.broadcast_add(&mask).unwrap(), D::Minus1).unwrap();
        let o = p.matmul(&v).unwrap().transpose(1, 2).unwrap();
        o.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Feeds every sequence's positions in the given steps (per step, per sequence, how many
    /// positions; 0: not in that step) and returns each sequence's outputs, in position order.
    fn run(seqs: &[Seq], steps: &[Vec<usize>], g: Heads, rope: &HostRope) -> Vec<Vec<f32>> {
        let (qd, kd) = (g.heads * g.head_dim, g.kv_heads * g.head_dim);
        let mut caches: Vec<LayerCache> = seqs.iter().map(|_| LayerCache::Empty).collect();
        let mut outs = vec![Vec::new(); seqs.len()];
        for step in steps {
            let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
            let mut spans = Vec::new();
            for (i, &t) in step.iter().enumerate().filter(|s| *s.1 > 0) {
                let p = caches[i].current_seq_len();
                q.extend_from_slice(&seqs[i].q[p * qd..(p + t) * qd]);
                k.extend_from_slice(&seqs[i].k[p * kd..(p + t) * kd]);
                v.extend_from_slice(&seqs[i].v[p * kd..(p + t) * kd]);
                spans.push((i, t));
            }
            let rows = q.len() / qd;
            let dev = Device::Cpu;
            let q = Tensor::from_vec(q, (rows, qd), &dev).unwrap();
            let k = Tensor::from_vec(k, (rows, kd), &dev).unwrap();
            let v = Tensor::from_vec(v, (rows, kd), &dev).unwrap();
            let mut start = 0;
            let mut lc: Vec<(usize, usize, &mut LayerCache)> = Vec::new();
            let mut rest = caches.as_mut_slice();
            let mut at = 0;
            for &(i, t) in &spans {
                let (_, r) = std::mem::take(&mut rest).split_at_mut(i - at);
                let (c, r) = r.split_first_mut().unwrap();
                rest = r;
                at = i + 1;
                lc.push((start, t, c));
                start += t;
            }
            let o = attend_host(&q, &k, &v, &mut lc, rope, g).unwrap();
            let o: Vec<f32> = o.flatten_all().unwrap().to_vec1().unwrap();
            let mut row = 0;
            for &(i, t) in &spans {
                outs[i].extend_from_slice(&o[row * qd..(row + t) * qd]);
                row += t;
            }
        }
        outs
    }

    /// Prefill chunks and decode rows of three sequences sharing steps, with grouped heads, a
    /// head size of whole lanes (64) and one with a remainder (10): the attention of candle's
    /// tensor ops.
    #[test]
    fn host_attention_is_the_tensor_ops_attention() {
        for hd in [64, 10] {
            let g = Heads {
                heads: 6,
                kv_heads: 2,
                head_dim: hd,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(3);
            let seqs: Vec<Seq> = (0..3).map(|_| seq(40, g, &mut rng)).collect();
            let (cos, sin) = tables(64, hd);
            let rope = HostRope {
                cos: &cos,
                sin: &sin,
            };
            // sequence 1's chunk of 20 spans three tasks, and the last step is big enough to
            // go parallel
            let steps = vec![
                vec![5, 0, 0],
                vec![1, 20, 3],
                vec![1, 1, 1],
                vec![0, 1, 30],
                vec![1, 0, 1],
            ];
            let outs = run(&seqs, &steps, g, &rope);
            for (s, got) in seqs.iter().zip(&outs) {
                let n = got.len() / (g.heads * hd);
                let want = reference(s, n, g, &rope);
                let d = max_diff(got, &want);
                assert!(d < 1e-5, "hd {hd}, {n} positions: {d}");
            }
        }
    }

    /// A sequence's outputs are the same bits whether its prompt comes in one chunk, in chunks
    /// of 4, or a position at a time, and whatever other sequences share its steps.
    #[test]
    fn host_attention_does_not_depend_on_chunks_or_neighbours() {
        let g = Heads {
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let seqs: Vec<Seq> = (0..2).map(|_| seq(24, g, &mut rng)).collect();
        let (cos, sin) = tables(32, 64);
        let rope = HostRope {
            cos: &cos,
            sin: &sin,
        };
        let alone = run(&seqs[..1], &[vec![24]], g, &rope);
        let chunks: Vec<Vec<usize>> = [4, 4, 4, 4, 4, 4].iter().map(|&t| vec![t]).collect();
        let in_chunks = run(&seqs[..1], &chunks, g, &rope);
        let mut steps = vec![vec![0, 20]];
        steps.extend((0..24).map(|i| vec![1, usize::from(i % 6 == 0)]));
        let shared = run(&seqs, &steps, g, &rope);
        assert_eq!(alone[0], in_chunks[0]);
        assert_eq!(alone[0], shared[0]);
    }

    /// The plain loop (machines without AVX2 and FMA) gives what the SIMD one gives (the head
    /// in registers for a head size of 64), to rounding.
    #[test]
    fn plain_and_simd_attention_agree() {
        let g = Heads {
            heads: 6,
            kv_heads: 2,
            head_dim: 64,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let s = seq(12, g, &mut rng);
        let (cos, sin) = tables(16, 64);
        let rope = HostRope {
            cos: &cos,
            sin: &sin,
        };
        let mut cache = LayerCache::Empty;
        let dev = Device::Cpu;
        let (qd, kd) = (6 * 64, 2 * 64);
        let q = Tensor::from_slice(&s.q, (12, qd), &dev).unwrap();
        let k = Tensor::from_slice(&s.k, (12, kd), &dev).unwrap();
        let v = Tensor::from_slice(&s.v, (12, kd), &dev).unwrap();
        attend_host(&q, &k, &v, &mut [(0, 12, &mut cache)], &rope, g).unwrap();
        let LayerCache::Host(c) = &cache else {
            panic!("a host cache")
        };
        let task = Task {
            q: &s.q,
            cache: c,
            p0: 0,
            rope: &rope,
            g,
            scale: 0.125,
        };
        let mut plain = vec![0f32; 12 * qd];
        // SAFETY: the 12 rows' outputs, all heads
        unsafe { task.run::<false>(plain.as_mut_ptr(), 0..6) };
        if simd() < Simd::Avx2 {
            eprintln!("no AVX2 and FMA here: only the plain loop ran");
            return;
        }
        let mut fma = vec![0f32; 12 * qd];
        // SAFETY: AVX2 and FMA were detected; the 12 rows' outputs, all heads
        unsafe { task.run_avx2(fma.as_mut_ptr(), 0..6) };
        let d = max_diff(&plain, &fma);
        assert!(d < 1e-5, "{d}");
    }
}
