//! Inputs for the bounded, seeded runs of the fuzz targets that `cargo test` does on every
//! build (the fuzzers themselves run only under `scripts/fuzz`): random bytes, and real inputs
//! (a target's seeds) with a few random changes of the kinds a fuzzer makes. The same seed
//! number gives the same inputs on every run, so a failure is reproducible.
//!
//! Test support only: built for this crate's tests and, through the `seeded-inputs` feature,
//! for other crates' tests.

/// Words a text input may have inserted, for a target that reads none of its own.
const NO_WORDS: &[&str] = &[];

/// A source of test inputs (xorshift64: small, fast, and the same everywhere).
pub struct Inputs {
    state: u64,
}

impl Inputs {
    /// Inputs from `seed`, which must not be 0.
    pub fn new(seed: u64) -> Self {
        Inputs { state: seed.max(1) }
    }

    /// The next random number.
    pub fn next_number(&mut self) -> u64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state
    }

    /// A random number below `bound` (at least 1).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_number() % bound.max(1) as u64) as usize
    }

    /// Up to `max_len` random bytes.
    pub fn random(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len + 1);
        (0..len).map(|_| self.next_number() as u8).collect()
    }

    /// `seed` with 1 to 8 changes: bytes set, values a parser finds interesting written,
    /// runs of bytes removed or repeated, the input cut short. Half of the changes fall in
    /// its first `hot` bytes, where a binary input's headers are.
    pub fn mutated(&mut self, seed: &[u8], hot: usize) -> Vec<u8> {
        self.mutated_with(seed, hot, NO_WORDS)
    }

    /// [`Inputs::mutated`] for text: also puts a digit for a digit and a letter for a letter,
    /// and inserts one of `words` (keys, values, punctuation of the format) or another line
    /// of the input, anywhere.
    pub fn mutated_text(&mut self, seed: &[u8], words: &[&str]) -> Vec<u8> {
        self.mutated_with(seed, seed.len(), words)
    }

    fn mutated_with(&mut self, seed: &[u8], hot: usize, words: &[&str]) -> Vec<u8> {
        let mut input = seed.to_vec();
        for _ in 0..1 + self.below(8) {
            let len = input.len();
            let at = if self.next_number().is_multiple_of(2) {
                self.below(hot.min(len) + 1)
            } else {
                self.below(len + 1)
            };
            match self.below(if words.is_empty() { 6 } else { 8 }) {
                // In text, a digit for a digit or a letter for a letter: the text stays well
                // formed and a value changes.
                0 if at < len && !words.is_empty() => {
                    let (first, count) = match input[at] {
                        b'0'..=b'9' => (b'0', 10),
                        b'a'..=b'z' => (b'a', 26),
                        b'A'..=b'Z' => (b'A', 26),
                        _ => (0, 256),
                    };
                    input[at] = (first as usize + self.below(count)) as u8;
                }
                0 | 1 if at < len => input[at] = self.next_number() as u8,
                2 => {
                    let value = match self.below(6) {
                        0 => 0,
                        1 => u64::MAX,
                        2 => 0x7f,
                        3 => 0x8000_0000,
                        4 => 1 << self.below(64),
                        _ => self.next_number() & 0xffff,
                    };
                    let width = 1 << self.below(4);
                    let end = (at + width).min(len);
                    input[at..end].copy_from_slice(&value.to_le_bytes()[..end - at]);
                }
                3 => {
                    let end = (at + 1 + self.below(16)).min(len);
                    input.drain(at..end);
                }
                4 => {
                    let end = (at + 1 + self.below(16)).min(len);
                    let run = input[at..end].to_vec();
                    input.splice(at..at, run);
                }
                5 => input.truncate(at),
                6 => {
                    let word = words[self.below(words.len())];
                    input.splice(at..at, word.bytes());
                }
                _ => {
                    let lines: Vec<&[u8]> = seed.split(|&b| b == b'\n').collect();
                    let line = lines[self.below(lines.len())];
                    let mut with_newline = line.to_vec();
                    with_newline.push(b'\n');
                    input.splice(at..at, with_newline);
                }
            }
        }
        input
    }
}

/// The files of the fuzz target `target`'s seed corpus (`fuzz/seeds/TARGET/`), by name.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into();
            let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (name, bytes)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_inputs() {
        let (mut a, mut b) = (Inputs::new(7), Inputs::new(7));
        let seed = b"[[guest]]\nname = \"a\"\n";
        for _ in 0..100 {
            assert_eq!(a.mutated(seed, 4), b.mutated(seed, 4));
            assert_eq!(a.random(64), b.random(64));
        }
    }

    #[test]
    fn mutations_of_empty_and_tiny_seeds_do_not_panic() {
        let mut inputs = Inputs::new(3);
        for _ in 0..1000 {
            inputs.mutated(b"", 8);
            inputs.mutated(b"x", 8);
            inputs.mutated_text(b"", &["a"]);
            inputs.mutated_text(b"a\nb", &["=", "["]);
        }
    }
}
