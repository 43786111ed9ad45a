//! Seccomp filters: one syscall allow-list per kind of VMM thread
//! (`--seccomp on|log|off`, README "Seccomp", RELIABILITY.md "Seccomp").
//!
//! # Thread kinds and who installs what
//!
//! | kind | threads | installed by |
//! |---|---|---|
//! | [`ThreadKind::Vcpu`] | `vcpuN` | the thread itself, first thing in `Vcpu::run` |
//! | [`ThreadKind::Device`] | `virtio`, `xhci` (device event loops) | the thread itself, through `devices::thread_start` |
//! | [`ThreadKind::Pager`] | `pager-fault`, `pager-wait`, `pager-swapin`, `pager-reclaim`, `pager-writeback` | the thread itself, first thing in `memory::pager::spawn` |
//! | [`ThreadKind::Api`] | `api` (accept loop); `api-reader`, `api-writer` (one pair per connection) | `api` itself; the per-connection threads inherit it (see below) |
//! | [`ThreadKind::Helper`] | `signals`, `serial-input`, `stall-watchdog`, `halt-watch`, `balloon-policy`, `pager-watch` | the thread itself |
//! | [`ThreadKind::Main`] | the main thread: control loop, API commands (hot-plug, balloon), the orderly stop | `vm::run`, after the last start-up thread is spawned and before it waits for the VM |
//!
//! `seccomp(2)` filters apply to the calling thread, are inherited by the
//! threads it creates later, and stack: a thread runs a syscall only if
//! every filter it carries allows it. Hence the order:
//!
//! - Each thread installs its kind's filter as the first thing it runs
//!   ([`apply`]), so the thread runs under exactly its own list.
//! - The main thread installs its own filter last, after it has spawned
//!   every start-up thread, so no thread inherits the main thread's list on
//!   top of its own. After that point the main thread creates no threads
//!   (hot-plug reuses the `xhci` loop; no thread is created on demand), so
//!   its list has no `clone`.
//! - The only thread that creates threads after start-up is `api`: one
//!   `api-reader` and one `api-writer` per connection. They do not install
//!   a filter of their own: they inherit the `api` filter, which therefore
//!   also holds what they need (socket reads and writes, `shutdown`) and
//!   what creating them needs (`clone3`, `set_robust_list`, `rseq`, `prctl`
//!   for the thread name).
//! - Threads spawned by library code at run time: none (device event loops
//!   are created at start-up; `EventLoop::spawn` runs the hook set with
//!   `devices::set_thread_start_hook`).
//!
//! # What a forbidden syscall does
//!
//! `on` (the default): the kernel sends SIGSYS to the thread (SECCOMP_RET_TRAP);
//! `on_sigsys` writes one line `error: seccomp: thread 'NAME' made the
//! forbidden system call N args 0xA, 0xB (...)` on stderr and the process exits with
//! [`SECCOMP_EXIT`] (75) at once, without the orderly stop (no terminal
//! restore, the API socket file stays). `log`: the kernel allows the call
//! and logs it (SECCOMP_RET_LOG: a `type=1326 audit` line with `syscall=N`
//! in the kernel log, `dmesg`), for finding a missing entry. `off`: no filter.
//!
//! vCPU, pager and API threads need no file opened, but `openat` fails
//! there with EACCES instead of stopping the VMM: the C library's malloc
//! opens `/sys/devices/system/cpu/online` (and `/proc/stat`) to size its
//! arena count once a process has more than 8 arenas, and
//! `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread
//! heap, from whichever thread gets there first, and it copes with a failed
//! open (seen under strace). A second filter on those threads answers
//! `openat` with EACCES; their kind's list lets `openat` through, because a
//! trap from it would win over the errno. [`apply`] also makes one
//! allocation before the filters so that the thread's arena exists by then.
//!
//! # Arguments
//!
//! `ioctl` is restricted by request number where the set is clear: the KVM
//! ioctls by their type byte (0xAE, all of them: the exact set depends on
//! kvm-ioctls' internals and on the exits the guest causes), userfaultfd
//! ioctls by theirs (0xAA), terminal and fd-flag ioctls by number. `tgkill`
//! is restricted to the vCPU kick signal (SIGRTMIN) and SIGABRT (a Rust
//! abort). Other arguments (open flags, `fcntl` commands, `madvise`
//! advice, `mmap` protections) are left unrestricted: they vary with the C
//! library (static or dynamic glibc), and a restriction that missed one
//! case would kill the VM.
//!
//! How the lists were found: `strace -f` of the host tests that boot tiny
//! guests on /dev/kvm (`vmm/tests/guest_end.rs`), the pager and balloon
//! tests (`vmm/tests/pager.rs`, `vmm/tests/balloon_sink.rs`), the control
//! API and hot-plug tests (`vmm/tests/vmm_ctl.rs`,
//! `vmm/tests/bad_input_sweep.rs`), per thread name; plus the code paths
//! those tests do not reach, read from the code (disk I/O on vCPU threads
//! with `--usb-io vcpu`, discard, flush, detach, error logging, exit).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use thiserror::Error;

