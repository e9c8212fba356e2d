//! The entry point of the instruction fuzz target (`fuzz/fuzz_targets/instruction.rs`): the
//! decoder of `ldmxcsr`/`stmxcsr` that completing a refused instruction relies on, run over
//! the fuzzer's code bytes and registers. Decoding only: nothing here needs KVM. Whatever the
//! bytes, decoding must end in "not one of these" or in an instruction no longer than the
//! bytes it was given (and than any x86 instruction), decoded from those bytes alone.

use kvm_bindings::kvm_regs;

/// Most bytes an x86 instruction has; the vCPU thread reads at most this many at RIP.
pub const MAX_INSTRUCTION: usize = 15;

/// An `ldmxcsr` or `stmxcsr` with a memory operand, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decoded {
    /// `stmxcsr` (MXCSR to memory), else `ldmxcsr`.
    pub store: bool,
    /// The operand's address.
    pub address: u64,
    /// The instruction's length in bytes.
    pub length: usize,
}

/// Decodes the code `data` holds, and checks what any decoding must satisfy. Layout: the
/// number of code bytes (byte 0, taken mod 16), the code, then the registers RAX, RCX, RDX,
/// RBX, RSP, RBP, RSI, RDI, R8 to R15 and RIP, a u64 each (missing bytes are 0).
pub fn instruction(data: &[u8]) -> Option<Decoded> {
    let code_len = usize::from(data.first().copied().unwrap_or(0)) % (MAX_INSTRUCTION + 1);
    let rest = data.get(1..).unwrap_or_default();
    let (code, registers) = rest.split_at(code_len.min(rest.len()));
    let mut values = [0u64; 17];
    for (value, bytes) in values.iter_mut().zip(registers.chunks(8)) {
        let mut word = [0u8; 8];
        word[..bytes.len()].copy_from_slice(bytes);
        *value = u64::from_le_bytes(word);
    }
    let [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15, rip] =
        values;
    let regs = kvm_regs {
        rax,
        rcx,
        rdx,
        rbx,
        rsp,
        rbp,
        rsi,
        rdi,
        r8,
        r9,
        r10,
        r11,
        r12,
        r13,
        r14,
        r15,
        rip,
        ..Default::default()
    };
    let decoded = decode(code, &regs)?;
    assert!(
        decoded.length <= code.len() && decoded.length <= MAX_INSTRUCTION,
        "{decoded:?} from {} code bytes {code:02x?}",
        code.len()
    );
    // The opcode follows the prefixes: segment overrides, 32-bit addressing, REX.
    let opcode_at = code
        .iter()
        .position(|b| {
            !matches!(
                b,
                0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x67 | 0x40..=0x4f
            )
        })
        .unwrap_or(code.len());
    assert_eq!(
        code[opcode_at..opcode_at + 2],
        [0x0f, 0xae],
        "{decoded:?} from {code:02x?}, which is not 0F AE"
    );
    // The bytes after the instruction are not part of it.
    let mut longer = code[..decoded.length].to_vec();
    assert_eq!(decode(&longer, &regs), Some(decoded), "cut to its length");
    longer.extend_from_slice(&[0xff; MAX_INSTRUCTION]);
    assert_eq!(decode(&longer, &regs), Some(decoded), "followed by more");
    Some(decoded)
}

/// What the vCPU thread's decoder makes of `code` with `regs`.
fn decode(code: &[u8], regs: &kvm_regs) -> Option<Decoded> {
    super::complete::mxcsr_instruction(code, regs).map(|op| Decoded {
        store: op.store,
        address: op.address,
        length: op.length,
    })
}

/// The input [`instruction`] reads as `code` (at most [`MAX_INSTRUCTION`] bytes) with
/// `regs`: how the seeds in `fuzz/seeds/instruction/` are made.
pub fn input(code: &[u8], regs: &kvm_regs) -> Vec<u8> {
    let code = &code[..code.len().min(MAX_INSTRUCTION)];
    let mut data = vec![code.len() as u8];
    data.extend_from_slice(code);
    for value in [
        regs.rax, regs.rcx, regs.rdx, regs.rbx, regs.rsp, regs.rbp, regs.rsi, regs.rdi, regs.r8,
        regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14, regs.r15, regs.rip,
    ] {
        data.extend_from_slice(&value.to_le_bytes());
    }
    data
}

