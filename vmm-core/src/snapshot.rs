//! A machine's snapshot on disk, and loading it back: a directory holding the state file
//! [`STATE_FILE`] and guest RAM, [`MEMORY_FILE`].
//!
//! The state file is a small header, the state as JSON, and a checksum:
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic, [`MAGIC`] (`UNDSTUDY`) |
//! | 8 | 4 | format version, little-endian u32 ([`VERSION`]) |
//! | 12 | 8 | length N of the state, little-endian u64 |
//! | 20 | N | the state: a [`SnapshotState`] as JSON |
//! | 20 + N | 8 | CRC-64/XZ of bytes 0 to 20 + N, little-endian u64 |
//!
//! The state records, beside every vCPU's, the VM's and the devices' state, what a machine
//! must match to load it (its [`MachineSpec`], how many disks and NICs it has) and the size
//! of the memory file. The memory file is guest RAM as the memfd lays it out (see
//! `GuestRam::write_to`), sparse: pages never written, or holding only zeros, are holes,
//! and stay holes when it is loaded. It has no checksum of its own: reading it all to check
//! one would cost what loading a snapshot should not.
//!
//! [`parse_state`] reads a state file's bytes and refuses anything else with a
//! [`FormatError`]; it never panics, whatever the bytes. Nothing here knows of guests or
//! pairs: the owner of a [`Vm`] pauses it before [`Snapshot::write`] and builds the machine
//! that [`Snapshot::restore_into`] loads. Runs on the thread that owns the machine.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cpuid::CpuFeature;
use crate::memory::MemoryError;
use crate::state::VmSnapshot;
use crate::vm::{MachineSpec, Vm, VmError};

/// The name of the state file in a snapshot's directory.
pub const STATE_FILE: &str = "state.snap";
/// The name of the memory file in a snapshot's directory.
pub const MEMORY_FILE: &str = "memory.raw";
/// The first eight bytes of every state file.
pub const MAGIC: [u8; 8] = *b"UNDSTUDY";
/// The format version written, and the only one read.
pub const VERSION: u32 = 1;
/// Bytes before the state: magic, version, the state's length.
pub const HEADER_LEN: usize = 20;
/// Bytes of the checksum after the state.
pub const CHECKSUM_LEN: usize = 8;

/// CRC-64/XZ (the ECMA-182 polynomial, reflected; as `xz` uses it).
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// What a snapshot was taken of: what a machine must have to load it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMachine {
    /// The shape of the machine saved. Its name and dirty-tracking settings are the host's
    /// business and need not match; its memory, vCPUs and CPU model must.
    pub spec: MachineSpec,
    /// Its disks (virtio-blk devices).
    pub disks: usize,
    /// Its NICs (virtio-net devices, after the disks).
    pub nics: usize,
    /// The size of the memory file, in bytes.
    pub memory_file_bytes: u64,
}

/// Everything in a state file between its header and its checksum.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// What the snapshot was taken of.
    pub machine: SavedMachine,
    /// The machine's state, less guest RAM.
    pub state: VmSnapshot,
}

/// Why the bytes of a state file are not a snapshot this build can load.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file does not begin with [`MAGIC`].
    #[error("not an understudy snapshot (it does not begin with the snapshot magic)")]
    NotASnapshot,
    /// The file is of a format version this build does not read.
    #[error(
        "unsupported snapshot format version {found} (this understudy reads version {VERSION})"
    )]
    UnsupportedVersion {
        /// The version in the file.
        found: u32,
    },
    /// The file ends before the header, the state or the checksum does.
    #[error("truncated: {found} bytes where {expected} are expected")]
    Truncated {
        /// Bytes the file needs: the header alone until it is complete, then as it says.
        expected: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// The file goes on after the checksum.
    #[error("corrupt: {extra} bytes after the end of the state")]
    TrailingBytes {
        /// Bytes past the checksum.
        extra: u64,
    },
    /// The checksum does not match the bytes.
    #[error("corrupt: checksum mismatch (the file says {stored:#018x}, its bytes give {computed:#018x})")]
    ChecksumMismatch {
        /// The checksum in the file.
        stored: u64,
        /// The checksum of the file's bytes.
        computed: u64,
    },
    /// The checksum holds but the state is not one this build can read.
    #[error("the state cannot be parsed: {0}")]
    Unparseable(serde_json::Error),
    /// The state contradicts itself.
    #[error("inconsistent: the machine has {recorded} {what}, the state {found}")]
    Inconsistent {
        /// What differs ("vCPUs", "bytes of memory").
        what: &'static str,
        /// As the machine record says.
        recorded: u64,
        /// As the state has it.
        found: u64,
    },
}

