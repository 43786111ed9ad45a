//! How a guest ends decides the VMM's exit status (README "Exit status"),
//! with real guests: tiny bzImages whose 64-bit entry point is a few
//! hand-assembled instructions (a reset through the i8042, a triple fault,
//! `cli; hlt`, a panic's console lines, the debug-exit port, a spin), run
//! directly on this host's /dev/kvm. On a PVM /dev/kvm (`--allow-pvm`) such
//! code runs too; where no /dev/kvm can run a VM at all, every test here
//! says so and passes without checking anything (the nested
//! `integration/tests/exit_status.rs` covers Debian's kernel).
//!
//! Also the stop signals end to end: SIGTERM, SIGINT and SIGHUP stop a
//! spinning guest with 128 + the signal and remove the API socket file.
//! And seccomp (on by default in every run here): every VMM thread carries
//! a filter, a paging guest and the control API with hot-plug run under
//! them (RELIABILITY.md "Seccomp").
//!
//! `VMM_TEST_BIN=PATH` runs these against another `vmm` binary, e.g. the
//! static one of `scripts/build-vmm-static.sh`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

/// The `vmm` binary under test: this build's, or `VMM_TEST_BIN`.
fn vmm_bin() -> PathBuf {
    std::env::var_os("VMM_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vmm")))
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-guest-end-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A bzImage (boot protocol 2.15, 64-bit entry) whose protected-mode part
/// starts with `code` at the 64-bit entry point (offset 0x200).
fn kernel(name: &str, code: &[u8]) -> PathBuf {
    let setup_sects = 4usize;
    let pm = (setup_sects + 1) * 512;
    let mut img = vec![0u8; pm + 0x200 + code.len().max(0x1000)];
    let mut put = |off: usize, b: &[u8]| img[off..off + b.len()].copy_from_slice(b);
    put(0x1f1, &[setup_sects as u8]);
    put(0x1fe, &0xaa55u16.to_le_bytes());
    put(0x202, b"HdrS");
    put(0x206, &0x020fu16.to_le_bytes());
    put(0x211, &[1]); // LOADED_HIGH
    put(0x214, &0x10_0000u32.to_le_bytes());
    put(0x22c, &0x7fff_ffffu32.to_le_bytes());
    put(0x236, &1u16.to_le_bytes()); // XLF_KERNEL_64
    put(0x238, &2047u32.to_le_bytes());
    put(0x258, &0x100_0000u64.to_le_bytes());
    put(0x260, &(16u32 << 20).to_le_bytes());
    put(pm + 0x200, code);
    let p = dir().join(name);
    std::fs::write(&p, img).unwrap();
    p
}

/// `mov al, 0xfe; out 0x64, al; jmp $`: the i8042's reset line.
const RESET: &[u8] = &[0xb0, 0xfe, 0xe6, 0x64, 0xeb, 0xfe];
/// `cli; hlt; jmp back to the hlt`.
const CLI_HLT: &[u8] = &[0xfa, 0xf4, 0xeb, 0xfd];
/// `jmp $`.
const SPIN: &[u8] = &[0xeb, 0xfe];
/// `mov word [0x472], 0x1234`: Linux's warm-reboot flag.
const WARM_FLAG: &[u8] = &[0x66, 0xc7, 0x04, 0x25, 0x72, 0x04, 0x00, 0x00, 0x34, 0x12];

/// Prints `text` on COM1, then runs `tail`.
fn print_then(text: &str, tail: &[u8]) -> Vec<u8> {
    // lea rsi, [rip + msg]; mov dx, 0x3f8
    // loop: lodsb; test al, al; jz done; out dx, al; jmp loop
    // done: tail; msg: text, 0
    let head_len = 7 + 4 + 8;
    let msg_at = head_len + tail.len();
    let rel = (msg_at - 7) as u32;
    let mut c = vec![0x48, 0x8d, 0x35];
    c.extend_from_slice(&rel.to_le_bytes());
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]);
    c.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]);
    c.extend_from_slice(tail);
    c.extend_from_slice(text.as_bytes());
    c.push(0);
    c
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn spawn(kernel: &Path, extra: &[&str]) -> Child {
    let memory: &[&str] = if extra.contains(&"--memory") {
        &[]
    } else {
        &["--memory", "size=128M"]
    };
    Command::new(vmm_bin())
        .arg("--kernel")
        .arg(kernel)
        .args(["--allow-pvm", "--log-level", "info"])
        .args(memory)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm")
}

