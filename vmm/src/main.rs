//! `vmm`: boots a Linux guest on KVM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::config::{BalloonConfig, DiskConfig, MemoryConfig, SerialConfig, UsbIo, UsbStorageConfig};
use vmm::exit_status;
use vmm::vm::{self, VmConfig, DEFAULT_CMDLINE, MAX_CPUS};

/// Boots a Linux kernel (bzImage or vmlinux) on KVM with a serial console.
///
/// Exit status: 0 when the guest rebooted cleanly or halted/powered off,
/// the byte the guest wrote to the debug-exit port (0xf4), 1 on a VMM error
/// and 2 on a bad option (both printed as one `error:` line on stderr), 76
/// stall watchdog, 77 triple fault, 78 guest kernel panic, 79 every vCPU
/// halted dead, 75 a system call its seccomp filter forbids, 128+N stopped
/// by signal N (SIGHUP, SIGINT, SIGTERM).
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    /// Linux kernel: a bzImage with a 64-bit entry point, or an uncompressed
    /// x86-64 vmlinux ELF (boots faster: no in-guest decompression).
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,

    /// Initramfs image: a newc cpio archive, plain or compressed. Plain and
    /// gzip archives are checked end to end before boot; bzip2, lzma, xz,
    /// lzo, lz4 and zstd pass with a warning; anything else is refused.
    #[arg(long, value_name = "PATH")]
    initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE)]
    cmdline: String,

    /// Number of vCPUs (1-254).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)))]
    cpus: u8,

    /// Guest memory: size=SIZE[,limit=SIZE,swap=PATH,reserve=PAGES,swap_volume=ID,huge_pages=off].
    /// SIZE takes K/M/G/T suffixes. limit= caps resident guest RAM and pages the
    /// rest out to the swap file; reserve= holds pages back for no-I/O faults;
    /// swap_volume= puts swap I/O on a disk's I/O queue; huge_pages=off keeps
    /// paged guest RAM in 4 KiB host pages (by default 2 MiB blocks first
    /// written while memory is plentiful get huge pages). The swap file is
    /// created, or reused only when empty or a swap file of this VMM: a file
    /// holding other data, a symbolic link or a disk image of this VM is
    /// refused.
    #[arg(long, value_name = "OPTIONS", default_value = "size=512M", value_parser = MemoryConfig::parse)]
    memory: MemoryConfig,

    /// A virtio-blk disk on a raw image: path=PATH[,readonly=on,id=ID,queues=N].
    /// Repeat for more disks. id (default: the file name, at most 20
    /// characters) is the serial the guest reads and names the disk's I/O
    /// volume; queues defaults to one per vCPU. Images (here and for
    /// --usb-storage) are locked while open, shared when read-only and
    /// exclusive when read-write, and hold at least one 512-byte sector.
    #[arg(long = "disk", value_name = "OPTIONS", value_parser = DiskConfig::parse)]
    disks: Vec<DiskConfig>,

    /// A USB mass-storage disk on a raw image:
    /// path=PATH[,port=N,readonly=on,id=ID]. Repeat for more disks. The xHCI
    /// root hub has USB 2 ports 1-4 and USB 3 ports 5-8; without port= the
    /// first free USB 3 port is taken (then USB 2). id (default usb<port>,
    /// 1-32 of A-Z a-z 0-9 . _ -) names the disk in the control API and its
    /// I/O volume and is its USB serial number.
    #[arg(long = "usb-storage", value_name = "OPTIONS", value_parser = UsbStorageConfig::parse)]
    usb_storage: Vec<UsbStorageConfig>,

    /// Where USB transfers run: vcpu (on the vCPU thread that rang the
    /// doorbell, so the guest has its completion as soon as it resumes
    /// instead of idling for it) or thread (on the controller's own I/O
    /// thread, so a slow image file never holds a vCPU).
    #[arg(long, value_name = "vcpu|thread", default_value = "vcpu", value_parser = UsbIo::parse)]
    usb_io: UsbIo,

    /// A virtio-balloon device:
    /// size=SIZE[,deflate_on_oom=on,free_page_reporting=on,stats_interval=SECS,auto=on,auto_max=SIZE].
    /// size (default 0) is how much memory the balloon holds back from the
    /// guest, not the guest's size; change it with balloon.set on the control
    /// API. Inflated and reported pages go back to the host (through the pager
    /// with --memory limit=, else madvise). deflate_on_oom lets the guest take
    /// pages back when it runs out of memory; free_page_reporting has the
    /// guest report free 2-4 MiB blocks for the host to drop; stats_interval
    /// asks the guest for memory statistics every SECS seconds (0, the
    /// default: only on balloon.stats). auto=on (off by default; needs
    /// --memory limit= and stats_interval) raises the target by 64 MiB a
    /// second while the pager is under pressure and the guest has the memory
    /// free, up to auto_max (default half of guest RAM), and lowers it back
    /// towards size after 10 s without pressure. Guest module: virtio_balloon.
    #[arg(long, value_name = "OPTIONS", value_parser = BalloonConfig::parse)]
    balloon: Option<BalloonConfig>,

    /// Serve the control API (newline-delimited JSON, see docs/api.md) on
    /// this Unix socket; drive it with vmm-ctl. Also adds the USB controller
    /// so that disks can be hot-plugged.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,

    /// Guest serial console (COM1): stdout, off, or file=PATH.
    #[arg(long, value_name = "TARGET", default_value = "stdout", value_parser = SerialConfig::parse)]
    serial: SerialConfig,

    /// Log level for the VMM's own messages on stderr (error, warn, info,
    /// debug, trace); RUST_LOG overrides it.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: log::LevelFilter,

    /// Stall watchdog: a resume/reset path, or any thread blocked on a
    /// guest-memory fault, that waits longer than SECS seconds is reported
    /// with the chain of waits behind it and the VMM exits with status 76.
    /// 0 turns it off.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    stall_watchdog: u64,

    /// TEST AID, UNSAFE: resume and reset paths run without their NOIO
    /// scope, so with swap on a device's volume they can deadlock (the
    /// stall watchdog then reports it). Only to show what NOIO prevents.
    #[arg(long)]
    unsafe_disable_noio: bool,

    /// Seccomp filters, one system call list per kind of VMM thread (vCPU,
    /// device event loop, pager, API, main, helpers): on (a call outside its
    /// thread's list prints one `error: seccomp:` line naming the call and
    /// the thread, and the VMM exits with status 75), log (the kernel allows
    /// such a call and logs it, see dmesg; for debugging), or off.
    #[arg(long, value_name = "on|log|off", default_value = "on", value_parser = vmm::seccomp::Mode::parse)]
    seccomp: vmm::seccomp::Mode,

    /// Run even on a PVM /dev/kvm (stock kernels hang there; for experiments).
    #[arg(long, hide = true)]
    allow_pvm: bool,
}

