//! The safetensors header: an 8-byte little-endian length, then that many bytes of JSON mapping tensor
//! names to `{dtype, shape, data_offsets}`, plus an optional `__metadata__` string map.
//!
//! Parsing is strict: a file that passes [`Header::parse`] can be read tensor by tensor without any
//! further bounds checks, because every byte range is known to lie inside the data section.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::{Dtype, KNOWN_UNSUPPORTED};

/// Largest header we accept (the reference implementation uses the same limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor entry of a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for a scalar).
    pub shape: Vec<u64>,
    /// Byte range relative to the start of the data section.
    pub start: u64,
    /// End of the byte range (exclusive).
    pub end: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.end - self.start
    }
}

/// A parsed, validated header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Length of the JSON part in bytes.
    pub json_len: u64,
    /// Tensors sorted by their start offset.
    pub tensors: Vec<TensorInfo>,
    /// The `__metadata__` map, if present.
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// The header of one tensor held in memory (see `Shard::memory`): its data is the whole region,
    /// from offset 0, so there is no data section to skip (`data_start` does not apply).
    pub fn memory(tensor: TensorInfo) -> Header {
        Header {
            json_len: 0,
            tensors: vec![tensor],
            metadata: BTreeMap::new(),
        }
    }

    /// Offset of the data section from the start of the file.
    pub fn data_start(&self) -> u64 {
        8 + self.json_len
    }

    /// Parses and validates a header. `json` is the JSON part, `data_len` the number of bytes the file
    /// has after it. Errors are plain strings; the caller adds the file name.
    pub fn parse(json: &[u8], data_len: u64) -> Result<Header, String> {
        let text = std::str::from_utf8(json).map_err(|e| format!("header is not valid UTF-8 ({e})"))?;
        let entries: Entries =
            serde_json::from_str(text).map_err(|e| format!("header is not valid JSON: {e}"))?;
        let mut tensors = Vec::with_capacity(entries.0.len());
        let mut metadata = BTreeMap::new();
        let mut seen = std::collections::HashSet::new();
        for (name, value) in entries.0 {
            if !seen.insert(name.clone()) {
                return Err(format!("tensor '{name}' appears twice in the header"));
            }
            if name == "__metadata__" {
                let map = value
                    .as_object()
                    .ok_or("__metadata__ must be a JSON object of strings")?;
                for (k, v) in map {
                    let v = v
                        .as_str()
                        .ok_or_else(|| format!("__metadata__ value for '{k}' must be a string"))?;
                    metadata.insert(k.clone(), v.to_string());
                }
                continue;
            }
            tensors.push(parse_entry(&name, &value)?);
        }
        tensors.sort_by_key(|t| (t.start, t.end));
        let mut expected = 0u64;
        for t in &tensors {
            if t.start != expected {
                let what = if t.start < expected {
                    "overlaps the previous tensor"
                } else {
                    "leaves a gap after the previous tensor"
                };
                return Err(format!(
                    "tensor '{}': data_offsets [{}, {}] {what} (expected start {expected})",
                    t.name, t.start, t.end
                ));
            }
            if t.end > data_len {
                return Err(format!(
                    "tensor '{}': data ends at byte {} but the file has only {data_len} data bytes (truncated file?)",
                    t.name, t.end
                ));
            }
            expected = t.end;
        }
        if expected != data_len {
            return Err(format!(
                "data section has {data_len} bytes but the tensors cover {expected}"
            ));
        }
        Ok(Header {
            json_len: json.len() as u64,
            tensors,
            metadata,
        })
    }
}

fn parse_entry(name: &str, value: &serde_json::Value) -> Result<TensorInfo, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| format!("tensor '{name}': entry must be a JSON object"))?;
    let dtype_name = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("tensor '{name}': missing or non-string 'dtype'"))?;
    let dtype = Dtype::parse(dtype_name).ok_or_else(|| {
        let known = if KNOWN_UNSUPPORTED.contains(&dtype_name) { "unsupported" } else { "unknown" };
        format!("tensor '{name}': {known} dtype '{dtype_name}' (supported: BF16, F16, F32, F64; integer, bool and 8-bit float tensors are copied)")
    })?;
    let shape = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| format!("tensor '{name}': missing or non-array 'shape'"))?
        .iter()
        .map(serde_json::Value::as_u64)
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| format!("tensor '{name}': shape must be a list of non-negative integers"))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .and_then(|a| Some([a[0].as_u64()?, a[1].as_u64()?]))
        .ok_or_else(|| format!("tensor '{name}': data_offsets must be [start, end] non-negative integers"))?;
    let [start, end] = offsets;
    if end < start {
        return Err(format!(
            "tensor '{name}': data_offsets [{start}, {end}] end before start"
        ));
    }
    let nbytes = shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("tensor '{name}': shape {shape:?} is too large"))?;
    if nbytes != end - start {
        return Err(format!(
            "tensor '{name}': shape {shape:?} of {dtype} needs {nbytes} bytes but data_offsets span {}",
            end - start
        ));
    }
    Ok(TensorInfo {
        name: name.to_string(),
        dtype,
        shape,
        start,
        end,
    })
}

/// JSON object entries in file order, duplicates kept (serde_json's map would silently drop them).
pub(crate) struct Entries(pub(crate) Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, serde_json::Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Serialises a header for the given tensors (in the given order, contiguous from offset 0), padded
/// with spaces to a multiple of 8 bytes as the reference implementation does. Returns the complete
/// prefix: length + JSON.
pub fn encode_header(
    tensors: &[(String, Dtype, Vec<u64>, u64, u64)],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map"),
        );
    }
    for (name, dtype, shape, start, end) in tensors {
        map.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [start, end]}),
        );
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).expect("json");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}
