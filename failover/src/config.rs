//! The environment file: which guests to run and how, as the operator writes it, validated,
//! with defaults filled in and paths resolved (what `understudy check` prints).
//!
//! Parsing and validation only; nothing here starts a machine.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vmm_core::boot::probe_kernel;
use vmm_core::vm::MAX_MEMORY_MIB;
use vmm_core::CpuFeature;

pub mod fuzz;
mod standby;

pub use standby::{JournalConfig, PeerAddress, Placement, RemoteConfig, StandbyConfig};
#[cfg(test)]
use standby::{DEFAULT_CHECKPOINT_INTERVAL_MS, DEFAULT_HEARTBEAT_TIMEOUT_MS};
use standby::{DEFAULT_MAX_FAILOVERS, DEFAULT_WINDOW_S};

/// Largest vCPU count a guest may have.
pub const MAX_VCPUS: u8 = vmm_core::boot::mptable::MAX_VCPUS;
const DEFAULT_MEMORY_MIB: u64 = 128;
const DEFAULT_VCPUS: u8 = 1;

/// A malformed or inconsistent environment file. The message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read environment file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (syntax, unknown key, wrong type).
    #[error("{path}: {}", .source.to_string().trim_end())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What toml said, with line and column.
        source: toml::de::Error,
    },
    /// A guest's kernel file cannot be read or is no kernel.
    #[error("{path}: {key}: {source}")]
    Kernel {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `guest[0].kernel`.
        key: String,
        /// Why the kernel cannot be used.
        source: vmm_core::BootError,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `guest[0].memory_mib`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// `path` without `.`, `..` or symlinks when it exists, else as given.
fn canonical(path: PathBuf) -> PathBuf {
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// Where a guest's console output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialOutput {
    /// The process's standard output.
    Stdout,
    /// A file, created or truncated at start.
    File(PathBuf),
    /// Discarded.
    None,
}

impl SerialOutput {
    fn parse(text: &str, base: &Path) -> Option<Self> {
        match text {
            "stdout" => Some(SerialOutput::Stdout),
            "none" => Some(SerialOutput::None),
            _ => text
                .strip_prefix("file:")
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let path = base.join(p);
                    // The file need not exist yet; its folder usually does.
                    let resolved = match (path.parent(), path.file_name()) {
                        (Some(dir), Some(name)) => canonical(dir.to_owned()).join(name),
                        _ => path,
                    };
                    SerialOutput::File(resolved)
                }),
        }
    }
}

impl std::fmt::Display for SerialOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SerialOutput::Stdout => write!(f, "stdout"),
            SerialOutput::File(path) => write!(f, "file:{}", path.display()),
            SerialOutput::None => write!(f, "none"),
        }
    }
}

/// Where a guest's console input comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SerialInput {
    /// No input.
    #[default]
    None,
    /// The process's standard input (one guest at most).
    Stdin,
}

/// The `[guest.cpu]` table as written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFile {
    /// Features to hide from the guest's CPUID.
    #[serde(default)]
    pub hide: Vec<CpuFeature>,
}

/// One `[[guest]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct GuestFile {
    name: String,
    kernel: PathBuf,
    memory_mib: Option<u64>,
    vcpus: Option<u8>,
    cmdline: Option<String>,
    initrd: Option<PathBuf>,
    serial: Option<String>,
    serial_input: Option<SerialInput>,
    cpu: Option<CpuFile>,
    standby: Option<standby::StandbyFile>,
    on_failure: Option<OnFailure>,
    max_restarts: Option<u32>,
    restart_window_s: Option<u64>,
    crash_dump: Option<bool>,
    dump_dir: Option<PathBuf>,
    max_dumps: Option<u32>,
    disk: Option<Vec<DiskFile>>,
    net: Option<Vec<NetFile>>,
}

/// One `[[guest.net]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetFile {
    tap: String,
    mac: Option<String>,
}

