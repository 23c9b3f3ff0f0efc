//! PyTorch's CUDA caching allocator, replayed: which segments it asks CUDA for, how it splits and merges the
//! blocks inside them, what it gives back when CUDA says no, and the counters `torch.cuda.memory_stats()` shows.
//! Its peak reserved bytes are `torch.cuda.max_memory_reserved()`.
//!
//! A model of `DeviceCachingAllocator` in c10/cuda/CUDACachingAllocator.cpp (PyTorch 2.15), for one device and its
//! streams, with the knobs of `PYTORCH_CUDA_ALLOC_CONF` that change its layout (c10/cuda/CUDAAllocatorConfig and
//! c10/core/AllocatorConfig). Function names in the comments are the C++ ones.
//!
//! Streams: every request is made on a stream (`malloc_on`; `malloc` is the default stream's), and every block
//! belongs to the stream its segment was allocated on. PyTorch orders each pool by (stream, size, address) and
//! searches it from (stream, size), so a cached block serves only its own stream and a new segment is its
//! stream's; here each pool keeps a free list (and, with expandable segments, an unmapped list and a segment) per
//! stream. A one-GPU step runs on the default stream alone; FSDP2 allocates its all-gather buffers on the
//! all-gather copy-in stream and its reduce-scatter outputs on the reduce-scatter stream (`distributed.rs`), which
//! is why its reserved memory exceeds what one pool would hold. The release paths (`release_cached_blocks`, the
//! garbage collection) go over every stream's blocks; `release_available_cached_blocks` over the request's
//! stream's, as PyTorch's.
//!
//! Modelled: `round_size` (512-byte blocks), the small (<= 1 MiB) and large pools, `get_allocation_size`,
//! best-fit `get_free_block` by (size, address) with the `max_split_size` rules, `should_split`, splitting and
//! `free_block`'s merging with the free neighbours of the same segment, the OOM path of `malloc`
//! (`garbage_collect_cached_blocks`, `release_available_cached_blocks`, `release_cached_blocks`, one retry, then
//! an OOM) and `expandable_segments:True` (one growing segment per pool mapped in pages: `map_block`,
//! `unmap_block`, `find_expandable_block`).
//!
//! Not modelled: events of cross-stream uses (`record_stream`: a block freed while another stream may still use it
//! is cached only once that stream's event completes; FSDP2 holds its buffers with references and events instead,
//! and the stubbed GPU of the records completes events at once), CUDA graph private pools,
//! `roundup_power2_divisions`, the free-memory callbacks, and fragmentation of the device's own memory under
//! `cudaMalloc` (a `cudaMalloc` fails here exactly when it would take reserved memory past the capacity).
//! Addresses are synthetic: each new segment gets a fresh range above the last; only their order matters, and it
//! breaks ties between free blocks of equal size the way the real (stream, size, address) order does.

/// All sizes are rounded to at least 512 bytes (`kMinBlockSize`).
pub const MIN_BLOCK_SIZE: u64 = 512;
/// The largest "small" allocation, 1 MiB (`kSmallSize`): larger requests use the large pool.
pub const SMALL_SIZE: u64 = 1 << 20;
/// Small requests are packed in 2 MiB segments (`kSmallBuffer`); also the expandable small pool's page.
pub const SMALL_BUFFER: u64 = 2 << 20;
/// Requests between 1 and 10 MiB (`kMinLargeAlloc`) get a 20 MiB segment to share.
pub const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// "Large" allocations may be packed in 20 MiB segments (`kLargeBuffer`); also the expandable large pool's page,
/// and the default `max_non_split_rounding_size`.
pub const LARGE_BUFFER: u64 = 20 << 20;
/// Larger requests get a segment of their size rounded up to 2 MiB (`kRoundLarge`).
pub const ROUND_LARGE: u64 = 2 << 20;

/// Requests above 1 PiB are refused outright (no device has that much; it keeps the arithmetic far from `u64`'s
/// limit). Not a PyTorch constant.
const MAX_REQUEST: u64 = 1 << 50;
/// The virtual address space an expandable segment reserves when the capacity is unlimited: 256 TiB, what the
/// note [Expandable Segments] says there is.
const MAX_ADDRESS_SPACE: u64 = 1 << 48;
/// No block (a null `prev`/`next`).
const NONE: u32 = u32::MAX;

/// How many streams the allocator tells apart: the default stream and FSDP2's all-gather copy-in, all-gather,
/// reduce-scatter and all-reduce streams (`FSDPCommContext.lazy_init`) fit.
pub const N_STREAMS: usize = 5;

/// A CUDA stream, by its number (0: the default stream). A block belongs to the stream its segment was
/// allocated on (`Block::stream`, the stream current at `malloc`): PyTorch's pools order and search their blocks
/// by (stream, size, address), so a request only gets a cached block of its own stream, and a freed block
/// merges only with its own segment's neighbours. A block freed after a use on another stream (`record_stream`)
/// waits for that stream's event before it is cached again; nothing here records one (FSDP2 holds its buffers
/// with references and events instead), so every free is cached at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Stream(u8);

impl Stream {
    /// The default stream (the null stream, the current one unless a program says otherwise).
    pub const DEFAULT: Stream = Stream(0);

    /// Stream number `n`, checked at compile time when used in a constant: `n` must be below `N_STREAMS`.
    pub const fn nth(n: u8) -> Stream {
        assert!((n as usize) < N_STREAMS, "stream number out of range");
        Stream(n)
    }

    /// The stream's number.
    pub fn number(self) -> u8 {
        self.0
    }

    #[inline(always)]
    fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// The `PYTORCH_CUDA_ALLOC_CONF` knobs that shape the allocator's layout. `Default` is PyTorch's default.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AllocatorConfig {
    /// `expandable_segments:True`: one segment per pool that grows by mapping pages.
    pub expandable_segments: bool,
    /// `max_split_size_mb`, in bytes: cached blocks this large are never split (PyTorch requires more than
    /// 20 MiB). `None`: unlimited (`SIZE_MAX`, the default).
    pub max_split_size: Option<u64>,
    /// `garbage_collection_threshold` (0 to 1): before a new segment, release cached segments unused for long
    /// once reserved memory passes this fraction of the allowed memory. It acts only with a `memory_fraction`,
    /// as in PyTorch (`set_fraction`).
    pub garbage_collection_threshold: Option<f64>,
    /// `torch.cuda.set_per_process_memory_fraction`: reserved memory may not pass this fraction of the capacity.
    pub memory_fraction: Option<f64>,
}

/// A request the allocator could not serve even after releasing its cache (PyTorch raises
/// `torch.OutOfMemoryError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfMemory {
    /// "Tried to allocate": the segment size it asked CUDA for (`get_allocation_size`).
    pub tried_to_allocate: u64,
}

/// A counter with its high-water mark (PyTorch's `Stat`: `current` and `peak`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stat {
    pub current: u64,
    pub peak: u64,
}

impl Stat {
    fn add(&mut self, n: u64) {
        self.current += n;
        self.peak = self.peak.max(self.current);
    }

    fn sub(&mut self, n: u64) {
        self.current -= n;
    }
}

/// What `torch.cuda.memory_stats()` would show ("all" pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AllocatorStats {
    /// `reserved_bytes.all`: segments (or mapped pages) held from CUDA.
    pub reserved_bytes: Stat,
    /// `allocated_bytes.all`: blocks handed out, at their block size (a block too small to split keeps its tail).
    pub allocated_bytes: Stat,
    /// `segment.all`: `cudaMalloc`'d segments. Expandable segments do not count here (PyTorch counts them only
    /// in `reserved_bytes`).
    pub segments: Stat,
    /// `num_alloc_retries`: requests that had to release the whole cache and try again.
    pub n_alloc_retries: u64,
    /// `num_ooms`: requests that failed.
    pub n_ooms: u64,
}

/// What a traced allocator did (`CachingAllocator::record_trace`), as PyTorch's device trace names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceAction {
    /// A new segment from `cudaMalloc`.
    SegmentAlloc,
    /// A cached segment given back (`cudaFree`).
    SegmentFree,
    /// Pages of an expandable segment mapped.
    SegmentMap,
    /// Pages of an expandable segment unmapped.
    SegmentUnmap,
    /// A block handed to the caller `id`.
    Alloc,
    /// The block of caller `id` freed.
    Free,
}

/// One traced event: where and how large (a block's or a segment's size), and for whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceEntry {
    pub action: TraceAction,
    pub addr: u64,
    pub size: u64,
    /// The caller's id (`malloc`'s); 0 for segment events.
    pub id: u32,
    /// The stream of the block or segment.
    pub stream: Stream,
}

/// One block: a range of a segment, allocated, cached (free and mapped) or, in an expandable segment, unmapped.
#[derive(Debug, Clone, Copy)]
struct Block {
    addr: u64,
    size: u64,
    /// The neighbours in the same segment (`NONE` at either end).
    prev: u32,
    next: u32,
    small: bool,
    allocated: bool,
    /// Backed by memory; only an expandable segment has unmapped blocks.
    mapped: bool,
    expandable: bool,
    /// The stream the block's segment was allocated on (`stream`): only requests on that stream get it.
    stream: Stream,
    /// The pool's `get_free_block` count when the block was cached (`gc_count_base`).
    gc_base: u64,
}

/// Every block, by number (`NONE` is none): `blocks[b]`. Indexing by the `u32` number stays inline at
/// opt-level "z", where `Vec`'s own indexing is a call, and the allocator indexes blocks on every step.
#[derive(Debug, Clone)]
struct Blocks(Vec<Block>);

impl std::ops::Index<u32> for Blocks {
    type Output = Block;

    #[inline(always)]
    fn index(&self, b: u32) -> &Block {
        &self.0.as_slice()[b as usize]
    }
}

