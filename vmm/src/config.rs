//! Command-line configuration: `--memory size=512M,limit=...` style options,
//! parsed into typed structs and validated before anything is created.

use std::collections::BTreeMap;
use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{option}: '{item}' is not key=value")]
    NotKeyValue { option: &'static str, item: String },
    #[error("--{option}: unknown key '{key}' (known keys: {known})")]
    UnknownKey {
        option: &'static str,
        key: String,
        known: String,
    },
    #[error("--{option}: key '{key}' given twice")]
    DuplicateKey { option: &'static str, key: String },
    #[error("--{option}: missing required key '{key}'")]
    MissingKey {
        option: &'static str,
        key: &'static str,
    },
    #[error("--{option}: {key}={value} is not a size (use e.g. 512M, 2G, 65536K or bytes)")]
    BadSize {
        option: &'static str,
        key: &'static str,
        value: String,
    },
    #[error("--{option}: {key}={value} is not a number")]
    BadNumber {
        option: &'static str,
        key: &'static str,
        value: String,
    },
    #[error("--{option}: {msg}")]
    Invalid { option: &'static str, msg: String },
}

fn invalid(option: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        option,
        msg: msg.into(),
    }
}

/// The key=value pairs of one option, taken out one key at a time so that
/// whatever is left over at the end is reported as unknown.
pub struct KeyValues {
    option: &'static str,
    known: &'static [&'static str],
    pairs: BTreeMap<String, String>,
}

impl KeyValues {
    /// Parses `a=1,b=2`. A bare first item is taken as `default_key=item`.
    pub fn parse(
        option: &'static str,
        known: &'static [&'static str],
        default_key: Option<&'static str>,
        text: &str,
    ) -> Result<Self, ConfigError> {
        let mut pairs = BTreeMap::new();
        for (i, item) in text.split(',').enumerate() {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
                None => match default_key {
                    Some(k) if i == 0 && !item.is_empty() => (k.to_string(), item.to_string()),
                    _ => {
                        return Err(ConfigError::NotKeyValue {
                            option,
                            item: item.to_string(),
                        })
                    }
                },
            };
            if !known.contains(&key.as_str()) {
                return Err(ConfigError::UnknownKey {
                    option,
                    key,
                    known: known.join(", "),
                });
            }
            if pairs.insert(key.clone(), value).is_some() {
                return Err(ConfigError::DuplicateKey { option, key });
            }
        }
        Ok(Self {
            option,
            known,
            pairs,
        })
    }

    pub fn take(&mut self, key: &'static str) -> Option<String> {
        debug_assert!(self.known.contains(&key));
        self.pairs.remove(key)
    }

    pub fn required(&mut self, key: &'static str) -> Result<String, ConfigError> {
        self.take(key).ok_or(ConfigError::MissingKey {
            option: self.option,
            key,
        })
    }

    pub fn size(&mut self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        let option = self.option;
        self.take(key)
            .map(|v| {
                parse_size(&v).ok_or(ConfigError::BadSize {
                    option,
                    key,
                    value: v,
                })
            })
            .transpose()
    }

    pub fn number(&mut self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        let option = self.option;
        self.take(key)
            .map(|v| {
                v.parse().map_err(|_| ConfigError::BadNumber {
                    option,
                    key,
                    value: v,
                })
            })
            .transpose()
    }

    pub fn flag(&mut self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        let option = self.option;
        self.take(key)
            .map(|v| match v.as_str() {
                "on" | "true" | "yes" | "1" => Ok(true),
                "off" | "false" | "no" | "0" => Ok(false),
                _ => Err(invalid(option, format!("{key}={v}: expected on or off"))),
            })
            .transpose()
    }
}

/// Parses `512M`, `2G`, `4096K`, `1T` or plain bytes (binary multiples).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        (i, 't' | 'T') => (&text[..i], 40),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// `--memory size=512M[,limit=256M,swap=PATH,reserve=PAGES,swap_volume=ID,huge_pages=off]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Resident limit for guest RAM; `None` means no paging.
    pub limit: Option<u64>,
    /// Swap store file (required with `limit`).
    pub swap: Option<PathBuf>,
    /// Pages held back for NOIO faults.
    pub reserve_pages: Option<u64>,
    /// Id of a disk whose volume carries swap I/O.
    pub swap_volume: Option<String>,
    /// With a limit: whether whole block fills get huge pages (default on).
    pub huge_pages: Option<bool>,
}

