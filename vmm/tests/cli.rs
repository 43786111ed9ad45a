//! The `vmm` binary on bad input: a clear one-line error and a non-zero exit,
//! never a hang. These checks run before KVM is touched, so they pass on any
//! host, including one without a usable /dev/kvm.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(20);

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn vmm(args: &[&str]) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return Outcome {
                code: status.code(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            };
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("vmm {args:?} did not exit within {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    // Tests run in parallel and share names (fake_bzimage): write aside,
    // then rename, so no test ever reads a half-written file.
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let tmp = dir.join(format!(".{name}.{n}"));
    std::fs::File::create(&tmp)
        .unwrap()
        .write_all(data)
        .unwrap();
    std::fs::rename(&tmp, &p).unwrap();
    p
}

/// A file with a valid 64-bit bzImage setup header and nothing else.
fn fake_bzimage(init_size: u32) -> PathBuf {
    let mut img = vec![0u8; 0x4000];
    let put = |img: &mut Vec<u8>, off: usize, bytes: &[u8]| {
        img[off..off + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut img, 0x1f1, &[4]); // setup_sects
    put(&mut img, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut img, 0x202, b"HdrS");
    put(&mut img, 0x206, &0x020fu16.to_le_bytes());
    put(&mut img, 0x211, &[1]); // loadflags: LOADED_HIGH
    put(&mut img, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    put(&mut img, 0x236, &1u16.to_le_bytes()); // xloadflags: XLF_KERNEL_64
    put(&mut img, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut img, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
    put(&mut img, 0x260, &init_size.to_le_bytes());
    scratch(&format!("bz-{init_size}"), &img)
}

fn assert_clear_error(o: &Outcome, needle: &str) {
    assert_eq!(o.code, Some(1), "stderr: {}", o.stderr);
    let lines: Vec<_> = o.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {}", o.stderr);
    assert!(lines[0].starts_with("error: "), "{}", o.stderr);
    assert!(lines[0].contains(needle), "'{needle}' not in: {}", o.stderr);
}

#[test]
fn missing_kernel() {
    let o = vmm(&["--kernel", "/nonexistent/vmlinuz"]);
    assert_clear_error(&o, "cannot read kernel /nonexistent/vmlinuz");
}

#[test]
fn kernel_that_is_not_a_bzimage() {
    let p = scratch("not-a-kernel", b"#!/bin/sh\necho I am a shell script\n");
    assert_clear_error(
        &vmm(&["--kernel", p.to_str().unwrap()]),
        "is not a Linux bzImage",
    );
    let zeros = scratch("zeros", &[0u8; 65536]);
    assert_clear_error(&vmm(&["--kernel", zeros.to_str().unwrap()]), "HdrS");
}

#[test]
fn memory_too_small_for_the_kernel() {
    let k = fake_bzimage(48 << 20);
    let o = vmm(&["--kernel", k.to_str().unwrap(), "--memory", "size=64M"]);
    assert_clear_error(&o, "too small");
}

#[test]
fn truncated_initramfs() {
    let k = fake_bzimage(16 << 20);
    let mut gz = Vec::new();
    {
        let mut enc = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
        enc.write_all(&vec![b'x'; 100_000]).unwrap();
        enc.finish().unwrap();
    }
    let cut = scratch("truncated.cpio.gz", &gz[..gz.len() / 2]);
    let o = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--initramfs",
        cut.to_str().unwrap(),
    ]);
    assert_clear_error(&o, "initramfs");
    assert!(o.stderr.contains("truncated or corrupt"), "{}", o.stderr);
}

fn assert_usage_error(o: &Outcome, needle: &str) {
    assert_eq!(o.code, Some(2), "usage errors exit 2; stderr: {}", o.stderr);
    let lines: Vec<_> = o.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {}", o.stderr);
    assert!(lines[0].starts_with("error: "), "{}", o.stderr);
    assert!(lines[0].contains(needle), "'{needle}' not in: {}", o.stderr);
}

#[test]
fn bad_options_are_rejected_by_the_parser() {
    let k = fake_bzimage(16 << 20);
    let k = k.to_str().unwrap();
    for (args, needle) in [
        (
            vec!["--memory", "size=1G,colour=red"],
            "unknown key 'colour'",
        ),
        (
            vec!["--memory", "size=1G,limit=256M"],
            "limit= needs swap=PATH",
        ),
        (vec!["--serial", "pipe"], "not key=value"),
        // --help says 1-254: both ends are refused by the parser.
        (vec!["--cpus", "0"], "0 is not in 1..=254"),
        (vec!["--cpus", "255"], "255 is not in 1..=254"),
        (vec!["--cpus", "many"], "invalid digit"),
        (vec!["--frobnicate"], "unexpected argument '--frobnicate'"),
        (vec!["--seccomp", "kill"], "'kill' is not on, log or off"),
        (vec!["--seccomp", ""], "'' is not on, log or off"),
    ] {
        let mut all = vec!["--kernel", k];
        all.extend(args.iter().copied());
        assert_usage_error(&vmm(&all), needle);
    }
    assert_usage_error(&vmm(&[]), "required arguments were not provided: --kernel");
    assert_usage_error(&vmm(&["--kernel"]), "a value is required for '--kernel");
}

#[test]
fn help_documents_every_option() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--log-level",
        "--seccomp",
    ] {
        assert!(help.contains(opt), "{opt} missing from --help");
    }
    assert!(Path::new(env!("CARGO_BIN_EXE_vmm")).exists());
    // The exit statuses are documented where users look first.
    for status in ["75", "76", "77", "78", "79", "128+N"] {
        assert!(
            help.contains(status),
            "exit status {status} missing from --help"
        );
    }
    assert!(help.contains("1-254"), "--cpus range");
    let version = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(version.status.success());
}

