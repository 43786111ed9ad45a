//! The harness: builds the images a run needs and boots the L2 guest in one
//! of the [`Mode`]s, returning a [`RunResult`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use guest_image::cmdline::{self, Param};
use guest_image::scenario::{FileMapping, Scenario, ScenarioImage, MARK_GUEST_INIT};
use guest_image::{images_dir, rootfs, GuestAssets, Initramfs};
use thiserror::Error;

use crate::host::{self, HostError, KvmKind};
use crate::l1::{self, L1Payload};
use crate::monitor;
use crate::process::{self, Event, Probe, ProcessError, RunOptions, Silence};
use crate::verdict::{self, Verdict};

/// Default bound on one run (L1 boot + L2 boot + scenario + shutdown).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(180);
/// Env var overriding the run mode: `nested`, `direct`, `qemu` or `auto`.
pub const MODE_ENV: &str = "VMM_TEST_MODE";
/// Env var overriding the per-run timeout, in seconds.
pub const TIMEOUT_ENV: &str = "VMM_TEST_TIMEOUT";
/// Memory of the L1 QEMU guest, MiB.
pub const L1_MEMORY_MIB: u32 = 2048;
/// Silence after which the harness asks L1's QEMU monitor what L1 is doing.
pub const L1_SILENCE_PROBE: Duration = Duration::from_secs(60);
/// Env var asking for this many more attempts at a run whose L1 wedged (see
/// `monitor`); unset or 0: a wedged L1 fails the run at once, unless the
/// wedge was the emulator's ([`EMULATOR_FAULT_RETRIES`]).
pub const L1_RETRY_ENV: &str = "VMM_TEST_L1_RETRY";
/// Further attempts, whatever `$VMM_TEST_L1_RETRY` says, at a run whose L1
/// wedged in a state no correct CPU stays in (`monitor::emulator_fault`):
/// such a wedge cannot be a hang of ours, so repeating the run on a fresh
/// L1 hides nothing. Every such retry is announced on the test's stderr
/// even when the test passes.
pub const EMULATOR_FAULT_RETRIES: usize = 1;
/// Gap between two looks at a silent L1 (and before the look after a key
/// press).
const L1_SECOND_LOOK: Duration = Duration::from_secs(5);
/// I/O port of the debug-exit device (guest-image `report_status`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// L2 command-line key of the guest init's hang watchdog, in seconds
/// (0 = none); see [`GuestRun::l2_cmdline`].
pub const WATCHDOG_PARAM: &str = "watchdog";
/// The first line of the guest's hang report.
pub const MARK_GUEST_WATCHDOG: &str = "GUEST-WATCHDOG";

/// Console markers time-stamped into [`RunResult::events`].
const MARKERS: &[&str] = &[
    verdict::MARK_L1_INIT,
    verdict::MARK_L1_KVM_READY,
    verdict::MARK_L1_NO_KVM,
    MARK_GUEST_INIT,
    crate::rootfs::MARK_BOOT,
    rootfs::boot::MARK_INITRAMFS,
    rootfs::boot::MARK_FSCK,
    rootfs::boot::MARK_LOGIN,
    rootfs::recipe::MARK_AUTOREBOOT,
    guest_image::scenario::MARK_PASS,
    guest_image::scenario::MARK_FAIL,
    verdict::MARK_L1_VMM_EXIT,
];

