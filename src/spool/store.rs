//! The database file, its handle (replaced when the writer opens the file again after a failed
//! write) and how its disk is doing.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::Database;

use super::{CACHE_BYTES, StoreError};

/// How the spool's disk is doing, shared by the writer and everyone who reports it.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// The last write error, while writes fail.
    pub(super) error: Mutex<Option<String>>,
    /// Transactions that failed.
    pub(super) write_failures: AtomicU64,
    /// Rows and bytes held in memory, all targets together.
    pub(super) held_rows: AtomicU64,
    pub(super) held_bytes: AtomicU64,
}

impl Health {
    pub(super) fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(super) fn set_error(&self, error: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = error;
    }
}

/// What [`super::Spool::health`] reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct SpoolHealth {
    /// The write error, while the disk refuses writes.
    pub(crate) error: Option<String>,
    /// Transactions that failed since the start.
    pub(crate) write_failures: u64,
    /// Messages held in memory until the disk takes them.
    pub(crate) held_messages: u64,
    /// Their bytes (at most [`super::MAX_HELD_BYTES`]).
    pub(crate) held_bytes: u64,
}

/// The database file and its handle, which the writer replaces when it opens the file again
/// after a failed write (redb refuses every write after an I/O error until then).
pub(super) struct Store {
    pub(super) path: PathBuf,
    /// `None` while it is being opened again.
    pub(super) db: RwLock<Option<Arc<Database>>>,
    pub(super) health: Health,
}

impl Store {
    pub(super) fn db(&self) -> Option<Arc<Database>> {
        self.db.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Closes the database and opens it again.
    pub(super) fn reopen(&self) -> Result<(), StoreError> {
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(mut old) = old {
            // Readers hold a clone for the length of one read; the file lock goes with the last.
            let deadline = Instant::now() + Duration::from_secs(1);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => {
                        drop(db);
                        break;
                    }
                    Err(still_shared) if Instant::now() < deadline => {
                        old = still_shared;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(still_shared) => {
                        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(still_shared);
                        return Err(StoreError::ReaderActive);
                    }
                }
            }
        }
        let db = open_db(&self.path).map_err(StoreError::Reopen)?;
        *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        Ok(())
    }
}

/// A panic caught by [`without_panic_message`]: its message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct Panicked(pub(super) String);

/// Runs `f`, turning a panic into its message, without the panic hook printing it for this
/// thread (other threads' panics are reported as usual).
pub(super) fn without_panic_message<T>(f: impl FnOnce() -> T) -> Result<T, Panicked> {
    let me = std::thread::current().id();
    let previous: Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
        Arc::from(std::panic::take_hook());
    let others = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != me {
            others(info)
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(Box::new(move |info| previous(info)));
    result.map_err(|payload| {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unreadable".into());
        // One line: an assertion's message spans several.
        Panicked(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        )
    })
}

/// Opens (or creates) the database file with the spool's cache size, readable by its owner
/// only (it holds message payloads).
pub(super) fn open_db(path: &Path) -> Result<Database, redb::DatabaseError> {
    // A small page cache: the spool is written once and read once, sequentially; redb's
    // default (1 GiB) would show up as resident memory under a long outage.
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| redb::DatabaseError::Storage(redb::StorageError::Io(e)))?;
    }
    Ok(db)
}
