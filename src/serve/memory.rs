//! The engine's resident memory against `memory.budget_mb`.
//!
//! What the engine holds is bounded by counts that are a function of the
//! log, so that a restarted engine converges to the same state:
//! `users.max_users` and `users.ttl_secs`, `graph.max_placeholders` and
//! `graph.placeholder_ttl_secs`, and the catalogue itself. What is in
//! flight is not: in a burst, batches of up to `ingest.max_batch` messages
//! queue in front of each stage and their outputs in front of Redis, and the
//! allocator keeps what they freed. The budget bounds that part.
//!
//! With a budget, ingest keeps at most [`in_flight_cap`] messages in flight
//! (a tenth of the budget's worth), batches included. A [`Governor`] reads
//! the resident set every `memory.check_ms`. Above 80%
//! of the budget it raises the pressure flag, which ingest honours
//! ([`crate::ingest::stage::Ingest::with_pressure`]): it sends smaller
//! batches and reads nothing more until what is in flight is published, so a
//! burst waits in Kafka, not in memory. Under pressure and when it ends,
//! freed heap memory is handed back to the operating system
//! (`malloc_trim`), so the resident set comes back down after a burst. Below
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
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
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

/// What a message in flight costs at most, about: its decoded event, its
/// share of the batch's work in the core (a new user's adaptation and list)
/// and of the publish (measured here: a batch of 20,000 interactions from
/// 18,500 new users took 70–100 MB while it was processed).
pub const IN_FLIGHT_MESSAGE_BYTES: u64 = 4096;

/// With a budget of `budget` bytes, the most messages in flight (read by
/// ingest, not yet published): a tenth of the budget at
/// [`IN_FLIGHT_MESSAGE_BYTES`] each, at least 1,000.
pub fn in_flight_cap(budget: u64) -> u64 {
    (budget / 10 / IN_FLIGHT_MESSAGE_BYTES).max(1000)
}

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

/// Whether the engine is over its memory threshold: shared with ingest.
#[derive(Debug, Default)]
pub struct Pressure(AtomicBool);

impl Pressure {
    /// Under pressure now.
    pub fn on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

/// Reads the resident set against the budget and raises [`Pressure`].
pub struct Governor {
    budget: u64,
    every: Duration,
    pressure: Arc<Pressure>,
    metrics: Arc<Metrics>,
}

impl Governor {
    /// The governor of `s` (budget 0: it only exports the reading). With a
    /// budget the allocator is tuned ([`tune_allocator`]).
    pub fn build(s: &MemorySettings, metrics: Arc<Metrics>) -> Self {
        if s.budget_mb > 0 && !tune_allocator() {
            tracing::info!("memory budget: the allocator is not glibc's, left as it is");
        }
        Self {
            budget: s.budget_mb.saturating_mul(1 << 20),
            every: Duration::from_millis(s.check_ms.max(10)),
            pressure: Arc::new(Pressure::default()),
            metrics,
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
            // At each reading under pressure, and once as it ends: what the
            // burst's batches freed goes back to the system.
            if (on || was) && tokio::task::spawn_blocking(trim).await.unwrap_or(false) {
                self.metrics.memory_trim();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_has_hysteresis() {
        let g = Governor::build(
            &MemorySettings {
                budget_mb: 100,
                check_ms: 100,
            },
            Arc::new(Metrics::new()),
        );
        let mb = |m: u64| m << 20;
        assert!(!g.next(false, mb(80)), "at 80% not yet");
        assert!(g.next(false, mb(81)));
        assert!(g.next(true, mb(75)), "stays on down to 70%");
        assert!(!g.next(true, mb(69)));
        let none = Governor::build(
            &MemorySettings {
                budget_mb: 0,
                check_ms: 100,
            },
            Arc::new(Metrics::new()),
        );
        assert!(!none.next(false, u64::MAX), "no budget, no pressure");
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
        assert!(full >= before + (150 << 20), "{before} → {full}");
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
