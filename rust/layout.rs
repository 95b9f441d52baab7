//! Which tensor belongs to which unit. Layouts are data (JSON definitions under `rust/layouts/`, or a
//! user's own file), never code per model family: adding a family means adding a definition.
//!
//! A definition gives a regex, matched at the start of a tensor name, whose first capture group is the
//! layer index; the rest of the name after that match is classified as attention, MLP, or the layer's
//! own tensors (its norms). A `targets` regex names the measured tensors within the layer (METHOD.md
//! §1). Everything that is not in a layer is "outside"; outside tensors with a vocabulary axis
//! (embeddings, `lm_head`) are [`Place::Vocab`]. A definition that lists the layer's own tensors
//! (`norms`) can leave tensors *unassigned*: they are shown by `inspect` and refused by a merge, so an
//! unknown tensor never silently follows a decision it was not measured for.

use std::collections::BTreeSet;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The built-in layout definitions, in the order detection by tensor names tries them.
pub const BUILTIN_LAYOUTS: &[(&str, &str)] = &[
    ("llama", include_str!("layouts/llama.json")),
    ("gemma", include_str!("layouts/gemma.json")),
    ("phi3", include_str!("layouts/phi3.json")),
    ("phi", include_str!("layouts/phi.json")),
    ("mixtral", include_str!("layouts/mixtral.json")),
    ("qwen_moe", include_str!("layouts/qwen_moe.json")),
    ("multimodal", include_str!("layouts/multimodal.json")),
    ("gpt_neox", include_str!("layouts/gpt_neox.json")),
    ("gpt2", include_str!("layouts/gpt2.json")),
    ("falcon", include_str!("layouts/falcon.json")),
    ("bert", include_str!("layouts/bert.json")),
    ("distilbert", include_str!("layouts/distilbert.json")),
];

/// A layout definition as written in JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayoutDef {
    /// Short name, shown in reports.
    pub name: String,
    /// One line for `inspect`.
    #[serde(default)]
    pub description: String,
    /// config.json `architectures[0]` values this layout is chosen for.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Regex matched at the start of a tensor name (it is anchored there); capture 1 is the layer index.
    pub layer: String,
    /// Names matching this regex are never layer tensors, even if `layer` matches (e.g. a vision tower
    /// whose blocks are named like the text decoder's).
    #[serde(default)]
    pub exclude: Option<String>,
    /// Regex on the rest of the name (after the `layer` match) that puts a tensor in the attention unit.
    pub attention: String,
    /// Regex on the rest of the name that puts a tensor in the MLP unit.
    pub mlp: String,
    /// Regex on the rest of the name for the layer's own tensors (its norms). Without it, every layer
    /// tensor outside attention and MLP is the layer's own; with it, the others are "unassigned".
    #[serde(default)]
    pub norms: Option<String>,
    /// Regex on the rest of the name that marks a measured tensor (must be in attention or MLP).
    pub targets: String,
    /// Regex on the full name of the outside tensors that have a vocabulary axis (embeddings, lm_head).
    #[serde(default)]
    pub vocab: Option<String>,
}

/// Which part of a layer a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// The attention submodule.
    Attention,
    /// The MLP (feed-forward) submodule.
    Mlp,
    /// The layer's own tensors outside both submodules (its layer norms).
    Norm,
}

/// Where a tensor belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Place {
    /// In layer `layer`, part `part`; `target` if it is measured.
    Layer {
        /// Layer index.
        layer: usize,
        /// Submodule.
        part: Part,
        /// Measured (contributes to scores).
        target: bool,
    },
    /// Outside the layers (final norm, position embeddings, vision tower, ...).
    Outside,
    /// Outside the layers, with a vocabulary axis (token embeddings, lm_head): the tensors a language
    /// expert with an extended vocabulary changes the shape of.
    Vocab,
    /// In layer `layer`, but in none of attention, MLP or the layer's own norms of the layout.
    Unassigned {
        /// Layer index.
        layer: usize,
    },
}

