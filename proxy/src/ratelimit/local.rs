//! In-process limit state: GCRA timestamps and in-flight counts per key,
//! in 64 mutex-guarded shards so concurrent requests rarely share a lock,
//! with a bounded number of keys.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::gcra::{self, Decision, Quota};

const SHARDS: usize = 64;

/// Nanoseconds since a process-wide epoch (the first call). Taking the
/// instant as an argument lets a caller reuse its request's start time
/// instead of reading the clock again.
pub fn now_ns(at: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let since = at.saturating_duration_since(*EPOCH.get_or_init(Instant::now));
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

/// Hashes a client's key with per-process random keys (aHash, built to
/// resist collision flooding, at a fraction of SipHash's cost on short
/// keys): local keys never leave the process, and keys nobody outside
/// knows mean a client cannot choose keys that collide.
#[derive(Default)]
pub struct KeyHasher(ahash::RandomState);

impl KeyHasher {
    /// A hasher with a fresh random key (as `default()`).
    pub fn new() -> KeyHasher {
        KeyHasher::default()
    }

    /// The local key of `key` under rule number `rule`.
    pub fn hash(&self, rule: u32, key: &[u8]) -> u64 {
        let mut hasher = self.0.build_hasher();
        hasher.write_u32(rule); // fixed width, so no separator is needed
        hasher.write(key);
        hasher.finish()
    }
}

/// The Redis key of a client's key under a route's rule: the same on every
/// replica, and a digest so the client's key (an API key, an address) is
/// never stored in the clear.
pub fn stable_key(route: &str, rule: &str, key: &[u8]) -> String {
    let mut sha = Sha256::new();
    for part in [route.as_bytes(), b"\0", rule.as_bytes(), b"\0", key] {
        sha.update(part);
    }
    format!("switchyard:rl:{}", hex::encode(&sha.finalize()[..16]))
}

/// Keys reach the maps already hashed (by [`KeyHasher`]), so hashing them
/// again would only cost time: the map uses the key's bits as they are.
#[derive(Default)]
struct KeyBits(u64);

impl Hasher for KeyBits {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, key: u64) {
        self.0 = key;
    }

    /// Only `write_u64` is used for u64 keys; this keeps any other input
    /// well defined.
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
}

type Map<V> = HashMap<u64, V, BuildHasherDefault<KeyBits>>;

/// One shard per cache line, so two cores locking neighbouring shards do
/// not fight over the same line.
#[repr(align(64))]
struct Shard<V>(Mutex<Map<V>>);

impl<V> Shard<V> {
    fn lock(&self) -> MutexGuard<'_, Map<V>> {
        // Nothing panics while a shard is held; a poisoned map is still valid.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Sharded<V>([Shard<V>; SHARDS]);

impl<V> Default for Sharded<V> {
    fn default() -> Self {
        Sharded(std::array::from_fn(|_| Shard(Mutex::default())))
    }
}

impl<V> Sharded<V> {
    /// The shard of `key`, locked. Bits 32..38 choose it: the map itself
    /// uses the low bits (bucket) and the top seven (tag), which must stay
    /// varied inside a shard.
    fn lock(&self, key: u64) -> MutexGuard<'_, Map<V>> {
        self.0[(key >> 32) as usize % SHARDS].lock()
    }

    fn len(&self) -> usize {
        self.0.iter().map(|shard| shard.lock().len()).sum()
    }
}

/// GCRA state of many keys, bounded in memory.
pub struct LocalStore {
    shards: Sharded<u64>,
    per_shard: usize,
}

impl LocalStore {
    /// Holds at most `max_keys` keys (at least one per shard: 64).
    pub fn new(max_keys: usize) -> LocalStore {
        LocalStore {
            shards: Sharded::default(),
            per_shard: (max_keys / SHARDS).max(1),
        }
    }

