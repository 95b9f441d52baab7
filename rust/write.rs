//! The write stage: every output tensor is a byte copy of one source, a dtype conversion of one
//! source, or a blend α·S + (1−α)·M, computed chunk by chunk and written straight to its final offset.
//! [`Session::write`] runs it for one language expert of an opened [`Session`]. A tensor a LoRA
//! adapter updates is B + ΔW, computed in float64 (ΔW a chunk of rows at a time) and rounded once.

/// Buffers per worker when a source is a LoRA adapter: the three of the plain write pass (two
/// sources, one output) and two float64 value arrays.
pub const BUFFERS_LORA: usize = 5;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::analyze::plan::{Decision, Plan};
use crate::budget::{run_pool, Budget, BufferPool};
use crate::dtype::{
    cast, cast_mut, decode_f32, decode_f64, encode_f32, encode_f64, AlignedBuf, Dtype, BATCH,
};
use crate::error::{Error, Result};
use crate::expert::{Expert, Term};
use crate::io::writer::OutputTensor;
use crate::io::{MemoryRegion, Model, OutputWriter, ShardMap};
use crate::layout::Place;
use crate::lora::Adapter;
use crate::official;
use crate::open::Session;
use crate::options::Numerics;
use crate::progress::{Phase, Progress};
use crate::stream::{chunks, ordered_try_for_each, read_elems, Chunk};

/// What writing one language expert did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WriteSummary {
    /// Files written (shards and index), inside the output folder.
    pub files: Vec<PathBuf>,
    /// Output tensors.
    pub tensors: usize,
    /// Bytes of tensor data written (all of it, less what was cloned).
    pub bytes_written: u64,
    /// Bytes of tensor data shared with an input's blocks instead of written (copy-on-write file
    /// systems only; 0 elsewhere).
    pub bytes_cloned: u64,
    /// Seconds spent.
    pub seconds: f64,
    /// Tensors outside the layers that only the language expert has (not the safety expert): copied
    /// from the language expert whatever the `outside` policy, and listed in the report as a warning.
    pub expert_only: Vec<String>,
}

impl Session {
    /// Writes language expert `expert`'s merged model, as `plan` decides it, into the existing, empty
    /// folder `out_dir`. With `sync` false the final sync to disk is left to the caller (see
    /// [`OutputWriter::finish`]). Refuses to finish when an input changed since it was opened.
    pub fn write(
        &self,
        expert: usize,
        plan: &Plan,
        out_dir: &Path,
        sync: bool,
        progress: &Progress,
    ) -> Result<WriteSummary> {
        let specs = self.outputs(expert, plan)?;
        // Laid out like the host's own shards where possible, so that on a copy-on-write file system
        // the tensors copied whole share the inputs' blocks instead of being written.
        // (A LoRA expert has no shards of its own: the plain layout.)
        let like = match &self.experts[expert] {
            Expert::Full(m) => ShardMap::like(m, &specs, plan.options.shard_size)?,
            Expert::Lora { .. } => None,
        };
        let shards = match like {
            Some(s) => s,
            None => ShardMap::new(&specs, plan.options.shard_size)?,
        };
        let mut writer = OutputWriter::create(out_dir, &shards)?;
        if self.bigger_than_memory() {
            writer = writer.drop_behind();
        }
        self.write_into(expert, plan, &shards, writer, sync, progress)
    }

    /// [`Session::write`] into memory: fills `buffers`, one per tensor of [`Session::outputs`] in that
    /// order, each exactly its tensor's size (the memory sink beside the file one). Nothing is
    /// written to disk; the summary lists no files.
    pub fn write_memory(
        &self,
        expert: usize,
        plan: &Plan,
        buffers: Vec<MemoryRegion>,
        progress: &Progress,
    ) -> Result<WriteSummary> {
        let specs = self.outputs(expert, plan)?;
        let shards = ShardMap::in_memory(&specs)?;
        let writer = OutputWriter::memory(&shards, buffers)?;
        self.write_into(expert, plan, &shards, writer, false, progress)
    }