/// Smallest guest this VMM accepts; a stock kernel needs far more anyway.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest guest: keeps address arithmetic far from overflow.
pub const MAX_MEMORY: u64 = 1 << 40;

impl MemoryConfig {
    pub const KEYS: &'static [&'static str] = &[
        "size",
        "limit",
        "swap",
        "reserve",
        "swap_volume",
        "huge_pages",
    ];

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        const OPT: &str = "memory";
        let mut kv = KeyValues::parse(OPT, Self::KEYS, Some("size"), text)?;
        let size = kv.size("size")?.ok_or(ConfigError::MissingKey {
            option: OPT,
            key: "size",
        })?;
        let cfg = Self {
            size,
            limit: kv.size("limit")?,
            swap: kv.take("swap").map(PathBuf::from),
            reserve_pages: kv.number("reserve")?,
            swap_volume: kv.take("swap_volume"),
            huge_pages: kv.flag("huge_pages")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        const OPT: &str = "memory";
        if self.size < MIN_MEMORY || self.size > MAX_MEMORY {
            return Err(invalid(
                OPT,
                format!(
                    "size={} is outside {} MiB ..= {} GiB",
                    self.size,
                    MIN_MEMORY >> 20,
                    MAX_MEMORY >> 30
                ),
            ));
        }
        if !self.size.is_multiple_of(4096) {
            return Err(invalid(OPT, "size must be a multiple of 4 KiB"));
        }
        match (self.limit, &self.swap) {
            (Some(limit), Some(_)) => {
                if limit == 0 || limit > self.size {
                    return Err(invalid(OPT, "limit must be > 0 and <= size"));
                }
            }
            (Some(_), None) => return Err(invalid(OPT, "limit= needs swap=PATH")),
            (None, Some(_)) => return Err(invalid(OPT, "swap= needs limit=SIZE")),
            (None, None) => {
                if self.reserve_pages.is_some()
                    || self.swap_volume.is_some()
                    || self.huge_pages.is_some()
                {
                    return Err(invalid(
                        OPT,
                        "reserve=, swap_volume= and huge_pages= need limit= and swap=",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// `--disk path=PATH[,readonly=on,id=ID,queues=N]`: a virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// Serial reported to the guest (GET_ID) and the name of its volume.
    pub id: String,
    /// Request queues; `None` means one per vCPU.
    pub queues: Option<u16>,
}

/// Longest id GET_ID can return (virtio spec: 20 bytes).
pub const MAX_DISK_ID: usize = 20;

impl DiskConfig {
    pub const KEYS: &'static [&'static str] = &["path", "readonly", "id", "queues"];

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        const OPT: &str = "disk";
        let mut kv = KeyValues::parse(OPT, Self::KEYS, Some("path"), text)?;
        let path = PathBuf::from(kv.required("path")?);
        let id = kv.take("id").unwrap_or_else(|| {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let mut id = name.unwrap_or_else(|| "disk".into());
            id.truncate(MAX_DISK_ID);
            id
        });
        if id.is_empty() || id.len() > MAX_DISK_ID || !id.is_ascii() {
            return Err(invalid(
                OPT,
                format!("id={id}: 1..={MAX_DISK_ID} ASCII characters"),
            ));
        }
        let queues = match kv.number("queues")? {
            None => None,
            Some(q @ 1..=64) => Some(q as u16),
            Some(q) => return Err(invalid(OPT, format!("queues={q}: must be 1..=64"))),
        };
        Ok(Self {
            path,
            readonly: kv.flag("readonly")?.unwrap_or(false),
            id,
            queues,
        })
    }
}

/// Checks that disk ids are unique (they name volumes and API objects).
pub fn check_disk_ids(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    for d in disks {
        if !seen.insert(d.id.as_str()) {
            return Err(invalid("disk", format!("id={} is used twice", d.id)));
        }
    }
    Ok(())
}

/// `--usb-storage path=PATH[,port=N,readonly=on,id=ID]`: a USB mass-storage
/// disk on a root hub port of the xHCI controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbStorageConfig {
    pub path: PathBuf,
    /// 1-based root hub port; `None` picks a free one (USB 3 first).
    pub port: Option<u8>,
    pub readonly: bool,
    /// Names the device in the API and its I/O volume, and is its USB serial
    /// number; `None` means `usb<port>`.
    pub id: Option<String>,
}

/// Root hub ports of the xHCI controller (USB 2 first, then USB 3).
pub const USB_PORTS: u8 = crate::usb::USB2_PORTS + crate::usb::USB3_PORTS;

/// Longest USB device id (it becomes the iSerialNumber string).
pub const MAX_USB_ID: usize = 32;

/// Checks a USB device id: 1..=MAX_USB_ID of `[A-Za-z0-9._-]`.
pub fn valid_usb_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_USB_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl UsbStorageConfig {
    pub const KEYS: &'static [&'static str] = &["path", "port", "readonly", "id"];

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        const OPT: &str = "usb-storage";
        let mut kv = KeyValues::parse(OPT, Self::KEYS, Some("path"), text)?;
        let path = PathBuf::from(kv.required("path")?);
        let port = match kv.number("port")? {
            None => None,
            Some(p) if (1..=u64::from(USB_PORTS)).contains(&p) => Some(p as u8),
            Some(p) => {
                return Err(invalid(
                    OPT,
                    format!(
                        "port={p} does not exist: USB 2 ports are 1-{}, USB 3 ports {}-{USB_PORTS}",
                        crate::usb::USB2_PORTS,
                        crate::usb::USB2_PORTS + 1
                    ),
                ))
            }
        };
        let id = kv.take("id");
        if let Some(id) = &id {
            if !valid_usb_id(id) {
                return Err(invalid(
                    OPT,
                    format!("id={id}: 1..={MAX_USB_ID} characters of A-Z a-z 0-9 . _ -"),
                ));
            }
        }
        Ok(Self {
            path,
            port,
            readonly: kv.flag("readonly")?.unwrap_or(false),
            id,
        })
    }
}

