//! The L1 QEMU's human monitor (HMP) on a Unix socket: what the harness
//! asks when L1 has gone silent, to tell a guest that is busy from an L1
//! whose timer has died. Seen on this QEMU 7.2 TCG L1, a few times in
//! dozens of long runs (more often while the host was busy compiling):
//! L1's one-shot LAPIC timer has run out, its vector waits in IRR and is
//! never taken, and the vCPU stays at one instruction, halted or spinning
//! at full speed; no timer is armed again, nothing is preempted, and every
//! layer inside falls silent until the run's timeout. Halted at L1's own
//! `sti; hlt`, a key press on its keyboard has woken it (seen live), but
//! not every time (once L1 left the halt with the vector still pending);
//! spinning in L2 on a lock the other L2 vCPU holds, it does not wake.
//! QEMU 10.0.2 did the same once in CI. The harness now gives L1 a
//! periodic tick (`harness::L1Tick`), which raises the vector again every
//! 4 ms; the looks below recognise a stalled periodic timer too.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The prompt HMP prints after each command's output.
const PROMPT: &str = "(qemu) ";
/// Bound on one command's round trip.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh socket path for one QEMU run (unique in this process).
pub fn socket_path() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vmm-l1-{}-{}.hmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// QEMU arguments serving HMP on `path` (without waiting for a client).
pub fn qemu_args(path: &Path) -> Vec<String> {
    vec![
        "-monitor".into(),
        format!("unix:{},server=on,wait=off", path.display()),
    ]
}

/// Runs HMP `commands` on the monitor at `path`; the output of each.
pub fn query(path: &Path, commands: &[&str]) -> std::io::Result<Vec<String>> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    read_to_prompt(&mut s)?; // the banner
    commands
        .iter()
        .map(|c| {
            s.write_all(format!("{c}\n").as_bytes())?;
            Ok(strip_echo(&read_to_prompt(&mut s)?))
        })
        .collect()
}

