//! The open stage: open B, S and the language experts once, and check that they fit together (one
//! layout, the same layers, and the same shape and dtype for every tensor that is measured or mixed).
//! The later stages, [`crate::analyze`] and [`crate::write`], run on the [`Session`] this returns and
//! refuse to finish if a file changed since it was opened.

use std::path::{Path, PathBuf};

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::expert::{Expert, TensorSet};
use crate::io::{Model, Stamp};
use crate::layout::{Layout, LayoutDef, Place};
use crate::options::{MergeOptions, VocabSource};

/// The three (or more) opened models and the layout they share.
#[derive(Debug)]
pub struct Session {
    /// Base model B.
    pub base: Model,
    /// Safety expert S (a full model or a LoRA adapter over B).
    pub safety: Expert,
    /// Language experts M (the hosts; full models or LoRA adapters over B).
    pub experts: Vec<Expert>,
    /// Layout resolved on the first expert's tensor names.
    pub layout: Layout,
}

/// Opens the models and checks that they can be merged; any bad expert is an error.
pub fn open(
    base: &Path,
    safety: &Path,
    experts: &[&Path],
    architecture: Option<&str>,
    layout: Option<&LayoutDef>,
) -> Result<Session> {
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
    let safety = Expert::open(safety, &base)?;
    let opened: Vec<Result<Expert>> = experts.iter().map(|p| Expert::open(p, &base)).collect();
    check_lenient(base, safety, opened, architecture, layout)
}

/// Checks models that are already open (from files, or state dicts in memory: see
/// [`Model::from_memory`]) exactly as [`open`] checks files; any bad expert is an error.
pub fn from_models(
    base: Model,
    safety: Model,
    experts: Vec<Model>,
    architecture: Option<&str>,
    layout: Option<&LayoutDef>,
) -> Result<Session> {
    if experts.is_empty() {
        return Err(Error::argument("at least one language expert is needed"));
    }
    let opened = experts.into_iter().map(|m| Ok(Expert::Full(m))).collect();
    let (session, outcomes) = check_lenient(base, Expert::Full(safety), opened, architecture, layout)?;
    for outcome in outcomes {
        outcome?;
    }
    Ok(session)
}

/// [`open_lenient`] after the opening: detects the layout on the first expert that opened and checks
/// every model against it.
fn check_lenient(
    base: Model,
    safety: Expert,
    mut opened: Vec<Result<Expert>>,
    architecture: Option<&str>,
    layout: Option<&LayoutDef>,
) -> Result<(Session, Vec<Result<usize>>)> {
    let Some(first) = opened.iter().position(std::result::Result::is_ok) else {
        return Err(opened.remove(0).unwrap_err());
    };
    let host_names: Vec<&str> = opened[first]
        .as_ref()
        .unwrap()
        .tensors()
        .keys()
        .map(std::string::String::as_str)
        .collect();
    let host = opened[first].as_ref().unwrap().path();
    let layout = Layout::detect(&host_names, architecture, layout).map_err(|e| e.in_model(host))?;
    let mut session = Session {
        base,
        safety,
        experts: vec![],
        layout,
    };
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
        let err = outcomes
            .into_iter()
            .find_map(std::result::Result::err)
            .expect("no expert opened");
        return Err(err);
    }
    Ok((session, outcomes))
}

fn describe(role: &str, m: &dyn TensorSet) -> String {
    format!("{role} ({})", m.path().display())
}