impl std::ops::IndexMut<u32> for Blocks {
    #[inline(always)]
    fn index_mut(&mut self, b: u32) -> &mut Block {
        &mut self.0.as_mut_slice()[b as usize]
    }
}

impl Blocks {
    /// Block `b`, or `None` for `NONE`.
    #[inline(always)]
    fn get(&self, b: u32) -> Option<&Block> {
        self.0.as_slice().get(b as usize)
    }

    #[inline(always)]
    fn get_mut(&mut self, b: u32) -> Option<&mut Block> {
        self.0.as_mut_slice().get_mut(b as usize)
    }
}

/// An entry of a pool's list: (size, address, block).
type Entry = (u64, u64, u32);

/// Where an entry sits in a `BlockList`: its chunk and its index there. The end of the list is the chunk past
/// the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    chunk: usize,
    at: usize,
}

/// The most entries a `BlockList` chunk holds before it is split in two.
const CHUNK: usize = 64;
/// Once a list has several chunks, they split past this many: short moves on every insertion and removal, while
/// the search over the chunks (`BlockList::lasts`) stays cheap. A lone chunk keeps `CHUNK`, so a shallow model's
/// lists stay one vector.
const LATER_CHUNK: usize = 16;

/// A pool's list of blocks in (size, address) order, as a sorted run of chunks of at most `CHUNK` entries. A
/// shallow model caches a few dozen blocks: one chunk, a plain sorted vector. A deep one caches thousands (an
/// 80-layer model about 1,660 in the large pool), where one vector moved most of itself on every insertion and
/// removal, so the cost grew with the square of the depth. Every chunk holds at least one entry, except a lone
/// chunk, which is empty when the list is.
#[derive(Debug, Clone, Default)]
struct BlockList {
    chunks: Vec<Vec<Entry>>,
    /// With two chunks or more, the (size, address) key of each chunk's last entry: the search for a chunk
    /// reads this one array instead of a heap vector per step (it was a fifth of a deep model's estimate). A
    /// lone chunk is searched directly, and its key is not kept.
    lasts: Vec<u128>,
    /// Where the last search that missed its fingers ended: the chunk (with several) and the index within the
    /// chunk. Consecutive searches of a list mostly land there again (a request, then the split of the block it
    /// took; a freed block, then its neighbour's merge), so a search tries them first: a place is the answer
    /// exactly when its key reaches the target and the key before it does not, two comparisons. A stale
    /// finger (the chunks split, emptied or renumbered since, the index left in another chunk) costs only those.
    finger: std::cell::Cell<usize>,
    at_finger: std::cell::Cell<usize>,
}

/// An entry's place in the (size, address) order as one number.
#[inline(always)]
fn key(size: u64, addr: u64) -> u128 {
    (u128::from(size) << 64) | u128::from(addr)
}

impl BlockList {
    /// The first entry at or after (size, address), or an end (no entry).
    #[inline(always)]
    fn lower_bound(&self, size: u64, addr: u64) -> Cursor {
        let chunks = self.chunks.as_slice();
        // The first chunk whose last entry is at or after the key; within it, the entry.
        let chunk = match chunks {
            [] | [_] => 0,
            // The finger's chunk if it is the first whose last key reaches the target, else a search.
            _ => {
                let (lasts, target, f) =
                    (self.lasts.as_slice(), key(size, addr), self.finger.get());
                let hit = match lasts.get(f) {
                    Some(&l) => l >= target && (f == 0 || lasts[f - 1] < target),
                    None => false,
                };
                if hit {
                    f
                } else {
                    let c = first_reaching(lasts, target);
                    self.finger.set(c);
                    c
                }
            }
        };
        let at = match chunks.get(chunk) {
            // The same within the chunk.
            Some(c) => {
                let (target, f) = (key(size, addr), self.at_finger.get());
                let k = |e: &Entry| key(e.0, e.1);
                let hit = match c.get(f) {
                    Some(e) => k(e) >= target && (f == 0 || k(&c[f - 1]) < target),
                    None => false,
                };
                if hit {
                    f
                } else {
                    let at = lower_bound(c, size, addr);
                    self.at_finger.set(at);
                    at
                }
            }
            None => 0,
        };
        Cursor { chunk, at }
    }

    #[inline(always)]
    fn get(&self, c: Cursor) -> Option<Entry> {
        self.chunks.get(c.chunk).and_then(|v| v.get(c.at)).copied()
    }

    /// The entry after the entry at `c`, or an end.
    fn next(&self, c: Cursor) -> Cursor {
        match self.chunks.get(c.chunk) {
            Some(v) if c.at + 1 < v.len() => Cursor {
                chunk: c.chunk,
                at: c.at + 1,
            },
            _ => Cursor {
                chunk: c.chunk + 1,
                at: 0,
            },
        }
    }

    fn last(&self) -> Option<Entry> {
        self.chunks.last().and_then(|c| c.last()).copied()
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.chunks.iter().flatten()
    }

    fn insert(&mut self, e: Entry) {
        let c = self.lower_bound(e.0, e.1);
        // Past the last chunk: at the end of the last one.
        let n_chunks = self.chunks.len();
        let (chunk, at) = match self.chunks.last() {
            None => {
                self.chunks.push(Vec::with_capacity(CHUNK));
                (0, 0)
            }
            Some(last) if c.chunk == n_chunks => (n_chunks - 1, last.len()),
            Some(_) => (c.chunk, c.at),
        };
        let v = &mut self.chunks.as_mut_slice()[chunk];
        v.insert(at, e);
        let new_last = at + 1 == v.len();
        let most = if n_chunks > 1 { LATER_CHUNK } else { CHUNK };
        if v.len() > most {
            let half = v.len() / 2;
            let mut tail = Vec::with_capacity(CHUNK);
            tail.extend_from_slice(&v[half..]);
            v.truncate(half);
            self.chunks.insert(chunk + 1, tail);
            if self.chunks.len() == 2 {
                // The list was one chunk, whose key was not kept.
                self.lasts.clear();
                self.lasts.resize(2, 0);
            } else {
                self.lasts.insert(chunk + 1, 0);
            }
            self.refresh(chunk + 1);
            self.refresh(chunk);
        } else if new_last {
            self.refresh(chunk);
        }
    }

    /// Sets the key of chunk `i` in `lasts` after a change to the chunk (with two chunks or more).
    #[inline(always)]
    fn refresh(&mut self, i: usize) {
        let chunks = self.chunks.as_slice();
        if chunks.len() > 1 {
            if let Some(e) = chunks[i].as_slice().last() {
                self.lasts.as_mut_slice()[i] = key(e.0, e.1);
            }
        }
    }

    /// Removes the entry at `c` (which must be one).
    fn remove(&mut self, c: Cursor) {
        let v = &mut self.chunks.as_mut_slice()[c.chunk];
        v.remove(c.at);
        let (empty, was_last) = (v.is_empty(), c.at == v.len());
        if empty && self.chunks.len() > 1 {
            self.chunks.remove(c.chunk);
            self.lasts.remove(c.chunk);
        } else if was_last {
            self.refresh(c.chunk);
        }
    }

    /// Removes the entry of block `b` at (size, address), if there is one.
    fn remove_block(&mut self, size: u64, addr: u64, b: u32) {
        let c = self.lower_bound(size, addr);
        if self.get(c).is_some_and(|k| k.2 == b) {
            self.remove(c);
        }
    }

    /// Replaces the entry at `c` by `e`, which may sort elsewhere. Where `e` stays within the chunk, only the
    /// entries in between move; where it sorts in the same place (a split's remainder still above the entry
    /// before it), nothing is searched or moved.
    fn replace(&mut self, c: Cursor, e: Entry) {
        let (first, last) = (c.chunk == 0, c.chunk + 1 == self.chunks.len());
        let v = self.chunks.as_mut_slice()[c.chunk].as_mut_slice();
        let (before, after) = v.split_at(c.at);
        let k = key(e.0, e.1);
        if (e.0, e.1) < (after[0].0, after[0].1) {
            let to = match before.last() {
                Some(b) if key(b.0, b.1) >= k => lower_bound(before, e.0, e.1),
                _ => c.at,
            };
            if to > 0 || first {
                let new_last = c.at + 1 == v.len();
                v.copy_within(to..c.at, to + 1);
                v[to] = e;
                if new_last {
                    self.refresh(c.chunk);
                }
                return;
            }
        } else {
            let to = match after.get(1) {
                Some(n) if key(n.0, n.1) < k => c.at + lower_bound(&after[1..], e.0, e.1),
                _ => c.at,
            };
            if to + 1 < v.len() || last {
                let new_last = to + 1 == v.len();
                v.copy_within(c.at + 1..to + 1, c.at);
                v[to] = e;
                if new_last {
                    self.refresh(c.chunk);
                }
                return;
            }
        }
        self.remove(c);
        self.insert(e);
    }
}

/// A pool's cached blocks (`BlockPool`). PyTorch keeps one set per pool ordered by (stream, size, address) and
/// searches it from (stream, size): here each stream has its own list, indexed by the stream's number.
#[derive(Debug, Clone, Default)]
struct Pool {
    /// Free mapped blocks of each stream, ordered by (size, address) like `BlockComparatorSize`.
    free: [BlockList; N_STREAMS],
    /// Unmapped blocks of expandable segments of each stream, ordered by address (`BlockComparatorAddress`):
    /// (0, address, block), the free list's shape so that both share one search.
    unmapped: [BlockList; N_STREAMS],
    /// `get_free_blocks_call_count`, counted only while garbage collection is on.
    n_get_free_block_calls: u64,
}

