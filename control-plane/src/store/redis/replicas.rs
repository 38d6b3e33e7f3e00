//! Coordination between control-plane replicas: who is live, and locks.

use std::time::Duration;

use super::{
    RedisStore,
    encoding::{as_array, as_str, millis, reply},
};
use crate::store::StoreError;

impl RedisStore {
    /// Registers `me` as a live replica for `ttl` and returns every live
    /// replica, sorted.
    pub async fn live_replicas(&self, me: &str, ttl: Duration) -> Result<Vec<String>, StoreError> {
        self.run("replicas", async {
            let key = format!("{}:{{replicas}}", self.prefix());
            let ttl = millis(ttl).to_string();
            let v = self
                .eval(
                    &self.scripts.replicas,
                    &[key],
                    &[me.as_bytes(), ttl.as_bytes()],
                )
                .await?;
            let mut names: Vec<String> = as_array(&v)
                .ok_or_else(|| reply("replicas"))?
                .iter()
                .filter_map(|v| as_str(v).map(str::to_owned))
                .collect();
            names.sort();
            Ok(names)
        })
        .await
    }

    /// Takes (or keeps) the lock `name` for `holder` for `ttl`; `true` when
    /// `holder` holds it now.
    pub async fn try_lock(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.run("lock", async {
            let key = format!("{}:{{lock}}:{name}", self.prefix());
            let mut conn = self.primary.conn().await?;
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(holder)
                .arg("NX")
                .arg("PX")
                .arg(millis(ttl))
                .query_async(&mut conn)
                .await?;
            if set.is_some() {
                return Ok(true);
            }
            // Ours already: extend it (compare and extend in one step).
            let extended: i64 = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
            )
            .key(&key)
            .arg(holder)
            .arg(millis(ttl))
            .invoke_async(&mut conn)
            .await?;
            Ok(extended == 1)
        })
        .await
    }
}