fn finish(mut child: Child, what: &str) -> Outcome {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            return Outcome {
                code: status.code(),
                stderr,
            };
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: the VMM did not exit within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(name: &str, code: &[u8], extra: &[&str]) -> Outcome {
    finish(spawn(&kernel(name, code), extra), name)
}

/// Whether this host's /dev/kvm runs a VM at all (asked once).
fn kvm() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        let o = run(
            "probe",
            &[0xb0, 0x2a, 0xe6, 0xf4, 0xeb, 0xfe],
            &["--serial", "off"],
        );
        if o.code == Some(42) {
            true
        } else {
            eprintln!(
                "skipped: no /dev/kvm here runs a VM (status {:?}: {})",
                o.code,
                o.stderr.trim()
            );
            false
        }
    })
}

fn expect(o: &Outcome, status: i32, what: &str) {
    assert_eq!(o.code, Some(status), "{what}; stderr:\n{}", o.stderr);
}

#[test]
fn a_clean_reset_exits_0() {
    if !kvm() {
        return;
    }
    expect(&run("reset", RESET, &["--serial", "off"]), 0, "reset");
}

#[test]
fn the_debug_exit_byte_is_the_status() {
    if !kvm() {
        return;
    }
    let code = [0xb0, 0x03, 0xe6, 0xf4, 0xeb, 0xfe];
    expect(
        &run("debug-exit", &code, &["--serial", "off"]),
        3,
        "debug exit 3",
    );
}

#[test]
fn a_triple_fault_exits_77() {
    if !kvm() {
        return;
    }
    // ud2 with no IDT: #UD, #DF, shutdown.
    let o = run("ud2", &[0x0f, 0x0b], &["--serial", "off"]);
    expect(&o, 77, "triple fault");
    assert!(o.stderr.contains("triple fault"), "{}", o.stderr);
}

#[test]
fn a_dead_halt_exits_79_and_an_announced_one_0() {
    if !kvm() {
        return;
    }
    let start = Instant::now();
    expect(
        &run("cli-hlt", CLI_HLT, &["--serial", "off"]),
        79,
        "cli; hlt",
    );
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    // The other vCPU waits for its start-up IPI that never comes.
    let o = run("cli-hlt-2", CLI_HLT, &["--serial", "off", "--cpus", "2"]);
    expect(&o, 79, "cli; hlt with a second vCPU never started");
    // `sti; hlt` is idle, not dead: still running when stopped by a signal.
    // A halt the kernel announced is a clean stop (halt, poweroff).
    let code = print_then("[    1.0] reboot: System halted\n", CLI_HLT);
    expect(
        &run("halted", &code, &["--serial", "off"]),
        0,
        "announced halt",
    );
}

#[test]
fn a_guest_panic_exits_78_however_it_is_seen() {
    if !kvm() {
        return;
    }
    // The warm-reboot flag alone (no console).
    let mut code = WARM_FLAG.to_vec();
    code.extend_from_slice(RESET);
    expect(
        &run("warm", &code, &["--serial", "off"]),
        78,
        "warm flag + reset",
    );
    // The console alone, then a reset.
    let code = print_then("Kernel panic - not syncing: test\n", RESET);
    expect(
        &run("console-panic", &code, &["--serial", "off"]),
        78,
        "console + reset",
    );
    // A panic that stays (panic=0): stopped once its last line is 5 s old.
    let code = print_then(
        "Kernel panic - not syncing: test\n---[ end Kernel panic - not syncing: test ]---\n",
        SPIN,
    );
    let start = Instant::now();
    let o = run(
        "panic-stays",
        &code,
        &["--serial", "off", "--cmdline", "panic=0"],
    );
    expect(&o, 78, "a panic that stays");
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn stop_signals_exit_128_plus_the_signal_and_remove_the_socket() {
    if !kvm() {
        return;
    }
    let k = kernel("spin", &[0xfb, 0xf4, 0xeb, 0xfd]); // sti; hlt: idle
    for (sig, status) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let sock = dir().join(format!("api-{sig}.sock"));
        let console = dir().join(format!("console-{sig}.log"));
        let child = spawn(
            &k,
            &[
                "--api-socket",
                sock.to_str().unwrap(),
                "--serial",
                &format!("file={}", console.display()),
            ],
        );
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < TIMEOUT, "no API socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Idle for a few halt-watcher rounds: not taken for dead.
        std::thread::sleep(Duration::from_secs(4));
        // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let o = finish(child, "signal");
        expect(&o, status, &format!("signal {sig}"));
        assert!(!sock.exists(), "signal {sig}: the API socket file was left");
        assert!(console.exists());
    }
}

