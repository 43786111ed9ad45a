//! The density benchmark (not a test; issue 16): N guests at once on one L1
//! with a fixed host memory budget, each running the `density-work`
//! scenario (a working set of known size in tmpfs, checksummed in a loop).
//! For each N of a list and each of four variants the L1 script starts N
//! guests of the same variant concurrently:
//!
//! - `ours`: our VMM, no limit (the unconstrained figure of our guests);
//! - `ours-limit`: our VMM with the pager, `limit=` = the budget's share of
//!   one guest less an allowance for the VMM itself, swap file in L1's tmpfs;
//! - `qemu`: QEMU `-M pc`, no limit (the unconstrained figure of QEMU's);
//! - `qemu-cgroup`: QEMU `-M pc`, all N in one cgroup v2 with `memory.max` =
//!   the budget, swapping to a zram device in the same L1.
//!
//! Every guest has 1 vCPU and they share L1's one CPU, so the reference for
//! a guest's throughput is the same N guests of the same VMM without a
//! limit (same CPU contention). Each variant runs in its own cgroup; its
//! `memory.peak` (guest RAM, the VMM's own memory, the kernel memory it is
//! charged for, and for ours the tmpfs pages of its swap files) plus zram's
//! `mem_used_max` (QEMU's swap store, which no cgroup is charged for) is the
//! host memory the variant used.
//!
//! The guests of a set are released together: each prints `ready` after its
//! working set is written and checksummed once (warm-up), then waits for a
//! line on its console, which the script writes to every guest's console
//! input (a FIFO) once all are ready; the measured passes run over the same
//! stretch of time in every guest.
//!
//! Console protocol: `DENSITY-SET` starts a set, `DENSITY-GO` says which
//! guests were ready, `DENSITY-END` carries the set's exit statuses and
//! memory, then each guest's relevant lines come prefixed with
//! `DENSITY-LOG variant=V n=N rep=R guest=K | `.

use std::fmt::Write as _;

use crate::bench::{add_free_page_reporting, kv, median, number_after, ours_argv, qemu_argv};
use crate::harness::{GuestRun, HarnessError, WATCHDOG_PARAM};
use crate::l1::{sh_quote, L2_KERNEL};

pub const MARK_SETUP: &str = "DENSITY-SETUP";
pub const MARK_SET: &str = "DENSITY-SET";
pub const MARK_GO: &str = "DENSITY-GO";
pub const MARK_END: &str = "DENSITY-END";
pub const MARK_LOG: &str = "DENSITY-LOG";
pub const MARK_WAIT: &str = "DENSITY-WAIT";
/// Where a guest's console line starts in a `DENSITY-LOG` line.
const LOG_SEP: &str = " | ";
/// Stands for the guest's index in an argv template (its swap file).
const GUEST_SLOT: &str = "@K@";
/// Scratch files of guest K in L1's tmpfs: console log, console input
/// FIFO, swap file.
const SCRATCH: &str = "/tmp/density";
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// A pager statistics line of our VMM.
const PAGER_STATS: &str = "pager-stats {";

/// The four variants of a set, in the order the script runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ours,
    OursLimit,
    Qemu,
    QemuCgroup,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Ours, Kind::OursLimit, Kind::Qemu, Kind::QemuCgroup];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Ours => "ours",
            Kind::OursLimit => "ours-limit",
            Kind::Qemu => "qemu",
            Kind::QemuCgroup => "qemu-cgroup",
        }
    }

    pub fn is_qemu(self) -> bool {
        matches!(self, Kind::Qemu | Kind::QemuCgroup)
    }

    pub fn constrained(self) -> bool {
        matches!(self, Kind::OursLimit | Kind::QemuCgroup)
    }
}

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The numbers of guests to run at once, in order.
    pub guests: Vec<u32>,
    pub reps: u32,
    /// RAM of each guest, MiB.
    pub memory_mib: u32,
    /// Each guest's working set, MiB.
    pub ws_mib: u32,
    /// Seconds of measured passes.
    pub seconds: u32,
    /// Host memory budget of all guests together, MiB.
    pub budget_mib: u32,
    /// Taken from each of our guests' share of the budget for the VMM's
    /// own memory (outside the pager's limit), MiB.
    pub allowance_mib: u32,
    /// A virtio-balloon with free page reporting in every guest, ours and
    /// QEMU's.
    pub balloon: bool,
}

impl Config {
    /// Our per-guest resident limit with `n` guests: the budget's share
    /// less the allowance, and less the pager's NOIO reserve (limit/64),
    /// which it keeps on top of the limit.
    pub fn ours_limit_mib(&self, n: u32) -> u32 {
        let share = (self.budget_mib / n.max(1)).saturating_sub(self.allowance_mib);
        share * 64 / 65
    }

    /// Seconds a set of `n` guests may take to boot, write and warm up:
    /// they share one CPU.
    pub fn ready_timeout_s(&self, n: u32) -> u64 {
        180 + 90 * u64::from(n) + u64::from(self.ws_mib) * u64::from(n) / 4
    }

    /// The bound on one guest (a stuck guest fails its set, the benchmark
    /// goes on).
    pub fn guest_timeout_s(&self, n: u32) -> u64 {
        self.ready_timeout_s(n) + u64::from(self.seconds) * 2 + 180
    }

    /// A bound on the whole L1 run.
    pub fn total_timeout_s(&self) -> u64 {
        let per_rep: u64 = self
            .guests
            .iter()
            .map(|&n| Kind::ALL.len() as u64 * self.guest_timeout_s(n))
            .sum();
        per_rep * u64::from(self.reps.max(1)) + 600
    }

    /// zram's size for a QEMU set of `n` guests: all their RAM.
    fn zram_mib(&self, n: u32) -> u32 {
        self.memory_mib * n
    }
}

