//! The values this process stored lately, by generation: where the
//! consistency monitor looks for a value read before a write yet stored
//! after the write's invalidation (see `monitor.rs`), without scanning
//! Redis.
//!
//! Two indexes: [`Recent`], in process, of every value this process
//! stored; and, in Redis, the values plain `set`s of any process stored
//! ([`CacheManager::note_plain_set`], read by [`plain_sets`]): the only
//! kind that a check in another process can find read before a write.
//!
//! Kept only while the monitor is on. The in-process one is bounded: the last
//! [`PER_GENERATION`] values of each generation, for at most
//! [`MAX_GENERATIONS`] generations; past that, the generations with
//! nothing stored lately are forgotten (see [`Recent::stored`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use crate::codec;
use crate::config::expiry_ms;
use crate::{CacheKey, CacheManager};

/// Most values remembered per generation (the latest stored).
pub(crate) const PER_GENERATION: usize = 32;
/// Most generations remembered.
pub(crate) const MAX_GENERATIONS: usize = 16_384;

/// A value stored by this process.
#[derive(Debug)]
pub(crate) struct StoredValue {
    /// Its key in Redis.
    pub(crate) value: String,
    /// Its generations' keys, in the order of its envelope's tokens.
    pub(crate) generations: Vec<String>,
    /// Its key in this process's in-process tier (`None`: stored by a
    /// plain `set`, found in Redis, perhaps by another process).
    pub(crate) local: Option<u128>,
    /// The key's name (never its arguments): for the report.
    pub(crate) name: Option<Arc<str>>,
    /// When it was stored, in milliseconds since the epoch.
    pub(crate) stored_at_ms: i64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    by_generation: Mutex<HashMap<String, VecDeque<Arc<StoredValue>>>>,
}

impl Recent {
    /// Remembers that the value of `key` was stored just now. Past
    /// [`MAX_GENERATIONS`], the generations with nothing stored in the last
    /// `keep_ms` are forgotten (the checks look at what was stored since a
    /// write, a delay ago), and if that is not enough, all are.
    pub(crate) fn stored(&self, key: &CacheKey, keep_ms: i64) {
        let now = crate::book::now_ms();
        let value = Arc::new(StoredValue {
            value: key.value.clone(),
            generations: key.generations.clone(),
            local: Some(key.local),
            name: key.named.get().map(|named| Arc::clone(&named.name)),
            stored_at_ms: now,
        });
        let mut by_generation = self.by_generation.lock().unwrap_or_else(PoisonError::into_inner);
        if by_generation.len() + key.generations.len() > MAX_GENERATIONS {
            by_generation.retain(|_, values| values.back().is_some_and(|last| now - last.stored_at_ms <= keep_ms));
            if by_generation.len() + key.generations.len() > MAX_GENERATIONS {
                by_generation.clear();
            }
        }
        for generation in &key.generations {
            let values = by_generation.entry(generation.clone()).or_default();
            values.retain(|stored| stored.value != value.value);
            if values.len() == PER_GENERATION {
                values.pop_front();
            }
            values.push_back(Arc::clone(&value));
        }
    }

    /// The values remembered under any of `generations`, each once, at
    /// most `limit` of them.
    pub(crate) fn under<'a>(
        &self,
        generations: impl IntoIterator<Item = &'a str>,
        limit: usize,
    ) -> Vec<Arc<StoredValue>> {
        let by_generation = self.by_generation.lock().unwrap_or_else(PoisonError::into_inner);
        let mut seen = HashSet::new();
        let mut found = Vec::new();
        let all = generations
            .into_iter()
            .filter_map(|generation| by_generation.get(generation))
            .flatten();
        for stored in all {
            if found.len() == limit {
                break;
            }
            if seen.insert(stored.value.as_str()) {
                found.push(Arc::clone(stored));
            }
        }
        found
    }

    /// How many generations are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_generation.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// How long a plain `set`'s note is kept in Redis (see
/// [`CacheManager::note_plain_set`]): longer than any check's delay should
/// be, and the same in every process.
pub(crate) const PLAIN_SET_KEEP: std::time::Duration = std::time::Duration::from_secs(60);

impl CacheManager {
    /// Remembers in Redis, for the monitor of every process of the prefix,
    /// that a plain `set` stored the value of `key`: a value stored without
    /// the generation check, the kind that can be found read before a write
    /// by a check that runs in another process (the writer's, the feed's).
    /// Per generation, the last [`PER_GENERATION`] values noted, for
    /// [`PLAIN_SET_KEEP`], in a sorted set by time (`Keyspace::plain_sets`).
    /// Best effort: a note that fails is not retried (that value is then
    /// not checked by other processes).
    pub(crate) async fn note_plain_set(&self, key: &CacheKey) {
        let conn = self.connection();
        if self.inner.monitor.is_none() || !conn.is_enabled() || key.generations.is_empty() {
            return;
        }
        let name = key.named.get().map(|named| named.name.to_string());
        let Ok(member) = codec::encode(&(name, &key.value, &key.generations)) else {
            return;
        };
        let keys = conn.keys();
        let mut pipe = redis::pipe();
        let trim = -i64::try_from(PER_GENERATION).unwrap_or(i64::MAX) - 1;
        for generation in &key.generations {
            let index = keys.plain_sets(generation);
            pipe.cmd("ZADD")
                .arg(&index)
                .arg(crate::book::now_ms())
                .arg(&member)
                .ignore();
            pipe.cmd("ZREMRANGEBYRANK").arg(&index).arg(0).arg(trim).ignore();
            pipe.cmd("PEXPIRE").arg(&index).arg(expiry_ms(PLAIN_SET_KEEP)).ignore();
        }
        let _ = conn
            .call(|mut wire| async move { pipe.query_async::<()>(&mut wire).await })
            .await;
    }
}