#[derive(Debug, Error)]
pub enum HarnessError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Asset(#[from] guest_image::assets::AssetError),
    #[error(transparent)]
    Scenario(#[from] guest_image::scenario::ScenarioError),
    #[error(transparent)]
    Initramfs(#[from] guest_image::initramfs::InitramfsError),
    #[error(transparent)]
    Cmdline(#[from] guest_image::cmdline::CmdlineError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{MODE_ENV}={0:?} is not one of nested, direct, qemu, auto")]
    BadMode(String),
    #[error("no usable KVM here for direct mode ({0:?}); use the nested mode")]
    NoDirectKvm(KvmKind),
    #[error("{L1_RETRY_ENV}={0:?} is not a number of retries (0, 1, 2, ...)")]
    BadRetry(String),
    #[error("VMM scripts run in the nested or direct mode, not {0:?}")]
    ScriptMode(Mode),
    #[error(transparent)]
    DiskCopy(#[from] guest_image::rootfs::RootfsError),
    #[error("cannot make scratch directory {path}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a VMM script ([`Harness::run_vmm_script`]) finds the VMM, the L2
/// kernel and initramfs, a scratch directory (L1's tmpfs when nested) and
/// the run's [`GuestRun::l1_disks`] (L1's `/dev/vda`, `/dev/vdb`, ... when
/// nested; the host files when direct).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptPaths {
    pub vmm: String,
    pub kernel: String,
    pub initrd: String,
    pub scratch: String,
    pub disks: Vec<String>,
}

/// Where the L2 guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// QEMU TCG L1 with kvm_amd; our VMM boots L2 inside it.
    Nested,
    /// Our VMM on the host's ordinary KVM.
    Direct,
    /// QEMU TCG L1; QEMU (-accel kvm) boots L2 inside it: the peer for
    /// benchmarks. Needs QEMU, its libraries and firmware in L1.
    NestedQemu,
    /// L2 straight under host QEMU TCG, no VMM: checks guest images and the
    /// harness itself.
    QemuTcg,
}

impl Mode {
    /// `$VMM_TEST_MODE`, else direct on an ordinary KVM host, else nested.
    pub fn auto() -> Result<Self, HarnessError> {
        match std::env::var(MODE_ENV).unwrap_or_default().as_str() {
            "" | "auto" => Ok(if host::detect_kvm() == KvmKind::Ordinary {
                Mode::Direct
            } else {
                Mode::Nested
            }),
            "nested" => Ok(Mode::Nested),
            "direct" => Ok(Mode::Direct),
            "qemu" => Ok(Mode::QemuTcg),
            "nested-qemu" => Ok(Mode::NestedQemu),
            other => Err(HarnessError::BadMode(other.into())),
        }
    }
}

/// Which form of the Debian kernel our VMM boots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelForm {
    /// The bzImage as Debian ships it (decompresses itself in the guest).
    #[default]
    BzImage,
    /// The uncompressed ELF extracted from it (`guest_image::vmlinux`).
    Vmlinux,
}

/// One guest run: which scenario, with what parameters and resources.
#[derive(Clone, Debug)]
pub struct GuestRun {
    pub scenario: Scenario,
    /// `key=value` parameters appended to the L2 command line.
    pub params: Vec<Param>,
    /// Modules for the L2 initramfs (closure added).
    pub modules: Vec<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Host files copied into the L2 initramfs.
    pub l2_files: Vec<FileMapping>,
    /// Host programs copied into the L2 initramfs with their shared
    /// libraries (e.g. util-linux `blkdiscard`, fio).
    pub l2_binaries: Vec<FileMapping>,
    /// Host files copied into the L1 initramfs (e.g. disk images for the
    /// VMM, named in `vmm_args`).
    pub l1_files: Vec<FileMapping>,
    /// Host files attached to the L1 QEMU as virtio disks (L1's `/dev/vda`,
    /// `/dev/vdb`, ...): images too big for the L1 initramfs. Written in
    /// place; L1 flushes them before it powers off.
    pub l1_disks: Vec<PathBuf>,
    /// For each of `l1_disks`, the image it is a working copy of, if any:
    /// a run whose L1 wedged is repeated only when every disk can be
    /// copied afresh.
    pub l1_disk_pristine: Vec<Option<PathBuf>>,
    /// A prebuilt L2 initramfs used instead of building one from the
    /// scenario (e.g. the root disk's initramfs).
    pub l2_initrd: Option<PathBuf>,
    /// Extra VMM arguments (e.g. `--disk path=/images/a.img`).
    pub vmm_args: Vec<String>,
    /// Extra `--memory` keys after `size=` (e.g. `limit=256M,swap=/tmp/s`).
    pub memory_opts: Option<String>,
    /// The kernel form our VMM boots (QEMU runs always get the bzImage).
    pub kernel: KernelForm,
    pub timeout: Duration,
    /// Silence after which L1's monitor is asked what L1 is doing
    /// ([`L1_SILENCE_PROBE`]).
    pub l1_silence_probe: Duration,
    /// Copy the console to stdout while running.
    pub echo_console: bool,
    /// Our stdin becomes the console's input (L1's console, whose input our
    /// VMM forwards to the guest's serial port).
    pub interactive: bool,
    /// Further attempts when L1 wedges (`$VMM_TEST_L1_RETRY`, default 0: a
    /// wedge fails the run); only runs whose L1 disks can be copied afresh
    /// are repeated.
    pub l1_retries: usize,
    /// Further attempts when L1 wedged by the emulator's fault
    /// ([`EMULATOR_FAULT_RETRIES`] unless set; 0 for a run that measures
    /// wedges).
    pub emulator_fault_retries: usize,
}

impl GuestRun {
    /// A run of `scenario` with 1 vCPU, 512 MiB, the default timeout (or
    /// `$VMM_TEST_TIMEOUT`) and no retry of a wedged L1 (or
    /// `$VMM_TEST_L1_RETRY`; a value that is not a number panics, naming
    /// the variable).
    pub fn new(scenario: Scenario) -> Self {
        let timeout = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT);
        Self {
            scenario,
            params: Vec::new(),
            modules: Vec::new(),
            cpus: 1,
            memory_mib: 512,
            l2_files: Vec::new(),
            l2_binaries: Vec::new(),
            l1_files: Vec::new(),
            l1_disks: Vec::new(),
            l1_disk_pristine: Vec::new(),
            l2_initrd: None,
            vmm_args: Vec::new(),
            memory_opts: None,
            kernel: KernelForm::BzImage,
            timeout,
            l1_silence_probe: L1_SILENCE_PROBE,
            echo_console: false,
            interactive: false,
            l1_retries: l1_retries_from_env().unwrap_or_else(|e| panic!("{e}")),
            emulator_fault_retries: EMULATOR_FAULT_RETRIES,
        }
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn memory_mib(mut self, m: u32) -> Self {
        self.memory_mib = m;
        self
    }

    pub fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push(Param::new(key, value));
        self
    }

    /// Adds modules (their closure) to the L2 initramfs.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|n| n.to_string()));
        self
    }

    /// Copies host program `src` (with its shared libraries) to `dst` in
    /// the L2 initramfs.
    pub fn l2_binary(mut self, src: impl Into<PathBuf>, dst: &str) -> Self {
        self.l2_binaries.push(FileMapping {
            src: src.into(),
            dst: dst.into(),
        });
        self
    }

    /// Attaches host file `path` to L1 as its next virtio disk.
    pub fn l1_disk(mut self, path: impl Into<PathBuf>) -> Self {
        self.l1_disks.push(path.into());
        self.l1_disk_pristine.push(None);
        self
    }

    /// Attaches `path`, a working copy of `pristine`, to L1 as its next
    /// virtio disk; a repeated run starts from a fresh copy.
    pub fn l1_disk_copy_of(
        mut self,
        path: impl Into<PathBuf>,
        pristine: impl Into<PathBuf>,
    ) -> Self {
        self.l1_disks.push(path.into());
        self.l1_disk_pristine.push(Some(pristine.into()));
        self
    }

    /// The run can be repeated: every L1 disk (if any) can be copied afresh.
    fn repeatable(&self) -> bool {
        self.l1_disk_pristine.iter().all(Option::is_some)
    }

    /// Boots L2 with this initramfs instead of the scenario's.
    pub fn l2_initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.l2_initrd = Some(path.into());
        self
    }

    /// Appends VMM arguments (e.g. `--disk path=...`).
    pub fn vmm_arg(mut self, arg: impl Into<String>) -> Self {
        self.vmm_args.push(arg.into());
        self
    }

    /// Boots the uncompressed vmlinux instead of the bzImage.
    pub fn vmlinux(mut self) -> Self {
        self.kernel = KernelForm::Vmlinux;
        self
    }

    /// The kernel's path inside L1.
    pub fn l1_kernel(&self) -> &'static str {
        match self.kernel {
            KernelForm::BzImage => l1::L2_KERNEL,
            KernelForm::Vmlinux => l1::L2_VMLINUX,
        }
    }

    pub fn l1_silence_probe(mut self, after: Duration) -> Self {
        self.l1_silence_probe = after;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Repeats the run up to `n` more times when L1 wedges (0: never).
    pub fn emulator_fault_retries(mut self, n: usize) -> Self {
        self.emulator_fault_retries = n;
        self
    }

    pub fn l1_retries(mut self, n: usize) -> Self {
        self.l1_retries = n;
        self
    }

    /// The L2 kernel command line: the base, the run's parameters and,
    /// unless the run sets one, `watchdog=` at half the run's timeout (the
    /// guest init then reports a hung scenario's kernel state while the
    /// test can still show it; see `hang_report` in `guest/lib.sh`).
    pub fn l2_cmdline(&self) -> Result<String, HarnessError> {
        let mut params = self.params.clone();
        if !params.iter().any(|p| p.key == WATCHDOG_PARAM) {
            params.push(Param::new(WATCHDOG_PARAM, self.watchdog_secs()));
        }
        Ok(cmdline::with_params(cmdline::L2_BASE, &params)?)
    }

    /// When the guest's watchdog reports: half the timeout, at least 30 s.
    fn watchdog_secs(&self) -> u64 {
        (self.timeout.as_secs() / 2).max(30)
    }
}

