//! What the runtime's two connection pools ([`super::native`], [`super::pg`]) share: at most
//! `max` connections, opened as needed; those given back kept for the next caller, the last
//! one given back first (its prepared statements are the likeliest to be warm).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::Error;

/// How long a caller waits for a free connection before it fails.
const ACQUIRE_WAIT: Duration = Duration::from_secs(30);

/// The idle connections `C` of a pool and the right to hold one.
pub(super) struct Slots<C> {
    idle: Mutex<Vec<C>>,
    permits: Arc<Semaphore>,
    /// Closed: connections are closed as they come back, none are opened.
    closed: AtomicBool,
}

/// The right to hold one connection of a pool; given back when dropped.
pub(super) type Permit = OwnedSemaphorePermit;

impl<C> Slots<C> {
    pub fn new(max: u32) -> Self {
        Slots {
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(max.max(1) as usize)),
            closed: AtomicBool::new(false),
        }
    }

    /// Wait for the right to hold a connection; with an idle one, if there is one (else the
    /// caller opens one).
    pub async fn take(&self) -> Result<(Option<C>, Permit), Error> {
        let permit = tokio::time::timeout(ACQUIRE_WAIT, self.permits.clone().acquire_owned()).await;
        let Ok(Ok(permit)) = permit else {
            return Err(Error::Sql(sqlx::Error::PoolTimedOut));
        };
        let idle = self.idle.lock().expect("pool lock").pop();
        Ok((idle, permit))
    }

    /// Keep `conn` for the next caller (closed with it if the pool is). Before its permit is
    /// dropped, so that whoever that permit lets in finds it.
    pub fn give_back(&self, conn: C) {
        if !self.is_closed() {
            self.idle.lock().expect("pool lock").push(conn);
        }
    }

    /// Close the idle connections, and the others as they come back.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.permits.close();
        self.idle.lock().expect("pool lock").clear();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}
