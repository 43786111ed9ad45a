//! `l1-bench`: runs inside the nested L1 and times VMMs booting the same L2.
//!
//! It reads a spec (one directive per line):
//!
//! ```text
//! reps 5
//! marker GUEST-INIT
//! timeout 120
//! variant ours
//! arg /vmm
//! arg --kernel
//! ...
//! variant qemu-default
//! arg /usr/bin/qemu-system-x86_64
//! ...
//! ```
//!
//! and runs the variants round-robin (`reps` rounds, so drift in the shared
//! machine hits every variant alike). For each run it records the time from
//! spawn to the first console line containing the marker, the guest's own
//! uptime when it printed it (an `uptime=SECONDS` field on the marker line,
//! which splits the time into the guest kernel's and everything before its
//! clock started), the time to exit, the exit status, and memory: peak RSS (wait4), and the peak of "RSS outside
//! guest RAM", sampled from /proc/PID/smaps, where guest RAM is the largest
//! mapping. Each run prints one `BENCH-RUN` line with space-separated
//! key=value pairs; the host side parses them. It needs only std and libc,
//! so it links statically without fuss.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Variant {
    name: String,
    argv: Vec<String>,
}

struct Spec {
    reps: u32,
    marker: String,
    timeout: Duration,
    variants: Vec<Variant>,
}

fn parse_spec(text: &str) -> Result<Spec, String> {
    let mut spec = Spec {
        reps: 3,
        marker: "GUEST-INIT".into(),
        timeout: Duration::from_secs(120),
        variants: Vec::new(),
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        let bad = |what: &str| format!("spec line {}: {what}: {line}", n + 1);
        match key {
            "reps" => spec.reps = value.parse().map_err(|_| bad("bad number"))?,
            "marker" => spec.marker = value.to_string(),
            "timeout" => {
                spec.timeout = Duration::from_secs(value.parse().map_err(|_| bad("bad number"))?)
            }
            "variant" => spec.variants.push(Variant {
                name: value.to_string(),
                argv: Vec::new(),
            }),
            "arg" => spec
                .variants
                .last_mut()
                .ok_or_else(|| bad("arg before any variant"))?
                .argv
                .push(value.to_string()),
            _ => return Err(bad("unknown directive")),
        }
    }
    if spec.variants.iter().any(|v| v.argv.is_empty()) || spec.variants.is_empty() {
        return Err("every variant needs at least one arg".into());
    }
    Ok(spec)
}

/// (total RSS, RSS of the largest mapping) in KiB, from /proc/PID/smaps.
fn sample_rss(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut largest_size, mut largest_rss, mut cur_size) = (0u64, 0u64, 0u64, 0u64);
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("Size:") => cur_size = it.next()?.parse().ok()?,
            Some("Rss:") => {
                let rss: u64 = it.next()?.parse().ok()?;
                total += rss;
                if cur_size > largest_size {
                    largest_size = cur_size;
                    largest_rss = rss;
                }
            }
            _ => {}
        }
    }
    Some((total, largest_rss))
}

struct RunResult {
    to_marker_ms: Option<u128>,
    guest_uptime_ms: Option<u64>,
    total_ms: u128,
    exit: Option<i32>,
    peak_rss_kib: u64,
    peak_overhead_kib: u64,
    timed_out: bool,
}

fn run_once(v: &Variant, spec: &Spec) -> std::io::Result<RunResult> {
    let start = Instant::now();
    let mut child = Command::new(&v.argv[0])
        .args(&v.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("piped stdout");

    // Memory sampler: stops when the process is gone.
    let done = Arc::new(AtomicBool::new(false));
    let peak_overhead = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, peak) = (done.clone(), peak_overhead.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if let Some((total, guest)) = sample_rss(pid) {
                    peak.fetch_max(total.saturating_sub(guest), Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Console reader: echoes the guest console and notes the marker.
    let marker = spec.marker.clone();
    let reader = std::thread::spawn(move || {
        let mut at = None;
        let mut uptime = None;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if at.is_none() && line.contains(&marker) {
                at = Some(start.elapsed().as_millis());
                uptime = uptime_ms(&line);
            }
            println!("  | {line}");
        }
        (at, uptime)
    });

    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > spec.timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let total_ms = start.elapsed().as_millis();
    done.store(true, Ordering::SeqCst);
    let _ = sampler.join();
    let (to_marker_ms, guest_uptime_ms) = reader.join().unwrap_or((None, None));
    Ok(RunResult {
        to_marker_ms,
        guest_uptime_ms,
        total_ms,
        exit: status.code(),
        peak_rss_kib: children_maxrss_kib(),
        peak_overhead_kib: peak_overhead.load(Ordering::SeqCst),
        timed_out,
    })
}

/// The guest's `uptime=SECONDS` field on a marker line, in milliseconds.
fn uptime_ms(line: &str) -> Option<u64> {
    let secs: f64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("uptime="))?
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| (secs * 1000.0).round() as u64)
}