/// The argv template of `kind` inside L1, for `n` guests ([`GUEST_SLOT`]
/// stands for the guest's index).
pub fn argv(cfg: &Config, run: &GuestRun, kind: Kind, n: u32) -> Result<Vec<String>, HarnessError> {
    // The guest's hang report comes inside its bound.
    let mut run = run
        .clone()
        .param(WATCHDOG_PARAM, cfg.guest_timeout_s(n).saturating_sub(60));
    let cmdline = run.l2_cmdline()?;
    run.memory_mib = cfg.memory_mib;
    run.memory_opts = None;
    if kind == Kind::OursLimit {
        run.memory_opts = Some(format!(
            "limit={}M,swap={SCRATCH}{GUEST_SLOT}.swap",
            cfg.ours_limit_mib(n)
        ));
    }
    let mut a = if kind.is_qemu() {
        qemu_argv(&run, &cmdline, "pc", L2_KERNEL)
    } else {
        ours_argv(&run, &cmdline, L2_KERNEL)
    };
    if cfg.balloon {
        add_free_page_reporting(&mut a, kind.is_qemu());
    }
    Ok(a)
}

/// An argv template as sh words, the guest slot expanded from `$k`.
fn sh_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| sh_quote(a).replace(GUEST_SLOT, "'\"$k\"'"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Shell functions of the L1 script.
const SCRIPT_LIB: &str = r#"export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
up() { cut -d' ' -f1 /proc/uptime; }
secs() { cut -d. -f1 /proc/uptime; }
vm() { awk -v k="$1" '$1 == k {print $2}' /proc/vmstat; }
avail_kib() { awk '$1 == "MemAvailable:" {print $2}' /proc/meminfo; }
zram_off() { swapoff /dev/zram0 2>/dev/null; echo 1 > /sys/block/zram0/reset; }
zram_on() {
    zram_off
    echo "$1"M > /sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null && swapon /dev/zram0
}
zram_max_kib() {
    set -- $(cat /sys/block/zram0/mm_stat 2>/dev/null)
    echo $(( ${5:-0} / 1024 ))
}
# sample CGROUP: once a second, the peaks of the set's resident memory (the
# cgroup's memory.current less its shmem: the tmpfs pages of our swap files)
# and of its swap store (those shmem pages, or zram's mem_used_total), and of
# their sum, into SCRATCH.peaks ("resident store total", KiB); and what the
# resident peak was made of (the cgroup's memory.stat then: anonymous memory,
# huge pages among it, kernel memory, page tables, KVM's secondary page
# tables) into SCRATCH.peakstat, as key=KiB words.
sample() {
    scg=$1; res=0; sto=0; tot=0
    while :; do
        cur=$(cat $scg/memory.current 2>/dev/null) || break
        cur=$((cur / 1024))
        shm=$(awk '$1 == "shmem" {print int($2 / 1024)}' $scg/memory.stat)
        set -- $(cat /sys/block/zram0/mm_stat 2>/dev/null)
        st=$((${shm:-0} + ${3:-0} / 1024))
        rs=$((cur - ${shm:-0}))
        if [ $rs -gt $res ]; then
            res=$rs
            awk '$1 ~ /^(anon|anon_thp|file|kernel|pagetables|sec_pagetables|slab|percpu)$/ {
                printf "peak_%s_kib=%d ", $1, $2 / 1024 }' $scg/memory.stat > SCRATCH.peakstat
        fi
        [ $st -gt $sto ] && sto=$st
        [ $((rs + st)) -gt $tot ] && tot=$((rs + st))
        echo "$res $sto $tot" > SCRATCH.peaks.new && mv SCRATCH.peaks.new SCRATCH.peaks
        sleep 1
    done
}
# start_set CGROUP: the sampler of a set, before its guests start.
start_set() {
    rm -f SCRATCH.peaks SCRATCH.peakstat
    sample "$1" </dev/null >/dev/null 2>&1 &
    sampler=$!
}
# start_guest K CGROUP TIMEOUT ARGV...: one VMM in the background, in CGROUP,
# its console input a FIFO (opened read-write: never blocks, never EOF),
# its console in a log.
start_guest() {
    k=$1; cg=$2; t=$3; shift 3
    rm -f SCRATCH$k.in SCRATCH$k.log SCRATCH$k.swap
    mkfifo SCRATCH$k.in
    timeout "$t" sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@" \
        <> SCRATCH$k.in > SCRATCH$k.log 2>&1 &
    pids="$pids $!"
}
# finish_set VARIANT N REP CGROUP READY_TIMEOUT: wait until every guest is
# ready (or READY_TIMEOUT), release them all, wait for them, report.
finish_set() {
    v=$1; n=$2; r=$3; cg=$4; rt=$5
    w0=$(secs); last=$w0
    while :; do
        ready=0; alive=0; k=1
        while [ $k -le $n ]; do
            grep -q 'density: .*] ready' SCRATCH$k.log 2>/dev/null && ready=$((ready + 1))
            k=$((k + 1))
        done
        for p in $pids; do kill -0 $p 2>/dev/null && alive=$((alive + 1)); done
        [ $ready -ge $n ] || [ $alive -eq 0 ] || [ $(($(secs) - w0)) -ge $rt ] && break
        if [ $(($(secs) - last)) -ge 30 ]; then
            last=$(secs)
            echo "DENSITY-WAIT variant=$v n=$n rep=$r ready=$ready alive=$alive t=$(up)"
        fi
        sleep 1
    done
    late=""; k=1
    while [ $k -le $n ]; do
        grep -q 'density: .*] ready' SCRATCH$k.log 2>/dev/null || late="$late${late:+,}$k"
        k=$((k + 1))
    done
    echo "DENSITY-GO variant=$v n=$n rep=$r ready=$ready late=${late:-none} t=$(up)"
    k=1
    while [ $k -le $n ]; do echo go 1<> SCRATCH$k.in; k=$((k + 1)); done
    # A heartbeat for the harness's silence probe; its sleep does not hold
    # the console open (a kill may come between its fork and `s=$!`).
    (
        trap 'kill $s 2>/dev/null; exit 0' TERM
        while :; do
            sleep 30 </dev/null >/dev/null 2>&1 &
            s=$!
            wait $s
            echo "DENSITY-WAIT variant=$v n=$n rep=$r running t=$(up)"
        done
    ) &
    hb=$!
    rcs=""
    for p in $pids; do wait $p; rcs="$rcs${rcs:+,}$?"; done
    kill $hb; wait $hb 2>/dev/null
    kill $sampler; wait $sampler 2>/dev/null
    set -- $(cat SCRATCH.peaks 2>/dev/null)
    peaks="resident_peak_kib=${1:-0} store_peak_kib=${2:-0} total_peak_kib=${3:-0}"
    echo "DENSITY-END variant=$v n=$n rep=$r rcs=$rcs start=$t0 end=$(up) $peaks \
cgroup_peak_kib=$(($(cat $cg/memory.peak) / 1024)) zram_max_kib=$(zram_max_kib) \
oom_kill=$(awk '$1 == "oom_kill" {print $2}' $cg/memory.events) \
l1_pswpin=$(($(vm pswpin) - in0)) l1_pswpout=$(($(vm pswpout) - out0)) \
l1_avail_kib_before=$av0 l1_avail_kib_after=$(avail_kib) \
$(cat SCRATCH.peakstat 2>/dev/null)"
    k=1
    while [ $k -le $n ]; do
        tr -d '\r' < SCRATCH$k.log |
            grep -E 'density: |pager-stats|balloon-stats|STALL-WATCHDOG|GUEST-WATCHDOG|SCENARIO-|FAIL|error' |
            grep -v '] pass ' |
            sed "s/^/DENSITY-LOG variant=$v n=$n rep=$r guest=$k | /"
        if ! grep -q 'density: ok' SCRATCH$k.log; then
            tr -d '\r' < SCRATCH$k.log | tail -n 40 | sed "s/^/DENSITY-TAIL variant=$v n=$n rep=$r guest=$k | /"
        fi
        rm -f SCRATCH$k.in SCRATCH$k.log SCRATCH$k.swap
        k=$((k + 1))
    done
    zram_off
    rmdir $cg
}
"#;

