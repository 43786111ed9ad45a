//! Wedge-rate bookkeeping for `wedge-rate` (scripts/wedge-rate.sh): what
//! one nested run under a given L1 QEMU came to, as one `WEDGE-RUN` line
//! (written as the runs go, so a log survives an interrupted measurement),
//! and the table over many of them.
//!
//! The verdicts are the harness's own: [`RunResult::l1_wedged`] (the
//! monitor found L1's LAPIC timer stalled and its vCPU not moving,
//! and a key press did not bring the timer back; see `monitor`),
//! [`RunResult::l1_kicked`] (the harness pressed that key), and the
//! scenario's own pass check. A run that fails any other way (timeout,
//! scenario failure, VMM exit) is counted as a failure with its reason,
//! never dropped.

use std::fmt::Write as _;

use crate::RunResult;

/// The start of each record line.
pub const MARK_RUN: &str = "WEDGE-RUN";

/// What one run came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The scenario passed (its own checks).
    Pass,
    /// The harness's monitor found L1 wedged and stopped it.
    Wedged,
    /// Anything else, with the reason.
    Failed(String),
}

/// One run: which L1 QEMU, which scenario, what came of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// A name for the L1 QEMU (its version).
    pub qemu: String,
    pub scenario: String,
    pub outcome: Outcome,
    /// The harness pressed a key on L1's keyboard to wake it.
    pub kicked: bool,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
}

/// The outcome of `r`: wedged first (whatever else the console shows),
/// then `passed` (the scenario's own checks), else why it failed.
pub fn classify(r: &RunResult, passed: bool) -> Outcome {
    if r.l1_wedged {
        Outcome::Wedged
    } else if passed {
        Outcome::Pass
    } else {
        let why = if r.timed_out {
            format!("timed out after {:.0}s", r.wall.as_secs_f64())
        } else {
            format!(
                "verdict {:?} rc {:?} vmm_exit {:?}",
                r.verdict, r.scenario_rc, r.vmm_exit
            )
        };
        // A QEMU stopped from outside says so (e.g. someone's `pkill`).
        match r.console.lines().find(|l| l.contains(KILLED_FROM_OUTSIDE)) {
            Some(l) => Outcome::Failed(format!("{why}; {}", l.trim())),
            None => Outcome::Failed(why),
        }
    }
}

/// What QEMU prints when a signal stops it.
const KILLED_FROM_OUTSIDE: &str = "terminating on signal";

impl Record {
    /// `WEDGE-RUN qemu=.. scenario=.. outcome=pass|wedged|fail kicked=0|1
    /// wall=..[ reason=...]` (the reason, free text, last).
    pub fn line(&self) -> String {
        let (outcome, reason) = match &self.outcome {
            Outcome::Pass => ("pass", None),
            Outcome::Wedged => ("wedged", None),
            Outcome::Failed(why) => ("fail", Some(why.replace('\n', " "))),
        };
        let mut l = format!(
            "{MARK_RUN} qemu={} scenario={} outcome={outcome} kicked={} wall={:.1}",
            self.qemu,
            self.scenario,
            u8::from(self.kicked),
            self.wall_s
        );
        if let Some(r) = reason {
            let _ = write!(l, " reason={r}");
        }
        l
    }

    /// A record from a line written by [`Record::line`] (anywhere in it,
    /// e.g. behind a log prefix); `None` for any other line.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = &line[line.find(MARK_RUN)? + MARK_RUN.len()..];
        let (fields, reason) = match rest.find(" reason=") {
            Some(at) => (&rest[..at], Some(rest[at + " reason=".len()..].trim())),
            None => (rest, None),
        };
        let get = |k: &str| {
            fields
                .split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
        };
        let outcome = match get("outcome")? {
            "pass" => Outcome::Pass,
            "wedged" => Outcome::Wedged,
            "fail" => Outcome::Failed(reason.unwrap_or("").to_string()),
            _ => return None,
        };
        Some(Record {
            qemu: get("qemu")?.to_string(),
            scenario: get("scenario")?.to_string(),
            outcome,
            kicked: match get("kicked")? {
                "0" => false,
                "1" => true,
                _ => return None,
            },
            wall_s: get("wall")?.parse().ok()?,
        })
    }
}

/// Every record in `text` (a log), in order.
pub fn parse_all(text: &str) -> Vec<Record> {
    text.lines().filter_map(Record::parse).collect()
}

/// Counts over a set of runs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub runs: usize,
    pub passed: usize,
    pub wedged: usize,
    pub kicked: usize,
    pub failed: usize,
    pub total_s: f64,
    pub median_s: Option<f64>,
}