/// A NIC of a guest, resolved: a TAP device and the MAC address the guest is given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetConfig {
    /// The TAP device's name.
    pub tap: String,
    /// The guest's MAC address.
    #[serde(serialize_with = "serialize_mac")]
    pub mac: [u8; 6],
}

fn serialize_mac<S: serde::Serializer>(mac: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&vmm_core::devices::net::format_mac(mac))
}

/// The MAC address a guest's NIC `index` gets when none is given: QEMU's `52:54:00` prefix
/// and three bytes of a hash of the guest's name and the index, the same on every run.
pub fn default_mac(guest: &str, index: usize) -> [u8; 6] {
    // FNV-1a: stable across builds and platforms, unlike the standard library's hasher.
    let mut hash: u32 = 0x811c_9dc5;
    for byte in guest
        .bytes()
        .chain(std::iter::once(0))
        .chain((index as u32).to_le_bytes())
    {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let [a, b, c, _] = hash.to_be_bytes();
    [0x52, 0x54, 0x00, a, b, c]
}

/// One `[[guest.disk]]` table as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    path: PathBuf,
    read_only: Option<bool>,
}

/// A disk of a guest, resolved: a raw image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskConfig {
    /// The image, absolute.
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// What state a standby resumes the guest from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResumeFrom {
    /// The failed active's registers and memory as they were at the failure.
    FailedState,
    /// The last committed checkpoint.
    Checkpoint,
}

/// What happens to a guest without a standby when it fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Tear the machine down and boot the guest again.
    Restart,
    /// Bring the guest down.
    #[default]
    Down,
}

const DEFAULT_MAX_DUMPS: u32 = 4;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvironmentFile {
    api_socket: Option<PathBuf>,
    #[serde(default)]
    guest: Vec<GuestFile>,
}

/// A guest, validated, with every default filled in and paths absolute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    /// Unique name.
    pub name: String,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Kernel command line.
    pub cmdline: String,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Console output.
    pub serial: SerialOutput,
    /// Console input.
    pub serial_input: SerialInput,
    /// CPU model adjustments.
    pub cpu: CpuConfig,
    /// Whether a failed machine's state is written as an ELF core file.
    pub crash_dump: bool,
    /// Where crash dumps go.
    pub dump_dir: PathBuf,
    /// How many of the guest's crash dumps are kept in `dump_dir`, the oldest removed first;
    /// 0 keeps every one.
    pub max_dumps: u32,
    /// What happens on failure when there is no standby.
    pub on_failure: OnFailure,
    /// With `on_failure = "restart"`: more restarts than this within `restart_window_s`
    /// bring the guest down.
    pub max_restarts: u32,
    /// The restart crash-loop window, in seconds.
    pub restart_window_s: u64,
    /// Present for a hot-standby guest.
    pub standby: Option<StandbyConfig>,
    /// Disks, each a virtio-blk device in this order.
    pub disks: Vec<DiskConfig>,
    /// NICs, each a virtio-net device in this order, after the disks.
    pub nets: Vec<NetConfig>,
}