fn main() -> ExitCode {
    // Before any thread exists, so that all of them inherit the mask.
    if let Err(e) = vmm::signals::block() {
        eprintln!("error: cannot block the stop signals: {e}");
        return ExitCode::from(exit_status::VMM_ERROR);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    env_logger::Builder::new()
        .filter_level(cli.log_level)
        .parse_default_env()
        .format_timestamp_millis()
        .init();
    // Before the VM's threads: each installs its filter as it starts.
    if let Err(e) = vmm::seccomp::init(cli.seccomp) {
        eprintln!("{}", error_line(&e));
        return ExitCode::from(exit_status::VMM_ERROR);
    }
    let cfg = VmConfig {
        kernel: cli.kernel,
        initramfs: cli.initramfs,
        cmdline: cli.cmdline,
        cpus: cli.cpus,
        memory: cli.memory,
        serial: cli.serial,
        disks: cli.disks,
        usb: cli.usb_storage,
        api_socket: cli.api_socket,
        allow_pvm: cli.allow_pvm,
        usb_io: cli.usb_io,
        balloon: cli.balloon,
        stall_watchdog: (cli.stall_watchdog > 0)
            .then(|| std::time::Duration::from_secs(cli.stall_watchdog)),
        unsafe_disable_noio: cli.unsafe_disable_noio,
    };
    match vm::run(&cfg) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(exit_status::VMM_ERROR)),
        Err(e) => {
            eprintln!("{}", error_line(&e));
            ExitCode::from(exit_status::VMM_ERROR)
        }
    }
}

/// `error: ` and the error with its chain of causes, on one line.
fn error_line(e: &dyn std::error::Error) -> String {
    let mut msg = format!("error: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// `--help` and `--version` print as clap does and exit 0; a bad option is
/// one `error:` line (clap's first paragraph, without its usage block) and
/// status 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    eprintln!("{}", one_line(&e.render().to_string()));
    ExitCode::from(exit_status::USAGE_ERROR)
}

/// The first paragraph of clap's message on one line, starting `error: `.
fn one_line(text: &str) -> String {
    let para: Vec<&str> = text
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = para.join(" ");
    if line.starts_with("error:") {
        line
    } else {
        format!("error: {line}")
    }
}
