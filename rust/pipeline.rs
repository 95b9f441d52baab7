//! The whole job: open and check the models, one statistics pass for every expert, decisions, and a
//! write pass per expert. Each call runs on its own rayon pool sized by the memory budget, so the
//! caller's threads and any global pool are left alone (and a forked child inherits no pool).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::blend::{self, Job};
use crate::budget::{Budget, BufferPool};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::io::{Model, OutputPlan, OutputWriter};
use crate::layout::{Layout, LayoutDef, Place};
use crate::options::MergeOptions;
use crate::plan::Plan;
use crate::progress::{Phase, Progress};
use crate::stats::{self, TensorStats};

/// The three (or more) opened models and the layout they share.
#[derive(Debug)]
pub struct Session {
    /// Base model B.
    pub base: Model,
    /// Safety expert S.
    pub safety: Model,
    /// Language experts M (the hosts).
    pub experts: Vec<Model>,
    /// Layout resolved on the first expert's tensor names.
    pub layout: Layout,
}

/// What a write pass did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteSummary {
    /// Files written (shards and index), inside the output folder.
    pub files: Vec<PathBuf>,
    /// Output tensors.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// Opens the models and checks that they can be merged.
pub fn open(base: &Path, safety: &Path, experts: &[&Path], architecture: Option<&str>, layout: Option<&LayoutDef>) -> Result<Session> {
    if experts.is_empty() {
        return Err(Error::argument("at least one language expert is needed"));
    }
    let base = Model::open(base)?;
    let safety = Model::open(safety)?;
    let experts = experts.iter().map(|p| Model::open(p)).collect::<Result<Vec<_>>>()?;
    let host_names: Vec<&str> = experts[0].tensors.keys().map(|s| s.as_str()).collect();
    let layout = Layout::detect(&host_names, architecture, layout)?;
    let session = Session { base, safety, experts, layout };
    session.check()?;
    Ok(session)
}

fn describe(role: &str, m: &Model) -> String {
    format!("{role} ({})", m.path.display())
}

fn same_tensor(name: &str, a: (&str, &Model), b: (&str, &Model)) -> Result<()> {
    let ta = a.1.tensor(name).expect("caller looked it up");
    let Some(tb) = b.1.tensor(name) else {
        return Err(Error::Incompatible {
            message: format!("tensor '{name}' is in the {} but missing from the {}", describe(a.0, a.1), describe(b.0, b.1)),
        });
    };
    if ta.shape != tb.shape || ta.dtype != tb.dtype {
        return Err(Error::Incompatible {
            message: format!(
                "tensor '{name}': {:?} {} in the {} but {:?} {} in the {}",
                ta.shape,
                ta.dtype,
                describe(a.0, a.1),
                tb.shape,
                tb.dtype,
                describe(b.0, b.1)
            ),
        });
    }
    Ok(())
}

impl Session {
    /// Every expert tensor exists in S with the same shape and dtype; every measured tensor exists in
    /// B too; all models have the same number of layers.
    fn check(&self) -> Result<()> {
        let n_layers = |m: &Model| {
            self.layout.def.resolve(m.tensors.keys().map(|s| s.as_str())).map(|l| l.n_layers).unwrap_or(0)
        };
        let counts: Vec<(String, usize)> = std::iter::once(("base", &self.base))
            .chain(std::iter::once(("safety expert", &self.safety)))
            .chain(self.experts.iter().map(|m| ("language expert", m)))
            .map(|(r, m)| (describe(r, m), n_layers(m)))
            .collect();
        if counts.iter().any(|(_, n)| *n != self.layout.n_layers) {
            let list: Vec<String> = counts.iter().map(|(d, n)| format!("{n} in the {d}")).collect();
            return Err(Error::Incompatible { message: format!("the models have different numbers of decoder layers: {}", list.join(", ")) });
        }
        let targets = self.layout.targets();
        for m in &self.experts {
            for name in m.tensors.keys() {
                same_tensor(name, ("language expert", m), ("safety expert", &self.safety))?;
            }
            for name in &targets {
                if m.tensor(name).is_none() {
                    return Err(Error::Incompatible {
                        message: format!("tensor '{name}' is missing from the {}", describe("language expert", m)),
                    });
                }
                same_tensor(name, ("language expert", m), ("base model", &self.base))?;
            }
        }
        Ok(())
    }

    fn widest(&self, options: &MergeOptions) -> usize {
        let inputs = self.experts[0].tensors.values().map(|t| t.dtype.size()).max().unwrap_or(2);
        inputs.max(options.out_dtype.map(Dtype::size).unwrap_or(0))
    }

    /// One statistics pass over B, S and every expert; then a plan per expert.
    pub fn analyze(&self, options: &MergeOptions, progress: &Progress) -> Result<(Vec<TensorStats>, Vec<Plan>)> {
        options.validate()?;
        let mut models: Vec<&Model> = vec![&self.safety];
        models.extend(self.experts.iter());
        let budget = Budget::plan(options.max_memory, options.threads, models.len() + 1, self.widest(options))?;
        let targets = self.layout.targets();
        let total: u64 = targets.iter().map(|n| self.base.tensor(n).unwrap().nbytes).sum::<u64>() * (models.len() as u64 + 1);
        progress.start(Phase::Stats, total);
        let stats = run_pool(budget.workers, || {
            let pool = BufferPool::new(&budget);
            stats::compute(&targets, &self.base, &models, options.numerics, budget.chunk_elems, &pool, progress)
        })??;
        let plans = (1..models.len()).map(|k| Plan::new(&stats, &self.layout, options, k)).collect();
        Ok((stats, plans))
    }

    /// Writes expert number `expert`'s merged model into the existing, empty folder `out_dir`.
    pub fn write(&self, expert: usize, plan: &Plan, out_dir: &Path, progress: &Progress) -> Result<WriteSummary> {
        let options = &plan.options;
        options.validate()?;
        let started = Instant::now();
        let host = &self.experts[expert];
        let specs: Vec<(String, Dtype, Vec<u64>)> = host
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), options.out_dtype.unwrap_or(t.dtype), t.shape.clone()))
            .collect();
        let out_plan = OutputPlan::new(&specs, options.shard_size)?;
        let jobs: Vec<Job> = out_plan
            .tensors
            .iter()
            .map(|out| Job { out, action: plan.action(self.layout.place(&out.name)) })
            .collect();
        let budget = Budget::plan(options.max_memory, options.threads, 3, self.widest(options))?;
        let writer = OutputWriter::create(out_dir, &out_plan)?;
        progress.start(Phase::Write, out_plan.total_data_bytes());
        run_pool(budget.workers, || {
            let pool = BufferPool::new(&budget);
            blend::write(&jobs, &self.safety, host, options.numerics, &writer, budget.chunk_elems, &pool, progress)
        })??;
        progress.start(Phase::Sync, 0);
        let files = writer.finish(&out_plan)?;
        Ok(WriteSummary {
            files,
            tensors: out_plan.tensors.len(),
            bytes_written: out_plan.total_data_bytes(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Where every tensor of the host model belongs (for `inspect`).
    pub fn places(&self) -> &[(String, Place)] {
        &self.layout.places
    }
}

/// Runs `f` on a fresh rayon pool of `threads` threads.
fn run_pool<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> Result<T> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("layerswap-{i}"))
        .build()
        .map_err(|e| Error::argument(format!("cannot start {threads} worker threads: {e}")))?;
    Ok(pool.install(f))
}