/// A fresh directory for one test's files.
fn test_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn swap_never_overwrites_data_a_disk_or_a_symlink_target() {
    let k = fake_bzimage(16 << 20);
    let dir = test_dir("swap");
    let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let precious = dir.join("precious");
    std::fs::write(&precious, &data).unwrap();
    let mem = |swap: &Path| format!("size=512M,limit=64M,swap={}", swap.display());

    // An ordinary file full of data.
    let o = vmm(&["--kernel", s(&k), "--memory", &mem(&precious)]);
    assert_clear_error(&o, "not a swap file of this VMM; refusing to overwrite it");

    // The image of a disk of the same VM, named directly or through a hard
    // link; an empty image (which an empty swap file would otherwise be).
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    std::fs::hard_link(&disk, dir.join("alias")).unwrap();
    for swap in [disk.clone(), dir.join("alias")] {
        let o = vmm(&[
            "--kernel",
            s(&k),
            "--memory",
            &mem(&swap),
            "--disk",
            &format!("path={},id=data", disk.display()),
        ]);
        assert_clear_error(&o, "is the disk image of --disk id=data");
    }
    let o = vmm(&[
        "--kernel",
        s(&k),
        "--memory",
        &mem(&disk),
        "--usb-storage",
        &format!("path={},id=stick", disk.display()),
    ]);
    assert_clear_error(&o, "is the disk image of --usb-storage id=stick");

    // A symbolic link: to the data, and dangling (nothing may be created).
    std::os::unix::fs::symlink(&precious, dir.join("link")).unwrap();
    std::os::unix::fs::symlink(dir.join("new"), dir.join("dangling")).unwrap();
    for link in ["link", "dangling"] {
        let o = vmm(&["--kernel", s(&k), "--memory", &mem(&dir.join(link))]);
        assert_clear_error(&o, "is a symbolic link");
    }
    assert!(
        !dir.join("new").exists(),
        "a file was created through the link"
    );
    // A directory.
    let o = vmm(&["--kernel", s(&k), "--memory", &mem(&dir)]);
    assert_clear_error(&o, "is not a regular file");

    assert_eq!(std::fs::read(&precious).unwrap(), data, "data changed");
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        vec![0u8; 4096],
        "disk changed"
    );
}

#[test]
fn the_same_image_twice_read_write_is_refused() {
    let k = fake_bzimage(16 << 20);
    let dir = test_dir("lock");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 8192]).unwrap();
    let o = vmm(&[
        "--kernel",
        s(&k),
        "--disk",
        &format!("path={},id=data", img.display()),
        "--usb-storage",
        &format!("path={},id=stick", img.display()),
    ]);
    assert_clear_error(&o, "--usb-storage id=stick: disk image");
    assert!(o.stderr.contains("is in use"), "{}", o.stderr);
    let o = vmm(&[
        "--kernel",
        s(&k),
        "--disk",
        &format!("path={},id=a", img.display()),
        "--disk",
        &format!("path={},id=b,readonly=on", img.display()),
    ]);
    assert_clear_error(&o, "--disk id=b: disk image");
}

#[test]
fn images_smaller_than_a_sector_are_refused() {
    let k = fake_bzimage(16 << 20);
    let dir = test_dir("tiny");
    let empty = dir.join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    for opt in ["--disk", "--usb-storage"] {
        let o = vmm(&["--kernel", s(&k), opt, s(&empty)]);
        assert_clear_error(&o, "is 0 bytes; a disk needs at least one 512-byte sector");
    }
}

#[test]
fn garbage_initramfs_is_refused() {
    let k = fake_bzimage(16 << 20);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let garbage: Vec<u8> = (0..100_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let known = [
        [0x1f, 0x8b],
        [0x42, 0x5a],
        [0x5d, 0x00],
        [0xfd, 0x37],
        [0x89, 0x4c],
        [0x02, 0x21],
        [0x28, 0xb5],
    ];
    assert!(!known.iter().any(|m| garbage.starts_with(m)) && garbage[0] != b'0');
    let p = scratch("garbage.img", &garbage);
    let o = vmm(&["--kernel", s(&k), "--initramfs", s(&p)]);
    assert_clear_error(&o, "neither a newc cpio archive nor a compressed one");
}