/// As the environment file has it (what `to_toml` writes), less what does not apply: no
/// `initrd`, `standby`, `disk` or `net` key for none, and no `on_failure` beside a standby,
/// where the key is refused.
impl Serialize for GuestConfig {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        // Every field, so that a new one cannot be left out unnoticed.
        let GuestConfig {
            name,
            kernel,
            memory_mib,
            vcpus,
            cmdline,
            initrd,
            serial,
            serial_input,
            cpu,
            crash_dump,
            dump_dir,
            max_dumps,
            on_failure,
            max_restarts,
            restart_window_s,
            standby,
            disks,
            nets,
        } = self;
        let mut table = serializer.serialize_struct("GuestConfig", 18)?;
        table.serialize_field("name", name)?;
        table.serialize_field("kernel", kernel)?;
        table.serialize_field("memory_mib", memory_mib)?;
        table.serialize_field("vcpus", vcpus)?;
        table.serialize_field("cmdline", cmdline)?;
        match initrd {
            Some(initrd) => table.serialize_field("initrd", initrd)?,
            None => table.skip_field("initrd")?,
        }
        table.serialize_field("serial", &serial.to_string())?;
        table.serialize_field("serial_input", serial_input)?;
        table.serialize_field("cpu", cpu)?;
        table.serialize_field("crash_dump", crash_dump)?;
        table.serialize_field("dump_dir", dump_dir)?;
        table.serialize_field("max_dumps", max_dumps)?;
        match standby {
            None => table.serialize_field("on_failure", on_failure)?,
            Some(_) => table.skip_field("on_failure")?,
        }
        table.serialize_field("max_restarts", max_restarts)?;
        table.serialize_field("restart_window_s", restart_window_s)?;
        match standby {
            Some(standby) => table.serialize_field("standby", standby)?,
            None => table.skip_field("standby")?,
        }
        if disks.is_empty() {
            table.skip_field("disk")?;
        } else {
            table.serialize_field("disk", disks)?;
        }
        if nets.is_empty() {
            table.skip_field("net")?;
        } else {
            table.serialize_field("net", nets)?;
        }
        table.end()
    }
}

/// The resolved `[guest.cpu]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CpuConfig {
    /// Features hidden from CPUID.
    pub hide: Vec<CpuFeature>,
}

impl GuestConfig {
    /// The machine shape this guest needs.
    pub fn machine_spec(&self) -> vmm_core::MachineSpec {
        vmm_core::MachineSpec {
            name: self.name.clone(),
            memory_mib: self.memory_mib,
            vcpus: self.vcpus,
            hidden_cpu_features: self.cpu.hide.clone(),
            dirty_tracking: self
                .standby
                .as_ref()
                .is_some_and(|s| s.resume == ResumeFrom::Checkpoint),
            // The bitmap measured as fast or faster than the ring here (docs/performance.md).
            dirty_ring: false,
        }
    }

    /// What to boot.
    pub fn boot_source(&self) -> vmm_core::BootSource {
        vmm_core::BootSource {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
        }
    }
}

/// A whole environment, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Environment {
    /// The control socket's path, if the file names one (`--api-socket` overrides it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_socket: Option<PathBuf>,
    /// Every guest, in file order.
    pub guest: Vec<GuestConfig>,
}

