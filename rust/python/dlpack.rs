//! Tensors from DLPack capsules (`tensor.__dlpack__()`, torch and numpy alike, bf16 included): the
//! engine reads and fills their memory in place, so a state dict reaches it without a copy. Only the
//! capsule's C structures are read (DLPack 1.0 `dltensor_versioned`, or the older `dltensor`); the
//! capsule is not consumed, so the tensor's owner frees it as usual once the caller drops it.

use std::ffi::{c_void, CStr};

use pyo3::prelude::*;
use pyo3::types::PyCapsule;

use crate::dtype::Dtype;
use crate::error::Error;
use crate::io::MemoryRegion;
use crate::python::errors::to_py;

#[repr(C)]
#[allow(dead_code)] // laid out as the C struct; the engine reads only some fields
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

/// DLPack before 1.0: the tensor comes first.
#[repr(C)]
#[allow(dead_code)] // laid out as the C struct; the engine reads only some fields
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

#[repr(C)]
struct DLPackVersion {
    major: u32,
    minor: u32,
}

/// DLPack 1.0: a version and flags before the tensor.
#[repr(C)]
#[allow(dead_code)] // laid out as the C struct; the engine reads only some fields
struct DLManagedTensorVersioned {
    version: DLPackVersion,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensorVersioned)>,
    flags: u64,
    dl_tensor: DLTensor,
}

const VERSIONED: &CStr = c"dltensor_versioned";
const LEGACY: &CStr = c"dltensor";
const FLAG_READ_ONLY: u64 = 1;
const DEVICE_CPU: i32 = 1;
const CODE_FLOAT: u8 = 2;
const CODE_BFLOAT: u8 = 4;

/// The memory of tensor `name` (of `label`, e.g. `expert state dict`) exported as `capsule`, checked
/// against the dtype and shape the caller declared: CPU memory, one lane, the dtype's width (and
/// float kind), that shape, C-contiguous; writable when `output`.
///
/// The region is valid while `capsule` is alive and the tensor is not resized: callers keep the
/// capsules referenced until the engine is done with the regions.
pub(crate) fn region(
    label: &str,
    name: &str,
    dtype: Dtype,
    shape: &[u64],
    capsule: &Bound<'_, PyAny>,
    output: bool,
) -> PyResult<MemoryRegion> {
    let bad = |what: String| to_py(Error::invalid(label, format!("tensor '{name}': {what}")));
    let capsule = capsule
        .cast::<PyCapsule>()
        .map_err(|_| bad("not a DLPack capsule".into()))?;
    let (tensor, flags) = if let Ok(p) = capsule.pointer_checked(Some(VERSIONED)) {
        // SAFETY: a capsule named "dltensor_versioned" holds a DLManagedTensorVersioned (DLPack 1.x
        // spec), alive as long as the capsule; only its major version fixes the layout, checked here.
        let managed = unsafe { &*(p.as_ptr() as *const DLManagedTensorVersioned) };
        if managed.version.major != 1 {
            return Err(bad(format!(
                "DLPack version {}.{} is not supported (1.x is)",
                managed.version.major, managed.version.minor
            )));
        }
        (&managed.dl_tensor, managed.flags)
    } else if let Ok(p) = capsule.pointer_checked(Some(LEGACY)) {
        // SAFETY: a capsule named "dltensor" holds a DLManagedTensor, alive as long as the capsule.
        (unsafe { &(*(p.as_ptr() as *const DLManagedTensor)).dl_tensor }, 0)
    } else {
        return Err(bad("not an unconsumed DLPack capsule (dltensor)".into()));
    };
    if tensor.device.device_type != DEVICE_CPU {
        return Err(bad(format!(
            "is not in CPU memory (DLPack device type {}); move it to the CPU first",
            tensor.device.device_type
        )));
    }
    if output && flags & FLAG_READ_ONLY != 0 {
        return Err(bad("the output buffer is read-only".into()));
    }
    let dt = &tensor.dtype;
    let kind_ok = match dtype {
        Dtype::BF16 => dt.code == CODE_BFLOAT,
        Dtype::F16 | Dtype::F32 | Dtype::F64 => dt.code == CODE_FLOAT,
        Dtype::Opaque(_) => true,
    };
    if dt.lanes != 1 || dt.bits as usize != dtype.size() * 8 || !kind_ok {
        return Err(bad(format!(
            "DLPack dtype (code {}, {} bits, {} lanes) is not {dtype}",
            dt.code, dt.bits, dt.lanes
        )));
    }
    let ndim = usize::try_from(tensor.ndim).map_err(|_| bad(format!("negative ndim {}", tensor.ndim)))?;
    let dims: &[i64] = if ndim == 0 {
        &[]
    } else {
        // SAFETY: DLPack guarantees `shape` points to `ndim` dimensions.
        unsafe { std::slice::from_raw_parts(tensor.shape, ndim) }
    };
    if dims.len() != shape.len() || dims.iter().zip(shape).any(|(&a, &b)| a < 0 || a as u64 != b) {
        return Err(bad(format!("shape {dims:?} is not the declared {shape:?}")));
    }
    if !tensor.strides.is_null() && ndim > 0 {
        // SAFETY: when not null, `strides` points to `ndim` strides (in elements).
        let strides = unsafe { std::slice::from_raw_parts(tensor.strides, ndim) };
        let mut want = 1i64;
        for (&d, &s) in dims.iter().zip(strides).rev() {
            // A dimension of size 1 may carry any stride without changing where anything lies.
            if d != 1 && s != want {
                return Err(bad(format!(
                    "is not contiguous (strides {strides:?} for shape {dims:?}); pass .contiguous() tensors"
                )));
            }
            want *= d;
        }
    }
    let len = shape.iter().product::<u64>() as usize * dtype.size();
    if len == 0 {
        // SAFETY: an empty region is never dereferenced.
        return Ok(unsafe { MemoryRegion::new(std::ptr::NonNull::<u8>::dangling().as_ptr(), 0) });
    }
    // SAFETY: DLPack says the elements start `byte_offset` bytes after `data` and, being contiguous
    // (checked above), fill `len` bytes; the caller keeps the capsule, and so the memory, alive.
    Ok(unsafe { MemoryRegion::new(tensor.data.cast::<u8>().add(tensor.byte_offset as usize), len) })
}