/// The L1 script: the cgroup hierarchy once, then for each round, each N
/// and each variant a set of N guests.
pub fn script(cfg: &Config, run: &GuestRun) -> Result<String, HarnessError> {
    let mut s = SCRIPT_LIB.replace("SCRATCH", SCRATCH);
    let _ = writeln!(
        s,
        "mkdir -p {CGROUP_ROOT} && mount -t cgroup2 none {CGROUP_ROOT} || exit 93\n\
         echo +memory > {CGROUP_ROOT}/cgroup.subtree_control || exit 94\n\
         zram_off\n\
         echo \"{MARK_SETUP} budget_mib={} guest_mib={} ws_mib={} seconds={} l1_mem_kib=$(awk '$1 == \"MemTotal:\" {{print $2}}' /proc/meminfo) l1_avail_kib=$(avail_kib) thp=$(cat /sys/kernel/mm/transparent_hugepage/enabled)\"",
        cfg.budget_mib, cfg.memory_mib, cfg.ws_mib, cfg.seconds
    );
    for rep in 0..cfg.reps {
        for &n in &cfg.guests {
            for kind in Kind::ALL {
                let name = kind.name();
                let cg = format!("{CGROUP_ROOT}/density-{name}-{n}-{rep}");
                let max = if kind == Kind::QemuCgroup {
                    format!("{}M", cfg.budget_mib)
                } else {
                    "max".into()
                };
                let limit = if kind == Kind::OursLimit {
                    format!(" limit_mib={}", cfg.ours_limit_mib(n))
                } else {
                    String::new()
                };
                let _ = writeln!(
                    s,
                    "echo \"{MARK_SET} variant={name} n={n} rep={rep} memory_max={max}{limit} t=$(up)\"\n\
                     mkdir {cg} && echo {max} > {cg}/memory.max || exit 95"
                );
                if kind == Kind::QemuCgroup {
                    let _ = writeln!(s, "zram_on {} || exit 96", cfg.zram_mib(n));
                }
                let _ = writeln!(
                    s,
                    "in0=$(vm pswpin); out0=$(vm pswpout); av0=$(avail_kib); t0=$(up); pids=\"\"\n\
                     start_set {cg}\n\
                     k=1\n\
                     while [ $k -le {n} ]; do\n    \
                     start_guest $k {cg} {t} {argv}\n    \
                     k=$((k + 1))\n\
                     done\n\
                     finish_set {name} {n} {rep} {cg} {rt}",
                    t = cfg.guest_timeout_s(n),
                    argv = sh_words(&argv(cfg, run, kind, n)?),
                    rt = cfg.ready_timeout_s(n),
                );
            }
        }
    }
    Ok(s)
}

/// One guest of one set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GuestResult {
    pub guest: u32,
    /// MiB/s from the guest's `density: done` line.
    pub rate_mib_s: Option<f64>,
    pub passes: Option<u32>,
    /// Every pass gave the warm-up's checksum (`density: ok`).
    pub ok: bool,
    /// Not ready when the set was released: it did not measure over the
    /// same stretch as the others.
    pub late: bool,
    /// Exit status of its VMM (under `timeout`).
    pub rc: Option<i32>,
    /// The pager's counters (ours with a limit).
    pub pager: Option<PagerNoio>,
    /// `STALL-WATCHDOG` lines of its VMM.
    pub stall_reports: usize,
}