/// Exit status after a forbidden system call (README "Exit status").
pub const SECCOMP_EXIT: u8 = 75;

/// `--seccomp`: what a system call outside its thread's list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Stop the VMM (SIGSYS, one line on stderr, exit status 75).
    #[default]
    On,
    /// Allow it and have the kernel log it (SECCOMP_RET_LOG).
    Log,
    /// No filters.
    Off,
}

impl Mode {
    /// Parses `on`, `log` or `off`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!("'{s}' is not on, log or off")),
        }
    }
}

/// The kinds of VMM threads, each with its own list (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    Main,
    Vcpu,
    Device,
    Pager,
    Api,
    Helper,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        Self::Main,
        Self::Vcpu,
        Self::Device,
        Self::Pager,
        Self::Api,
        Self::Helper,
    ];

    /// Whether `openat` fails with EACCES here instead of being allowed.
    fn denies_open(self) -> bool {
        matches!(self, Self::Vcpu | Self::Pager | Self::Api)
    }
}

#[derive(Debug, Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for {0:?} threads")]
    Build(ThreadKind, #[source] seccompiler::BackendError),
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    #[error("cannot install the seccomp filter")]
    Apply(#[source] seccompiler::Error),
    #[error("this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER); run with --seccomp off")]
    Unsupported(#[source] std::io::Error),
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Allows each of `nrs` unconditionally.
fn allow(rules: &mut Rules, nrs: &[libc::c_long]) {
    for &nr in nrs {
        rules.insert(nr, Vec::new());
    }
}

/// Allows `nr` when one of `more` matches (kept unconditional if it is).
fn allow_if(rules: &mut Rules, nr: libc::c_long, more: Vec<SeccompRule>) {
    match rules.get_mut(&nr) {
        Some(existing) if existing.is_empty() => {}
        Some(existing) => existing.extend(more),
        None => {
            rules.insert(nr, more);
        }
    }
}

/// A rule: argument `arg` (32 bits) compared with `op` to `value`.
fn arg32(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompRule {
    // Only fails on an empty condition list or an argument index above 5.
    SeccompRule::new(vec![SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        op,
        value,
    )
    .expect("valid condition")])
    .expect("valid rule")
}

/// ioctl requests whose type byte (bits 8-15) is `ty`.
fn ioctl_type(ty: u8) -> SeccompRule {
    arg32(1, SeccompCmpOp::MaskedEq(0xff00), u64::from(ty) << 8)
}

/// ioctl request `req` exactly.
fn ioctl_eq(req: libc::c_ulong) -> SeccompRule {
    arg32(1, SeccompCmpOp::Eq, req)
}

/// KVM's ioctl type (`KVMIO`).
const KVMIO: u8 = 0xAE;
/// userfaultfd's ioctl type (`UFFDIO`).
const UFFDIO: u8 = 0xAA;

/// The KVM ioctls (system, VM and vCPU fds).
fn kvm_ioctls() -> Vec<SeccompRule> {
    vec![ioctl_type(KVMIO)]
}

/// The userfaultfd ioctls (UFFDIO_COPY, _ZEROPAGE, _WAKE, _WRITEPROTECT,
/// _REGISTER, _UNREGISTER, _API).
fn uffd_ioctls() -> Vec<SeccompRule> {
    vec![ioctl_type(UFFDIO)]
}

/// Terminal ioctls: raw mode for the console and its restore
/// (tcgetattr/tcsetattr, isatty), the window size.
fn terminal_ioctls() -> Vec<SeccompRule> {
    [
        libc::TCGETS,
        libc::TCSETS,
        libc::TCSETSW,
        libc::TCSETSF,
        libc::TIOCGWINSZ,
    ]
    .into_iter()
    .map(ioctl_eq)
    .collect()
}

/// Terminal queries (isatty, the window size): the logger asks whether
/// stderr is a terminal from whichever thread logs (seen: a vCPU's
/// triple-fault warning with stderr on L1's console).
fn terminal_queries() -> Vec<SeccompRule> {
    [libc::TCGETS, libc::TIOCGWINSZ]
        .into_iter()
        .map(ioctl_eq)
        .collect()
}

/// fd-flag ioctls the standard library uses (`set_nonblocking` is FIONBIO).
fn fd_ioctls() -> Vec<SeccompRule> {
    [libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX]
        .into_iter()
        .map(ioctl_eq)
        .collect()
}

/// The vCPU kick (SIGRTMIN, see `vcpu::install_kick_handler`) and SIGABRT.
fn tgkill_kick_and_abort() -> Vec<SeccompRule> {
    vec![
        arg32(2, SeccompCmpOp::Eq, libc::SIGRTMIN() as u64),
        arg32(2, SeccompCmpOp::Eq, libc::SIGABRT as u64),
    ]
}

/// What every thread needs.
fn base(r: &mut Rules) {
    allow(
        r,
        &[
            // eventfds (stop, kicks, irqfds, wake-ups), pipes, stderr (log
            // lines, error reports, the SIGSYS report itself).
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            // Locks, channels, condition variables, sleeps and timeouts.
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_clock_getres,
            libc::SYS_gettimeofday,
            // A call interrupted by the kick signal (SA_RESTART) resumes.
            libc::SYS_restart_syscall,
            // The allocator (malloc arenas and large blocks), the thread
            // stack and its guard, guest RAM discards.
            libc::SYS_mmap,
            libc::SYS_munmap,
            libc::SYS_mremap,
            libc::SYS_mprotect,
            libc::SYS_madvise,
            libc::SYS_brk,
            // Signal handlers return (the vCPU kick); the stop signals stay
            // blocked; the alternate signal stack goes at thread exit.
            libc::SYS_rt_sigreturn,
            libc::SYS_rt_sigprocmask,
            libc::SYS_sigaltstack,
            // A crash stays a crash: Rust's SIGSEGV/SIGBUS handler puts the
            // default action back before the fault repeats (a trap there
            // would report a crash as a seccomp stop).
            libc::SYS_rt_sigaction,
            // Thread and process exit.
            libc::SYS_exit,
            libc::SYS_exit_group,
            // Thread ids (NOIO registration, log lines), hash seeds,
            // the C library's CPU count.
            libc::SYS_getpid,
            libc::SYS_gettid,
            libc::SYS_getrandom,
            libc::SYS_sched_getaffinity,
            // A panic's report: with RUST_BACKTRACE the backtrace looks for
            // the binary's symbols (its opens fail with EACCES on threads
            // that refuse `openat`, and the frames stay unnamed).
            libc::SYS_getcwd,
            libc::SYS_readlink,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_lseek,
        ],
    );
    // A Rust abort raises SIGABRT on the calling thread.
    allow_if(
        r,
        libc::SYS_tgkill,
        vec![arg32(2, SeccompCmpOp::Eq, libc::SIGABRT as u64)],
    );
    allow_if(r, libc::SYS_ioctl, terminal_queries());
}

/// Reads and writes of disk images and the swap file, flushes, discards.
fn file_io(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_preadv,
            libc::SYS_pwritev,
            libc::SYS_preadv2,
            libc::SYS_pwritev2,
            libc::SYS_lseek,
            libc::SYS_fdatasync,
            libc::SYS_fsync,
            // Discard (punch hole) and write-zeroes.
            libc::SYS_fallocate,
            // Image size and type (std's metadata: statx, or fstat/newfstatat).
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_statx,
            // try_clone (F_DUPFD_CLOEXEC), O_NONBLOCK, OFD locks.
            libc::SYS_fcntl,
            libc::SYS_dup,
        ],
    );
}

/// Timers: the xHCI interrupt moderation timer (armed by whichever thread
/// raises an xHCI interrupt: a vCPU with `--usb-io vcpu`, the `xhci` loop,
/// the main thread on hot-plug) and the balloon's statistics timer
/// (created when the guest driver starts the device, on a vCPU thread).
fn timers(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
            libc::SYS_timerfd_gettime,
        ],
    );
}

