//! Completing an instruction the host refused, on the vCPU's thread, where its architectural
//! effect can be produced exactly ([`complete_refused_instruction`]): `int3`, `fwait`, and
//! `ldmxcsr`/`stmxcsr`, with their decoder and the kernel-mode guest-virtual accesses they make.

use kvm_bindings::{kvm_regs, KVM_INTERNAL_ERROR_EMULATION, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::VcpuFd;

use crate::memory::paging::{Access, Paging, Translation};
use crate::memory::GuestRam;
use crate::state::StateError;

/// The byte of `int3`.
pub(super) const INT3: u8 = 0xcc;
/// The longest x86 instruction.
const MAX_INSTRUCTION_LENGTH: usize = 15;
/// The byte of `fwait`.
const FWAIT: u8 = 0x9b;
/// The #BP exception vector.
pub(super) const BREAKPOINT_VECTOR: u8 = 3;
/// #NM, device not available.
const DEVICE_NOT_AVAILABLE_VECTOR: u8 = 7;
/// #MF, x87 floating-point error.
const X87_FLOATING_POINT_VECTOR: u8 = 16;
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
/// x87 status word: an unmasked exception is pending.
const FSW_ERROR_SUMMARY: u16 = 1 << 7;
pub(super) const CR4_OSFXSR: u64 = 1 << 9;

/// Completes an instruction the host's emulator refused, where its architectural effect can be
/// produced exactly from outside, and returns its name; `None`, changing nothing, otherwise.
/// Only at CPL0 in 64-bit mode, where privilege checks cannot fail. Runs on the vCPU's thread.
///
/// - `int3`: RIP moves past it and #BP (a trap, no error code) is raised; the guest's own
///   handler takes it with the return address after the `int3`.
/// - `fwait`: with CR0.TS and CR0.MP set it raises #NM; with an unmasked x87 exception pending
///   (FSW.ES) it raises #MF (CR0.NE set; the legacy FERR# path is not reproduced, so that
///   case stays a failure); otherwise it does nothing and RIP moves past it.
/// - `ldmxcsr`/`stmxcsr` with a memory operand, any addressing mode, REX, segment overrides
///   (FS and GS add their base) and 32-bit addressing: #UD with a 66, F2, F3 or LOCK prefix,
///   without CR4.OSFXSR or with CR0.EM; #NM with CR0.TS; #GP(0), or #SS(0) for a stack
///   reference, when a byte of the operand is not canonical; #PF (CR2, error code) as the
///   guest's page tables say, with the accessed and dirty flags set as the CPU sets them
///   (`memory::paging`); #GP(0) for reserved MXCSR bits; otherwise MXCSR is loaded
///   or stored and RIP moves past it. An operand outside RAM (MMIO) or under protection keys
///   cannot be done exactly and stays a failure.
/// - Any instruction longer than 15 bytes (all prefixes, as far as it was read): #GP(0).
///
/// Total over whatever the guest put in its memory and registers: nothing here indexes or
/// adds without a check.
pub fn complete_refused_instruction(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    suberror: u32,
) -> Result<Option<&'static str>, StateError> {
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Ok(None);
    }
    let step = |step| move |source| StateError { step, source };
    let sregs = vcpu.get_sregs().map_err(step("KVM_GET_SREGS"))?;
    if sregs.cs.selector & 3 != 0 || sregs.cs.l == 0 {
        return Ok(None);
    }
    let mut regs = vcpu.get_regs().map_err(step("KVM_GET_REGS"))?;
    let code = read_code(ram, &paging(&sregs, &regs, None), regs.rip);
    let Some(&opcode) = code.first() else {
        return Ok(None);
    };
    let completion = match opcode {
        INT3 => Completion {
            name: "int3",
            advance: 1,
            raise: Some(Raise::exception(BREAKPOINT_VECTOR, None)),
        },
        FWAIT => {
            // The x87 status word, from the XSAVE image (see complete_mxcsr).
            let xsave = vcpu.get_xsave().map_err(step("KVM_GET_XSAVE"))?;
            let fsw = (xsave.region[XSAVE_FCW_FSW] >> 16) as u16;
            let (advance, raise) = if sregs.cr0 & (CR0_TS | CR0_MP) == CR0_TS | CR0_MP {
                (0, Some(Raise::exception(DEVICE_NOT_AVAILABLE_VECTOR, None)))
            } else if fsw & FSW_ERROR_SUMMARY != 0 {
                if sregs.cr0 & CR0_NE == 0 {
                    return Ok(None);
                }
                (0, Some(Raise::exception(X87_FLOATING_POINT_VECTOR, None)))
            } else {
                (1, None)
            };
            Completion {
                name: "fwait",
                advance,
                raise,
            }
        }
        _ => match mxcsr_decode(&code, &regs, &sregs) {
            Some(MxcsrDecode::Invalid(name, raise)) => Completion {
                name,
                advance: 0,
                raise: Some(raise),
            },
            Some(MxcsrDecode::Instruction(op)) => {
                match complete_mxcsr(vcpu, ram, &sregs, &regs, &op)? {
                    Some(None) => Completion {
                        name: op.name(),
                        advance: op.length as u64,
                        raise: None,
                    },
                    Some(raise) => Completion {
                        name: op.name(),
                        advance: 0,
                        raise,
                    },
                    None => return Ok(None),
                }
            }
            None => return Ok(None),
        },
    };
    // Registers before events: an exception is delivered with the RIP in place at entry
    // (past a trap, at a fault). RIP wraps as the CPU's does.
    if completion.advance > 0 {
        regs.rip = regs.rip.wrapping_add(completion.advance);
        vcpu.set_regs(&regs).map_err(step("KVM_SET_REGS"))?;
    }
    if let Some(raise) = completion.raise {
        if let Some(cr2) = raise.cr2 {
            let mut sregs = sregs;
            sregs.cr2 = cr2;
            vcpu.set_sregs(&sregs).map_err(step("KVM_SET_SREGS"))?;
        }
        let mut events = vcpu
            .get_vcpu_events()
            .map_err(step("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = raise.vector;
        events.exception.has_error_code = u8::from(raise.error_code.is_some());
        events.exception.error_code = raise.error_code.unwrap_or(0);
        vcpu.set_vcpu_events(&events)
            .map_err(step("KVM_SET_VCPU_EVENTS"))?;
    }
    Ok(Some(completion.name))
}

/// Whether the code at the vCPU's RIP is no longer what KVM reported it refused (`reported`,
/// its instruction bytes as `KVM_EXIT_INTERNAL_ERROR` gives them; none: never). On a guest
/// with more than one vCPU another one may rewrite the instruction between KVM's refusal and
/// this look: Linux's `text_poke_bp` puts an `int3` over an instruction while it patches it and
/// takes it away again when done. The vCPU then simply runs what is there now, as a CPU that
/// fetched it after the write would. Runs on the vCPU's thread; changes nothing.
pub fn refused_code_changed(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    reported: &[u8],
) -> Result<bool, StateError> {
    let step = |step| move |source| StateError { step, source };
    if reported.is_empty() {
        return Ok(false);
    }
    let sregs = vcpu.get_sregs().map_err(step("KVM_GET_SREGS"))?;
    let regs = vcpu.get_regs().map_err(step("KVM_GET_REGS"))?;
    let now = read_code(ram, &paging(&sregs, &regs, None), regs.rip);
    let compared = now.len().min(reported.len());
    Ok(compared > 0 && now.get(..compared) != reported.get(..compared))
}

/// What completing a refused instruction does: RIP moves `advance` bytes (0 at a fault), then
/// `raise` is raised, if any.
struct Completion {
    name: &'static str,
    advance: u64,
    raise: Option<Raise>,
}

/// An exception to raise: vector, error code, and for #PF the faulting address for CR2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Raise {
    vector: u8,
    error_code: Option<u32>,
    cr2: Option<u64>,
}

