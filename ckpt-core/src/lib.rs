//! `ckpt-core`: the ckptd checkpoint engine.
//!
//! It turns a snapshot (a contiguous byte region plus a typed tensor table) into a durable,
//! verifiable, atomically committed checkpoint on any `object_store` backend, and turns that back
//! into bytes. It holds no network server: the sidecar agent, the isolator and the Python bindings
//! all call into it.
//!
//! The on-storage format is specified in `docs/FORMAT.md`; [`format`] and [`manifest`] implement it.
//!
//! Layout of a checkpoint on a store (`<root>` is the URL's path):
//!
//! ```text
//! <root>/<job>/step-<N>/rank-<r>.<tag>.ckpt   a shard of rank r (a new name per write): chunks, index, trailer
//! <root>/<job>/step-<N>/MANIFEST              the commit record, naming the shards that count; a step
//!                                             exists only once this exists
//! ```

pub mod arena;
pub mod catalog;
pub mod codec;
pub mod commit;
pub mod copy;
pub mod dtype;
pub mod durable;
pub mod engine;
pub mod error;
pub mod format;
pub mod manifest;
pub mod persist;
pub mod priority;
pub mod progress;
pub mod restore;
pub mod retention;
pub mod slots;
pub mod store;
pub mod tensor;
mod watch;

pub use catalog::{StepInfo, StepState, VerifyReport};
pub use codec::Compression;
pub use commit::{CommitConfig, CommitRole, Committed};
pub use dtype::DType;
pub use engine::{Engine, EngineConfig, RestorePlan};
pub use error::{Error, ErrorKind, Location, Result};
pub use format::{ShardIndex, Trailer};
pub use manifest::{Manifest, Resize, ShardEntry};
pub use persist::{FileIo, PersistConfig, ShardInfo, Snapshot};
pub use priority::Priority;
pub use progress::Phase;
pub use restore::{Pieces, ReadConfig, ShardHeader};
pub use retention::{GcReport, RetentionPolicy};
pub use slots::CommitTimings;
pub use store::{Store, StoreOptions};
pub use tensor::{TensorEntry, TensorMeta, TensorTable};
