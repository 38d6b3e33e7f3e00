//! [`Primary`]: the connection to the Redis primary every call goes to.
//!
//! Given directly (`redis://`, `rediss://`), it is one connection manager,
//! which reconnects to that address by itself. Found through Sentinel, the
//! sentinels are asked for the primary before the first call and again after
//! any call failed (at most once per [`ASK_EVERY`]), and the connection is
//! replaced when they name another server: a failover shows as a few calls
//! answered `UNAVAILABLE`, then calls go to the new primary.

use std::{
    sync::{
        RwLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::{sync::Mutex, time::Instant};

use super::{
    RedisStoreError,
    target::{Sentinels, Target},
};

/// The sentinels are asked at most this often.
const ASK_EVERY: Duration = Duration::from_millis(250);

/// The connection to the primary (see the module docs).
pub(super) struct Primary {
    target: Target,
    manager: ConnectionManagerConfig,
    /// Deadline of asking one sentinel.
    ask_timeout: Duration,
    /// The primary in use: `None` through Sentinel until one answered.
    current: RwLock<Option<Current>>,
    /// A call failed since the sentinels were last asked.
    suspect: AtomicBool,
    /// One caller asks the sentinels at a time; when it last did.
    asked: Mutex<Option<Instant>>,
}

struct Current {
    /// `(host, port)` a sentinel named; `None` when given directly.
    addr: Option<(String, u16)>,
    conn: ConnectionManager,
}

impl std::fmt::Debug for Primary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Primary")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Primary {
    /// Connects lazily: nothing is dialled before the first call.
    pub(super) fn new(
        target: Target,
        manager: ConnectionManagerConfig,
        ask_timeout: Duration,
    ) -> Result<Self, RedisStoreError> {
        let current = match &target {
            Target::Direct(client) => Some(Current {
                addr: None,
                conn: ConnectionManager::new_lazy_with_config(client.clone(), manager.clone())?,
            }),
            Target::Sentinel(_) => None,
        };
        Ok(Self {
            target,
            manager,
            ask_timeout,
            current: RwLock::new(current),
            suspect: AtomicBool::new(false),
            asked: Mutex::new(None),
        })
    }

    /// A handle on the primary's connection (cheap to clone, shared).
    pub(super) async fn conn(&self) -> Result<ConnectionManager, RedisStoreError> {
        if let Target::Sentinel(sentinels) = &self.target
            && (self.known().is_none() || self.suspect.load(Ordering::Relaxed))
        {
            self.ask(sentinels).await?;
        }
        self.known().ok_or_else(|| RedisStoreError::NoPrimary {
            reason: "no sentinel answered yet".into(),
        })
    }

    /// A call failed: through Sentinel, the next call asks for the primary again.
    pub(super) fn failed(&self) {
        if matches!(self.target, Target::Sentinel(_)) {
            self.suspect.store(true, Ordering::Relaxed);
        }
    }

    fn known(&self) -> Option<ConnectionManager> {
        // Only whole values are stored under the lock: a poisoned one is usable.
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        current.as_ref().map(|c| c.conn.clone())
    }

    /// Asks the sentinels and switches to the primary they name. With a
    /// primary known, a caller that finds another one asking, or the last
    /// asking too recent, goes on with the known one.
    async fn ask(&self, sentinels: &Sentinels) -> Result<(), RedisStoreError> {
        let known = self.known().is_some();
        let mut asked = if known {
            match self.asked.try_lock() {
                Ok(guard) => guard,
                Err(_) => return Ok(()),
            }
        } else {
            self.asked.lock().await
        };
        if known && asked.is_some_and(|at| at.elapsed() < ASK_EVERY) {
            return Ok(());
        }
        if !known && self.known().is_some() {
            // Another caller found it while this one waited.
            return Ok(());
        }
        *asked = Some(Instant::now());
        self.suspect.store(false, Ordering::Relaxed);
        let (host, port) = match sentinels.primary(self.ask_timeout).await {
            Ok(addr) => addr,
            Err(reason) => {
                // Asked again by a later call (no sooner than ASK_EVERY).
                self.suspect.store(true, Ordering::Relaxed);
                if known {
                    tracing::debug!(%reason, "sentinels did not answer; keeping the known primary");
                    return Ok(());
                }
                return Err(RedisStoreError::NoPrimary { reason });
            }
        };
        let same = {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            current
                .as_ref()
                .is_some_and(|c| c.addr.as_ref() == Some(&(host.clone(), port)))
        };
        if same {
            return Ok(());
        }
        let conn = ConnectionManager::new_lazy_with_config(
            sentinels.primary_client(&host, port)?,
            self.manager.clone(),
        )?;
        tracing::info!(
            service = sentinels.service(),
            primary = %format_args!("{host}:{port}"),
            "Redis primary named by Sentinel"
        );
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Current {
            addr: Some((host, port)),
            conn,
        });
        Ok(())
    }
}