fn same_tensor(name: &str, a: (&str, &dyn TensorSet), b: (&str, &dyn TensorSet)) -> Result<()> {
    let ta = a.1.tensor(name).expect("caller looked it up");
    let Some(tb) = b.1.tensor(name) else {
        return Err(Error::Incompatible {
            message: format!(
                "tensor '{name}' is in the {} but missing from the {}",
                describe(a.0, a.1),
                describe(b.0, b.1)
            ),
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
    fn layer_mismatch(&self, models: &[(&str, &dyn TensorSet)]) -> Result<()> {
        let mut counts: Vec<(String, usize)> = vec![];
        for (role, m) in models {
            // A model whose names the layout does not fit at all (another family) says so, not "0 layers".
            let l = self
                .layout
                .def
                .resolve(m.tensors().keys().map(std::string::String::as_str))
                .map_err(|e| Error::Incompatible {
                    message: format!(
                        "the {} does not have the language expert's layout: {e}",
                        describe(role, *m)
                    ),
                })?;
            counts.push((describe(role, *m), l.n_layers));
        }
        if counts.iter().any(|(_, n)| *n != self.layout.n_layers) {
            let list: Vec<String> = counts.iter().map(|(d, n)| format!("{n} in the {d}")).collect();
            return Err(Error::Incompatible {
                message: format!(
                    "the models have different numbers of decoder layers: {} (language expert: {})",
                    list.join(", "),
                    self.layout.n_layers
                ),
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
    fn check_expert(&self, m: &Expert) -> Result<()> {
        self.layer_mismatch(&[("language expert", m)])?;
        let own = self
            .layout
            .def
            .resolve(m.tensors().keys().map(std::string::String::as_str))?;
        own.check_assigned()?;
        measured_are_floats(m, &own)?;
        for name in m.tensors().keys() {
            let place = own.place(name);
            if place != self.layout.place(name) {
                return Err(Error::Incompatible {
                    message: format!(
                        "tensor '{name}' of the {} is not in the first language expert",
                        describe("language expert", m)
                    ),
                });
            }
            match (place, self.safety.tensor(name), m.tensor(name)) {
                // Only the host has it, outside the layers: copied from the host (see WriteSummary).
                (Place::Outside | Place::Vocab, None, _) => {}
                // Vocabulary shapes may differ; whether that is allowed depends on the options (check_vocab).
                (Place::Vocab, Some(s), Some(t)) if s.shape != t.shape => {}
                _ => same_tensor(name, ("language expert", m), ("safety expert", &self.safety))?,
            }
        }
        // The measured tensors are the same in B, S and M (else the units would be measured differently).
        for (role, other) in [
            ("base model", &self.base as &dyn TensorSet),
            ("safety expert", &self.safety),
        ] {
            if let Ok(l) = self
                .layout
                .def
                .resolve(other.tensors().keys().map(std::string::String::as_str))
            {
                if let Some(name) = l.targets().into_iter().find(|n| m.tensor(n).is_none()) {
                    return Err(Error::Incompatible {
                        message: format!(
                            "measured tensor '{name}' is in the {} but missing from the {}",
                            describe(role, other),
                            describe("language expert", m)
                        ),
                    });
                }
            }
        }
        for name in self.layout.targets() {
            if m.tensor(name).is_none() {
                return Err(Error::Incompatible {
                    message: format!(
                        "tensor '{name}' is missing from the {}",
                        describe("language expert", m)
                    ),
                });
            }
            same_tensor(name, ("language expert", m), ("base model", &self.base))?;
        }
        Ok(())
    }

    /// A vocabulary tensor whose shape differs between the safety and language experts is an error
    /// unless `options.vocab_from` takes it from the language expert.
    pub(crate) fn check_vocab(&self, expert: usize, options: &MergeOptions) -> Result<()> {
        if options.vocab_from == VocabSource::Expert {
            return Ok(());
        }
        let m = &self.experts[expert];
        for (name, t) in m.tensors() {
            let Some(s) = self.safety.tensor(name) else {
                continue;
            };
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

    /// [`Session::check_vocab`] for every expert, `options[k]` for expert `k`: what a write would
    /// refuse, found before any reading (a merge fails early; an analysis alone does not need it).
    pub fn check_vocab_each(&self, options: &[MergeOptions]) -> Result<()> {
        for (k, o) in options.iter().enumerate() {
            self.check_vocab(k, o)?;
        }
        Ok(())
    }

    /// Path and stamp (as opened) of every input file of the session: B, S and the experts.
    pub fn stamps(&self) -> Vec<(PathBuf, Stamp)> {
        let mut all = self.base.stamps();
        all.extend(self.safety.stamps());
        all.extend(self.experts.iter().flat_map(Expert::stamps));
        all
    }

    /// Fails, naming the file, unless every file of `earlier` (stamps taken by another opening, e.g.
    /// where a share of the analyze pass was computed: see [`Session::sums_of`]) is an input of
    /// this session with the same stamp. Proves that work done on the files elsewhere and the work
    /// about to be done here read the same bytes.
    pub fn check_stamps(&self, earlier: &[(PathBuf, Stamp)]) -> Result<()> {
        let now = self.stamps();
        for (path, stamp) in earlier {
            match now.iter().find(|(p, _)| p == path) {
                Some((_, s)) if s == stamp => {}
                Some(_) => {
                    return Err(Error::invalid(
                        path,
                        "file was changed or replaced since its statistics were computed; run again once it is stable",
                    ))
                }
                None => {
                    return Err(Error::argument(format!(
                        "{}: statistics were computed from a file that is not an input of this run",
                        path.display()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Whether the full models of this session (B, S and every M) are bigger than the machine's
    /// memory, so that their passes run from disk: then the analyze pass drops B's pages as it
    /// goes (the write pass of full models never reads B) and the write pass drops the output's
    /// pages once written back, to keep in the page cache what the write pass reads first.
    pub(crate) fn bigger_than_memory(&self) -> bool {
        let size = |m: &Model| m.shards.iter().map(|s| s.len).sum::<u64>();
        let mut total = size(&self.base);
        for e in std::iter::once(&self.safety).chain(&self.experts) {
            if let Expert::Full(m) = e {
                total += size(m);
            }
        }
        total > physical_memory()
    }

    /// Widest element size in bytes among the inputs and the output dtype (sizes the buffers).
    pub(crate) fn widest(&self, options: &MergeOptions) -> usize {
        let inputs = self.experts[0]
            .tensors()
            .values()
            .map(|t| t.dtype.size())
            .max()
            .unwrap_or(2);
        inputs.max(options.out_dtype.map_or(0, Dtype::size))
    }
}

/// Every measured tensor of `m` is a float tensor (a mask or an integer buffer cannot be measured).
pub fn measured_are_floats(m: &dyn TensorSet, layout: &Layout) -> Result<()> {
    for name in layout.targets() {
        if let Some(t) = m.tensor(name).filter(|t| !t.dtype.is_float()) {
            return Err(Error::Layout {
                message: format!(
                    "measured tensor '{name}' of {} is {}; only float tensors (BF16, F16, F32, F64) can be measured",
                    m.path().display(),
                    t.dtype
                ),
            });
        }
    }
    Ok(())
}

/// Bytes of RAM of this machine (u64::MAX when unknown: never "bigger than memory").
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads configuration values.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || size <= 0 {
        return u64::MAX;
    }
    (pages as u64).saturating_mul(size as u64)
}