/// Creating threads (only `api` does after start-up).
fn spawn_threads(r: &mut Rules) {
    allow(
        r,
        &[
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_set_robust_list,
            libc::SYS_rseq,
        ],
    );
    // The new thread's name (std::thread::Builder::name).
    allow_if(
        r,
        libc::SYS_prctl,
        vec![arg32(0, SeccompCmpOp::Eq, libc::PR_SET_NAME as u64)],
    );
}

/// The allow-list for `kind`.
pub fn rules(kind: ThreadKind) -> Rules {
    let mut r = Rules::new();
    base(&mut r);
    match kind {
        ThreadKind::Vcpu => {
            // KVM_RUN, register and MP-state reads (halt probe), MSI-X
            // routing, ioeventfd/irqfd set-up when the guest enables a device.
            allow_if(&mut r, libc::SYS_ioctl, kvm_ioctls());
            // Device activation (DRIVER_OK) creates eventfds; with
            // `--usb-io vcpu` USB transfers do disk I/O here.
            allow(&mut r, &[libc::SYS_eventfd2]);
            file_io(&mut r);
            timers(&mut r);
        }
        ThreadKind::Device => {
            // The event loop.
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_eventfd2,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                ],
            );
            // Interrupts: KVM_IRQ_LINE (INTx), KVM_SET_GSI_ROUTING.
            allow_if(&mut r, libc::SYS_ioctl, kvm_ioctls());
            // Balloon discards through the pager (UFFDIO_WAKE of a page
            // dropped under a waiting fault).
            allow_if(&mut r, libc::SYS_ioctl, uffd_ioctls());
            // Disk I/O of virtio-blk and USB storage (`--usb-io thread`).
            file_io(&mut r);
            timers(&mut r);
            // The balloon's resident-set figure (/proc/self/statm).
            allow(&mut r, &[libc::SYS_openat, libc::SYS_mincore]);
        }
        ThreadKind::Pager => {
            // The fault queue: poll and read the userfaultfd, then
            // UFFDIO_COPY/_ZEROPAGE/_WAKE/_WRITEPROTECT.
            allow(
                &mut r,
                &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_mincore],
            );
            allow_if(&mut r, libc::SYS_ioctl, uffd_ioctls());
            // Swap file reads and writes (and /proc/self/mem reads, which
            // do not fault), its flushes and hole punching.
            file_io(&mut r);
            allow(&mut r, &[libc::SYS_ftruncate]);
        }
        ThreadKind::Api => {
            // The accept loop and the per-connection reader and writer.
            allow(
                &mut r,
                &[
                    libc::SYS_accept4,
                    libc::SYS_accept,
                    libc::SYS_recvfrom,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_sendmsg,
                    libc::SYS_shutdown,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_fcntl,
                ],
            );
            allow_if(&mut r, libc::SYS_ioctl, fd_ioctls());
            // One reader and one writer thread per connection.
            spawn_threads(&mut r);
        }
        ThreadKind::Helper => {
            // signals: sigwait/sigtimedwait; serial-input: poll and read
            // stdin; stall-watchdog: /proc/self/task/N/comm for its report
            // (std's read_to_string also asks the size and position).
            allow(
                &mut r,
                &[
                    libc::SYS_rt_sigtimedwait,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_openat,
                    libc::SYS_fcntl,
                    libc::SYS_statx,
                    libc::SYS_fstat,
                    libc::SYS_newfstatat,
                    libc::SYS_lseek,
                ],
            );
            // halt-watch kicks vCPUs.
            allow_if(&mut r, libc::SYS_tgkill, tgkill_kick_and_abort());
            // A forced exit (second signal, grace over, stall) restores the
            // terminal and removes the API socket file.
            allow_if(&mut r, libc::SYS_ioctl, terminal_ioctls());
            allow(&mut r, &[libc::SYS_unlink, libc::SYS_unlinkat]);
            // balloon-policy changes the balloon's target: a config
            // interrupt (KVM_IRQ_LINE without MSI-X).
            allow_if(&mut r, libc::SYS_ioctl, kvm_ioctls());
            timers(&mut r);
        }
        ThreadKind::Main => {
            // The control loop waits on the stop and API eventfds.
            allow(
                &mut r,
                &[libc::SYS_poll, libc::SYS_ppoll, libc::SYS_eventfd2],
            );
            // usb.attach: open the image, check it (stat, size), lock it
            // (OFD lock), path checks (realpath: readlink, getcwd).
            allow(
                &mut r,
                &[
                    libc::SYS_openat,
                    libc::SYS_readlink,
                    libc::SYS_readlinkat,
                    libc::SYS_getcwd,
                    libc::SYS_flock,
                ],
            );
            file_io(&mut r);
            // ioeventfds and memory slots at detach and stop, KVM_IRQ_LINE;
            // hot-plug raises xHCI port events (moderation timer).
            allow_if(&mut r, libc::SYS_ioctl, kvm_ioctls());
            timers(&mut r);
            // The pager's unregister at stop.
            allow_if(&mut r, libc::SYS_ioctl, uffd_ioctls());
            // The console back out of raw mode.
            allow_if(&mut r, libc::SYS_ioctl, terminal_ioctls());
            allow_if(&mut r, libc::SYS_ioctl, fd_ioctls());
            // The stop: kick vCPUs out of KVM_RUN, wake the accept loop
            // (connect to its own socket), close connections, remove the
            // socket file.
            allow_if(&mut r, libc::SYS_tgkill, tgkill_kick_and_abort());
            allow(
                &mut r,
                &[
                    libc::SYS_socket,
                    libc::SYS_connect,
                    libc::SYS_shutdown,
                    libc::SYS_unlink,
                    libc::SYS_unlinkat,
                    libc::SYS_mincore,
                ],
            );
        }
    }
    if kind.denies_open() {
        // Let through here only for the second filter to answer EACCES
        // (module doc): a trap here would win over its errno.
        allow(&mut r, &[libc::SYS_openat, libc::SYS_open]);
    }
    r
}

