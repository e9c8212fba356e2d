//! Finishing a 64-bit `syscall` the host left half done: recognising one in the frame of the
//! page fault it ends in, and the registers `syscall` would have left.
//!
//! On some hosts (a nested, page-table-based KVM) a `syscall` from guest user mode does
//! everything but the privilege change: RCX holds the return address, R11 the user's RFLAGS,
//! RFLAGS is masked by `SFMASK` and RIP is `LSTAR`, but CS and SS are still the user's. The
//! fetch at `LSTAR`, a supervisor page, then faults in user mode (#PF, error code 0x15, or
//! 0x5 without EFER.NXE), and the guest's #PF handler is entered with that fault's frame on
//! its kernel stack. [`half_done_syscall`] looks at that frame at the handler's first
//! instruction (`fault_trap` stops the vCPU there) and says what `syscall` would have
//! made RIP, RSP, RFLAGS, CS and SS; every other register already is what `syscall` leaves.
//!
//! Pure functions of the vCPU's registers and the frame, for the vCPU thread that applies
//! them; nothing here touches the vCPU.
//!
//! Why a guest gains nothing by planting the shape: the completion only ever gives what a
//! `syscall` would, and it requires a frame only a `syscall` produces. Its RFLAGS must be R11
//! masked by `SFMASK`, and `SFMASK` must clear IF: user mode cannot run with IF clear unless
//! the kernel gave it IOPL 3 (which also lets it set every other flag `SFMASK` covers), so
//! user code that jumps to `LSTAR` itself, with RCX and R11 of its choosing, is never taken
//! for a system call. The guest kernel, which can plant any frame, can enter its own
//! `LSTAR` at CPL0 anyway.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

/// `syscall`'s MSRs.
pub(super) const MSR_STAR: u32 = 0xc000_0081;
pub(super) const MSR_LSTAR: u32 = 0xc000_0082;
pub(super) const MSR_SFMASK: u32 = 0xc000_0084;
const EFER_SCE: u64 = 1 << 0;
const EFER_NXE: u64 = 1 << 11;
const RFLAGS_FIXED: u64 = 1 << 1;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_RF: u64 = 1 << 16;
/// #PF error code: present, user mode, instruction fetch.
const PF_PRESENT: u64 = 1 << 0;
const PF_USER: u64 = 1 << 2;
const PF_FETCH: u64 = 1 << 4;

/// An exception frame as the CPU pushes it in 64-bit mode, with an error code: what is at
/// the handler's RSP when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct FaultFrame {
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl FaultFrame {
    /// The number of bytes the frame takes on the stack.
    pub const SIZE: usize = 48;

    pub fn from_bytes(bytes: &[u8; Self::SIZE]) -> FaultFrame {
        let word = |n: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[8 * n..8 * n + 8]);
            u64::from_le_bytes(w)
        };
        FaultFrame {
            error_code: word(0),
            rip: word(1),
            cs: word(2),
            rflags: word(3),
            rsp: word(4),
            ss: word(5),
        }
    }
}

/// `syscall`'s MSRs as the guest set them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct SyscallMsrs {
    pub star: u64,
    pub lstar: u64,
    pub sfmask: u64,
}

/// What `syscall` would have left in the registers it changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct SyscallEntry {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cs: kvm_segment,
    pub ss: kvm_segment,
}

impl SyscallEntry {
    /// Puts the entry into `regs` and `sregs`; nothing else changes.
    pub fn apply(&self, regs: &mut kvm_regs, sregs: &mut kvm_sregs) {
        regs.rip = self.rip;
        regs.rsp = self.rsp;
        regs.rflags = self.rflags;
        sregs.cs = self.cs;
        sregs.ss = self.ss;
    }
}

/// Whether the page fault whose `frame` the guest's #PF handler is about to take, with the
/// vCPU's registers `regs` and `sregs` (at the handler) and `syscall`'s MSRs, is a `syscall`
/// the host left half done; if so, the entry `syscall` would have made.
///
/// It is one when: EFER.SCE is set; `SFMASK` clears IF; the fault is a user-mode instruction
/// fetch from a present page (error code 0x15, or 0x5 without EFER.NXE) at `LSTAR`, with CR2
/// at `LSTAR`; the frame's CS and SS are the 64-bit user segments `sysret` loads
/// (`STAR[63:48]` + 16 and + 8, RPL 3); and the frame's RFLAGS are R11 masked by `SFMASK`
/// (RF aside, which a fault sets in the frame and `syscall` clears).
pub(super) fn half_done_syscall(
    frame: &FaultFrame,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    msrs: &SyscallMsrs,
) -> Option<SyscallEntry> {
    if sregs.efer & EFER_SCE == 0 || msrs.sfmask & RFLAGS_IF == 0 {
        return None;
    }
    let fetch = if sregs.efer & EFER_NXE != 0 {
        PF_FETCH
    } else {
        0
    };
    if frame.error_code != PF_PRESENT | PF_USER | fetch {
        return None;
    }
    if frame.rip != msrs.lstar || sregs.cr2 != msrs.lstar {
        return None;
    }
    let user_base = (msrs.star >> 48) & 0xfffc;
    if frame.cs != (user_base + 16) | 3 || frame.ss != (user_base + 8) | 3 {
        return None;
    }
    let syscall_rflags = (regs.r11 & !msrs.sfmask & !RFLAGS_RF) | RFLAGS_FIXED;
    if frame.rflags & !RFLAGS_RF != syscall_rflags {
        return None;
    }
    let kernel_cs = (msrs.star >> 32) & 0xfffc;
    Some(SyscallEntry {
        rip: msrs.lstar,
        rsp: frame.rsp,
        rflags: syscall_rflags,
        cs: flat_segment(kernel_cs as u16, CODE_EXECUTE_READ_ACCESSED, true),
        ss: flat_segment(kernel_cs as u16 + 8, DATA_READ_WRITE_ACCESSED, false),
    })
}

