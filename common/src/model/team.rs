//! The threads of a forward step kept on hand between its parallel loops.
//!
//! A decode step makes some 150 parallel loops (the products of each layer, its attention, the
//! head), each a few to a few hundred microseconds, with short serial work between them (norms,
//! the quantizing of an input). Between two loops rayon's idle workers park after a few dozen
//! yields, and each loop then wakes one again through the kernel: on a 2-vCPU machine that cost
//! a quarter of a single-stream step and a third of a batch-8 one (`make bench`'s
//! `bench-step`; BENCHMARKS.md). `step` instead hands the pool's other threads one job each for
//! the whole step: they spin until the step's thread posts a loop (`par_for`), take items of it
//! as it does, and go back to rayon when the step ends. One wake per step, not one per loop.
//!
//! Items are claimed one at a time from a shared counter, so who computes an item never changes
//! what it computes: the kernels' results are the same bits with or without a team.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};

/// One parallel loop, on the stack of the thread that posted it.
struct Region<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

impl Region<'_> {
    /// Takes items until none is left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, SeqCst);
        }
    }
}

/// What the step's thread shares with its helpers.
struct Team {
    /// The loop now posted (null between loops).
    region: AtomicPtr<Region<'static>>,
    /// Bumped at each loop posted: what helpers spin on.
    posted: AtomicUsize,
    /// Helpers between reading `region` and leaving it.
    inside: AtomicUsize,
    finished: AtomicBool,
}

thread_local! {
    /// The team this thread leads, if any.
    static LEADING: Cell<*const Team> = const { Cell::new(std::ptr::null()) };
}

impl Team {
    /// A helper: runs the items of every loop posted until the step ends.
    fn help(&self) {
        // a helper job can land on the leader itself (rayon runs its own queue while it waits):
        // it has nothing to do there
        if !LEADING.with(|l| l.get()).is_null() {
            return;
        }
        let mut seen = 0;
        let mut idle = 0u32;
        while !self.finished.load(SeqCst) {
            let p = self.posted.load(SeqCst);
            if p == seen {
                idle = idle.wrapping_add(1);
                if idle.is_multiple_of(4096) {
                    // let anything else that wants this core have it now and then
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            seen = p;
            self.inside.fetch_add(1, SeqCst);
            let r = self.region.load(SeqCst);
            if !r.is_null() {
                // SAFETY: the leader keeps the region alive until `inside` is back to zero
                // after it cleared `region` (`run`)
                unsafe { (*r).work() };
            }
            self.inside.fetch_sub(1, SeqCst);
        }
    }

    /// The leader: posts a loop, takes its share, waits for the helpers' items.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        let region = Region {
            f,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        // SAFETY: the lifetime is erased only while `region` lives: it is unpublished, and the
        // helpers are out of it, before this function returns
        let erased: *const Region<'static> =
            unsafe { std::mem::transmute::<*const Region<'_>, _>(&region as *const Region<'_>) };
        self.region.store(erased as *mut _, SeqCst);
        self.posted.fetch_add(1, SeqCst);
        region.work();
        while region.done.load(SeqCst) < n {
            std::hint::spin_loop();
        }
        self.region.store(std::ptr::null_mut(), SeqCst);
        while self.inside.load(SeqCst) != 0 {
            std::hint::spin_loop();
        }
        if region.panicked.load(SeqCst) {
            panic!("an item of a parallel loop panicked");
        }
    }
}

/// Runs `f`, a forward step, with the pool's other threads on hand for its `par_for` loops.
/// Called on a thread of the pool (`on_pool`); nested calls run `f` in the outer team.
pub(crate) fn step<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let helpers = rayon::current_num_threads().saturating_sub(1);
    if helpers == 0 || !LEADING.with(|l| l.get()).is_null() {
        return f();
    }
    let team = Team {
        region: AtomicPtr::new(std::ptr::null_mut()),
        posted: AtomicUsize::new(0),
        inside: AtomicUsize::new(0),
        finished: AtomicBool::new(false),
    };
    struct Lead<'a>(&'a Team);
    impl Drop for Lead<'_> {
        // on the way out, a panic included: the helpers must stop spinning
        fn drop(&mut self) {
            self.0.finished.store(true, SeqCst);
            LEADING.with(|l| l.set(std::ptr::null()));
        }
    }
    rayon::scope(|s| {
        for _ in 0..helpers {
            s.spawn(|_| team.help());
        }
        LEADING.with(|l| l.set(&team));
        let _lead = Lead(&team);
        f()
    })
}

