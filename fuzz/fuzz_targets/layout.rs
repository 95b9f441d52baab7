//! A user's layout definition (arbitrary text, usually JSON with regexes) resolved against a fixed
//! set of Llama-like names and against names taken from the input itself. Must be Ok or an error.
#![no_main]

use layerswap_fast::layout::{Layout, LayoutDef};
use libfuzzer_sys::fuzz_target;

const NAMES: &[&str] = &[
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Lines after the first blank line are extra tensor names.
    let (def_text, extra) = text.split_once("\n\n").unwrap_or((text, ""));
    let Ok(def) = LayoutDef::from_json(def_text) else { return };
    let mut names: Vec<&str> = NAMES.to_vec();
    names.extend(extra.lines());
    let _ = Layout::detect(&names, None, Some(&def));
    let _ = Layout::detect(&names, None, None);
});