/// A machine does not match the snapshot it is to load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// Guest RAM of another size.
    #[error("the snapshot's machine has {snapshot} MiB of memory, this one {machine} MiB")]
    Memory {
        /// The snapshot's, in MiB.
        snapshot: u64,
        /// This machine's, in MiB.
        machine: u64,
    },
    /// Another number of vCPUs.
    #[error("the snapshot's machine has {snapshot} vCPUs, this one {machine}")]
    Vcpus {
        /// The snapshot's.
        snapshot: u8,
        /// This machine's.
        machine: u8,
    },
    /// Another CPU model.
    #[error("the snapshot's machine hides the CPU features [{snapshot}], this one [{machine}]")]
    HiddenCpuFeatures {
        /// The snapshot's, by name.
        snapshot: String,
        /// This machine's, by name.
        machine: String,
    },
    /// Another number of disks.
    #[error("the snapshot's machine has {snapshot} disks, this one {machine}")]
    Disks {
        /// The snapshot's.
        snapshot: usize,
        /// This machine's.
        machine: usize,
    },
    /// Another number of NICs.
    #[error("the snapshot's machine has {snapshot} NICs, this one {machine}")]
    Nics {
        /// The snapshot's.
        snapshot: usize,
        /// This machine's.
        machine: usize,
    },
}

/// Writing, loading or restoring a snapshot failed. Each names the file or directory.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot (or its directory) does not exist.
    #[error("{}: missing", path.display())]
    Missing {
        /// The file or directory.
        path: PathBuf,
    },
    /// A file could not be read, created or written.
    #[error("{}: cannot {action}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// "read", "create", "write".
        action: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The state file is not a snapshot this build loads.
    #[error("{}: {source}", path.display())]
    Format {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        source: FormatError,
    },
    /// The memory file is shorter than the state says.
    #[error("{}: truncated: {found} bytes, the state says {expected}", path.display())]
    MemoryTruncated {
        /// The memory file.
        path: PathBuf,
        /// Its size as the state records it.
        expected: u64,
        /// Its size.
        found: u64,
    },
    /// The memory file is longer than the state says.
    #[error("{}: {found} bytes, the state says {expected}", path.display())]
    MemoryTooLong {
        /// The memory file.
        path: PathBuf,
        /// Its size as the state records it.
        expected: u64,
        /// Its size.
        found: u64,
    },
    /// Guest RAM could not be written to or loaded from the memory file.
    #[error("{}: {source}", path.display())]
    Memory {
        /// The memory file.
        path: PathBuf,
        /// What failed.
        source: MemoryError,
    },
    /// The machine is not of the snapshot's shape.
    #[error("{}: does not fit: {mismatch}", dir.display())]
    Mismatch {
        /// The snapshot's directory.
        dir: PathBuf,
        /// What differs.
        mismatch: Mismatch,
    },
    /// The machine's state could not be saved.
    #[error("{}: cannot save the machine: {source}", dir.display())]
    Save {
        /// The snapshot's directory.
        dir: PathBuf,
        /// What failed.
        source: VmError,
    },
    /// The state could not be encoded.
    #[error("{}: cannot encode the state: {source}", path.display())]
    Encode {
        /// The state file.
        path: PathBuf,
        /// What failed.
        source: serde_json::Error,
    },
    /// The machine refused the state (KVM or a device did).
    #[error("{}: the machine cannot load the state: {source}", dir.display())]
    Restore {
        /// The snapshot's directory.
        dir: PathBuf,
        /// What failed.
        source: VmError,
    },
}

/// What [`Snapshot::write`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Bytes of guest RAM holding data (the memory file is sparse elsewhere).
    pub memory_bytes: u64,
    /// Bytes of the state file.
    pub state_bytes: u64,
}