const INVALID_OPCODE_VECTOR: u8 = 6;
const STACK_FAULT_VECTOR: u8 = 12;
const GENERAL_PROTECTION_VECTOR: u8 = 13;
const PAGE_FAULT_VECTOR: u8 = 14;

/// 32-bit words of the XSAVE image (`kvm_xsave::region`): FCW and FSW, MXCSR and MXCSR_MASK
/// in the legacy region; XSTATE_BV in the header at byte 512.
const XSAVE_FCW_FSW: usize = 0;
const XSAVE_MXCSR: usize = 6;
const XSAVE_MXCSR_MASK: usize = 7;
const XSAVE_XSTATE_BV: usize = 128;
const XFEATURE_SSE: u32 = 1 << 1;
/// The MXCSR bits a CPU that reports MXCSR_MASK as 0 supports.
const DEFAULT_MXCSR_MASK: u32 = 0xffbf;

impl Raise {
    fn exception(vector: u8, error_code: Option<u32>) -> Self {
        Raise {
            vector,
            error_code,
            cr2: None,
        }
    }

    fn page_fault(error_code: u32, address: u64) -> Self {
        Raise {
            vector: PAGE_FAULT_VECTOR,
            error_code: Some(error_code),
            cr2: Some(address),
        }
    }
}

/// `ldmxcsr m32` or `stmxcsr m32`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MxcsrInstruction {
    pub(super) store: bool,
    /// The operand's linear address (a segment base included).
    pub(super) address: u64,
    /// The last segment override, if any.
    segment: Option<u8>,
    /// Whether the base register is RSP or RBP, which makes the operand's segment SS by
    /// default.
    stack_base: bool,
    pub(super) length: usize,
}

impl MxcsrInstruction {
    /// Whether the operand is a stack reference, which makes a non-canonical address #SS(0)
    /// rather than #GP(0). Vendors differ on whether a CS, DS, ES or SS override, which
    /// changes no address in 64-bit mode, changes that: on Intel's CPUs the segment is the
    /// override's (as the SDM has it and Bochs models it); an AMD EPYC raises #SS for an
    /// operand based on RSP or RBP whatever those overrides say, and #GP for any other even
    /// with SS. FS and GS make it no stack reference on either.
    fn stack(&self, amd: bool) -> bool {
        match self.segment {
            Some(FS_PREFIX | GS_PREFIX) => false,
            Some(override_) if !amd => override_ == SS_PREFIX,
            _ => self.stack_base,
        }
    }

