//! Hash maps on the per-span paths (keys a client chooses, like trace ids, and batch sequence
//! numbers): foldhash, seeded at random per map, instead of the standard library's SipHash,
//! which costs several times as much per 16-byte key. The random seed keeps collisions out of a
//! client's control.

/// A `HashMap` with a fast, randomly seeded hasher.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