/// `$VMM_TEST_L1_RETRY` as a number of retries (unset or empty: 0).
pub fn l1_retries_from_env() -> Result<usize, HarnessError> {
    parse_l1_retries(std::env::var(L1_RETRY_ENV).ok().as_deref())
}

fn parse_l1_retries(value: Option<&str>) -> Result<usize, HarnessError> {
    match value.map(str::trim) {
        None | Some("") => Ok(0),
        Some(v) => v.parse().map_err(|_| HarnessError::BadRetry(v.into())),
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunResult {
    pub mode: Mode,
    /// Exit code of the L2's VMM (ours, or QEMU's mapped back to the
    /// debug-exit byte); `None` when it never reported one (timeout, L1
    /// failure).
    pub vmm_exit: Option<i32>,
    pub verdict: Verdict,
    /// The `rc=` of a `SCENARIO-FAIL` line.
    pub scenario_rc: Option<i32>,
    /// The whole console (L1 and L2 interleaved in nested modes).
    pub console: String,
    pub wall: Duration,
    pub timed_out: bool,
    /// L1 stopped for good (its timer died, see `monitor`) and was killed.
    pub l1_wedged: bool,
    /// L1 was found stuck and the harness pressed a key on its keyboard
    /// (this attempt): L1 either ran on thanks to the press, or is
    /// [`RunResult::l1_wedged`].
    pub l1_kicked: bool,
    /// The consoles of earlier attempts whose L1 wedged, when the run was
    /// repeated ([`GuestRun::l1_retries`]).
    pub wedged_attempts: Vec<String>,
    /// Time-stamped marker lines (L1-INIT, L1-KVM-READY, GUEST-INIT, ...).
    pub events: Vec<Event>,
}

impl RunResult {
    /// Pass verdict and a zero exit.
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass && self.vmm_exit == Some(0)
    }

    /// Time from launch to the first line containing `marker`.
    pub fn time_to(&self, marker: &str) -> Option<Duration> {
        self.events
            .iter()
            .find(|e| e.line.contains(marker))
            .map(|e| e.at)
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        let no_kvm = self.console.contains(verdict::MARK_L1_NO_KVM);
        format!(
            "mode={:?} verdict={:?} scenario_rc={:?} vmm_exit={:?} wall={:.1}s{}{}{}{}{}",
            self.mode,
            self.verdict,
            self.scenario_rc,
            self.vmm_exit,
            self.wall.as_secs_f64(),
            if self.timed_out { " TIMED OUT" } else { "" },
            if self.l1_wedged {
                " L1 WEDGED (harness failure: L1's timer died, see the [harness] lines)"
            } else {
                ""
            },
            if self.l1_kicked && !self.l1_wedged {
                " (L1 stuck once, woken by a key press)"
            } else {
                ""
            },
            if self.wedged_attempts.is_empty() {
                String::new()
            } else {
                format!(
                    " (attempt {}: L1 wedged on the earlier ones)",
                    self.wedged_attempts.len() + 1
                )
            },
            if no_kvm { " L1 HAS NO /dev/kvm" } else { "" }
        )
    }
}

/// Serialises guest runs within a process.
static RUNNING: Mutex<()> = Mutex::new(());

/// Guest assets (kernel, busybox) fetched once per process.
fn assets(build: &Path) -> Result<GuestAssets, HarnessError> {
    static ASSETS: OnceLock<GuestAssets> = OnceLock::new();
    static FETCH: Mutex<()> = Mutex::new(());
    if let Some(a) = ASSETS.get() {
        return Ok(a.clone());
    }
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(a) = ASSETS.get() {
        return Ok(a.clone());
    }
    let a = guest_image::fetch_assets(build)?;
    Ok(ASSETS.get_or_init(|| a).clone())
}

/// Builds images and runs guests. Runs are serialised within a process:
/// nested TCG is CPU-bound and the machines have two cores.
pub struct Harness {
    pub build: PathBuf,
    pub assets: GuestAssets,
    /// The QEMU that runs L1 when not `$QEMU` ([`Harness::with_l1_qemu`]).
    pub l1_qemu: Option<PathBuf>,
    /// How L1's kernel drives its LAPIC timer.
    pub l1_tick: L1Tick,
}

/// How L1's kernel drives its LAPIC timer (see HARNESS.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum L1Tick {
    /// A periodic tick ([`cmdline::L1_PERIODIC_TICK`]): what the harness
    /// uses, since a new timer interrupt gets a stuck TCG L1 going again.
    #[default]
    Periodic,
    /// The kernel's default one-shot timer (dynamic ticks): for measuring.
    OneShot,
}

