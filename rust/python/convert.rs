//! Conversions at the boundary: JSON-like Python values (dicts, lists, numbers, strings) to and from
//! `serde_json::Value`, so that every engine type with serde derives crosses as real Python objects
//! with no JSON text in between; and [`MergeOptions`] read straight from the Python `MergeOptions`.

use pyo3::conversion::FromPyObjectOwned;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::options::MergeOptions;
use crate::python::errors::invalid_option;

/// A JSON-like Python value.
pub(crate) fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => i.into_pyobject(py)?.into_any(),
            (None, Some(u)) => u.into_pyobject(py)?.into_any(),
            _ => PyFloat::new(py, n.as_f64().unwrap_or(f64::NAN)).into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(a) => {
            PyList::new(py, a.iter().map(|x| to_py(py, x)).collect::<PyResult<Vec<_>>>()?)?.into_any()
        }
        Value::Object(o) => {
            let d = PyDict::new(py);
            for (k, x) in o {
                d.set_item(k, to_py(py, x)?)?;
            }
            d.into_any()
        }
    })
}

/// A Python value (None, bool, int, float, str, list, tuple, dict with str keys) as JSON.
pub(crate) fn from_py(obj: &Bound<'_, PyAny>) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        return Ok(Value::from(obj.extract::<u64>()?));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let x = f.value();
        return serde_json::Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| invalid_option(format!("{x} is not a finite number")));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        let mut m = serde_json::Map::new();
        for (k, v) in d.iter() {
            let key: String = k
                .extract()
                .map_err(|_| invalid_option(format!("dictionary keys must be strings, got {k}")))?;
            m.insert(key, from_py(&v)?);
        }
        return Ok(Value::Object(m));
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        return Ok(Value::Array(
            obj.try_iter()?.map(|x| from_py(&x?)).collect::<PyResult<_>>()?,
        ));
    }
    Err(invalid_option(format!(
        "cannot convert a {} to data",
        obj.get_type().name()?
    )))
}

/// An engine value as Python data.
pub(crate) fn to_data<'py, T: Serialize>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    to_py(py, &serde_json::to_value(value).expect("engine types serialise"))
}

/// Python data as an engine value; `what` names it in the error.
pub(crate) fn from_data<T: DeserializeOwned>(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<T> {
    serde_json::from_value(from_py(obj)?).map_err(|e| invalid_option(format!("invalid {what}: {e}")))
}

/// Reads the fields of the Python `layerswap_fast.MergeOptions` (which defines and validates them),
/// with its effective `out_dtype` and `threads`. The engine validates again.
impl<'a, 'py> FromPyObject<'a, 'py> for MergeOptions {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        // A field of the wrong type is an invalid option, named, like any other bad value.
        fn field<'py, T: FromPyObjectOwned<'py>>(obj: Borrowed<'_, 'py, PyAny>, name: &str) -> PyResult<T> {
            obj.getattr(name)?
                .extract::<T>()
                .map_err(|e| invalid_option(format!("option {name}: {}", Into::<PyErr>::into(e))))
        }
        let out_dtype: Option<String> = field(obj, "effective_out_dtype")?;
        let value = serde_json::json!({
            "granularity": field::<String>(obj, "granularity")?,
            "tau": field::<f64>(obj, "tau")?,
            "alpha": field::<f64>(obj, "alpha")?,
            "numerics": field::<String>(obj, "numerics")?,
            "outside": field::<String>(obj, "outside")?,
            "norms": field::<String>(obj, "norms")?,
            "vocab_from": field::<String>(obj, "vocab_from")?,
            "out_dtype": out_dtype.map(|d| d.to_ascii_uppercase()),
            "allow_non_finite": field::<bool>(obj, "allow_non_finite")?,
            "max_memory": field::<u64>(obj, "max_memory")?,
            "threads": field::<usize>(obj, "effective_threads")?,
            "shard_size": field::<u64>(obj, "shard_size")?,
        });
        let options: MergeOptions =
            serde_json::from_value(value).map_err(|e| invalid_option(format!("invalid options: {e}")))?;
        options.validate().map_err(crate::python::errors::to_py)?;
        Ok(options)
    }
}