    /// The tensors of language expert `expert`'s merged model, in output order: name, dtype (the
    /// plan's `out_dtype` for floats; other tensors keep theirs) and shape. Checks the plan first.
    pub fn outputs(&self, expert: usize, plan: &Plan) -> Result<Vec<(String, Dtype, Vec<u64>)>> {
        let options = &plan.options;
        options.validate()?;
        plan.check()?;
        let Some(host) = self.experts.get(expert) else {
            return Err(Error::argument(format!(
                "no language expert {expert} in a session of {}",
                self.experts.len()
            )));
        };
        if plan.n_layers != self.layout.n_layers || plan.layout != self.layout.def.name {
            return Err(Error::argument(format!(
                "the plan is for a {}-layer '{}' model but {} is a {}-layer '{}' model",
                plan.n_layers,
                plan.layout,
                host.path().display(),
                self.layout.n_layers,
                self.layout.def.name
            )));
        }
        self.check_vocab(expert, options)?;
        // A tensor made from LoRA factors cannot be computed in the authors' arithmetic.
        if (self.safety.adapter().is_some() || host.adapter().is_some())
            && options.numerics == Numerics::Official
        {
            return Err(Error::argument(
                "numerics 'official' takes full models only; LoRA adapter experts need numerics 'exact'",
            ));
        }
        Ok(host
            .tensors()
            .iter()
            // Non-float tensors (masks, position ids) keep their type: only floats are converted.
            .map(|(n, t)| {
                (
                    n.clone(),
                    if t.dtype.is_float() {
                        options.out_dtype.unwrap_or(t.dtype)
                    } else {
                        t.dtype
                    },
                    t.shape.clone(),
                )
            })
            .collect())
    }

    /// The write pass into `writer`, laid out as `shards` (made from [`Session::outputs`]).
    fn write_into(
        &self,
        expert: usize,
        plan: &Plan,
        shards: &ShardMap,
        writer: OutputWriter,
        sync: bool,
        progress: &Progress,
    ) -> Result<WriteSummary> {
        let options = &plan.options;
        let host = &self.experts[expert];
        let started = Instant::now();
        // The analyze pass read the measured tensors in this order and ended with the last ones,
        // which the page cache still holds when the inputs are bigger than memory: they are written
        // first (reverse order), before reading anything else evicts them; the tensors the pass did
        // not read come last.
        let targets = self.layout.targets();
        let pass_order: std::collections::HashMap<&str, usize> =
            targets.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let jobs: Vec<Job> = shards
            .tensors
            .iter()
            .map(|out| {
                let place = self.layout.place(&out.name);
                let measured = matches!(place, Place::Layer { target: true, .. });
                // Only the host has it, or it is not a float (a mask or position ids cannot be blended
                // and never learns): the language expert's bytes.
                let (decision, alpha) = if self.safety.tensor(&out.name).is_none() || !out.dtype.is_float() {
                    (Decision::Expert, 0.0)
                } else {
                    plan.decision_at(place)
                };
                Job {
                    out,
                    decision,
                    alpha,
                    rank: match pass_order.get(out.name.as_str()) {
                        Some(&i) => targets.len() - 1 - i,
                        None => targets.len(),
                    },
                    check_finite: !measured && !options.allow_non_finite,
                    refuse_overflow: !options.allow_non_finite,
                }
            })
            .collect();
        // A tensor made from LoRA factors is computed in float64 in two more chunk-sized buffers.
        let lora = self.safety.adapter().is_some() || host.adapter().is_some();
        let budget = if lora {
            // Each worker also reads the factors a chunk needs: counted as scratch.
            let adapters = [self.safety.adapter(), host.adapter()];
            Budget::plan_with_scratch(options.max_memory, options.threads, BUFFERS_LORA, 8, |chunk| {
                Adapter::write_scratch(adapters.iter().flatten().copied(), chunk)
            })?
        } else {
            Budget::plan(options.max_memory, options.threads, 3, self.widest(options))?
        };
        progress.start(Phase::Write, shards.total_data_bytes());
        run_pool(budget.workers, || {
            let pool = BufferPool::new(&budget);
            write(
                &jobs,
                &self.base,
                &self.safety,
                host,
                options.numerics,
                &writer,
                budget.chunk_elems,
                &pool,
                progress,
            )
        })??;
        // Data read from a file that changed meanwhile may mix old and new bytes: refuse to finish.
        self.base.check_unchanged()?;
        for m in [&self.safety, host] {
            m.check_unchanged()?;
        }
        progress.start(Phase::Sync, 0);
        let cloned = writer.bytes_cloned();
        let files = writer.finish(shards, sync)?;
        Ok(WriteSummary {
            files,
            tensors: shards.tensors.len(),
            bytes_written: shards.total_data_bytes() - cloned,
            bytes_cloned: cloned,
            seconds: started.elapsed().as_secs_f64(),
            expert_only: host
                .tensors()
                .keys()
                .filter(|n| self.safety.tensor(n).is_none())
                .cloned()
                .collect(),
        })
    }
}