fn read_to_prompt(s: &mut UnixStream) -> std::io::Result<String> {
    let end = Instant::now() + REPLY_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    while !buf.ends_with(PROMPT.as_bytes()) {
        if Instant::now() >= end {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        match s.read(&mut chunk)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// HMP echoes the command line with terminal redraws before the output:
/// the output starts after the first CRLF and ends before the prompt.
fn strip_echo(reply: &str) -> String {
    let body = reply.split_once("\r\n").map_or("", |(_, b)| b);
    body.trim_end_matches(PROMPT).replace('\r', "")
}

/// RFLAGS' interrupt-enable bit.
const RFLAGS_IF: u64 = 1 << 9;

/// What L1's vCPU is doing, from `info registers` and `info lapic`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L1State {
    pub rip: String,
    /// Halted (HLT=1): waiting for an interrupt.
    pub halted: bool,
    /// RFLAGS.IF: whether L1 accepts interrupts at that instruction (a
    /// pending timer vector with IF=1 was not masked by L1 but not taken).
    pub interrupts_enabled: Option<bool>,
    /// The LAPIC timer is L1's clock event: one-shot and not masked (a
    /// TSC-deadline or masked timer says nothing through its count).
    pub timer_one_shot: bool,
    /// The LAPIC timer ticks periodically and is not masked.
    pub timer_periodic: bool,
    /// The LAPIC timer's vector (`(vec N)` on the LVTT line).
    pub timer_vector: Option<u8>,
    /// The LAPIC timer's current count; 0 when it is not running.
    pub timer_count: Option<u64>,
    pub isr: String,
    pub irr: String,
    /// The processor priority (`PPR 0x..`): a vector is taken only when its
    /// priority class is above this one's.
    pub ppr: Option<u8>,
}

impl L1State {
    pub fn parse(registers: &str, lapic: &str) -> Self {
        let word_after = |text: &str, key: &str| {
            let at = text.find(key)? + key.len();
            text[at..].split_whitespace().next().map(str::to_string)
        };
        // The rest of the line whose first word is `key` (LVTT, not LVTTHMR).
        let line_after = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| {
                    let rest = l.trim_start().strip_prefix(key)?;
                    rest.starts_with(char::is_whitespace)
                        .then(|| rest.trim().to_string())
                })
                .unwrap_or_default()
        };
        let lvtt = line_after(lapic, "LVTT");
        L1State {
            rip: word_after(registers, "RIP=").unwrap_or_default(),
            halted: word_after(registers, "HLT=").as_deref() == Some("1"),
            interrupts_enabled: word_after(registers, "RFL=")
                .and_then(|f| u64::from_str_radix(&f, 16).ok())
                .map(|f| f & RFLAGS_IF != 0),
            timer_one_shot: lvtt.contains("one-shot") && !lvtt.contains("masked"),
            timer_periodic: lvtt.contains("periodic") && !lvtt.contains("masked"),
            timer_vector: lvtt
                .split_once("(vec ")
                .and_then(|(_, v)| v.trim_end_matches(')').trim().parse().ok()),
            timer_count: word_after(lapic, "current_count = ").and_then(|c| c.parse().ok()),
            isr: line_after(lapic, "ISR"),
            irr: line_after(lapic, "IRR"),
            ppr: word_after(lapic, "PPR 0x").and_then(|p| u8::from_str_radix(&p, 16).ok()),
        }
    }

    /// L1's one-shot clock event is not running: no tick, no timer will
    /// fire again (a healthy L1 re-arms it within microseconds).
    pub fn timer_dead(&self) -> bool {
        self.timer_one_shot && self.timer_count == Some(0)
    }

    /// The timer's vector waits in IRR, not taken.
    pub fn timer_pending(&self) -> bool {
        self.timer_vector
            .is_some_and(|v| self.irr.split_whitespace().any(|w| w == v.to_string()))
    }

    /// L1's clock is not getting through: a one-shot timer that is dead, or
    /// a periodic one whose vector waits in IRR (a healthy L1 takes it
    /// within microseconds of each tick).
    pub fn timer_stalled(&self) -> bool {
        self.timer_dead() || (self.timer_periodic && self.timer_pending())
    }

    /// The timer's vector waits although nothing on the CPU may hold it
    /// off: IF=1 and its priority class above PPR's. A correct x86 CPU takes
    /// such an interrupt at the next instruction boundary, halted or not;
    /// inside L2 it forces a #VMEXIT to L1 (KVM intercepts INTR and enters
    /// L2 with L1's IF set). Only GIF=0 could hold it, and KVM clears GIF
    /// just around VMRUN itself, never across a halt or a spin. So a stall
    /// in this state is the emulator's: no hang of L1's kernel, of KVM or
    /// of anything in L2 (our VMM included) can put a CPU there.
    pub fn timer_deliverable(&self) -> bool {
        let (Some(vector), Some(ppr)) = (self.timer_vector, self.ppr) else {
            return false;
        };
        self.interrupts_enabled == Some(true) && self.timer_pending() && vector >> 4 > ppr >> 4
    }

    pub fn summary(&self) -> String {
        format!(
            "RIP={} halted={} IF={} lapic-timer={} count={} ISR={} IRR={}",
            self.rip,
            self.halted,
            self.interrupts_enabled
                .map_or("?", |on| if on { "1" } else { "0" }),
            if self.timer_one_shot {
                "one-shot"
            } else if self.timer_periodic {
                "periodic"
            } else {
                "other"
            },
            self.timer_count.map_or("?".into(), |c| c.to_string()),
            self.isr,
            self.irr
        )
    }
}

/// Two looks some seconds apart both find the timer stalled
/// ([`L1State::timer_stalled`]) and the vCPU at the same instruction: L1 is
/// stuck for good. One look is not enough: a healthy L1 can be caught
/// between its timer firing and the interrupt being taken (vector in IRR),
/// but it has moved on by the next look.
pub fn stuck(first: &L1State, second: &L1State) -> bool {
    first.timer_stalled()
        && second.timer_stalled()
        && !first.rip.is_empty()
        && first.rip == second.rip
}

/// [`stuck`], and in a state no correct CPU stays in
/// ([`L1State::timer_deliverable`] at every look): the emulator's fault,
/// which a retry on a fresh L1 cannot hide a hang of ours behind.
pub fn emulator_fault(looks: &[&L1State]) -> bool {
    looks.len() >= 2
        && stuck(looks[0], looks[1])
        && looks
            .iter()
            .all(|s| s.timer_deliverable() && s.rip == looks[0].rip)
}

/// Presses (and releases) Shift on L1's PS/2 keyboard: an interrupt that
/// changes nothing in L1 beyond its keyboard driver seeing a key.
pub fn press_key(path: &Path) -> std::io::Result<()> {
    query(path, &["sendkey shift"]).map(drop)
}