/// A layout resolved against a model's tensor names.
#[derive(Debug, Clone)]
pub struct Layout {
    /// The definition used.
    pub def: LayoutDef,
    /// Number of layers.
    pub n_layers: usize,
    /// (name, place) for every tensor, sorted by name.
    pub places: Vec<(String, Place)>,
}

struct Compiled {
    layer: Regex,
    exclude: Option<Regex>,
    attention: Regex,
    mlp: Regex,
    norms: Option<Regex>,
    targets: Regex,
    vocab: Option<Regex>,
}

impl LayoutDef {
    /// Parses a JSON definition.
    pub fn from_json(text: &str) -> Result<LayoutDef> {
        let def: LayoutDef = serde_json::from_str(text).map_err(|e| Error::Layout {
            message: format!("invalid layout definition: {e}"),
        })?;
        def.compile()?;
        Ok(def)
    }

    /// The built-in definitions.
    pub fn builtins() -> Vec<LayoutDef> {
        BUILTIN_LAYOUTS
            .iter()
            .map(|(_, t)| LayoutDef::from_json(t).expect("built-in layout is valid"))
            .collect()
    }

    fn compile(&self) -> Result<Compiled> {
        let re = |field: &str, s: &str| {
            Regex::new(s).map_err(|e| Error::Layout {
                message: format!("layout '{}': invalid regex in '{field}': {e}", self.name),
            })
        };
        let opt = |field: &str, s: &Option<String>| s.as_deref().map(|s| re(field, s)).transpose();
        let c = Compiled {
            // Anchored whatever the author wrote: a layer pattern that matched mid-name would pick up a
            // vision tower's `...encoder.layers.{i}.` as decoder layers.
            layer: re("layer", &format!("^(?:{})", self.layer))?,
            exclude: opt("exclude", &self.exclude)?,
            attention: re("attention", &self.attention)?,
            mlp: re("mlp", &self.mlp)?,
            norms: opt("norms", &self.norms)?,
            targets: re("targets", &self.targets)?,
            vocab: opt("vocab", &self.vocab)?,
        };
        if c.layer.captures_len() < 2 {
            return Err(Error::Layout {
                message: format!(
                    "layout '{}': 'layer' regex needs a capture group for the layer index",
                    self.name
                ),
            });
        }
        Ok(c)
    }

    fn err(&self, message: impl std::fmt::Display) -> Error {
        Error::Layout {
            message: format!("layout '{}': {message}", self.name),
        }
    }

