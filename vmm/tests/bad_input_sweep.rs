//! The bad-input sweep: every option of the `vmm` binary and every field of
//! the control API, given a wrong type, a missing file, a directory, an
//! image of the wrong size, a duplicate id, a port out of range.
//!
//! Each bad option must give exactly one `error:` line on stderr and the
//! documented exit status (2 for a value the option parser refuses, 1 for
//! what is found wrong after parsing), and leave nothing behind: no file
//! created (no API socket, no serial log, no swap file), truncated or
//! changed. Each bad API request must give the documented error object and
//! change nothing (no device attached, the image untouched). Everything here
//! fails before KVM is touched, so it runs on any host.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::{MsiMessage, MsiRouter};
use devices::xhci::XhciPci;
use serde_json::{json, Value};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm::control::{Control, VmFacts, VmHandler};
use vmm::usb::{xhci_config, UsbManager};
use vmm::vcpu::VmStop;

const TIMEOUT: Duration = Duration::from_secs(20);

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-sweep-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A file with a valid 64-bit bzImage setup header and nothing else.
fn fake_bzimage(path: &Path) {
    let mut img = vec![0u8; 0x4000];
    let mut put = |off: usize, bytes: &[u8]| img[off..off + bytes.len()].copy_from_slice(bytes);
    put(0x1f1, &[4]);
    put(0x1fe, &0xaa55u16.to_le_bytes());
    put(0x202, b"HdrS");
    put(0x206, &0x020fu16.to_le_bytes());
    put(0x211, &[1]);
    put(0x214, &0x10_0000u32.to_le_bytes());
    put(0x22c, &0x7fff_ffffu32.to_le_bytes());
    put(0x236, &1u16.to_le_bytes());
    put(0x238, &2047u32.to_le_bytes());
    put(0x258, &0x100_0000u64.to_le_bytes());
    put(0x260, &(16u32 << 20).to_le_bytes());
    std::fs::write(path, img).unwrap();
}