impl GuestResult {
    /// The throughput that counts: the guest's rate if it verified its data
    /// and measured with the others, else 0 (a failed guest fails its set).
    pub fn counted_rate(&self) -> f64 {
        match self.rate_mib_s {
            Some(r) if self.ok && !self.late => r,
            _ => 0.0,
        }
    }
}

/// The NOIO-related pager counters of one VMM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PagerNoio {
    pub noio_faults: u64,
    pub noio_from_overshoot: u64,
    pub overshoot_events: u64,
    pub waits: u64,
    pub wait_ns_max: u64,
    pub pages_out: u64,
    pub pages_in: u64,
    pub discarded_pages: u64,
    pub fatal: bool,
}

impl PagerNoio {
    /// From a `pager-stats {...}` line.
    pub fn parse(line: &str) -> Option<Self> {
        let json = &line[line.find(PAGER_STATS)? + PAGER_STATS.len() - 1..];
        let f = |k: &str| number_after(json, &format!("\"{k}\":"));
        Some(Self {
            noio_faults: f("noio_faults")?,
            noio_from_overshoot: f("noio_from_overshoot")?,
            overshoot_events: f("overshoot_events")?,
            waits: f("waits")?,
            wait_ns_max: f("wait_ns_max")?,
            pages_out: f("pages_out")?,
            pages_in: f("pages_in")?,
            discarded_pages: f("discarded_pages").unwrap_or(0),
            fatal: !json.contains("\"fatal_error\":null"),
        })
    }
}

/// One set: N guests of one variant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SetResult {
    pub variant: String,
    pub n: u32,
    pub rep: u32,
    /// Sampled once a second: peaks of resident memory (the cgroup's
    /// charge less the swap files' tmpfs pages), of the swap store (those
    /// pages, or zram's memory) and of their sum, KiB.
    pub resident_peak_kib: Option<u64>,
    pub store_peak_kib: Option<u64>,
    pub total_peak_kib: Option<u64>,
    /// The kernel's own peaks: the cgroup's `memory.peak` (for ours it
    /// includes the swap files) and zram's `mem_used_max`.
    pub cgroup_peak_kib: Option<u64>,
    pub zram_max_kib: Option<u64>,
    pub oom_kill: Option<u64>,
    pub wall_s: Option<f64>,
    /// One entry per guest, 1..=n (missing guests filled in as failed).
    pub guests: Vec<GuestResult>,
    /// The `DENSITY-END` line.
    pub end_line: String,
}

impl SetResult {
    /// Host memory the set used: the sampled peak of resident memory plus
    /// swap store.
    pub fn used_kib(&self) -> Option<u64> {
        self.total_peak_kib.filter(|&k| k > 0)
    }

    /// Every guest ran, verified its data and measured with the others.
    pub fn all_ok(&self) -> bool {
        self.guests.len() == self.n as usize && self.guests.iter().all(|g| g.counted_rate() > 0.0)
    }
}

/// (variant, n, rep) of a marker line.
fn set_key(rest: &str) -> Option<(String, u32, u32)> {
    Some((
        kv(rest, "variant")?.to_string(),
        kv(rest, "n")?.parse().ok()?,
        kv(rest, "rep")?.parse().ok()?,
    ))
}

/// Every set of the console that reached its `DENSITY-END` line.
pub fn parse(console: &str) -> Vec<SetResult> {
    let mut sets: Vec<SetResult> = Vec::new();
    let mut late: Vec<((String, u32, u32), Vec<u32>)> = Vec::new();
    for l in console.lines() {
        if let Some(at) = l.find(MARK_GO) {
            let rest = &l[at..];
            if let Some(key) = set_key(rest) {
                let list = kv(rest, "late")
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|k| k.parse().ok())
                    .collect();
                late.push((key, list));
            }
        } else if let Some(at) = l.find(MARK_END) {
            let rest = &l[at..];
            let Some((variant, n, rep)) = set_key(rest) else {
                continue;
            };
            let num = |k| kv(rest, k).and_then(|v| v.parse::<u64>().ok());
            let fnum = |k| kv(rest, k).and_then(|v| v.parse::<f64>().ok());
            let rcs: Vec<Option<i32>> = kv(rest, "rcs")
                .unwrap_or("")
                .split(',')
                .map(|r| r.parse().ok())
                .collect();
            let key = (variant.clone(), n, rep);
            let late_ones = late
                .iter()
                .rev()
                .find(|(k, _)| *k == key)
                .map(|(_, l)| l.clone())
                .unwrap_or_default();
            let guests = (1..=n)
                .map(|g| GuestResult {
                    guest: g,
                    late: late_ones.contains(&g),
                    rc: rcs.get(g as usize - 1).copied().flatten(),
                    ..Default::default()
                })
                .collect();
            sets.push(SetResult {
                variant,
                n,
                rep,
                resident_peak_kib: num("resident_peak_kib"),
                store_peak_kib: num("store_peak_kib"),
                total_peak_kib: num("total_peak_kib"),
                cgroup_peak_kib: num("cgroup_peak_kib"),
                zram_max_kib: num("zram_max_kib"),
                oom_kill: num("oom_kill"),
                wall_s: fnum("end").zip(fnum("start")).map(|(e, s)| e - s),
                guests,
                end_line: rest.trim().to_string(),
            });
        } else if let Some(at) = l.find(MARK_LOG) {
            let rest = &l[at..];
            let (Some(key), Some(g), Some(sep)) = (
                set_key(rest),
                kv(rest, "guest").and_then(|g| g.parse::<u32>().ok()),
                rest.find(LOG_SEP),
            ) else {
                continue;
            };
            let line = &rest[sep + LOG_SEP.len()..];
            let Some(set) = sets
                .iter_mut()
                .rev()
                .find(|s| (s.variant.as_str(), s.n, s.rep) == (key.0.as_str(), key.1, key.2))
            else {
                continue;
            };
            let Some(guest) = set.guests.iter_mut().find(|x| x.guest == g) else {
                continue;
            };
            if let Some(at) = line.find("density: done ") {
                let done = &line[at..];
                guest.rate_mib_s = kv(done, "rate_mib_s").and_then(|v| v.parse().ok());
                guest.passes = kv(done, "passes").and_then(|v| v.parse().ok());
            } else if line.contains("density: ok") {
                guest.ok = true;
            } else if line.contains(PAGER_STATS) {
                guest.pager = PagerNoio::parse(line);
            } else if line.contains("STALL-WATCHDOG") {
                guest.stall_reports += 1;
            }
        }
    }
    sets
}

