//! Each thread kind's list, installed on a test thread: a call outside it
//! is refused, what the kind needs still works. The lists are the ones the
//! VMM installs; only the action for a refused call differs (EPERM here,
//! so the test process lives on; `a_forbidden_call_exits_75_naming_the_thread`
//! checks the real action in child processes).

use super::*;
use std::process::Command;

/// `syscall(nr, a, b, c, d)`: its result, or `-errno`.
fn sys(nr: libc::c_long, a: u64, b: u64, c: u64, d: u64) -> i64 {
    // SAFETY: the calls made through this in these tests take no pointers
    // the kernel writes through except the ones each caller passes valid
    // (a pipe's fd array, a socketpair's).
    let r = unsafe { libc::syscall(nr, a, b, c, d) };
    if r < 0 {
        -i64::from(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        r
    }
}

const EPERM: i64 = -(libc::EPERM as i64);

/// Runs `body` on a new thread under `kind`'s list (refusals: EPERM), with
/// the EACCES open filter where the VMM installs it.
fn under<T: Send + 'static>(kind: ThreadKind, body: impl FnOnce() -> T + Send + 'static) -> T {
    let prog = program(kind, SeccompAction::Errno(libc::EPERM as u32)).unwrap();
    let deny_open = deny_open_program().unwrap();
    std::thread::Builder::new()
        .name(format!("test-{kind:?}"))
        .spawn(move || {
            if kind.denies_open() {
                seccompiler::apply_filter(&deny_open).unwrap();
            }
            seccompiler::apply_filter(&prog).unwrap();
            body()
        })
        .unwrap()
        .join()
        .unwrap()
}

/// A clearly forbidden call for every kind: socketpair (no VMM thread
/// makes sockets except the main thread's one `socket` at stop), with a
/// valid out array so that an allowed call would just make two fds.
fn socketpair() -> i64 {
    let mut fds = [-1i32; 2];
    let r = sys(
        libc::SYS_socketpair,
        libc::AF_UNIX as u64,
        libc::SOCK_STREAM as u64,
        0,
        fds.as_mut_ptr() as u64,
    );
    for fd in fds {
        if fd >= 0 {
            // SAFETY: an fd this test just made.
            unsafe { libc::close(fd) };
        }
    }
    r
}

/// What every kind needs: a pipe made before the filter, written and read
/// under it; a lock, a short sleep, an allocation, the time.
fn basics_work(fds: [i32; 2]) -> Result<(), String> {
    let b = [7u8];
    if sys(libc::SYS_write, fds[1] as u64, b.as_ptr() as u64, 1, 0) != 1 {
        return Err("write".into());
    }
    let mut r = [0u8];
    if sys(libc::SYS_read, fds[0] as u64, r.as_mut_ptr() as u64, 1, 0) != 1 || r[0] != 7 {
        return Err("read".into());
    }
    let m = std::sync::Mutex::new(vec![0u8; 1 << 20]);
    m.lock().unwrap()[5] = 1;
    std::thread::sleep(std::time::Duration::from_millis(1));
    let _ = std::time::SystemTime::now();
    Ok(())
}

fn pipe() -> [i32; 2] {
    let mut fds = [-1i32; 2];
    // SAFETY: `fds` is a valid two-int array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    fds
}

/// An ioctl on fd -1: EBADF when the filter lets the request through,
/// EPERM when it refuses it.
fn ioctl(req: libc::c_ulong) -> i64 {
    sys(libc::SYS_ioctl, u64::MAX, req, 0, 0)
}

const KVM_RUN: libc::c_ulong = 0xAE80;
/// UFFDIO_WAKE: _IOR(0xAA, 0x02, struct uffdio_range).
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const EBADF: i64 = -(libc::EBADF as i64);

fn open_statm() -> i64 {
    let path = c"/proc/self/statm";
    let r = sys(
        libc::SYS_openat,
        libc::AT_FDCWD as u64,
        path.as_ptr() as u64,
        libc::O_RDONLY as u64,
        0,
    );
    if r >= 0 {
        // SAFETY: an fd this test just opened.
        unsafe { libc::close(r as i32) };
    }
    r
}