    /// Classifies every name. Fails on layer indices that are not 0..L-1, on a layer without measured
    /// attention or MLP tensors, on layer tensors under more than one prefix, and on a name that two
    /// of attention / MLP / norms claim.
    pub fn resolve<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Layout> {
        let c = self.compile()?;
        let mut places = vec![];
        // Per layer: measured tensors in attention, in MLP.
        let mut measured: Vec<[usize; 2]> = vec![];
        let mut prefixes: BTreeSet<String> = BTreeSet::new();
        let names: Vec<&str> = names.into_iter().collect();
        for &name in &names {
            let cap = match c.layer.captures(name) {
                Some(cap) if !c.exclude.as_ref().is_some_and(|x| x.is_match(name)) => cap,
                _ => {
                    let vocab = c.vocab.as_ref().is_some_and(|v| v.is_match(name));
                    places.push((
                        name.to_string(),
                        if vocab { Place::Vocab } else { Place::Outside },
                    ));
                    continue;
                }
            };
            // A user's pattern may match without its first group taking part, e.g. `(?:x|layers\.(\d+))`.
            let Some(index) = cap.get(1) else {
                return Err(self.err(format!("tensor '{name}' matches the layer pattern '{}' but its first group (the layer index) is empty", self.layer)));
            };
            let layer: usize = index.as_str().parse().map_err(|_| {
                self.err(format!(
                    "tensor '{name}': layer index '{}' is not a number",
                    index.as_str()
                ))
            })?;
            // Every layer needs measured tensors, so a real index is below the tensor count; a hostile
            // name like `model.layers.1000000000000.x` must not size the per-layer vector below.
            if layer >= names.len() {
                return Err(self.err(format!(
                    "tensor '{name}': layer index {layer} is impossible for a model of {} tensors",
                    names.len()
                )));
            }
            let whole = cap.get(0).unwrap();
            prefixes.insert(format!(
                "{}{{i}}{}",
                &name[..index.start()],
                &name[index.end()..whole.end()]
            ));
            let rest = &name[whole.end()..];
            let claims = [
                (Part::Attention, c.attention.is_match(rest)),
                (Part::Mlp, c.mlp.is_match(rest)),
                (Part::Norm, c.norms.as_ref().is_some_and(|n| n.is_match(rest))),
            ];
            let claimed: Vec<Part> = claims.iter().filter(|(_, m)| *m).map(|(p, _)| *p).collect();
            if claimed.len() > 1 {
                return Err(self.err(format!(
                    "tensor '{name}' matches more than one of attention / mlp / norms ({claimed:?})"
                )));
            }
            let part = match claimed.first() {
                Some(p) => *p,
                None if c.norms.is_some() => {
                    places.push((name.to_string(), Place::Unassigned { layer }));
                    continue;
                }
                None => Part::Norm,
            };
            let target = c.targets.is_match(rest);
            if target && part == Part::Norm {
                return Err(self.err(format!(
                    "tensor '{name}' is measured ('targets') but is not in attention or mlp"
                )));
            }
            if measured.len() <= layer {
                measured.resize(layer + 1, [0, 0]);
            }
            if target {
                measured[layer][usize::from(part == Part::Mlp)] += 1;
            }
            places.push((name.to_string(), Place::Layer { layer, part, target }));
        }
        places.sort_by(|a, b| a.0.cmp(&b.0));
        let n_layers = measured.len();
        if n_layers == 0 {
            return Err(self.err(format!(
                "no tensor name matches its layer pattern '{}'",
                self.layer
            )));
        }
        if prefixes.len() > 1 {
            let list: Vec<&str> = prefixes.iter().map(std::string::String::as_str).collect();
            return Err(self.err(format!(
                "layer tensors under more than one prefix ({}); add an 'exclude' pattern for the ones that are not units",
                list.join(", ")
            )));
        }
        for (l, [attn, mlp]) in measured.iter().enumerate() {
            let missing = match (attn, mlp) {
                (0, 0) => "no measured tensors",
                (0, _) => "no measured attention tensors",
                (_, 0) => "no measured MLP tensors",
                _ => continue,
            };
            return Err(self.err(format!(
                "layer {l} of {n_layers} has {missing} (missing layer, or wrong layout?)"
            )));
        }
        Ok(Layout {
            def: self.clone(),
            n_layers,
            places,
        })
    }
}

impl Layout {
    /// Picks a layout for these tensor names: the user's definition if given; else the built-in one
    /// that lists `architecture`, if it fits the names; else the first built-in that fits them with no
    /// unassigned tensor; else the first that fits with some (so `inspect` can show them and a merge
    /// refuses them). Names no layout fits are an error naming the layouts tried.
    pub fn detect(names: &[&str], architecture: Option<&str>, custom: Option<&LayoutDef>) -> Result<Layout> {
        if let Some(def) = custom {
            return def.resolve(names.iter().copied());
        }
        let builtins = LayoutDef::builtins();
        let listed = |d: &LayoutDef| architecture.is_some_and(|a| d.architectures.iter().any(|x| x == a));
        // Layouts that list the architecture first, then the rest in built-in order.
        let order = builtins
            .iter()
            .filter(|d| listed(d))
            .chain(builtins.iter().filter(|d| !listed(d)));
        let mut listed_error = None;
        let mut partial = None;
        for def in order {
            match def.resolve(names.iter().copied()) {
                Ok(layout) if layout.unassigned().is_empty() => return Ok(layout),
                Ok(layout) => {
                    partial.get_or_insert(layout);
                }
                Err(e) if listed(def) => {
                    listed_error.get_or_insert(e);
                }
                Err(_) => {}
            }
        }
        if let Some(layout) = partial {
            return Ok(layout);
        }
        let sample: Vec<&str> = names.iter().take(3).copied().collect();
        Err(Error::Layout {
            message: format!(
                "unknown model layout{}: no built-in layout ({}) matches tensor names like {:?}{}; pass a custom layout file",
                architecture.map(|a| format!(" ({a})")).unwrap_or_default(),
                builtins.iter().map(|d| d.name.as_str()).collect::<Vec<_>>().join(", "),
                sample,
                listed_error.map(|e| format!(" (the layout for this architecture says: {e})")).unwrap_or_default(),
            ),
        })
    }

