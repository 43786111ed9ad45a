//! `--balloon ...,auto=on`: the balloon as the first reclaim source. Off by
//! default. With a resident limit, a `balloon-policy` thread looks at the
//! pager once a second; while the pager is under pressure (faults waited
//! for a frame, or pages were written to swap, since the last look) it
//! raises the balloon target by [`STEP`], as long as the guest's last
//! statistics say it has that much free memory beyond [`GUEST_HEADROOM`]
//! and the target stays at or below `auto_max`; after [`CALM_TICKS`] looks
//! without pressure it lowers the target by a step, down to the configured
//! `size`. The guest answers in its own time: nothing in the pager waits for
//! it (a NOIO fault is served from the pager's own sources), the policy only
//! moves the target.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::virtio::balloon::BalloonHandle;

use crate::memory::PagerProbe;

/// How much one decision moves the target.
pub const STEP: u64 = 64 << 20;
/// Free guest memory the policy leaves the guest on top of a step.
pub const GUEST_HEADROOM: u64 = 64 << 20;
/// Looks without pressure before the target comes down a step.
pub const CALM_TICKS: u32 = 10;
/// Time between looks.
pub const TICK: Duration = Duration::from_secs(1);

/// What the policy looks at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observation {
    /// Pager counters (monotonic): faults that waited, pages written out.
    pub waits: u64,
    pub pages_out: u64,
    /// The guest's free memory from its last statistics.
    pub guest_free: Option<u64>,
    /// The balloon's target now.
    pub target: u64,
}

/// The decision logic, separate from the thread so that it can be tested.
#[derive(Debug)]
pub struct AutoPolicy {
    floor: u64,
    max: u64,
    last: Option<(u64, u64)>,
    calm: u32,
}

impl AutoPolicy {
    /// `floor`: the configured size; `max`: the most the policy inflates to.
    pub fn new(floor: u64, max: u64) -> Self {
        Self {
            floor,
            max: max.max(floor),
            last: None,
            calm: 0,
        }
    }

    /// The new target, if it should change.
    pub fn decide(&mut self, o: Observation) -> Option<u64> {
        // The first look only sets the baseline.
        let (w, p) = self.last.replace((o.waits, o.pages_out))?;
        let pressure = o.waits > w || o.pages_out > p;
        if pressure {
            self.calm = 0;
            let room = o.guest_free.is_some_and(|f| f >= STEP + GUEST_HEADROOM);
            let next = o.target.saturating_add(STEP).min(self.max);
            return (room && next > o.target).then_some(next);
        }
        self.calm = self.calm.saturating_add(1);
        if self.calm >= CALM_TICKS && o.target > self.floor {
            self.calm = 0;
            return Some(o.target.saturating_sub(STEP).max(self.floor));
        }
        None
    }
}

/// The running policy thread.
pub struct PolicyThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PolicyThread {
    pub fn start(
        mut policy: AutoPolicy,
        handle: BalloonHandle,
        pager: PagerProbe,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("balloon-policy".into())
            .spawn(move || {
                crate::seccomp::apply(crate::seccomp::ThreadKind::Helper);
                while !flag.load(Ordering::Acquire) {
                    std::thread::sleep(TICK);
                    let stats = pager.stats();
                    let info = handle.info();
                    let o = Observation {
                        waits: stats.counters.waits,
                        pages_out: stats.counters.pages_out,
                        guest_free: info.guest_stats.and_then(|s| s.free_memory),
                        target: info.size_bytes,
                    };
                    if let Some(t) = policy.decide(o) {
                        match handle.set_size(t) {
                            Ok(t) => log::info!(
                                "balloon policy: target {} -> {} MiB",
                                o.target >> 20,
                                t >> 20
                            ),
                            Err(e) => log::warn!("balloon policy: {e}"),
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (at most one tick).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PolicyThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn obs(waits: u64, pages_out: u64, free_mib: Option<u64>, target_mib: u64) -> Observation {
        Observation {
            waits,
            pages_out,
            guest_free: free_mib.map(|f| f * MIB),
            target: target_mib * MIB,
        }
    }

    #[test]
    fn inflates_under_pressure_within_the_guests_free_memory_and_max() {
        let mut p = AutoPolicy::new(0, 200 * MIB);
        // The first look only sets the baseline.
        assert_eq!(p.decide(obs(5, 100, Some(500), 0)), None);
        // Pressure: waits went up.
        assert_eq!(p.decide(obs(6, 100, Some(500), 0)), Some(64 * MIB));
        // Pressure: pages written out.
        assert_eq!(p.decide(obs(6, 200, Some(500), 64)), Some(128 * MIB));
        // Capped at max.
        assert_eq!(p.decide(obs(7, 200, Some(500), 128)), Some(192 * MIB));
        assert_eq!(p.decide(obs(8, 200, Some(500), 192)), Some(200 * MIB));
        assert_eq!(p.decide(obs(9, 200, Some(500), 200)), None);
        // The guest has too little free memory, or sent no statistics.
        let mut p = AutoPolicy::new(0, 1024 * MIB);
        p.decide(obs(0, 0, None, 0));
        assert_eq!(p.decide(obs(1, 0, Some(127), 0)), None);
        assert_eq!(p.decide(obs(2, 0, None, 0)), None);
        assert_eq!(p.decide(obs(3, 0, Some(128), 0)), Some(64 * MIB));
    }

    #[test]
    fn deflates_to_the_floor_after_calm() {
        let mut p = AutoPolicy::new(32 * MIB, 512 * MIB);
        p.decide(obs(0, 0, Some(500), 160));
        for _ in 0..CALM_TICKS - 1 {
            assert_eq!(p.decide(obs(0, 0, Some(500), 160)), None);
        }
        assert_eq!(p.decide(obs(0, 0, Some(500), 160)), Some(96 * MIB));
        for _ in 0..CALM_TICKS - 1 {
            assert_eq!(p.decide(obs(0, 0, Some(500), 96)), None);
        }
        assert_eq!(
            p.decide(obs(0, 0, Some(500), 96)),
            Some(32 * MIB),
            "not below the floor"
        );
        for _ in 0..2 * CALM_TICKS {
            assert_eq!(p.decide(obs(0, 0, Some(500), 32)), None);
        }
        // Pressure resets the calm count.
        for _ in 0..CALM_TICKS - 1 {
            p.decide(obs(0, 0, Some(0), 96));
        }
        assert_eq!(p.decide(obs(1, 0, Some(0), 96)), None, "pressure, no room");
        assert_eq!(
            p.decide(obs(1, 0, Some(0), 96)),
            None,
            "calm count restarted"
        );
    }
}
