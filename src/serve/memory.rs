//! The engine's resident memory against `memory.budget_mb`.
//!
//! What the engine holds is bounded by counts that follow from the events
//! (event time and order), never from a reading of memory, so that a
//! restarted engine converges to the same state:
//! `users.max_users` and `users.ttl_secs`, `graph.max_placeholders` and
//! `graph.placeholder_ttl_secs`, and the catalogue itself. What is in
//! flight is not: in a burst, batches of up to `ingest.max_batch` messages
//! queue in front of each stage and their outputs in front of Redis, and the
//! allocator keeps what they freed. The budget bounds that part.
//!
//! With a budget, ingest keeps at most [`allowance`] messages in flight:
//! what the room below the pressure threshold holds at 8 KB a message. A [`Governor`] reads
//! the resident set every `memory.check_ms`. Above 80%
//! of the budget it raises the pressure flag, which ingest honours
//! ([`crate::ingest::stage::Ingest::with_pressure`]): it sends smaller
//! batches and reads nothing more until what is in flight is published, so a
//! burst waits in Kafka, not in memory. Under pressure and when it ends,
//! freed heap memory is handed back to the operating system
//! (`malloc_trim`); so is any free heap memory over 64 MiB, budget or not,
//! so the resident set comes back down after a burst. Below
//! 70% the flag drops. The reading, the budget and the time under pressure
//! are exported (`thaw_memory_*`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::config::MemorySettings;
use super::metrics::Metrics;

/// Above this share of the budget, pressure starts.
const HIGH: f64 = 0.8;
/// Below this share, it ends.
const LOW: f64 = 0.7;

/// The resident set of this process, bytes (`VmRSS`), where `/proc` has it.
pub fn resident_bytes() -> Option<u64> {
    resident_bytes_of("self")
}