#[test]
fn the_swap_file_carries_the_magic_and_is_reused() {
    if !kvm() {
        return;
    }
    let swap = dir().join("swap");
    let _ = std::fs::remove_file(&swap);
    let code = [0xb0, 0x03, 0xe6, 0xf4, 0xeb, 0xfe];
    let mem = format!("size=128M,limit=64M,swap={}", swap.display());
    for round in 0..2 {
        let o = run("swap-user", &code, &["--serial", "off", "--memory", &mem]);
        expect(&o, 3, &format!("round {round}"));
        let head = std::fs::read(&swap).unwrap();
        assert_eq!(&head[..16], b"vmm-swap-file-v1", "round {round}");
    }
}

#[test]
fn an_image_in_use_by_another_vmm_is_refused() {
    if !kvm() {
        return;
    }
    let img = dir().join("shared.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir().join("api-lock.sock");
    let k = kernel("idle", &[0xfb, 0xf4, 0xeb, 0xfd]);
    let disk = format!("path={},id=d", img.display());
    let first = spawn(
        &k,
        &[
            "--serial",
            "off",
            "--disk",
            &disk,
            "--api-socket",
            sock.to_str().unwrap(),
        ],
    );
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < TIMEOUT, "first VMM did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    for extra in [
        vec!["--disk", disk.as_str()],
        vec!["--disk", &format!("path={},readonly=on", img.display())],
    ] {
        let mut args = vec!["--serial", "off"];
        args.extend(extra);
        let o = finish(spawn(&k, &args), "second VMM");
        expect(&o, 1, "the same image in a second VMM");
        assert!(o.stderr.contains("is in use"), "{}", o.stderr);
    }
    // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(first.id() as i32, libc::SIGTERM) }, 0);
    expect(&finish(first, "first VMM"), 143, "SIGTERM");
    // Closed: the image is free again.
    let o = run("reset-after", RESET, &["--serial", "off", "--disk", &disk]);
    expect(&o, 0, "the image once the first VMM is gone");
}

/// Whether the terminal `fd` is in canonical mode with echo.
fn canonical(fd: i32) -> bool {
    // SAFETY: tcgetattr fills the termios we own from a valid fd.
    let t = unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd, &mut t), 0);
        t
    };
    t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0
}

#[test]
fn sigterm_restores_the_terminal_the_console_made_raw() {
    use std::os::fd::{FromRawFd, OwnedFd};
    if !kvm() {
        return;
    }
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two fds; no name, termios or window size.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty");
    // SAFETY: both fds were just opened and are owned from here on.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    use std::os::fd::AsRawFd;
    assert!(canonical(slave.as_raw_fd()));
    let sock = dir().join("api-tty.sock");
    let k = kernel("idle-tty", &[0xfb, 0xf4, 0xeb, 0xfd]);
    let child = Command::new(vmm_bin())
        .arg("--kernel")
        .arg(&k)
        .args(["--allow-pvm", "--memory", "size=128M", "--serial", "stdout"])
        .args(["--api-socket", sock.to_str().unwrap()])
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() || canonical(slave.as_raw_fd()) {
        assert!(start.elapsed() < TIMEOUT, "the console did not go raw");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    expect(&finish(child, "tty"), 143, "SIGTERM");
    assert!(canonical(slave.as_raw_fd()), "the terminal was left raw");
    drop(master);
}

/// `/proc/PID/task/*`: each thread's name and its `Seccomp:` mode (0 none,
/// 2 filter).
fn thread_seccomp(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), mode));
    }
    out.sort();
    out
}