/// A snapshot read from disk and checked: its state file parsed, its memory file of the
/// size the state says. Guest RAM stays in the file until [`Snapshot::restore_into`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    dir: PathBuf,
    state: SnapshotState,
}

/// The state file's bytes for `state`.
pub fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, serde_json::Error> {
    let body = serde_json::to_vec(state)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + body.len() + CHECKSUM_LEN);
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&body);
    let checksum = CRC64.checksum(&bytes);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    Ok(bytes)
}

/// Little-endian integer at `at` in `bytes`, which the caller has checked is long enough.
fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Checks the magic and the version at the start of `bytes` (at least as much as is there).
fn check_header_start(bytes: &[u8]) -> Result<(), FormatError> {
    let magic = &bytes[..bytes.len().min(MAGIC.len())];
    if magic != &MAGIC[..magic.len()] {
        return Err(FormatError::NotASnapshot);
    }
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            expected: HEADER_LEN as u64,
            found: bytes.len() as u64,
        });
    }
    match le_u32(bytes, 8) {
        VERSION => Ok(()),
        found => Err(FormatError::UnsupportedVersion { found }),
    }
}

/// Parses a state file's bytes: magic, version, lengths, checksum, then the state, and
/// checks that the state agrees with its machine record. Never panics, whatever `bytes`.
pub fn parse_state(bytes: &[u8]) -> Result<SnapshotState, FormatError> {
    check_header_start(bytes)?;
    let body_len = le_u64(bytes, 12);
    let expected = body_len
        .checked_add((HEADER_LEN + CHECKSUM_LEN) as u64)
        .ok_or(FormatError::Truncated {
            expected: u64::MAX,
            found: bytes.len() as u64,
        })?;
    let found = bytes.len() as u64;
    if found < expected {
        return Err(FormatError::Truncated { expected, found });
    }
    if found > expected {
        return Err(FormatError::TrailingBytes {
            extra: found - expected,
        });
    }
    // found == expected, so body_len fits in usize.
    let end = HEADER_LEN + body_len as usize;
    let stored = le_u64(bytes, end);
    let computed = CRC64.checksum(&bytes[..end]);
    if stored != computed {
        return Err(FormatError::ChecksumMismatch { stored, computed });
    }
    let state: SnapshotState =
        serde_json::from_slice(&bytes[HEADER_LEN..end]).map_err(FormatError::Unparseable)?;
    check_consistent(&state)?;
    Ok(state)
}

/// The state's own parts agree with its machine record.
fn check_consistent(state: &SnapshotState) -> Result<(), FormatError> {
    let machine = &state.machine;
    let inconsistent = |what, recorded, found| {
        if recorded == found {
            Ok(())
        } else {
            Err(FormatError::Inconsistent {
                what,
                recorded,
                found,
            })
        }
    };
    inconsistent(
        "vCPUs",
        u64::from(machine.spec.vcpus),
        state.state.vcpus.len() as u64,
    )?;
    inconsistent(
        "bytes of memory",
        machine.memory_file_bytes,
        state.state.memory_size,
    )?;
    // A memory size that overflows in bytes can match no file.
    let spec_bytes = machine.spec.memory_mib.checked_mul(1 << 20).unwrap_or(0);
    inconsistent("bytes of memory", spec_bytes, machine.memory_file_bytes)?;
    inconsistent(
        "virtio devices",
        (machine.disks as u64).saturating_add(machine.nics as u64),
        state.state.devices.virtio.len() as u64,
    )
}

fn feature_names(features: &[CpuFeature]) -> String {
    let mut names: Vec<String> = features
        .iter()
        .map(|f| match serde_json::to_value(f) {
            Ok(serde_json::Value::String(name)) => name,
            _ => format!("{f:?}"),
        })
        .collect();
    names.sort();
    names.dedup();
    names.join(", ")
}