impl L1Tick {
    /// L1's kernel command line with this tick.
    pub fn cmdline(self) -> String {
        match self {
            L1Tick::Periodic => format!("{} {}", cmdline::L1_BASE, cmdline::L1_PERIODIC_TICK),
            L1Tick::OneShot => cmdline::L1_BASE.to_string(),
        }
    }
}

impl Harness {
    /// Fetches (or finds cached) the guest assets under
    /// [`guest_image::build_dir`].
    pub fn new() -> Result<Self, HarnessError> {
        let build = guest_image::build_dir();
        let assets = assets(&build)?;
        Ok(Self {
            build,
            assets,
            l1_qemu: None,
            l1_tick: L1Tick::default(),
        })
    }

    fn images(&self) -> PathBuf {
        images_dir(&self.build)
    }

    /// Builds (or reuses) the L2 initramfs of a run; a prebuilt one
    /// ([`GuestRun::l2_initrd`]) as it is.
    pub fn l2_initramfs(&self, run: &GuestRun) -> Result<PathBuf, HarnessError> {
        if let Some(prebuilt) = &run.l2_initrd {
            return Ok(prebuilt.clone());
        }
        let spec = ScenarioImage {
            modules: run.modules.clone(),
            scenario: run.scenario.clone(),
            files: run.l2_files.clone(),
            binaries: run.l2_binaries.clone(),
        };
        let img = guest_image::build_l2(&self.assets, &spec)?;
        Ok(img.write_cached(&self.images(), &format!("l2-{}", run.scenario.name))?)
    }

    /// Runs `run` in `mode`.
    pub fn run(&self, run: &GuestRun, mode: Mode) -> Result<RunResult, HarnessError> {
        // Build and run under one lock: images are pruned as others are
        // written, so one built early could be gone by the time it runs.
        let _one_at_a_time = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let l2_initrd = self.l2_initramfs(run)?;
        let l2_cmdline = run.l2_cmdline()?;
        match mode {
            Mode::Nested => {
                let vmm = host::vmm_binary(true)?;
                let payload = L1Payload::Vmm {
                    binary: vmm,
                    args: vmm_args(run, &l2_cmdline),
                };
                self.run_l1(run, &l2_initrd, payload, mode)
            }
            Mode::NestedQemu => {
                let payload = L1Payload::Qemu {
                    binary: host::qemu_binary()?,
                    args: qemu_l2_args(run, l1::L2_KERNEL, l1::L2_INITRD, &l2_cmdline, "kvm"),
                };
                self.run_l1(run, &l2_initrd, payload, mode)
            }
            Mode::Direct => {
                let kind = host::detect_kvm();
                if kind != KvmKind::Ordinary {
                    return Err(HarnessError::NoDirectKvm(kind));
                }
                let vmm = host::vmm_binary(false)?;
                let kernel = self.host_kernel(run).display().to_string();
                let initrd = l2_initrd.display().to_string();
                let mut cmd = Command::new(vmm);
                cmd.args(vmm_args_with(run, &l2_cmdline, &kernel, &initrd));
                let cap = process::run_bounded(&mut cmd, &opts(run))?;
                let vmm_exit = cap.status.and_then(|s| s.code());
                Ok(finish(mode, cap, vmm_exit))
            }
            Mode::QemuTcg => {
                let kernel = self.assets.kernel.vmlinuz.display().to_string();
                let initrd = l2_initrd.display().to_string();
                let mut cmd = Command::new(host::qemu_binary()?);
                cmd.args(qemu_l2_args(run, &kernel, &initrd, &l2_cmdline, "tcg"));
                let cap = process::run_bounded(&mut cmd, &opts(run))?;
                let vmm_exit = cap
                    .status
                    .and_then(|s| s.code())
                    .map(verdict::qemu_debug_exit_to_status);
                Ok(finish(mode, cap, vmm_exit))
            }
        }
    }