#[test]
fn every_kind_refuses_a_forbidden_call_and_runs_what_it_needs() {
    for kind in ThreadKind::ALL {
        let fds = pipe();
        let (forbidden, basics) = under(kind, move || (socketpair(), basics_work(fds)));
        assert_eq!(forbidden, EPERM, "{kind:?}: socketpair was not refused");
        assert_eq!(basics, Ok(()), "{kind:?}");
        for fd in fds {
            // SAFETY: the pipe's fds, made above.
            unsafe { libc::close(fd) };
        }
    }
}

/// Arms, reads and disarms a timerfd made before the filter (the xHCI
/// moderation timer, the balloon's statistics timer).
fn timer_works(mut t: vmm_sys_util::timerfd::TimerFd) -> bool {
    t.reset(std::time::Duration::from_secs(10), None).is_ok()
        && t.is_armed().unwrap_or(false)
        && t.clear().is_ok()
        && vmm_sys_util::timerfd::TimerFd::new().is_ok()
}

#[test]
fn vcpu_device_main_and_helper_threads_run_interrupt_timers() {
    for kind in [
        ThreadKind::Vcpu,
        ThreadKind::Device,
        ThreadKind::Main,
        ThreadKind::Helper,
    ] {
        let t = vmm_sys_util::timerfd::TimerFd::new().unwrap();
        assert!(under(kind, move || timer_works(t)), "{kind:?}");
    }
    let t = vmm_sys_util::timerfd::TimerFd::new().unwrap();
    assert!(!under(ThreadKind::Pager, move || timer_works(t)), "pager");
}

#[test]
fn vcpu_threads_run_kvm_ioctls_only_and_cannot_open_files() {
    let (kvm, uffd, isatty, tty, open) = under(ThreadKind::Vcpu, || {
        (
            ioctl(KVM_RUN),
            ioctl(UFFDIO_WAKE),
            ioctl(libc::TCGETS),
            ioctl(libc::TCSETS),
            open_statm(),
        )
    });
    assert_eq!(kvm, EBADF, "KVM_RUN reaches the kernel");
    assert_eq!(uffd, EPERM);
    // The logger's isatty(stderr) from a vCPU's warning; setting a
    // terminal stays refused.
    assert_eq!(isatty, EBADF, "TCGETS reaches the kernel");
    assert_eq!(tty, EPERM);
    assert_eq!(open, -(libc::EACCES as i64));
}

#[test]
fn pager_threads_run_userfaultfd_ioctls_only_and_cannot_open_files() {
    let (kvm, uffd, open, execve) = under(ThreadKind::Pager, || {
        (
            ioctl(KVM_RUN),
            ioctl(UFFDIO_WAKE),
            open_statm(),
            // A null path: refused by the filter before the kernel looks.
            sys(libc::SYS_execve, 0, 0, 0, 0),
        )
    });
    assert_eq!(kvm, EPERM);
    assert_eq!(uffd, EBADF, "UFFDIO_WAKE reaches the kernel");
    assert_eq!(open, -(libc::EACCES as i64));
    assert_eq!(execve, EPERM);
}

#[test]
fn device_threads_do_io_and_interrupts_but_no_terminal_or_exec() {
    let (kvm, tty, open, execve) = under(ThreadKind::Device, || {
        (
            ioctl(KVM_RUN),
            ioctl(libc::TCSETS),
            open_statm(),
            sys(libc::SYS_execve, 0, 0, 0, 0),
        )
    });
    assert_eq!(kvm, EBADF);
    assert_eq!(tty, EPERM);
    assert!(open >= 0, "the balloon reads /proc/self/statm: {open}");
    assert_eq!(execve, EPERM);
}

#[test]
fn the_api_thread_makes_its_connection_threads_and_nothing_else() {
    let (spawned, kvm, open, connect) = under(ThreadKind::Api, || {
        let spawned = std::thread::Builder::new()
            .name("api-reader".into())
            .spawn(socketpair)
            .map(|t| t.join().unwrap());
        (
            spawned,
            ioctl(KVM_RUN),
            open_statm(),
            sys(libc::SYS_connect, u64::MAX, 0, 0, 0),
        )
    });
    // The child inherits the api filter: it runs, and refuses the same.
    assert_eq!(spawned.ok(), Some(EPERM));
    assert_eq!(kvm, EPERM);
    assert_eq!(open, -(libc::EACCES as i64));
    assert_eq!(connect, EPERM);
}