/// Real instructions and registers: what Linux runs (`ldmxcsr` in `kernel_fpu_begin`, its
/// `stmxcsr` and a RIP-relative form), and an `xrstor`, which shares the opcode and is not
/// one of them. The seeds of the fuzz target, by name.
pub fn examples() -> Vec<(&'static str, Vec<u8>)> {
    let regs = kvm_regs {
        rsp: 0xffff_c900_0001_3e40,
        rbp: 0xffff_c900_0001_3e90,
        rdi: 0xffff_8880_0312_4000,
        r12: 0xffff_8880_0312_5000,
        rip: 0xffff_ffff_8103_4a2c,
        ..Default::default()
    };
    vec![
        // ldmxcsr 0x4(%rsp)
        ("ldmxcsr-rsp", input(&[0x0f, 0xae, 0x54, 0x24, 0x04], &regs)),
        // stmxcsr -0x10(%r12)
        (
            "stmxcsr-r12",
            input(&[0x41, 0x0f, 0xae, 0x5c, 0x24, 0xf0], &regs),
        ),
        // ldmxcsr 0x1f3c(%rip)
        (
            "ldmxcsr-rip",
            input(&[0x0f, 0xae, 0x15, 0x3c, 0x1f, 0, 0], &regs),
        ),
        // ldmxcsr 0x100(%rdi,%rbp,8), then the next instruction's bytes
        (
            "ldmxcsr-sib-and-more",
            input(
                &[0x0f, 0xae, 0x94, 0xef, 0, 1, 0, 0, 0x48, 0x89, 0xe5],
                &regs,
            ),
        ),
        // xrstor (%rdi)
        ("xrstor", input(&[0x48, 0x0f, 0xae, 0x2f], &regs)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeded_inputs::{seeds, Inputs};

    #[test]
    fn the_examples_decode_as_the_cpu_does() {
        let decoded: Vec<_> = examples()
            .into_iter()
            .map(|(_, input)| instruction(&input).map(|d| (d.store, d.length)))
            .collect();
        assert_eq!(
            decoded,
            [
                Some((false, 5)),
                Some((true, 6)),
                Some((false, 7)),
                Some((false, 8)),
                None
            ]
        );
        let rip_relative = instruction(&examples()[2].1).unwrap();
        assert_eq!(rip_relative.address, 0xffff_ffff_8103_4a2c + 7 + 0x1f3c);
    }

    #[test]
    fn the_fuzz_targets_seeds_are_the_examples() {
        let examples: Vec<_> = examples()
            .into_iter()
            .map(|(name, input)| (name.to_string(), input))
            .collect();
        let mut sorted = examples.clone();
        sorted.sort();
        assert!(
            seeds("instruction") == sorted,
            "fuzz/seeds/instruction/ is not fuzz::examples(); write them again"
        );
    }

    /// Found by the seeded run: `ldmxcsr 0(%rip)` at RIP 2^64 - 7 overflowed adding its length
    /// to RIP (a panic on the vCPU thread in a debug build) where the CPU wraps.
    #[test]
    fn a_rip_relative_operand_at_the_top_of_memory_wraps() {
        let regs = kvm_regs {
            rip: u64::MAX - 6,
            ..Default::default()
        };
        let op = decode(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0], &regs).unwrap();
        assert_eq!((op.address, op.length), (0x10, 7));
    }

    /// A bounded run of what the fuzz target does, on every build: random inputs and random
    /// changes to the seeds. None may panic or break the properties `instruction` checks.
    #[test]
    fn random_and_mutated_instructions_decode_within_their_bytes() {
        let mut inputs = Inputs::new(0x5eed_c0de);
        let seeds = examples();
        let mut decoded = 0;
        for round in 0..20_000 {
            let input = if round % 4 == 0 {
                let mut input = inputs.random(160);
                // Random code is rarely 0F AE: make a quarter of it so.
                if input.len() > 4 && inputs.next_number().is_multiple_of(4) {
                    input[1..3].copy_from_slice(&[0x0f, 0xae]);
                }
                input
            } else {
                let (_, seed) = &seeds[inputs.below(seeds.len())];
                inputs.mutated(seed, 16)
            };
            decoded += usize::from(instruction(&input).is_some());
        }
        assert!(decoded > 1000, "few inputs decoded ({decoded})");
    }
}