    /// Boots L1 with a custom payload (e.g. an [`L1Payload::Script`] that
    /// checks L1 itself); the run's L2 image is still built and included.
    pub fn run_l1_payload(
        &self,
        run: &GuestRun,
        payload: L1Payload,
    ) -> Result<RunResult, HarnessError> {
        let _one_at_a_time = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let l2_initrd = self.l2_initramfs(run)?;
        self.run_l1(run, &l2_initrd, payload, Mode::Nested)
    }

    /// Runs a POSIX sh script that calls the VMM (perhaps several times) and
    /// does host-side work around it, e.g. creates disk images and checks
    /// them after the guest exits. Nested: the script runs in L1 (the VMM
    /// at [`l1::VMM_PATH`], scratch in L1's tmpfs); direct: on this host
    /// with a temporary scratch directory. `vmm_exit` is the script's exit
    /// status.
    pub fn run_vmm_script(
        &self,
        run: &GuestRun,
        mode: Mode,
        script: impl Fn(&ScriptPaths) -> String,
    ) -> Result<RunResult, HarnessError> {
        match mode {
            Mode::Nested => {
                let paths = ScriptPaths {
                    vmm: l1::VMM_PATH.into(),
                    kernel: run.l1_kernel().into(),
                    initrd: l1::L2_INITRD.into(),
                    scratch: "/tmp".into(),
                    disks: (0..run.l1_disks.len()).map(l1::disk_device).collect(),
                };
                let payload = L1Payload::VmmScript {
                    binary: host::vmm_binary(true)?,
                    script: script(&paths),
                };
                self.run_l1_payload(run, payload)
            }
            Mode::Direct => {
                let kind = host::detect_kvm();
                if kind != KvmKind::Ordinary {
                    return Err(HarnessError::NoDirectKvm(kind));
                }
                let _one_at_a_time = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
                let l2_initrd = self.l2_initramfs(run)?;
                let scratch = std::env::temp_dir().join(format!(
                    "vmm-script-{}-{}",
                    std::process::id(),
                    run.scenario.name
                ));
                std::fs::create_dir_all(&scratch).map_err(|source| HarnessError::Scratch {
                    path: scratch.clone(),
                    source,
                })?;
                let paths = ScriptPaths {
                    vmm: host::vmm_binary(false)?.display().to_string(),
                    kernel: self.host_kernel(run).display().to_string(),
                    initrd: l2_initrd.display().to_string(),
                    scratch: scratch.display().to_string(),
                    disks: run
                        .l1_disks
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect(),
                };
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(script(&paths));
                let cap = process::run_bounded(&mut cmd, &opts(run));
                let _ = std::fs::remove_dir_all(&scratch);
                let cap = cap?;
                let vmm_exit = cap.status.and_then(|s| s.code());
                Ok(finish(mode, cap, vmm_exit))
            }
            other => Err(HarnessError::ScriptMode(other)),
        }
    }