    /// The place of a tensor (Outside for names the layout has not seen).
    pub fn place(&self, name: &str) -> Place {
        match self.places.binary_search_by(|p| p.0.as_str().cmp(name)) {
            Ok(i) => self.places[i].1,
            Err(_) => Place::Outside,
        }
    }

    /// Names of the measured tensors, sorted.
    pub fn targets(&self) -> Vec<&str> {
        self.places
            .iter()
            .filter(|(_, p)| matches!(p, Place::Layer { target: true, .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Names of the tensors inside a layer that the layout does not assign to any part, sorted.
    pub fn unassigned(&self) -> Vec<&str> {
        self.places
            .iter()
            .filter(|(_, p)| matches!(p, Place::Unassigned { .. }))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Refuses unassigned tensors (a merge would not know which decision they follow).
    pub fn check_assigned(&self) -> Result<()> {
        let un = self.unassigned();
        if un.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = un.iter().take(5).copied().collect();
        Err(Error::Layout {
            message: format!(
                "layout '{}' does not know {} tensor(s) inside the layers, e.g. {:?}: they are in no attention, MLP or norm \
                 unit, so no decision covers them; pass a custom layout file that assigns them",
                self.def.name,
                un.len(),
                shown
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_names(layers: usize) -> Vec<String> {
        let mut out = vec![
            "model.embed_tokens.weight".to_string(),
            "model.norm.weight".into(),
            "lm_head.weight".into(),
        ];
        for i in 0..layers {
            for t in [
                "input_layernorm",
                "self_attn.q_proj",
                "self_attn.o_proj",
                "post_attention_layernorm",
                "mlp.down_proj",
            ] {
                out.push(format!("model.layers.{i}.{t}.weight"));
            }
        }
        out
    }

    fn detect(names: &[String], arch: Option<&str>) -> Result<Layout> {
        let refs: Vec<&str> = names.iter().map(std::string::String::as_str).collect();
        Layout::detect(&refs, arch, None)
    }

    #[test]
    fn builtins_parse_and_have_unique_names_and_architectures() {
        let defs = LayoutDef::builtins();
        let mut names = BTreeSet::new();
        let mut archs = BTreeSet::new();
        for d in &defs {
            assert!(names.insert(d.name.clone()), "duplicate layout {}", d.name);
            for a in &d.architectures {
                assert!(archs.insert(a.clone()), "architecture {a} listed twice");
            }
        }
        assert_eq!(defs.len(), BUILTIN_LAYOUTS.len());
    }

    #[test]
    fn llama_places_and_vocab() {
        let l = detect(&llama_names(3), Some("LlamaForCausalLM")).unwrap();
        assert_eq!((l.def.name.as_str(), l.n_layers), ("llama", 3));
        assert_eq!(l.place("lm_head.weight"), Place::Vocab);
        assert_eq!(l.place("model.embed_tokens.weight"), Place::Vocab);
        assert_eq!(l.place("model.norm.weight"), Place::Outside);
        assert_eq!(
            l.place("model.layers.2.self_attn.q_proj.weight"),
            Place::Layer {
                layer: 2,
                part: Part::Attention,
                target: true
            }
        );
        assert_eq!(
            l.place("model.layers.0.input_layernorm.weight"),
            Place::Layer {
                layer: 0,
                part: Part::Norm,
                target: false
            }
        );
    }

    #[test]
    fn unknown_tensor_in_a_layer_is_unassigned_and_refused() {
        let mut names = llama_names(2);
        names.push("model.layers.1.mystery_gate.weight".into());
        let l = detect(&names, None).unwrap();
        assert_eq!(
            l.place("model.layers.1.mystery_gate.weight"),
            Place::Unassigned { layer: 1 }
        );
        let err = l.check_assigned().unwrap_err().to_string();
        assert!(err.contains("mystery_gate"), "{err}");
    }

    #[test]
    fn layer_pattern_is_anchored_and_exclude_wins() {
        let def = LayoutDef::from_json(
            r#"{"name": "t", "layer": "(?:text\\.)?layers\\.(\\d+)\\.", "exclude": "^text\\.layers\\.9\\.",
                "attention": "^a\\.", "mlp": "^m\\.", "targets": "^(a|m)\\.w$"}"#,
        )
        .unwrap();
        let l = def
            .resolve(["vision.layers.0.a.w", "layers.0.a.w", "layers.0.m.w"])
            .unwrap();
        assert_eq!(l.n_layers, 1);
        assert_eq!(l.place("vision.layers.0.a.w"), Place::Outside);
        // Two prefixes for the same kind of layer are refused.
        let err = def
            .resolve([
                "layers.0.a.w",
                "layers.0.m.w",
                "text.layers.0.a.w",
                "text.layers.0.m.w",
            ])
            .unwrap_err();
        assert!(err.to_string().contains("more than one prefix"), "{err}");
        let l = def
            .resolve(["layers.0.a.w", "layers.0.m.w", "text.layers.9.a.w"])
            .unwrap();
        assert_eq!(l.place("text.layers.9.a.w"), Place::Outside);
    }

    #[test]
    fn a_layer_needs_measured_attention_and_mlp() {
        // Starcoder2-like names: Llama attention, but mlp.c_fc / c_proj: llama must not half-fit.
        let mut names = vec![];
        for i in 0..2 {
            names.push(format!("model.layers.{i}.self_attn.q_proj.weight"));
            names.push(format!("model.layers.{i}.mlp.c_fc.weight"));
            names.push(format!("model.layers.{i}.input_layernorm.weight"));
        }
        let err = detect(&names, None).unwrap_err().to_string();
        assert!(err.contains("unknown model layout"), "{err}");
        let refs: Vec<&str> = names.iter().map(std::string::String::as_str).collect();
        let err = LayoutDef::builtins()[0].resolve(refs).unwrap_err().to_string();
        assert!(err.contains("no measured MLP tensors"), "{err}");
    }

    #[test]
    fn architecture_that_does_not_fit_falls_back_to_names() {
        let l = detect(&llama_names(2), Some("GPT2LMHeadModel")).unwrap();
        assert_eq!(l.def.name, "llama");
    }

    #[test]
    fn overlapping_parts_are_refused() {
        let def = LayoutDef::from_json(
            r#"{"name": "t", "layer": "l\\.(\\d+)\\.", "attention": "^x", "mlp": "^x", "targets": "^x$"}"#,
        )
        .unwrap();
        let err = def.resolve(["l.0.x"]).unwrap_err().to_string();
        assert!(err.contains("more than one"), "{err}");
    }

    #[test]
    fn invalid_definitions_are_errors() {
        assert!(LayoutDef::from_json(
            r#"{"name": "t", "layer": "l\\.\\d+", "attention": "a", "mlp": "m", "targets": "t"}"#
        )
        .is_err());
        assert!(LayoutDef::from_json(
            r#"{"name": "t", "layer": "l\\.(\\d+)", "attention": "(", "mlp": "m", "targets": "t"}"#
        )
        .is_err());
        assert!(LayoutDef::from_json(
            r#"{"name": "t", "layer": "l\\.(\\d+)", "attention": "a", "mlp": "m", "targets": "t", "typo": 1}"#
        )
        .is_err());
    }
}