    fn name(&self) -> &'static str {
        if self.store {
            "stmxcsr"
        } else {
            "ldmxcsr"
        }
    }
}

/// What the bytes at RIP are, as far as `ldmxcsr`/`stmxcsr` go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MxcsrDecode {
    /// One of them, to carry out.
    Instruction(MxcsrInstruction),
    /// An encoding the CPU rejects before touching memory: a 66, F2, F3 or LOCK prefix (#UD),
    /// or more than 15 bytes (#GP(0)).
    Invalid(&'static str, Raise),
}

/// Why bytes do not decode.
enum NotDecoded {
    /// The instruction goes on past 15 bytes.
    TooLong,
    /// It goes on past the bytes that could be read.
    Short,
    /// It is something else.
    Other,
}

/// Legacy prefixes, by what they do to `0F AE /2` and `/3`: these four make it no instruction
/// (the SDM's "NP" encodings; an AMD EPYC raises #UD for each at CPL3)...
const UD_PREFIXES: [u8; 4] = [0x66, 0xf2, 0xf3, 0xf0];
/// ... segment overrides: only FS and GS add a base in 64-bit mode ...
const SEGMENT_PREFIXES: [u8; 6] = [0x26, 0x2e, 0x36, 0x3e, 0x64, 0x65];
const SS_PREFIX: u8 = 0x36;
const FS_PREFIX: u8 = 0x64;
const GS_PREFIX: u8 = 0x65;
/// ... and 32-bit addressing.
const ADDRESS_SIZE_PREFIX: u8 = 0x67;

/// The `ldmxcsr`/`stmxcsr` at the start of `code` that the CPU carries out, its operand's
/// address computed from `regs` with flat segments (no FS or GS base); `None` for anything
/// else, encodings the CPU rejects included.
pub(super) fn mxcsr_instruction(code: &[u8], regs: &kvm_regs) -> Option<MxcsrInstruction> {
    match mxcsr_decode(code, regs, &kvm_bindings::kvm_sregs::default()) {
        Some(MxcsrDecode::Instruction(op)) => Some(op),
        _ => None,
    }
}

/// Decodes `[prefixes] [REX] 0F AE /2` or `/3` with a memory operand, computing its address
/// from `regs` and `sregs`; `None` for anything else, or where too few bytes could be read.
fn mxcsr_decode(
    code: &[u8],
    regs: &kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
) -> Option<MxcsrDecode> {
    match try_decode_mxcsr(code, regs, sregs) {
        Ok(decoded) => Some(decoded),
        Err(NotDecoded::TooLong) => Some(MxcsrDecode::Invalid(
            "overlong instruction",
            Raise::exception(GENERAL_PROTECTION_VECTOR, Some(0)),
        )),
        Err(NotDecoded::Short | NotDecoded::Other) => None,
    }
}