    /// Builds the L1 image around `payload` and boots it under QEMU TCG.
    fn run_l1(
        &self,
        run: &GuestRun,
        l2_initrd: &Path,
        payload: L1Payload,
        mode: Mode,
    ) -> Result<RunResult, HarnessError> {
        let mut files = run.l1_files.clone();
        if run.kernel == KernelForm::Vmlinux {
            files.push(FileMapping {
                src: self.assets.kernel.vmlinux.clone(),
                dst: l1::L2_VMLINUX.into(),
            });
        }
        let l1_initrd = self.l1_initramfs(l2_initrd, &payload, &files, run.l1_disks.len())?;
        let (mut cap, mut kicked) =
            self.boot_l1(&l1_initrd, &run.l1_disks, &opts(run), run.l1_silence_probe)?;
        // An L1 that stopped for good (QEMU TCG's, not ours: see `monitor`)
        // is the harness failing, not the code under test. It fails the run
        // unless retries were asked for ($VMM_TEST_L1_RETRY): a retry would
        // hide a hang of ours that looks the same from outside.
        let mut wedged_attempts = Vec::new();
        while cap.wedged {
            let probes: Vec<&str> = cap
                .console
                .lines()
                .filter(|l| l.starts_with("[harness]") || l.contains("KERNEL-MAP"))
                .collect();
            let allowed = if cap.emulator_fault {
                run.l1_retries.max(run.emulator_fault_retries)
            } else {
                run.l1_retries
            };
            let again = run.repeatable() && wedged_attempts.len() < allowed;
            let notice = format!(
                "[harness] L1 wedged after {:.0}s in {}; {}. What the monitor saw:\n{}",
                cap.wall.as_secs_f64(),
                run.scenario.name,
                if again && cap.emulator_fault && run.l1_retries < allowed {
                    "the emulator's fault: running it again on a fresh L1".to_string()
                } else if again {
                    format!(
                        "running it again (retry {} of {allowed}, {L1_RETRY_ENV})",
                        wedged_attempts.len() + 1,
                    )
                } else if allowed > 0 && !run.repeatable() {
                    "not repeated (an L1 disk is no copy)".to_string()
                } else {
                    format!("the run fails (set {L1_RETRY_ENV}=N to retry N times)")
                },
                probes.join("\n")
            );
            // Straight to fd 2, past libtest's capture: a retry shows in the
            // log of a test that then passes.
            let _ = writeln!(std::io::stderr(), "{notice}");
            if !again {
                break;
            }
            for (disk, pristine) in run.l1_disks.iter().zip(&run.l1_disk_pristine) {
                if let Some(pristine) = pristine {
                    guest_image::rootfs::copy_image(pristine, disk)?;
                }
            }
            wedged_attempts.push(std::mem::take(&mut cap.console));
            (cap, kicked) =
                self.boot_l1(&l1_initrd, &run.l1_disks, &opts(run), run.l1_silence_probe)?;
        }
        let mut vmm_exit = verdict::parse_l1_exit(&cap.console);
        if mode == Mode::NestedQemu {
            vmm_exit = vmm_exit.map(verdict::qemu_debug_exit_to_status);
        }
        let mut r = finish(mode, cap, vmm_exit);
        r.l1_kicked = kicked;
        r.wedged_attempts = wedged_attempts;
        Ok(r)
    }

    /// The kernel file on this host that `run` boots with our VMM.
    fn host_kernel(&self, run: &GuestRun) -> &Path {
        match run.kernel {
            KernelForm::BzImage => &self.assets.kernel.vmlinuz,
            KernelForm::Vmlinux => &self.assets.kernel.vmlinux,
        }
    }

    /// Builds (or reuses) an L1 initramfs; with `disks` > 0 it loads
    /// virtio-blk and waits for that many disks before the payload.
    pub fn l1_initramfs(
        &self,
        l2_initrd: &Path,
        payload: &L1Payload,
        files: &[FileMapping],
        disks: usize,
    ) -> Result<PathBuf, HarnessError> {
        let img: Initramfs = l1::build(&self.assets, l2_initrd, payload, files, disks)?;
        Ok(img.write_cached(&self.images(), "l1")?)
    }

    /// Boots an L1 image under QEMU TCG with an SVM-capable CPU, one vCPU
    /// (multi-threaded TCG proved unreliable for nested guests), and `disks`
    /// as its virtio disks. When L1 has been silent for `probe_after`, its
    /// monitor is asked what it is doing (reported on the console); an L1
    /// found stopped for good is killed ([`process::Captured::wedged`]).
    /// Also says whether a key press was needed to get L1 going again.
    pub fn boot_l1(
        &self,
        l1_initrd: &Path,
        disks: &[PathBuf],
        opts: &RunOptions,
        probe_after: Duration,
    ) -> Result<(process::Captured, bool), HarnessError> {
        let qemu = self.l1_qemu()?;
        let mut cmd = Command::new(&qemu);
        for dir in host::qemu_data_dirs(&qemu) {
            cmd.arg("-L").arg(dir);
        }
        if let Some(dir) = host::qemu_module_dir(&qemu) {
            cmd.env("QEMU_MODULE_DIR", dir);
        }
        cmd.args(l1_qemu_args(
            &self.assets.kernel.vmlinuz,
            l1_initrd,
            L1_MEMORY_MIB,
            &self.l1_tick.cmdline(),
        ));
        for d in disks {
            cmd.args(l1_disk_args(d));
        }
        let hmp = monitor::socket_path();
        cmd.args(monitor::qemu_args(&hmp));
        let kicked = std::cell::Cell::new(false);
        let probe = || probe_l1(&hmp, probe_after, &kicked);
        let opts = RunOptions {
            silence: Some(Silence {
                after: probe_after,
                probe: &probe,
            }),
            ..*opts
        };
        let cap = process::run_bounded(&mut cmd, &opts);
        let _ = std::fs::remove_file(&hmp);
        // Whether the press helped (L1 ran on) or not (`wedged`).
        Ok((cap?, kicked.get()))
    }

    /// The QEMU that runs L1: [`Harness::with_l1_qemu`]'s, else
    /// [`host::qemu_binary`].
    pub fn l1_qemu(&self) -> Result<PathBuf, HarnessError> {
        match &self.l1_qemu {
            Some(q) => Ok(q.clone()),
            None => Ok(host::qemu_binary()?),
        }
    }

    /// Runs L1 under `qemu` instead of `$QEMU` (the peer QEMU inside L1
    /// stays `$QEMU`'s).
    pub fn with_l1_qemu(mut self, qemu: impl Into<PathBuf>) -> Self {
        self.l1_qemu = Some(qemu.into());
        self
    }
}

fn opts(run: &GuestRun) -> RunOptions<'static> {
    RunOptions {
        timeout: run.timeout,
        echo: run.echo_console,
        markers: MARKERS,
        inherit_stdin: run.interactive,
        silence: None,
    }
}

