//! The Python exception hierarchy of `ckptd`, and the one place where a Rust error becomes a Python
//! exception.
//!
//! Every failure of the library surfaces as a subclass of `CkptError`, chosen from the error's
//! [`ckptd::Error::kind`] (never from its message), so training scripts can write
//! `except ckptd.CorruptCheckpoint:` and retry policy can branch on the class. The message is the
//! Rust error's `Display`, which already names the step, rank, chunk, key or path involved.

use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

use ckpt_core::ErrorKind as CoreKind;
use ckptd::ErrorKind;

pyo3::create_exception!(ckptd._native, CkptError, PyException, "Base class of every ckptd failure.");
pyo3::create_exception!(
    ckptd._native,
    StoreError,
    CkptError,
    "The store (object storage or file system) failed or refused a request."
);
pyo3::create_exception!(
    ckptd._native,
    CorruptCheckpoint,
    CkptError,
    "Stored checkpoint bytes fail validation; the message names the shard, chunk and offset."
);
pyo3::create_exception!(
    ckptd._native,
    StateMismatch,
    CkptError,
    "The state passed to load() does not match the checkpoint; the message lists every offending key."
);
pyo3::create_exception!(ckptd._native, ArenaFull, CkptError, "The shared-memory arena cannot hold the state.");
pyo3::create_exception!(
    ckptd._native,
    AgentUnavailable,
    CkptError,
    "The ckptd sidecar agent cannot be reached at its socket."
);
pyo3::create_exception!(
    ckptd._native,
    NoCheckpoint,
    CkptError,
    "There is no committed checkpoint (or not the requested step) to load."
);
pyo3::create_exception!(ckptd._native, CheckpointerClosed, CkptError, "The checkpointer was closed.");

/// `ConfigError(CkptError, ValueError)`: built at run time because it has two bases, which
/// `create_exception!` cannot express.
static CONFIG_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

const CONFIG_ERROR_DOC: &str =
    "An invalid argument: a configuration value, a store URL, a tensor or a leaf of the state.";

/// The `ConfigError` type object.
pub fn config_error_type(py: Python<'_>) -> PyResult<Bound<'_, PyType>> {
    let ty = CONFIG_ERROR.get_or_try_init(py, || -> PyResult<Py<PyType>> {
        let bases = PyTuple::new(py, [py.get_type::<CkptError>(), py.get_type::<PyValueError>()])?;
        let dict = PyDict::new(py);
        dict.set_item("__module__", "ckptd._native")?;
        dict.set_item("__doc__", CONFIG_ERROR_DOC)?;
        let ty = py.get_type::<PyType>().call1(("ConfigError", bases, dict))?;
        Ok(ty.cast_into::<PyType>()?.unbind())
    })?;
    Ok(ty.bind(py).clone())
}

/// Adds the exception classes to the native module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CkptError", py.get_type::<CkptError>())?;
    m.add("StoreError", py.get_type::<StoreError>())?;
    m.add("CorruptCheckpoint", py.get_type::<CorruptCheckpoint>())?;
    m.add("StateMismatch", py.get_type::<StateMismatch>())?;
    m.add("ArenaFull", py.get_type::<ArenaFull>())?;
    m.add("AgentUnavailable", py.get_type::<AgentUnavailable>())?;
    m.add("NoCheckpoint", py.get_type::<NoCheckpoint>())?;
    m.add("CheckpointerClosed", py.get_type::<CheckpointerClosed>())?;
    m.add("ConfigError", config_error_type(py)?)?;
    Ok(())
}

/// Which Python class a Rust error becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Base,
    Store,
    Corrupt,
    Mismatch,
    ArenaFull,
    Agent,
    NoCheckpoint,
    Config,
    Closed,
}