impl Tally {
    pub fn of<'a>(records: impl IntoIterator<Item = &'a Record>) -> Self {
        let mut t = Tally::default();
        let mut walls = Vec::new();
        for r in records {
            t.runs += 1;
            match r.outcome {
                Outcome::Pass => t.passed += 1,
                Outcome::Wedged => t.wedged += 1,
                Outcome::Failed(_) => t.failed += 1,
            }
            t.kicked += usize::from(r.kicked);
            t.total_s += r.wall_s;
            walls.push(r.wall_s);
        }
        walls.sort_by(f64::total_cmp);
        t.median_s = match walls.len() {
            0 => None,
            n if n % 2 == 1 => Some(walls[n / 2]),
            n => Some((walls[n / 2 - 1] + walls[n / 2]) / 2.0),
        };
        t
    }
}

/// Names in order of first appearance.
fn distinct<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// The wedge-rate tables: one row per L1 QEMU (runs, completions, wedges,
/// kicked, other failures, total and median wall time), then one row per
/// QEMU and scenario, then every other failure with its reason.
pub fn render(records: &[Record]) -> String {
    let mut t = String::from(
        "| L1 QEMU | runs | completed | wedged | kicked | other failures | total wall | median wall |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let qemus = distinct(records.iter().map(|r| r.qemu.as_str()));
    let median = |m: Option<f64>| m.map_or("-".into(), |m| format!("{m:.0} s"));
    for q in &qemus {
        let s = Tally::of(records.iter().filter(|r| r.qemu == *q));
        let _ = writeln!(
            t,
            "| {q} | {} | {} | {} | {} | {} | {:.0} min | {} |",
            s.runs,
            s.passed,
            s.wedged,
            s.kicked,
            s.failed,
            s.total_s / 60.0,
            median(s.median_s)
        );
    }
    t.push_str(
        "\n| L1 QEMU | scenario | runs | completed | wedged | kicked | other failures | median wall |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    let scenarios = distinct(records.iter().map(|r| r.scenario.as_str()));
    for q in &qemus {
        for sc in &scenarios {
            let s = Tally::of(records.iter().filter(|r| r.qemu == *q && r.scenario == *sc));
            if s.runs == 0 {
                continue;
            }
            let _ = writeln!(
                t,
                "| {q} | {sc} | {} | {} | {} | {} | {} | {} |",
                s.runs,
                s.passed,
                s.wedged,
                s.kicked,
                s.failed,
                median(s.median_s)
            );
        }
    }
    let failures: Vec<&Record> = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
        .collect();
    if !failures.is_empty() {
        t.push_str("\nOther failures:\n\n");
        for r in failures {
            if let Outcome::Failed(why) = &r.outcome {
                let _ = writeln!(
                    t,
                    "- {} {} after {:.0} s: {why}",
                    r.qemu, r.scenario, r.wall_s
                );
            }
        }
    }
    t
}

/// The version of a QEMU from the first line of its `--version`
/// (`QEMU emulator version 7.2.22 (Debian ...)` gives `7.2.22`).
pub fn qemu_version(version_output: &str) -> Option<String> {
    let first = version_output.lines().next()?;
    let rest = first.split("version").nth(1)?;
    rest.split_whitespace().next().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mode, Verdict};
    use std::time::Duration;

    fn rec(qemu: &str, scenario: &str, outcome: Outcome, kicked: bool, wall_s: f64) -> Record {
        Record {
            qemu: qemu.into(),
            scenario: scenario.into(),
            outcome,
            kicked,
            wall_s,
        }
    }

    fn result() -> RunResult {
        RunResult {
            mode: Mode::Nested,
            vmm_exit: Some(0),
            verdict: Verdict::Pass,
            scenario_rc: None,
            console: String::new(),
            wall: Duration::from_secs(61),
            timed_out: false,
            l1_wedged: false,
            l1_kicked: false,
            wedged_attempts: Vec::new(),
            events: Vec::new(),
        }
    }

    #[test]
    fn records_round_trip_through_their_line() {
        for r in [
            rec("7.2.22", "boot", Outcome::Pass, false, 63.25),
            rec("10.0.2", "usb", Outcome::Wedged, true, 400.0),
            rec(
                "7.2.22",
                "pager",
                Outcome::Failed("timed out after 900s\nmore".into()),
                true,
                900.0,
            ),
        ] {
            let line = r.line();
            assert!(line.starts_with(MARK_RUN), "{line}");
            assert!(!line.contains('\n'));
            let back = Record::parse(&format!("[12:00] {line}")).unwrap();
            assert_eq!(back.qemu, r.qemu);
            assert_eq!(back.scenario, r.scenario);
            assert_eq!(back.kicked, r.kicked);
            assert!((back.wall_s - r.wall_s).abs() < 0.06, "{line}");
            match (&back.outcome, &r.outcome) {
                (Outcome::Failed(a), Outcome::Failed(b)) => assert_eq!(*a, b.replace('\n', " ")),
                (a, b) => assert_eq!(a, b),
            }
        }
        assert_eq!(Record::parse("no record here"), None);
        assert_eq!(
            Record::parse("WEDGE-RUN qemu=a scenario=b outcome=maybe kicked=0 wall=1"),
            None
        );
        assert_eq!(
            Record::parse("WEDGE-RUN qemu=a scenario=b outcome=pass kicked=0"),
            None
        );
    }

    #[test]
    fn a_wedge_is_a_wedge_whatever_else_the_run_shows() {
        let mut r = result();
        assert_eq!(classify(&r, true), Outcome::Pass);
        r.l1_wedged = true;
        r.verdict = Verdict::NoVerdict;
        assert_eq!(classify(&r, false), Outcome::Wedged);
        let mut t = result();
        t.timed_out = true;
        assert_eq!(
            classify(&t, false),
            Outcome::Failed("timed out after 61s".into())
        );
        let mut f = result();
        f.verdict = Verdict::Fail;
        f.scenario_rc = Some(3);
        let Outcome::Failed(why) = classify(&f, false) else {
            panic!("a failed scenario is a failure");
        };
        assert!(why.contains("Fail") && why.contains("Some(3)"), "{why}");
        let mut k = result();
        k.verdict = Verdict::NoVerdict;
        k.vmm_exit = None;
        k.console = "pager-touch: writing\nqemu-system-x86_64: terminating on signal 15 from pid 5681 (pkill)\n".into();
        let Outcome::Failed(why) = classify(&k, false) else {
            panic!("a killed L1 is a failure");
        };
        assert!(
            why.ends_with("; qemu-system-x86_64: terminating on signal 15 from pid 5681 (pkill)"),
            "{why}"
        );
        // The caller's own checks decide a pass: a Pass verdict they reject
        // is a failure, not a completion.
        assert!(matches!(classify(&result(), false), Outcome::Failed(_)));
    }

    #[test]
    fn tally_counts_and_medians() {
        let rs = [
            rec("a", "boot", Outcome::Pass, false, 60.0),
            rec("a", "blk", Outcome::Wedged, true, 300.0),
            rec("a", "usb", Outcome::Pass, true, 100.0),
            rec("a", "pager", Outcome::Failed("x".into()), false, 80.0),
        ];
        let t = Tally::of(&rs);
        assert_eq!(
            (t.runs, t.passed, t.wedged, t.kicked, t.failed),
            (4, 2, 1, 2, 1)
        );
        assert_eq!(t.total_s, 540.0);
        assert_eq!(t.median_s, Some(90.0));
        assert_eq!(Tally::of(&rs[..3]).median_s, Some(100.0));
        assert_eq!(Tally::of(&[]).median_s, None);
    }

    #[test]
    fn table_has_a_row_per_qemu_and_lists_failures() {
        let rs = vec![
            rec("7.2.22", "boot", Outcome::Pass, false, 60.0),
            rec("10.0.2", "boot", Outcome::Pass, false, 50.0),
            rec("7.2.22", "blk", Outcome::Wedged, true, 300.0),
            rec(
                "10.0.2",
                "blk",
                Outcome::Failed("timed out".into()),
                false,
                420.0,
            ),
        ];
        let t = render(&rs);
        assert!(
            t.contains("| 7.2.22 | 2 | 1 | 1 | 1 | 0 | 6 min | 180 s |"),
            "{t}"
        );
        assert!(
            t.contains("| 10.0.2 | 2 | 1 | 0 | 0 | 1 | 8 min | 235 s |"),
            "{t}"
        );
        assert!(
            t.contains("| 7.2.22 | blk | 1 | 0 | 1 | 1 | 0 | 300 s |"),
            "{t}"
        );
        assert!(t.contains("- 10.0.2 blk after 420 s: timed out"), "{t}");
        // The 7.2 rows come first: the order the runs were made in.
        assert!(t.find("| 7.2.22 | 2").unwrap() < t.find("| 10.0.2 | 2").unwrap());
    }

    #[test]
    fn versions_from_qemu_output() {
        assert_eq!(
            qemu_version(
                "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright"
            ),
            Some("7.2.22".into())
        );
        assert_eq!(
            qemu_version("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\n"),
            Some("10.0.2".into())
        );
        assert_eq!(qemu_version(""), None);
    }
}