impl Snapshot {
    /// Writes a snapshot of `vm`, which must be paused, into the directory `dir`, which must
    /// exist and hold no snapshot yet. The memory file is written first and the state file
    /// last, so a directory whose writing was cut short has no state file and loads as
    /// missing, never as a snapshot.
    pub fn write(vm: &Vm, dir: &Path) -> Result<Written, SnapshotError> {
        let state = vm.save().map_err(|source| SnapshotError::Save {
            dir: dir.to_owned(),
            source,
        })?;
        let memory_path = dir.join(MEMORY_FILE);
        let memory = create_new(&memory_path)?;
        let memory_bytes = vm
            .ram()
            .write_to(&memory)
            .map_err(|source| SnapshotError::Memory {
                path: memory_path.clone(),
                source,
            })?;
        let state = SnapshotState {
            machine: SavedMachine {
                spec: vm.spec().clone(),
                disks: vm.disks().len(),
                nics: vm.nics().len(),
                memory_file_bytes: vm.ram().size(),
            },
            state,
        };
        let state_path = dir.join(STATE_FILE);
        let bytes = encode_state(&state).map_err(|source| SnapshotError::Encode {
            path: state_path.clone(),
            source,
        })?;
        let mut file = create_new(&state_path)?;
        std::io::Write::write_all(&mut file, &bytes).map_err(|source| SnapshotError::Io {
            path: state_path,
            action: "write",
            source,
        })?;
        Ok(Written {
            memory_bytes,
            state_bytes: bytes.len() as u64,
        })
    }

    /// Reads the snapshot in `dir`: parses and checks its state file, and checks that its
    /// memory file has the size the state says. Loads no memory yet.
    pub fn load(dir: &Path) -> Result<Snapshot, SnapshotError> {
        if !dir.is_dir() {
            return Err(SnapshotError::Missing {
                path: dir.to_owned(),
            });
        }
        let state_path = dir.join(STATE_FILE);
        let bytes = read_state_file(&state_path)?;
        let state = parse_state(&bytes).map_err(|source| SnapshotError::Format {
            path: state_path,
            source,
        })?;
        let memory_path = dir.join(MEMORY_FILE);
        let found = match std::fs::metadata(&memory_path) {
            Ok(meta) => meta.len(),
            Err(err) => return Err(open_error(&memory_path, err)),
        };
        let expected = state.machine.memory_file_bytes;
        if found < expected {
            return Err(SnapshotError::MemoryTruncated {
                path: memory_path,
                expected,
                found,
            });
        }
        if found > expected {
            return Err(SnapshotError::MemoryTooLong {
                path: memory_path,
                expected,
                found,
            });
        }
        Ok(Snapshot {
            dir: dir.to_owned(),
            state,
        })
    }

    /// The directory the snapshot was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the snapshot was taken of.
    pub fn machine(&self) -> &SavedMachine {
        &self.state.machine
    }

    /// The machine's saved state, less guest RAM.
    pub fn state(&self) -> &VmSnapshot {
        &self.state.state
    }

    /// Whether a machine of shape `spec` with `disks` disks and `nics` NICs can load this
    /// snapshot: the first difference found, if not.
    pub fn check_fits(
        &self,
        spec: &MachineSpec,
        disks: usize,
        nics: usize,
    ) -> Result<(), SnapshotError> {
        let saved = self.machine();
        let mismatch = if saved.spec.memory_mib != spec.memory_mib {
            Some(Mismatch::Memory {
                snapshot: saved.spec.memory_mib,
                machine: spec.memory_mib,
            })
        } else if saved.spec.vcpus != spec.vcpus {
            Some(Mismatch::Vcpus {
                snapshot: saved.spec.vcpus,
                machine: spec.vcpus,
            })
        } else if feature_names(&saved.spec.hidden_cpu_features)
            != feature_names(&spec.hidden_cpu_features)
        {
            Some(Mismatch::HiddenCpuFeatures {
                snapshot: feature_names(&saved.spec.hidden_cpu_features),
                machine: feature_names(&spec.hidden_cpu_features),
            })
        } else if saved.disks != disks {
            Some(Mismatch::Disks {
                snapshot: saved.disks,
                machine: disks,
            })
        } else if saved.nics != nics {
            Some(Mismatch::Nics {
                snapshot: saved.nics,
                machine: nics,
            })
        } else {
            None
        };
        match mismatch {
            None => Ok(()),
            Some(mismatch) => Err(SnapshotError::Mismatch {
                dir: self.dir.clone(),
                mismatch,
            }),
        }
    }

