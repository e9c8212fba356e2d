//! What the probe found, kept between runs: a file per host in the cache directory
//! (`$UNDERSTUDY_CACHE_DIR`, else `$XDG_CACHE_HOME/understudy`, else `~/.cache/understudy`),
//! named after a key that changes whenever the answer could: the host kernel's release and
//! build, every KVM module parameter, the CPU's vendor, signature, microcode and flags, and
//! this build of understudy with its list of probed instructions. A missing, unreadable or
//! stale file means a fresh probe, whose answer is then written (atomically: a rename). With
//! `UNDERSTUDY_CACHE_DIR` set to the empty string nothing is read or written.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::probe::CANDIDATES;
use super::{HostLimits, Refusal, SyscallPath, SystemCalls, Workaround};

/// Bumped when the meaning of a cached answer changes.
const FORMAT: u32 = 2;

#[derive(Serialize, Deserialize)]
struct Cached {
    format: u32,
    key: String,
    /// (instruction, workaround) in probe order.
    refused: Vec<(String, String)>,
    /// How `syscall` enters the kernel (`SyscallPath`'s name) and whether `int $0x80` does,
    /// once probed.
    system_calls: Option<(String, bool)>,
}

/// The cache file of this host, or `None` if there is no cache directory.
pub(super) fn path() -> Option<PathBuf> {
    let dir = match std::env::var_os("UNDERSTUDY_CACHE_DIR") {
        Some(dir) if dir.is_empty() => return None,
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("understudy"),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/understudy"),
        },
    };
    Some(dir.join(format!("host-limits-{:016x}.json", fnv1a(key().as_bytes()))))
}

/// Everything the probe's answer depends on, as text.
fn key() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let mut key = format!("understudy {} format {FORMAT}\n", env!("CARGO_PKG_VERSION"));
    for candidate in CANDIDATES {
        key.push_str(candidate.instruction);
        key.push('\n');
    }
    key.push_str(&read("/proc/sys/kernel/osrelease"));
    key.push_str(&read("/proc/sys/kernel/version"));
    let mut parameters: Vec<(String, String)> = std::fs::read_dir("/sys/module")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|module| module.file_name().to_string_lossy().starts_with("kvm"))
        .flat_map(|module| {
            std::fs::read_dir(module.path().join("parameters"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|p| {
            let value = std::fs::read_to_string(p.path()).unwrap_or_default();
            (p.path().display().to_string(), value)
        })
        .collect();
    parameters.sort();
    for (name, value) in parameters {
        key.push_str(&format!("{name}={value}"));
    }
    // The first CPU's identity; every CPU of a host is the same model.
    let cpuinfo = read("/proc/cpuinfo");
    for line in cpuinfo.lines().take_while(|l| !l.trim().is_empty()) {
        let field = line.split(':').next().unwrap_or_default().trim();
        if matches!(
            field,
            "vendor_id"
                | "cpu family"
                | "model"
                | "model name"
                | "stepping"
                | "microcode"
                | "flags"
        ) {
            key.push_str(line);
            key.push('\n');
        }
    }
    key
}

/// FNV-1a, 64 bits: stable across builds, unlike the standard library's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn workaround_name(workaround: Workaround) -> String {
    match workaround {
        Workaround::HideFeature(_) => "hide-feature".into(),
        Workaround::LinuxOption(_) => "linux-option".into(),
        Workaround::CompleteInt3 => "complete-int3".into(),
        Workaround::None => "none".into(),
    }
}

/// The answer cached for this host, if there is one and it still applies.
pub(super) fn load() -> Option<HostLimits> {
    load_from(&path()?)
}

fn load_from(path: &std::path::Path) -> Option<HostLimits> {
    let text = std::fs::read_to_string(path).ok()?;
    let cached: Cached = serde_json::from_str(&text).ok()?;
    if cached.format != FORMAT || cached.key != format!("{:016x}", fnv1a(key().as_bytes())) {
        return None;
    }
    let mut refused = Vec::with_capacity(cached.refused.len());
    for (instruction, workaround) in &cached.refused {
        let candidate = CANDIDATES.iter().find(|c| c.instruction == instruction)?;
        let workaround = match workaround.as_str() {
            "hide-feature" => Workaround::HideFeature(candidate.feature?),
            "linux-option" => Workaround::LinuxOption(candidate.linux_option?),
            "complete-int3" => Workaround::CompleteInt3,
            "none" => Workaround::None,
            _ => return None,
        };
        refused.push(Refusal {
            instruction: candidate.instruction,
            workaround,
        });
    }
    Some(HostLimits {
        refused,
        system_calls: match &cached.system_calls {
            Some((syscall, int80)) => Some(SystemCalls {
                syscall: SyscallPath::from_name(syscall)?,
                int80: *int80,
            }),
            None => None,
        },
    })
}

/// Keeps `limits` for the next run; a cache that cannot be written is only a slower start.
pub(super) fn store(limits: &HostLimits) {
    if let Some(path) = path() {
        store_at(&path, limits);
    }
}

fn store_at(path: &std::path::Path, limits: &HostLimits) {
    let cached = Cached {
        format: FORMAT,
        key: format!("{:016x}", fnv1a(key().as_bytes())),
        refused: limits
            .refused
            .iter()
            .map(|r| (r.instruction.to_owned(), workaround_name(r.workaround)))
            .collect(),
        system_calls: limits
            .system_calls
            .map(|c| (c.syscall.name().to_owned(), c.int80)),
    };
    let written = (|| -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir)?;
        let temporary = dir.join(format!(".host-limits-{}.tmp", std::process::id()));
        std::fs::write(&temporary, serde_json::to_vec_pretty(&cached)?)?;
        std::fs::rename(&temporary, path)
    })();
    match written {
        Ok(()) => tracing::debug!(cache = %path.display(), "host probe's answer cached"),
        Err(err) => {
            tracing::debug!(cache = %path.display(), %err, "host probe's answer not cached")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_answer_loads_back_as_it_was() {
        let dir = std::env::temp_dir().join(format!("understudy-cache-{}", std::process::id()));
        let path = dir.join("host-limits.json");
        let limits = HostLimits {
            refused: CANDIDATES
                .iter()
                .map(|c| Refusal {
                    instruction: c.instruction,
                    workaround: match (c.feature, c.linux_option) {
                        (Some(feature), _) => Workaround::HideFeature(feature),
                        (None, Some(option)) => Workaround::LinuxOption(option),
                        (None, None) => Workaround::CompleteInt3,
                    },
                })
                .collect(),
            system_calls: Some(SystemCalls {
                syscall: SyscallPath::HalfDone,
                int80: false,
            }),
        };
        store_at(&path, &limits);
        assert_eq!(load_from(&path), Some(limits));
        // A file for another host, or garbage, is not taken.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"key\": \"", "\"key\": \"0")).unwrap();
        assert_eq!(load_from(&path), None);
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(load_from(&path), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