#[test]
fn the_main_thread_cannot_create_threads_after_start_up() {
    let (spawn, kick, other_signal, uffd) = under(ThreadKind::Main, || {
        let spawn = std::thread::Builder::new().spawn(|| ()).map(|t| t.join());
        // tgkill of a non-existent thread: ESRCH when let through.
        let kick = sys(libc::SYS_tgkill, 1, 1 << 30, libc::SIGRTMIN() as u64, 0);
        let other = sys(libc::SYS_tgkill, 1, 1 << 30, libc::SIGKILL as u64, 0);
        (spawn.is_err(), kick, other, ioctl(UFFDIO_WAKE))
    });
    assert!(spawn, "thread creation is refused");
    assert_eq!(kick, -(libc::ESRCH as i64), "the vCPU kick goes through");
    assert_eq!(other_signal, EPERM);
    assert_eq!(uffd, EBADF);
}

/// What the stall watchdog's report and a forced exit do on a helper
/// thread: read a thread's name from /proc, check the terminal, remove the
/// API socket file.
#[test]
fn helper_threads_can_report_a_stall_and_leave_at_once() {
    let file = std::env::temp_dir().join(format!("seccomp-helper-{}", std::process::id()));
    std::fs::write(&file, b"x").unwrap();
    let f = file.clone();
    let (comm, tty, removed) = under(ThreadKind::Helper, move || {
        let comm = std::fs::read_to_string("/proc/thread-self/comm");
        // isatty/tcgetattr: TCGETS on stdin, answered (a terminal or
        // ENOTTY) rather than refused.
        // SAFETY: a zeroed termios is a valid buffer for TCGETS to fill.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        let tty = sys(
            libc::SYS_ioctl,
            0,
            libc::TCGETS,
            &mut t as *mut libc::termios as u64,
            0,
        );
        (
            comm.map(|c| c.trim().to_string()),
            tty,
            std::fs::remove_file(&f),
        )
    });
    assert_eq!(comm.ok().as_deref(), Some("test-Helper"));
    assert_ne!(tty, EPERM, "TCGETS refused");
    assert!(removed.is_ok(), "{removed:?}");
    assert!(!file.exists());
}

#[test]
fn helper_threads_kick_and_wait_for_signals_but_do_no_disk_io() {
    let (kick, pwrite, sigwait) = under(ThreadKind::Helper, || {
        let kick = sys(libc::SYS_tgkill, 1, 1 << 30, libc::SIGRTMIN() as u64, 0);
        let pwrite = sys(libc::SYS_pwrite64, u64::MAX, 0, 0, 0);
        // A null set pointer: EFAULT once let through.
        let sigwait = sys(libc::SYS_rt_sigtimedwait, 0, 0, 0, 8);
        (kick, pwrite, sigwait)
    });
    assert_eq!(kick, -(libc::ESRCH as i64));
    assert_eq!(pwrite, EPERM);
    assert_eq!(sigwait, -(libc::EFAULT as i64));
}

#[test]
fn modes_parse_and_bad_values_are_named() {
    assert_eq!(Mode::parse("on"), Ok(Mode::On));
    assert_eq!(Mode::parse("log"), Ok(Mode::Log));
    assert_eq!(Mode::parse("off"), Ok(Mode::Off));
    assert_eq!(Mode::default(), Mode::On);
    let e = Mode::parse("kill").unwrap_err();
    assert!(e.contains("'kill'") && e.contains("on, log or off"), "{e}");
}

#[test]
fn the_report_line_names_the_thread_and_the_call() {
    let mut out = [0u8; 256];
    let mut name = [0u8; 16];
    name[..5].copy_from_slice(b"vcpu3");
    let n = report_line(&mut out, &name, 16, [9, 0x5401]);
    let line = std::str::from_utf8(&out[..n]).unwrap();
    assert!(
        line.starts_with(
            "error: seccomp: thread 'vcpu3' made the forbidden system call 16 args 0x9, 0x5401 ("
        ),
        "{line}"
    );
    assert!(
        line.ends_with('\n') && line.matches('\n').count() == 1,
        "{line}"
    );
}