    /// Loads the snapshot into `vm`, a machine just built (its vCPUs parked, never run) of
    /// the snapshot's shape: guest RAM from the memory file, then every device's, the VM's
    /// and each vCPU's state. [`Vm::resume`] then continues the guest where it was saved.
    /// Returns the bytes of guest RAM loaded.
    pub fn restore_into(&self, vm: &Vm) -> Result<u64, SnapshotError> {
        self.check_fits(vm.spec(), vm.disks().len(), vm.nics().len())?;
        let memory_path = self.dir.join(MEMORY_FILE);
        let memory = File::open(&memory_path).map_err(|err| open_error(&memory_path, err))?;
        let loaded = vm
            .ram()
            .read_from(&memory)
            .map_err(|source| SnapshotError::Memory {
                path: memory_path,
                source,
            })?;
        vm.restore(self.state())
            .map_err(|source| SnapshotError::Restore {
                dir: self.dir.clone(),
                source,
            })?;
        Ok(loaded)
    }
}

fn open_error(path: &Path, err: std::io::Error) -> SnapshotError {
    if err.kind() == std::io::ErrorKind::NotFound {
        SnapshotError::Missing {
            path: path.to_owned(),
        }
    } else {
        SnapshotError::Io {
            path: path.to_owned(),
            action: "read",
            source: err,
        }
    }
}

fn create_new(path: &Path) -> Result<File, SnapshotError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| SnapshotError::Io {
            path: path.to_owned(),
            action: "create",
            source,
        })
}

