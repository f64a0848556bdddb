//! `_Checkpointer` and `_SaveHandle`: thin wrappers over [`ckptd::client`].
//!
//! The Python layer (`python/ckptd/__init__.py`) flattens the training state into tensor tuples
//! `(name, dtype, shape, addr, device)` and keeps every object whose memory it passes alive until
//! the save that reads it has finished. This layer converts, releases the GIL around everything
//! that copies, waits or does I/O, and maps errors through [`crate::errors`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ckpt_core::copy::Device;
use ckpt_core::{Compression, DType};
use ckptd::client::{Checkpointer, CheckpointerConfig, Description, Phase, SaveHandle, TensorRef};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::{core_to_py, open_to_py, to_py};

/// A tensor as the Python layer passes it: `(name, dtype, shape, addr, device)`, where `device` is
/// -1 for host memory and `n` for `cuda:n`.
type PyTensor = (String, String, Vec<u64>, u64, i64);

/// A stored tensor as `describe` reports it: `(name, dtype, shape)`.
type StoredTensor = (String, String, Vec<u64>);

fn invalid_config(field: &'static str, reason: String) -> PyErr {
    to_py(ckptd::Error::Config { what: field.into(), reason })
}

fn tensor_refs(tensors: Vec<PyTensor>) -> PyResult<Vec<TensorRef>> {
    tensors
        .into_iter()
        .map(|(name, dtype, shape, addr, device)| {
            let dtype = match dtype.parse::<DType>() {
                Ok(d) => d,
                Err(_) => {
                    return Err(core_to_py(ckpt_core::Error::InvalidTensor {
                        reason: format!("unknown dtype `{dtype}`: use a torch dtype name such as float32 or bfloat16"),
                        name,
                    }));
                }
            };
            let device = match device {
                -1 => Device::Cpu,
                n => match u32::try_from(n) {
                    Ok(n) => Device::Cuda(n),
                    Err(_) => {
                        return Err(core_to_py(ckpt_core::Error::InvalidTensor {
                            reason: format!("device {n} is neither -1 (host) nor a CUDA ordinal"),
                            name,
                        }));
                    }
                },
            };
            Ok(TensorRef { name, dtype, shape, addr, device })
        })
        .collect()
}

/// A step's tensor table as `describe` and the load check report it.
fn stored_table(d: &Description) -> Vec<StoredTensor> {
    d.table
        .entries()
        .iter()
        .map(|e| (e.meta.name.clone(), e.meta.dtype.name().to_string(), e.meta.shape.clone()))
        .collect()
}

/// Saves and loads a flattened training state (private: use `ckptd.Checkpointer`).
#[pyclass(name = "_Checkpointer", module = "ckptd._native")]
#[derive(Debug)]
pub struct PyCheckpointer {
    /// `None` once closed.
    inner: RwLock<Option<Arc<Checkpointer>>>,
    /// The objects that own the memory of each save whose copies may still run. Declared after
    /// `inner`, so that dropping this object first waits for the saves (the checkpointer's `Drop`
    /// closes it) and only then releases their memory.
    keepalive: Mutex<Vec<(SaveHandle, Py<PyAny>)>>,
}

impl PyCheckpointer {
    fn get(&self) -> PyResult<Arc<Checkpointer>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| to_py(ckptd::Error::Closed))
    }

    /// Releases the objects of saves that have finished.
    fn prune(&self) {
        self.keepalive.lock().unwrap_or_else(|p| p.into_inner()).retain(|(h, _)| !h.done());
    }
}