/// `--balloon size=SIZE[,deflate_on_oom=on,free_page_reporting=on,stats_interval=SECS,auto=on,auto_max=SIZE]`:
/// a virtio-balloon device. `size` is the balloon's size (memory held back
/// from the guest, as in Cloud Hypervisor), not the guest's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial balloon size in bytes (default 0: empty).
    pub size: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING (free page reporting).
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0 means only on request.
    pub stats_interval_s: u64,
    /// Let the VMM move the target under pager pressure (`balloon_policy`).
    pub auto: bool,
    /// The most `auto` inflates to; `None`: half of guest RAM.
    pub auto_max: Option<u64>,
}

/// Longest statistics interval (a day; longer is as good as off).
pub const MAX_STATS_INTERVAL_S: u64 = 86_400;

impl BalloonConfig {
    pub const KEYS: &'static [&'static str] = &[
        "size",
        "deflate_on_oom",
        "free_page_reporting",
        "stats_interval",
        "auto",
        "auto_max",
    ];

    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        const OPT: &str = "balloon";
        let mut kv = KeyValues::parse(OPT, Self::KEYS, Some("size"), text)?;
        let size = kv.size("size")?.unwrap_or(0);
        if !size.is_multiple_of(4096) {
            return Err(invalid(
                OPT,
                format!("size={size}: must be a multiple of 4 KiB"),
            ));
        }
        let stats_interval_s = kv.number("stats_interval")?.unwrap_or(0);
        if stats_interval_s > MAX_STATS_INTERVAL_S {
            return Err(invalid(
                OPT,
                format!(
                    "stats_interval={stats_interval_s}: at most {MAX_STATS_INTERVAL_S} seconds"
                ),
            ));
        }
        let auto = kv.flag("auto")?.unwrap_or(false);
        let auto_max = kv.size("auto_max")?;
        if auto && stats_interval_s == 0 {
            return Err(invalid(
                OPT,
                "auto=on needs stats_interval=SECS (it reads the guest's free memory)",
            ));
        }
        if auto_max.is_some() && !auto {
            return Err(invalid(OPT, "auto_max= needs auto=on"));
        }
        Ok(Self {
            size,
            deflate_on_oom: kv.flag("deflate_on_oom")?.unwrap_or(false),
            free_page_reporting: kv.flag("free_page_reporting")?.unwrap_or(false),
            stats_interval_s,
            auto,
            auto_max,
        })
    }

    /// The most `auto=on` inflates to.
    pub fn auto_max_bytes(&self, memory: &MemoryConfig) -> u64 {
        self.auto_max.unwrap_or(memory.size / 2).max(self.size)
    }

    /// Checks the balloon against the guest's memory.
    pub fn validate(&self, memory: &MemoryConfig) -> Result<(), ConfigError> {
        if self.auto && memory.limit.is_none() {
            return Err(invalid(
                "balloon",
                "auto=on needs a pager (--memory ...,limit=SIZE,swap=PATH): it follows its pressure",
            ));
        }
        if self.auto_max.is_some_and(|m| m >= memory.size) {
            return Err(invalid(
                "balloon",
                "auto_max must be smaller than --memory size=",
            ));
        }
        if self.size >= memory.size {
            return Err(invalid(
                "balloon",
                format!(
                    "size={} MiB leaves the guest nothing of its {} MiB (--memory size=)",
                    self.size >> 20,
                    memory.size >> 20
                ),
            ));
        }
        Ok(())
    }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialConfig {
    /// stdout, with stdin as the guest's keyboard (raw mode on a terminal).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Off,
}

