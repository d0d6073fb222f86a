//! Automatic prefix caching as vLLM V1 does it: each full KV block of a prompt is keyed by a
//! hash of its tokens chained with the previous block's hash, so two prompts share cached
//! blocks exactly as far as their leading tokens agree, block by block. Callers hash the
//! prompt ([`BlockHasher`]); the engine keeps the hashes of prefilled prompts ([`PrefixCache`]).

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;

/// Kinds of token, hashed first so that an id, a text token and a prefix-group token never
/// collide by accident.
const TAG_ID: u8 = 1;
const TAG_TEXT: u8 = 2;
const TAG_GROUP_TOKEN: u8 = 3;
const TAG_GROUP_BLOCK: u8 = 4;

/// Chained hashes of a prompt's full blocks, fed token by token. A last, partial block has no
/// hash: vLLM caches full blocks only.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    block_size: u32,
    /// Tokens in the block being hashed.
    in_block: u32,
    state: DefaultHasher,
    hashes: Vec<u64>,
}

impl BlockHasher {
    /// `block_size` is the engine's (`EngineConfig::block_size`); 0 is taken as 1.
    pub fn new(block_size: u32) -> BlockHasher {
        let mut state = DefaultHasher::new();
        state.write_u64(0);
        BlockHasher { block_size: block_size.max(1), in_block: 0, state, hashes: Vec::new() }
    }

    /// A prompt whose first `tokens` tokens are those of prefix group `group` (the `prefix_id` /
    /// `prefix_tokens` extension: requests of one group share them without sending them). Its
    /// full blocks hash from the group and the block index; the tokens that follow (if fed)
    /// chain on them like any others.
    pub fn with_prefix_group(block_size: u32, group: u64, tokens: u32) -> BlockHasher {
        let mut h = BlockHasher::new(block_size);
        let full = tokens / h.block_size;
        for block in 0..full {
            h.state.write_u8(TAG_GROUP_BLOCK);
            h.state.write_u64(group);
            h.state.write_u32(block);
            h.in_block = h.block_size;
            h.end_block_if_full();
        }
        for token in full * h.block_size..tokens {
            h.state.write_u8(TAG_GROUP_TOKEN);
            h.state.write_u64(group);
            h.state.write_u32(token);
            h.count_token();
        }
        h
    }

    /// Prompt tokens so far, in whole blocks plus the partial one.
    pub fn tokens(&self) -> u64 {
        self.hashes.len() as u64 * u64::from(self.block_size) + u64::from(self.in_block)
    }

    /// One token given as an id.
    pub fn push_id(&mut self, id: u64) {
        self.state.write_u8(TAG_ID);
        self.state.write_u64(id);
        self.count_token();
    }

    /// One token given as text (a template token, or one of `loadgen::prompt::tokens`).
    pub fn push_text(&mut self, token: &str) {
        self.state.write_u8(TAG_TEXT);
        self.state.write(token.as_bytes());
        self.state.write_u8(0xff);
        self.count_token();
    }

    /// The hashes of the full blocks, first block first.
    pub fn finish(self) -> Vec<u64> {
        self.hashes
    }

    fn count_token(&mut self) {
        self.in_block += 1;
        self.end_block_if_full();
    }

    fn end_block_if_full(&mut self) {
        if self.in_block == self.block_size {
            let h = self.state.finish();
            self.hashes.push(h);
            self.state = DefaultHasher::new();
            self.state.write_u64(h);
            self.in_block = 0;
        }
    }
}

/// The block hashes whose KV the engine still holds, least recently used out first once more
/// than `capacity` (the engine's KV block count: vLLM keeps a freed block's content until the
/// block is reused, so it cannot cache more than it has blocks).
#[derive(Debug)]
pub(super) struct PrefixCache {
    capacity: usize,
    /// Use counter: the last use of each hash, and the hashes by last use.
    clock: u64,
    last_use: HashMap<u64, u64>,
    by_use: BTreeMap<u64, u64>,
}