/// `f(i)` for `i` in `0..n`, in parallel: on the team this thread leads (`step`), or else on
/// rayon's pool. A single item runs right here.
pub(crate) fn par_for(n: usize, f: impl Fn(usize) + Sync) {
    let team = LEADING.with(|l| l.get());
    if n <= 1 {
        (0..n).for_each(f);
    } else if team.is_null() {
        use rayon::prelude::*;
        (0..n).into_par_iter().for_each(&f);
    } else {
        // SAFETY: a team outlives the step that leads it, and this is that step's thread
        unsafe { (*team).run(n, &f) }
    }
}

/// `f(start, chunk)` for the chunks of `data` of `chunk` elements in parallel, `start` the
/// chunk's first index. In a step (`step`), chunks of an eighth of `data` per thread if that is
/// smaller (a decode step's element-wise work is too small for `chunk`, a training size).
pub(crate) fn par_chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunk = if LEADING.with(|l| l.get()).is_null() {
        chunk
    } else {
        chunk.min(
            data.len()
                .div_ceil(8 * rayon::current_num_threads())
                .max(256),
        )
    }
    .max(1);
    let pieces: Vec<std::sync::Mutex<&mut [T]>> =
        data.chunks_mut(chunk).map(std::sync::Mutex::new).collect();
    let run = |i: usize| {
        f(
            i * chunk,
            &mut pieces[i].lock().expect("one thread per chunk"),
        )
    };
    par_for(pieces.len(), run);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn every_item_runs_once_with_or_without_a_team() {
        let pool = pool(3);
        let count = |team: bool| {
            let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            let body = || {
                for n in [0, 1, 7, 1000] {
                    par_for(n, |i| {
                        hits[i].fetch_add(1, SeqCst);
                    });
                }
            };
            pool.install(|| if team { step(body) } else { body() });
            hits.iter().map(|h| h.load(SeqCst)).collect::<Vec<_>>()
        };
        let want: Vec<usize> = (0..1000)
            .map(|i| (i < 1) as usize + (i < 7) as usize + 1)
            .collect();
        assert_eq!(count(false), want);
        assert_eq!(count(true), want);
    }

    #[test]
    fn chunks_cover_the_data_once_at_their_starts() {
        let pool = pool(2);
        for team in [false, true] {
            for n in [0usize, 1, 300, 5000, 40_000] {
                let mut v = vec![0usize; n];
                let body = |v: &mut Vec<usize>| {
                    par_chunks_mut(v, 16384, |start, c| {
                        for (j, x) in c.iter_mut().enumerate() {
                            *x += start + j + 1;
                        }
                    })
                };
                pool.install(|| {
                    if team {
                        step(|| body(&mut v))
                    } else {
                        body(&mut v)
                    }
                });
                assert!(v.iter().enumerate().all(|(i, &x)| x == i + 1), "{n}");
            }
        }
    }

    #[test]
    fn helpers_take_items_and_a_nested_step_joins_the_outer_one() {
        let pool = pool(2);
        let threads = pool.install(|| {
            step(|| {
                step(|| {
                    let seen: Vec<AtomicUsize> = (0..64).map(|_| AtomicUsize::new(0)).collect();
                    // enough items, each long enough, that the helper gets some
                    par_for(64, |i| {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                        seen[i].store(rayon::current_thread_index().unwrap() + 1, SeqCst);
                    });
                    let mut t: Vec<usize> = seen.iter().map(|s| s.load(SeqCst)).collect();
                    t.sort();
                    t.dedup();
                    t
                })
            })
        });
        assert_eq!(threads, vec![1, 2], "both threads of the pool took items");
    }

    #[test]
    fn a_panicking_item_reaches_the_step_and_the_helpers_stop() {
        let pool = pool(2);
        let r = pool.install(|| {
            catch_unwind(AssertUnwindSafe(|| {
                step(|| par_for(16, |i| assert!(i != 5, "item 5")))
            }))
        });
        assert!(r.is_err());
        // the pool still works: no helper is left spinning in the old team
        assert_eq!(pool.install(|| step(|| 7)), 7);
    }
}