/// Set in the child processes of `a_forbidden_call_exits_75_naming_the_thread`.
const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";

fn kind_named(name: &str) -> ThreadKind {
    *ThreadKind::ALL
        .iter()
        .find(|k| format!("{k:?}") == name)
        .expect("a thread kind")
}

/// In a child: init(mode), then a thread named "t-KIND" applies KIND's
/// filter as the VMM's threads do and calls socketpair. Returns normally
/// (the test passes) when not a child.
#[test]
fn seccomp_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, kind) = spec.split_once(':').unwrap();
    let (mode, panic) = match mode.strip_suffix("+panic") {
        Some(m) => (m, true),
        None => (mode, false),
    };
    let (mode, segv) = match mode.strip_suffix("+segv") {
        Some(m) => (m, true),
        None => (mode, false),
    };
    // A page that faults on any access, mapped before the filter.
    // SAFETY: an anonymous PROT_NONE mapping of one page; nothing else uses it.
    let trap_page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    let kind = kind_named(kind);
    init(Mode::parse(mode).unwrap()).unwrap();
    let r = std::thread::Builder::new()
        .name(format!("t-{kind:?}"))
        .spawn(move || {
            apply(kind);
            if segv {
                // SAFETY: deliberately faults (the page is PROT_NONE): the
                // process must die by SIGSEGV, as without a filter.
                unsafe { std::ptr::read_volatile(trap_page as *const u8) };
            }
            if panic {
                panic!("a panic under the {kind:?} filter");
            }
            socketpair()
        })
        .unwrap()
        .join();
    if r.is_err() {
        eprintln!("the thread panicked and the process lives on");
        return;
    }
    let r = r.unwrap();
    // Only reached when the call was allowed (log mode).
    eprintln!("socketpair returned {r}");
}

fn run_child(mode: &str, kind: ThreadKind) -> std::process::Output {
    run_child_env(mode, kind, &[])
}

fn run_child_env(mode: &str, kind: ThreadKind, env: &[(&str, &str)]) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .envs(env.iter().copied())
        .args([
            "--exact",
            "seccomp::tests::seccomp_child",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD_ENV, format!("{mode}:{kind:?}"))
        .output()
        .unwrap()
}

#[test]
fn a_forbidden_call_exits_75_naming_the_thread() {
    for kind in ThreadKind::ALL {
        let out = run_child("on", kind);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(75), "{kind:?}: {stderr}");
        let want = format!(
            "error: seccomp: thread 't-{kind:?}' made the forbidden system call {} ",
            libc::SYS_socketpair
        );
        assert!(stderr.contains(&want), "{kind:?}: {stderr}");
        assert!(!stderr.contains("socketpair returned"), "{stderr}");
    }
}

#[test]
fn log_mode_lets_the_call_through() {
    let out = run_child("log", ThreadKind::Vcpu);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("socketpair returned 0"), "{stderr}");
}

/// A panicking thread prints its message and its backtrace (with
/// RUST_BACKTRACE=1, which reads the executable's symbols) under every
/// kind's filter, instead of the filter turning the panic into exit 75.
#[test]
fn a_panic_with_a_backtrace_is_reported_under_every_filter() {
    for kind in ThreadKind::ALL {
        let out = run_child_env("on+panic", kind, &[("RUST_BACKTRACE", "1")]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{kind:?}: {:?} {stderr}", out.status);
        assert!(stderr.contains("a panic under the"), "{kind:?}: {stderr}");
        assert!(stderr.contains("stack backtrace:"), "{kind:?}: {stderr}");
        assert!(
            stderr.contains("the thread panicked and the process lives on"),
            "{kind:?}: {stderr}"
        );
    }
}

/// A crash stays a crash: a thread that faults on bad memory kills the
/// process with SIGSEGV under every filter (Rust's handler puts the default
/// action back first), not with the seccomp stop.
#[test]
fn a_segfault_stays_a_segfault_under_every_filter() {
    use std::os::unix::process::ExitStatusExt;
    for kind in ThreadKind::ALL {
        let out = run_child("on+segv", kind);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSEGV),
            "{kind:?}: {:?} {stderr}",
            out.status
        );
        assert!(!stderr.contains("error: seccomp"), "{kind:?}: {stderr}");
    }
}