/// The values plain `set`s of any process stored lately under the
/// generations `names` (see [`CacheManager::note_plain_set`]).
pub(crate) async fn plain_sets(
    conn: &crate::connection::Connection,
    names: &[String],
) -> Result<Vec<Arc<StoredValue>>, crate::CacheError> {
    let keys = conn.keys();
    let mut pipe = redis::pipe();
    for name in names {
        pipe.cmd("ZRANGE")
            .arg(keys.plain_sets(name))
            .arg(0)
            .arg(-1)
            .arg("REV")
            .arg("WITHSCORES");
    }
    let found = conn
        .call(|mut wire| async move { pipe.query_async::<Vec<redis::Value>>(&mut wire).await })
        .await?;
    let mut noted: Vec<(Vec<u8>, i64)> = found.into_iter().flat_map(scored).collect();
    // Newest first, each value once.
    noted.sort_by_key(|(_, at)| std::cmp::Reverse(*at));
    let mut seen = HashSet::new();
    Ok(noted
        .into_iter()
        .filter_map(|(member, stored_at_ms)| {
            let (name, value, generations) = codec::decode::<(Option<String>, String, Vec<String>)>(&member).ok()?;
            seen.insert(value.clone()).then(|| {
                Arc::new(StoredValue {
                    value,
                    generations,
                    local: None,
                    name: name.map(Arc::from),
                    stored_at_ms,
                })
            })
        })
        .collect())
}

/// The members of a `ZRANGE .. WITHSCORES` answer with their scores, as
/// either protocol gives them (pairs, or one flat list); nothing from
/// anything else.
fn scored(answer: redis::Value) -> Vec<(Vec<u8>, i64)> {
    let redis::Value::Array(items) = answer else {
        return Vec::new();
    };
    let pair = |member: redis::Value, score: redis::Value| {
        let member = redis::from_redis_value::<Vec<u8>>(member).ok()?;
        #[allow(clippy::cast_possible_truncation)]
        let score = redis::from_redis_value::<f64>(score).ok()? as i64;
        Some((member, score))
    };
    if items.iter().all(|item| matches!(item, redis::Value::Array(_))) {
        items
            .into_iter()
            .filter_map(|item| match item {
                redis::Value::Array(mut two) if two.len() == 2 => {
                    let score = two.pop()?;
                    pair(two.pop()?, score)
                }
                _ => None,
            })
            .collect()
    } else {
        let mut items = items.into_iter();
        std::iter::from_fn(|| Some((items.next()?, items.next()?)))
            .filter_map(|(member, score)| pair(member, score))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Scope;
    use redis::Value;

    fn key(cache: &CacheManager, id: &str) -> CacheKey {
        cache
            .key("m", "f")
            .scope(Scope::Record("m", id))
            .arg(&id)
            .and_then(crate::KeyBuilder::build)
            .expect("a key")
    }

    const KEEP: i64 = 60_000;

    #[tokio::test]
    async fn remembers_the_latest_values_of_each_generation_within_its_bounds() {
        let cache = CacheManager::disabled(crate::CacheConfig::default());
        let recent = Recent::default();
        let first = key(&cache, "1");
        recent.stored(&first, KEEP);
        recent.stored(&first, KEEP);
        let record = &first.generations[0];
        assert_eq!(
            recent.under([record.as_str()], 256).len(),
            1,
            "a value is remembered once"
        );
        for i in 0..PER_GENERATION + 5 {
            recent.stored(&key(&cache, &format!("other {i}")), KEEP);
        }
        let model: Vec<&str> = first.generations.iter().map(String::as_str).collect();
        assert!(recent.under(model.clone(), 256).len() <= PER_GENERATION + 1);
        assert_eq!(recent.under(model, 3).len(), 3, "at most the limit");
        for i in 0..MAX_GENERATIONS {
            recent.stored(&key(&cache, &format!("many {i}")), KEEP);
        }
        assert!(recent.len() <= MAX_GENERATIONS);
    }

    #[test]
    fn scored_members_are_read_from_either_protocol() {
        let bulk = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        // RESP2: one flat list.
        let flat = Value::Array(vec![bulk("b"), bulk("20"), bulk("a"), bulk("10")]);
        // RESP3: pairs, scores as doubles.
        let pairs = Value::Array(vec![
            Value::Array(vec![bulk("b"), Value::Double(20.0)]),
            Value::Array(vec![bulk("a"), Value::Double(10.0)]),
        ]);
        let expected = vec![(b"b".to_vec(), 20), (b"a".to_vec(), 10)];
        assert_eq!(scored(flat), expected);
        assert_eq!(scored(pairs), expected);
        assert!(scored(Value::Nil).is_empty());
        assert!(scored(Value::Array(vec![bulk("odd")])).is_empty());
    }
}