fn class_of(kind: ErrorKind) -> Class {
    match kind {
        ErrorKind::Core(core) => match core {
            CoreKind::InvalidInput => Class::Config,
            CoreKind::NotFound => Class::NoCheckpoint,
            CoreKind::Corrupt => Class::Corrupt,
            CoreKind::Mismatch => Class::Mismatch,
            CoreKind::Transient | CoreKind::Storage | CoreKind::Conflict => Class::Store,
            CoreKind::ArenaFull => Class::ArenaFull,
            // Unsupported format versions, commit deadlines and abandoned work have no class of
            // their own: the message says what happened.
            _ => Class::Base,
        },
        ErrorKind::AgentUnavailable => Class::Agent,
        ErrorKind::NoCheckpoint => Class::NoCheckpoint,
        ErrorKind::Closed => Class::Closed,
        ErrorKind::Config => Class::Config,
        _ => Class::Base,
    }
}

/// Converts a library error into the matching Python exception. The only place that does.
pub fn to_py(err: ckptd::Error) -> PyErr {
    let class = class_of(err.kind());
    let msg = err.to_string();
    match class {
        Class::Base => CkptError::new_err(msg),
        Class::Store => StoreError::new_err(msg),
        Class::Corrupt => CorruptCheckpoint::new_err(msg),
        Class::Mismatch => StateMismatch::new_err(msg),
        Class::ArenaFull => ArenaFull::new_err(msg),
        Class::Agent => AgentUnavailable::new_err(msg),
        Class::NoCheckpoint => NoCheckpoint::new_err(msg),
        Class::Closed => CheckpointerClosed::new_err(msg),
        Class::Config => Python::attach(|py| match config_error_type(py) {
            Ok(ty) => PyErr::from_type(ty, msg),
            Err(e) => e,
        }),
    }
}

/// Converts an error of opening a checkpointer: nothing is loaded yet, so a "not found" there (a
/// store directory that cannot be created) is a store failure, never `NoCheckpoint`, which
/// `except NoCheckpoint: start fresh` would hide.
pub fn open_to_py(err: ckptd::Error) -> PyErr {
    match class_of(err.kind()) {
        Class::NoCheckpoint => StoreError::new_err(err.to_string()),
        _ => to_py(err),
    }
}

/// Converts an engine error (raised before the library wraps it) into a Python exception.
pub fn core_to_py(err: ckpt_core::Error) -> PyErr {
    to_py(ckptd::Error::from(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_the_intended_class() {
        let cases = [
            (ErrorKind::Core(CoreKind::InvalidInput), Class::Config),
            (ErrorKind::Core(CoreKind::NotFound), Class::NoCheckpoint),
            (ErrorKind::Core(CoreKind::Corrupt), Class::Corrupt),
            (ErrorKind::Core(CoreKind::Mismatch), Class::Mismatch),
            (ErrorKind::Core(CoreKind::Transient), Class::Store),
            (ErrorKind::Core(CoreKind::Storage), Class::Store),
            (ErrorKind::Core(CoreKind::Conflict), Class::Store),
            (ErrorKind::Core(CoreKind::Timeout), Class::Base),
            (ErrorKind::Core(CoreKind::Unsupported), Class::Base),
            (ErrorKind::Core(CoreKind::Cancelled), Class::Base),
            (ErrorKind::Core(CoreKind::ArenaFull), Class::ArenaFull),
            (ErrorKind::AgentUnavailable, Class::Agent),
            (ErrorKind::NoCheckpoint, Class::NoCheckpoint),
            (ErrorKind::Closed, Class::Closed),
        ];
        for (kind, class) in cases {
            assert_eq!(class_of(kind), class, "{kind:?}");
        }
    }

    #[test]
    fn a_failed_save_keeps_the_class_of_its_cause() {
        let cause = ckptd::Error::Core(ckpt_core::Error::Corrupt {
            location: ckpt_core::Location::default(),
            reason: "crc".into(),
        });
        let e = ckptd::Error::SaveFailed { step: 3, source: std::sync::Arc::new(cause) };
        assert_eq!(class_of(e.kind()), Class::Corrupt);
    }
}
