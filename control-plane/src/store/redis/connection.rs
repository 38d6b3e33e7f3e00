//! Reaching Redis: the connection, deadlines, script calls and pipelines.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::{ErrorKind, Script, Value, aio::ConnectionManagerConfig};

use super::{
    BULK_ITEMS_PER_OP_TIMEOUT, PIPELINE, R, Recent, RedisConfig, RedisSetupError, RedisStore,
    RedisStoreError, Scripts, Target,
    encoding::{is_noscript, reply},
    error::tls_failure,
    primary::Primary,
    redact_url,
    scripts::Call,
};
use crate::store::StoreError;

impl RedisStore {
    /// A store on the Redis at `config.url`. Connects lazily: a Redis that is
    /// down now makes calls fail with [`StoreError::Unavailable`] until it is up.
    pub fn new(config: RedisConfig) -> Result<Self, StoreError> {
        let target =
            Target::parse(&config.url, &config.tls).map_err(|e| StoreError::Unavailable {
                source: Box::new(e),
            })?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.op_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let primary = Primary::new(target, manager, config.connect_timeout)?;
        Ok(Self {
            primary: Arc::new(primary),
            cache: Arc::new(Recent::new(config.swarm_cache)),
            peer_cache: Arc::new(Recent::new(config.swarm_cache)),
            config: Arc::new(config),
            scripts: Arc::new(Scripts::new()),
            down: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// Runs one operation under the deadline, and logs the first failure and
    /// the recovery of an outage once each.
    pub(super) async fn run<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = R<T>>,
    ) -> Result<T, StoreError> {
        self.run_within(op, self.config.op_timeout, fut).await
    }

    /// [`RedisStore::run`] for an operation of many round trips (an announce
    /// of `items` blobs, a sweep, a purge): a longer deadline for the whole,
    /// while each round trip keeps [`RedisConfig::op_timeout`], so a Redis
    /// that is down still fails the call at once.
    pub(super) async fn run_bulk<T>(
        &self,
        op: &'static str,
        items: usize,
        fut: impl Future<Output = R<T>>,
    ) -> Result<T, StoreError> {
        let rounds = 10 + (items / BULK_ITEMS_PER_OP_TIMEOUT) as u32;
        self.run_within(op, self.config.op_timeout * rounds, fut)
            .await
    }

    pub(super) async fn run_within<T>(
        &self,
        op: &'static str,
        timeout: Duration,
        fut: impl Future<Output = R<T>>,
    ) -> Result<T, StoreError> {
        let outcome = match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(RedisStoreError::Timeout { timeout }),
        };
        match &outcome {
            Ok(_) | Err(RedisStoreError::Refused(_)) => {
                if self.down.swap(false, Ordering::Relaxed) {
                    tracing::info!("Redis answers again");
                }
            }
            Err(err) => {
                self.primary.failed();
                if !self.down.swap(true, Ordering::Relaxed) {
                    tracing::warn!(op, error = %err, "Redis unavailable; answering UNAVAILABLE until it is back");
                }
            }
        }
        Ok(outcome?)
    }

    pub(super) async fn eval(&self, script: &Script, keys: &[String], args: &[&[u8]]) -> R<Value> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k);
        }
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.primary.conn().await?;
        Ok(inv.invoke_async(&mut conn).await?)
    }

    /// Runs many calls of one script, pipelined; loads the script when Redis
    /// lost it (after a restart) and retries those calls once.
    pub(super) async fn eval_many(&self, script: &Script, calls: &[Call]) -> R<Vec<Value>> {
        let mut out = Vec::with_capacity(calls.len());
        let mut conn = self.primary.conn().await?;
        for batch in calls.chunks(PIPELINE) {
            let mut loaded = false;
            let mut results: Vec<Option<Value>> = vec![None; batch.len()];
            // At most two rounds: the second only after loading the script.
            for _round in 0..2 {
                let pending: Vec<usize> =
                    (0..batch.len()).filter(|&i| results[i].is_none()).collect();
                if pending.is_empty() {
                    break;
                }
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for &i in &pending {
                    let call = &batch[i];
                    let cmd = pipe
                        .cmd("EVALSHA")
                        .arg(script.get_hash())
                        .arg(call.keys.len())
                        .arg(&call.keys);
                    for a in &call.args {
                        cmd.arg(&a[..]);
                    }
                }
                let answers: Vec<redis::RedisResult<Value>> = pipe.query_async(&mut conn).await?;
                let mut missing = false;
                for (&i, answer) in pending.iter().zip(answers) {
                    match answer {
                        Ok(v) => results[i] = Some(v),
                        Err(e) if is_noscript(&e) && !loaded => missing = true,
                        Err(e) => return Err(e.into()),
                    }
                }
                if !missing {
                    break;
                }
                script.prepare_invoke().load_async(&mut conn).await?;
                loaded = true;
            }
            for r in results {
                out.push(r.ok_or_else(|| reply("a pipelined script"))?);
            }
        }
        Ok(out)
    }

    /// Bytes Redis uses for its data set and overhead (`used_memory` of `INFO memory`).
    pub async fn used_memory(&self) -> Result<u64, StoreError> {
        self.run("info", async {
            let mut conn = self.primary.conn().await?;
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut conn)
                .await?;
            info.lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| reply("INFO memory"))
        })
        .await
    }

    /// Reaches Redis once, at start-up: `Ok` when it answers, and also when
    /// it cannot be reached now (calls answer `UNAVAILABLE` until it can); an
    /// error when it was reached but can never serve as configured (a TLS
    /// certificate refused either way, credentials refused).
    pub async fn check_setup(&self) -> Result<(), RedisSetupError> {
        let url = redact_url(&self.config.url);
        let attempt = tokio::time::timeout(self.config.op_timeout, async {
            let mut conn = self.primary.conn().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok::<_, RedisStoreError>(())
        })
        .await;
        let Ok(Err(RedisStoreError::Redis(err))) = attempt else {
            return Ok(());
        };
        if let Some(tls) = tls_failure(&err) {
            return Err(RedisSetupError::Tls {
                url,
                reason: tls.to_string(),
            });
        }
        if err.kind() == ErrorKind::AuthenticationFailed
            || err
                .code()
                .is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH")
        {
            return Err(RedisSetupError::Credentials {
                url,
                reason: err.to_string(),
            });
        }
        tracing::warn!(%url, error = %err, "Redis not reachable at start-up; answering UNAVAILABLE until it is");
        Ok(())
    }

    /// Whether Redis answers (a `PING`).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", async {
            let mut conn = self.primary.conn().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok(())
        })
        .await
    }
}