/// The filter program for `kind`: the allow-list, everything else `other`.
pub fn program(kind: ThreadKind, other: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules(kind), other, SeccompAction::Allow, ARCH)
        .map_err(|e| SeccompError::Build(kind, e))?;
    filter.try_into().map_err(|e| SeccompError::Build(kind, e))
}

/// The second filter on vCPU, pager and API threads: `openat` fails with
/// EACCES, everything else is left to the first.
pub fn deny_open_program() -> Result<BpfProgram, SeccompError> {
    let mut r = Rules::new();
    allow(&mut r, &[libc::SYS_openat, libc::SYS_open]);
    let filter = SeccompFilter::new(
        r,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        ARCH,
    )
    .map_err(|e| SeccompError::Build(ThreadKind::Vcpu, e))?;
    filter
        .try_into()
        .map_err(|e| SeccompError::Build(ThreadKind::Vcpu, e))
}

#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// The compiled filters of the process, set once by [`init`].
struct Filters {
    by_kind: BTreeMap<ThreadKind, BpfProgram>,
    deny_open: Option<BpfProgram>,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Builds the filters for `mode` and, for `on`, installs the SIGSYS
/// handler; threads then install theirs with [`apply`]. Call once, on the
/// main thread, before any thread of the VM is created. Also sets the
/// device crate's thread start hook.
pub fn init(mode: Mode) -> Result<(), SeccompError> {
    let other = match mode {
        Mode::Off => return Ok(()),
        Mode::On => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    // Asked here, on the main thread, so that a kernel without seccomp is
    // one clear error before any VM thread exists.
    // SAFETY: PR_GET_SECCOMP takes no pointer and changes nothing.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP) } < 0 {
        return Err(SeccompError::Unsupported(std::io::Error::last_os_error()));
    }
    let mut by_kind = BTreeMap::new();
    for kind in ThreadKind::ALL {
        by_kind.insert(kind, program(kind, other.clone())?);
    }
    // In log mode everything is allowed, opens included.
    let deny_open = (mode == Mode::On).then(deny_open_program).transpose()?;
    if mode == Mode::On {
        install_sigsys_handler().map_err(SeccompError::Handler)?;
    }
    let _ = FILTERS.set(Filters { by_kind, deny_open });
    devices::set_thread_start_hook(|| apply(ThreadKind::Device));
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (nothing when [`init`]
/// was not called or the mode is `off`). A failure ends the process with
/// status 1: a thread must not run unfiltered when filters were asked for.
pub fn apply(kind: ThreadKind) {
    let Some(f) = FILTERS.get() else {
        return;
    };
    if let Err(e) = apply_programs(kind, f) {
        eprintln!("error: cannot install the seccomp filter of this {kind:?} thread: {e}");
        std::process::exit(i32::from(crate::exit_status::VMM_ERROR));
    }
}

/// For a thread that runs under the filter it inherited (`api-reader`,
/// `api-writer`): records its name for the SIGSYS report, installs nothing.
pub fn inherited() {
    if FILTERS.get().is_some() {
        remember_thread_name();
    }
}

fn apply_programs(kind: ThreadKind, f: &Filters) -> Result<(), SeccompError> {
    remember_thread_name();
    // This thread's malloc arena, before its opens are refused (module doc).
    std::hint::black_box(Box::new([0u8; 64]));
    // The open filter first: it lets the prctl and seccomp calls that
    // install the second through, the kind's list would not.
    if kind.denies_open() {
        if let Some(p) = &f.deny_open {
            seccompiler::apply_filter(p).map_err(SeccompError::Apply)?;
        }
    }
    if let Some(p) = f.by_kind.get(&kind) {
        seccompiler::apply_filter(p).map_err(SeccompError::Apply)?;
    }
    Ok(())
}

thread_local! {
    /// The thread's name for the SIGSYS report (NUL-padded; a constant
    /// initialiser, so the handler reads it without allocating).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn remember_thread_name() {
    let mut buf = [0u8; 16];
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("main").as_bytes();
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value;
    // the handler only calls async-signal-safe functions (write, _exit)
    // and reads a constant-initialised thread local.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_sigsys as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Formats the report line into `out` (the call's first two arguments in
/// hex: an ioctl's request, a signal); returns its length.
fn report_line(out: &mut [u8; 256], name: &[u8; 16], nr: i32, args: [u64; 2]) -> usize {
    let mut len = 0;
    let mut put = |b: &[u8]| {
        let n = b.len().min(out.len() - len);
        out[len..len + n].copy_from_slice(&b[..n]);
        len += n;
    };
    put(b"error: seccomp: thread '");
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    put(if name_len == 0 {
        b"?"
    } else {
        &name[..name_len]
    });
    put(b"' made the forbidden system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let negative = nr < 0;
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if negative {
        i -= 1;
        digits[i] = b'-';
    }
    put(&digits[i..]);
    for (k, a) in args.iter().enumerate() {
        put(if k == 0 { b" args 0x" } else { b", 0x" });
        let mut hex = [0u8; 16];
        let mut j = hex.len();
        let mut v = *a;
        loop {
            j -= 1;
            hex[j] = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        put(&hex[j..]);
    }
    put(b" (x86_64; name it with `ausyscall N` or asm/unistd_64.h); stopping the VMM\n");
    len
}

/// SIGSYS from a SECCOMP_RET_TRAP: report the call and the thread, exit 75.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: for a seccomp SIGSYS the kernel fills siginfo's `_sigsys`
    // member: `_call_addr` (a pointer) at offset 16 and `_syscall` (an
    // int) at offset 24 on 64-bit Linux; `info` points to that siginfo.
    let nr = unsafe { std::ptr::read_unaligned((info as *const u8).add(24) as *const i32) };
    // SAFETY: with SA_SIGINFO the third argument is the interrupted
    // thread's ucontext_t; the call's arguments are in its registers.
    let args = unsafe {
        let gregs = &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs;
        [
            gregs[libc::REG_RDI as usize] as u64,
            gregs[libc::REG_RSI as usize] as u64,
        ]
    };
    let name = THREAD_NAME.with(Cell::get);
    let mut line = [0u8; 256];
    let len = report_line(&mut line, &name, nr, args);
    // SAFETY: write and _exit are async-signal-safe and allowed by every
    // thread's filter; `line` is valid for `len` bytes.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::_exit(i32::from(SECCOMP_EXIT));
    }
}

#[cfg(test)]
mod tests;