/// One VMM at one N: its unconstrained and constrained sets (all rounds).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// "ours" or "qemu".
    pub vmm: &'static str,
    pub n: u32,
    /// Per-guest MiB/s of every guest of every round (0 for a failed one).
    pub free_rates: Vec<f64>,
    pub limited_rates: Vec<f64>,
    pub free_ok: bool,
    pub limited_ok: bool,
    /// Medians over rounds of the host memory used (resident + swap
    /// store), and under the budget of its two parts, KiB.
    pub free_used_kib: Option<u64>,
    pub limited_used_kib: Option<u64>,
    pub limited_resident_kib: Option<u64>,
    pub limited_store_kib: Option<u64>,
}

fn ratio_of(n: u32, guest_mib: u32, used_kib: Option<u64>) -> Option<f64> {
    let used = used_kib.filter(|&u| u > 0)? as f64;
    Some(f64::from(n) * f64::from(guest_mib) * 1024.0 / used)
}

fn min_f(v: &[f64]) -> Option<f64> {
    v.iter().copied().min_by(f64::total_cmp)
}

impl Row {
    /// The worst constrained guest against the median unconstrained guest
    /// (the guests are alike; guest K of one set is not guest K of the
    /// other).
    pub fn worst_ratio(&self) -> Option<f64> {
        let free = median(self.free_rates.clone()).filter(|&f| f > 0.0 && self.free_ok)?;
        Some(min_f(&self.limited_rates)? / free)
    }

    /// Every constrained guest kept at least half its unconstrained figure.
    pub fn holds(&self) -> bool {
        self.limited_ok && self.worst_ratio().is_some_and(|r| r >= 0.5)
    }

    /// Total guest RAM : host memory used under the budget (resident and
    /// swap store: both are L1 RAM).
    pub fn density(&self, guest_mib: u32) -> Option<f64> {
        ratio_of(self.n, guest_mib, self.limited_used_kib)
    }

    /// Total guest RAM : resident memory under the budget (what the
    /// density would be with the swap store on a disk).
    pub fn resident_density(&self, guest_mib: u32) -> Option<f64> {
        ratio_of(self.n, guest_mib, self.limited_resident_kib)
    }
}

/// One row per VMM and N (ours first), from every set of the console.
pub fn rows(sets: &[SetResult], guests: &[u32]) -> Vec<Row> {
    let mut out = Vec::new();
    for &n in guests {
        for (vmm, free, limited) in [
            ("ours", Kind::Ours, Kind::OursLimit),
            ("qemu", Kind::Qemu, Kind::QemuCgroup),
        ] {
            let of = |k: Kind| -> Vec<&SetResult> {
                sets.iter()
                    .filter(|s| s.n == n && s.variant == k.name())
                    .collect()
            };
            let rates = |v: &[&SetResult]| -> Vec<f64> {
                v.iter()
                    .flat_map(|s| s.guests.iter().map(GuestResult::counted_rate))
                    .collect()
            };
            let used = |v: &[&SetResult]| median(v.iter().filter_map(|s| s.used_kib()).collect());
            let peak = |v: &[&SetResult], f: fn(&SetResult) -> Option<u64>| {
                median(v.iter().filter_map(|s| f(s)).collect())
            };
            let ok = |v: &[&SetResult]| !v.is_empty() && v.iter().all(|s| s.all_ok());
            let (f, l) = (of(free), of(limited));
            out.push(Row {
                vmm,
                n,
                free_rates: rates(&f),
                limited_rates: rates(&l),
                free_ok: ok(&f),
                limited_ok: ok(&l),
                free_used_kib: used(&f),
                limited_used_kib: used(&l),
                limited_resident_kib: peak(&l, |s| s.resident_peak_kib),
                limited_store_kib: peak(&l, |s| s.store_peak_kib),
            });
        }
    }
    out
}

/// The largest N before the first N (ascending) at which some constrained
/// guest fell below 0.5x, for `vmm`; with its row.
pub fn knee<'a>(rows: &'a [Row], vmm: &str) -> Option<&'a Row> {
    let mut mine: Vec<&Row> = rows.iter().filter(|r| r.vmm == vmm).collect();
    mine.sort_by_key(|r| r.n);
    mine.into_iter().take_while(|r| r.holds()).last()
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.0}", k as f64 / 1024.0))
}

fn rate_pair(v: &[f64]) -> String {
    match (min_f(v), median(v.to_vec())) {
        (Some(lo), Some(med)) => format!("{lo:.2} / {med:.2}"),
        _ => "n/a".into(),
    }
}