/// One output tensor and how to make it.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    /// Where it goes.
    pub out: &'a OutputTensor,
    /// What it is made of.
    pub decision: Decision,
    /// Weight of the safety expert when `decision` is [`Decision::Blend`].
    pub alpha: f64,
    /// Refuse NaN/Inf in the sources read for this tensor. Set for the tensors the analyze pass
    /// does not read (embeddings, norms, lm_head), unless the user allowed non-finite values: the
    /// data is in cache here anyway, so the check costs next to nothing.
    pub check_finite: bool,
    /// Refuse a converted or blended value that comes out ±Inf from finite inputs (a narrowing
    /// `out_dtype` overflowing), unless the user allowed non-finite values.
    pub refuse_overflow: bool,
    /// Tensors are written in increasing rank (ties in output order), each from its first chunk to its
    /// last (see `Session::write_into`).
    pub rank: usize,
}

/// Chunks a write pass starts ahead of time: while the workers compute and write chunk `i`, the
/// kernel reads the sources of chunks up to `i + READ_AHEAD` (`posix_fadvise(WILLNEED)`), so that
/// reading from disk overlaps computing and writing when the inputs are not in the page cache.
const READ_AHEAD: usize = 4;

/// Writes `jobs` on the current rayon pool.
#[allow(clippy::too_many_arguments)]
pub fn write(
    jobs: &[Job<'_>],
    base: &Model,
    safety_src: &Expert,
    expert_src: &Expert,
    numerics: Numerics,
    writer: &OutputWriter,
    chunk_elems: usize,
    pool: &BufferPool,
    progress: &Progress,
) -> Result<()> {
    let numels: Vec<u64> = jobs.iter().map(|j| j.out.shape.iter().product()).collect();
    let mut work = chunks(&numels, chunk_elems);
    work.sort_by_key(|c| jobs[c.tensor].rank); // stable: output order, then chunk order, within a rank
    ordered_try_for_each(work.len(), |i| {
        progress.check()?;
        if let Some(ahead) = work.get(i + READ_AHEAD) {
            read_ahead(&jobs[ahead.tensor], ahead, base, safety_src, expert_src);
        }
        let c = &work[i];
        let job = &jobs[c.tensor];
        let out = job.out;
        let mut bufs = pool.take();
        let out_bytes = c.len * out.dtype.size();
        let dst = out.offset + c.start * out.dtype.size() as u64;
        // Full models (and tensors an adapter leaves alone or saved whole) are bytes; a tensor an
        // adapter updates is B + ΔW, computed in float64 and rounded once.
        let terms = match job.decision {
            Decision::Safety => [Some(safety_src.term(&out.name, base)), None],
            Decision::Expert => [None, Some(expert_src.term(&out.name, base))],
            Decision::Blend => [
                Some(safety_src.term(&out.name, base)),
                Some(expert_src.term(&out.name, base)),
            ],
        };
        let plain = match terms {
            [Some(Term::Bytes(s, ts)), Some(Term::Bytes(m, tm))] => Some((s, m, ts.dtype == tm.dtype)),
            [Some(Term::Bytes(s, _)), None] => Some((s, s, true)),
            [None, Some(Term::Bytes(m, _))] => Some((m, m, true)),
            _ => None,
        };
        let Some((safety, expert, true)) = plain else {
            let read = write_f64(job, terms, c.start, c.len, &mut bufs, writer, dst)?;
            progress.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
            progress.advance(out_bytes as u64);
            return Ok(());
        };
        let [a, b, o] = &mut bufs[..3] else {
            unreachable!("write pass needs three buffers")
        };
        let read = match job.decision {
            Decision::Safety | Decision::Expert => {
                let src = if job.decision == Decision::Safety {
                    safety
                } else {
                    expert
                };
                // The term's tensor, not a lookup by name: an adapter saves tensors under PEFT's names.
                let ([Some(Term::Bytes(_, t)), None] | [None, Some(Term::Bytes(_, t))]) = terms else {
                    unreachable!("a copy has one byte source")
                };
                let verbatim = t.dtype == out.dtype
                    && (numerics == Numerics::Exact || t.dtype == Dtype::BF16 || !t.dtype.is_float());
                if verbatim && (!job.check_finite || writer.may_clone()) {
                    // A byte copy: in the kernel, without passing through us, or shared with the
                    // source's blocks on a copy-on-write file system. Where values must be checked,
                    // they are read for the check only (still cheaper than writing them).
                    let (size, n) = (t.dtype.size() as u64, c.len * t.dtype.size());
                    if job.check_finite {
                        let bytes = read_elems(src, t, c.start, c.len, b)?;
                        if !all_finite(t.dtype, bytes) {
                            return Err(Error::NonFinite {
                                path: src.shard_of(t).path.clone(),
                                tensor: out.name.clone(),
                            });
                        }
                        progress.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    writer.copy_from(
                        out.shard,
                        dst,
                        src.shard_of(t),
                        t.offset + c.start * size,
                        n,
                        a.bytes_mut(n),
                    )?;
                    progress.bytes_read.fetch_add(n as u64, Ordering::Relaxed);
                    progress.advance(out_bytes as u64);
                    return Ok(());
                }
                let bytes = read_elems(src, t, c.start, c.len, a)?;
                if job.check_finite && !all_finite(t.dtype, bytes) {
                    return Err(Error::NonFinite {
                        path: src.shard_of(t).path.clone(),
                        tensor: out.name.clone(),
                    });
                }
                if verbatim {
                    writer.write_at(out.shard, dst, bytes)?;
                } else {
                    convert(t.dtype, bytes, out.dtype, o.bytes_mut(out_bytes), numerics);
                    if job.refuse_overflow
                        && !all_finite(out.dtype, o.bytes(out_bytes))
                        && all_finite(t.dtype, bytes)
                    {
                        return Err(overflow(&src.shard_of(t).path, &out.name, t.dtype, out.dtype));
                    }
                    writer.write_at(out.shard, dst, o.bytes(out_bytes))?;
                }
                bytes.len()
            }
            Decision::Blend => {
                let [Some(Term::Bytes(_, ts)), Some(Term::Bytes(_, tm))] = terms else {
                    unreachable!("a plain blend has two byte sources")
                };
                let s = read_elems(safety, ts, c.start, c.len, a)?;
                let m = read_elems(expert, tm, c.start, c.len, b)?;
                if job.check_finite {
                    for (src, t, bytes) in [(safety, ts, s), (expert, tm, m)] {
                        if !all_finite(t.dtype, bytes) {
                            return Err(Error::NonFinite {
                                path: src.shard_of(t).path.clone(),
                                tensor: out.name.clone(),
                            });
                        }
                    }
                }
                blend(
                    ts.dtype,
                    s,
                    m,
                    out.dtype,
                    o.bytes_mut(out_bytes),
                    job.alpha,
                    numerics,
                );
                if job.refuse_overflow
                    && !all_finite(out.dtype, o.bytes(out_bytes))
                    && all_finite(ts.dtype, s)
                    && all_finite(tm.dtype, m)
                {
                    return Err(overflow(
                        &expert.shard_of(tm).path,
                        &out.name,
                        ts.dtype,
                        out.dtype,
                    ));
                }
                writer.write_at(out.shard, dst, o.bytes(out_bytes))?;
                s.len() + m.len()
            }
        };
        progress.bytes_read.fetch_add(read as u64, Ordering::Relaxed);
        progress.advance(out_bytes as u64);
        Ok(())
    })
}

/// Asks the kernel to start reading the source bytes of chunk `c` of `job` (advisory; a tensor in
/// memory or in the page cache costs a lookup).
fn read_ahead(job: &Job<'_>, c: &Chunk, base: &Model, safety_src: &Expert, expert_src: &Expert) {
    let name = &job.out.name;
    let sources = match job.decision {
        Decision::Safety => [Some(safety_src), None],
        Decision::Expert => [None, Some(expert_src)],
        Decision::Blend => [Some(safety_src), Some(expert_src)],
    };
    for src in sources.into_iter().flatten() {
        if let Term::Bytes(model, t) = src.term(name, base) {
            let size = t.dtype.size();
            model.shard_of(t).advise(
                t.offset + c.start * size as u64,
                c.len * size,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// Writes one chunk of a tensor with a LoRA source, or whose two sources differ in dtype: every term
/// as float64 values, blended in float64 if there are two (α·S + (1−α)·M), rounded once to the
/// output dtype. Returns the bytes read.
fn write_f64(
    job: &Job<'_>,
    terms: [Option<Term<'_>>; 2],
    start: u64,
    len: usize,
    bufs: &mut [AlignedBuf],
    writer: &OutputWriter,
    dst: u64,
) -> Result<usize> {
    let out = job.out;
    let [raw, o, vs, vm, ..] = bufs else {
        unreachable!("{BUFFERS_LORA} buffers with LoRA sources")
    };
    let mut read = 0;
    let mut source = (std::path::PathBuf::new(), out.dtype);
    let mut values = |term: Term<'_>, v: &mut AlignedBuf| -> Result<()> {
        let v = cast_mut::<f64>(v.bytes_mut(len * 8));
        let (path, name) = match term {
            Term::Bytes(model, t) => {
                let bytes = read_elems(model, t, start, len, raw)?;
                decode_all_f64(t.dtype, bytes, v);
                read += bytes.len();
                source = (model.shard_of(t).path.clone(), t.dtype);
                (model.shard_of(t).path.clone(), out.name.clone())
            }
            Term::Delta {
                adapter,
                module,
                base,
                tensor,
            } => {
                adapter.delta_into(module, start, v)?;
                let bytes = read_elems(base, tensor, start, len, raw)?;
                let size = tensor.dtype.size();
                let mut b = [0f64; BATCH];
                for (lo, vv) in (0..len).step_by(BATCH).zip(v.chunks_mut(BATCH)) {
                    let b = &mut b[..vv.len()];
                    decode_f64(tensor.dtype, &bytes[lo * size..(lo + vv.len()) * size], b);
                    vv.iter_mut().zip(b.iter()).for_each(|(d, b)| *d += *b);
                }
                read += bytes.len();
                source = (adapter.file.path.clone(), tensor.dtype);
                (adapter.file.path.clone(), module.a.clone())
            }
        };
        if job.check_finite && !v.iter().fold(true, |acc, x| acc & x.is_finite()) {
            return Err(Error::NonFinite { path, tensor: name });
        }
        Ok(())
    };
    match terms {
        [Some(t), None] | [None, Some(t)] => values(t, vs)?,
        [Some(s), Some(m)] => {
            values(s, vs)?;
            values(m, vm)?;
            let (ws, wm) = (job.alpha, 1.0 - job.alpha);
            let vm = cast::<f64>(vm.bytes(len * 8));
            cast_mut::<f64>(vs.bytes_mut(len * 8))
                .iter_mut()
                .zip(vm)
                .for_each(|(a, b)| *a = ws * *a + wm * *b);
        }
        [None, None] => unreachable!("every output tensor has a source"),
    }
    let out_bytes = len * out.dtype.size();
    let v = cast::<f64>(vs.bytes(len * 8));
    encode_f64(v, out.dtype, o.bytes_mut(out_bytes));
    if job.refuse_overflow && !all_finite(out.dtype, o.bytes(out_bytes)) && v.iter().all(|x| x.is_finite()) {
        return Err(overflow(&source.0, &out.name, source.1, out.dtype));
    }
    writer.write_at(out.shard, dst, o.bytes(out_bytes))?;
    Ok(read)
}

/// Decodes any number of raw elements to f64 (exact), [`BATCH`] at a time.
fn decode_all_f64(dtype: Dtype, src: &[u8], dst: &mut [f64]) {
    let size = dtype.size();
    for (lo, d) in (0..dst.len()).step_by(BATCH).zip(dst.chunks_mut(BATCH)) {
        decode_f64(dtype, &src[lo * size..(lo + d.len()) * size], d);
    }
}

/// The error for finite values that became ±Inf in a narrower output dtype.
fn overflow(path: &std::path::Path, tensor: &str, from: Dtype, to: Dtype) -> Error {
    Error::argument(format!(
        "{}: tensor '{tensor}': {from} values overflow to Inf in the output dtype {to}; choose a wider --out-dtype \
         (--allow-non-finite, or allow_non_finite=True in Python, writes them anyway)",
        path.display()
    ))
}

/// True when no element of `bytes` is NaN or ±Inf (exponent bits all ones). Branch-free so that it
/// vectorises: it runs over every byte of the unmeasured tensors in the write pass.
pub fn all_finite(dtype: Dtype, bytes: &[u8]) -> bool {
    match dtype {
        Dtype::BF16 => {
            cast::<u16>(bytes)
                .iter()
                .fold(0u16, |acc, &v| acc | u16::from(v & 0x7F80 == 0x7F80))
                == 0
        }
        Dtype::F16 => {
            cast::<u16>(bytes)
                .iter()
                .fold(0u16, |acc, &v| acc | u16::from(v & 0x7C00 == 0x7C00))
                == 0
        }
        Dtype::F32 => cast::<f32>(bytes).iter().fold(true, |acc, v| acc & v.is_finite()),
        Dtype::F64 => cast::<f64>(bytes).iter().fold(true, |acc, v| acc & v.is_finite()),
        Dtype::Opaque(_) => true,
    }
}

/// Converts one source's elements to another dtype (official numerics: through bf16, as the authors
/// load every checkpoint in bf16).
pub fn convert(src_dtype: Dtype, src: &[u8], out_dtype: Dtype, out: &mut [u8], numerics: Numerics) {
    let (si, so) = (src_dtype.size(), out_dtype.size());
    let n = src.len() / si;
    if (src_dtype == Dtype::F64 || out_dtype == Dtype::F64) && numerics == Numerics::Exact {
        let mut v = [0f64; BATCH];
        for lo in (0..n).step_by(BATCH) {
            let hi = (lo + BATCH).min(n);
            decode_f64(src_dtype, &src[lo * si..hi * si], &mut v[..hi - lo]);
            encode_f64(&v[..hi - lo], out_dtype, &mut out[lo * so..hi * so]);
        }
        return;
    }
    let mut v = [0f32; BATCH];
    for lo in (0..n).step_by(BATCH) {
        let hi = (lo + BATCH).min(n);
        let v = &mut v[..hi - lo];
        decode_f32(src_dtype, &src[lo * si..hi * si], v);
        if numerics == Numerics::Official {
            for x in v.iter_mut() {
                *x = official::load(*x);
            }
        }
        encode_f32(v, out_dtype, &mut out[lo * so..hi * so]);
    }
}

/// out = α·S + (1−α)·M. Exact: computed in f32 (f64 when F64 is involved) with the weights rounded
/// to that type, products and sum each in that type, no fused multiply-add, then rounded once to the
/// output dtype. Official: inputs in bf16, α·S, (1−α)·M and their sum each rounded to bf16 (METHOD.md §6).
pub fn blend(
    in_dtype: Dtype,
    s: &[u8],
    m: &[u8],
    out_dtype: Dtype,
    out: &mut [u8],
    alpha: f64,
    numerics: Numerics,
) {
    let (si, so) = (in_dtype.size(), out_dtype.size());
    let n = s.len() / si;
    if (in_dtype == Dtype::F64 || out_dtype == Dtype::F64) && numerics == Numerics::Exact {
        let (ws, wm) = (alpha, 1.0 - alpha);
        let (mut vs, mut vm) = ([0f64; BATCH], [0f64; BATCH]);
        for lo in (0..n).step_by(BATCH) {
            let hi = (lo + BATCH).min(n);
            let (vs, vm) = (&mut vs[..hi - lo], &mut vm[..hi - lo]);
            decode_f64(in_dtype, &s[lo * si..hi * si], vs);
            decode_f64(in_dtype, &m[lo * si..hi * si], vm);
            vs.iter_mut()
                .zip(vm.iter())
                .for_each(|(a, b)| *a = ws * *a + wm * *b);
            encode_f64(vs, out_dtype, &mut out[lo * so..hi * so]);
        }
        return;
    }
    let (ws, wm) = (alpha as f32, (1.0 - alpha) as f32);
    let (mut vs, mut vm) = ([0f32; BATCH], [0f32; BATCH]);
    for lo in (0..n).step_by(BATCH) {
        let hi = (lo + BATCH).min(n);
        let (vs, vm) = (&mut vs[..hi - lo], &mut vm[..hi - lo]);
        decode_f32(in_dtype, &s[lo * si..hi * si], vs);
        decode_f32(in_dtype, &m[lo * si..hi * si], vm);
        match numerics {
            Numerics::Exact => vs
                .iter_mut()
                .zip(vm.iter())
                .for_each(|(a, b)| *a = ws * *a + wm * *b),
            Numerics::Official => vs
                .iter_mut()
                .zip(vm.iter())
                .for_each(|(a, b)| *a = official::blend(ws, wm, *a, *b)),
        }
        encode_f32(vs, out_dtype, &mut out[lo * so..hi * so]);
    }
}
