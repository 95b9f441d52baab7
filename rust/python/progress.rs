//! The one helper every long call goes through: run the engine on a worker thread with the GIL
//! released, and meanwhile, on the calling thread, tick the Python progress callback about ten times a
//! second and check for signals. Ctrl-C (or a callback that raises) cancels the engine, which stops at
//! its next chunk; the Python error is then raised as is.

use std::sync::mpsc;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::error::Result;
use crate::progress::Progress;
use crate::python::errors::to_py;

const TICK: Duration = Duration::from_millis(100);

pub(crate) fn run<T: Send>(
    py: Python<'_>,
    callback: Option<Py<PyAny>>,
    work: impl FnOnce(&Progress) -> Result<T> + Send,
) -> PyResult<T> {
    let progress = Progress::default();
    let (outcome, py_err) = py.detach(|| {
        std::thread::scope(|s| {
            let (tx, rx) = mpsc::channel();
            let progress = &progress;
            let worker = s.spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(progress)));
                let _ = tx.send(());
                r
            });
            let mut py_err: Option<PyErr> = None;
            let mut tick = |py: Python<'_>| {
                if let Err(e) = py.check_signals() {
                    progress.cancel();
                    py_err.get_or_insert(e);
                }
                if let (Some(cb), None) = (&callback, &py_err) {
                    let (phase, done, total) = progress.snapshot();
                    if let Err(e) = cb.call1(py, (phase.name(), done, total)) {
                        progress.cancel();
                        py_err = Some(e);
                    }
                }
            };
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(TICK) {
                Python::attach(&mut tick);
            }
            Python::attach(&mut tick);
            (worker.join().expect("worker panics are caught"), py_err)
        })
    });
    if let Some(e) = py_err {
        return Err(e);
    }
    match outcome {
        Ok(r) => r.map_err(to_py),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "unknown".into());
            Err(PyRuntimeError::new_err(format!(
                "internal error in the layerswap-fast engine (please report): {what}"
            )))
        }
    }
}
