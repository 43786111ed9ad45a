//! The VMM's exit status, decided in one place so that a failed guest never
//! looks like a passed test (README: "Exit status").
//!
//! | status | meaning |
//! |---|---|
//! | 0 | the guest rebooted cleanly, halted or powered off (its kernel said so), or wrote 0 to the debug-exit port |
//! | 1 | VMM error (one `error:` line on stderr) |
//! | 2 | usage error: a bad option (one `error:` line) |
//! | 75 | a thread made a system call its seccomp filter forbids (`--seccomp on`, the default; one `error: seccomp:` line) |
//! | 76 | the stall watchdog stopped the VMM |
//! | 77 | triple fault: KVM's shutdown exit (a guest crash, or `reboot=t`) |
//! | 78 | guest kernel panic |
//! | 79 | every vCPU halted with interrupts off and nothing can wake it, without the kernel saying it halts |
//! | 129, 130, 143 | stopped by SIGHUP, SIGINT, SIGTERM (128 + signal number) |
//! | other | the byte the guest wrote to the debug-exit port 0xf4 |
//!
//! A guest that stays in its panic (`panic=0`, the kernel's default: it
//! spins forever) is stopped with 78 once its console's `---[ end Kernel
//! panic` line is [`panic_grace`] old.
//!
//! How a panic is seen: Linux prints `Kernel panic - not syncing` on its
//! console (watched on COM1 by [`ConsoleWatch`]), and with the default
//! command line's `reboot=k,panic_warm` its panic reboot (`panic=-1`) writes
//! the BIOS warm-reboot flag 0x1234 to physical address 0x472 before it
//! pulses the reset line, where a clean reboot writes 0. A guest without a
//! power-off method (no ACPI here) turns `poweroff` into a halt; it prints
//! `reboot: System halted` (or `Power down`) first, which is what makes its
//! dead halt a clean stop.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::vcpu::StopReason;

pub const CLEAN: u8 = 0;
pub const VMM_ERROR: u8 = 1;
pub const USAGE_ERROR: u8 = 2;
pub const SECCOMP_VIOLATION: u8 = crate::seccomp::SECCOMP_EXIT;
pub const STALL_WATCHDOG: u8 = crate::watchdog::STALL_EXIT;
pub const TRIPLE_FAULT: u8 = 77;
pub const GUEST_PANIC: u8 = 78;
pub const HALTED_DEAD: u8 = 79;

/// The exit status for a stop by signal `sig`: 128 + its number, as a shell reports it.
pub fn for_signal(sig: i32) -> i32 {
    128 + sig
}

/// Guest physical address of the BIOS warm-reboot flag (BDA 0x40:0x72).
pub const WARM_REBOOT_FLAG_ADDR: u64 = 0x472;
/// What Linux writes there before a warm reboot (`reboot=...,panic_warm`
/// makes its panic reboots warm, clean ones stay cold and write 0).
pub const WARM_REBOOT_FLAG: u16 = 0x1234;

/// Kernel messages seen on the guest console.
#[derive(Debug, Default)]
pub struct ConsoleMarks {
    panic: AtomicBool,
    halt: AtomicBool,
    /// When the kernel printed the last line of its panic.
    panic_end: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How long a guest may stay in its panic after the last panic line before
/// the VMM stops it: its `panic=N` countdown (the last `panic=` on the
/// command line, as the kernel reads it) plus 5 s.
pub fn panic_grace(cmdline: &str) -> std::time::Duration {
    let n: i64 = cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("panic="))
        .filter_map(|v| v.parse().ok())
        .next_back()
        .unwrap_or(0);
    std::time::Duration::from_secs(n.clamp(0, 24 * 3600) as u64 + 5)
}

impl ConsoleMarks {
    /// Whether the guest finished printing a panic at least `grace` ago.
    pub fn stuck_in_panic(&self, grace: std::time::Duration) -> bool {
        self.panic_end
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() >= grace)
    }

    pub fn panicked(&self) -> bool {
        self.panic.load(Ordering::SeqCst)
    }

    pub fn said_halt(&self) -> bool {
        self.halt.load(Ordering::SeqCst)
    }
}

