//! The MPI communicator (`mpi` feature): MPI's world, through the `mpi` crate (rsmpi) over the
//! system's MPI (Open MPI or MPICH).

use super::{launched_as, Communicator};
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use mpi::Threading;
use std::cell::Cell;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bytes of a host name kept for messages about other ranks.
const HOST_BYTES: usize = 64;

pub struct Mpi {
    /// Dropped last: MPI_Finalize.
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    local_rank: usize,
    /// Watched by a thread that fails the run when a collective cannot complete.
    watch: Arc<Watch>,
    /// Seconds moving data in collectives, and waiting for the other ranks to reach them.
    in_collectives: Cell<f64>,
    waiting: Cell<f64>,
}

/// The srun trap: started by srun without an MPI plugin, every rank would come up alone
/// (world size 1) or MPI would refuse to start; say which `--mpi` to use instead.
fn check_srun_plugin() -> Result<()> {
    if let Some((n, var)) = launched_as().filter(|(n, v)| *n > 1 && v.starts_with("SLURM")) {
        let pmi = ["PMIX_RANK", "PMI_RANK", "PMI_FD"]
            .iter()
            .any(|k| std::env::var_os(k).is_some());
        if !pmi {
            bail!(
                "srun started {n} tasks ({var}={n}) without an MPI plugin (SLURM_MPI_TYPE={}), so the ranks cannot find each other: launch with `srun --mpi=pmix` (Open MPI; `srun --mpi=list` shows the plugins), or set MpiDefault=pmix in slurm.conf",
                std::env::var("SLURM_MPI_TYPE").unwrap_or_else(|_| "none".into())
            );
        }
    }
    Ok(())
}