    /// Decides one request of `cost` units for `key` at `now` ([`now_ns`]).
    pub fn check(&self, key: u64, quota: &Quota, cost: u64, now: u64) -> Decision {
        let mut map = self.shards.lock(key);
        if let Some(tat) = map.get_mut(&key) {
            let (decision, stored) = gcra::decide(quota, *tat, now, cost);
            *tat = stored;
            return decision;
        }
        let (decision, stored) = gcra::decide(quota, 0, now, cost);
        // A TAT not after now is a full bucket, the same as no entry.
        if stored > now {
            if map.len() >= self.per_shard {
                self.make_room(&mut map, now);
            }
            map.insert(key, stored);
        }
        decision
    }

    /// Keys tracked now (for a gauge).
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frees an eighth of a full shard, so the O(shard) sweep runs at most
    /// once per that many new keys. First go the keys whose TAT has passed:
    /// they are full buckets, so forgetting them changes no decision. Only
    /// if that is not enough are live keys forgotten, each the one closest
    /// to refilled (smallest TAT) among a few: the one case where a key's
    /// history is lost, and then the history that mattered least.
    fn make_room(&self, map: &mut Map<u64>, now: u64) {
        map.retain(|_, tat| *tat > now);
        let target = self.per_shard - (self.per_shard / 8).max(1);
        while map.len() > target {
            let sample = map.iter().take(8);
            let oldest = sample.min_by_key(|(_, &tat)| tat).map(|(&k, _)| k);
            if let Some(key) = oldest {
                map.remove(&key);
            }
        }
    }
}

/// In-flight requests per key, for concurrency limits. An entry lives only
/// while its key has a request in flight, so memory is bounded by the
/// requests in flight.
#[derive(Default)]
pub struct InflightTable(Sharded<u32>);

impl InflightTable {
    /// A slot for `key` if fewer than `max` of its requests are in flight.
    pub fn acquire(self: &Arc<Self>, key: u64, max: u32) -> Option<InflightGuard> {
        let mut map = self.0.lock(key);
        let count = map.get(&key).copied().unwrap_or(0);
        if count >= max {
            return None;
        }
        map.insert(key, count + 1);
        Some(InflightGuard {
            table: Arc::clone(self),
            key,
        })
    }