#[pymethods]
impl PyCheckpointer {
    #[new]
    #[pyo3(signature = (
        job, *, store=None, rank=None, world_size=None, socket=None, slots=None, compression="none",
        arena_dir=None, chunk_size=None, commit_timeout=None, strict_restore=false, on_resize=None,
        parallel=None, size_hint=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        job: String,
        store: Option<String>,
        rank: Option<u32>,
        world_size: Option<u32>,
        socket: Option<PathBuf>,
        slots: Option<u32>,
        compression: &str,
        arena_dir: Option<PathBuf>,
        chunk_size: Option<u64>,
        commit_timeout: Option<f64>,
        strict_restore: bool,
        on_resize: Option<String>,
        parallel: Option<String>,
        size_hint: Option<u64>,
    ) -> PyResult<Self> {
        let mut cfg = CheckpointerConfig::new(job);
        cfg.store = store;
        cfg.rank = rank;
        cfg.world_size = world_size;
        cfg.socket = socket;
        if let Some(slots) = slots {
            cfg.slots = slots;
        }
        cfg.size_hint = size_hint;
        cfg.arena_dir = arena_dir;
        cfg.strict_restore = strict_restore;
        if on_resize.is_some() || parallel.is_some() {
            let on_resize = on_resize.or_else(|| ckptd::env::nonempty(ckptd::env::ENV_ON_RESIZE));
            let parallel = parallel.or_else(|| ckptd::env::nonempty(ckptd::env::ENV_PARALLEL));
            let resize = ckptd::resize::parse(on_resize.as_deref(), parallel.as_deref())
                .map_err(|reason| invalid_config("on_resize", reason))?;
            cfg.resize = Some(resize);
        }
        cfg.engine.persist.compression = compression.parse::<Compression>().map_err(core_to_py)?;
        if let Some(size) = chunk_size {
            cfg.engine.persist.chunk_size = u32::try_from(size)
                .map_err(|_| invalid_config("chunk_size", format!("{size} bytes do not fit 32 bits")))?;
        }
        if let Some(secs) = commit_timeout {
            cfg.engine.commit.deadline =
                Duration::try_from_secs_f64(secs).ok().filter(|d| !d.is_zero()).ok_or_else(|| {
                    invalid_config("commit_timeout", format!("{secs} is not a positive number of seconds"))
                })?;
        }
        // Opening a store may touch the network or the file system.
        let ck = py.detach(|| Checkpointer::new(cfg)).map_err(open_to_py)?;
        Ok(PyCheckpointer { inner: RwLock::new(Some(Arc::new(ck))), keepalive: Mutex::new(Vec::new()) })
    }

    /// Starts saving `tensors` as `step`; returns once the copies are enqueued. `keepalive` (the
    /// objects owning the tensors' memory) stays referenced until the save has finished.
    #[pyo3(signature = (tensors, step, metadata, stream=None, *, keepalive=None))]
    fn save(
        &self,
        py: Python<'_>,
        tensors: Vec<PyTensor>,
        step: u64,
        metadata: &[u8],
        stream: Option<u64>,
        keepalive: Option<Py<PyAny>>,
    ) -> PyResult<PySaveHandle> {
        let ck = self.get()?;
        let refs = tensor_refs(tensors)?;
        let metadata = metadata.to_vec();
        let handle = py.detach(|| {
            // SAFETY: this private module's contract, kept by `ckptd.Checkpointer.save`: every
            // address is the start of a live, contiguous buffer of the given dtype and shape,
            // owned by `keepalive` (referenced below until the save is done, or held by the
            // caller until this returns on failure), which the training loop does not write
            // before `fence()`.
            unsafe { ck.save(&refs, step, metadata, stream) }
        });
        let handle = handle.map_err(to_py)?;
        self.prune();
        let owners = keepalive.unwrap_or_else(|| py.None());
        self.keepalive.lock().unwrap_or_else(|p| p.into_inner()).push((handle.clone(), owners));
        Ok(PySaveHandle { inner: handle })
    }

    /// Fills `tensors` in place from `step` (default: the newest committed step). Returns
    /// `(step, metadata, from_memory)`. `check`, when given, is called as
    /// `check(step, metadata, [(name, dtype, shape)])` with the step actually read, before
    /// anything is written, and returns further problems (the caller's scalars that the checkpoint
    /// lacks), raised together with the tensor mismatches; an exception it raises is raised as
    /// is. The step is resolved, and its header read, once.
    #[pyo3(signature = (tensors, step=None, stream=None, check=None))]
    fn load(
        &self,
        py: Python<'_>,
        tensors: Vec<PyTensor>,
        step: Option<u64>,
        stream: Option<u64>,
        check: Option<Py<PyAny>>,
    ) -> PyResult<(u64, Py<PyBytes>, bool)> {
        let ck = self.get()?;
        let refs = tensor_refs(tensors)?;
        // A failure of `check` itself (a Python exception) is raised as it is, not as a mismatch.
        let check_error: Mutex<Option<PyErr>> = Mutex::new(None);
        let run_check = |d: &Description| -> Vec<String> {
            let Some(check) = &check else { return Vec::new() };
            Python::attach(|py| {
                let table = stored_table(d);
                let called = check
                    .call1(py, (d.step, PyBytes::new(py, &d.metadata), table))
                    .and_then(|problems| problems.extract::<Vec<String>>(py));
                called.unwrap_or_else(|e| {
                    let problem = format!("the state check failed: {e}");
                    *check_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    vec![problem]
                })
            })
        };
        let loaded = py.detach(|| {
            // SAFETY: this private module's contract, kept by `ckptd.Checkpointer.load`: every
            // address is the start of a live, writable, contiguous buffer of the given dtype and
            // shape, referenced by the caller for the whole call, that nothing else touches until
            // this returns.
            unsafe { ck.load_checked(&refs, step, stream, &run_check) }
        });
        if let Some(e) = check_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        let loaded = loaded.map_err(to_py)?;
        Ok((loaded.step, PyBytes::new(py, &loaded.metadata).unbind(), loaded.from_memory))
    }

    /// The stored tensor table and metadata of `step` (default: the newest committed step),
    /// without reading tensor data. Returns `(step, [(name, dtype, shape)], metadata)`.
    #[pyo3(signature = (step=None))]
    fn describe(&self, py: Python<'_>, step: Option<u64>) -> PyResult<(u64, Vec<StoredTensor>, Py<PyBytes>)> {
        let ck = self.get()?;
        let (step, table, metadata) = py
            .detach(|| {
                let d = ck.describe(step)?;
                let table = stored_table(&d);
                Ok::<_, ckptd::Error>((d.step, table, d.metadata))
            })
            .map_err(to_py)?;
        Ok((step, table, PyBytes::new(py, &metadata).unbind()))
    }

    /// Waits until the newest save's copies have read the tensors (with `stream`, GPU copies are
    /// fenced on that stream instead of blocking the host).
    #[pyo3(signature = (stream=None))]
    fn fence(&self, py: Python<'_>, stream: Option<u64>) -> PyResult<()> {
        let ck = self.get()?;
        py.detach(|| ck.fence(stream)).map_err(to_py)?;
        self.prune();
        Ok(())
    }

    /// Whether the arena exists and its pages are resident (see `Checkpointer::arena_ready`).
    #[getter]
    fn arena_ready(&self) -> PyResult<bool> {
        Ok(self.get()?.arena_ready())
    }

    /// `(saves, saves that waited for a slot, seconds they waited)`.
    fn stats(&self) -> PyResult<(u64, u64, f64)> {
        let s = self.get()?.stats();
        Ok((s.saves, s.waited, s.wait_time.as_secs_f64()))
    }

    /// The newest committed step that validates, or `None`.
    fn latest_step(&self, py: Python<'_>) -> PyResult<Option<u64>> {
        let ck = self.get()?;
        py.detach(|| ck.latest_step()).map_err(to_py)
    }

    /// Waits for every save in flight to be durable; raises the first failure.
    fn wait_all(&self, py: Python<'_>) -> PyResult<()> {
        let ck = self.get()?;
        let r = py.detach(|| ck.wait_all()).map_err(to_py);
        self.prune();
        r
    }

    /// Waits for the saves in flight and stops the checkpointer; the embedded arena is removed
    /// unless `keep_arena`. Closing twice does nothing.
    #[pyo3(signature = (*, keep_arena=false))]
    fn close(&self, py: Python<'_>, keep_arena: bool) -> PyResult<()> {
        let taken = self.inner.write().unwrap_or_else(|p| p.into_inner()).take();
        let r = match taken {
            Some(ck) => py.detach(move || {
                let r = if keep_arena { ck.close_keeping_arena() } else { ck.close() };
                drop(ck);
                r
            }),
            None => Ok(()),
        };
        // Every save has finished (or never will): nothing reads the tensors any more.
        self.keepalive.lock().unwrap_or_else(|p| p.into_inner()).clear();
        r.map_err(to_py)
    }

    /// Reports progress to the agent (sidecar mode; nothing embedded). `phase` is `init`, `step`,
    /// `checkpoint-save` or `checkpoint-load`. Returns the id of a snapshot the agent requested,
    /// or `None`.
    #[pyo3(signature = (step, phase="step"))]
    fn heartbeat(&self, py: Python<'_>, step: u64, phase: &str) -> PyResult<Option<u64>> {
        let phase = phase.parse::<Phase>().map_err(|_| {
            invalid_config("phase", format!("`{phase}` is not one of init, step, checkpoint-save, checkpoint-load"))
        })?;
        let ck = self.get()?;
        py.detach(|| ck.heartbeat(step, phase)).map_err(to_py)
    }

    /// Blocks up to `timeout` seconds (GIL released) for a snapshot request from the agent.
    fn wait_snapshot_request(&self, py: Python<'_>, timeout: f64) -> PyResult<Option<u64>> {
        let timeout = Duration::try_from_secs_f64(timeout)
            .map_err(|_| invalid_config("timeout", format!("{timeout} is not a number of seconds")))?;
        let ck = self.get()?;
        py.detach(|| ck.wait_snapshot_request(timeout)).map_err(to_py)
    }

    /// Takes the isolator's newest restore order `(step, generation)`, if one arrived.
    fn take_restore_order(&self) -> PyResult<Option<(u64, u64)>> {
        Ok(self.get()?.take_restore_order())
    }

    /// Why the agent asked this trainer to stop, if it did.
    #[getter]
    fn stop_requested(&self) -> PyResult<Option<String>> {
        Ok(self.get()?.stop_requested())
    }

    /// The snapshot request not yet answered by a save, if any.
    #[getter]
    fn snapshot_requested(&self) -> PyResult<Option<u64>> {
        Ok(self.get()?.snapshot_requested())
    }

    /// `"sidecar"` when the checkpointer runs against an agent, else `"embedded"`.
    #[getter]
    fn mode(&self) -> PyResult<&'static str> {
        Ok(if self.get()?.is_sidecar() { "sidecar" } else { "embedded" })
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).is_none()
    }

    /// The path of this rank's arena file.
    #[getter]
    fn arena_path(&self) -> PyResult<PathBuf> {
        Ok(self.get()?.arena_path())
    }
}

/// A save in progress (private: `ckptd.SaveHandle` wraps it).
#[pyclass(name = "_SaveHandle", module = "ckptd._native", frozen)]
#[derive(Debug)]
pub struct PySaveHandle {
    inner: SaveHandle,
}

#[pymethods]
impl PySaveHandle {
    /// Blocks until the step is durable and committed on every rank; raises if the save failed.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.wait()).map_err(to_py)
    }

    /// Whether the save finished (successfully or not).
    fn done(&self) -> bool {
        self.inner.done()
    }

    /// The step being saved.
    #[getter]
    fn step(&self) -> u64 {
        self.inner.step()
    }

    /// `(shard durable, commit learned of, MANIFEST written or None)` in nanoseconds since the
    /// Unix epoch, once the save succeeded; `None` before, and for a step found committed already.
    fn timings(&self) -> Option<(u64, u64, Option<u64>)> {
        let ns = ckpt_core::CommitTimings::unix_ns;
        self.inner.timings().map(|t| (ns(t.shard_durable), ns(t.committed), t.manifest_written.map(ns)))
    }
}
