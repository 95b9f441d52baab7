//! Reading and writing safetensors files and Hugging Face model folders.

pub mod header;
pub mod model;
pub mod shard;
pub mod writer;

pub use header::{Header, TensorInfo};
pub use model::{Model, TensorRef};
pub use shard::{MemoryRegion, Shard, Stamp};
pub use writer::{OutputWriter, ShardMap};