    /// Keys with a request in flight now (for a gauge).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One request in flight; dropping it frees the slot.
pub struct InflightGuard {
    table: Arc<InflightTable>,
    key: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        let mut map = self.table.0.lock(self.key);
        match map.get_mut(&self.key) {
            Some(count) if *count > 1 => *count -= 1,
            _ => {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    /// `n` random keys that all fall in shard 0.
    fn keys_of_one_shard(n: usize) -> Vec<u64> {
        let hasher = KeyHasher::new();
        let shard_bits = (SHARDS as u64 - 1) << 32;
        (0..n as u64)
            .map(|i| hasher.hash(0, &i.to_le_bytes()) & !shard_bits)
            .collect()
    }

    /// Whether `store` still remembers a spend of `key` (a cost-0 check
    /// stores nothing).
    fn remembers(store: &LocalStore, key: u64, quota: &Quota, now: u64) -> bool {
        store.check(key, quota, 0, now).remaining < u64::from(quota.burst())
    }

    #[test]
    fn ten_times_max_keys_stay_within_the_bound() {
        let store = LocalStore::new(640);
        let quota = Quota::new(1.0, 10);
        let hasher = KeyHasher::new();
        for i in 0..6400u64 {
            let key = hasher.hash(1, &i.to_le_bytes());
            assert!(store.check(key, &quota, 1, SEC).allowed);
            assert!(store.len() <= 640, "{} keys after {i}", store.len());
            assert!(remembers(&store, key, &quota, SEC), "newest key kept");
        }
        assert!(store.len() > 640 / 2, "eviction frees a little at a time");
    }

    #[test]
    fn a_full_shard_drops_refilled_keys_before_live_ones() {
        let store = LocalStore::new(8 * SHARDS);
        let (fast, slow) = (Quota::new(1000.0, 10), Quota::new(1.0, 10));
        let keys = keys_of_one_shard(9);
        for (i, &key) in keys[..8].iter().enumerate() {
            let quota = if i % 2 == 0 { &fast } else { &slow };
            store.check(key, quota, 1, 0);
        }
        assert_eq!(store.len(), 8);
        // 10 ms later the fast keys have refilled; the slow ones have not.
        let now = 10_000_000;
        store.check(keys[8], &slow, 1, now);
        assert_eq!(store.len(), 5, "the 4 refilled keys went, nothing else");
        for &key in keys[1..9].iter().step_by(2) {
            assert!(remembers(&store, key, &slow, now));
        }
    }

    #[test]
    fn a_shard_full_of_live_keys_forgets_the_one_closest_to_refilled() {
        let store = LocalStore::new(8 * SHARDS);
        let quota = Quota::new(1.0, 10);
        let keys = keys_of_one_shard(9);
        for (cost, &key) in (1..).zip(&keys[..8]) {
            store.check(key, &quota, cost, 0);
        }
        store.check(keys[8], &quota, 1, 0);
        assert_eq!(store.len(), 8);
        assert!(!remembers(&store, keys[0], &quota, 0), "smallest TAT went");
        for &key in &keys[1..] {
            assert!(remembers(&store, key, &quota, 0));
        }
    }

    #[test]
    fn threads_sharing_a_key_pass_exactly_the_burst() {
        let store = LocalStore::new(1024);
        let quota = Quota::new(1.0, 100);
        let passed: usize = std::thread::scope(|s| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let checks = (0..1000).map(|_| store.check(42, &quota, 1, SEC));
                        checks.filter(|d| d.allowed).count()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(passed, 100);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn inflight_slots_are_released_and_forgotten() {
        let table = Arc::new(InflightTable::default());
        let first = table.acquire(7, 2).expect("1 of 2");
        let second = table.acquire(7, 2).expect("2 of 2");
        assert!(table.acquire(7, 2).is_none());
        assert!(table.acquire(8, 0).is_none());
        assert_eq!(table.len(), 1, "a refusal stores nothing");
        drop(first);
        let third = table.acquire(7, 2).expect("a slot was freed");
        drop((second, third));
        assert!(table.is_empty(), "no entry once nothing is in flight");
    }

    #[test]
    fn inflight_counts_hold_across_threads() {
        let table = Arc::new(InflightTable::default());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        let guard = table.acquire(3, 4).expect("4 threads, 4 slots");
                        drop(guard);
                    }
                });
            }
        });
        assert!(table.is_empty());
    }

    #[test]
    fn key_hashes_depend_on_rule_key_and_process_secret() {
        let (a, b) = (KeyHasher::new(), KeyHasher::new());
        assert_eq!(a.hash(1, b"k"), a.hash(1, b"k"));
        assert_ne!(a.hash(1, b"k"), a.hash(2, b"k"));
        assert_ne!(a.hash(1, b"k"), a.hash(1, b"l"));
        assert_ne!(a.hash(1, b"k"), b.hash(1, b"k"), "random per hasher");
    }

    #[test]
    fn stable_keys_are_a_fixed_digest_of_route_rule_and_key() {
        let key = stable_key("chat", "per-key", b"sk-123");
        // sha256("chat\0per-key\0sk-123"), first 16 bytes: every replica and
        // every version must agree on it.
        assert_eq!(key, "switchyard:rl:84eaa8b931dd7ddab631e2cd8a2daace");
        assert_ne!(key, stable_key("chat", "per-ke", b"ysk-123"));
    }

    #[test]
    fn the_clock_counts_from_the_first_call() {
        let before = Instant::now();
        let first = now_ns(Instant::now());
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(now_ns(Instant::now()) >= first + 2_000_000);
        assert!(now_ns(before) <= first, "an earlier instant is not later");
    }
}
