//! The entry point of the snapshot fuzz target (`fuzz/fuzz_targets/snapshot.rs`): the
//! fuzzer's bytes as a snapshot's state file, parsed by [`parse_state`] as `Snapshot::load`
//! parses one. Whatever the bytes, parsing must end in a [`FormatError`] or a state, never a
//! panic; and a state, written again by [`encode_state`], must read back as itself.
//!
//! A state file ends in a checksum of everything before it, so nearly every change a fuzzer
//! makes is refused right there. Each input is therefore parsed twice: as it is, and
//! resealed (its length field and checksum rewritten to fit the bytes), which takes the
//! changes on to the JSON and the checks behind it.

use crate::snapshot::{encode_state, parse_state, FormatError, SnapshotState, CHECKSUM_LEN};

/// Where a state file's length field is, and the bytes before its state.
const LENGTH_AT: usize = 12;
const HEADER_LEN: usize = crate::snapshot::HEADER_LEN;

/// Parses `data` as a state file, and resealed, and checks that any state parsed reads back
/// as itself from what [`encode_state`] writes for it. Returns what the file as it is gave.
pub fn state_file(data: &[u8]) -> Result<SnapshotState, FormatError> {
    let as_is = parse_state(data);
    if let Ok(state) = &as_is {
        reads_back(state);
    }
    if let Some(resealed) = resealed(data) {
        match parse_state(&resealed) {
            Ok(state) => reads_back(&state),
            Err(_) => assert!(as_is.is_err(), "a valid file was refused once resealed"),
        }
    }
    as_is
}

/// `data` with its length field and checksum made to fit it, if it is long enough to have
/// both.
pub fn resealed(data: &[u8]) -> Option<Vec<u8>> {
    let body = data.len().checked_sub(HEADER_LEN + CHECKSUM_LEN)?;
    let mut bytes = data.to_vec();
    bytes[LENGTH_AT..HEADER_LEN].copy_from_slice(&(body as u64).to_le_bytes());
    let end = bytes.len() - CHECKSUM_LEN;
    let checksum = crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(&bytes[..end]);
    bytes[end..].copy_from_slice(&checksum.to_le_bytes());
    Some(bytes)
}

/// Writing `state` and reading it back gives a state that is written the same.
fn reads_back(state: &SnapshotState) {
    let written = encode_state(state).expect("a parsed state encodes");
    let again = parse_state(&written)
        .unwrap_or_else(|err| panic!("a parsed state, written again, does not parse: {err}"));
    assert!(
        encode_state(&again).expect("a parsed state encodes") == written,
        "a parsed state, written again and read back, is not itself"
    );
}

/// A small state as the snapshot writer encodes it: a machine of 4 MiB, no vCPUs and no
/// devices (the format does not care what the state holds). The seed
/// `fuzz/seeds/snapshot/small-state`.
pub fn example() -> SnapshotState {
    use crate::snapshot::SavedMachine;
    SnapshotState {
        machine: SavedMachine {
            spec: crate::vm::MachineSpec {
                name: "saved".into(),
                memory_mib: 4,
                vcpus: 0,
                hidden_cpu_features: vec![crate::cpuid::CpuFeature::Cx16],
                dirty_tracking: false,
                dirty_ring: false,
            },
            disks: 0,
            nics: 0,
            memory_file_bytes: 4 << 20,
        },
        state: crate::state::VmSnapshot {
            vcpus: vec![],
            vm: crate::state::VmState {
                irqchips: vec![],
                pit: Default::default(),
                clock: Default::default(),
            },
            devices: crate::devices::DeviceStates::default(),
            memory_size: 4 << 20,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeded_inputs::{seeds, Inputs};

    /// Pieces of JSON that mutations insert.
    const WORDS: &[&str] = &[
        "[",
        "]",
        "{",
        "}",
        ",",
        ":",
        "\"",
        "0",
        "1",
        "-1",
        "255",
        "256",
        "65536",
        "4294967296",
        "18446744073709551615",
        "18446744073709551616",
        "1e3",
        "null",
        "true",
        "[]",
        "{}",
        "\"vcpus\"",
        "\"memory_size\"",
        "\"virtio\"",
        "\"\\u0000\"",
    ];

    #[test]
    fn the_small_state_seed_is_the_example() {
        let seed = seeds("snapshot")
            .into_iter()
            .find(|(name, _)| name == "small-state")
            .map(|(_, bytes)| bytes);
        assert!(
            seed == Some(encode_state(&example()).unwrap()),
            "fuzz/seeds/snapshot/small-state is not encode_state(&example()); write it again"
        );
    }

    #[test]
    fn every_seed_is_a_state_file() {
        // `two-vcpus-one-disk` is the state file of `understudy ctl SOCKET snapshot` of a
        // running `counter` guest with 2 vCPUs and a disk: take one again if the format
        // changes.
        for (name, seed) in seeds("snapshot") {
            if let Err(err) = state_file(&seed) {
                panic!("fuzz/seeds/snapshot/{name}: {err}");
            }
        }
    }

    /// A bounded run of what the fuzz target does, on every build: random bytes, and random
    /// changes to the seeds, most of them in the JSON (which resealing lets through). None
    /// may panic, or parse and fail to read back.
    #[test]
    fn random_and_mutated_state_files_are_errors_or_read_back() {
        let mut inputs = Inputs::new(0x5eed_5a95);
        let seeds = seeds("snapshot");
        let mut parsed = 0;
        for round in 0..1000 {
            let input = if round % 6 == 0 {
                inputs.random(256)
            } else {
                let (_, seed) = &seeds[inputs.below(seeds.len())];
                match round % 3 {
                    0 => inputs.mutated(seed, HEADER_LEN),
                    _ => inputs.mutated_text(seed, WORDS),
                }
            };
            state_file(&input).ok();
            parsed += usize::from(resealed(&input).is_some_and(|r| parse_state(&r).is_ok()));
        }
        assert!(parsed > 5, "few mutations parsed once resealed ({parsed})");
    }
}
