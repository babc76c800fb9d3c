//! Leases: who computes a cold key across processes (a value's lease,
//! taken with its generations before computing, renewed while computing,
//! given up by the store or when dropped), and which worker leads among
//! processes sharing a prefix (`CacheManager::lease`, the database feed's
//! leader). What this module alone owns: the lease scripts, a value lease's
//! life (`LeaseGuard`), and how long a lease lives.

use std::sync::OnceLock;
use std::time::Duration;

use redis::Script;

use crate::config::expiry_ms;
use crate::key::CacheKey;
use crate::{CacheConfig, CacheError, CacheManager};

/// Takes or renews a lease: KEYS[1] the lease key; ARGV[1] the holder;
/// ARGV[2] its time to live (ms). Returns 1 when `holder` holds it now.
/// Allowed under OOM (a lease is tiny, and losing one over memory would stop
/// the work it guards).
const LEASE_SCRIPT: &str = r"#!lua flags=allow-oom
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
";

/// Gives a lease up if `holder` (ARGV[1]) holds it.
const RELEASE_SCRIPT: &str = r"#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
";

fn lease_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(LEASE_SCRIPT))
}

fn release_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(RELEASE_SCRIPT))
}

impl CacheManager {
    /// Takes the lease `lease` (a full key) for `holder` if nobody holds it.
    pub(crate) async fn take_lease(
        &self,
        lease: &str,
        holder: &str,
        budget: &mut Duration,
    ) -> Result<bool, CacheError> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(lease)
            .arg(holder)
            .arg("NX")
            .arg("PX")
            .arg(expiry_ms(lease_ttl(self.config())));
        let set: Option<String> = self
            .connection()
            .call_within(budget, |mut c| async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(set.is_some())
    }

    /// A held lease: renewed in the background while the value is computed
    /// (so that it outlives a long computation, yet expires soon after a
    /// holder that died), given up when the guard is settled or dropped.
    pub(crate) fn hold(&self, key: String, holder: String) -> LeaseGuard {
        let renewer = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let (manager, key, holder) = (self.clone(), key.clone(), holder.clone());
            let ttl = lease_ttl(self.config());
            runtime
                .spawn(async move {
                    loop {
                        tokio::time::sleep(ttl / 3).await;
                        let mut invocation = lease_script().key(&key);
                        invocation.arg(&holder).arg(expiry_ms(ttl));
                        let held = manager
                            .connection()
                            .call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await })
                            .await;
                        if !matches!(held, Ok(1)) {
                            break;
                        }
                    }
                })
                .abort_handle()
        });
        LeaseGuard {
            manager: self.clone(),
            key,
            holder,
            armed: true,
            renewer,
        }
    }

    /// The Redis key of `key`'s lease: `PREFIX lease:v:...`.
    pub(crate) fn lease_key(&self, key: &CacheKey) -> String {
        self.connection().keys().value_lease(&key.value)
    }

    /// Takes the lease `name` for `holder`, or renews it if `holder` holds
    /// it, for `ttl`; returns whether `holder` holds it now. Leases elect one
    /// worker among processes sharing this prefix (the database feed's
    /// leader, for one); they live at `PREFIX lease:NAME`. Without Redis
    /// (the in-process tier alone) they live in this manager's memory: each
    /// process caches for itself, so each elects its own.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails.
    pub async fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, CacheError> {
        if let Some(book) = &self.inner.book {
            return Ok(book.lease(name, holder, ttl));
        }
        let mut invocation = lease_script().key(self.connection().keys().lease(name));
        invocation.arg(holder).arg(expiry_ms(ttl));
        let held: i64 = self
            .connection()
            .call(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await?;
        Ok(held == 1)
    }

    /// Gives the lease `name` up if `holder` holds it.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails.
    pub async fn release(&self, name: &str, holder: &str) -> Result<(), CacheError> {
        if let Some(book) = &self.inner.book {
            book.release(name, holder);
            return Ok(());
        }
        let mut invocation = release_script().key(self.connection().keys().lease(name));
        invocation.arg(holder);
        self.connection()
            .call(|mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await })
            .await
            .map(|_| ())
    }
}

/// What asking for a key's lease gave.
pub(crate) enum Lease {
    /// Not asked for, or the cache could not answer.
    None,
    /// Ours: we compute and store (or give it up).
    Held(LeaseGuard),
    /// Another caller (in another process, or an earlier flight in this
    /// one) computes the key.
    Busy,
}

/// How long a key's lease lives without renewal: a quarter of
/// `lease_wait` (at least 10 ms), so that the lease of a holder that died
/// is free well before the callers waiting on it give up.
pub(crate) fn lease_ttl(config: &CacheConfig) -> Duration {
    (config.lease_wait / 4).max(Duration::from_millis(10))
}

/// A lease held on a key while its value is computed. Given up by the
/// store (in the same script); dropped without storing (the result was not
/// cacheable, the caller was cancelled), it is given up in the background.
pub(crate) struct LeaseGuard {
    manager: CacheManager,
    /// The lease's key (the store script gives it up by this name).
    pub(crate) key: String,
    /// Who holds it.
    pub(crate) holder: String,
    armed: bool,
    renewer: Option<tokio::task::AbortHandle>,
}

impl LeaseGuard {
    /// Gives the lease up now (where the store cannot, on a cluster).
    pub(crate) async fn give_up(&mut self) {
        self.settle();
        let mut invocation = release_script().key(&self.key);
        invocation.arg(&self.holder);
        let _ = self
            .manager
            .connection()
            .call(|mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await })
            .await;
    }

    /// The store gave the lease up: stop renewing it.
    pub(crate) fn settle(&mut self) {
        self.armed = false;
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (manager, key, holder) = (
            self.manager.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.holder),
        );
        runtime.spawn(async move {
            let mut invocation = release_script().key(key);
            invocation.arg(holder);
            let _ = manager
                .connection()
                .call(|mut conn| async move { invocation.invoke_async::<i64>(&mut conn).await })
                .await;
        });
    }
}
