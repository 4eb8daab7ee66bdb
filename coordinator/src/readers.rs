//! Read-only SQLite connections for queries (GetJob, ListJobs, logs, event replay), run
//! on the blocking pool so they never stall the async runtime or the control loop.

use crate::error::Result;
use crate::persistence;
use rusqlite::Connection;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

pub struct Readers {
    path: PathBuf,
    /// Idle connections; the lock is held only to push or pop one.
    pool: Mutex<Vec<Connection>>,
}

impl Readers {
    pub fn new(path: PathBuf) -> Arc<Self> {
        Arc::new(Self { path, pool: Mutex::new(Vec::new()) })
    }

    pub async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = me.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let conn = match conn {
                Some(c) => c,
                None => persistence::open_reader(&me.path)?,
            };
            let r = f(&conn);
            let mut pool = me.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < 8 {
                pool.push(conn);
            }
            r
        })
        .await
        .map_err(|e| crate::error::CoordError::Internal(format!("reader task failed: {e}")))?
    }
}