/// The main table: per N and VMM, per-guest throughput without and with the
/// budget, the worst guest's ratio, host memory used and the density.
pub fn render_table(rows: &[Row], guest_mib: u32) -> String {
    let mut t = String::from(
        "| guests | total guest RAM MiB | VMM | per-guest MiB/s, no limit: min / median | per-guest MiB/s, budget: min / median | worst guest / no-limit median | host MiB used, no limit | host MiB used, budget: resident + swap store = total | guest RAM : host memory (budget) | guest RAM : resident memory (budget) | every guest >= 0.5x |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let vmm = if r.vmm == "ours" {
            "ours (pager)"
        } else {
            "QEMU (cgroup + zram)"
        };
        let ok = |ok: bool| if ok { "" } else { " (failed guests)" };
        let _ = writeln!(
            t,
            "| {} | {} | {vmm} | {}{} | {}{} | {} | {} | {} + {} = {} | {} | {} | {} |",
            r.n,
            r.n * guest_mib,
            rate_pair(&r.free_rates),
            ok(r.free_ok),
            rate_pair(&r.limited_rates),
            ok(r.limited_ok),
            r.worst_ratio().map_or("n/a".into(), |x| format!("{x:.2}x")),
            mib(r.free_used_kib),
            mib(r.limited_resident_kib),
            mib(r.limited_store_kib),
            mib(r.limited_used_kib),
            r.density(guest_mib)
                .map_or("n/a".into(), |d| format!("{d:.2}:1")),
            r.resident_density(guest_mib)
                .map_or("n/a".into(), |d| format!("{d:.2}:1")),
            if r.holds() { "yes" } else { "no" },
        );
    }
    t
}

/// The headline: for each VMM the largest N that held, and its density.
pub fn headline(rows: &[Row], guest_mib: u32) -> String {
    let one = |vmm: &str, label: &str| {
        match knee(rows, vmm) {
        Some(r) => format!(
            "{label}: {} guests ({} MiB of guest RAM), {} counting the swap store ({} of resident memory alone)",
            r.n,
            r.n * guest_mib,
            r.density(guest_mib)
                .map_or("n/a".into(), |d| format!("{d:.2}:1")),
            r.resident_density(guest_mib)
                .map_or("n/a".into(), |d| format!("{d:.2}:1")),
        ),
        None => format!("{label}: no N held (the smallest already fell below 0.5x or failed)"),
    }
    };
    format!(
        "{}; {}",
        one("ours", "ours (pager)"),
        one("qemu", "QEMU (cgroup + zram)")
    )
}

/// NOIO evidence of our constrained sets: summed pager counters and stall
/// watchdog reports (ours with and without a limit).
pub fn render_noio_table(sets: &[SetResult], guests: &[u32]) -> String {
    let mut t = String::from(
        "| guests | VMMs reporting pager stats | NOIO faults | NOIO frames beyond limit + reserve (`noio_from_overshoot`) | overshoot events | stall watchdog reports | pager fatal errors | faults that waited for a frame | longest wait ms | pages out / in | pages discarded (free page reporting) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &n in guests {
        let limited: Vec<&GuestResult> = sets
            .iter()
            .filter(|s| s.n == n && s.variant == Kind::OursLimit.name())
            .flat_map(|s| s.guests.iter())
            .collect();
        let stalls: usize = sets
            .iter()
            .filter(|s| s.n == n && !Kind::from_name(&s.variant).is_some_and(Kind::is_qemu))
            .flat_map(|s| s.guests.iter())
            .map(|g| g.stall_reports)
            .sum();
        let stats: Vec<&PagerNoio> = limited.iter().filter_map(|g| g.pager.as_ref()).collect();
        let sum = |f: fn(&PagerNoio) -> u64| stats.iter().map(|p| f(p)).sum::<u64>();
        let max_wait = stats.iter().map(|p| p.wait_ns_max).max().unwrap_or(0);
        let _ = writeln!(
            t,
            "| {n} | {}/{} | {} | {} | {} | {stalls} | {} | {} | {:.1} | {} / {} | {} |",
            stats.len(),
            limited.len(),
            sum(|p| p.noio_faults),
            sum(|p| p.noio_from_overshoot),
            sum(|p| p.overshoot_events),
            stats.iter().filter(|p| p.fatal).count(),
            sum(|p| p.waits),
            max_wait as f64 / 1e6,
            sum(|p| p.pages_out),
            sum(|p| p.pages_in),
            sum(|p| p.discarded_pages),
        );
    }
    t
}

impl Kind {
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_image::Scenario;

    fn cfg() -> Config {
        Config {
            guests: vec![2, 4],
            reps: 1,
            memory_mib: 256,
            ws_mib: 48,
            seconds: 60,
            budget_mib: 512,
            allowance_mib: 8,
            balloon: true,
        }
    }

    const STATS: &str = "pager-stats {\"faults_zero\":1,\"pages_in\":30,\"pages_out\":40,\"discarded_pages\":5,\"noio_faults\":2,\"noio_from_free\":2,\"noio_from_overshoot\":0,\"overshoot_events\":0,\"waits\":7,\"wait_ns_total\":9,\"wait_ns_max\":2500000,\"fatal_error\":null}";