fn try_decode_mxcsr(
    code: &[u8],
    regs: &kvm_regs,
    sregs: &kvm_bindings::kvm_sregs,
) -> Result<MxcsrDecode, NotDecoded> {
    let gpr = |n: u8| match n {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    };
    let byte = |at: usize| -> Result<u8, NotDecoded> {
        if at >= MAX_INSTRUCTION_LENGTH {
            return Err(NotDecoded::TooLong);
        }
        code.get(at).copied().ok_or(NotDecoded::Short)
    };
    let disp32 = |at: usize| -> Result<u64, NotDecoded> {
        let bytes = [byte(at)?, byte(at + 1)?, byte(at + 2)?, byte(at + 3)?];
        Ok(i64::from(i32::from_le_bytes(bytes)) as u64)
    };
    let mut at = 0;
    let mut rex = 0u8;
    let mut segment = None;
    let mut address32 = false;
    let mut undefined = false;
    loop {
        let prefix = byte(at)?;
        match prefix {
            0x40..=0x4f => {
                rex = prefix;
                at += 1;
                continue;
            }
            p if UD_PREFIXES.contains(&p) => undefined = true,
            p if SEGMENT_PREFIXES.contains(&p) => segment = Some(p),
            ADDRESS_SIZE_PREFIX => address32 = true,
            _ => break,
        }
        // A REX prefix counts only right before the opcode.
        rex = 0;
        at += 1;
    }
    if byte(at)? != 0x0f || byte(at + 1)? != 0xae {
        return Err(NotDecoded::Other);
    }
    at += 2;
    let modrm = byte(at)?;
    at += 1;
    let (mode, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if mode == 3 || !(reg == 2 || reg == 3) {
        return Err(NotDecoded::Other);
    }
    let (rex_x, rex_b) = ((rex & 0x2) << 2, (rex & 0x1) << 3);
    let mut base = None;
    let mut rip_relative = false;
    let mut address = if rm == 4 {
        let sib = byte(at)?;
        at += 1;
        let index = ((sib >> 3) & 7) | rex_x;
        let scaled = if index == 4 {
            0
        } else {
            gpr(index) << (sib >> 6)
        };
        if sib & 7 == 5 && mode == 0 {
            let disp = disp32(at)?;
            at += 4;
            scaled.wrapping_add(disp)
        } else {
            let register = (sib & 7) | rex_b;
            base = Some(register);
            scaled.wrapping_add(gpr(register))
        }
    } else if rm == 5 && mode == 0 {
        rip_relative = true;
        let disp = disp32(at)?;
        at += 4;
        disp
    } else {
        let register = rm | rex_b;
        base = Some(register);
        gpr(register)
    };
    match mode {
        1 => {
            address = address.wrapping_add(i64::from(byte(at)? as i8) as u64);
            at += 1;
        }
        2 => {
            address = address.wrapping_add(disp32(at)?);
            at += 4;
        }
        _ => {}
    }
    if rip_relative {
        address = address.wrapping_add(regs.rip.wrapping_add(at as u64));
    }
    if address32 {
        address &= 0xffff_ffff;
    }
    address = address.wrapping_add(match segment {
        Some(FS_PREFIX) => sregs.fs.base,
        Some(GS_PREFIX) => sregs.gs.base,
        _ => 0,
    });
    let op = MxcsrInstruction {
        store: reg == 3,
        address,
        segment,
        stack_base: matches!(base, Some(4 | 5)),
        length: at,
    };
    if undefined {
        return Ok(MxcsrDecode::Invalid(
            op.name(),
            Raise::exception(INVALID_OPCODE_VECTOR, None),
        ));
    }
    Ok(MxcsrDecode::Instruction(op))
}

/// Does what `op` does: `Some(None)` when it ran, `Some(Some(raise))` when it raises an
/// exception instead, `None` when that cannot be done exactly (its operand is not in RAM, or
/// protection keys decide).
fn complete_mxcsr(
    vcpu: &VcpuFd,
    ram: &GuestRam,
    sregs: &kvm_bindings::kvm_sregs,
    regs: &kvm_regs,
    op: &MxcsrInstruction,
) -> Result<Option<Option<Raise>>, StateError> {
    const CR0_EM: u64 = 1 << 2;
    const OPERAND: usize = 4;
    let step = |step| move |source| StateError { step, source };
    if sregs.cr4 & CR4_OSFXSR == 0 || sregs.cr0 & CR0_EM != 0 {
        return Ok(Some(Some(Raise::exception(INVALID_OPCODE_VECTOR, None))));
    }
    if sregs.cr0 & CR0_TS != 0 {
        return Ok(Some(Some(Raise::exception(
            DEVICE_NOT_AVAILABLE_VECTOR,
            None,
        ))));
    }
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(step("KVM_GET_CPUID2"))?;
    let paging = paging(sregs, regs, Some(cpuid.as_slice()));
    let last = op.address.wrapping_add(OPERAND as u64 - 1);
    if !paging.is_canonical(op.address) || !paging.is_canonical(last) {
        let vector = if op.stack(is_amd(cpuid.as_slice())) {
            STACK_FAULT_VECTOR
        } else {
            GENERAL_PROTECTION_VECTOR
        };
        return Ok(Some(Some(Raise::exception(vector, Some(0)))));
    }
    // MXCSR is read and written in the XSAVE image: on a nested host KVM_GET_FPU reads it
    // as 0 and KVM_SET_FPU ignores it.
    let mut xsave = vcpu.get_xsave().map_err(step("KVM_GET_XSAVE"))?;
    if op.store {
        let mxcsr = xsave.region[XSAVE_MXCSR];
        match write_virtual(ram, &paging, op.address, &mxcsr.to_le_bytes()) {
            Outcome::Done(()) => {}
            Outcome::Fault(raise) => return Ok(Some(Some(raise))),
            Outcome::Unknown => return Ok(None),
        }
    } else {
        let mut word = [0u8; OPERAND];
        match read_virtual(ram, &paging, op.address, &mut word) {
            Outcome::Done(()) => {}
            Outcome::Fault(raise) => return Ok(Some(Some(raise))),
            Outcome::Unknown => return Ok(None),
        }
        let value = u32::from_le_bytes(word);
        // The bits MXCSR_MASK lacks are reserved; a mask of 0 means the original 0xffbf.
        let supported = match xsave.region[XSAVE_MXCSR_MASK] {
            0 => DEFAULT_MXCSR_MASK,
            mask => mask,
        };
        if value & !supported != 0 {
            return Ok(Some(Some(Raise::exception(
                GENERAL_PROTECTION_VECTOR,
                Some(0),
            ))));
        }
        xsave.region[XSAVE_MXCSR] = value;
        // With SSE state in its init configuration (XSTATE_BV bit 1 clear) KVM would not
        // take MXCSR from the image; the XMM registers there are the init state's zeros.
        xsave.region[XSAVE_XSTATE_BV] |= XFEATURE_SSE;
        // SAFETY: a 4 KiB kvm_xsave as KVM_GET_XSAVE returned it; no XSTATE feature that needs
        // more is ever enabled for a guest, so KVM_SET_XSAVE reads exactly that much.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(step("KVM_SET_XSAVE"))?;
    }
    Ok(Some(None))
}

/// Whether the guest's CPU is AMD's (or Hygon's, its licensee): CPUID leaf 0's vendor.
fn is_amd(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> bool {
    const AUTH: u32 = u32::from_le_bytes(*b"Auth"); // AuthenticAMD
    const HYGO: u32 = u32::from_le_bytes(*b"Hygo"); // HygonGenuine
    cpuid
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == AUTH || e.ebx == HYGO)
}

/// The vCPU's paging as a kernel-mode access sees it. Without the guest's CPUID (to look at
/// code bytes) the physical address width is taken as the widest and 1 GiB pages as there.
pub(super) fn paging(
    sregs: &kvm_bindings::kvm_sregs,
    regs: &kvm_regs,
    cpuid: Option<&[kvm_bindings::kvm_cpuid_entry2]>,
) -> Paging {
    const GIB_PAGES: u32 = 1 << 26;
    let leaf = |function: u32| cpuid?.iter().find(|e| e.function == function);
    let (physical_bits, gib_pages) = match cpuid {
        // Without leaf 0x8000_0008 the width is 36 bits.
        Some(_) => (
            leaf(0x8000_0008).map_or(36, |e| (e.eax & 0xff) as u8),
            leaf(0x8000_0001).is_some_and(|e| e.edx & GIB_PAGES != 0),
        ),
        None => (52, true),
    };
    Paging {
        cr3: sregs.cr3,
        cr0: sregs.cr0,
        cr4: sregs.cr4,
        efer: sregs.efer,
        rflags: regs.rflags,
        physical_bits,
        gib_pages,
    }
}

/// How a guest-virtual access turns out.
enum Outcome<T> {
    Done(T),
    /// The CPU raises this instead (a page fault).
    Fault(Raise),
    /// What the CPU does cannot be produced here: a byte is not in RAM, the access wraps
    /// around the top of the address space, or the walk cannot be told (see
    /// [`Translation::Unknown`]).
    Unknown,
}

/// The guest physical address of each piece of `address..address + len` (guest virtual),
/// one per page, all in RAM; `set_flags` as the CPU sets accessed and dirty flags (else
/// nothing is changed). The first page that faults decides the fault, with CR2 at its first
/// byte of the access.
fn translate_range(
    ram: &GuestRam,
    paging: &Paging,
    address: u64,
    len: usize,
    access: Access,
    set_flags: bool,
) -> Outcome<Vec<(u64, usize)>> {
    let mut pieces = Vec::new();
    let mut done = 0usize;
    while done < len {
        let at = address.wrapping_add(done as u64);
        if done > 0 && at < address {
            return Outcome::Unknown;
        }
        let n = (0x1000 - (at & 0xfff) as usize).min(len - done);
        let translation = if set_flags {
            paging.translate(ram, at, access)
        } else {
            paging.check(ram, at, access)
        };
        match translation {
            Translation::Physical(physical) if ram.contains(physical, n as u64) => {
                pieces.push((physical, n));
            }
            Translation::Physical(_) | Translation::Unknown => return Outcome::Unknown,
            Translation::PageFault(error_code) => {
                return Outcome::Fault(Raise::page_fault(error_code, at));
            }
        }
        done += n;
    }
    Outcome::Done(pieces)
}

/// Up to [`MAX_INSTRUCTION_LENGTH`] bytes of code at guest virtual `rip`: as many as are
/// mapped to RAM before the first page that is not (an instruction may end just before it).
pub(super) fn read_code(ram: &GuestRam, paging: &Paging, rip: u64) -> Vec<u8> {
    let mut code = [0u8; MAX_INSTRUCTION_LENGTH];
    let mut have = 0;
    while let Some(rest) = code.get_mut(have..).filter(|rest| !rest.is_empty()) {
        let at = rip.wrapping_add(have as u64);
        let n = (0x1000 - (at & 0xfff) as usize).min(rest.len());
        let Some(piece) = rest.get_mut(..n) else {
            break;
        };
        match translate_range(ram, paging, at, n, Access::Peek, false) {
            Outcome::Done(pieces) if read_pieces(ram, &pieces, piece) => have += n,
            _ => break,
        }
    }
    code.get(..have).unwrap_or_default().to_vec()
}

/// Fills `buf` with the bytes at guest virtual `address`, looked at as they are (no permission
/// checked, no flag set): whether all of them are in RAM and mapped.
pub(super) fn peek_virtual(ram: &GuestRam, paging: &Paging, address: u64, buf: &mut [u8]) -> bool {
    match translate_range(ram, paging, address, buf.len(), Access::Peek, false) {
        Outcome::Done(pieces) => read_pieces(ram, &pieces, buf),
        Outcome::Fault(_) | Outcome::Unknown => false,
    }
}

/// Fills `buf` from `pieces` (physical address, length), in order; whether every read worked.
fn read_pieces(ram: &GuestRam, pieces: &[(u64, usize)], buf: &mut [u8]) -> bool {
    let mut rest = buf;
    for &(physical, n) in pieces {
        let Some((piece, tail)) = rest.split_at_mut_checked(n) else {
            return false;
        };
        if ram.read(physical, piece).is_err() {
            return false;
        }
        rest = tail;
    }
    rest.is_empty()
}

/// Reads `buf.len()` bytes at guest virtual `address` as a kernel-mode data read, across
/// pages if they straddle one.
fn read_virtual(ram: &GuestRam, paging: &Paging, address: u64, buf: &mut [u8]) -> Outcome<()> {
    match translate_range(ram, paging, address, buf.len(), Access::Read, true) {
        Outcome::Done(pieces) if read_pieces(ram, &pieces, buf) => Outcome::Done(()),
        Outcome::Done(_) | Outcome::Unknown => Outcome::Unknown,
        Outcome::Fault(raise) => Outcome::Fault(raise),
    }
}

/// Writes `data` at guest virtual `address` as a kernel-mode data write, across pages if it
/// straddles one. Every page is checked before any flag is set or byte written, so a fault on
/// the second page leaves the first untouched, as on the CPU.
fn write_virtual(ram: &GuestRam, paging: &Paging, address: u64, data: &[u8]) -> Outcome<()> {
    if let Outcome::Fault(raise) =
        translate_range(ram, paging, address, data.len(), Access::Write, false)
    {
        return Outcome::Fault(raise);
    }
    let pieces = match translate_range(ram, paging, address, data.len(), Access::Write, true) {
        Outcome::Done(pieces) => pieces,
        Outcome::Fault(raise) => return Outcome::Fault(raise),
        Outcome::Unknown => return Outcome::Unknown,
    };
    let mut rest = data;
    for (physical, n) in pieces {
        let Some((piece, tail)) = rest.split_at_checked(n) else {
            return Outcome::Unknown;
        };
        if ram.write(physical, piece).is_err() {
            return Outcome::Unknown;
        }
        rest = tail;
    }
    Outcome::Done(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mxcsr_operands_decode_as_the_cpu_reads_them() {
        let regs = kvm_regs {
            rsp: 0x1000,
            r12: 0x2000,
            rip: 0x5000,
            ..Default::default()
        };
        // ldmxcsr 0x4(%rsp): Linux's kernel_fpu_begin.
        let op = mxcsr_instruction(&[0x0f, 0xae, 0x54, 0x24, 0x04], &regs).unwrap();
        assert_eq!((op.store, op.address, op.length), (false, 0x1004, 5));
        // stmxcsr -0x10(%r12)
        let op = mxcsr_instruction(&[0x41, 0x0f, 0xae, 0x5c, 0x24, 0xf0], &regs).unwrap();
        assert_eq!((op.store, op.address, op.length), (true, 0x1ff0, 6));
        // ldmxcsr 0x10(%rip)
        let op = mxcsr_instruction(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0], &regs).unwrap();
        assert_eq!(op.address, 0x5000 + 7 + 0x10);
        // xrstor is not ldmxcsr.
        assert!(mxcsr_instruction(&[0x48, 0x0f, 0xae, 0x2f], &regs).is_none());
    }

    fn decode(code: &[u8], regs: &kvm_regs, sregs: &kvm_bindings::kvm_sregs) -> MxcsrDecode {
        mxcsr_decode(code, regs, sregs).unwrap_or_else(|| panic!("{code:02x?} did not decode"))
    }

    fn instruction(
        code: &[u8],
        regs: &kvm_regs,
        sregs: &kvm_bindings::kvm_sregs,
    ) -> MxcsrInstruction {
        match decode(code, regs, sregs) {
            MxcsrDecode::Instruction(op) => op,
            other => panic!("{code:02x?} decoded as {other:?}"),
        }
    }

    #[test]
    fn mxcsr_prefixes_decode_as_the_cpu_takes_them() {
        let regs = kvm_regs {
            rdi: 0xdead_beef_0000_1234,
            rbp: 0x7000,
            r13: 0x9000,
            rip: 0xffff_fffc,
            ..Default::default()
        };
        let mut sregs = kvm_bindings::kvm_sregs::default();
        sregs.fs.base = 0x10_0000;
        sregs.gs.base = 0x20_0000;
        // CS, DS, ES and SS add nothing. A stack reference: on AMD by its base register
        // alone, on Intel by the override.
        for prefix in [0x26, 0x2e, 0x36, 0x3e] {
            let ss = prefix == 0x36;
            let op = instruction(&[prefix, 0x0f, 0xae, 0x17], &regs, &sregs);
            assert_eq!((op.address, op.length), (regs.rdi, 4));
            assert_eq!((op.stack(true), op.stack(false)), (false, ss));
            let op = instruction(&[prefix, 0x0f, 0xae, 0x55, 0x08], &regs, &sregs);
            assert_eq!(op.address, 0x7008);
            assert_eq!((op.stack(true), op.stack(false)), (true, ss));
        }
        let op = instruction(&[0x0f, 0xae, 0x55, 0x08], &regs, &sregs);
        assert_eq!((op.stack(true), op.stack(false)), (true, true));
        // FS and GS add their base, and make it no stack reference.
        let op = instruction(&[0x64, 0x0f, 0xae, 0x55, 0x08], &regs, &sregs);
        assert_eq!(op.address, 0x10_7008);
        assert_eq!((op.stack(true), op.stack(false)), (false, false));
        let op = instruction(&[0x65, 0x0f, 0xae, 0x1f], &regs, &sregs);
        assert_eq!((op.store, op.address), (true, regs.rdi + 0x20_0000));
        // The last of two overrides counts.
        let op = instruction(&[0x64, 0x65, 0x0f, 0xae, 0x17], &regs, &sregs);
        assert_eq!(op.address, regs.rdi + 0x20_0000);
        // R13 is not RBP, nor R12 RSP.
        let op = instruction(&[0x41, 0x0f, 0xae, 0x55, 0x00], &regs, &sregs);
        assert_eq!(
            (op.address, op.stack(true), op.stack(false)),
            (0x9000, false, false)
        );
        let op = instruction(&[0x0f, 0xae, 0x14, 0x24], &regs, &sregs);
        assert!(
            op.stack(true) && op.stack(false),
            "(%rsp) is a stack reference"
        );
        // 32-bit addressing: the register's low half, and EIP-relative wraps at 4 GiB.
        let op = instruction(&[0x67, 0x0f, 0xae, 0x17], &regs, &sregs);
        assert_eq!(op.address, 0x1234);
        let op = instruction(&[0x67, 0x0f, 0xae, 0x15, 0x10, 0, 0, 0], &regs, &sregs);
        assert_eq!((op.address, op.length), (0x14, 8));
        let op = instruction(&[0x67, 0x64, 0x0f, 0xae, 0x17], &regs, &sregs);
        assert_eq!(
            op.address, 0x10_1234,
            "the base is added to the 32-bit address"
        );
        // A REX prefix counts only right before the opcode.
        let op = instruction(&[0x41, 0x3e, 0x0f, 0xae, 0x10], &regs, &sregs);
        assert_eq!(op.address, regs.rax);
        let op = instruction(&[0x3e, 0x41, 0x0f, 0xae, 0x10], &regs, &sregs);
        assert_eq!(op.address, regs.r8);
    }

    #[test]
    fn mxcsr_encodings_the_cpu_rejects_raise_what_it_raises() {
        let regs = kvm_regs::default();
        let sregs = kvm_bindings::kvm_sregs::default();
        let ud = Raise::exception(INVALID_OPCODE_VECTOR, None);
        let gp = Raise::exception(GENERAL_PROTECTION_VECTOR, Some(0));
        for code in [
            &[0x66, 0x0f, 0xae, 0x17][..],
            &[0xf2, 0x0f, 0xae, 0x17],
            &[0xf3, 0x0f, 0xae, 0x1f],
            &[0xf0, 0x0f, 0xae, 0x17],
            &[0x48, 0x66, 0x0f, 0xae, 0x17],
            &[0x66, 0x48, 0x0f, 0xae, 0x17],
        ] {
            assert_eq!(
                decode(code, &regs, &sregs),
                MxcsrDecode::Invalid(
                    if code.contains(&0x1f) {
                        "stmxcsr"
                    } else {
                        "ldmxcsr"
                    },
                    ud
                )
            );
        }
        // 15 bytes is the most an instruction may have; past that it is #GP(0), whatever
        // follows, even if that could not be read.
        let mut code = vec![0x3e; 12];
        code.extend([0x0f, 0xae, 0x17]);
        assert_eq!(instruction(&code, &regs, &sregs).length, 15);
        code.insert(0, 0x2e);
        assert_eq!(
            decode(&code[..15], &regs, &sregs),
            MxcsrDecode::Invalid("overlong instruction", gp)
        );
        assert_eq!(
            decode(&[0x3e; 15], &regs, &sregs),
            MxcsrDecode::Invalid("overlong instruction", gp)
        );
        // Too few bytes, or something else: nothing.
        for code in [
            &[][..],
            &[0x3e; 14],
            &[0x0f, 0xae],
            &[0x0f, 0xae, 0x14],
            &[0x0f, 0xae, 0x15, 0x10, 0],
            &[0x0f, 0xae, 0xd0],
            &[0x0f, 0xae, 0x2f],
            &[0xc5, 0xf8, 0xae, 0x17],
        ] {
            assert_eq!(mxcsr_decode(code, &regs, &sregs), None, "{code:02x?}");
        }
    }

    #[test]
    fn mxcsr_operands_wrap_as_the_cpu_wraps_them() {
        let regs = kvm_regs {
            rax: u64::MAX - 1,
            rip: u64::MAX - 6,
            ..Default::default()
        };
        let sregs = kvm_bindings::kvm_sregs::default();
        let op = instruction(&[0x0f, 0xae, 0x15, 0x10, 0, 0, 0], &regs, &sregs);
        assert_eq!((op.address, op.length), (0x10, 7));
        let op = instruction(&[0x0f, 0xae, 0x50, 0x08], &regs, &sregs);
        assert_eq!(op.address, 6);
    }

    /// Page tables in `ram` for the access tests: virtual 0x40_0000 + i * 4 KiB is
    /// `frames[i]` (0: not present), and virtual 0x60_0000 the 2 MiB page at `big`.
    fn paging_over(ram: &GuestRam, frames: [u64; 4], read_only: usize, big: u64) -> Paging {
        const TABLE: u64 = 0x23;
        const PAGE: u64 = 0x63;
        let entry = |at: u64, value: u64| ram.write(at, &value.to_le_bytes()).unwrap();
        entry(0x1000, 0x2000 | TABLE);
        entry(0x2000, 0x3000 | TABLE);
        entry(0x3000 + 2 * 8, 0x4000 | TABLE);
        entry(0x3000 + 3 * 8, big | PAGE | 0x80);
        for (i, frame) in frames.into_iter().enumerate() {
            if frame != 0 {
                let writable = if i == read_only { 0 } else { 2 };
                entry(0x4000 + 8 * i as u64, frame | (PAGE & !2) | writable);
            }
        }
        Paging {
            cr3: 0x1000,
            cr0: 1 << 16,
            cr4: 0,
            efer: 1 << 11,
            rflags: 2,
            physical_bits: 46,
            gib_pages: true,
        }
    }

    #[test]
    fn kernel_accesses_straddle_pages_and_fault_where_the_cpu_does() {
        let ram = GuestRam::new(8 << 20).unwrap();
        // Pages 0 and 1 of unrelated frames, 2 not present, 3 read-only.
        let paging = paging_over(&ram, [0x30_0000, 0x10_0000, 0, 0x20_0000], 3, 0x40_0000);
        ram.write(0x30_0ffe, &[1, 2]).unwrap();
        ram.write(0x10_0000, &[3, 4]).unwrap();
        let mut word = [0u8; 4];
        assert!(matches!(
            read_virtual(&ram, &paging, 0x40_0ffe, &mut word),
            Outcome::Done(())
        ));
        assert_eq!(word, [1, 2, 3, 4]);
        assert!(matches!(
            write_virtual(&ram, &paging, 0x40_0ffe, &[9, 8, 7, 6]),
            Outcome::Done(())
        ));
        let mut back = [0u8; 2];
        ram.read(0x10_0000, &mut back).unwrap();
        assert_eq!(back, [7, 6]);
        // Into the page that is not there: #PF at its first byte, and nothing written on the
        // page before it.
        let fault = |error_code, at| Raise::page_fault(error_code, at);
        ram.write(0x10_0ffe, &[0x5a, 0x5a]).unwrap();
        match write_virtual(&ram, &paging, 0x40_1ffe, &[1, 1, 1, 1]) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(2, 0x40_2000)),
            _ => panic!("no fault"),
        }
        ram.read(0x10_0ffe, &mut back).unwrap();
        assert_eq!(back, [0x5a, 0x5a]);
        match read_virtual(&ram, &paging, 0x40_2010, &mut word) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(0, 0x40_2010)),
            _ => panic!("no fault"),
        }
        // A read-only page: read, not written (CR0.WP).
        assert!(matches!(
            read_virtual(&ram, &paging, 0x40_3000, &mut word),
            Outcome::Done(())
        ));
        match write_virtual(&ram, &paging, 0x40_3000, &word) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(3, 0x40_3000)),
            _ => panic!("no fault"),
        }
        // Code: the bytes before the page that is not there.
        ram.write(0x10_0ffd, &[0x0f, 0xae, 0x17]).unwrap();
        assert_eq!(read_code(&ram, &paging, 0x40_1ffd), vec![0x0f, 0xae, 0x17]);
        assert_eq!(read_code(&ram, &paging, 0x40_2000), Vec::<u8>::new());
        assert_eq!(read_code(&ram, &paging, 0x40_0ff8).len(), 15);
        // The top of the address space is not mapped: #PF at the operand's first byte.
        match read_virtual(&ram, &paging, u64::MAX - 1, &mut word) {
            Outcome::Fault(raise) => assert_eq!(raise, fault(0, u64::MAX - 1)),
            _ => panic!("no fault"),
        }
    }

    #[test]
    fn kernel_accesses_outside_ram_are_not_guessed_and_ram_above_4_gib_is_ram() {
        // RAM past 3.25 GiB continues at 4 GiB: its physical addresses are above the size.
        let size = crate::layout::MMIO_GAP_START + (2 << 20);
        let ram = GuestRam::new(size).unwrap();
        let paging = paging_over(&ram, [0xd000_0000, 0x1_0000_0000, 0, 0], 4, 0x1_0000_0000);
        let mut word = [0u8; 4];
        // MMIO: what a device would answer is not known here.
        assert!(matches!(
            read_virtual(&ram, &paging, 0x40_0000, &mut word),
            Outcome::Unknown
        ));
        assert!(matches!(
            write_virtual(&ram, &paging, 0x40_0ffe, &word),
            Outcome::Unknown
        ));
        // High RAM, through a 4 KiB and a 2 MiB page.
        assert!(matches!(
            write_virtual(&ram, &paging, 0x40_1000, &[1, 2, 3, 4]),
            Outcome::Done(())
        ));
        assert!(matches!(
            read_virtual(&ram, &paging, 0x60_0000, &mut word),
            Outcome::Done(())
        ));
        assert_eq!(word, [1, 2, 3, 4]);
    }
}