impl Mpi {
    pub fn init(timeout_s: f64) -> Result<Self> {
        check_srun_plugin().map_err(|e| crate::cli::usage(format!("{e:#}")))?;
        let Some((universe, granted)) = mpi::initialize_with_threading(Threading::Funneled) else {
            bail!("MPI was initialised twice");
        };
        if granted < Threading::Funneled {
            bail!("MPI grants threading level {granted:?}; the trainer needs Funneled (MPI calls from one thread while the compute uses many)");
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if let Some((n, var)) = launched_as().filter(|(n, _)| *n != size) {
            return Err(crate::cli::usage(format!(
                "MPI says this run has {size} rank(s), but the launcher started {n} tasks ({var}={n}): each task came up alone and they would race on one output directory; with srun use the plugin that matches this MPI (`srun --mpi=pmix` for Open MPI), or launch with mpirun"
            )));
        }
        let local_rank = world.split_shared(rank as i32).rank() as usize;
        let pid = std::process::id();
        let mut pids = vec![0u32; size];
        world.all_gather_into(&pid, &mut pids[..]);
        let mut host = [0u8; HOST_BYTES];
        let name = crate::train::hostname().unwrap_or_default();
        let n = name.len().min(HOST_BYTES);
        host[..n].copy_from_slice(&name.as_bytes()[..n]);
        let mut all = vec![0u8; HOST_BYTES * size];
        world.all_gather_into(&host[..], &mut all[..]);
        let hosts = all
            .chunks(HOST_BYTES)
            .map(|h| {
                String::from_utf8_lossy(h)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .collect();
        let watch = Arc::new(Watch {
            current: Mutex::new(None),
            rank,
            pids,
            hosts,
            timeout: Duration::from_secs_f64(timeout_s.max(1.0)),
        });
        if size > 1 {
            let w = watch.clone();
            std::thread::Builder::new()
                .name("collective watchdog".into())
                .spawn(move || w.run())?;
        }
        Ok(Mpi {
            _universe: universe,
            world,
            rank,
            size,
            local_rank,
            watch,
            in_collectives: Cell::new(0.0),
            waiting: Cell::new(0.0),
        })
    }

    /// Reduced on rank 0, then broadcast from it: every rank gets the very same bits, which an
    /// all-reduce does not promise beyond two ranks (its order of additions may differ by
    /// rank), so the ranks' LoRA weights never drift apart.
    ///
    /// A barrier first parts the time spent waiting for the other ranks (the slowest one's
    /// work) from the time moving the data.
    fn sum<T: Equivalence + Copy>(&self, buf: &mut [T], what: &str) {
        let send = buf.to_vec();
        let t0 = Instant::now();
        self.watch.enter(what);
        self.world.barrier();
        let t1 = Instant::now();
        let root = self.world.process_at_rank(0);
        if self.rank == 0 {
            root.reduce_into_root(&send[..], buf, SystemOperation::sum());
        } else {
            root.reduce_into(&send[..], SystemOperation::sum());
        }
        root.broadcast_into(buf);
        self.watch.leave();
        self.waiting
            .set(self.waiting.get() + (t1 - t0).as_secs_f64());
        self.in_collectives
            .set(self.in_collectives.get() + t1.elapsed().as_secs_f64());
    }
}

/// What the watchdog thread watches: the collective this rank is in, and since when. MPI
/// itself is only called from the rank's own thread; the watchdog only reads /proc and, when
/// a collective cannot complete, says so and ends the process.
struct Watch {
    current: Mutex<Option<(Instant, String)>>,
    rank: usize,
    pids: Vec<u32>,
    hosts: Vec<String>,
    timeout: Duration,
}

impl Watch {
    fn enter(&self, what: &str) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), what.to_string()));
    }

    fn leave(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Checks twice a second, for as long as the process lives.
    fn run(&self) {
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let current = self
                .current
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let Some((since, what)) = current else {
                continue;
            };
            let waited = since.elapsed();
            if waited < Duration::from_millis(500) {
                continue;
            }
            let gone = self.gone_ranks();
            if !gone.is_empty() || waited > self.timeout {
                self.fail(&what, &gone);
            }
        }
    }

    /// The ranks on this node whose process has ended (gone, or a zombie).
    fn gone_ranks(&self) -> Vec<usize> {
        let me = &self.hosts[self.rank];
        (0..self.pids.len())
            .filter(|&r| r != self.rank && &self.hosts[r] == me)
            .filter(|&r| {
                match std::fs::read_to_string(format!("/proc/{}/stat", self.pids[r])) {
                    Err(_) => true,
                    // the state follows the parenthesised command name
                    Ok(s) => s.rsplit_once(')').is_some_and(|(_, rest)| {
                        matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))
                    }),
                }
            })
            .collect()
    }

    /// Ends this rank when a collective cannot complete; the message names the rank(s) gone.
    fn fail(&self, what: &str, gone: &[usize]) -> ! {
        let msg = if gone.is_empty() {
            format!(
                "rank {}: the other ranks did not join the collective on {what} within --ddp-timeout {} s (a rank on another node may have died or hung: see its log); stopping this rank",
                self.rank,
                self.timeout.as_secs()
            )
        } else {
            let names: Vec<String> = gone
                .iter()
                .map(|&r| format!("rank {r} (pid {} on {})", self.pids[r], self.hosts[r]))
                .collect();
            format!(
                "rank {}: {} exited while the others waited for it in the collective on {what}; stopping this rank too (nothing is saved past the last checkpoint; resume from it)",
                self.rank,
                names.join(", ")
            )
        };
        crate::train::record_failure(&msg);
        eprintln!("trainer: error: {msg}");
        // not MPI_Finalize, which would wait for the rank that is gone
        std::process::exit(crate::cli::exit::ERROR)
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn sum_f32(&self, buf: &mut [f32], what: &str) {
        if self.size > 1 {
            self.sum(buf, what)
        }
    }
    fn sum_f64(&self, buf: &mut [f64], what: &str) {
        if self.size > 1 {
            self.sum(buf, what)
        }
    }
    fn collective_s(&self) -> (f64, f64) {
        (self.in_collectives.get(), self.waiting.get())
    }
    fn abort(&self, code: i32) -> ! {
        if self.size == 1 {
            std::process::exit(code)
        }
        self.world.abort(code)
    }
}