    fn console() -> String {
        format!(
            "\
DENSITY-SETUP budget_mib=512 guest_mib=256
DENSITY-SET variant=ours n=2 rep=0 memory_max=max t=1.0
DENSITY-WAIT variant=ours n=2 rep=0 ready=1 alive=2 t=30.0
DENSITY-GO variant=ours n=2 rep=0 ready=2 late=none t=40.0
DENSITY-END variant=ours n=2 rep=0 rcs=0,0 start=1.00 end=120.50 resident_peak_kib=409600 store_peak_kib=0 total_peak_kib=409600 cgroup_peak_kib=409600 zram_max_kib=0 oom_kill=0
DENSITY-LOG variant=ours n=2 rep=0 guest=1 | density: [30.00] ready ws_mib=48 md5=abc
DENSITY-LOG variant=ours n=2 rep=0 guest=1 | density: done passes=10 span_s=60.00 rate_mib_s=8.00
DENSITY-LOG variant=ours n=2 rep=0 guest=1 | density: ok
DENSITY-LOG variant=ours n=2 rep=0 guest=2 | density: done passes=12 span_s=60.00 rate_mib_s=10.00
DENSITY-LOG variant=ours n=2 rep=0 guest=2 | density: ok
DENSITY-GO variant=ours-limit n=2 rep=0 ready=2 late=none t=150.0
DENSITY-END variant=ours-limit n=2 rep=0 rcs=0,0 start=121.00 end=250.00 resident_peak_kib=204800 store_peak_kib=61440 total_peak_kib=262144 cgroup_peak_kib=262144 zram_max_kib=0 oom_kill=0
DENSITY-LOG variant=ours-limit n=2 rep=0 guest=1 | density: done passes=9 span_s=60.00 rate_mib_s=6.00
DENSITY-LOG variant=ours-limit n=2 rep=0 guest=1 | density: ok
DENSITY-LOG variant=ours-limit n=2 rep=0 guest=1 | {STATS}
DENSITY-LOG variant=ours-limit n=2 rep=0 guest=2 | density: done passes=9 span_s=60.00 rate_mib_s=5.00
DENSITY-LOG variant=ours-limit n=2 rep=0 guest=2 | density: ok
DENSITY-LOG variant=ours-limit n=2 rep=0 guest=2 | {STATS}
DENSITY-GO variant=qemu n=2 rep=0 ready=2 late=none t=300.0
DENSITY-END variant=qemu n=2 rep=0 rcs=1,1 start=251.00 end=400.00 resident_peak_kib=512000 store_peak_kib=0 total_peak_kib=512000 cgroup_peak_kib=512000 zram_max_kib=0 oom_kill=0
DENSITY-LOG variant=qemu n=2 rep=0 guest=1 | density: done passes=9 span_s=60.00 rate_mib_s=8.00
DENSITY-LOG variant=qemu n=2 rep=0 guest=1 | density: ok
DENSITY-LOG variant=qemu n=2 rep=0 guest=2 | density: done passes=9 span_s=60.00 rate_mib_s=8.00
DENSITY-LOG variant=qemu n=2 rep=0 guest=2 | density: ok
DENSITY-GO variant=qemu-cgroup n=2 rep=0 ready=1 late=2 t=500.0
DENSITY-END variant=qemu-cgroup n=2 rep=0 rcs=1,143 start=401.00 end=700.00 resident_peak_kib=524288 store_peak_kib=102400 total_peak_kib=626688 cgroup_peak_kib=524288 zram_max_kib=102400 oom_kill=0
DENSITY-LOG variant=qemu-cgroup n=2 rep=0 guest=1 | density: done passes=3 span_s=60.00 rate_mib_s=3.00
DENSITY-LOG variant=qemu-cgroup n=2 rep=0 guest=1 | density: ok
DENSITY-LOG variant=qemu-cgroup n=2 rep=0 guest=2 | density: done passes=3 span_s=60.00 rate_mib_s=7.00
DENSITY-LOG variant=qemu-cgroup n=2 rep=0 guest=2 | density: ok
DENSITY-END variant=ours-limit n=4 rep=0 rcs=0,0,0,143 start=701.00 end=900.00 cgroup_peak_kib=524288 zram_max_kib=0 oom_kill=0
DENSITY-LOG variant=ours-limit n=4 rep=0 guest=4 | STALL-WATCHDOG: vcpu0 waits
"
        )
    }

    #[test]
    fn sets_and_guests_are_parsed() {
        let sets = parse(&console());
        assert_eq!(sets.len(), 5);
        let ours = &sets[0];
        assert_eq!((ours.variant.as_str(), ours.n, ours.rep), ("ours", 2, 0));
        assert_eq!(ours.wall_s, Some(119.5));
        assert_eq!(ours.used_kib(), Some(409600));
        assert_eq!(ours.guests[0].rate_mib_s, Some(8.0));
        assert_eq!(ours.guests[1].passes, Some(12));
        assert!(ours.all_ok());
        let limited = &sets[1];
        let p = limited.guests[0].pager.as_ref().unwrap();
        assert_eq!(
            (p.noio_faults, p.waits, p.wait_ns_max, p.pages_out, p.fatal),
            (2, 7, 2_500_000, 40, false)
        );
        // The late guest counts as failed although it printed a rate.
        let q = &sets[3];
        assert!(q.guests[1].late && !q.guests[0].late);
        assert_eq!(q.guests[1].rc, Some(143));
        assert_eq!(q.guests[1].counted_rate(), 0.0);
        assert!(!q.all_ok());
        assert_eq!(q.used_kib(), Some(524288 + 102400));
        assert_eq!(q.zram_max_kib, Some(102400));
        assert_eq!(sets[4].used_kib(), None, "no sampled peak");
        // A set whose guests printed nothing: all failed, stall counted.
        let four = &sets[4];
        assert_eq!(four.guests.len(), 4);
        assert!(!four.all_ok());
        assert_eq!(four.guests[3].stall_reports, 1);
    }

    #[test]
    fn rows_ratios_density_and_table() {
        let sets = parse(&console());
        let rows = rows(&sets, &[2, 4]);
        assert_eq!(rows.len(), 4);
        let ours = &rows[0];
        // Worst constrained 5.0 against the median of 8 and 10.
        assert_eq!(ours.worst_ratio(), Some(5.0 / 9.0));
        assert!(ours.holds());
        // 2 x 256 MiB over 256 MiB used.
        assert_eq!(ours.density(256), Some(2.0));
        let qemu = &rows[1];
        assert_eq!(qemu.worst_ratio(), Some(0.0));
        assert!(!qemu.holds());
        // At N = 4 ours has no unconstrained set: no ratio, does not hold.
        assert!(!rows[2].holds());
        assert_eq!(knee(&rows, "ours").map(|r| r.n), Some(2));
        assert!(knee(&rows, "qemu").is_none());
        let t = render_table(&rows, 256);
        assert!(
            t.contains("| 2 | 512 | ours (pager) | 8.00 / 9.00 | 5.00 / 5.50 | 0.56x | 400 | 200 + 60 = 256 | 2.00:1 | 2.56:1 | yes |"),
            "{t}"
        );
        assert!(
            t.contains("| 2 | 512 | QEMU (cgroup + zram) | 8.00 / 8.00 | 0.00 / 1.50 (failed guests) | 0.00x | 500 | 512 + 100 = 612 | 0.84:1 | 1.00:1 | no |"),
            "{t}"
        );
        let h = headline(&rows, 256);
        assert!(
            h.starts_with("ours (pager): 2 guests (512 MiB of guest RAM), 2.00:1 counting the swap store (2.56:1 of resident memory alone)"),
            "{h}"
        );
        assert!(h.contains("QEMU (cgroup + zram): no N held"), "{h}");
        let t = render_noio_table(&sets, &[2, 4]);
        assert!(
            t.contains("| 2 | 2/2 | 4 | 0 | 0 | 0 | 0 | 14 | 2.5 | 80 / 60 | 10 |"),
            "{t}"
        );
        assert!(
            t.contains("| 4 | 0/4 | 0 | 0 | 0 | 1 | 0 | 0 | 0.0 | 0 / 0 | 0 |"),
            "{t}"
        );
    }