/// Asks the monitor at `path` for L1's state.
pub fn l1_state(path: &Path) -> std::io::Result<(L1State, String)> {
    let out = query(path, &["info registers", "info lapic"])?;
    Ok((L1State::parse(&out[0], &out[1]), out[1].clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGS: &str = "CPU#0\nRAX=0000000000000000 RBX=0000000000000000\n\
        RIP=ffffffff81a2b4ce RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\nES =0000\n";
    /// `info lapic` of QEMU 7.2 as it read while L1 was wedged (CI-like run,
    /// 2026-11-26): the timer vector pending in IRR, the count at 0.
    const LAPIC: &str = "dumping local APIC state for CPU 0 \n\n\
        LVT0\t 0x00010700 active-hi edge  masked                      ExtINT (vec 0)\n\
        LVT1\t 0x00000400 active-hi edge                              NMI   \n\
        LVTPC\t 0x00010000 active-hi edge  masked                      Fixed  (vec 0)\n\
        LVTERR\t 0x000000fe active-hi edge                              Fixed  (vec 254)\n\
        LVTTHMR\t 0x00010000 active-hi edge  masked                      Fixed  (vec 0)\n\
        LVTT\t 0x000000ec active-hi edge                 one-shot     Fixed  (vec 236)\n\
        Timer\t DCR=0x3 (divide by 16) initial_count = 234608 current_count = 0\n\
        SPIV\t 0x000001ff APIC enabled, focus=off, spurious vec 255\n\
        ISR\t (none)\nIRR\t 236 \n\nAPR 0x00 TPR 0x10 DFR 0x0f LDR 0x01 PPR 0x10\n";

    #[test]
    fn parses_a_halted_l1_without_a_timer() {
        let s = L1State::parse(REGS, LAPIC);
        assert_eq!(s.rip, "ffffffff81a2b4ce");
        assert!(s.halted);
        assert_eq!(s.interrupts_enabled, Some(true));
        assert!(s.summary().contains("halted=true IF=1 "), "{}", s.summary());
        let masked = L1State::parse(&REGS.replace("RFL=00000246", "RFL=00000046"), LAPIC);
        assert_eq!(masked.interrupts_enabled, Some(false));
        assert_eq!(s.timer_count, Some(0));
        assert_eq!(s.isr, "(none)");
        assert_eq!(s.irr, "236");
        assert!(s.timer_one_shot);
        assert!(s.timer_dead());
        // Running (not halted) with the timer dead is just as stuck.
        let running = L1State::parse(&REGS.replace("HLT=1", "HLT=0"), LAPIC);
        assert!(!running.halted && running.timer_dead());
    }

    #[test]
    fn stuck_needs_a_dead_timer_at_the_same_place_twice() {
        let wedged = L1State::parse(REGS, LAPIC);
        assert!(stuck(&wedged, &wedged.clone()));
        // Caught once between expiry and delivery, then moving again.
        let moved = L1State::parse(&REGS.replace("81a2b4ce", "81a2c000"), LAPIC);
        assert!(!stuck(&wedged, &moved));
        let armed = L1State::parse(
            REGS,
            &LAPIC.replace("current_count = 0", "current_count = 5"),
        );
        assert!(!stuck(&wedged, &armed));
        assert!(!stuck(&armed, &wedged));
    }

    #[test]
    fn a_periodic_timer_is_stalled_only_while_its_vector_waits() {
        let periodic = LAPIC.replace("one-shot", "periodic");
        let pending = L1State::parse(REGS, &periodic);
        assert!(pending.timer_periodic && !pending.timer_one_shot);
        assert_eq!(pending.timer_vector, Some(236));
        assert!(pending.timer_pending());
        assert!(!pending.timer_dead());
        assert!(pending.timer_stalled());
        assert!(pending.summary().contains("lapic-timer=periodic"));
        assert!(stuck(&pending, &pending.clone()));
        // Another vector in IRR is not the timer's.
        let other = L1State::parse(REGS, &periodic.replace("IRR\t 236", "IRR\t 34"));
        assert!(!other.timer_pending() && !other.timer_stalled());
        let taken = L1State::parse(REGS, &periodic.replace("IRR\t 236 ", "IRR\t (none)"));
        assert!(!taken.timer_stalled());
        assert!(!stuck(&pending, &taken));
        let masked = periodic.replace(
            "edge                 periodic",
            "edge  masked         periodic",
        );
        assert!(!L1State::parse(REGS, &masked).timer_stalled());
    }

    /// The CI wedge of 2026-12-07 (QEMU 10.0.2, periodic tick): halted at
    /// L1's `sti; hlt` with IF=1, the periodic timer counting and its
    /// vector in IRR above PPR, never taken.
    #[test]
    fn a_deliverable_vector_left_pending_is_the_emulators_fault() {
        let periodic = LAPIC
            .replace("one-shot", "periodic")
            .replace("current_count = 0", "current_count = 221736");
        let a = L1State::parse(REGS, &periodic);
        assert_eq!(a.ppr, Some(0x10));
        assert!(a.timer_deliverable());
        assert!(emulator_fault(&[&a, &a.clone(), &a.clone()]));
        assert!(!emulator_fault(&[&a]), "one look proves nothing");
        // IF=0: L1 (or KVM) may be spinning with interrupts off, a hang
        // that could be ours.
        let masked = L1State::parse(&REGS.replace("RFL=00000246", "RFL=00000046"), &periodic);
        assert!(stuck(&a, &masked) && !emulator_fault(&[&a, &masked]));
        // A vector at or below the processor priority may wait.
        let low = L1State::parse(REGS, &periodic.replace("PPR 0x10", "PPR 0xe0"));
        assert!(!low.timer_deliverable() && !emulator_fault(&[&low, &low.clone()]));
        // Moved between looks: not stuck at all.
        let moved = L1State::parse(&REGS.replace("81a2b4ce", "81a2c000"), &periodic);
        assert!(!emulator_fault(&[&a, &a.clone(), &moved]));
        // Output without a PPR is never taken for proof.
        let no_ppr = L1State::parse(REGS, &periodic.replace("PPR 0x10", ""));
        assert!(!no_ppr.timer_deliverable());
    }

    #[test]
    fn an_armed_masked_or_deadline_timer_is_not_dead() {
        let armed = LAPIC.replace("current_count = 0", "current_count = 116030");
        let timed = L1State::parse(REGS, &armed);
        assert_eq!(timed.timer_count, Some(116030));
        assert!(!timed.timer_dead());
        // The clock event is elsewhere (HPET broadcast, TSC deadline): the
        // LAPIC count of 0 means nothing.
        let masked = LAPIC.replace(
            "edge                 one-shot",
            "edge  masked         one-shot",
        );
        assert!(!L1State::parse(REGS, &masked).timer_dead());
        let deadline = LAPIC.replace("one-shot", "tsc-deadline");
        assert!(!L1State::parse(REGS, &deadline).timer_dead());
        // Output it cannot read is never taken for a dead timer.
        assert!(!L1State::parse("", "").timer_dead());
    }

    #[test]
    fn echo_and_prompt_are_stripped() {
        let reply = "i\x1b[K\x1b[Dinfo lapic\x1b[K\r\nline one\r\nline two\r\n(qemu) ";
        assert_eq!(strip_echo(reply), "line one\nline two\n");
    }

    /// A stand-in HMP monitor: prints the banner, answers each command
    /// line with `replies` in turn (behind an echo line and before the
    /// prompt), and returns the lines it was sent.
    fn stand_in_monitor(
        replies: &'static [&'static str],
    ) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let path = socket_path();
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            c.write_all(b"QEMU 7.2 monitor\r\n(qemu) ").unwrap();
            let mut buf = [0u8; 64];
            let mut sent = Vec::new();
            for reply in replies {
                let n = c.read(&mut buf).unwrap();
                sent.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                c.write_all(format!("echo\r\n{reply}(qemu) ").as_bytes())
                    .unwrap();
            }
            sent
        });
        (path, server)
    }

    #[test]
    fn query_reads_each_reply_up_to_the_prompt() {
        let (path, server) = stand_in_monitor(&["first\r\n", "second\r\n"]);
        let out = query(&path, &["a", "b"]).unwrap();
        let sent = server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(sent, vec!["a\n".to_string(), "b\n".to_string()]);
        assert_eq!(out, vec!["first\n".to_string(), "second\n".to_string()]);
    }

    #[test]
    fn press_key_sends_shift() {
        let (path, server) = stand_in_monitor(&[""]);
        press_key(&path).unwrap();
        let sent = server.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(sent, vec!["sendkey shift\n".to_string()]);
    }
}