const CODE_EXECUTE_READ_ACCESSED: u8 = 0xb;
const DATA_READ_WRITE_ACCESSED: u8 = 0x3;

/// The flat DPL0 segment `syscall` loads into CS (64-bit code) or SS (data), whatever the GDT
/// says: base 0, limit 4 GiB, present.
fn flat_segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's values: `__KERNEL_CS` 0x10, `__USER32_CS` 0x23, SFMASK TF|DF|IF|IOPL|AC|NT.
    const LINUX: SyscallMsrs = SyscallMsrs {
        star: (0x23 << 48) | (0x10 << 32),
        lstar: 0xffff_ffff_81c0_0080,
        sfmask: 0x4_7700,
    };

    /// A user process at RIP 0x40_1000 with RFLAGS 0x246 ran `syscall`, as the host leaves it.
    fn half_done() -> (FaultFrame, kvm_regs, kvm_sregs) {
        let frame = FaultFrame {
            error_code: 0x15,
            rip: LINUX.lstar,
            cs: 0x33,
            rflags: 0x1_0046,
            rsp: 0x7ffd_0000,
            ss: 0x2b,
        };
        let regs = kvm_regs {
            rcx: 0x40_1002,
            r11: 0x246,
            rip: 0xffff_ffff_81a0_0000,
            rsp: 0xffff_c900_0000_3f58,
            ..Default::default()
        };
        let sregs = kvm_sregs {
            efer: 0xd01,
            cr2: LINUX.lstar,
            ..Default::default()
        };
        (frame, regs, sregs)
    }

    #[test]
    fn a_half_done_syscall_enters_lstar_at_cpl0_as_syscall_would() {
        let (frame, regs, sregs) = half_done();
        let entry = half_done_syscall(&frame, &regs, &sregs, &LINUX).expect("a syscall");
        assert_eq!(entry.rip, LINUX.lstar);
        assert_eq!(
            entry.rsp, 0x7ffd_0000,
            "the user's stack: syscall keeps RSP"
        );
        assert_eq!(entry.rflags, 0x46, "R11 masked by SFMASK, RF clear");
        assert_eq!((entry.cs.selector, entry.cs.dpl, entry.cs.l), (0x10, 0, 1));
        assert_eq!((entry.ss.selector, entry.ss.dpl, entry.ss.db), (0x18, 0, 1));
        let (mut regs, mut sregs) = (regs, sregs);
        entry.apply(&mut regs, &mut sregs);
        assert_eq!(
            (regs.rcx, regs.r11),
            (0x40_1002, 0x246),
            "left as syscall left them"
        );
        // Without EFER.NXE the fetch bit is not in the error code.
        let (mut frame, regs, mut sregs) = half_done();
        sregs.efer &= !EFER_NXE;
        assert!(half_done_syscall(&frame, &regs, &sregs, &LINUX).is_none());
        frame.error_code = 0x5;
        assert!(half_done_syscall(&frame, &regs, &sregs, &LINUX).is_some());
    }

    #[test]
    fn user_code_that_jumps_to_lstar_itself_is_not_a_syscall() {
        // RFLAGS with IF set, as any user code without IOPL 3 has it: R11 may claim anything.
        let (mut frame, mut regs, sregs) = half_done();
        frame.rflags = 0x1_0246;
        regs.r11 = 0x3246; // IOPL 3, if it were believed
        assert!(half_done_syscall(&frame, &regs, &sregs, &LINUX).is_none());
        regs.r11 = 0x246;
        assert!(half_done_syscall(&frame, &regs, &sregs, &LINUX).is_none());
        // A kernel whose SFMASK leaves IF alone cannot be told from such a jump: never.
        let (frame, regs, sregs) = half_done();
        let lax = SyscallMsrs {
            sfmask: 0x4_7500,
            ..LINUX
        };
        assert!(half_done_syscall(&frame, &regs, &sregs, &lax).is_none());
    }

    #[test]
    fn other_faults_are_not_syscalls() {
        let check = |change: &dyn Fn(&mut FaultFrame, &mut kvm_regs, &mut kvm_sregs)| {
            let (mut frame, mut regs, mut sregs) = half_done();
            change(&mut frame, &mut regs, &mut sregs);
            half_done_syscall(&frame, &regs, &sregs, &LINUX)
        };
        assert!(check(&|_, _, _| {}).is_some());
        // A kernel-mode fault, a write, a not-present page.
        assert!(check(&|f, _, _| f.error_code = 0x11).is_none());
        assert!(check(&|f, _, _| f.error_code = 0x17).is_none());
        assert!(check(&|f, _, _| f.error_code = 0x14).is_none());
        // Elsewhere than LSTAR, or CR2 elsewhere.
        assert!(check(&|f, _, _| f.rip += 1).is_none());
        assert!(check(&|_, _, s| s.cr2 = 0x1000).is_none());
        // Not from 64-bit user code.
        assert!(check(&|f, _, _| f.cs = 0x23).is_none());
        assert!(check(&|f, _, _| f.cs = 0x10).is_none());
        assert!(check(&|f, _, _| f.ss = 0x18).is_none());
        // RFLAGS not what syscall leaves.
        assert!(check(&|_, r, _| r.r11 = 0x247).is_none());
        // syscall turned off.
        assert!(check(&|_, _, s| s.efer &= !EFER_SCE).is_none());
    }
}
