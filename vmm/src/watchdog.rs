//! The stall watchdog: names a resume/reset path (or any thread blocked on a
//! guest-memory fault) that has waited longer than a bound, with the chain
//! of waits behind it, and stops the VMM with [`STALL_EXIT`].
//!
//! What it reads, all without taking a device's lock (the stalled thread may
//! hold it): the NOIO paths in progress (`devices::noio::active_paths`), the
//! faults the pager's workers have not resolved ([`PagerProbe`]), and every
//! volume's state, waiters and owner (`devices::block::all_volumes`).
//!
//! With NOIO on, no test may ever see it fire; with `--unsafe-disable-noio`
//! it is how the deadlock NOIO prevents becomes visible.

use std::fmt::Write as _;
use std::time::Duration;

use devices::block::{all_volumes, VolumeInfo};
use devices::noio::{active_paths, unsafe_disabled, ActivePath};

use crate::memory::{BlockedFault, PagerProbe};

/// Exit status of a VMM stopped by the watchdog (see the README's table).
pub const STALL_EXIT: u8 = 76;
/// How often the watchdog looks.
const TICK: Duration = Duration::from_millis(250);

/// Starts the watchdog thread: stalls longer than `bound` end the process.
pub fn start(bound: Duration, pager: Option<PagerProbe>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("stall-watchdog".into())
        .spawn(move || {
            crate::seccomp::apply(crate::seccomp::ThreadKind::Helper);
            loop {
                std::thread::sleep(TICK);
                let faults = pager
                    .as_ref()
                    .map(PagerProbe::blocked_faults)
                    .unwrap_or_default();
                let swap = pager.as_ref().map(PagerProbe::swap_volume);
                let volumes = all_volumes_info();
                if let Some(report) =
                    check(bound, &active_paths(), &faults, &volumes, swap.as_deref())
                {
                    eprintln!("{report}");
                    if let Some(p) = &pager {
                        eprintln!("pager-stats {}", p.stats().to_json());
                    }
                    // The stalled thread cannot be joined: leave at once
                    // (terminal restored, API socket removed).
                    crate::signals::forced_exit(i32::from(STALL_EXIT));
                }
            }
        })
        .map(drop)
}

fn all_volumes_info() -> Vec<VolumeInfo> {
    all_volumes().iter().map(|v| v.info()).collect()
}

/// The report, if a path or a fault has waited longer than `bound`.
pub fn check(
    bound: Duration,
    paths: &[ActivePath],
    faults: &[BlockedFault],
    volumes: &[VolumeInfo],
    swap_volume: Option<&str>,
) -> Option<String> {
    let stalled_paths: Vec<&ActivePath> =
        paths.iter().filter(|p| p.since.elapsed() > bound).collect();
    let stalled_faults: Vec<&BlockedFault> = faults.iter().filter(|f| f.waited > bound).collect();
    if stalled_paths.is_empty() && stalled_faults.is_empty() {
        return None;
    }
    let mut r = format!(
        "STALL-WATCHDOG: a thread has waited longer than {:.1} s; the wait cycle:",
        bound.as_secs_f64()
    );
    let mut named = Vec::new();
    for p in &stalled_paths {
        let _ = write!(
            r,
            "\n  thread {} (tid {}) in a resume/reset path: {} -- for {:.1} s",
            p.thread,
            p.tid,
            p.what,
            p.since.elapsed().as_secs_f64()
        );
        match faults.iter().find(|f| f.tid == p.tid) {
            Some(f) => {
                describe_fault(&mut r, f, swap_volume, volumes);
                named.push(f.tid);
            }
            None => r.push_str("\n    -> not blocked on guest memory (busy or waiting elsewhere)"),
        }
    }
    for f in stalled_faults.iter().filter(|f| !named.contains(&f.tid)) {
        let _ = write!(
            r,
            "\n  thread {} (tid {}) blocked on guest memory",
            thread_name(f.tid),
            f.tid
        );
        describe_fault(&mut r, f, swap_volume, volumes);
    }
    if unsafe_disabled() {
        r.push_str(
            "\n  NOIO is disabled (--unsafe-disable-noio): this is the deadlock NOIO prevents.",
        );
    } else {
        r.push_str("\n  NOIO is on: this stall is a bug (a path that waits outside NOIO).");
    }
    let _ = write!(r, "\n  stopping the VMM with exit status {STALL_EXIT}");
    Some(r)
}