/// Longest line kept for matching (the markers are near a line's start,
/// after a timestamp at most).
const MAX_LINE: usize = 256;

/// Passes the guest's console output through, watching each line for the
/// kernel's panic and halt messages.
pub struct ConsoleWatch<W: Write> {
    inner: W,
    line: Vec<u8>,
    marks: Arc<ConsoleMarks>,
}

impl<W: Write> ConsoleWatch<W> {
    pub fn new(inner: W, marks: Arc<ConsoleMarks>) -> Self {
        Self {
            inner,
            line: Vec::with_capacity(MAX_LINE),
            marks,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        // Lines are matched when they end (the kernel ends each of these
        // messages with a newline): one pass per line, not per byte.
        for &b in bytes {
            if b == b'\n' || b == b'\r' {
                self.end_line();
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    fn check_line(&self) {
        let has = |needle: &[u8]| self.line.windows(needle.len()).any(|w| w == needle);
        if has(b"Kernel panic - not syncing") {
            self.marks.panic.store(true, Ordering::SeqCst);
        }
        if has(b"---[ end Kernel panic - not syncing") {
            let mut end = self
                .marks
                .panic_end
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            end.get_or_insert_with(std::time::Instant::now);
        }
        if has(b"reboot: System halted") || has(b"reboot: Power down") {
            self.marks.halt.store(true, Ordering::SeqCst);
        }
    }

    fn end_line(&mut self) {
        if !self.line.is_empty() {
            self.check_line();
            self.line.clear();
        }
    }
}

impl<W: Write> Write for ConsoleWatch<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The guest's bytes are watched even when writing them fails.
        let r = self.inner.write(buf);
        let seen = match &r {
            Ok(n) => &buf[..*n],
            Err(_) => buf,
        };
        self.scan(seen);
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The process exit status for how the VM stopped. `warm_flag` is the
/// guest's 16-bit word at [`WARM_REBOOT_FLAG_ADDR`] after it stopped.
pub fn decide(reason: Option<StopReason>, warm_flag: Option<u16>, console: &ConsoleMarks) -> i32 {
    let panic = console.panicked();
    match reason {
        Some(StopReason::Guest(code)) => code,
        Some(StopReason::Error) | None => i32::from(VMM_ERROR),
        Some(StopReason::Reset) => {
            if panic || warm_flag == Some(WARM_REBOOT_FLAG) {
                i32::from(GUEST_PANIC)
            } else {
                i32::from(CLEAN)
            }
        }
        Some(StopReason::GuestCrash) => i32::from(GUEST_PANIC),
        Some(StopReason::TripleFault) if panic => i32::from(GUEST_PANIC),
        Some(StopReason::TripleFault) => i32::from(TRIPLE_FAULT),
        Some(StopReason::HaltedDead) if panic => i32::from(GUEST_PANIC),
        Some(StopReason::HaltedDead) if console.said_halt() => i32::from(CLEAN),
        Some(StopReason::HaltedDead) => i32::from(HALTED_DEAD),
        Some(StopReason::Signal(sig)) => for_signal(sig),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(chunks: &[&[u8]]) -> Arc<ConsoleMarks> {
        let marks = Arc::new(ConsoleMarks::default());
        let mut w = ConsoleWatch::new(Vec::new(), marks.clone());
        for c in chunks {
            w.write_all(c).unwrap();
        }
        assert_eq!(w.inner, chunks.concat(), "output passes through unchanged");
        marks
    }

    #[test]
    fn console_watch_sees_panics_and_halts_split_anywhere() {
        let m = watch(&[
            b"[    1.2] Kernel pa",
            b"nic - not syncing: VFS: Unable to mount root\r\n",
        ]);
        assert!(m.panicked() && !m.said_halt());
        let m = watch(&[b"[   3.4] reboot: System halted\r\n"]);
        assert!(m.said_halt() && !m.panicked());
        let m = watch(&[b"reboot: System hal"]);
        assert!(!m.said_halt(), "matched once the line ends");
        let m = watch(&[b"reboot: Power ", b"down\n"]);
        assert!(m.said_halt());
        let m = watch(&[
            b"Kernel panic\n - not syncing\n",
            b"reboot: Restarting system\n",
        ]);
        assert!(
            !m.panicked() && !m.said_halt(),
            "split across lines does not count"
        );
    }

    #[test]
    fn a_guest_left_in_its_panic_is_noticed_after_its_countdown() {
        use std::time::Duration;
        assert_eq!(
            panic_grace("console=ttyS0 panic=-1"),
            Duration::from_secs(5)
        );
        assert_eq!(
            panic_grace("console=ttyS0"),
            Duration::from_secs(5),
            "default 0"
        );
        assert_eq!(
            panic_grace("panic=10 quiet panic=30"),
            Duration::from_secs(35)
        );
        assert_eq!(panic_grace("panic=x"), Duration::from_secs(5));
        let m = watch(&[b"Kernel panic - not syncing: boom\n"]);
        assert!(
            !m.stuck_in_panic(Duration::ZERO),
            "the panic is still printing"
        );
        let m = watch(&[
            b"Kernel panic - not syncing: boom\n---[ end Kernel panic - not syncing: boom ]---\n",
        ]);
        assert!(m.stuck_in_panic(Duration::ZERO));
        assert!(!m.stuck_in_panic(Duration::from_secs(60)));
    }

    #[test]
    fn every_way_of_stopping_has_its_status() {
        let quiet = ConsoleMarks::default();
        let panicked = watch(&[b"Kernel panic - not syncing: Attempted to kill init!\n"]);
        let halted = watch(&[b"reboot: System halted\n"]);
        let d = decide;
        // Clean reboot: cold flag (0), nothing on the console.
        assert_eq!(d(Some(StopReason::Reset), Some(0), &quiet), 0);
        assert_eq!(d(Some(StopReason::Reset), None, &quiet), 0);
        // Panic reboot: warm flag, or the console said so.
        assert_eq!(d(Some(StopReason::Reset), Some(0x1234), &quiet), 78);
        assert_eq!(d(Some(StopReason::Reset), Some(0), &panicked), 78);
        assert_eq!(d(Some(StopReason::GuestCrash), None, &quiet), 78);
        // Triple fault.
        assert_eq!(d(Some(StopReason::TripleFault), Some(0), &quiet), 77);
        assert_eq!(d(Some(StopReason::TripleFault), Some(0), &panicked), 78);
        // Dead halt; a halt the kernel announced (halt, poweroff) is clean.
        assert_eq!(d(Some(StopReason::HaltedDead), None, &quiet), 79);
        assert_eq!(d(Some(StopReason::HaltedDead), None, &halted), 0);
        assert_eq!(d(Some(StopReason::HaltedDead), None, &panicked), 78);
        // The guest's own byte, errors, signals.
        assert_eq!(d(Some(StopReason::Guest(3)), None, &quiet), 3);
        assert_eq!(d(Some(StopReason::Guest(0)), None, &panicked), 0);
        assert_eq!(d(Some(StopReason::Error), None, &quiet), 1);
        assert_eq!(d(None, None, &quiet), 1);
        assert_eq!(
            d(Some(StopReason::Signal(libc::SIGTERM)), None, &quiet),
            143
        );
        assert_eq!(d(Some(StopReason::Signal(libc::SIGINT)), None, &quiet), 130);
        assert_eq!(d(Some(StopReason::Signal(libc::SIGHUP)), None, &quiet), 129);
        // All distinct, none 0 or 1, none the watchdog's.
        let failures = [
            TRIPLE_FAULT,
            GUEST_PANIC,
            HALTED_DEAD,
            STALL_WATCHDOG,
            USAGE_ERROR,
        ];
        for (i, a) in failures.iter().enumerate() {
            assert!(*a > 1);
            assert!(!failures[i + 1..].contains(a));
        }
    }
}