impl PrefixCache {
    pub(super) fn new(capacity: u32) -> PrefixCache {
        PrefixCache {
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
            clock: 0,
            last_use: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.last_use.len()
    }

    /// How many leading blocks of `hashes` are cached, at most `max`; those count as used now.
    pub(super) fn lookup(&mut self, hashes: &[u64], max: usize) -> usize {
        let hit = hashes.iter().take(max).take_while(|h| self.last_use.contains_key(h)).count();
        self.touch_all(&hashes[..hit]);
        hit
    }

    /// Caches `hashes` (a prefilled prompt's blocks), evicting the least recently used beyond
    /// the capacity.
    pub(super) fn insert(&mut self, hashes: &[u64]) {
        self.touch_all(hashes);
        while self.last_use.len() > self.capacity {
            let Some((_, h)) = self.by_use.pop_first() else { break };
            self.last_use.remove(&h);
        }
    }

    /// Marks `hashes` used, the first block last: a prompt's tail blocks go before its head,
    /// as vLLM frees them, so what stays is still a usable prefix.
    fn touch_all(&mut self, hashes: &[u64]) {
        for &h in hashes.iter().rev() {
            self.clock += 1;
            if let Some(old) = self.last_use.insert(h, self.clock) {
                self.by_use.remove(&old);
            }
            self.by_use.insert(self.clock, h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(block_size: u32, ids: impl IntoIterator<Item = u64>) -> Vec<u64> {
        let mut h = BlockHasher::new(block_size);
        ids.into_iter().for_each(|i| h.push_id(i));
        h.finish()
    }

    #[test]
    fn hashes_chain_over_full_blocks() {
        let a = ids(4, 0..10);
        assert_eq!(a.len(), 2, "the partial third block has no hash");
        let b = ids(4, (0..6).chain(100..110));
        assert_eq!(b[0], a[0]);
        assert_ne!(b[1], a[1], "second block differs in its last two tokens");
        // Same block content after a different first block: the chain tells them apart.
        let c = ids(4, (50..54).chain(4..8));
        assert_ne!(c[1], a[1]);
        let mut t = BlockHasher::new(2);
        ["1", "2"].into_iter().for_each(|s| t.push_text(s));
        assert_ne!(t.finish(), ids(2, [1, 2]), "text and ids are different tokens");
    }

    #[test]
    fn prefix_groups_hash_by_group_and_block_and_chain_into_content() {
        let g = |group, n| BlockHasher::with_prefix_group(16, group, n).finish();
        assert_eq!(g(7, 800).len(), 50);
        assert_eq!(g(7, 800), g(7, 810)[..50]);
        assert_ne!(g(7, 32)[0], g(8, 32)[0]);
        let mut a = BlockHasher::with_prefix_group(16, 7, 20);
        let mut b = BlockHasher::with_prefix_group(16, 7, 20);
        (0..12).for_each(|i| a.push_id(i));
        (0..12).for_each(|i| b.push_id(i + 1));
        assert_eq!(a.tokens(), 32);
        let (a, b) = (a.finish(), b.finish());
        assert_eq!(a[0], b[0]);
        assert_ne!(a[1], b[1]);
    }

    #[test]
    fn lookup_counts_leading_hits_up_to_max() {
        let mut c = PrefixCache::new(100);
        let a = ids(4, 0..16);
        c.insert(&a[..3]);
        assert_eq!(c.lookup(&a, 10), 3);
        assert_eq!(c.lookup(&a, 2), 2);
        let b = ids(4, (0..4).chain(99..111));
        assert_eq!(c.lookup(&b, 10), 1);
        assert_eq!(c.lookup(&ids(4, 200..216), 10), 0);
    }

    #[test]
    fn capacity_bounds_the_cache_and_the_least_recently_used_go() {
        let mut c = PrefixCache::new(8);
        let old = ids(1, 0..4);
        c.insert(&old);
        for k in 1..50u64 {
            c.insert(&ids(1, (k * 1000)..(k * 1000 + 3)));
            assert!(c.len() <= 8);
            c.lookup(&old, 4); // kept in use, so it stays
        }
        assert_eq!(c.lookup(&old, 4), 4);
        // A prompt too long for the cache keeps its head, not its tail.
        let long = ids(1, 5000..5020);
        c.insert(&long);
        assert_eq!(c.len(), 8);
        assert_eq!(c.lookup(&long, 20), 8);
    }
}
