//! The values this process stored lately, by generation: where the
//! consistency monitor looks for a value read before a write yet stored
//! after the write's invalidation (see `monitor.rs`), without scanning
//! Redis.
//!
//! Kept only while the monitor is on. Bounded: the last
//! [`PER_GENERATION`] values of each generation, for at most
//! [`MAX_GENERATIONS`] generations; past that, the generations with
//! nothing stored lately are forgotten (see [`Recent::stored`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use crate::CacheKey;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CacheManager, Scope};

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
}