/// Looks at a silent L1 twice, [`L1_SECOND_LOOK`] apart. When both looks
/// find its LAPIC timer stalled (`L1State::timer_stalled`) and its vCPU at the same
/// instruction ([`monitor::stuck`]), presses a key on L1's keyboard (a new
/// interrupt makes QEMU look at the APIC again, where the timer's vector
/// waits in IRR; that has woken such an L1, not always) and looks a third
/// time: wedged unless the timer runs again.
/// One key press per run (`kicked`): stuck again later means wedged.
fn probe_l1(hmp: &Path, silent_for: Duration, kicked: &std::cell::Cell<bool>) -> Probe {
    let looks = (|| -> std::io::Result<_> {
        let (a, _) = monitor::l1_state(hmp)?;
        std::thread::sleep(L1_SECOND_LOOK);
        let (b, lapic) = monitor::l1_state(hmp)?;
        Ok((a, b, lapic))
    })();
    let (a, b, lapic) = match looks {
        Ok(looks) => looks,
        Err(e) => {
            return Probe {
                report: format!("L1 silent for {}s; its monitor: {e}", silent_for.as_secs()),
                wedged: false,
                emulator_fault: false,
            }
        }
    };
    let mut report = format!(
        "L1 silent for {}s; its vCPU: {}\n{}s later: {}\n",
        silent_for.as_secs(),
        a.summary(),
        L1_SECOND_LOOK.as_secs(),
        b.summary()
    );
    if !monitor::stuck(&a, &b) {
        return Probe {
            report,
            wedged: false,
            emulator_fault: false,
        };
    }
    report.push_str("L1's LAPIC timer is not running and its vCPU has not moved:\n");
    report.push_str(&lapic);
    if kicked.replace(true) {
        report.push_str("stuck again after an earlier key press; stopping L1\n");
        let emulator_fault = monitor::emulator_fault(&[&a, &b]);
        return Probe {
            report,
            wedged: true,
            emulator_fault,
        };
    }
    let third = monitor::press_key(hmp).and_then(|()| {
        std::thread::sleep(L1_SECOND_LOOK);
        monitor::l1_state(hmp)
    });
    let (wedged, emulator_fault) = match third {
        Ok((c, _)) if !c.timer_stalled() => {
            report.push_str(&format!(
                "a key press on L1's keyboard woke it: {}\n",
                c.summary()
            ));
            (false, false)
        }
        Ok((c, _)) => {
            report.push_str(&format!(
                "a key press did not wake it ({}); stopping L1\n",
                c.summary()
            ));
            (true, monitor::emulator_fault(&[&a, &b, &c]))
        }
        Err(e) => {
            report.push_str(&format!("cannot press a key ({e}); stopping L1\n"));
            (true, false)
        }
    };
    if emulator_fault {
        report.push_str(
            "IF=1 and the timer's vector above PPR at every look: a CPU must take it, \
             so this stall is the emulator's (no hang of L1 or L2 can cause it)\n",
        );
    }
    Probe {
        report,
        wedged,
        emulator_fault,
    }
}

fn finish(mode: Mode, cap: process::Captured, vmm_exit: Option<i32>) -> RunResult {
    let (verdict, scenario_rc) = verdict::parse_verdict(&cap.console);
    RunResult {
        mode,
        vmm_exit: if cap.timed_out { None } else { vmm_exit },
        verdict,
        scenario_rc,
        console: cap.console,
        wall: cap.wall,
        timed_out: cap.timed_out,
        l1_wedged: cap.wedged,
        l1_kicked: false,
        wedged_attempts: Vec::new(),
        events: cap.events,
    }
}