/// Which thread runs the USB controller's transfers (`--usb-io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UsbIo {
    /// On the vCPU thread whose doorbell write started them: the guest gets
    /// the completion interrupt as it resumes, before it can go idle.
    #[default]
    Vcpu,
    /// On the controller's own I/O thread (doorbells by ioeventfd, as
    /// virtio queue work): a slow image never holds a vCPU, at the cost of a
    /// thread switch and a guest idle cycle per transfer.
    Thread,
}

impl UsbIo {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match text {
            "vcpu" => Ok(Self::Vcpu),
            "thread" => Ok(Self::Thread),
            _ => Err(invalid(
                "usb-io",
                format!("'{text}' is neither vcpu nor thread"),
            )),
        }
    }
}

impl SerialConfig {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        match text {
            "stdout" | "tty" => Ok(Self::Stdout),
            "off" | "null" => Ok(Self::Off),
            _ => {
                let mut kv = KeyValues::parse("serial", &["file"], None, text)?;
                Ok(Self::File(PathBuf::from(kv.required("file")?)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usb_io_option() {
        assert_eq!(UsbIo::parse("vcpu").unwrap(), UsbIo::Vcpu);
        assert_eq!(UsbIo::parse("thread").unwrap(), UsbIo::Thread);
        assert_eq!(UsbIo::default(), UsbIo::Vcpu);
        let e = UsbIo::parse("worker").unwrap_err().to_string();
        assert!(e.contains("--usb-io") && e.contains("'worker'"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1K"), Some(1024));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1M"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn memory_option() {
        let m = MemoryConfig::parse("size=1G,limit=256M,swap=/tmp/s").unwrap();
        assert_eq!(m.size, 1 << 30);
        assert_eq!(m.limit, Some(256 << 20));
        assert_eq!(m.swap, Some(PathBuf::from("/tmp/s")));
        assert_eq!(MemoryConfig::parse("512M").unwrap().size, 512 << 20);
        assert!(matches!(
            MemoryConfig::parse("size=1G,colour=red"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            MemoryConfig::parse("size=1G,size=2G"),
            Err(ConfigError::DuplicateKey { .. })
        ));
        assert!(matches!(
            MemoryConfig::parse("size=lots"),
            Err(ConfigError::BadSize { .. })
        ));
        assert!(MemoryConfig::parse("size=1M").is_err(), "too small");
        assert!(
            MemoryConfig::parse("size=1G,limit=256M").is_err(),
            "limit without swap"
        );
        assert!(
            MemoryConfig::parse("size=1G,limit=2G,swap=/s").is_err(),
            "limit > size"
        );
        assert!(MemoryConfig::parse("limit=1G").is_err(), "size missing");
        let m = MemoryConfig::parse("size=1G,limit=256M,swap=/s,huge_pages=off").unwrap();
        assert_eq!(m.huge_pages, Some(false));
        assert!(
            MemoryConfig::parse("size=1G,huge_pages=off").is_err(),
            "huge_pages without a limit"
        );
        assert!(MemoryConfig::parse("size=1G,limit=256M,swap=/s,huge_pages=maybe").is_err());
    }

    #[test]
    fn disk_option() {
        let d = DiskConfig::parse("path=/img/a.raw,readonly=on,id=data,queues=2").unwrap();
        assert_eq!(d.path, PathBuf::from("/img/a.raw"));
        assert!(d.readonly);
        assert_eq!((d.id.as_str(), d.queues), ("data", Some(2)));
        let d = DiskConfig::parse("/img/a-very-long-file-name-indeed.raw").unwrap();
        assert_eq!(d.id, "a-very-long-file-nam");
        assert!(!d.readonly);
        assert!(DiskConfig::parse("readonly=on").is_err(), "path missing");
        assert!(DiskConfig::parse("path=/a,readonly=maybe").is_err());
        assert!(DiskConfig::parse("path=/a,queues=0").is_err());
        assert!(DiskConfig::parse("path=/a,id=123456789012345678901").is_err());
        let two = [
            DiskConfig::parse("/a,id=x").unwrap(),
            DiskConfig::parse("/b,id=x").unwrap(),
        ];
        assert!(check_disk_ids(&two).is_err());
    }

    #[test]
    fn usb_storage_option() {
        let u = UsbStorageConfig::parse("path=/img/u.raw,port=5,readonly=on,id=stick-1").unwrap();
        assert_eq!(
            u,
            UsbStorageConfig {
                path: "/img/u.raw".into(),
                port: Some(5),
                readonly: true,
                id: Some("stick-1".into()),
            }
        );
        let u = UsbStorageConfig::parse("/img/u.raw").unwrap();
        assert_eq!((u.port, u.readonly, u.id), (None, false, None));
        assert!(matches!(
            UsbStorageConfig::parse("path=/a,speed=high"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(matches!(
            UsbStorageConfig::parse("port=1"),
            Err(ConfigError::MissingKey { key: "path", .. })
        ));
        assert!(UsbStorageConfig::parse("path=/a,port=0").is_err());
        assert!(UsbStorageConfig::parse("path=/a,port=256").is_err());
        assert!(UsbStorageConfig::parse("path=/a,port=8").is_ok());
        let e = UsbStorageConfig::parse("path=/a,port=9")
            .unwrap_err()
            .to_string();
        assert!(e.contains("port=9 does not exist"), "{e}");
        assert!(UsbStorageConfig::parse("path=/a,port=x").is_err());
        assert!(UsbStorageConfig::parse("path=/a,readonly=perhaps").is_err());
        assert!(UsbStorageConfig::parse("path=/a,id=has space").is_err());
        assert!(UsbStorageConfig::parse("path=/a,id=").is_err());
        assert!(UsbStorageConfig::parse(&format!("path=/a,id={}", "x".repeat(33))).is_err());
        assert!(UsbStorageConfig::parse("path=/a,path=/b").is_err());
    }

    #[test]
    fn balloon_option() {
        let b = BalloonConfig::parse(
            "size=768M,deflate_on_oom=on,free_page_reporting=on,stats_interval=5",
        )
        .unwrap();
        assert_eq!(
            b,
            BalloonConfig {
                size: 768 << 20,
                deflate_on_oom: true,
                free_page_reporting: true,
                stats_interval_s: 5,
                auto: false,
                auto_max: None,
            }
        );
        let b = BalloonConfig::parse("0").unwrap();
        assert_eq!(
            (b.size, b.deflate_on_oom, b.stats_interval_s),
            (0, false, 0)
        );
        assert!(matches!(
            BalloonConfig::parse("size=1G,inflate=on"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert!(BalloonConfig::parse("size=1000").is_err(), "not page-sized");
        assert!(BalloonConfig::parse("size=1G,stats_interval=-1").is_err());
        assert!(BalloonConfig::parse("size=1G,stats_interval=100000").is_err());
        assert!(BalloonConfig::parse("size=1G,deflate_on_oom=sometimes").is_err());
        let mem = MemoryConfig::parse("size=1G").unwrap();
        assert!(BalloonConfig::parse("768M").unwrap().validate(&mem).is_ok());
        let e = BalloonConfig::parse("1G")
            .unwrap()
            .validate(&mem)
            .unwrap_err();
        assert!(e.to_string().contains("--balloon"), "{e}");
    }

    #[test]
    fn serial_option() {
        assert_eq!(SerialConfig::parse("stdout").unwrap(), SerialConfig::Stdout);
        assert_eq!(SerialConfig::parse("off").unwrap(), SerialConfig::Off);
        assert_eq!(
            SerialConfig::parse("file=/tmp/x").unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert!(SerialConfig::parse("pipe").is_err());
    }
}