/// The state file's bytes. Its header is looked at first, so a large file that is no
/// snapshot is refused without being read whole.
fn read_state_file(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        action: "read",
        source,
    };
    let mut file = File::open(path).map_err(|err| open_error(path, err))?;
    let mut head = Vec::with_capacity(HEADER_LEN);
    (&mut file)
        .take(HEADER_LEN as u64)
        .read_to_end(&mut head)
        .map_err(io)?;
    check_header_start(&head).map_err(|source| SnapshotError::Format {
        path: path.to_owned(),
        source,
    })?;
    let mut bytes = head;
    file.read_to_end(&mut bytes).map_err(io)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::DeviceStates;

    fn spec(memory_mib: u64, vcpus: u8) -> MachineSpec {
        MachineSpec {
            name: "saved".into(),
            memory_mib,
            vcpus,
            hidden_cpu_features: vec![CpuFeature::Cx16],
            dirty_tracking: false,
            dirty_ring: false,
        }
    }

    /// A state of a machine of no vCPUs; the format does not care what the state holds.
    fn state(memory_mib: u64) -> SnapshotState {
        let vm_state = crate::state::VmState {
            irqchips: vec![],
            pit: Default::default(),
            clock: Default::default(),
        };
        let mut spec = spec(memory_mib, 1);
        spec.vcpus = 0;
        SnapshotState {
            machine: SavedMachine {
                spec,
                disks: 0,
                nics: 0,
                memory_file_bytes: memory_mib << 20,
            },
            state: VmSnapshot {
                vcpus: vec![],
                vm: vm_state,
                devices: DeviceStates::default(),
                memory_size: memory_mib << 20,
            },
        }
    }

    fn bytes() -> Vec<u8> {
        encode_state(&state(4)).unwrap()
    }

    /// Rewrites the checksum so that only the change made is wrong.
    fn reseal(bytes: &mut [u8]) {
        let end = bytes.len() - CHECKSUM_LEN;
        let checksum = CRC64.checksum(&bytes[..end]);
        bytes[end..].copy_from_slice(&checksum.to_le_bytes());
    }

    #[test]
    fn the_header_is_magic_version_length_and_the_checksum_ends_the_file() {
        let bytes = bytes();
        assert_eq!(&bytes[..8], b"UNDSTUDY");
        assert_eq!(le_u32(&bytes, 8), 1);
        let body_len = le_u64(&bytes, 12) as usize;
        assert_eq!(bytes.len(), HEADER_LEN + body_len + CHECKSUM_LEN);
        assert_eq!(bytes[HEADER_LEN], b'{', "the state is JSON");
        // CRC-64/XZ's check value, so that another implementation can read the file.
        assert_eq!(CRC64.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn a_state_round_trips() {
        let parsed = parse_state(&bytes()).unwrap();
        assert_eq!(parsed.machine, state(4).machine);
        assert_eq!(parsed.state.memory_size, 4 << 20);
    }

    #[test]
    fn a_foreign_file_is_not_a_snapshot() {
        for foreign in [&b"{\"vcpus\": []}"[..], b"\x7fELF\x02\x01\x01", b"U", b""] {
            let err = parse_state(foreign).unwrap_err();
            let expected_truncated = foreign.is_empty() || foreign == b"U";
            match err {
                FormatError::NotASnapshot => assert!(!expected_truncated, "{foreign:?}"),
                FormatError::Truncated { .. } => assert!(expected_truncated, "{foreign:?}"),
                other => panic!("{foreign:?}: {other}"),
            }
        }
        assert_eq!(
            FormatError::NotASnapshot.to_string(),
            "not an understudy snapshot (it does not begin with the snapshot magic)"
        );
    }

    #[test]
    fn another_version_is_refused_before_anything_else() {
        let mut bytes = bytes();
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        let err = parse_state(&bytes).unwrap_err();
        assert!(
            matches!(err, FormatError::UnsupportedVersion { found: 2 }),
            "{err}"
        );
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn a_flipped_byte_anywhere_in_the_state_is_corrupt() {
        let clean = bytes();
        for at in [HEADER_LEN, HEADER_LEN + 7, clean.len() - CHECKSUM_LEN - 1] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x20;
            let err = parse_state(&bytes).unwrap_err();
            assert!(
                matches!(err, FormatError::ChecksumMismatch { .. }),
                "byte {at}: {err}"
            );
            assert!(err.to_string().starts_with("corrupt"), "{err}");
        }
        let mut bytes = clean.clone();
        *bytes.last_mut().unwrap() ^= 1;
        assert!(matches!(
            parse_state(&bytes),
            Err(FormatError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn a_cut_or_lengthened_file_is_refused() {
        let clean = bytes();
        for len in [10, HEADER_LEN, HEADER_LEN + 3, clean.len() - 1] {
            let err = parse_state(&clean[..len]).unwrap_err();
            assert!(
                matches!(err, FormatError::Truncated { found, .. } if found == len as u64),
                "{len} bytes: {err}"
            );
        }
        let mut longer = clean.clone();
        longer.push(0);
        assert!(matches!(
            parse_state(&longer),
            Err(FormatError::TrailingBytes { extra: 1 })
        ));
        // A length that overflows when the header and checksum are added.
        let mut huge = clean.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse_state(&huge),
            Err(FormatError::Truncated { .. })
        ));
    }

    #[test]
    fn a_sealed_state_that_is_not_json_or_contradicts_itself_is_refused() {
        let mut bytes = bytes();
        bytes[HEADER_LEN] = b'[';
        reseal(&mut bytes);
        let err = parse_state(&bytes).unwrap_err();
        assert!(matches!(err, FormatError::Unparseable(_)), "{err}");

        let mut lying = state(4);
        lying.machine.memory_file_bytes = 8 << 20;
        let err = parse_state(&encode_state(&lying).unwrap()).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::Inconsistent {
                    what: "bytes of memory",
                    ..
                }
            ),
            "{err}"
        );

        let mut lying = state(4);
        lying.machine.spec.vcpus = 2;
        let err = parse_state(&encode_state(&lying).unwrap()).unwrap_err();
        assert!(err.to_string().contains("2 vCPUs, the state 0"), "{err}");

        let mut lying = state(4);
        lying.machine.spec.memory_mib = u64::MAX;
        assert!(parse_state(&encode_state(&lying).unwrap()).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap stand-in for the fuzz target: every prefix, and every one-byte change of
        // the header, of a real state file.
        let clean = bytes();
        for len in 0..clean.len() {
            let _ = parse_state(&clean[..len]);
        }
        for at in 0..HEADER_LEN + 2 {
            for value in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut bytes = clean.clone();
                bytes[at] = value;
                let _ = parse_state(&bytes);
                reseal(&mut bytes);
                let _ = parse_state(&bytes);
            }
        }
    }

    fn snapshot_of(memory_mib: u64) -> Snapshot {
        let mut state = state(memory_mib);
        state.machine.spec.vcpus = 1;
        Snapshot {
            dir: PathBuf::from("/snap"),
            state,
        }
    }

    #[test]
    fn a_machine_of_another_shape_is_named_in_the_refusal() {
        let snapshot = snapshot_of(64);
        assert!(snapshot.check_fits(&spec(64, 1), 0, 0).is_ok());
        let mut other = spec(64, 1);
        other.name = "elsewhere".into();
        other.dirty_tracking = true;
        assert!(
            snapshot.check_fits(&other, 0, 0).is_ok(),
            "the name and dirty tracking are the host's business"
        );
        let refusal = |spec: &MachineSpec, disks, nics| {
            snapshot
                .check_fits(spec, disks, nics)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            refusal(&spec(128, 1), 0, 0),
            "/snap: does not fit: the snapshot's machine has 64 MiB of memory, this one 128 MiB"
        );
        assert!(refusal(&spec(64, 2), 0, 0).contains("1 vCPUs, this one 2"));
        let mut hides = spec(64, 1);
        hides.hidden_cpu_features = vec![CpuFeature::Xsave, CpuFeature::Cx16];
        assert!(refusal(&hides, 0, 0).contains("[cx16], this one [cx16, xsave]"));
        assert!(refusal(&spec(64, 1), 1, 0).contains("0 disks, this one 1"));
        assert!(refusal(&spec(64, 1), 0, 2).contains("0 NICs, this one 2"));
    }

    fn temp_dir(test: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmm-core-snapshot-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A snapshot directory written by hand: its state file and a sparse memory file.
    fn write_dir(test: &str, memory_len: u64) -> PathBuf {
        let dir = temp_dir(test);
        std::fs::write(dir.join(STATE_FILE), bytes()).unwrap();
        let memory = File::create(dir.join(MEMORY_FILE)).unwrap();
        memory.set_len(memory_len).unwrap();
        dir
    }

    #[test]
    fn loading_names_the_file_and_what_is_wrong() {
        let dir = write_dir("load", 4 << 20);
        let loaded = Snapshot::load(&dir).unwrap();
        assert_eq!(loaded.machine().memory_file_bytes, 4 << 20);
        assert_eq!(loaded.dir(), dir);

        let memory = dir.join(MEMORY_FILE);
        File::options()
            .write(true)
            .open(&memory)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let err = Snapshot::load(&dir).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: truncated: 1048576 bytes, the state says 4194304",
                memory.display()
            )
        );
        File::options()
            .write(true)
            .open(&memory)
            .unwrap()
            .set_len(5 << 20)
            .unwrap();
        assert!(matches!(
            Snapshot::load(&dir),
            Err(SnapshotError::MemoryTooLong { .. })
        ));
        std::fs::remove_file(&memory).unwrap();
        assert_eq!(
            Snapshot::load(&dir).unwrap_err().to_string(),
            format!("{}: missing", memory.display())
        );

        let state = dir.join(STATE_FILE);
        std::fs::write(&state, b"random bytes, not a snapshot at all").unwrap();
        assert_eq!(
            Snapshot::load(&dir).unwrap_err().to_string(),
            format!(
                "{}: not an understudy snapshot (it does not begin with the snapshot magic)",
                state.display()
            )
        );
        std::fs::remove_file(&state).unwrap();
        assert_eq!(
            Snapshot::load(&dir).unwrap_err().to_string(),
            format!("{}: missing", state.display())
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(
            Snapshot::load(&dir),
            Err(SnapshotError::Missing { path }) if path == dir
        ));
    }

    #[test]
    fn a_corrupt_state_file_is_refused_by_load() {
        let dir = write_dir("corrupt", 4 << 20);
        let state = dir.join(STATE_FILE);
        let mut bytes = std::fs::read(&state).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x01;
        std::fs::write(&state, bytes).unwrap();
        let err = Snapshot::load(&dir).unwrap_err();
        assert!(
            matches!(
                err,
                SnapshotError::Format {
                    source: FormatError::ChecksumMismatch { .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains(": corrupt: checksum mismatch"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