/// The resident set of process `pid` (a number, or `self`), bytes.
pub fn resident_bytes_of(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Hands freed heap memory back to the operating system; false where the
/// allocator has no such call (glibc's `malloc_trim` only).
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only walks glibc's own arenas, under their
        // locks; it is safe to call from any thread at any time.
        unsafe { malloc_trim(0) };
        true
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// With a budget: glibc's allocator tuned to hand memory back as it goes,
/// not in bulk later. Blocks of 256 KiB and more (batches, their outputs,
/// pipelines) are mapped on their own and unmapped when freed (glibc would
/// otherwise raise that threshold to 32 MiB as large blocks come and go, and
/// keep them in its heaps); the top of a heap is returned once 8 MiB are
/// free there; and four arenas at most, so that freed memory is reused
/// across threads rather than kept in each thread's own. False where the
/// allocator is not glibc's.
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::raw::c_int;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_THRESHOLD: c_int = -3;
        const M_ARENA_MAX: c_int = -8;
        // SAFETY: mallopt sets allocator parameters under glibc's own lock;
        // these values are within its documented ranges.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 10) == 1
                && mallopt(M_TRIM_THRESHOLD, 8 << 20) == 1
                && mallopt(M_ARENA_MAX, 4) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// What a message in flight is reckoned to cost: its decoded event, its
/// share of the batch's work in the core (a new user's adaptation and list)
/// and of the publish. Measured here, a batch of 20,000 interactions from
/// 18,500 new users took 70–100 MB while it was processed (3.5–5 KB a
/// message); this leaves a factor of about two.
pub const IN_FLIGHT_MESSAGE_BYTES: u64 = 8192;

/// What a kept user costs, about: the id, the item lists, the last
/// published list and the map entry (`users.max_users`' default of 1M is
/// about 1 GB).
pub const USER_BYTES: u64 = 1024;

/// At start, with a budget: whether the state's bounds fit it beside what
/// is resident now (the model and the restored state). Each item slot
/// costs `slot_bytes`; placeholders count at `graph.max_placeholders` and
/// users at `users.max_users`. Logs the estimate (a warning when it is over
/// the budget: the catalogue's own growth is not bounded by anything but
/// the catalogue) and returns it, bytes.
pub fn check_budget(s: &super::config::Settings, slot_bytes: u64) -> Option<u64> {
    let budget = s.memory.budget_mb.saturating_mul(1 << 20);
    if budget == 0 {
        return None;
    }
    let rss = resident_bytes()?;
    let users = (s.users.max_users as u64).saturating_mul(USER_BYTES);
    let placeholders = (s.graph.max_placeholders as u64).saturating_mul(slot_bytes);
    let need = rss.saturating_add(users).saturating_add(placeholders);
    let mb = |b: u64| b >> 20;
    if need > budget {
        tracing::warn!(
            resident_mb = mb(rss),
            users_mb = mb(users),
            placeholders_mb = mb(placeholders),
            budget_mb = mb(budget),
            "the state's bounds do not fit memory.budget_mb: lower users.max_users or graph.max_placeholders, or raise the budget"
        );
    } else {
        tracing::info!(
            resident_mb = mb(rss),
            users_mb = mb(users),
            placeholders_mb = mb(placeholders),
            budget_mb = mb(budget),
            "memory budget"
        );
    }
    Some(need)
}

/// Free memory the allocator holds in its heaps, bytes (glibc's
/// `mallinfo2().fordblks`), where it says.
pub fn free_heap_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        #[repr(C)]
        struct MallInfo2 {
            arena: usize,
            ordblks: usize,
            smblks: usize,
            hblks: usize,
            hblkhd: usize,
            usmblks: usize,
            fsmblks: usize,
            uordblks: usize,
            fordblks: usize,
            keepcost: usize,
        }
        extern "C" {
            fn mallinfo2() -> MallInfo2;
        }
        // SAFETY: mallinfo2 (glibc 2.33+) only reads the arenas' statistics
        // under their locks and returns them by value.
        let info = unsafe { mallinfo2() };
        Some(info.fordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Free heap memory above which it is handed back, budget or not: after a
/// burst the allocator would otherwise keep it for good.
const TRIM_FREE_BYTES: u64 = 64 << 20;

/// Whether the engine is over its memory threshold: shared with ingest.
#[derive(Debug, Default)]
pub struct Pressure {
    on: AtomicBool,
    /// Messages allowed in flight (0: no budget, no limit).
    allowance: std::sync::atomic::AtomicU64,
}

impl Pressure {
    /// Under pressure now.
    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    fn set(&self, on: bool) {
        self.on.store(on, Ordering::Relaxed);
    }

    /// The most messages in flight now ([`allowance`]); `None` without a
    /// budget.
    pub fn allowance(&self) -> Option<u64> {
        match self.allowance.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    fn set_allowance(&self, n: u64) {
        self.allowance.store(n, Ordering::Relaxed);
    }
}

/// The most messages in flight, given `in_flight` of them now with `rss`
/// resident against `budget`: those, plus what the room left below the
/// pressure threshold holds at [`IN_FLIGHT_MESSAGE_BYTES`] each; at least
/// 1,000. A budget with room to spare lets a burst through at full speed
/// (the core then coalesces what queues up); a tight one lets in what fits.
pub fn allowance(budget: u64, rss: u64, in_flight: u64) -> u64 {
    let high = (budget as f64 * HIGH) as u64;
    (in_flight + high.saturating_sub(rss) / IN_FLIGHT_MESSAGE_BYTES).max(1000)
}

/// Reads the resident set against the budget and raises [`Pressure`].
pub struct Governor {
    budget: u64,
    every: Duration,
    pressure: Arc<Pressure>,
    metrics: Arc<Metrics>,
    /// Messages read and published (what is in flight).
    progress: Arc<super::Progress>,
}

impl Governor {
    /// The governor of `s` (budget 0: it only exports the reading).
    pub fn build(
        s: &MemorySettings,
        metrics: Arc<Metrics>,
        progress: Arc<super::Progress>,
    ) -> Self {
        let budget = s.budget_mb.saturating_mul(1 << 20);
        let pressure = Arc::new(Pressure::default());
        if budget > 0 {
            // Until the first reading: a tenth of the budget's worth.
            pressure.set_allowance((budget / 10 / IN_FLIGHT_MESSAGE_BYTES).max(1000));
        }
        Self {
            budget,
            every: Duration::from_millis(s.check_ms.max(10)),
            pressure,
            metrics,
            progress,
        }
    }

    /// The flag ingest watches.
    pub fn pressure(&self) -> Arc<Pressure> {
        self.pressure.clone()
    }

    /// The budget, bytes (0: none).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Whether the pressure flag should be on after reading `rss`, given
    /// that it is `on` now (on above [`HIGH`], off below [`LOW`]).
    fn next(&self, on: bool, rss: u64) -> bool {
        if self.budget == 0 {
            return false;
        }
        let share = rss as f64 / self.budget as f64;
        if on {
            share >= LOW
        } else {
            share > HIGH
        }
    }

    /// Reads every `memory.check_ms` until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(self.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        let mut last_trim: Option<Instant> = None;
        let mut last_heap = Instant::now();
        let mut since: Option<Instant> = None;
        let mut warned = false;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tick.tick() => {}
            }
            if *stop.borrow() {
                return;
            }
            let Some(rss) = resident_bytes() else {
                continue;
            };
            self.metrics.set_memory(rss, self.budget);
            if self.budget > 0 {
                let received = self.progress.received.load(Ordering::Relaxed);
                let published = self.progress.messages.load(Ordering::Relaxed);
                self.pressure.set_allowance(allowance(
                    self.budget,
                    rss,
                    received.saturating_sub(published),
                ));
            }
            let was = self.pressure.on();
            let on = self.next(was, rss);
            let dt = last.elapsed().as_secs_f64();
            last = Instant::now();
            self.metrics.memory_pressure(on, if was { dt } else { 0.0 });
            if on != was {
                self.pressure.set(on);
                if on {
                    tracing::warn!(
                        resident_mb = rss >> 20,
                        budget_mb = self.budget >> 20,
                        "memory pressure: ingest waits for what is in flight"
                    );
                } else {
                    tracing::info!(resident_mb = rss >> 20, "memory pressure over");
                }
            }
            // Under pressure at most once a second (a trim walks every arena
            // under its lock), and once as it ends: what the burst's batches
            // freed goes back to the system.
            let due = last_trim.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
            // The heap's free memory is read at most once a second (it walks
            // the free lists).
            let idle_heap = due && last_heap.elapsed() >= Duration::from_secs(1) && {
                last_heap = Instant::now();
                free_heap_bytes().is_some_and(|f| f > TRIM_FREE_BYTES)
            };
            if ((on && due) || (was && !on) || idle_heap)
                && tokio::task::spawn_blocking(trim).await.unwrap_or(false)
            {
                last_trim = Some(Instant::now());
                self.metrics.memory_trim();
            }
            // Pressure that does not end is a budget too small for the
            // state, not a burst: ingest stays throttled. Said once.
            since = if on {
                since.or(Some(Instant::now()))
            } else {
                None
            };
            if since.is_some_and(|t| t.elapsed() > Duration::from_secs(120)) && !warned {
                warned = true;
                tracing::warn!(
                    resident_mb = rss >> 20,
                    budget_mb = self.budget >> 20,
                    "under memory pressure for 2 minutes: the state itself is near the budget; raise memory.budget_mb or lower users.max_users"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn governor(budget_mb: u64) -> Governor {
        Governor::build(
            &MemorySettings {
                budget_mb,
                check_ms: 100,
            },
            Arc::new(Metrics::new()),
            Default::default(),
        )
    }

    #[test]
    fn pressure_has_hysteresis() {
        let g = governor(100);
        let mb = |m: u64| m << 20;
        assert!(!g.next(false, mb(80)), "at 80% not yet");
        assert!(g.next(false, mb(81)));
        assert!(g.next(true, mb(75)), "stays on down to 70%");
        assert!(!g.next(true, mb(69)));
        let none = governor(0);
        assert!(!none.next(false, u64::MAX), "no budget, no pressure");
        assert_eq!(none.pressure().allowance(), None);
        assert_eq!(
            g.pressure().allowance(),
            Some(1280),
            "a tenth of 100 MiB in 8 KiB"
        );
        // 80 MiB threshold, 60 resident, 500 in flight: 20 MiB more.
        assert_eq!(allowance(mb(100), mb(60), 500), 500 + 2560);
        assert_eq!(allowance(mb(100), mb(90), 0), 1000, "over: the floor");
    }

    #[test]
    fn trimming_hands_back_what_fragmentation_keeps() {
        let before = resident_bytes().expect("/proc/self/status has VmRSS");
        // 200 MB in small blocks (the heap, not mmap), then all but one in
        // 64 freed: the free pages sit between live blocks, where the
        // allocator keeps them until trimmed.
        let mut blocks: Vec<Box<[u8; 512]>> =
            (0..400_000).map(|i| Box::new([i as u8; 512])).collect();
        let full = resident_bytes().unwrap();
        // Other tests of this binary run beside it and free memory too, so
        // only most of the 205 MB is asked to show (147 MiB was seen).
        assert!(full >= before + (100 << 20), "{before} → {full}");
        let mut k = 0;
        blocks.retain(|_| {
            k += 1;
            k % 64 == 0
        });
        std::hint::black_box(&blocks);
        let freed = resident_bytes().unwrap();
        if trim() {
            let after = resident_bytes().unwrap();
            assert!(
                after + (100 << 20) < freed,
                "{freed} → {after} bytes: the trim handed nothing back"
            );
        }
        drop(blocks);
    }
}