    #[test]
    fn limits_and_timeouts() {
        let c = cfg();
        // 512 / 2 - 8 = 248, less the reserve: 248 * 64 / 65.
        assert_eq!(c.ours_limit_mib(2), 244);
        assert_eq!(c.ours_limit_mib(8), 55);
        assert!(c.guest_timeout_s(8) > c.ready_timeout_s(8) + 60);
        assert!(c.total_timeout_s() > 4 * (c.guest_timeout_s(2) + c.guest_timeout_s(4)));
    }

    #[test]
    fn script_runs_each_variant_with_its_limits() {
        let c = cfg();
        let run = GuestRun::new(Scenario::inline("t", "true"));
        let s = script(&c, &run).unwrap();
        // Ours with a limit: its own swap file per guest, the index from $k.
        assert!(
            s.contains("'size=256M,limit=244M,swap=/tmp/density'\"$k\"'.swap'"),
            "{s}"
        );
        assert!(s.contains("'size=256M,limit=118M,swap=/tmp/density'\"$k\"'.swap'"));
        assert!(s.contains("'size=0,free_page_reporting=on'"));
        assert!(s.contains("'virtio-balloon-pci,free-page-reporting=on'"));
        // QEMU's cgroup holds the budget, zram as big as the guests' RAM.
        assert!(s.contains("echo 512M > /sys/fs/cgroup/density-qemu-cgroup-4-0/memory.max"));
        assert!(s.contains("zram_on 1024 || exit 96"));
        assert!(s.contains("echo max > /sys/fs/cgroup/density-ours-limit-2-0/memory.max"));
        // Guests get a watchdog inside their bound.
        assert!(s.contains(&format!("watchdog={}", c.guest_timeout_s(4) - 60)));
        assert!(s.contains(&format!(
            "finish_set qemu-cgroup 4 0 /sys/fs/cgroup/density-qemu-cgroup-4-0 {}",
            c.ready_timeout_s(4)
        )));
        assert!(!s.contains("SCRATCH"));
        // Exactly one set per variant and N.
        assert_eq!(s.matches("finish_set ours-limit ").count(), 2);
    }

    /// The L1 script's functions run under a POSIX shell: a set of fake
    /// "VMMs" (shell loops standing in for guests) is released, waited for
    /// and reported.
    #[test]
    fn script_functions_run_a_set() {
        let dir = std::env::temp_dir().join(format!("density-sh-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("cg")).unwrap();
        let scratch = dir.join("g");
        let cg = dir.join("cg");
        std::fs::write(cg.join("memory.peak"), "2097152\n").unwrap();
        std::fs::write(cg.join("memory.events"), "oom 0\noom_kill 0\n").unwrap();
        std::fs::write(cg.join("memory.current"), "3145728\n").unwrap();
        std::fs::write(cg.join("memory.stat"), "anon 2097152\nshmem 1048576\n").unwrap();
        let lib = SCRIPT_LIB
            .replace("SCRATCH", scratch.to_str().unwrap())
            // No zram, no cgroup moves outside L1.
            .replace("swapoff /dev/zram0", "true")
            .replace("echo 1 > /sys/block/zram0/reset", "true")
            .replace("rmdir $cg", "true")
            .replace("echo $$ > \"$0/cgroup.procs\" && ", "");
        // A guest: ready, wait for the go line, report.
        let guest = "echo 'density: [1.00] ready ws_mib=1 md5=x'; read -r go; \
                     echo \"density: [2.00] got $go\"; \
                     echo 'density: done passes=3 span_s=1.00 rate_mib_s=4.50'; echo 'density: ok'";
        let script = format!(
            "{lib}\nin0=0; out0=0; av0=0; t0=0; pids=\"\"\n\
             start_set {cg}\n\
             k=1; while [ $k -le 2 ]; do start_guest $k {cg} 20 sh -c {guest}; k=$((k + 1)); done\n\
             finish_set ours 2 0 {cg} 10\n",
            cg = cg.display(),
            guest = sh_quote(guest),
        );
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            text.contains("DENSITY-GO variant=ours n=2 rep=0 ready=2 late=none"),
            "{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("rcs=0,0"), "{text}");
        assert!(text.contains("cgroup_peak_kib=2048"), "{text}");
        // 3 MiB charged, 1 MiB of it shmem (swap files): 2 + 1 = 3.
        assert!(
            text.contains("resident_peak_kib=2048 store_peak_kib=1024 total_peak_kib=3072"),
            "{text}"
        );
        assert!(
            text.contains("DENSITY-LOG variant=ours n=2 rep=0 guest=2 | density: [2.00] got go"),
            "{text}"
        );
        let sets = parse(&text);
        assert_eq!(sets.len(), 1);
        assert!(sets[0].all_ok(), "{sets:?}");
        assert_eq!(sets[0].guests[1].rate_mib_s, Some(4.5));
    }
}