/// QEMU arguments for the L1 machine.
pub fn l1_qemu_args(kernel: &Path, initrd: &Path, memory_mib: u32, cmdline: &str) -> Vec<String> {
    [
        "-accel",
        "tcg",
        "-cpu",
        "EPYC,+svm,+npt",
        "-m",
        &memory_mib.to_string(),
        "-smp",
        "1",
        "-nic",
        "none",
        "-nographic",
        "-no-reboot",
        "-kernel",
        &kernel.display().to_string(),
        "-initrd",
        &initrd.display().to_string(),
        "-append",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// QEMU arguments attaching a raw host file to L1 as a virtio disk.
pub fn l1_disk_args(path: &Path) -> Vec<String> {
    // QEMU splits -drive options at commas; a comma in a path is doubled.
    let file = path.display().to_string().replace(',', ",,");
    vec![
        "-drive".into(),
        format!("file={file},format=raw,if=virtio,cache=writeback"),
    ]
}

/// QEMU arguments booting the L2 guest directly (`accel` = tcg or kvm), with
/// the debug-exit device on the same port as our VMM's.
pub fn qemu_l2_args(
    run: &GuestRun,
    kernel: &str,
    initrd: &str,
    cmdline: &str,
    accel: &str,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-accel",
        accel,
        "-m",
        &run.memory_mib.to_string(),
        "-smp",
        &run.cpus.to_string(),
        "-nic",
        "none",
        "-nographic",
        "-no-reboot",
        "-device",
        &format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=0x01"),
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if accel == "kvm" {
        args.splice(2..2, ["-cpu".to_string(), "host".to_string()]);
    }
    args
}

/// Our VMM's arguments for a run inside L1 (paths inside the L1 image).
pub fn vmm_args(run: &GuestRun, cmdline: &str) -> Vec<String> {
    vmm_args_with(run, cmdline, run.l1_kernel(), l1::L2_INITRD)
}

/// Our VMM's arguments: the CLI contract `--kernel --initramfs --cmdline
/// --cpus --memory size=<N>M --serial stdout` plus the run's extras.
pub fn vmm_args_with(run: &GuestRun, cmdline: &str, kernel: &str, initrd: &str) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--kernel".into(),
        kernel.into(),
        "--initramfs".into(),
        initrd.into(),
        "--cmdline".into(),
        cmdline.into(),
        "--cpus".into(),
        run.cpus.to_string(),
        "--memory".into(),
        match &run.memory_opts {
            Some(extra) => format!("size={}M,{extra}", run.memory_mib),
            None => format!("size={}M", run.memory_mib),
        },
        "--serial".into(),
        "stdout".into(),
    ];
    args.extend(run.vmm_args.iter().cloned());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmm_cli_contract() {
        let run = GuestRun::new(Scenario::inline("t", "true"))
            .cpus(2)
            .memory_mib(256)
            .param("expect_cpus", 2);
        let line = run.l2_cmdline().unwrap();
        assert!(line.starts_with(cmdline::L2_BASE));
        assert!(line.contains(" expect_cpus=2"));
        let args = vmm_args(&run, &line);
        assert_eq!(
            args,
            vec![
                "--kernel",
                "/l2/vmlinuz",
                "--initramfs",
                "/l2/initrd.gz",
                "--cmdline",
                line.as_str(),
                "--cpus",
                "2",
                "--memory",
                "size=256M",
                "--serial",
                "stdout"
            ]
        );
    }

    #[test]
    fn only_runs_whose_disks_can_be_copied_afresh_are_repeated() {
        let run = || GuestRun::new(Scenario::inline("t", "true"));
        assert!(run().repeatable());
        assert!(run().l1_disk_copy_of("/w/a.img", "/p/a.img").repeatable());
        assert!(!run().l1_disk("/w/a.img").repeatable());
        assert!(!run()
            .l1_disk_copy_of("/w/a.img", "/p/a.img")
            .l1_disk("/w/b.img")
            .repeatable());
        let r = run().l1_disk_copy_of("/w/a.img", "/p/a.img");
        assert_eq!(r.l1_disks, vec![PathBuf::from("/w/a.img")]);
    }

    #[test]
    fn l1_retries_only_when_asked() {
        assert_eq!(parse_l1_retries(None).unwrap(), 0);
        assert_eq!(parse_l1_retries(Some("")).unwrap(), 0);
        assert_eq!(parse_l1_retries(Some("0")).unwrap(), 0);
        assert_eq!(parse_l1_retries(Some(" 2 ")).unwrap(), 2);
        for bad in ["yes", "-1", "1.5"] {
            let e = parse_l1_retries(Some(bad)).unwrap_err();
            assert!(e.to_string().contains(L1_RETRY_ENV), "{e}");
        }
        let run = GuestRun::new(Scenario::inline("t", "true")).l1_retries(3);
        assert_eq!(run.l1_retries, 3);
    }

    #[test]
    fn guest_watchdog_reports_inside_the_run_timeout() {
        let run = GuestRun::new(Scenario::inline("t", "true")).timeout(Duration::from_secs(1200));
        let line = run.l2_cmdline().unwrap();
        assert_eq!(cmdline::lookup(&line, WATCHDOG_PARAM), Some("600"));
        let short = run.timeout(Duration::from_secs(20)).l2_cmdline().unwrap();
        assert_eq!(cmdline::lookup(&short, WATCHDOG_PARAM), Some("30"));
        // A run's own value wins and is not repeated.
        let own = GuestRun::new(Scenario::inline("t", "true"))
            .param(WATCHDOG_PARAM, 0)
            .l2_cmdline()
            .unwrap();
        assert_eq!(own.matches("watchdog=").count(), 1);
        assert_eq!(cmdline::lookup(&own, WATCHDOG_PARAM), Some("0"));
    }

    #[test]
    fn qemu_args() {
        let run = GuestRun::new(Scenario::inline("t", "true")).cpus(2);
        let a = qemu_l2_args(&run, "k", "i", "c", "kvm");
        assert_eq!(&a[..4], &["-accel", "kvm", "-cpu", "host"]);
        assert!(a.contains(&"isa-debug-exit,iobase=0xf4,iosize=0x01".to_string()));
        let l1 = l1_qemu_args(
            Path::new("k"),
            Path::new("i"),
            2048,
            &L1Tick::Periodic.cmdline(),
        );
        let append = l1.iter().position(|s| s == "-append").unwrap();
        assert!(
            l1[append + 1].ends_with("nohz=off highres=off"),
            "{}",
            l1[append + 1]
        );
        assert!(!L1Tick::OneShot.cmdline().contains("nohz"));
        let smp = l1.iter().position(|s| s == "-smp").unwrap();
        assert_eq!(l1[smp + 1], "1");
        assert!(l1.contains(&"EPYC,+svm,+npt".to_string()));
        assert_eq!(
            l1_disk_args(Path::new("/b/root,1.ext4")),
            vec![
                "-drive",
                "file=/b/root,,1.ext4,format=raw,if=virtio,cache=writeback"
            ]
        );
    }
}
