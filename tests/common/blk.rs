//! The `blk` test kernel's guest interface as the disk tests read it: the pattern it writes,
//! the lines it prints, and what the console and the image must show once it is done
//! (kernels/README.md).

use std::path::Path;

/// A disk sector, in bytes.
pub const SECTOR: usize = 512;

/// What the `blk` kernel writes to sector `n` in pass `p` (kernels/README.md).
pub fn pattern(p: u64, n: u64) -> Vec<u8> {
    (0..64u64)
        .flat_map(|w| ((p << 56) ^ (n << 16) ^ w.wrapping_mul(0x9E37_79B9_7F4A_7C15)).to_le_bytes())
        .collect()
}

/// Every `blk: pass P sector N ok` line, in order.
pub fn ok_lines(text: &str) -> Vec<(u64, u64)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("blk: pass ")?.strip_suffix(" ok")?;
            let (pass, sector) = rest.split_once(" sector ")?;
            Some((pass.parse().ok()?, sector.parse().ok()?))
        })
        .collect()
}

/// The console shows every sector of every pass exactly once, in order, the kernel's checks
/// all passed, and it finished.
pub fn assert_exactly_once(text: &str, passes: u64, sectors: u64, what: &str) {
    let expected: Vec<(u64, u64)> = (1..=passes)
        .flat_map(|p| (0..sectors).map(move |n| (p, n)))
        .collect();
    let seen = ok_lines(text);
    if seen != expected {
        let first_bad = seen
            .iter()
            .zip(&expected)
            .position(|(a, b)| a != b)
            .unwrap_or(seen.len().min(expected.len()));
        panic!(
            "{what}: {} lines where {} were expected; first difference at line {first_bad}: {:?} for {:?}",
            seen.len(),
            expected.len(),
            seen.get(first_bad),
            expected.get(first_bad)
        );
    }
    for bad in ["MISMATCH", "LOST", "failed with status", "timed out"] {
        assert!(!text.contains(bad), "{what}: {bad}:\n{text}");
    }
    assert!(
        text.contains(&format!("blk: done passes {passes} sectors {sectors}")),
        "{what}: not finished"
    );
    assert_eq!(
        text.matches("blk: disk capacity").count(),
        1,
        "{what}: rebooted"
    );
}

/// The image holds pattern(`passes`, n) in sector n < `sectors` and zeros after.
pub fn assert_image(path: &Path, passes: u64, sectors: u64, what: &str) {
    let data = std::fs::read(path).unwrap();
    for n in 0..sectors {
        let on_disk = &data[n as usize * SECTOR..][..SECTOR];
        assert!(
            on_disk == pattern(passes, n).as_slice(),
            "{what}: sector {n} does not hold pass {passes}'s pattern"
        );
    }
    assert!(
        data[sectors as usize * SECTOR..].iter().all(|b| *b == 0),
        "{what}: written past the sectors the guest wrote"
    );
}
