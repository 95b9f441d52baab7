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
use crate::options::{MergeOptions, VocabSource};
use crate::plan::{Action, Plan};
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
    /// Tensors outside the layers that only the language expert has (not the safety expert): copied
    /// from the language expert whatever the `outside` policy, and listed in the report as a warning.
    pub expert_only: Vec<String>,
}

/// Opens the models and checks that they can be merged; any bad expert is an error.
pub fn open(base: &Path, safety: &Path, experts: &[&Path], architecture: Option<&str>, layout: Option<&LayoutDef>) -> Result<Session> {
    let (session, outcomes) = open_lenient(base, safety, experts, architecture, layout)?;
    for outcome in outcomes {
        outcome?;
    }
    Ok(session)
}

/// Opens B and S (any error is fatal) and every expert; an expert that cannot be opened or does not
/// fit B and S is left out of the session and reported in its slot of the returned list, so one bad
/// expert does not stop the others. Slot `i` holds the expert's index in [`Session::experts`].
pub fn open_lenient(
    base: &Path,
    safety: &Path,
    experts: &[&Path],
    architecture: Option<&str>,
    layout: Option<&LayoutDef>,
) -> Result<(Session, Vec<Result<usize>>)> {
    if experts.is_empty() {
        return Err(Error::argument("at least one language expert is needed"));
    }
    let base = Model::open(base)?;
    let safety = Model::open(safety)?;
    let mut opened: Vec<Result<Model>> = experts.iter().map(|p| Model::open(p)).collect();
    let first = match opened.iter().position(|m| m.is_ok()) {
        Some(i) => i,
        None => return Err(opened.remove(0).unwrap_err()),
    };
    let host_names: Vec<&str> = opened[first].as_ref().unwrap().tensors.keys().map(|s| s.as_str()).collect();
    let host = &opened[first].as_ref().unwrap().path;
    let layout = Layout::detect(&host_names, architecture, layout).map_err(|e| e.in_model(host))?;
    let mut session = Session { base, safety, experts: vec![], layout };
    session.check_shared()?;
    let mut outcomes = vec![];
    for m in opened {
        outcomes.push(m.and_then(|m| {
            session.check_expert(&m)?;
            session.experts.push(m);
            Ok(session.experts.len() - 1)
        }));
    }
    if session.experts.is_empty() {
        let err = outcomes.into_iter().find_map(|o| o.err()).expect("no expert opened");
        return Err(err);
    }
    Ok((session, outcomes))
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
    fn layer_mismatch(&self, models: &[(&str, &Model)]) -> Result<()> {
        let mut counts: Vec<(String, usize)> = vec![];
        for (role, m) in models {
            // A model whose names the layout does not fit at all (another family) says so, not "0 layers".
            let l = self.layout.def.resolve(m.tensors.keys().map(|s| s.as_str())).map_err(|e| Error::Incompatible {
                message: format!("the {} does not have the language expert's layout: {e}", describe(role, m)),
            })?;
            counts.push((describe(role, m), l.n_layers));
        }
        if counts.iter().any(|(_, n)| *n != self.layout.n_layers) {
            let list: Vec<String> = counts.iter().map(|(d, n)| format!("{n} in the {d}")).collect();
            return Err(Error::Incompatible {
                message: format!("the models have different numbers of decoder layers: {} (language expert: {})", list.join(", "), self.layout.n_layers),
            });
        }
        Ok(())
    }

    /// B and S have the layer count of the layout.
    fn check_shared(&self) -> Result<()> {
        self.layer_mismatch(&[("base", &self.base), ("safety expert", &self.safety)])
    }

    /// Every tensor of the expert exists in S with the same shape and dtype; every measured tensor
    /// exists in B too; the expert has the same number of layers.
    fn check_expert(&self, m: &Model) -> Result<()> {
        self.layer_mismatch(&[("language expert", m)])?;
        let own = self.layout.def.resolve(m.tensors.keys().map(|s| s.as_str()))?;
        own.check_assigned()?;
        measured_are_floats(m, &own)?;
        for name in m.tensors.keys() {
            let place = own.place(name);
            if place != self.layout.place(name) {
                return Err(Error::Incompatible {
                    message: format!("tensor '{name}' of the {} is not in the first language expert", describe("language expert", m)),
                });
            }
            match (place, self.safety.tensor(name), m.tensor(name)) {
                // Only the host has it, outside the layers: copied from the host (see WriteSummary).
                (Place::Outside | Place::Vocab, None, _) => continue,
                // Vocabulary shapes may differ; whether that is allowed depends on the options (check_vocab).
                (Place::Vocab, Some(s), Some(t)) if s.shape != t.shape => continue,
                _ => same_tensor(name, ("language expert", m), ("safety expert", &self.safety))?,
            }
        }
        // The measured tensors are the same in B, S and M (else the units would be measured differently).
        for (role, other) in [("base model", &self.base), ("safety expert", &self.safety)] {
            if let Ok(l) = self.layout.def.resolve(other.tensors.keys().map(|s| s.as_str())) {
                if let Some(name) = l.targets().into_iter().find(|n| m.tensor(n).is_none()) {
                    return Err(Error::Incompatible {
                        message: format!("measured tensor '{name}' is in the {} but missing from the {}", describe(role, other), describe("language expert", m)),
                    });
                }
            }
        }
        for name in self.layout.targets() {
            if m.tensor(name).is_none() {
                return Err(Error::Incompatible { message: format!("tensor '{name}' is missing from the {}", describe("language expert", m)) });
            }
            same_tensor(name, ("language expert", m), ("base model", &self.base))?;
        }
        Ok(())
    }

    /// A vocabulary tensor whose shape differs between the safety and language experts is an error
    /// unless `options.vocab_from` takes it from the language expert.
    fn check_vocab(&self, expert: usize, options: &MergeOptions) -> Result<()> {
        if options.vocab_from == VocabSource::Expert {
            return Ok(());
        }
        let m = &self.experts[expert];
        for (name, t) in &m.tensors {
            let Some(s) = self.safety.tensor(name) else { continue };
            if self.layout.place(name) == Place::Vocab && s.shape != t.shape {
                return Err(Error::Incompatible {
                    message: format!(
                        "tensor '{name}': vocabulary shape {:?} in the {} but {:?} in the {}; to take the vocabulary \
                         tensors (embeddings, lm_head) from the language expert, pass --vocab-from expert",
                        t.shape,
                        describe("language expert", m),
                        s.shape,
                        describe("safety expert", &self.safety)
                    ),
                });
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
        // Fail before the statistics pass rather than after it; bulk runs (analyze_with) leave this
        // to each expert's write, so that one expert's vocabulary does not stop the others.
        for k in 0..self.experts.len() {
            self.check_vocab(k, options)?;
        }
        self.analyze_with(&vec![options.clone(); self.experts.len()], None, progress)
    }

    /// One statistics pass over B, every expert and, unless `saved` already holds its statistics, S;
    /// then a plan per expert with that expert's options. The pass itself (numerics, memory, threads)
    /// follows the first expert's options. With `saved`, B's sums are recomputed anyway and must match
    /// the saved ones bit for bit, which proves the saved statistics belong to this base model.
    pub fn analyze_with(&self, options: &[MergeOptions], saved: Option<&[TensorStats]>, progress: &Progress) -> Result<(Vec<TensorStats>, Vec<Plan>)> {
        if options.len() != self.experts.len() {
            return Err(Error::argument(format!("{} option sets for {} experts", options.len(), self.experts.len())));
        }
        for o in options {
            o.validate()?;
            if o.numerics != options[0].numerics {
                return Err(Error::argument("all experts of one run must use the same numerics (statistics are shared)"));
            }
        }
        let pass = &options[0];
        let mut models: Vec<&Model> = vec![];
        if saved.is_none() {
            models.push(&self.safety);
        }
        models.extend(self.experts.iter());
        let budget = Budget::plan(pass.max_memory, pass.threads, models.len() + 1, self.widest(pass))?;
        let targets = self.layout.targets();
        let total: u64 = targets.iter().map(|n| self.base.tensor(n).unwrap().nbytes).sum::<u64>() * (models.len() as u64 + 1);
        progress.start(Phase::Stats, total);
        let mut stats = run_pool(budget.workers, || {
            let pool = BufferPool::new(&budget);
            stats::compute_allowing(&targets, &self.base, &models, pass.numerics, pass.allow_non_finite, budget.chunk_elems, &pool, progress)
        })??;
        if let Some(saved) = saved {
            splice_saved(&mut stats, saved, &self.base)?;
        }
        let plans = options.iter().enumerate().map(|(k, o)| Plan::new(&stats, &self.layout, o, k + 1)).collect();
        Ok((stats, plans))
    }

    /// Writes expert number `expert`'s merged model into the existing, empty folder `out_dir`.
    pub fn write(&self, expert: usize, plan: &Plan, out_dir: &Path, progress: &Progress) -> Result<WriteSummary> {
        self.write_with(expert, plan, out_dir, true, progress)
    }

    /// [`Session::write`], with the final sync to disk optional (see [`OutputWriter::finish`]).
    pub fn write_with(&self, expert: usize, plan: &Plan, out_dir: &Path, sync: bool, progress: &Progress) -> Result<WriteSummary> {
        let options = &plan.options;
        options.validate()?;
        plan.check()?;
        self.check_vocab(expert, options)?;
        let started = Instant::now();
        let host = &self.experts[expert];
        let specs: Vec<(String, Dtype, Vec<u64>)> = host
            .tensors
            .iter()
            // Non-float tensors (masks, position ids) keep their type: only floats are converted.
            .map(|(n, t)| (n.clone(), if t.dtype.is_float() { options.out_dtype.unwrap_or(t.dtype) } else { t.dtype }, t.shape.clone()))
            .collect();
        let out_plan = OutputPlan::new(&specs, options.shard_size)?;
        let jobs: Vec<Job> = out_plan
            .tensors
            .iter()
            .map(|out| {
                let place = self.layout.place(&out.name);
                let measured = matches!(place, Place::Layer { target: true, .. });
                // Only the host has it, or it is not a float (a mask or position ids cannot be blended
                // and never learns): the language expert's bytes.
                let action = if self.safety.tensor(&out.name).is_none() || !out.dtype.is_float() {
                    Action::Expert
                } else {
                    plan.action(place)
                };
                Job { out, action, check_finite: !measured && !options.allow_non_finite }
            })
            .collect();
        let budget = Budget::plan(options.max_memory, options.threads, 3, self.widest(options))?;
        let writer = OutputWriter::create(out_dir, &out_plan)?;
        progress.start(Phase::Write, out_plan.total_data_bytes());
        run_pool(budget.workers, || {
            let pool = BufferPool::new(&budget);
            blend::write(&jobs, &self.safety, host, options.numerics, &writer, budget.chunk_elems, &pool, progress)
        })??;
        // Data read from a file that changed meanwhile may mix old and new bytes: refuse to finish.
        for m in [&self.base, &self.safety, host] {
            m.check_unchanged()?;
        }
        progress.start(Phase::Sync, 0);
        let files = writer.finish(&out_plan, sync)?;
        Ok(WriteSummary {
            files,
            tensors: out_plan.tensors.len(),
            bytes_written: out_plan.total_data_bytes(),
            seconds: started.elapsed().as_secs_f64(),
            expert_only: host.tensors.keys().filter(|n| self.safety.tensor(n).is_none()).cloned().collect(),
        })
    }

    /// Where every tensor of the host model belongs (for `inspect`).
    pub fn places(&self) -> &[(String, Place)] {
        &self.layout.places
    }
}

/// Puts the saved safety-expert sums in front of each tensor's expert sums, after checking that the
/// saved base sums equal the fresh ones.
fn splice_saved(stats: &mut [TensorStats], saved: &[TensorStats], base: &Model) -> Result<()> {
    let by_name: std::collections::HashMap<&str, &TensorStats> = saved.iter().map(|s| (s.name.as_str(), s)).collect();
    for s in stats.iter_mut() {
        let Some(old) = by_name.get(s.name.as_str()) else {
            return Err(Error::argument(format!("saved statistics have no entry for tensor '{}'", s.name)));
        };
        if old.base_ss.to_bits() != s.base_ss.to_bits() || old.numel != s.numel || old.diff_ss.is_empty() {
            return Err(Error::argument(format!(
                "saved statistics do not belong to the base model {} (tensor '{}' differs); recompute them",
                base.path.display(),
                s.name
            )));
        }
        s.diff_ss.insert(0, old.diff_ss[0]);
    }
    Ok(())
}

/// Every measured tensor of `m` is a float tensor (a mask or an integer buffer cannot be measured).
pub fn measured_are_floats(m: &Model, layout: &Layout) -> Result<()> {
    for name in layout.targets() {
        if let Some(t) = m.tensor(name).filter(|t| !t.dtype.is_float()) {
            return Err(Error::Layout {
                message: format!(
                    "measured tensor '{name}' of {} is {}; only float tensors (BF16, F16, F32, F64) can be measured",
                    m.path.display(),
                    t.dtype
                ),
            });
        }
    }
    Ok(())
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