/// Every entry under `root` (recursively, links not followed): its kind,
/// length and contents, to prove a run changed nothing.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (String, u64, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let (kind, data) = if m.file_type().is_symlink() {
                (
                    "link",
                    std::fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if m.is_dir() {
                todo.push(p.clone());
                ("dir", Vec::new())
            } else if m.is_file() {
                ("file", std::fs::read(&p).unwrap())
            } else {
                ("other", Vec::new()) // the API socket
            };
            out.insert(p, (kind.to_string(), m.len(), data));
        }
    }
    out
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn vmm(args: &[String]) -> Outcome {
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
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_bad_option_is_one_clear_line_and_leaves_nothing_behind() {
    let d = dir("cli");
    let p = |name: &str| d.join(name).display().to_string();
    fake_bzimage(&d.join("bzImage"));
    std::fs::write(d.join("precious"), vec![0x5a; 1 << 20]).unwrap();
    std::fs::write(d.join("disk.img"), vec![0; 8192]).unwrap();
    std::fs::write(d.join("empty.img"), b"").unwrap();
    std::fs::write(d.join("odd.img"), vec![0; 1000]).unwrap();
    std::fs::write(d.join("notes.txt"), b"#!/bin/sh\necho not a kernel\n").unwrap();
    std::fs::write(d.join("garbage.cpio"), [0xa5u8; 4096]).unwrap();
    std::fs::write(d.join("truncated.gz"), [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    std::fs::create_dir(d.join("subdir")).unwrap();
    std::os::unix::fs::symlink(d.join("precious"), d.join("link")).unwrap();
    let before = snapshot(&d);
    let k = p("bzImage");

    // (what, arguments after --kernel K, exit status, what the line says)
    let cases: Vec<(&str, Vec<String>, i32, &str)> = vec![
        // The kernel.
        ("kernel missing", vec![], 0, ""),
        ("--kernel: no such file", vec![], 1, "cannot read kernel"),
        ("--kernel: a directory", vec![], 1, "kernel"),
        ("--kernel: empty", vec![], 1, "not a Linux bzImage"),
        ("--kernel: a text file", vec![], 1, "not a Linux bzImage"),
        // The initramfs.
        (
            "--initramfs: no such file",
            vec!["--initramfs".into(), p("none")],
            1,
            "initramfs",
        ),
        (
            "--initramfs: a directory",
            vec!["--initramfs".into(), p("subdir")],
            1,
            "initramfs",
        ),
        (
            "--initramfs: empty",
            vec!["--initramfs".into(), p("empty.img")],
            1,
            "empty",
        ),
        (
            "--initramfs: garbage",
            vec!["--initramfs".into(), p("garbage.cpio")],
            1,
            "neither a newc cpio",
        ),
        (
            "--initramfs: cut gzip",
            vec!["--initramfs".into(), p("truncated.gz")],
            1,
            "truncated or corrupt",
        ),
        // The command line.
        (
            "--cmdline: too long",
            vec!["--cmdline".into(), "x".repeat(5000)],
            1,
            "command line",
        ),
        // vCPUs.
        (
            "--cpus: a word",
            vec!["--cpus".into(), "two".into()],
            2,
            "--cpus",
        ),
        (
            "--cpus: 0",
            vec!["--cpus".into(), "0".into()],
            2,
            "not in 1..=254",
        ),
        (
            "--cpus: 255",
            vec!["--cpus".into(), "255".into()],
            2,
            "not in 1..=254",
        ),
        ("--cpus: negative", vec!["--cpus=-1".into()], 2, "--cpus"),
        // Memory.
        (
            "--memory: not a size",
            vec!["--memory".into(), "size=lots".into()],
            2,
            "is not a size",
        ),
        (
            "--memory: too small",
            vec!["--memory".into(), "size=1M".into()],
            2,
            "outside",
        ),
        (
            "--memory: too large",
            vec!["--memory".into(), "size=2T".into()],
            2,
            "outside",
        ),
        (
            "--memory: not 4 KiB",
            vec!["--memory".into(), "size=16777217".into()],
            2,
            "multiple of 4 KiB",
        ),
        (
            "--memory: unknown key",
            vec!["--memory".into(), "size=1G,colour=red".into()],
            2,
            "unknown key 'colour'",
        ),
        (
            "--memory: key twice",
            vec!["--memory".into(), "size=1G,size=2G".into()],
            2,
            "given twice",
        ),
        (
            "--memory: limit alone",
            vec!["--memory".into(), "size=1G,limit=256M".into()],
            2,
            "needs swap=PATH",
        ),
        (
            "--memory: swap alone",
            vec!["--memory".into(), format!("size=1G,swap={}", p("s"))],
            2,
            "needs limit=SIZE",
        ),
        (
            "--memory: limit > size",
            vec![
                "--memory".into(),
                format!("size=1G,limit=2G,swap={}", p("s")),
            ],
            2,
            "limit must be",
        ),
        (
            "--memory: reserve a word",
            vec![
                "--memory".into(),
                format!("size=1G,limit=256M,swap={},reserve=some", p("s")),
            ],
            2,
            "not a number",
        ),
        (
            "--memory: swap_volume alone",
            vec!["--memory".into(), "size=1G,swap_volume=d".into()],
            2,
            "need limit= and swap=",
        ),
        (
            "--memory: huge_pages without a limit",
            vec!["--memory".into(), "size=1G,huge_pages=off".into()],
            2,
            "need limit= and swap=",
        ),
        (
            "--memory: huge_pages a word",
            vec![
                "--memory".into(),
                format!("size=1G,limit=256M,swap={},huge_pages=maybe", p("s")),
            ],
            2,
            "expected on or off",
        ),
        (
            "--memory: swap_volume unknown",
            vec![
                "--memory".into(),
                format!("size=512M,limit=64M,swap={},swap_volume=nope", p("s")),
            ],
            1,
            "no --disk or --usb-storage has that id",
        ),
        (
            "--memory: swap over data",
            vec![
                "--memory".into(),
                format!("size=512M,limit=64M,swap={}", p("precious")),
            ],
            1,
            "refusing to overwrite",
        ),
        (
            "--memory: swap a directory",
            vec![
                "--memory".into(),
                format!("size=512M,limit=64M,swap={}", p("subdir")),
            ],
            1,
            "not a regular file",
        ),
        (
            "--memory: swap a symlink",
            vec![
                "--memory".into(),
                format!("size=512M,limit=64M,swap={}", p("link")),
            ],
            1,
            "symbolic link",
        ),
        (
            "--memory: swap is a disk",
            vec![
                "--memory".into(),
                format!("size=512M,limit=64M,swap={}", p("disk.img")),
                "--disk".into(),
                format!("path={},id=d", p("disk.img")),
            ],
            1,
            "is the disk image of --disk id=d",
        ),
        // virtio disks.
        (
            "--disk: no path",
            vec!["--disk".into(), "readonly=on".into()],
            2,
            "missing required key 'path'",
        ),
        (
            "--disk: no such file",
            vec!["--disk".into(), p("none.img")],
            1,
            "cannot open disk image",
        ),
        (
            "--disk: a directory",
            vec!["--disk".into(), p("subdir")],
            1,
            "disk image",
        ),
        (
            "--disk: a directory, read-only",
            vec!["--disk".into(), format!("path={},readonly=on", p("subdir"))],
            1,
            "not a regular file or a block device",
        ),
        (
            "--disk: empty image",
            vec!["--disk".into(), p("empty.img")],
            1,
            "at least one 512-byte sector",
        ),
        (
            "--disk: odd size",
            vec!["--disk".into(), p("odd.img")],
            1,
            "not a multiple of 512-byte sectors",
        ),
        (
            "--disk: readonly=maybe",
            vec![
                "--disk".into(),
                format!("path={},readonly=maybe", p("disk.img")),
            ],
            2,
            "expected on or off",
        ),
        (
            "--disk: queues=0",
            vec!["--disk".into(), format!("path={},queues=0", p("disk.img"))],
            2,
            "must be 1..=64",
        ),
        (
            "--disk: queues=65",
            vec!["--disk".into(), format!("path={},queues=65", p("disk.img"))],
            2,
            "must be 1..=64",
        ),
        (
            "--disk: queues a word",
            vec![
                "--disk".into(),
                format!("path={},queues=many", p("disk.img")),
            ],
            2,
            "not a number",
        ),
        (
            "--disk: id too long",
            vec![
                "--disk".into(),
                format!("path={},id={}", p("disk.img"), "x".repeat(21)),
            ],
            2,
            "ASCII characters",
        ),
        (
            "--disk: unknown key",
            vec![
                "--disk".into(),
                format!("path={},cache=none", p("disk.img")),
            ],
            2,
            "unknown key 'cache'",
        ),
        (
            "--disk: duplicate id",
            vec![
                "--disk".into(),
                format!("path={},id=d,readonly=on", p("disk.img")),
                "--disk".into(),
                format!("path={},id=d,readonly=on", p("disk.img")),
            ],
            1,
            "id=d is used twice",
        ),
        (
            "--disk: same image twice",
            vec![
                "--disk".into(),
                format!("path={},id=a", p("disk.img")),
                "--disk".into(),
                format!("path={},id=b", p("disk.img")),
            ],
            1,
            "is in use",
        ),
        // USB disks.
        (
            "--usb-storage: port=0",
            vec![
                "--usb-storage".into(),
                format!("path={},port=0", p("disk.img")),
            ],
            2,
            "port=0 does not exist",
        ),
        (
            "--usb-storage: port=9",
            vec![
                "--usb-storage".into(),
                format!("path={},port=9", p("disk.img")),
            ],
            2,
            "port=9 does not exist: USB 2 ports are 1-4, USB 3 ports 5-8",
        ),
        (
            "--usb-storage: port=300",
            vec![
                "--usb-storage".into(),
                format!("path={},port=300", p("disk.img")),
            ],
            2,
            "port=300 does not exist",
        ),
        (
            "--usb-storage: port a word",
            vec![
                "--usb-storage".into(),
                format!("path={},port=five", p("disk.img")),
            ],
            2,
            "not a number",
        ),
        (
            "--usb-storage: no such file",
            vec!["--usb-storage".into(), p("none.img")],
            1,
            "cannot open disk image",
        ),
        (
            "--usb-storage: a directory",
            vec![
                "--usb-storage".into(),
                format!("path={},readonly=on", p("subdir")),
            ],
            1,
            "not a regular file or a block device",
        ),
        (
            "--usb-storage: empty image",
            vec!["--usb-storage".into(), p("empty.img")],
            1,
            "at least one 512-byte sector",
        ),
        (
            "--usb-storage: odd size",
            vec!["--usb-storage".into(), p("odd.img")],
            1,
            "not a multiple",
        ),
        (
            "--usb-storage: bad id",
            vec![
                "--usb-storage".into(),
                format!("path={},id=has space", p("disk.img")),
            ],
            2,
            "characters of A-Z",
        ),
        (
            "--usb-storage: readonly=perhaps",
            vec![
                "--usb-storage".into(),
                format!("path={},readonly=perhaps", p("disk.img")),
            ],
            2,
            "expected on or off",
        ),
        (
            "--usb-storage: port twice",
            vec![
                "--usb-storage".into(),
                format!("path={},port=5,readonly=on", p("disk.img")),
                "--usb-storage".into(),
                format!("path={},port=5,readonly=on,id=b", p("disk.img")),
            ],
            1,
            "port=5 is given to two USB disks",
        ),
        (
            "--usb-storage: duplicate id",
            vec![
                "--usb-storage".into(),
                format!("path={},id=u,readonly=on", p("disk.img")),
                "--usb-storage".into(),
                format!("path={},id=u,readonly=on", p("disk.img")),
            ],
            1,
            "id u is already the id of",
        ),
        (
            "--usb-storage: id of a disk",
            vec![
                "--disk".into(),
                format!("path={},id=d,readonly=on", p("disk.img")),
                "--usb-storage".into(),
                format!("path={},id=d,readonly=on", p("disk.img")),
            ],
            1,
            "already the id of --disk id=d",
        ),
        (
            "--usb-storage: also a --disk",
            vec![
                "--disk".into(),
                format!("path={},id=d", p("disk.img")),
                "--usb-storage".into(),
                format!("path={},id=u", p("disk.img")),
            ],
            1,
            "is in use",
        ),
        // The rest.
        (
            "--usb-io: unknown",
            vec!["--usb-io".into(), "fast".into()],
            2,
            "neither vcpu nor thread",
        ),
        (
            "--seccomp: unknown",
            vec!["--seccomp".into(), "kill".into()],
            2,
            "not on, log or off",
        ),
        (
            "--serial: unknown",
            vec!["--serial".into(), "pipe".into()],
            2,
            "not key=value",
        ),
        (
            "--serial: a directory",
            vec!["--serial".into(), format!("file={}", p("subdir"))],
            1,
            "is a directory",
        ),
        (
            "--serial: a disk image",
            vec![
                "--disk".into(),
                format!("path={},id=d", p("disk.img")),
                "--serial".into(),
                format!("file={}", p("disk.img")),
            ],
            1,
            "is the file of --disk id=d",
        ),
        (
            "--serial: the kernel",
            vec!["--serial".into(), format!("file={}", p("bzImage"))],
            1,
            "is the file of --kernel",
        ),
        (
            "--serial: the swap file",
            vec![
                "--memory".into(),
                format!("size=512M,limit=64M,swap={}", p("out")),
                "--serial".into(),
                format!("file={}", p("out")),
            ],
            1,
            "--memory swap and --serial file are both",
        ),
        (
            "--api-socket: the serial log",
            vec![
                "--serial".into(),
                format!("file={}", p("out")),
                "--api-socket".into(),
                p("out"),
            ],
            1,
            "--serial file and --api-socket are both",
        ),
        (
            "--serial: no such directory",
            vec!["--serial".into(), format!("file={}", p("none/console.log"))],
            1,
            "does not exist",
        ),
        (
            "--api-socket: a regular file",
            vec!["--api-socket".into(), p("precious")],
            1,
            "is not a socket; refusing to replace it",
        ),
        (
            "--api-socket: no such directory",
            vec!["--api-socket".into(), p("none/api.sock")],
            1,
            "does not exist",
        ),
        (
            "--log-level: unknown",
            vec!["--log-level".into(), "loud".into()],
            2,
            "--log-level",
        ),
        (
            "--stall-watchdog: negative",
            vec!["--stall-watchdog=-1".into()],
            2,
            "--stall-watchdog",
        ),
        (
            "--stall-watchdog: a word",
            vec!["--stall-watchdog".into(), "soon".into()],
            2,
            "--stall-watchdog",
        ),
        (
            "unknown option",
            vec!["--turbo".into()],
            2,
            "unexpected argument '--turbo'",
        ),
    ];

    let mut tried = 0;
    for (what, rest, code, needle) in &cases {
        let mut args: Vec<String> = match *what {
            "kernel missing" => vec![],
            "--kernel: no such file" => vec!["--kernel".into(), p("none")],
            "--kernel: a directory" => vec!["--kernel".into(), p("subdir")],
            "--kernel: empty" => vec!["--kernel".into(), p("empty.img")],
            "--kernel: a text file" => vec!["--kernel".into(), p("notes.txt")],
            _ => vec!["--kernel".into(), k.clone()],
        };
        args.extend(rest.iter().cloned());
        // Files the VMM would create if it got that far.
        if !rest.contains(&"--api-socket".to_string()) {
            args.extend(["--api-socket".into(), p("api.sock")]);
        }
        if !rest.contains(&"--serial".to_string()) {
            args.extend(["--serial".into(), format!("file={}", p("console.log"))]);
        }
        let (code, needle) = if *what == "kernel missing" {
            (2, "required arguments were not provided: --kernel")
        } else {
            (*code, *needle)
        };
        let o = vmm(&args);
        let lines: Vec<_> = o.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(
            o.code,
            Some(code),
            "{what}: exit status; stderr: {}",
            o.stderr
        );
        assert_eq!(lines.len(), 1, "{what}: one line; stderr: {}", o.stderr);
        assert!(lines[0].starts_with("error: "), "{what}: {}", lines[0]);
        assert!(
            lines[0].contains(needle),
            "{what}: '{needle}' not in: {}",
            lines[0]
        );
        assert_eq!(snapshot(&d), before, "{what}: files created or changed");
        tried += 1;
    }
    eprintln!("bad-input sweep: {tried} bad command lines refused, nothing left behind");
}

struct NoRouter;
impl MsiRouter for NoRouter {
    fn set_route(&self, _: u16, _: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
    fn fire(&self, _: u16) -> std::io::Result<()> {
        Ok(())
    }
}

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut hello = String::new();
        reader.read_line(&mut hello).unwrap();
        assert!(hello.contains("hello"), "{hello}");
        Self { stream, reader }
    }

    fn call(&mut self, line: &str) -> Value {
        self.stream.write_all(line.as_bytes()).unwrap();
        self.stream.write_all(b"\n").unwrap();
        // Events (usb.attached) come between replies: skip them.
        loop {
            let mut s = String::new();
            self.reader.read_line(&mut s).unwrap();
            let v: Value = serde_json::from_str(&s).unwrap_or_else(|e| panic!("{line}: {e}: {s}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }
}

#[test]
fn every_bad_api_request_has_its_error_object_and_changes_nothing() {
    let d = dir("api");
    let p = |name: &str| d.join(name).display().to_string();
    std::fs::write(d.join("disk.img"), vec![0x11; 1 << 20]).unwrap();
    std::fs::write(d.join("other.img"), vec![0x22; 1 << 20]).unwrap();
    std::fs::write(d.join("empty.img"), b"").unwrap();
    std::fs::write(d.join("odd.img"), vec![0; 1000]).unwrap();
    std::fs::create_dir(d.join("subdir")).unwrap();
    let socket = d.join("api.sock");

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let xhci = XhciPci::new(
        xhci_config(),
        GuestMemoryAtomic::new(mem),
        Arc::new(NoRouter),
    )
    .unwrap();
    let xhci = Arc::new(Mutex::new(xhci));
    let stop = VmStop::new().unwrap();
    let handler = VmHandler::new(
        Some(UsbManager::new(xhci.clone(), 1)),
        stop.clone(),
        VmFacts {
            cpus: 1,
            memory_bytes: 64 << 20,
        },
        None,
    );
    let control = Control::new(Some(&socket), handler).unwrap();
    let stop2 = stop.clone();
    let vmm_thread = std::thread::spawn(move || control.run_until_stopped(&stop2));
    let mut c = Client::connect(&socket);

    // One good disk, read-write, so that conflicts have something to hit.
    let r = c.call(
        &json!({"id":0,"cmd":"usb.attach","args":{"path":p("disk.img"),"port":5,"id":"good"}})
            .to_string(),
    );
    assert_eq!(r["ok"]["port"], json!(5), "{r}");
    let before = snapshot(&d);

    let attach = |args: Value| json!({"id":1,"cmd":"usb.attach","args":args}).to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        // The request itself.
        ("not JSON", "{\"id\":1,".into(), "bad_request"),
        ("not an object", "[1,2]".into(), "bad_request"),
        (
            "id a list",
            r#"{"id":[1],"cmd":"vm.info"}"#.into(),
            "bad_request",
        ),
        ("no cmd", r#"{"id":1}"#.into(), "bad_request"),
        ("cmd a number", r#"{"id":1,"cmd":5}"#.into(), "bad_request"),
        (
            "unknown cmd",
            r#"{"id":1,"cmd":"vm.explode"}"#.into(),
            "bad_request",
        ),
        (
            "args a string",
            r#"{"id":1,"cmd":"usb.list","args":"all"}"#.into(),
            "bad_request",
        ),
        (
            "unknown field",
            r#"{"id":1,"cmd":"vm.info","verbose":true}"#.into(),
            "bad_request",
        ),
        // usb.attach fields: wrong types, missing, out of range.
        (
            "attach: no args",
            r#"{"id":1,"cmd":"usb.attach"}"#.into(),
            "bad_request",
        ),
        (
            "attach: path a number",
            attach(json!({"path":5})),
            "bad_request",
        ),
        (
            "attach: path empty",
            attach(json!({"path":""})),
            "bad_request",
        ),
        (
            "attach: port a string",
            attach(json!({"path":p("other.img"),"port":"6"})),
            "bad_request",
        ),
        (
            "attach: port 0",
            attach(json!({"path":p("other.img"),"port":0})),
            "bad_request",
        ),
        (
            "attach: port 9",
            attach(json!({"path":p("other.img"),"port":9})),
            "bad_request",
        ),
        (
            "attach: port 300",
            attach(json!({"path":p("other.img"),"port":300})),
            "bad_request",
        ),
        (
            "attach: port -1",
            attach(json!({"path":p("other.img"),"port":-1})),
            "bad_request",
        ),
        (
            "attach: readonly a string",
            attach(json!({"path":p("other.img"),"readonly":"yes"})),
            "bad_request",
        ),
        (
            "attach: id a number",
            attach(json!({"path":p("other.img"),"id":7})),
            "bad_request",
        ),
        (
            "attach: id with a space",
            attach(json!({"path":p("other.img"),"id":"a b"})),
            "bad_request",
        ),
        (
            "attach: id too long",
            attach(json!({"path":p("other.img"),"id":"x".repeat(33)})),
            "bad_request",
        ),
        (
            "attach: unknown field",
            attach(json!({"path":p("other.img"),"speed":"high"})),
            "bad_request",
        ),
        // Files: missing, a directory, wrong sizes.
        (
            "attach: no such file",
            attach(json!({"path":p("none.img")})),
            "internal",
        ),
        (
            "attach: a directory",
            attach(json!({"path":p("subdir"),"readonly":true})),
            "bad_request",
        ),
        (
            "attach: empty image",
            attach(json!({"path":p("empty.img")})),
            "bad_request",
        ),
        (
            "attach: odd size",
            attach(json!({"path":p("odd.img")})),
            "bad_request",
        ),
        // Duplicates and conflicts.
        (
            "attach: id taken",
            attach(json!({"path":p("other.img"),"id":"good"})),
            "conflict",
        ),
        (
            "attach: port taken",
            attach(json!({"path":p("other.img"),"port":5})),
            "conflict",
        ),
        (
            "attach: image in use",
            attach(json!({"path":p("disk.img"),"id":"again"})),
            "conflict",
        ),
        (
            "attach: image in use, read-only",
            attach(json!({"path":p("disk.img"),"readonly":true})),
            "conflict",
        ),
        // usb.detach and usb.wake targets.
        (
            "detach: no target",
            r#"{"id":1,"cmd":"usb.detach","args":{}}"#.into(),
            "bad_request",
        ),
        (
            "detach: both targets",
            r#"{"id":1,"cmd":"usb.detach","args":{"id":"good","port":5}}"#.into(),
            "bad_request",
        ),
        (
            "detach: port a string",
            r#"{"id":1,"cmd":"usb.detach","args":{"port":"5"}}"#.into(),
            "bad_request",
        ),
        (
            "detach: unknown id",
            r#"{"id":1,"cmd":"usb.detach","args":{"id":"nope"}}"#.into(),
            "not_found",
        ),
        (
            "detach: empty port",
            r#"{"id":1,"cmd":"usb.detach","args":{"port":6}}"#.into(),
            "not_found",
        ),
        (
            "wake: unknown id",
            r#"{"id":1,"cmd":"usb.wake","args":{"id":"nope"}}"#.into(),
            "not_found",
        ),
        (
            "wake: not suspended",
            r#"{"id":1,"cmd":"usb.wake","args":{"id":"good"}}"#.into(),
            "conflict",
        ),
        // The test aid without a pager.
        (
            "evict: unknown field",
            r#"{"id":1,"cmd":"debug.evict","args":{"target":"xhci"}}"#.into(),
            "bad_request",
        ),
        (
            "evict: no pager",
            r#"{"id":1,"cmd":"debug.evict","args":{"device":"xhci"}}"#.into(),
            "invalid_state",
        ),
    ];
    for (what, line, code) in &cases {
        let r = c.call(line);
        assert_eq!(r["error"]["code"], json!(code), "{what}: {line} -> {r}");
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: no message: {r}"
        );
        let list = c.call(r#"{"id":"l","cmd":"usb.list"}"#);
        let devices = &list["ok"]["devices"];
        assert_eq!(devices.as_array().map(Vec::len), Some(1), "{what}: {list}");
        assert_eq!(devices[0]["id"], json!("good"), "{what}: {list}");
        assert_eq!(snapshot(&d), before, "{what}: files changed");
    }
    eprintln!(
        "bad-input sweep: {} bad API requests refused, nothing changed",
        cases.len()
    );

    let r = c.call(r#"{"id":9,"cmd":"vm.shutdown"}"#);
    assert!(r.get("ok").is_some(), "{r}");
    let start = Instant::now();
    while !vmm_thread.is_finished() {
        assert!(start.elapsed() < TIMEOUT, "control loop did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
    vmm_thread.join().unwrap();
    assert!(!socket.exists(), "socket file removed");
}