/// `-> waits on page ... -> volume ... -> owner` lines for `f`.
fn describe_fault(r: &mut String, f: &BlockedFault, swap: Option<&str>, volumes: &[VolumeInfo]) {
    let _ = write!(
        r,
        "\n    -> waits on guest page {:#x}: {} ({:.1} s)",
        f.gpa,
        f.waiting_for,
        f.waited.as_secs_f64()
    );
    let Some(v) = swap.and_then(|name| volumes.iter().find(|v| v.name == name)) else {
        return;
    };
    if v.quiesced {
        let _ = write!(
            r,
            "\n    -> swap I/O goes through volume '{}', quiesced for {:.1} s",
            v.name,
            v.quiesced_for_ms as f64 / 1000.0
        );
        for w in &v.waiters {
            let _ = write!(
                r,
                "\n       ({} has waited {:.1} s for it to flow)",
                w.thread,
                w.waited_ms as f64 / 1000.0
            );
        }
        let owner = v.owner.as_deref().unwrap_or("no device");
        let _ = write!(
            r,
            "\n    -> volume '{}' belongs to {owner}, which is suspended (or being reset) and resumes only when the path above finishes",
            v.name
        );
    } else {
        let _ = write!(
            r,
            "\n    -> swap volume '{}' flows ({} I/O in flight)",
            v.name, v.in_flight
        );
    }
}

fn thread_name(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
        .or_else(|_| std::fs::read_to_string(format!("/proc/{tid}/comm")))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn volume(quiesced: bool) -> VolumeInfo {
        VolumeInfo {
            name: "pm".into(),
            quiesced,
            in_flight: 0,
            quiesces: 1,
            resumes: 0,
            quiesced_ms: 9000,
            quiesced_for_ms: 9000,
            owner: Some("USB disk 'pm' on port 5".into()),
            wake_requests: 1,
            waiters: vec![devices::block::VolumeWaiter {
                thread: "pager-swapin".into(),
                waited_ms: 8000,
            }],
        }
    }

    #[test]
    fn quiet_when_nothing_waits_past_the_bound() {
        let path = ActivePath {
            tid: 7,
            thread: "vcpu0".into(),
            what: "xhci port 5 resume from U3".into(),
            since: Instant::now(),
        };
        let fault = BlockedFault {
            tid: 7,
            gpa: 0x1000,
            waited: Duration::from_millis(10),
            waiting_for: "its swap-in read",
        };
        assert!(check(
            Duration::from_secs(5),
            &[path],
            &[fault],
            &[volume(true)],
            None
        )
        .is_none());
    }

    #[test]
    fn names_the_path_the_page_and_what_it_waits_for() {
        let path = ActivePath {
            tid: 7,
            thread: "vcpu0".into(),
            what: "xhci port 5 resume from U3".into(),
            since: Instant::now() - Duration::from_secs(9),
        };
        let fault = BlockedFault {
            tid: 7,
            gpa: 0x7a3f000,
            waited: Duration::from_secs(8),
            waiting_for: "its swap-in read",
        };
        let r = check(
            Duration::from_secs(5),
            &[path],
            &[fault],
            &[volume(true)],
            Some("pm"),
        )
        .unwrap();
        assert!(r.contains("vcpu0 (tid 7)"), "{r}");
        assert!(r.contains("volume 'pm', quiesced for 9.0 s"), "{r}");
        assert!(r.contains("pager-swapin has waited 8.0 s"), "{r}");
        assert!(r.contains("belongs to USB disk 'pm' on port 5"), "{r}");
        assert!(r.contains("xhci port 5 resume from U3"), "{r}");
        assert!(r.contains("0x7a3f000: its swap-in read"), "{r}");
        assert!(r.contains("exit status 76"), "{r}");
        // A blocked fault alone (no path) is reported too.
        let fault = BlockedFault {
            tid: 9,
            gpa: 0x2000,
            waited: Duration::from_secs(6),
            waiting_for: "a free frame (reclaim and writeback)",
        };
        let r = check(Duration::from_secs(5), &[], &[fault], &[], None).unwrap();
        assert!(r.contains("tid 9") && r.contains("0x2000"), "{r}");
    }
}