/// Starts an idle guest with every thread kind (2 vCPUs, a disk, a USB
/// disk, the pager, a balloon with its policy, the API), waits until the
/// main thread's filter is in (it goes in last) or `settle` passes, and
/// returns the threads and their seccomp modes; then stops it by SIGTERM.
fn threads_of_a_full_vm(tag: &str, extra: &[&str], settle: Duration) -> Vec<(String, String)> {
    let d = dir();
    let k = kernel(&format!("idle-{tag}"), &[0xfb, 0xf4, 0xeb, 0xfd]); // sti; hlt
    let disk = d.join(format!("disk-{tag}.img"));
    let usb = d.join(format!("usb-{tag}.img"));
    for p in [&disk, &usb] {
        std::fs::File::create(p).unwrap().set_len(1 << 20).unwrap();
    }
    let sock = d.join(format!("api-{tag}.sock"));
    let swap = d.join(format!("swap-{tag}"));
    let mut args = vec![
        "--cpus".to_string(),
        "2".into(),
        "--memory".into(),
        format!("size=128M,limit=32M,swap={}", swap.display()),
        "--disk".into(),
        format!("path={}", disk.display()),
        "--usb-storage".into(),
        format!("path={}", usb.display()),
        "--balloon".into(),
        "size=0,stats_interval=1,auto=on".into(),
        "--api-socket".into(),
        sock.display().to_string(),
        "--serial".into(),
        "off".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = spawn(&k, &args);
    let start = Instant::now();
    let threads = loop {
        let t = thread_seccomp(child.id());
        let main_done = t.iter().any(|(n, m)| n == "vmm" && m == "2");
        if (main_done && t.iter().any(|(n, _)| n == "halt-watch")) || start.elapsed() > settle {
            break t;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // SAFETY: kill(2) on our own child's pid, which is not reaped yet.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = finish(child, tag);
    expect(&o, 143, &format!("{tag}: SIGTERM"));
    assert!(!o.stderr.contains("error: seccomp"), "{tag}: {}", o.stderr);
    threads
}

/// Seccomp is on by default: every VMM thread (each kind: main, vCPU,
/// device loops, pager, API, helpers) runs under a filter, and a whole
/// start, idle run and orderly stop with every device makes no forbidden
/// call. `--seccomp off` leaves every thread without one.
#[test]
fn every_vmm_thread_runs_under_a_seccomp_filter_by_default() {
    if !kvm() {
        return;
    }
    let threads = threads_of_a_full_vm("seccomp-on", &[], TIMEOUT);
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "vmm",
        "vcpu0",
        "vcpu1",
        "virtio",
        "xhci",
        "pager-fault",
        "pager-wait",
        "pager-swapin",
        "pager-reclaim",
        "pager-writeback",
        // It waits for the pager's fatal-error eventfd (it used to read the
        // non-blocking fd once and end).
        "pager-watch",
        "api",
        "signals",
        "stall-watchdog",
        "halt-watch",
        "balloon-policy",
    ] {
        assert!(names.contains(&want), "no thread {want}: {threads:?}");
    }
    // Kernel workers KVM attaches to the process (kvm-nx-lpage-recovery,
    // "kvm-pit/PID") make no system calls; every other thread is filtered.
    let unfiltered: Vec<_> = threads
        .iter()
        .filter(|(n, m)| m != "2" && !n.starts_with("kvm"))
        .collect();
    assert!(
        unfiltered.is_empty(),
        "threads without a filter: {unfiltered:?}"
    );

    let threads =
        threads_of_a_full_vm("seccomp-off", &["--seccomp", "off"], Duration::from_secs(3));
    let filtered: Vec<_> = threads
        .iter()
        .filter(|(n, m)| m != "0" && !n.starts_with("kvm"))
        .collect();
    assert!(filtered.is_empty(), "--seccomp off: {filtered:?}");
}

/// Guest code that writes each page of 32-128 MiB with its address, reads
/// every one back, then resets (status 0); a wrong word: debug exit 1.
fn paging_code() -> Vec<u8> {
    let (start, end) = (0x200_0000u64, 0x800_0000u64);
    let mut code = Vec::new();
    let mut fails = Vec::new();
    for pass in 0..2 {
        code.extend_from_slice(&[0x48, 0xbf]); // mov rdi, start
        code.extend_from_slice(&start.to_le_bytes());
        let top = code.len();
        if pass == 0 {
            code.extend_from_slice(&[0x48, 0x89, 0x3f]); // mov [rdi], rdi
        } else {
            code.extend_from_slice(&[0x48, 0x8b, 0x07]); // mov rax, [rdi]
            code.extend_from_slice(&[0x48, 0x39, 0xf8]); // cmp rax, rdi
            code.extend_from_slice(&[0x0f, 0x85, 0, 0, 0, 0]); // jne fail
            fails.push(code.len() - 4);
        }
        code.extend_from_slice(&[0x48, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]); // add rdi, 4096
        code.extend_from_slice(&[0x48, 0xb8]); // mov rax, end
        code.extend_from_slice(&end.to_le_bytes());
        code.extend_from_slice(&[0x48, 0x39, 0xc7]); // cmp rdi, rax
        let rel = top as i64 - (code.len() as i64 + 2);
        code.extend_from_slice(&[0x72, rel as i8 as u8]); // jb top
    }
    code.extend_from_slice(RESET);
    let fail = code.len();
    code.extend_from_slice(&[0xb0, 0x01, 0xe6, 0xf4, 0xeb, 0xfe]); // debug-exit 1
    for at in fails {
        let rel = (fail - (at + 4)) as i32;
        code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
    }
    code
}

/// The pager-stats line of a paging run: swap was written and read.
fn assert_paged(o: &Outcome, what: &str) {
    expect(o, 0, what);
    assert!(!o.stderr.contains("error: seccomp"), "{what}: {}", o.stderr);
    let stats = o
        .stderr
        .lines()
        .find(|l| l.starts_with("pager-stats "))
        .expect("pager-stats line");
    let v: serde_json::Value = serde_json::from_str(&stats["pager-stats ".len()..]).unwrap();
    assert!(v["swap_writes"].as_u64().unwrap() > 0, "{what}: {stats}");
    assert!(v["swap_reads"].as_u64().unwrap() > 0, "{what}: {stats}");
}

/// A guest that writes 96 MiB with a 32 MiB resident limit and reads it
/// all back: the pager's threads fault, swap out and swap in under their
/// filters (status 0: every word read back; 1 from the guest otherwise).
/// Twice: swap on its own volume, then on a USB disk's volume with USB
/// transfers on the controller's thread (`--usb-io thread`) and the API on.
#[test]
fn a_paging_guest_runs_under_the_filters() {
    if !kvm() {
        return;
    }
    let code = paging_code();
    let swap = dir().join("swap-paging");
    let o = run(
        "paging",
        &code,
        &[
            "--memory",
            &format!("size=256M,limit=32M,swap={}", swap.display()),
            "--serial",
            "off",
        ],
    );
    assert_paged(&o, "paging guest");

    let usb = dir().join("usb-paging.img");
    std::fs::File::create(&usb)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let swap = dir().join("swap-paging-usb");
    let sock = dir().join("api-paging.sock");
    let o = run(
        "paging-usb",
        &code,
        &[
            "--memory",
            &format!("size=256M,limit=32M,swap={},swap_volume=u1", swap.display()),
            "--usb-storage",
            &format!("path={},id=u1", usb.display()),
            "--usb-io",
            "thread",
            "--api-socket",
            sock.to_str().unwrap(),
            "--serial",
            "off",
        ],
    );
    assert_paged(&o, "paging guest, swap on a USB disk's volume");
}

/// Unmounts a test's tmpfs when dropped.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A fatal pager error stops the VM: with its swap file on a 1 MiB tmpfs,
/// the pager's first writeback past 1 MiB fails (ENOSPC), and the VM ends
/// with status 1 and the pager's error instead of leaving its vCPUs
/// waiting on faults no one serves (the run's time bound would fail it).
/// Needs the right to mount a tmpfs (root); skipped otherwise.
#[test]
fn a_fatal_pager_error_stops_the_vm() {
    if !kvm() {
        return;
    }
    let fs = dir().join("tiny-swap-fs");
    std::fs::create_dir_all(&fs).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&fs)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("cannot mount a tmpfs here (not root?): skipped");
        return;
    }
    let _unmount = Mounted(fs.clone());
    let swap = fs.join("swap");
    let o = run(
        "pager-fatal",
        &paging_code(),
        &[
            "--memory",
            &format!("size=256M,limit=32M,swap={}", swap.display()),
            "--serial",
            "off",
        ],
    );
    expect(&o, 1, "a pager that cannot write its swap file");
    assert!(
        o.stderr.contains("pager failed; stopping the VM"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("error: seccomp"), "{}", o.stderr);
}

/// Kills process `pid` if the test panics while it is armed (so that a
/// failed assertion does not leave a VMM running).
struct KillOnPanic(Option<u32>);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if let (Some(pid), true) = (self.0, std::thread::panicking()) {
            // SAFETY: kill(2) on our own child, not reaped yet (disarmed
            // before it is).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Runs `vmm-ctl CMD [ARGS]` against `sock`; its first reply line.
fn ctl(sock: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm-ctl"))
        .arg("--socket")
        .arg(sock)
        .args(["--timeout", "10"])
        .args(args)
        .output()
        .expect("run vmm-ctl");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().next().unwrap_or("null")).unwrap_or_default()
}

/// The control API end to end under the filters (API, main, device and
/// vCPU threads): every command against a running VM with a virtio disk,
/// a USB disk, the pager and a balloon, hot-plug and detach included, an
/// event connection left open, then `vm.shutdown`: status 0, no seccomp line.
#[test]
fn the_control_api_and_hotplug_run_under_the_filters() {
    if !kvm() {
        return;
    }
    let d = dir();
    let img = |name: &str| {
        let p = d.join(name);
        std::fs::File::create(&p)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        p
    };
    let (disk, usb, hot, ro) = (
        img("api-disk.img"),
        img("api-usb.img"),
        img("api-hot.img"),
        img("api-ro.img"),
    );
    let sock = d.join("api-all.sock");
    let swap = d.join("swap-api");
    let k = kernel("idle-api", &[0xfb, 0xf4, 0xeb, 0xfd]); // sti; hlt
    let child = spawn(
        &k,
        &[
            "--cpus",
            "2",
            "--memory",
            &format!("size=128M,limit=32M,swap={}", swap.display()),
            "--disk",
            &format!("path={}", disk.display()),
            "--usb-storage",
            &format!("path={}", usb.display()),
            "--balloon",
            "size=0,stats_interval=1,auto=on,free_page_reporting=on,deflate_on_oom=on",
            "--api-socket",
            sock.to_str().unwrap(),
            "--serial",
            "off",
        ],
    );
    let mut guard = KillOnPanic(Some(child.id()));
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < TIMEOUT, "no API socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut events = Command::new(env!("CARGO_BIN_EXE_vmm-ctl"))
        .arg("--socket")
        .arg(&sock)
        .args(["--events", "--timeout", "30"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut events_guard = KillOnPanic(Some(events.id()));
    let ok = |r: serde_json::Value, what: &str| {
        assert!(r.get("ok").is_some(), "{what}: {r}");
        r
    };
    ok(ctl(&sock, &["vm.info"]), "vm.info");
    let hot_arg = format!(r#"{{"path":"{}","id":"hot"}}"#, hot.display());
    ok(ctl(&sock, &["usb.attach", &hot_arg]), "usb.attach");
    let ro_arg = format!(r#"{{"path":"{}","readonly":true,"port":2}}"#, ro.display());
    ok(ctl(&sock, &["usb.attach", &ro_arg]), "usb.attach readonly");
    ok(ctl(&sock, &["usb.list"]), "usb.list");
    ok(
        ctl(&sock, &["debug.evict", r#"{"device":"xhci"}"#]),
        "evict xhci",
    );
    ok(
        ctl(&sock, &["debug.evict", r#"{"gpa":0,"len":1048576}"#]),
        "evict RAM",
    );
    // Not suspended (no guest driver): a conflict reply, still a reply.
    let r = ctl(&sock, &["usb.wake", r#"{"id":"hot"}"#]);
    assert!(r.get("error").is_some() || r.get("ok").is_some(), "{r}");
    ok(ctl(&sock, &["usb.detach", r#"{"id":"hot"}"#]), "usb.detach");
    ok(
        ctl(&sock, &["balloon.set", r#"{"size":"32M"}"#]),
        "balloon.set",
    );
    ok(ctl(&sock, &["balloon.stats"]), "balloon.stats");
    // A refused request: an error object, the VMM lives on.
    let r = ctl(&sock, &["usb.detach", r#"{"id":"nosuch"}"#]);
    assert!(r.get("error").is_some(), "{r}");
    // Some balloon-policy and halt-watch rounds.
    std::thread::sleep(Duration::from_millis(2500));
    ok(ctl(&sock, &["vm.shutdown"]), "vm.shutdown");
    guard.0 = None;
    let o = finish(child, "api");
    expect(&o, 0, "vm.shutdown");
    assert!(!o.stderr.contains("error: seccomp"), "{}", o.stderr);
    events_guard.0 = None;
    let _ = events.wait();
}