/// The allocator of one device: feed it every allocation and free of a run, in order, and read its counters.
#[derive(Debug, Clone)]
pub struct CachingAllocator {
    config: AllocatorConfig,
    /// `max_split_size` (`u64::MAX` when unlimited) and whether garbage collection is on, read on every request.
    max_split_size: u64,
    gc: bool,
    capacity: u64,
    /// The memory `set_per_process_memory_fraction` allows (`allowed_memory_maximum`), if set.
    allowed_memory_maximum: Option<u64>,
    blocks: Blocks,
    /// Slots of `blocks` no longer used, for reuse.
    spare: Vec<u32>,
    /// The small pool, then the large one.
    pools: [Pool; 2],
    /// The allocated block of each caller id (`NONE` when none).
    by_id: Vec<u32>,
    /// Where the next segment's address range starts.
    next_addr: u64,
    stats: AllocatorStats,
    /// Every block and segment event, when traced.
    trace: Option<Vec<TraceEntry>>,
}

/// The first entry of a free list at or after (size, address): a branch-free binary search on both at once
/// (the lists are short and their order random, so a plain one's mispredicted branches would cost most of its
/// time). The address is searched, not stepped over: a deep model caches hundreds of blocks of one size (one per
/// layer), and a step over them made every search grow with depth.
#[inline]
fn lower_bound(free: &[(u64, u64, u32)], size: u64, addr: u64) -> usize {
    let key = |e: &(u64, u64, u32)| (u128::from(e.0) << 64) | u128::from(e.1);
    let target = (u128::from(size) << 64) | u128::from(addr);
    let (mut base, mut len) = (0, free.len());
    if len == 0 {
        return 0;
    }
    while len > 1 {
        let half = len / 2;
        base = if key(&free[base + half]) < target {
            base + half
        } else {
            base
        };
        len -= half;
    }
    base + usize::from(key(&free[base]) < target)
}

/// The first of two or more non-empty chunks whose last entry is at or after `target` (their count if none
/// is), from their last entries' keys (`BlockList::lasts`): `lower_bound`'s branch-free search.
#[inline(always)]
fn first_reaching(lasts: &[u128], target: u128) -> usize {
    let (mut base, mut len) = (0, lasts.len());
    while len > 1 {
        let half = len / 2;
        base = if lasts[base + half - 1] < target {
            base + half
        } else {
            base
        };
        len -= half;
    }
    base + usize::from(lasts[base] < target)
}

/// `round_size` without `roundup_power2_divisions`: at least 512 bytes, in 512-byte steps.
pub fn round_size(size: u64) -> u64 {
    size.max(1).div_ceil(MIN_BLOCK_SIZE) * MIN_BLOCK_SIZE
}

/// `get_allocation_size`: the segment a request gets when no cached block serves it.
pub fn allocation_size(size: u64) -> u64 {
    if size <= SMALL_SIZE {
        SMALL_BUFFER
    } else if size < MIN_LARGE_ALLOC {
        LARGE_BUFFER
    } else {
        size.div_ceil(ROUND_LARGE) * ROUND_LARGE
    }
}

impl CachingAllocator {
    /// An empty allocator for a device on which `cudaMalloc` can reserve up to `capacity_bytes` (`u64::MAX`:
    /// unlimited).
    pub fn new(config: AllocatorConfig, capacity_bytes: u64) -> CachingAllocator {
        CachingAllocator {
            config,
            max_split_size: config.max_split_size.unwrap_or(u64::MAX),
            gc: config.memory_fraction.is_some()
                && config.garbage_collection_threshold.is_some_and(|t| t > 0.0),
            capacity: capacity_bytes,
            allowed_memory_maximum: config
                .memory_fraction
                .map(|f| (f.clamp(0.0, 1.0) * capacity_bytes as f64) as u64),
            blocks: Blocks(Vec::with_capacity(256)),
            spare: Vec::new(),
            pools: [Pool::default(), Pool::default()],
            by_id: Vec::with_capacity(4096),
            next_addr: 0,
            stats: AllocatorStats::default(),
            trace: None,
        }
    }

    /// Starts recording where every block and segment goes (`trace`).
    pub fn record_trace(&mut self) {
        self.trace = Some(Vec::new());
    }

    /// The events recorded since `record_trace` (empty when not recording).
    pub fn trace(&self) -> &[TraceEntry] {
        self.trace.as_deref().unwrap_or(&[])
    }

    #[inline(always)]
    fn traced(&mut self, action: TraceAction, addr: u64, size: u64, id: u32, stream: Stream) {
        if self.trace.is_some() {
            self.push_trace(action, addr, size, id, stream);
        }
    }

    fn push_trace(&mut self, action: TraceAction, addr: u64, size: u64, id: u32, stream: Stream) {
        if let Some(t) = self.trace.as_mut() {
            t.push(TraceEntry {
                action,
                addr,
                size,
                id,
                stream,
            });
        }
    }

    pub fn config(&self) -> &AllocatorConfig {
        &self.config
    }

    pub fn stats(&self) -> &AllocatorStats {
        &self.stats
    }

    pub fn reserved_bytes(&self) -> u64 {
        self.stats.reserved_bytes.current
    }

    pub fn peak_reserved_bytes(&self) -> u64 {
        self.stats.reserved_bytes.peak
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.stats.allocated_bytes.current
    }

    pub fn peak_allocated_bytes(&self) -> u64 {
        self.stats.allocated_bytes.peak
    }

    /// Allocates `size` bytes for `id` (`malloc`). Ids index a table: use small dense numbers, such as the
    /// index of the tensor in the caller's own list. A zero-byte request takes no block, as in PyTorch. An id
    /// still holding a block frees it first.
    ///
    /// # Errors
    /// `OutOfMemory` when the request cannot be served within the capacity even after releasing the cache; the
    /// allocator is then as PyTorch leaves it (cache released, nothing allocated for `id`).
    pub fn malloc(&mut self, id: u32, size: u64) -> Result<(), OutOfMemory> {
        self.allocate(id, size, Stream::DEFAULT, false)
    }

    /// `malloc` on `stream` (the stream current at the request): the block comes from that stream's cached
    /// blocks or a new segment of its own.
    ///
    /// # Errors
    /// As `malloc`.
    pub fn malloc_on(&mut self, id: u32, size: u64, stream: Stream) -> Result<(), OutOfMemory> {
        self.allocate(id, size, stream, false)
    }

    /// `malloc`, except that a request that would fail is counted as an OOM and served anyway: from then on the
    /// allocator behaves as on a device without a limit (no capacity, no memory fraction). For replaying a
    /// timeline to its end to learn how far it overshoots. Returns whether the request was an OOM.
    pub fn malloc_overcommitting(&mut self, id: u32, size: u64, stream: Stream) -> bool {
        self.allocate(id, size, stream, true).is_err()
    }

    /// `malloc_overcommitting(id, size)` and `free(id)` at once: scratch a kernel holds only while it runs (cuBLAS
    /// workspaces). A cached block that serves it is split and merged back unchanged, so that case only counts
    /// the request (`get_free_block`'s count, the allocated peak, the block's `gc_count_base`); any other goes the
    /// whole way. `id` must hold no block. Returns whether the request was an OOM.
    pub fn scratch_overcommitting(&mut self, id: u32, size: u64, stream: Stream) -> bool {
        if size > 0 && size <= MAX_REQUEST {
            let size = round_size(size);
            let pool = usize::from(size > SMALL_SIZE);
            if let Some((b, _)) = self.get_free_block(pool, stream, size) {
                let held = if self.should_split(b, size) {
                    size
                } else {
                    self.blocks[b].size
                };
                let allocated = &mut self.stats.allocated_bytes;
                allocated.peak = allocated.peak.max(allocated.current + held);
                self.blocks[b].gc_base = self.pools[pool].n_get_free_block_calls;
                let addr = self.blocks[b].addr;
                self.traced(TraceAction::Alloc, addr, held, id, stream);
                self.traced(TraceAction::Free, addr, held, id, stream);
                return false;
            }
            // The whole way searches again: this search does not count.
            if self.gc {
                self.pools[pool].n_get_free_block_calls -= 1;
            }
        }
        let oom = self.malloc_overcommitting(id, size, stream);
        self.free(id);
        oom
    }

    /// Frees the block of `id` (`free`); an id without one is ignored.
    pub fn free(&mut self, id: u32) {
        let Some(slot) = self.by_id.get_mut(id as usize) else {
            return;
        };
        let b = std::mem::replace(slot, NONE);
        if b == NONE {
            return;
        }
        self.blocks[b].allocated = false;
        self.stats.allocated_bytes.sub(self.blocks[b].size);
        let Block {
            addr, size, stream, ..
        } = self.blocks[b];
        self.traced(TraceAction::Free, addr, size, id, stream);
        self.free_block(b);
    }

    /// Releases every cached segment and unmaps every free page (`torch.cuda.empty_cache()`).
    pub fn empty_cache(&mut self) {
        self.release_cached_blocks();
    }