/// Peak RSS of any waited-for child so far, in KiB.
fn children_maxrss_kib() -> u64 {
    // SAFETY: getrusage only writes into the zeroed struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) == 0 {
            ru.ru_maxrss as u64
        } else {
            0
        }
    }
}

fn main() {
    let path = std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: l1-bench SPEC-FILE");
        std::process::exit(2)
    });
    let spec = match std::fs::read_to_string(&path)
        .map_err(|e| format!("{path}: {e}"))
        .and_then(|t| parse_spec(&t))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("l1-bench: {e}");
            std::process::exit(2)
        }
    };
    let mut failures = 0;
    for rep in 0..spec.reps {
        for v in &spec.variants {
            println!("BENCH-START variant={} rep={rep}", v.name);
            match run_once(v, &spec) {
                Ok(r) => {
                    let marker = r.to_marker_ms.map_or("none".to_string(), |m| m.to_string());
                    let uptime = r
                        .guest_uptime_ms
                        .map_or("none".to_string(), |m| m.to_string());
                    println!(
                        "BENCH-RUN variant={} rep={rep} to_marker_ms={marker} guest_uptime_ms={uptime} total_ms={} exit={} timed_out={} maxrss_kib={} overhead_kib={}",
                        v.name,
                        r.total_ms,
                        r.exit.map_or("signal".to_string(), |c| c.to_string()),
                        r.timed_out,
                        r.peak_rss_kib,
                        r.peak_overhead_kib,
                    );
                    if r.to_marker_ms.is_none() || r.timed_out {
                        failures += 1;
                    }
                }
                Err(e) => {
                    println!("BENCH-ERROR variant={} rep={rep} error={e}", v.name);
                    failures += 1;
                }
            }
        }
    }
    println!("BENCH-DONE failures={failures}");
    std::process::exit(if failures == 0 { 0 } else { 1 });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_variants_in_order() {
        let s = parse_spec("reps 2\nmarker X\n# c\nvariant a\narg /bin/true\nvariant b\narg /bin/sh\narg -c\narg echo X\n").unwrap();
        assert_eq!((s.reps, s.marker.as_str()), (2, "X"));
        assert_eq!(s.variants.len(), 2);
        assert_eq!(s.variants[1].argv, vec!["/bin/sh", "-c", "echo X"]);
        assert!(parse_spec("arg x").is_err());
        assert!(parse_spec("variant a\n").is_err());
        assert!(parse_spec("reps many").is_err());
    }

    #[test]
    fn times_a_marker_and_measures_memory() {
        let spec = parse_spec("marker HELLO\ntimeout 10\nvariant sh\narg /bin/sh\narg -c\narg sleep 0.3; echo HELLO uptime=4.25; exit 3").unwrap();
        let r = run_once(&spec.variants[0], &spec).unwrap();
        assert!(r.to_marker_ms.unwrap() >= 250, "{:?}", r.to_marker_ms);
        assert_eq!(r.guest_uptime_ms, Some(4250));
        assert_eq!(r.exit, Some(3));
        assert!(!r.timed_out);
        assert!(r.peak_rss_kib > 0);
    }

    #[test]
    fn reads_the_guest_uptime_of_a_marker_line() {
        assert_eq!(uptime_ms("GUEST-INIT uptime=4.91"), Some(4910));
        assert_eq!(uptime_ms("x GUEST-INIT uptime=12.06 more"), Some(12060));
        assert_eq!(uptime_ms("GUEST-INIT"), None);
        assert_eq!(uptime_ms("GUEST-INIT uptime=soon"), None);
        assert_eq!(uptime_ms("GUEST-INIT uptime=-1"), None);
    }
}