impl Environment {
    /// Reads, parses and validates the environment file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::path::absolute(&base).unwrap_or(base);
        Self::parse(&text, path, &base)
    }

    /// Parses and validates `text`; `path` is named in errors, `base` resolves relative paths.
    pub fn parse(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let file: EnvironmentFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        if file.guest.is_empty() {
            return Err(invalid(
                "guest".into(),
                "no [[guest]] is declared; there is nothing to run".into(),
            ));
        }
        let mut names = HashSet::new();
        // Every image named so far: its key, and whether that guest writes it.
        let mut taps: std::collections::HashMap<String, String> = Default::default();
        let mut macs: std::collections::HashMap<[u8; 6], String> = Default::default();
        let mut images: std::collections::HashMap<PathBuf, (String, bool)> =
            std::collections::HashMap::new();
        let mut stdin_taken = false;
        let mut guests = Vec::with_capacity(file.guest.len());
        for (i, g) in file.guest.into_iter().enumerate() {
            let key = |field: &str| format!("guest[{i}].{field}");
            if g.name.is_empty()
                || !g
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    key("name"),
                    format!(
                        "{:?} is not a valid name: use letters, digits, '-' and '_'",
                        g.name
                    ),
                ));
            }
            if !names.insert(g.name.clone()) {
                return Err(invalid(
                    key("name"),
                    format!("guest name {:?} is used more than once", g.name),
                ));
            }
            let memory_mib = g.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
            if !(2..=MAX_MEMORY_MIB).contains(&memory_mib) {
                return Err(invalid(
                    key("memory_mib"),
                    format!("must be between 2 and {MAX_MEMORY_MIB}, got {memory_mib}"),
                ));
            }
            let vcpus = g.vcpus.unwrap_or(DEFAULT_VCPUS);
            if !(1..=MAX_VCPUS).contains(&vcpus) {
                return Err(invalid(
                    key("vcpus"),
                    format!("must be between 1 and {MAX_VCPUS}, got {vcpus}"),
                ));
            }
            let kernel = base.join(&g.kernel);
            probe_kernel(&kernel).map_err(|source| ConfigError::Kernel {
                path: path.to_owned(),
                key: key("kernel"),
                source,
            })?;
            let kernel = canonical(kernel);
            let initrd = match g.initrd {
                Some(p) => {
                    let initrd = base.join(p);
                    std::fs::metadata(&initrd).map_err(|e| {
                        invalid(key("initrd"), format!("{}: {e}", initrd.display()))
                    })?;
                    Some(canonical(initrd))
                }
                None => None,
            };
            let serial_text = g.serial.unwrap_or_else(|| "stdout".into());
            let serial = SerialOutput::parse(&serial_text, base).ok_or_else(|| {
                invalid(
                    key("serial"),
                    format!("{serial_text:?} is not one of \"stdout\", \"none\", \"file:PATH\""),
                )
            })?;
            let serial_input = g.serial_input.unwrap_or_default();
            if serial_input == SerialInput::Stdin {
                if stdin_taken {
                    return Err(invalid(
                        key("serial_input"),
                        "only one guest can read standard input".into(),
                    ));
                }
                stdin_taken = true;
            }
            let cmdline = g.cmdline.unwrap_or_default();
            if cmdline.len() >= vmm_core::layout::CMDLINE_MAX_SIZE {
                return Err(invalid(
                    key("cmdline"),
                    format!(
                        "{} bytes long; at most {} are allowed",
                        cmdline.len(),
                        vmm_core::layout::CMDLINE_MAX_SIZE - 1
                    ),
                ));
            }
            let mut hide = g.cpu.map(|c| c.hide).unwrap_or_default();
            hide.dedup();
            let devices = standby::Devices {
                disks: g.disk.as_ref().is_some_and(|d| !d.is_empty()),
                nics: g.net.as_ref().is_some_and(|n| !n.is_empty()),
            };
            let standby = match g.standby {
                Some(table) => Some(
                    standby::resolve(table, &g.name, memory_mib, devices, base)
                        .map_err(|(field, why)| invalid(key(field), why))?,
                ),
                None => None,
            };
            if standby.is_some() && g.on_failure.is_some() {
                return Err(invalid(
                    key("on_failure"),
                    "applies to guests without a standby; a hot-standby guest fails over".into(),
                ));
            }
            let restart_window_s = g.restart_window_s.unwrap_or(DEFAULT_WINDOW_S);
            if restart_window_s == 0 {
                return Err(invalid(
                    key("restart_window_s"),
                    "must be at least 1".into(),
                ));
            }
            let dump_dir = canonical(base.join(g.dump_dir.unwrap_or_else(|| PathBuf::from("."))));
            let disk_files = g.disk.unwrap_or_default();
            let net_files = g.net.unwrap_or_default();
            if disk_files.len() + net_files.len() > vmm_core::devices::virtio::MAX_DEVICES {
                return Err(invalid(
                    key(if net_files.is_empty() { "disk" } else { "net" }),
                    format!(
                        "{} disks and {} NICs; at most {} devices are supported",
                        disk_files.len(),
                        net_files.len(),
                        vmm_core::devices::virtio::MAX_DEVICES
                    ),
                ));
            }
            let mut disks = Vec::with_capacity(disk_files.len());
            for (d, disk) in disk_files.into_iter().enumerate() {
                let disk_key = key(&format!("disk[{d}].path"));
                let path = base.join(&disk.path);
                let meta = std::fs::metadata(&path)
                    .map_err(|e| invalid(disk_key.clone(), format!("{}: {e}", path.display())))?;
                if !meta.is_file() {
                    return Err(invalid(
                        disk_key,
                        format!(
                            "{} is not a regular file (a raw disk image)",
                            path.display()
                        ),
                    ));
                }
                if meta.len() < vmm_core::devices::disk::SECTOR_SIZE {
                    return Err(invalid(
                        disk_key,
                        format!(
                            "{} is {} bytes long; a disk needs at least one 512-byte sector",
                            path.display(),
                            meta.len()
                        ),
                    ));
                }
                let path = canonical(path);
                let read_only = disk.read_only.unwrap_or(false);
                if let Some((other, other_writes)) = images.get(&path) {
                    if !read_only || *other_writes {
                        return Err(invalid(
                            disk_key,
                            format!(
                                "{} is also {other}; an image written by one guest cannot be given to another",
                                path.display()
                            ),
                        ));
                    }
                }
                images.insert(path.clone(), (disk_key, !read_only));
                disks.push(DiskConfig { path, read_only });
            }
            let mut nets = Vec::with_capacity(net_files.len());
            for (n, net) in net_files.into_iter().enumerate() {
                let tap_key = key(&format!("net[{n}].tap"));
                if let Err(why) = check_tap_name(&net.tap) {
                    return Err(invalid(tap_key, why.to_string()));
                }
                if let Some(other) = taps.get(&net.tap) {
                    return Err(invalid(
                        tap_key,
                        format!("TAP {} is also {other}; a TAP has one guest", net.tap),
                    ));
                }
                let mac = match &net.mac {
                    None => default_mac(&g.name, n),
                    Some(text) => vmm_core::devices::net::parse_mac(text).ok_or_else(|| {
                        invalid(
                            key(&format!("net[{n}].mac")),
                            format!("{text:?} is not a MAC address like \"52:54:00:12:34:56\""),
                        )
                    })?,
                };
                let mac_key = key(&format!("net[{n}].mac"));
                if mac[0] & 1 != 0 {
                    return Err(invalid(
                        mac_key,
                        "is a multicast address; a NIC needs a unicast one".into(),
                    ));
                }
                if let Some(other) = macs.get(&mac) {
                    return Err(invalid(
                        mac_key,
                        format!(
                            "{} is also {other}; two NICs cannot share an address",
                            vmm_core::devices::net::format_mac(&mac)
                        ),
                    ));
                }
                taps.insert(net.tap.clone(), tap_key);
                macs.insert(mac, mac_key);
                nets.push(NetConfig { tap: net.tap, mac });
            }
            guests.push(GuestConfig {
                name: g.name,
                kernel,
                memory_mib,
                vcpus,
                cmdline,
                initrd,
                serial,
                serial_input,
                cpu: CpuConfig { hide },
                crash_dump: g.crash_dump.unwrap_or(true),
                dump_dir,
                max_dumps: g.max_dumps.unwrap_or(DEFAULT_MAX_DUMPS),
                on_failure: g.on_failure.unwrap_or_default(),
                max_restarts: g.max_restarts.unwrap_or(DEFAULT_MAX_FAILOVERS),
                restart_window_s,
                standby,
                disks,
                nets,
            });
        }
        let api_socket = match file.api_socket {
            Some(path) if path.as_os_str().is_empty() => {
                return Err(invalid(
                    "api_socket".into(),
                    "must be a path; leave the key out for no control socket".into(),
                ))
            }
            Some(path) => Some(base.join(path)),
            None => None,
        };
        Ok(Environment {
            api_socket,
            guest: guests,
        })
    }

    /// The resolved environment as TOML, every default written out.
    pub fn to_toml(&self) -> String {
        // Every field is a string, number, bool, path or list of those: serialization to
        // TOML cannot fail for this type.
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// Why a `net[].tap` value cannot name a TAP device.
#[derive(Debug, thiserror::Error)]
enum TapNameError {
    #[error("is empty; name a TAP device, like \"us-tap0\"")]
    Empty,
    #[error("{0:?} is longer than 15 bytes, the most an interface name has")]
    TooLong(String),
    #[error("{0:?} cannot be an interface name ('/', ':' and white space are not allowed)")]
    NotAnInterfaceName(String),
}

/// Whether `name` can be a Linux interface name.
fn check_tap_name(name: &str) -> Result<(), TapNameError> {
    if name.is_empty() {
        return Err(TapNameError::Empty);
    }
    if name.len() >= 16 {
        return Err(TapNameError::TooLong(name.to_owned()));
    }
    if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
    {
        return Err(TapNameError::NotAnInterfaceName(name.to_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel_dir() -> PathBuf {
        // Any ELF64 file passes the kernel probe; the test binary itself is one.
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_owned()
    }

    fn parse(text: &str) -> Result<Environment, ConfigError> {
        let exe = std::env::current_exe().unwrap();
        let text = text.replace("KERNEL", &exe.file_name().unwrap().to_string_lossy());
        Environment::parse(&text, Path::new("env.toml"), &kernel_dir())
    }

    #[test]
    fn defaults_are_filled_in() {
        let env = parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n").unwrap();
        let g = &env.guest[0];
        assert_eq!((g.memory_mib, g.vcpus), (DEFAULT_MEMORY_MIB, DEFAULT_VCPUS));
        assert_eq!(g.serial, SerialOutput::Stdout);
        assert!(g.kernel.is_absolute());
        assert!(env.to_toml().contains("memory_mib = 128"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\nmemroy_mib = 3\n").unwrap_err();
        assert!(err.to_string().contains("memroy_mib"), "{err}");
    }

    #[test]
    fn a_remote_standby_needs_both_addresses_and_writes_them_back() {
        let remote = |standby: &str| {
            parse(&format!(
                "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\nmemory_mib = 64\n\
                 [guest.standby]\nresume = \"checkpoint\"\nprocess = \"remote\"\n{standby}"
            ))
        };
        let err = remote("listen = \"10.0.0.1:7770\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guest[0].standby.peer") && err.contains("is required"),
            "{err}"
        );
        let err = remote("listen = \"host-a:7770\"\npeer = \"10.0.0.2:7770\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guest[0].standby.listen") && err.contains("not an IP address and port"),
            "{err}"
        );
        let err = remote("listen = \"10.0.0.1:7770\"\npeer = \"host b\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guest[0].standby.peer") && err.contains("not a host and port"),
            "{err}"
        );
        let err = remote("listen = \"10.0.0.1:7770\"\npeer = \"10.0.0.1:7770\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("same address as listen"), "{err}");
        let err =
            remote("listen = \"10.0.0.1:7770\"\npeer = \"10.0.0.2:7770\"\nack_timeout_ms = 0\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("guest[0].standby.ack_timeout_ms"), "{err}");
        for peer in ["10.0.0.2:7770", "host-b:7770"] {
            let env = remote(&format!(
                "listen = \"10.0.0.1:7770\"\npeer = \"{peer}\"\ninsecure = true\n"
            ))
            .unwrap();
            let standby = env.guest[0].standby.as_ref().unwrap();
            let Placement::Remote { journal, link } = &standby.placement else {
                panic!("not a remote placement: {standby:?}");
            };
            assert_eq!(journal.path, PathBuf::from("/dev/shm/understudy-a.journal"));
            assert_eq!(link.listen, "10.0.0.1:7770".parse().unwrap());
            assert_eq!(link.peer.to_string(), peer);
            assert_eq!(link.ack_timeout_ms, 1000);
            // `understudy check` writes it back as a file that parses to the same.
            let written = toml::to_string(&env).unwrap();
            assert!(written.contains("process = \"remote\""), "{written}");
            assert!(written.contains(&format!("peer = \"{peer}\"")), "{written}");
            let again = Environment::parse(&written, Path::new("x.toml"), Path::new("/")).unwrap();
            assert_eq!(again.guest[0].standby, env.guest[0].standby);
        }
        let err = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.standby]\nresume = \"checkpoint\"\n\
             process = \"separate\"\npeer = \"10.0.0.2:7770\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("guest[0].standby.peer") && err.contains("only with process = \"remote\""),
            "{err}"
        );
    }

    #[test]
    fn a_separate_standby_process_needs_checkpoints_and_a_large_enough_journal() {
        let separate = |extra: &str, standby: &str| {
            parse(&format!(
                "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\nmemory_mib = 64\n{extra}\
                 [guest.standby]\nprocess = \"separate\"\n{standby}"
            ))
        };
        let err = separate("", "").unwrap_err().to_string();
        assert!(
            err.contains("guest[0].standby.process") && err.contains("resume = \"checkpoint\""),
            "{err}"
        );
        let err = separate("", "resume = \"checkpoint\"\njournal_size_mib = 100\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("guest[0].standby.journal_size_mib"), "{err}");
        assert!(err.contains("3 x batch + 1 page = 199 MiB"), "{err}");
        let disk = "[[guest.disk]]\npath = \"KERNEL\"\n";
        let with = |process: &str, device: &str| {
            parse(&format!(
                "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n\
                 [guest.standby]\nresume = \"checkpoint\"\nprocess = \"{process}\"\n\
                 listen = \"10.0.0.1:7770\"\npeer = \"10.0.0.2:7770\"\n{device}"
            ))
        };
        // A disk goes with a standby process on the same host, not yet to another host.
        let separate_disk = separate(disk, "resume = \"checkpoint\"\n").unwrap();
        assert_eq!(separate_disk.guest[0].disks.len(), 1);
        let err = with("remote", disk).unwrap_err().to_string();
        assert!(
            err.contains("guest[0].standby.process")
                && err.contains("on another host does not take over disks yet"),
            "{err}"
        );
        // A NIC too, not yet to another host.
        let nic = "[[guest.net]]\ntap = \"tap0\"\n";
        let separate_nic = separate(nic, "resume = \"checkpoint\"\n").unwrap();
        assert_eq!(separate_nic.guest[0].nets.len(), 1);
        let err = with("remote", nic).unwrap_err().to_string();
        assert!(
            err.contains("guest[0].standby.process")
                && err.contains("on another host does not take over NICs yet"),
            "{err}"
        );
        let env = separate("", "resume = \"checkpoint\"\n").unwrap();
        let standby = env.guest[0].standby.as_ref().unwrap();
        let Placement::Separate(journal) = &standby.placement else {
            panic!("not a separate placement: {standby:?}");
        };
        assert_eq!(journal.path, PathBuf::from("/dev/shm/understudy-a.journal"));
        assert_eq!(
            journal.socket,
            PathBuf::from("/dev/shm/understudy-a.journal.sock")
        );
        assert_eq!(journal.size, 199 << 20);
        assert!(standby.placement.remote().is_none());
        let err = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.standby]\njournal = \"j\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("guest[0].standby.journal")
                && err.contains("only with process = \"separate\""),
            "{err}"
        );
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let err = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("guest[1].name"), "{err}");
    }

    #[test]
    fn zero_memory_and_absurd_vcpus_are_rejected() {
        let err =
            parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\nmemory_mib = 0\n").unwrap_err();
        assert!(err.to_string().contains("guest[0].memory_mib"), "{err}");
        let err = parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\nvcpus = 200\n").unwrap_err();
        assert!(err.to_string().contains("guest[0].vcpus"), "{err}");
    }

    #[test]
    fn tap_names_no_interface_can_have_are_refused_with_the_reason() {
        let net = |tap: &str| {
            let text = format!(
                "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[[guest.net]]\ntap = {tap:?}\n"
            );
            parse(&text).unwrap_err().to_string()
        };
        assert_eq!(
            net(""),
            "env.toml: guest[0].net[0].tap: is empty; name a TAP device, like \"us-tap0\""
        );
        assert_eq!(
            net("a-very-long-tap-name"),
            "env.toml: guest[0].net[0].tap: \"a-very-long-tap-name\" is longer than 15 bytes, \
             the most an interface name has"
        );
        assert_eq!(
            net("tap/0"),
            "env.toml: guest[0].net[0].tap: \"tap/0\" cannot be an interface name \
             ('/', ':' and white space are not allowed)"
        );
    }

    #[test]
    fn missing_kernel_is_named() {
        let err = parse("[[guest]]\nname = \"a\"\nkernel = \"nope/vmlinux\"\n").unwrap_err();
        assert!(err.to_string().contains("guest[0].kernel"), "{err}");
        assert!(err.to_string().contains("nope/vmlinux"), "{err}");
    }

    #[test]
    fn bad_serial_and_second_stdin_reader_are_rejected() {
        let err =
            parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\nserial = \"tty\"\n").unwrap_err();
        assert!(err.to_string().contains("guest[0].serial"), "{err}");
        let err = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\nserial_input = \"stdin\"\n[[guest]]\nname = \"b\"\nkernel = \"KERNEL\"\nserial_input = \"stdin\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("guest[1].serial_input"), "{err}");
    }

    #[test]
    fn unknown_cpu_feature_is_an_error() {
        let err =
            parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.cpu]\nhide = [\"warp\"]\n")
                .unwrap_err();
        assert!(err.to_string().contains("warp"), "{err}");
    }

    #[test]
    fn standby_table_gets_defaults() {
        let env = parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.standby]\n").unwrap();
        let standby = env.guest[0].standby.clone().unwrap();
        assert_eq!(standby.resume, ResumeFrom::FailedState);
        assert!(standby.rearm);
        assert_eq!(standby.heartbeat_timeout_ms, DEFAULT_HEARTBEAT_TIMEOUT_MS);
        assert!(env.to_toml().contains("[guest.standby]"));
    }

    #[test]
    fn checkpoint_resume_gets_a_default_interval_and_checks_its_range() {
        let env = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.standby]\nresume = \"checkpoint\"\n",
        )
        .unwrap();
        let standby = env.guest[0].standby.clone().unwrap();
        assert_eq!(
            standby.checkpoint_interval_ms,
            Some(DEFAULT_CHECKPOINT_INTERVAL_MS)
        );
        assert!(env.guest[0].machine_spec().dirty_tracking);
        let err = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.standby]\nresume = \"checkpoint\"\ncheckpoint_interval_ms = 0\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("guest[0].standby.checkpoint_interval_ms"),
            "{err}"
        );
        let err = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.standby]\ncheckpoint_interval_ms = 5\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("only with resume"), "{err}");
    }

    #[test]
    fn on_failure_is_for_unprotected_guests() {
        let err = parse(
            "[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\non_failure = \"restart\"\n[guest.standby]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("guest[0].on_failure"), "{err}");
    }

    /// Found by the environment-file fuzz target (its seeded run): `check` printed
    /// `on_failure = "down"` for a hot-standby guest, a key refused there, so its output was
    /// not a valid environment file.
    #[test]
    fn what_check_prints_for_a_standby_guest_reads_back_as_itself() {
        let env = parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n[guest.standby]\n").unwrap();
        let written = env.to_toml();
        assert!(!written.contains("on_failure"), "{written}");
        assert_eq!(parse(&written).unwrap(), env, "{written}");
        let unprotected = parse("[[guest]]\nname = \"a\"\nkernel = \"KERNEL\"\n").unwrap();
        assert!(unprotected.to_toml().contains("on_failure = \"down\""));
    }

    #[test]
    fn empty_file_has_nothing_to_run() {
        assert!(parse("")
            .unwrap_err()
            .to_string()
            .contains("nothing to run"));
    }
}