    fn allocate(
        &mut self,
        id: u32,
        orig_size: u64,
        stream: Stream,
        overcommit: bool,
    ) -> Result<(), OutOfMemory> {
        self.free(id);
        if orig_size == 0 {
            return Ok(());
        }
        if orig_size > MAX_REQUEST {
            self.stats.n_ooms += 1;
            return Err(OutOfMemory {
                tried_to_allocate: orig_size,
            });
        }
        let size = round_size(orig_size);
        let pool = usize::from(size > SMALL_SIZE);
        let mut found = self
            .get_free_block(pool, stream, size)
            .map(|(b, at)| (b, Some(at)));
        let mut oom = None;
        if found.is_none() {
            if self.gc {
                self.garbage_collect_cached_blocks();
            }
            let mut new = self.alloc_block(pool, stream, size, true);
            if new.is_none() && self.release_available_cached_blocks(pool, stream, size) {
                new = self.alloc_block(pool, stream, size, true);
            }
            if new.is_none() {
                self.release_cached_blocks();
                self.stats.n_alloc_retries += 1;
                new = self.alloc_block(pool, stream, size, true);
            }
            if new.is_none() {
                self.stats.n_ooms += 1;
                oom = Some(OutOfMemory {
                    tried_to_allocate: allocation_size(size),
                });
                if overcommit {
                    // From here on, as if the device had no limit: the run is past its OOM.
                    self.capacity = u64::MAX;
                    self.allowed_memory_maximum = None;
                    self.gc = false;
                    new = self.alloc_block(pool, stream, size, false);
                }
            }
            found = new.map(|b| (b, None));
        }
        if let Some((b, cached_at)) = found {
            self.alloc_found_block(b, cached_at, size);
            let Block { addr, size, .. } = self.blocks[b];
            self.traced(TraceAction::Alloc, addr, size, id, self.blocks[b].stream);
            if self.by_id.len() <= id as usize {
                self.by_id.resize(id as usize + 1, NONE);
            }
            self.by_id[id as usize] = b;
        }
        match oom {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn page_size(small: bool) -> u64 {
        if small {
            SMALL_BUFFER
        } else {
            LARGE_BUFFER
        }
    }

    #[inline(always)]
    fn new_block(&mut self, block: Block) -> u32 {
        match self.spare.pop() {
            Some(i) => {
                self.blocks[i] = block;
                i
            }
            None => {
                self.blocks.0.push(block);
                (self.blocks.0.len() - 1) as u32
            }
        }
    }

    fn insert_free(&mut self, b: u32) {
        let block = &mut self.blocks[b];
        let pool = &mut self.pools[usize::from(!block.small)];
        block.gc_base = pool.n_get_free_block_calls;
        pool.free[block.stream.index()].insert((block.size, block.addr, b));
    }

    fn remove_free(&mut self, b: u32) {
        let block = &self.blocks[b];
        let pool = &mut self.pools[usize::from(!block.small)];
        pool.free[block.stream.index()].remove_block(block.size, block.addr, b);
    }

    fn insert_unmapped(&mut self, b: u32) {
        let block = &self.blocks[b];
        let pool = &mut self.pools[usize::from(!block.small)];
        pool.unmapped[block.stream.index()].insert((0, block.addr, b));
    }

    fn remove_unmapped(&mut self, b: u32) {
        let block = &self.blocks[b];
        let pool = &mut self.pools[usize::from(!block.small)];
        pool.unmapped[block.stream.index()].remove_block(0, block.addr, b);
    }

    /// `get_free_block`: the smallest cached block of `stream` of at least `size` (lowest address among equals),
    /// under the `max_split_size` rules, and its place in the pool's list (where `alloc_found_block` takes it
    /// out).
    fn get_free_block(&mut self, pool: usize, stream: Stream, size: u64) -> Option<(u32, Cursor)> {
        if self.gc {
            self.pools[pool].n_get_free_block_calls += 1;
        }
        let free = &self.pools[pool].free[stream.index()];
        let mut at = free.lower_bound(size, 0);
        let (mut block_size, _, mut b) = free.get(at)?;
        if self.config.expandable_segments {
            // A block at the mapped end of an expandable segment can grow into the unmapped space after it: for
            // best fit it counts at the size it can grow to, so a later block may fit better.
            let expandable_size = |b: u32| {
                let b = &self.blocks[b];
                let next = self.blocks.get(b.next);
                b.size + next.filter(|n| !n.mapped).map_or(0, |n| n.size)
            };
            loop {
                let next = free.next(at);
                match free.get(next) {
                    Some(e) if expandable_size(e.2) < expandable_size(b) => {
                        (at, block_size, b) = (next, e.0, e.2);
                    }
                    _ => break,
                }
            }
        }
        let max_split = self.max_split_size;
        // Do not return an oversize block for a request below max_split_size.
        if size < max_split && block_size >= max_split {
            return None;
        }
        // An oversize block serves a request only within `max_non_split_rounding_size` (kLargeBuffer) of it.
        if size >= max_split && block_size >= size.saturating_add(LARGE_BUFFER) {
            return None;
        }
        Some((b, at))
    }

    /// `should_split`: whether the rest of the block after `size` bytes becomes a cached block of its own.
    #[inline(always)]
    fn should_split(&self, b: u32, size: u64) -> bool {
        let block = &self.blocks[b];
        let remaining = block.size - size;
        if block.small || self.config.expandable_segments {
            remaining >= MIN_BLOCK_SIZE
        } else {
            size < self.max_split_size && remaining > SMALL_SIZE
        }
    }

    /// `alloc_found_block`: hands out the first `size` bytes of `b` (at `cached_at` in its pool's list if it
    /// was cached), caching the rest if it is worth splitting.
    fn alloc_found_block(&mut self, b: u32, cached_at: Option<Cursor>, size: u64) {
        let block = self.blocks[b];
        let pool = usize::from(!block.small);
        if !self.should_split(b, size) {
            if let Some(at) = cached_at {
                self.pools[pool].free[block.stream.index()].remove(at);
            }
        } else {
            let rest = Block {
                addr: block.addr + size,
                size: block.size - size,
                prev: b,
                gc_base: self.pools[pool].n_get_free_block_calls,
                ..block
            };
            let r = self.new_block(rest);
            if let Some(next) = self.blocks.get_mut(block.next) {
                next.prev = r;
            }
            self.blocks[b].next = r;
            self.blocks[b].size = size;
            match cached_at {
                // The rest takes the place of the block it came from (it sorts before it).
                Some(at) => {
                    let free = &mut self.pools[pool].free[block.stream.index()];
                    free.replace(at, (rest.size, rest.addr, r));
                }
                None => self.insert_free(r),
            }
        }
        let block = &mut self.blocks[b];
        block.allocated = true;
        self.stats.allocated_bytes.add(block.size);
    }

    /// `free_block`: merges the freed block `b` with its free neighbours and caches it. The list entry of the
    /// first merged neighbour is reused: the merged block sorts after it, so only the entries in between shift.
    fn free_block(&mut self, b: u32) {
        let Block {
            prev,
            next,
            small,
            stream,
            ..
        } = self.blocks[b];
        let (pool, si) = (usize::from(!small), stream.index());
        // The first merged neighbour's (size, address).
        let mut reuse: Option<(u64, u64)> = None;
        for src in [prev, next] {
            let blocks = &mut self.blocks;
            let Some(&s) = blocks.get(src) else {
                continue;
            };
            if s.allocated || !s.mapped {
                continue;
            }
            match reuse {
                None => reuse = Some((s.size, s.addr)),
                Some(_) => self.pools[pool].free[si].remove_block(s.size, s.addr, src),
            }
            let d = &mut blocks[b];
            d.size += s.size;
            let link = if src == prev {
                d.addr = s.addr;
                d.prev = s.prev;
                s.prev
            } else {
                d.next = s.next;
                s.next
            };
            if let Some(n) = blocks.get_mut(link) {
                if src == prev {
                    n.next = b;
                } else {
                    n.prev = b;
                }
            }
            self.spare.push(src);
        }
        let Some((size, addr)) = reuse else {
            self.insert_free(b);
            return;
        };
        let block = &mut self.blocks[b];
        block.gc_base = self.pools[pool].n_get_free_block_calls;
        let free = &mut self.pools[pool].free[si];
        let at = free.lower_bound(size, addr);
        free.replace(at, (block.size, block.addr, b));
    }

    /// `try_merge_blocks`: `dst` (out of every pool list) absorbs its neighbour `src` if that is free and of the
    /// same kind.
    fn try_merge_blocks(&mut self, dst: u32, src: u32) {
        let Some(&s) = self.blocks.get(src) else {
            return;
        };
        if s.allocated || s.mapped != self.blocks[dst].mapped {
            return;
        }
        if s.mapped {
            self.remove_free(src);
        } else {
            self.remove_unmapped(src);
        }
        let d = &mut self.blocks[dst];
        d.size += s.size;
        let relink = if d.prev == src {
            d.addr = s.addr;
            d.prev = s.prev;
            self.blocks.get_mut(s.prev).map(|p| &mut p.next)
        } else {
            d.next = s.next;
            self.blocks.get_mut(s.next).map(|n| &mut n.prev)
        };
        if let Some(link) = relink {
            *link = dst;
        }
        self.spare.push(src);
    }

    /// `alloc_block`: new memory from CUDA for a request of `size` bytes in `pool` (a segment, or pages of an
    /// expandable one), or `None` when it does not fit (`limited`) in the allowed memory.
    fn alloc_block(
        &mut self,
        pool: usize,
        stream: Stream,
        size: u64,
        limited: bool,
    ) -> Option<u32> {
        let alloc_size = allocation_size(size);
        let reserved = self.stats.reserved_bytes.current;
        if let Some(max) = self.allowed_memory_maximum {
            if limited && reserved + alloc_size > max {
                return None;
            }
        }
        if self.config.expandable_segments {
            return self.try_allocate_expandable_block(pool, stream, size, limited);
        }
        if limited && reserved + alloc_size > self.capacity {
            return None;
        }
        let addr = self.next_addr;
        self.next_addr = addr.saturating_add(alloc_size);
        self.stats.segments.add(1);
        self.stats.reserved_bytes.add(alloc_size);
        self.traced(TraceAction::SegmentAlloc, addr, alloc_size, 0, stream);
        Some(self.new_block(Block {
            addr,
            size: alloc_size,
            prev: NONE,
            next: NONE,
            small: pool == 0,
            allocated: false,
            mapped: true,
            expandable: false,
            stream,
            gc_base: 0,
        }))
    }

    /// `try_allocate_expandable_block`: maps enough pages at the lowest address with room for `size` bytes and
    /// returns the free block covering them, out of the pool.
    fn try_allocate_expandable_block(
        &mut self,
        pool: usize,
        stream: Stream,
        size: u64,
        limited: bool,
    ) -> Option<u32> {
        let mut c = self.find_expandable_block(pool, stream, size);
        if !self.blocks[c].mapped {
            let n = self.blocks[c].size.min(size);
            if !self.map_block(c, n, limited) {
                return None;
            }
        }
        while self.blocks[c].size < size {
            // Free then unmapped: map some of the unmapped block, which merges with the free one before it.
            let remaining = size - self.blocks[c].size;
            let next = self.blocks[c].next;
            let n = self.blocks.get(next)?.size.min(remaining);
            if !self.map_block(next, n, limited) {
                return None;
            }
            c = next;
        }
        self.remove_free(c);
        Some(c)
    }

    /// `find_expandable_block`: the lowest-addressed run of free and unmapped blocks of `stream` with room for
    /// `size` bytes, starting at an unmapped block or the free block just before it; a new segment of the stream
    /// if none has room.
    fn find_expandable_block(&mut self, pool: usize, stream: Stream, size: u64) -> u32 {
        let allocatable = |b: u32| self.blocks.get(b).is_some_and(|b| !b.allocated);
        for &(_, _, u) in self.pools[pool].unmapped[stream.index()].iter() {
            let prev = self.blocks[u].prev;
            let start = if allocatable(prev) { prev } else { u };
            let (mut b, mut bytes) = (start, 0);
            while bytes < size && allocatable(b) {
                bytes += self.blocks[b].size;
                b = self.blocks[b].next;
            }
            if bytes >= size {
                return start;
            }
        }
        // A new segment reserves address space for 1 1/8 of the device's memory, in pages.
        let small = pool == 0;
        let page = Self::page_size(small);
        let space = (self.capacity.min(MAX_ADDRESS_SPACE) / 8 * 9).max(size);
        let addr = self.next_addr.div_ceil(page).saturating_mul(page);
        let space = space.div_ceil(page) * page;
        self.next_addr = addr.saturating_add(space);
        let b = self.new_block(Block {
            addr,
            size: space,
            prev: NONE,
            next: NONE,
            small,
            allocated: false,
            mapped: false,
            expandable: true,
            stream,
            gc_base: 0,
        });
        self.insert_unmapped(b);
        b
    }

    /// `map_block`: backs the first pages of unmapped block `b` covering `size` bytes with memory and caches
    /// them, merged with a free neighbour; the rest stays unmapped.
    fn map_block(&mut self, b: u32, size: u64, limited: bool) -> bool {
        let block = self.blocks[b];
        let page = Self::page_size(block.small);
        let mapped = ((block.addr + size).div_ceil(page) - block.addr / page) * page;
        if mapped == 0 || (limited && self.stats.reserved_bytes.current + mapped > self.capacity) {
            return false;
        }
        self.remove_unmapped(b);
        self.blocks[b].mapped = true;
        if mapped < block.size {
            let rest = self.new_block(Block {
                addr: block.addr + mapped,
                size: block.size - mapped,
                prev: b,
                ..block
            });
            if let Some(next) = self.blocks.get_mut(block.next) {
                next.prev = rest;
            }
            self.blocks[b].next = rest;
            self.blocks[b].size = mapped;
            self.insert_unmapped(rest);
        }
        let (prev, next) = (self.blocks[b].prev, self.blocks[b].next);
        self.try_merge_blocks(b, prev);
        self.try_merge_blocks(b, next);
        self.insert_free(b);
        self.stats.reserved_bytes.add(mapped);
        self.traced(
            TraceAction::SegmentMap,
            block.addr / page * page,
            mapped,
            0,
            block.stream,
        );
        true
    }

    /// `unmap_block`: gives back the whole pages inside free block `b`; the partial pages at either end stay
    /// cached as free blocks.
    fn unmap_block(&mut self, b: u32) {
        let block = self.blocks[b];
        let page = Self::page_size(block.small);
        let (begin, end) = (block.addr.div_ceil(page), (block.addr + block.size) / page);
        if begin >= end {
            return;
        }
        self.remove_free(b);
        let (start, unmapped) = (begin * page, (end - begin) * page);
        let before = start - block.addr;
        if before > 0 {
            let free = self.new_block(Block {
                size: before,
                next: b,
                ..block
            });
            if let Some(prev) = self.blocks.get_mut(block.prev) {
                prev.next = free;
            }
            self.blocks[b].prev = free;
            self.insert_free(free);
        }
        let after = block.size - before - unmapped;
        if after > 0 {
            let free = self.new_block(Block {
                addr: start + unmapped,
                size: after,
                prev: b,
                ..block
            });
            if let Some(next) = self.blocks.get_mut(block.next) {
                next.prev = free;
            }
            self.blocks[b].next = free;
            self.insert_free(free);
        }
        let d = &mut self.blocks[b];
        (d.addr, d.size, d.mapped) = (start, unmapped, false);
        let (prev, next) = (d.prev, d.next);
        self.try_merge_blocks(b, prev);
        self.try_merge_blocks(b, next);
        self.insert_unmapped(b);
        self.stats.reserved_bytes.sub(unmapped);
        self.traced(TraceAction::SegmentUnmap, start, unmapped, 0, block.stream);
    }

    fn is_split(&self, b: u32) -> bool {
        let block = &self.blocks[b];
        block.prev != NONE || block.next != NONE
    }

    /// `release_block`: `cudaFree` of a whole cached segment.
    fn release_block(&mut self, b: u32) {
        self.remove_free(b);
        self.stats.segments.sub(1);
        self.stats.reserved_bytes.sub(self.blocks[b].size);
        let Block {
            addr, size, stream, ..
        } = self.blocks[b];
        self.traced(TraceAction::SegmentFree, addr, size, 0, stream);
        self.spare.push(b);
    }

    /// `release_available_cached_blocks`: with a `max_split_size`, frees the smallest oversize cached segment of
    /// the request's stream that covers the request, or else the stream's largest ones until they add up to it.
    fn release_available_cached_blocks(&mut self, pool: usize, stream: Stream, size: u64) -> bool {
        let Some(max_split) = self.config.max_split_size else {
            return false;
        };
        if self.config.expandable_segments {
            // PyTorch would `cudaFree` a mapped range here (an internal assertion); not modelled.
            return false;
        }
        let key = size.max(max_split);
        let free = &self.pools[pool].free[stream.index()];
        if let Some((_, _, b)) = free.get(free.lower_bound(key, 0)) {
            if self.is_split(b) {
                return false;
            }
            self.release_block(b);
            return true;
        }
        let mut released = 0;
        while released < key {
            // The largest cached block (releasing it takes it out of the list).
            let Some((block_size, _, b)) = self.pools[pool].free[stream.index()].last() else {
                break;
            };
            if block_size < max_split || self.is_split(b) {
                break;
            }
            released += block_size;
            self.release_block(b);
        }
        released >= key
    }

    /// `release_cached_blocks`: frees every cached segment, large pool first, and unmaps the free pages of
    /// expandable segments (dropping a segment left with nothing mapped).
    fn release_cached_blocks(&mut self) {
        for pool in [1, 0] {
            let cached: Vec<u32> = self.pools[pool]
                .free
                .iter()
                .flat_map(|f| f.iter().map(|k| k.2))
                .collect();
            for b in cached {
                if self.blocks[b].expandable {
                    self.unmap_block(b);
                    if !self.blocks[b].mapped && !self.is_split(b) {
                        self.remove_unmapped(b);
                        self.spare.push(b);
                    }
                } else if !self.is_split(b) {
                    self.release_block(b);
                }
            }
        }
    }

    /// `garbage_collect_cached_blocks`: once reserved memory passes the threshold, frees whole cached large
    /// segments unused for at least the average age (in `get_free_block` calls), until enough is reclaimed.
    fn garbage_collect_cached_blocks(&mut self) {
        let (Some(threshold), Some(allowed)) = (
            self.config.garbage_collection_threshold,
            self.allowed_memory_maximum,
        ) else {
            return;
        };
        let gc_threshold = (threshold * allowed as f64) as u64;
        let reserved = self.stats.reserved_bytes.current;
        if reserved <= gc_threshold {
            return;
        }
        let target = reserved - gc_threshold;
        let calls = self.pools[1].n_get_free_block_calls;
        let age = |a: &Self, b: u32| calls - a.blocks[b].gc_base;
        let freeable = |a: &Self| -> Vec<u32> {
            let free = a.pools[1].free.iter().flat_map(|f| f.iter().map(|k| k.2));
            free.filter(|&b| !a.is_split(b) && !a.blocks[b].expandable)
                .collect()
        };
        let candidates = freeable(self);
        let mut total_age: u64 = candidates.iter().map(|&b| age(self, b)).sum();
        let mut n_freeable = candidates.len() as u64;
        let (mut reclaimed, mut freed) = (0, true);
        while reclaimed < target && freed && n_freeable > 0 {
            let age_threshold = total_age as f64 / n_freeable as f64;
            freed = false;
            for b in freeable(self) {
                let a = age(self, b);
                if a as f64 >= age_threshold {
                    freed = true;
                    reclaimed += self.blocks[b].size;
                    total_age -= a;
                    n_freeable -= 1;
                    self.release_block(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn default_allocator() -> CachingAllocator {
        CachingAllocator::new(AllocatorConfig::default(), u64::MAX)
    }

    fn expandable() -> AllocatorConfig {
        AllocatorConfig {
            expandable_segments: true,
            ..AllocatorConfig::default()
        }
    }

    #[test]
    fn rounds_requests_and_sizes_segments_as_pytorch() {
        assert_eq!(round_size(1), 512);
        assert_eq!(round_size(512), 512);
        assert_eq!(round_size(513), 1024);
        assert_eq!(allocation_size(512), 2 * MIB);
        assert_eq!(allocation_size(MIB), 2 * MIB);
        assert_eq!(allocation_size(MIB + 512), 20 * MIB);
        assert_eq!(allocation_size(10 * MIB - 512), 20 * MIB);
        assert_eq!(allocation_size(10 * MIB), 10 * MIB);
        assert_eq!(allocation_size(11 * MIB), 12 * MIB);
    }

    #[test]
    fn two_six_mib_tensors_share_one_20_mib_segment() {
        let mut a = default_allocator();
        a.malloc(0, 6 * MIB).unwrap();
        a.malloc(1, 6 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 20 * MIB);
        assert_eq!(a.stats().segments.current, 1);
        assert_eq!(a.allocated_bytes(), 12 * MIB);
        // A third does not fit in the 8 MiB left: a second segment.
        a.malloc(2, 9 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB);
    }

    #[test]
    fn a_request_just_above_1_mib_takes_a_20_mib_segment() {
        let mut a = default_allocator();
        a.malloc(0, MIB + 512).unwrap();
        assert_eq!(a.reserved_bytes(), 20 * MIB);
        assert_eq!(a.allocated_bytes(), MIB + 512);
        // 1 MiB exactly is small: a 2 MiB segment of the small pool.
        a.malloc(1, MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 22 * MIB);
    }

    #[test]
    fn small_tensors_share_2_mib_segments() {
        let mut a = default_allocator();
        for id in 0..4 {
            a.malloc(id, 512 * 1024).unwrap();
        }
        assert_eq!(a.reserved_bytes(), 2 * MIB);
        a.malloc(4, 1).unwrap();
        assert_eq!(a.reserved_bytes(), 4 * MIB);
        assert_eq!(a.stats().segments.current, 2);
        assert_eq!(a.allocated_bytes(), 2 * MIB + 512);
    }

    #[test]
    fn a_large_remainder_of_one_mib_or_less_stays_with_the_block() {
        let mut a = default_allocator();
        // 12 MiB segment for 11.5 MiB: the 0.5 MiB rest is not split off, so it counts as allocated.
        a.malloc(0, 11 * MIB + MIB / 2).unwrap();
        assert_eq!(a.reserved_bytes(), 12 * MIB);
        assert_eq!(a.allocated_bytes(), 12 * MIB);
        a.free(0);
        assert_eq!(a.allocated_bytes(), 0);
        assert_eq!(a.reserved_bytes(), 12 * MIB);
    }

    #[test]
    fn freeing_the_middle_block_and_asking_for_more_makes_a_new_segment() {
        let mut a = default_allocator();
        for id in 0..3 {
            a.malloc(id, 6 * MIB).unwrap();
        }
        assert_eq!(a.reserved_bytes(), 20 * MIB);
        // Free: 2 MiB at the end, then the middle 6 MiB; they are not adjacent, so they do not merge.
        a.free(1);
        a.malloc(3, 7 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB);
        assert_eq!(a.stats().segments.current, 2);
        // Freeing the last block merges the middle and the tail: 14 MiB fits without a new segment.
        a.free(2);
        a.malloc(4, 14 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB);
    }

    #[test]
    fn best_fit_prefers_the_smallest_block_then_the_lowest_address() {
        let mut a = default_allocator();
        // Segments of 12 MiB (addresses 0..12), 20 MiB (12..32) and 12 MiB (32..44).
        a.malloc(0, 12 * MIB).unwrap();
        a.malloc(1, 20 * MIB).unwrap();
        a.malloc(2, 12 * MIB).unwrap();
        a.free(2);
        a.free(1);
        a.free(0);
        // 11 MiB: the 12 MiB blocks fit best, the lower one first; the 20 MiB one is left alone.
        a.malloc(3, 11 * MIB).unwrap();
        a.malloc(4, 11 * MIB).unwrap();
        a.malloc(5, 11 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 44 * MIB);
        assert_eq!(a.blocks[a.by_id[3]].addr, 0);
        assert_eq!(a.blocks[a.by_id[4]].addr, 32 * MIB);
        assert_eq!(a.blocks[a.by_id[5]].addr, 12 * MIB);
    }

    #[test]
    fn segments_never_merge_across_each_other() {
        let mut a = default_allocator();
        a.malloc(0, 12 * MIB).unwrap();
        a.malloc(1, 12 * MIB).unwrap();
        a.free(0);
        a.free(1);
        a.malloc(2, 24 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 48 * MIB);
        assert_eq!(a.stats().segments.peak, 3);
    }

    /// A block cached by one stream serves only that stream: a request of the same size on another stream takes
    /// a segment of its own, and the first stream's next request reuses its own block.
    #[test]
    fn cached_blocks_serve_only_their_own_stream() {
        let (s1, s3) = (Stream::nth(1), Stream::nth(3));
        let mut a = default_allocator();
        a.malloc_on(0, 64 * MIB, s1).unwrap();
        a.free(0);
        a.malloc(1, 64 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 128 * MIB);
        a.malloc_on(2, 64 * MIB, s1).unwrap();
        assert_eq!(a.reserved_bytes(), 128 * MIB);
        // Small blocks too: a 2 MiB segment per stream.
        a.malloc_on(3, 4096, s3).unwrap();
        a.malloc(4, 4096).unwrap();
        a.malloc_on(5, 4096, s3).unwrap();
        assert_eq!(a.reserved_bytes(), 128 * MIB + 4 * MIB);
        assert_eq!(a.stats().segments.current, 4);
        // Every stream's cached segments go back on `empty_cache`.
        for id in 1..6 {
            a.free(id);
        }
        a.empty_cache();
        assert_eq!(a.reserved_bytes(), 0);
    }

    /// FSDP2's forward all-gathers, as in llama-fsdp-w8's snapshot: the root's 64 MiB output (a 66 MiB segment of
    /// the copy-in stream) is still alive when block 0's 11.1 MiB one is allocated, which takes a 12 MiB segment
    /// of its own; from then on the outputs alternate between the two segments. The default stream's segments are
    /// not used for them.
    #[test]
    fn alternating_buffers_on_a_side_stream_keep_two_segments() {
        let s1 = Stream::nth(1);
        let mut a = default_allocator();
        a.malloc_on(0, 67_110_912, s1).unwrap();
        a.malloc_on(1, 11_603_968, s1).unwrap();
        a.free(0);
        for id in 2..8 {
            a.malloc_on(id, 11_603_968, s1).unwrap();
            a.free(id - 1);
        }
        assert_eq!(a.reserved_bytes(), 78 * MIB);
        assert_eq!(a.stats().segments.current, 2);
    }

    /// With expandable segments each stream grows a segment of its own.
    #[test]
    fn expandable_segments_are_per_stream() {
        let mut a = CachingAllocator::new(expandable(), 80 << 30);
        a.malloc(0, 6 * MIB).unwrap();
        a.malloc_on(1, 6 * MIB, Stream::nth(1)).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB);
        a.free(0);
        a.malloc_on(2, 6 * MIB, Stream::nth(1)).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB);
        a.malloc(3, 12 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB);
        check_invariants(&a);
    }

    #[test]
    fn under_a_small_capacity_the_retry_frees_cached_segments() {
        let mut a = CachingAllocator::new(AllocatorConfig::default(), 64 * MIB);
        a.malloc(0, 40 * MIB).unwrap();
        a.free(0);
        // No cached block fits 42 MiB, and 40 + 42 > 64: release the cache, retry, succeed.
        a.malloc(1, 42 * MIB).unwrap();
        assert_eq!(a.stats().n_alloc_retries, 1);
        assert_eq!(a.stats().n_ooms, 0);
        assert_eq!(a.reserved_bytes(), 42 * MIB);
        assert_eq!(a.peak_reserved_bytes(), 42 * MIB);
        assert_eq!(a.stats().segments.current, 1);
        // With 42 MiB in use, 30 MiB more cannot fit even with an empty cache.
        a.malloc(2, 30 * MIB).unwrap_err();
        assert_eq!(a.stats().n_alloc_retries, 2);
        assert_eq!(a.stats().n_ooms, 1);
    }

    #[test]
    fn an_oom_leaves_nothing_allocated_unless_overcommitting() {
        let mut a = CachingAllocator::new(AllocatorConfig::default(), 30 * MIB);
        a.malloc(0, 20 * MIB).unwrap();
        assert_eq!(
            a.malloc(1, 20 * MIB),
            Err(OutOfMemory {
                tried_to_allocate: 20 * MIB
            })
        );
        assert_eq!(a.allocated_bytes(), 20 * MIB);
        a.free(1);
        assert!(a.malloc_overcommitting(2, 20 * MIB, Stream::DEFAULT));
        assert_eq!(a.reserved_bytes(), 40 * MIB);
        assert_eq!(a.stats().n_ooms, 2);
        assert_eq!(a.stats().n_alloc_retries, 2);
    }

    #[test]
    fn max_split_size_keeps_oversize_blocks_whole() {
        let config = AllocatorConfig {
            max_split_size: Some(64 * MIB),
            ..AllocatorConfig::default()
        };
        let mut a = CachingAllocator::new(config, u64::MAX);
        a.malloc(0, 100 * MIB).unwrap();
        a.free(0);
        // Below max_split_size: never an oversize block.
        a.malloc(1, 30 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 130 * MIB);
        // Oversize, within 20 MiB of the cached block: takes it whole.
        a.malloc(2, 81 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 130 * MIB);
        assert_eq!(a.allocated_bytes(), 130 * MIB);
        a.free(2);
        // Oversize but 20 MiB or more below it: a new segment.
        a.malloc(3, 80 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 210 * MIB);
    }

    #[test]
    fn with_max_split_size_an_oom_first_frees_just_enough_oversize_segments() {
        let config = AllocatorConfig {
            max_split_size: Some(32 * MIB),
            ..AllocatorConfig::default()
        };
        let mut a = CachingAllocator::new(config, 200 * MIB);
        for (id, mib) in [(0, 40), (1, 50), (2, 60)] {
            a.malloc(id, mib * MIB).unwrap();
        }
        a.malloc(3, 10 * MIB).unwrap();
        for id in 0..3 {
            a.free(id);
        }
        // 150 + 10 reserved, 100 more needed: the largest oversize blocks (60, then 50) go, without a retry.
        a.malloc(4, 100 * MIB).unwrap();
        assert_eq!(a.stats().n_alloc_retries, 0);
        assert_eq!(a.reserved_bytes(), 150 * MIB);
        assert_eq!(a.stats().segments.current, 3);
    }

    #[test]
    fn expandable_segments_grow_one_segment_in_20_mib_pages() {
        let mut a = CachingAllocator::new(expandable(), 80 << 30);
        a.malloc(0, 6 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 20 * MIB);
        a.malloc(1, 30 * MIB).unwrap();
        // 36 MiB in one segment: two pages.
        assert_eq!(a.reserved_bytes(), 40 * MIB);
        a.malloc(2, 100).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB + 2 * MIB);
        assert_eq!(a.stats().segments.peak, 0);
        a.free(1);
        a.free(0);
        a.empty_cache();
        assert_eq!(a.reserved_bytes(), 2 * MIB);
        a.free(2);
        a.empty_cache();
        assert_eq!(a.reserved_bytes(), 0);
        assert!(a.pools.iter().all(|p| p
            .free
            .iter()
            .chain(&p.unmapped)
            .all(|l| l.iter().next().is_none())));
    }

    /// Growing tensors with a hole left behind each time: each no longer fits the holes of separate segments,
    /// but in one expandable segment the hole and the new pages merge.
    #[test]
    fn expandable_segments_reserve_less_in_a_fragmenting_pattern() {
        let pattern = |config| {
            let mut a = CachingAllocator::new(config, u64::MAX);
            let mut id = 0;
            for step in 1..=8u64 {
                a.malloc(id, step * 11 * MIB).unwrap();
                a.malloc(id + 1, 2 * MIB).unwrap();
                a.free(id);
                id += 2;
            }
            a.peak_reserved_bytes()
        };
        let plain = pattern(AllocatorConfig::default());
        let grown = pattern(expandable());
        // Plain: segments of 12, 22, ..., 88 MiB plus the 20 MiB ones of the 2 MiB tensors.
        assert_eq!(plain, (12 + 22 + 34 + 44 + 56 + 66 + 78 + 88 + 20) * MIB);
        assert!(grown < plain / 2, "{grown} vs {plain}");
    }

    #[test]
    fn expandable_blocks_split_any_remainder_of_512_bytes() {
        let mut a = CachingAllocator::new(expandable(), u64::MAX);
        a.malloc(0, 19 * MIB + MIB / 2).unwrap();
        assert_eq!(a.allocated_bytes(), 19 * MIB + MIB / 2);
        a.malloc(1, MIB / 2 + 512).unwrap();
        // 0.5 MiB + 512 is small: the small pool's own segment.
        assert_eq!(a.reserved_bytes(), 22 * MIB);
    }

    #[test]
    fn an_expandable_segment_out_of_room_unmaps_free_pages_and_retries() {
        let mut a = CachingAllocator::new(expandable(), 100 * MIB);
        a.malloc(0, 60 * MIB).unwrap();
        a.malloc(1, 15 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 80 * MIB);
        a.free(0);
        // 40 MiB fits in the free 60 MiB at the start.
        a.malloc(2, 40 * MIB).unwrap();
        assert_eq!(a.stats().n_alloc_retries, 0);
        // 30 MiB more: the free 20 MiB at 40..60 is too small, and growing the free 5 MiB at 75..80 maps two
        // pages (80 + 40 > 100): the free page at 40..60 goes back and the mapping is retried.
        a.malloc(3, 30 * MIB).unwrap();
        assert_eq!(a.stats().n_alloc_retries, 1);
        assert!(a.reserved_bytes() <= 100 * MIB);
    }

    #[test]
    fn garbage_collection_releases_old_cached_segments_before_growing() {
        let config = AllocatorConfig {
            garbage_collection_threshold: Some(0.5),
            memory_fraction: Some(1.0),
            ..AllocatorConfig::default()
        };
        let mut a = CachingAllocator::new(config, 100 * MIB);
        a.malloc(0, 40 * MIB).unwrap();
        a.free(0);
        a.malloc(1, 44 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 84 * MIB);
        // Reserved 84 MiB > 50: the cached 40 MiB segment is collected before the next one, with no retry.
        a.malloc(2, 46 * MIB).unwrap();
        assert_eq!(a.reserved_bytes(), 90 * MIB);
        assert_eq!(a.stats().n_alloc_retries, 0);
    }

    /// Walks every live block: the links agree, the pool lists hold exactly the free and unmapped blocks, and
    /// the counters equal the sums of what the blocks say.
    fn check_invariants(a: &CachingAllocator) {
        let spare: std::collections::HashSet<u32> = a.spare.iter().copied().collect();
        let (mut mapped, mut allocated, mut n_free, mut n_unmapped) = (0, 0, 0, 0);
        for (i, b) in a.blocks.0.iter().enumerate() {
            let i = i as u32;
            if spare.contains(&i) {
                continue;
            }
            if let Some(n) = a.blocks.get(b.next) {
                assert_eq!(n.prev, i);
                assert_eq!(n.addr, b.addr + b.size);
                assert!(
                    b.mapped != n.mapped || b.allocated || n.allocated,
                    "unmerged neighbours"
                );
            }
            if let Some(p) = a.blocks.get(b.prev) {
                assert_eq!(p.next, i);
            }
            let pool = &a.pools[usize::from(!b.small)];
            if b.mapped {
                mapped += b.size;
            }
            if b.allocated {
                allocated += b.size;
            } else if b.mapped {
                n_free += 1;
                let free = &pool.free[b.stream.index()];
                assert!(free.iter().any(|e| *e == (b.size, b.addr, i)));
            } else {
                n_unmapped += 1;
                let unmapped = &pool.unmapped[b.stream.index()];
                assert!(unmapped.iter().any(|e| *e == (0, b.addr, i)));
            }
        }
        assert_eq!(mapped, a.reserved_bytes());
        assert_eq!(allocated, a.allocated_bytes());
        let count = |f: fn(&Pool) -> &[BlockList; N_STREAMS]| {
            let lists = a.pools.iter().flat_map(|p| f(p).iter());
            lists.map(|l| l.iter().count()).sum::<usize>()
        };
        assert_eq!(n_free, count(|p| &p.free));
        assert_eq!(n_unmapped, count(|p| &p.unmapped));
        for pool in &a.pools {
            for list in pool.free.iter().chain(&pool.unmapped) {
                let entries: Vec<Entry> = list.iter().copied().collect();
                assert!(entries.windows(2).all(|w| w[0] < w[1]));
                assert!(list.chunks.iter().all(|c| c.len() <= CHUNK));
                assert!(list.chunks.len() < 2 || list.chunks.iter().all(|c| !c.is_empty()));
                let keys = list
                    .chunks
                    .iter()
                    .map(|c| c.last().map_or(0, |e| key(e.0, e.1)));
                assert!(list.chunks.len() < 2 || list.lasts.iter().copied().eq(keys));
            }
        }
    }

    /// The stream of a random-traffic request: mostly the default one, some on two others, so that every
    /// invariant holds across streams too.
    fn stream_of(x: u64) -> Stream {
        match (x >> 40) % 4 {
            0 => Stream::nth(1),
            1 => Stream::nth(3),
            _ => Stream::DEFAULT,
        }
    }

    /// The defaults, expandable segments, and max_split_size with garbage collection: the random-traffic tests'
    /// configurations.
    fn traffic_configs() -> [AllocatorConfig; 3] {
        [
            AllocatorConfig::default(),
            expandable(),
            AllocatorConfig {
                max_split_size: Some(40 * MIB),
                garbage_collection_threshold: Some(0.6),
                memory_fraction: Some(0.9),
                ..AllocatorConfig::default()
            },
        ]
    }

    #[test]
    fn random_traffic_keeps_the_blocks_consistent() {
        let configs = traffic_configs();
        for config in configs {
            let mut a = CachingAllocator::new(config, 600 * MIB);
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
            let mut live: Vec<u32> = Vec::new();
            for id in 0..3000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if x.is_multiple_of(2) && !live.is_empty() {
                    let k = (x >> 8) as usize % live.len();
                    a.free(live.swap_remove(k));
                } else {
                    // Mostly small and mid-sized tensors, some large ones.
                    let size = match x % 7 {
                        0..=2 => (x >> 20) % (1 << 20),
                        3..=5 => (x >> 20) % (16 << 20),
                        _ => (x >> 20) % (90 << 20),
                    };
                    if a.malloc_overcommitting(id, size, stream_of(x)) {
                        assert!(a.stats().n_ooms > 0);
                    }
                    live.push(id);
                }
                if id.is_multiple_of(97) {
                    check_invariants(&a);
                }
            }
            for id in live {
                a.free(id);
            }
            check_invariants(&a);
            assert_eq!(a.allocated_bytes(), 0);
            a.empty_cache();
            check_invariants(&a);
            assert_eq!(a.reserved_bytes(), 0, "{config:?}");
        }
    }

    /// Everything `scratch_overcommitting` may leave different from `malloc_overcommitting` + `free`: the blocks
    /// by address, both pools' lists in order, the counters.
    fn state(a: &CachingAllocator) -> impl PartialEq + std::fmt::Debug {
        let spare: std::collections::HashSet<u32> = a.spare.iter().copied().collect();
        let mut blocks: Vec<_> = (0..a.blocks.0.len() as u32)
            .filter(|i| !spare.contains(i))
            .map(|i| {
                let b = &a.blocks[i];
                (
                    b.addr,
                    b.size,
                    b.small,
                    b.allocated,
                    b.mapped,
                    b.stream,
                    b.gc_base,
                )
            })
            .collect();
        blocks.sort_unstable();
        let lists: Vec<Vec<(u64, u64)>> = a
            .pools
            .iter()
            .flat_map(|p| p.free.iter().chain(&p.unmapped))
            .map(|l| l.iter().map(|e| (e.0, e.1)).collect())
            .collect();
        let counts: Vec<u64> = a.pools.iter().map(|p| p.n_get_free_block_calls).collect();
        (blocks, lists, counts, a.stats, a.capacity, a.next_addr)
    }

    #[test]
    fn scratch_is_malloc_then_free() {
        let configs = traffic_configs();
        for config in configs {
            let (mut fast, mut plain) = (
                CachingAllocator::new(config, 600 * MIB),
                CachingAllocator::new(config, 600 * MIB),
            );
            let mut x: u64 = 0x2545_F491_4F6C_DD1D;
            let mut live: Vec<u32> = Vec::new();
            for id in 0..4000u32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let size = match x % 7 {
                    0..=2 => (x >> 20) % (1 << 20),
                    3..=5 => (x >> 20) % (16 << 20),
                    _ => (x >> 20) % (90 << 20),
                };
                match (x >> 8) % 3 {
                    0 if !live.is_empty() => {
                        let k = (x >> 12) as usize % live.len();
                        let t = live.swap_remove(k);
                        fast.free(t);
                        plain.free(t);
                    }
                    1 => {
                        let oom = plain.malloc_overcommitting(id, size, stream_of(x));
                        plain.free(id);
                        assert_eq!(fast.scratch_overcommitting(id, size, stream_of(x)), oom);
                    }
                    _ => {
                        assert_eq!(
                            fast.malloc_overcommitting(id, size, stream_of(x)),
                            plain.malloc_overcommitting(id, size, stream_of(x))
                        );
                        live.push(id);
                    }
                }
                assert_eq!(state(&fast), state(&plain), "{config:?} at {id}");
            }
        }
    }

    /// A `BlockList` of thousands of entries (many chunks, splitting and emptying) answers every search, step,
    /// replacement and removal as one sorted vector does.
    #[test]
    fn a_long_block_list_behaves_as_one_sorted_vector() {
        let (mut list, mut plain) = (BlockList::default(), Vec::<Entry>::new());
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next_addr = 0;
        for round in 0..40_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Few sizes (as a deep model's cached blocks), fresh addresses; the list grows, then mostly shrinks.
            let size = (x >> 40) % 12 * 512;
            let grow = if round < 20_000 { 3 } else { 1 };
            match (x >> 8) % 5 {
                k if k < grow || plain.is_empty() => {
                    next_addr += 512;
                    let e = (size, next_addr, round);
                    list.insert(e);
                    plain.insert(plain.partition_point(|p| *p < e), e);
                }
                3 => {
                    // Replace the first entry at or after a key by one with a new size (either direction).
                    let c = list.lower_bound(size, x % next_addr);
                    let at = plain.partition_point(|p| (p.0, p.1) < (size, x % next_addr));
                    assert_eq!(list.get(c), plain.get(at).copied());
                    if at < plain.len() {
                        let old = plain.remove(at);
                        let e = ((x >> 20) % 12 * 512, old.1, old.2);
                        list.replace(c, e);
                        plain.insert(plain.partition_point(|p| *p < e), e);
                    }
                }
                _ => {
                    let at = (x >> 16) as usize % plain.len();
                    let e = plain.remove(at);
                    list.remove_block(e.0, e.1, e.2);
                }
            }
            if round % 97 == 0 {
                assert!(list.iter().copied().eq(plain.iter().copied()));
                assert_eq!(list.last(), plain.last().copied());
                // Walking from a search visits the rest in order.
                let (mut c, at) = (
                    list.lower_bound(size, 0),
                    plain.partition_point(|p| p.0 < size),
                );
                for want in &plain[at..] {
                    assert_eq!(list.get(c), Some(*want));
                    c = list.next(c);
                }
                assert_eq!(list.get(c), None);
                assert!(list.chunks.iter().all(|c| c.len() <= CHUNK));
                assert!(list.chunks.len() < 2 || list.chunks.iter().all(|c| !c.is_empty()));
                let keys = list
                    .chunks
                    .iter()
                    .map(|c| c.last().map_or(0, |e| key(e.0, e.1)));
                assert!(list.chunks.len() < 2 || list.lasts.iter().copied().eq(keys));
            }
        }
        assert!(list.chunks.len() > 1);
    }

    /// The chunk and index a search tries first (`BlockList::finger`, `at_finger`, left by a search before)
    /// never change an answer: searches in ascending, descending, repeated and scattered order, between
    /// insertions and removals that split chunks, empty them and renumber the rest (so a finger points at a
    /// chunk that moved, or past the last), each find what a search of one sorted vector finds.
    #[test]
    fn a_search_from_a_stale_finger_finds_what_a_sorted_vector_finds() {
        let (mut list, mut plain) = (BlockList::default(), Vec::<Entry>::new());
        let found = |list: &BlockList, size: u64, addr: u64| list.get(list.lower_bound(size, addr));
        let want = |plain: &[Entry], size: u64, addr: u64| {
            plain.iter().find(|p| (p.0, p.1) >= (size, addr)).copied()
        };
        let (mut x, mut most_chunks): (u64, usize) = (0x2545_F491_4F6C_DD1D, 0);
        for round in 0..600u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Grow to a few hundred entries of a few sizes, then shrink and grow again.
            let e = ((x >> 40) % 9 * 512, u64::from(round) * 512, round);
            if (round / 150) % 2 == 0 || plain.is_empty() {
                list.insert(e);
                plain.insert(plain.partition_point(|p| *p < e), e);
            } else {
                let r = plain.remove((x >> 20) as usize % plain.len());
                list.remove_block(r.0, r.1, r.2);
            }
            let n = plain.len() as u64;
            let probes: Vec<(u64, u64)> = match round % 4 {
                // Every size from the smallest up, then down, each from address 0 (`get_free_block`'s search).
                0 => (0..10).map(|s| (s * 512, 0)).collect(),
                1 => (0..10).rev().map(|s| (s * 512, 0)).collect(),
                // Every entry's own key, in order, then one past it (a block's removal, a walk).
                2 => plain
                    .iter()
                    .flat_map(|p| [(p.0, p.1), (p.0, p.1 + 1)])
                    .collect(),
                // The same scattered key three times over.
                _ => [((x >> 8) % 10 * 512, (x >> 16) % (n * 512 + 1)); 3].to_vec(),
            };
            for (size, addr) in probes {
                assert_eq!(
                    found(&list, size, addr),
                    want(&plain, size, addr),
                    "{round}"
                );
            }
            most_chunks = most_chunks.max(list.chunks.len());
        }
        assert!(most_chunks > 4, "{most_chunks}");
    }

    /// A list that splits into chunks, shrinks back to one and splits again keeps each chunk's key (which a
    /// lone chunk does not keep) and answers every search as one sorted vector.
    #[test]
    fn a_block_list_keeps_its_chunk_keys_through_shrinking_and_growing() {
        let (mut list, mut plain) = (BlockList::default(), Vec::<Entry>::new());
        let check = |list: &BlockList, plain: &[Entry]| {
            assert!(list.iter().copied().eq(plain.iter().copied()));
            if list.chunks.len() > 1 {
                let keys = list
                    .chunks
                    .iter()
                    .map(|c| key(c[c.len() - 1].0, c[c.len() - 1].1));
                assert!(list.lasts.iter().copied().eq(keys));
            }
            for e in plain {
                assert_eq!(list.get(list.lower_bound(e.0, e.1)), Some(*e));
                assert_eq!(
                    list.get(list.lower_bound(e.0, e.1 + 1)),
                    plain.iter().find(|p| (p.0, p.1) > (e.0, e.1)).copied()
                );
            }
        };
        for round in 0..3u32 {
            // Grow past one chunk (sizes descending, so entries also land before the first chunk's end)...
            for i in 0..(CHUNK as u32 + 40) {
                let e = (
                    u64::from(200 - i % 50) * 512,
                    u64::from(i + round * 1000),
                    i,
                );
                list.insert(e);
                plain.insert(plain.partition_point(|p| *p < e), e);
                check(&list, &plain);
            }
            assert!(list.chunks.len() > 2, "{}", list.chunks.len());
            // ...then shrink to nothing: one (empty) chunk again.
            while !plain.is_empty() {
                let e = plain.remove((plain.len() * 7 / 11).min(plain.len() - 1));
                list.remove_block(e.0, e.1, e.2);
                check(&list, &plain);
            }
            assert_eq!(list.chunks.len(), 1);
        }
    }

    #[test]
    fn ids_without_a_block_and_zero_bytes_are_no_ops() {
        let mut a = default_allocator();
        a.free(7);
        a.malloc(3, 0).unwrap();
        a.free(3);
        assert_eq!(a.reserved_bytes(), 0);
        a.malloc(3, u64::MAX).unwrap_err();
        assert_eq!(a.reserved_bytes(), 0);
    }
}
