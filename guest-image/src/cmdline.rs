//! Guest kernel command lines: the fixed base plus `key=value` scenario
//! parameters (read in the guest by `param` in `guest/lib.sh`).

use thiserror::Error;

/// Base command line for an L2 guest booted by our VMM: serial console,
/// reboot through the keyboard controller (the VMM's stop path), reboot on
/// panic, and an i8042 probe that does not wait for a real controller.
pub const L2_BASE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet i8042.noaux i8042.nomux i8042.dumbkbd";

/// Base command line for the L1 (QEMU) kernel. `no_timer_check`: the
/// kernel's boot-time check that the PIT ticks through the IO-APIC counts
/// ticks over a busy-wait, which a TCG L1 on a loaded host can fail
/// ("IO-APIC + timer doesn't work!", a panic at boot; seen once with the
/// machine's two cores running three L1s and builds).
pub const L1_BASE: &str = "console=ttyS0 panic=-1 quiet no_timer_check";

/// Keeps L1's LAPIC timer in periodic mode (no dynamic ticks, no
/// high-resolution one-shot programming). Under QEMU's TCG an L1 timer
/// interrupt is sometimes left pending and untaken until some other
/// interrupt arrives (see HARNESS.md); a one-shot timer then never fires
/// again, a periodic one is that other interrupt, every tick.
pub const L1_PERIODIC_TICK: &str = "nohz=off highres=off";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("scenario parameter {0:?} must be key=value with no spaces or quotes")]
    BadParam(String),
}

/// One `key=value` scenario parameter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub key: String,
    pub value: String,
}

impl Param {
    pub fn new(key: impl Into<String>, value: impl ToString) -> Self {
        Self {
            key: key.into(),
            value: value.to_string(),
        }
    }
}

impl std::str::FromStr for Param {
    type Err = CmdlineError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| CmdlineError::BadParam(s.to_string()))?;
        let p = Param::new(k, v);
        p.validate()?;
        Ok(p)
    }
}

impl Param {
    fn validate(&self) -> Result<(), CmdlineError> {
        let bad = |t: &str| {
            t.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\'')
        };
        if self.key.is_empty() || bad(&self.key) || bad(&self.value) || self.key.contains('=') {
            return Err(CmdlineError::BadParam(format!(
                "{}={}",
                self.key, self.value
            )));
        }
        Ok(())
    }
}

/// `base` followed by the parameters.
pub fn with_params(base: &str, params: &[Param]) -> Result<String, CmdlineError> {
    let mut out = base.to_string();
    for p in params {
        p.validate()?;
        out.push(' ');
        out.push_str(&p.key);
        out.push('=');
        out.push_str(&p.value);
    }
    Ok(out)
}

/// The value of `key` in a command line (last occurrence wins, as in the
/// kernel's own parsing of most options).
pub fn lookup<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .rev()
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_and_looks_up() {
        let line = with_params(
            L2_BASE,
            &[
                Param::new("expect_cpus", 2),
                "expect_mem_mib=512".parse().unwrap(),
            ],
        )
        .unwrap();
        assert!(line.starts_with("console=ttyS0 reboot=k panic=-1"));
        assert!(line.ends_with(" expect_cpus=2 expect_mem_mib=512"));
        assert_eq!(lookup(&line, "expect_cpus"), Some("2"));
        assert_eq!(lookup(&line, "expect_mem_mib"), Some("512"));
        assert_eq!(lookup(&line, "reboot"), Some("k"));
        assert_eq!(lookup(&line, "expect"), None);
        assert_eq!(lookup("a=1 a=2", "a"), Some("2"));
    }

    #[test]
    fn rejects_params_that_would_split() {
        assert!("novalue".parse::<Param>().is_err());
        assert!("=1".parse::<Param>().is_err());
        assert!(with_params("x", &[Param::new("a", "b c")]).is_err());
        assert!(with_params("x", &[Param::new("a", "\"q\"")]).is_err());
    }
}
