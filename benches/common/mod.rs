//! What the benchmarks share.

/// The median of `samples` (the upper one of an even count). Panics on an empty set or on
/// values that do not compare (NaN): a benchmark with no figure has nothing to report.
pub fn median<T: Copy + PartialOrd>(mut samples: Vec<T>) -> T {
    samples.sort_by(|a, b| a.partial_cmp(b).expect("comparable samples"));
    samples[samples.len() / 2]
}
