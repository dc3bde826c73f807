//! The communicator of a training run: the processes (ranks) that train it together and the
//! few collectives they need. One process (`Single`), or the ranks of an MPI job started by
//! `mpirun` or `srun --mpi=pmix` (`mpi` feature, `make mpi`).
//!
//! Data parallelism as HF DDP does it: every rank holds the whole model and LoRA weights and
//! takes its share of each optimizer step's batch; the gradients (small: LoRA only) and the
//! loss are summed across ranks through host memory, so every rank applies the same update.
//! MPI is called from one thread (the one that started it), as `MPI_THREAD_FUNNELED` allows.
//!
//! A collective that cannot complete never hangs: while a rank waits in one, a watchdog thread
//! checks the other ranks on its node twice a second and fails the run at once, naming the
//! rank, when one of them has exited; it fails it after `--ddp-timeout` seconds (HF's name)
//! whatever the cause.

use anyhow::Result;

/// The ranks of a run and the collectives between them. All ranks call the same collectives
/// in the same order.
pub trait Communicator {
    /// This process's rank, 0 for the one that writes.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// This process's rank among the ranks on its node (its GPU).
    fn local_rank(&self) -> usize;
    /// Sums `buf` across ranks, in place; `what` names it in a failure message.
    fn sum_f32(&self, buf: &mut [f32], what: &str);
    /// Sums `buf` across ranks, in place.
    fn sum_f64(&self, buf: &mut [f64], what: &str);
    /// Seconds spent in collectives so far: moving the data, and waiting for the other ranks
    /// to reach them (the slowest rank's work).
    fn collective_s(&self) -> (f64, f64);
    /// Ends every rank now (an error on this rank alone, after saying so): exits with `code`.
    fn abort(&self, code: i32) -> !;
}

/// One process: every collective is the identity.
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn sum_f32(&self, _: &mut [f32], _: &str) {}
    fn sum_f64(&self, _: &mut [f64], _: &str) {}
    fn collective_s(&self) -> (f64, f64) {
        (0.0, 0.0)
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// Whether any rank says `flag` (a stop asked for by a signal on one rank stops all).
pub fn any(comm: &dyn Communicator, flag: bool, what: &str) -> bool {
    let mut v = [flag as u8 as f64];
    comm.sum_f64(&mut v, what);
    v[0] > 0.0
}

/// Waits until every rank is here.
pub fn barrier(comm: &dyn Communicator, what: &str) {
    comm.sum_f64(&mut [0.0], what);
}

/// Sums tensors (gradients) across ranks through host memory: one collective for all of them.
pub fn sum_tensors(comm: &dyn Communicator, ts: &mut [candle_core::Tensor]) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let mut flat = Vec::with_capacity(ts.iter().map(|t| t.elem_count()).sum());
    for t in ts.iter() {
        flat.extend(
            t.flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?,
        );
    }
    comm.sum_f32(&mut flat, "the gradients");
    let mut off = 0;
    for t in ts.iter_mut() {
        let n = t.elem_count();
        *t = candle_core::Tensor::from_slice(&flat[off..off + n], t.shape(), t.device())?
            .to_dtype(t.dtype())?;
        off += n;
    }
    Ok(())
}

/// An error on the ranks that did not fail, when another did: their process exits with the
/// failing rank's status and says nothing (that rank said what went wrong).
#[derive(Debug)]
pub struct OtherRankFailed {
    pub rank: usize,
    pub code: i32,
}

impl std::fmt::Display for OtherRankFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} failed (status {})", self.rank, self.code)
    }
}

impl std::error::Error for OtherRankFailed {}

/// Makes a step that may fail on some ranks (loading, checking the output directory) one
/// outcome for all: the first failing rank returns its error, every other rank
/// `OtherRankFailed` with that rank's exit status, so no rank goes on alone into a collective
/// the failed one never reaches.
pub fn agree<T>(comm: &dyn Communicator, r: Result<T>, what: &str) -> Result<T> {
    if comm.size() == 1 {
        return r;
    }
    let mut codes = vec![0f64; comm.size()];
    if let Err(e) = &r {
        codes[comm.rank()] = crate::cli::exit_code(e) as f64;
    }
    comm.sum_f64(&mut codes, what);
    match codes.iter().position(|&c| c != 0.0) {
        None => r,
        Some(first) if first == comm.rank() => r,
        Some(first) => Err(anyhow::Error::new(OtherRankFailed {
            rank: first,
            code: match &r {
                Err(e) => crate::cli::exit_code(e),
                Ok(_) => codes[first] as i32,
            },
        })),
    }
}

/// How this process was started: the number of tasks a launcher says it started (srun's
/// `SLURM_STEP_NUM_TASKS`, mpirun's `OMPI_COMM_WORLD_SIZE`, a PMI's `PMI_SIZE`) and which.
pub fn launched_as() -> Option<(usize, &'static str)> {
    let var = |k: &'static str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map(|n| (n, k))
    };
    var("OMPI_COMM_WORLD_SIZE")
        .or_else(|| var("PMI_SIZE"))
        // inside an srun step (a batch script alone has SLURM_NTASKS of its allocation)
        .or_else(|| {
            std::env::var_os("SLURM_STEP_ID")?;
            var("SLURM_STEP_NUM_TASKS").or_else(|| var("SLURM_NTASKS"))
        })
}

/// The communicator of this process: MPI's world in a build with the `mpi` feature, else one
/// process, refused when a launcher started several (N identical runs would race on one
/// output directory). `timeout_s`: how long a collective may wait (`--ddp-timeout`).
pub fn world(timeout_s: f64) -> Result<Box<dyn Communicator>> {
    #[cfg(feature = "mpi")]
    {
        mpi_world::Mpi::init(timeout_s).map(|m| Box::new(m) as Box<dyn Communicator>)
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = timeout_s;
        if let Some((n, var)) = launched_as().filter(|(n, _)| *n > 1) {
            return Err(crate::cli::usage(format!(
                "this process is one of {n} tasks ({var}={n}), but this trainer was built without MPI, so each would train the whole run alone into the same output directory: build the MPI trainer with `make mpi` (target/mpi/release/trainer; needs an MPI such as Debian's libopenmpi-dev) and launch it with mpirun or srun --mpi=pmix, or start one task"
            )));
        }
        Ok(Box::new(Single))
    }
}

#[cfg(feature = "mpi")]
mod mpi_world;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_process_agrees_with_itself_and_sums_nothing() {
        let c = Single;
        let mut v = [1.0f32, 2.0];
        c.sum_f32(&mut v, "x");
        assert_eq!(v, [1.0, 2.0]);
        assert!(any(&c, true, "x") && !any(&c, false, "x"));
        assert!(agree(&c, Err::<(), _>(anyhow::anyhow!("boom")), "x").is_err());
        assert_eq!(agree(&c, Ok(3), "x").unwrap(), 3);
    }
}
