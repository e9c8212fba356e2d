//! Crash dumps: a failed machine's registers and memory as an ELF core file, which `gdb`
//! (and `crash`, for Linux guests) can open, in the layout QEMU's `dump-guest-memory` uses:
//! one `NT_PRSTATUS` note per vCPU and one `PT_LOAD` segment per RAM region, at the region's
//! guest physical address.
//!
//! Runs on the supervisor thread, while the failed machine is fenced.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use vmm_core::{GuestRam, VmSnapshot};

const ELF_HEADER_SIZE: usize = 64;
const PROGRAM_HEADER_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const PF_RWX: u32 = 7;
const ET_CORE: u16 = 4;
const EM_X86_64: u16 = 62;
const NT_PRSTATUS: u32 = 1;
/// `struct elf_prstatus` on x86_64: 112 bytes of process information, 27 registers, fpvalid.
const PRSTATUS_SIZE: usize = 336;
const PRSTATUS_REGS_OFFSET: usize = 112;
const PRSTATUS_PID_OFFSET: usize = 32;
const PAGE: u64 = 4096;

fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
    let pad4 = |n: usize| (n + 3) & !3;
    let mut out = Vec::with_capacity(12 + pad4(name.len() + 1) + pad4(desc.len()));
    out.extend_from_slice(&((name.len() + 1) as u32).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name);
    out.resize(12 + pad4(name.len() + 1), 0);
    out.extend_from_slice(desc);
    out.resize(out.len() + pad4(desc.len()) - desc.len(), 0);
    out
}

/// `NT_PRSTATUS` for one vCPU: registers in `user_regs_struct` order, "pid" = vCPU index + 1
/// (gdb shows each vCPU as a thread).
fn prstatus(index: usize, snapshot: &VmSnapshot) -> Vec<u8> {
    let state = &snapshot.vcpus[index];
    let (r, s) = (&state.regs, &state.sregs);
    let registers: [u64; 27] = [
        r.r15,
        r.r14,
        r.r13,
        r.r12,
        r.rbp,
        r.rbx,
        r.r11,
        r.r10,
        r.r9,
        r.r8,
        r.rax,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        u64::MAX, // orig_rax: not in a system call
        r.rip,
        u64::from(s.cs.selector),
        r.rflags,
        r.rsp,
        u64::from(s.ss.selector),
        s.fs.base,
        s.gs.base,
        u64::from(s.ds.selector),
        u64::from(s.es.selector),
        u64::from(s.fs.selector),
        u64::from(s.gs.selector),
    ];
    let mut desc = vec![0u8; PRSTATUS_SIZE];
    desc[PRSTATUS_PID_OFFSET..PRSTATUS_PID_OFFSET + 4]
        .copy_from_slice(&(index as u32 + 1).to_le_bytes());
    for (i, value) in registers.iter().enumerate() {
        let at = PRSTATUS_REGS_OFFSET + i * 8;
        desc[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }
    note(b"CORE", NT_PRSTATUS, &desc)
}

fn program_header(kind: u32, offset: u64, addr: u64, size: u64, align: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(PROGRAM_HEADER_SIZE);
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&PF_RWX.to_le_bytes());
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    h.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    h.extend_from_slice(&size.to_le_bytes()); // p_filesz
    h.extend_from_slice(&size.to_le_bytes()); // p_memsz
    h.extend_from_slice(&align.to_le_bytes());
    h
}

/// Writes the ELF core for `snapshot` and `ram` to `path`.
pub fn write_core(path: &Path, snapshot: &VmSnapshot, ram: &GuestRam) -> std::io::Result<()> {
    let notes: Vec<u8> = (0..snapshot.vcpus.len())
        .flat_map(|i| prstatus(i, snapshot))
        .collect();
    let regions = ram.regions();
    let phnum = 1 + regions.len();
    let headers_end = (ELF_HEADER_SIZE + phnum * PROGRAM_HEADER_SIZE + notes.len()) as u64;
    let first_load = headers_end.div_ceil(PAGE) * PAGE;

    let mut elf = Vec::with_capacity(ELF_HEADER_SIZE);
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\x00"); // 64-bit, little endian, version 1
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&ET_CORE.to_le_bytes());
    elf.extend_from_slice(&EM_X86_64.to_le_bytes());
    elf.extend_from_slice(&1u32.to_le_bytes()); // e_version
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    elf.extend_from_slice(&(ELF_HEADER_SIZE as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    elf.extend_from_slice(&(ELF_HEADER_SIZE as u16).to_le_bytes());
    elf.extend_from_slice(&(PROGRAM_HEADER_SIZE as u16).to_le_bytes());
    elf.extend_from_slice(&(phnum as u16).to_le_bytes());
    elf.extend_from_slice(&[0; 6]); // no section headers

    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(&elf)?;
    let notes_offset = (ELF_HEADER_SIZE + phnum * PROGRAM_HEADER_SIZE) as u64;
    out.write_all(&program_header(
        PT_NOTE,
        notes_offset,
        0,
        notes.len() as u64,
        4,
    ))?;
    let mut offset = first_load;
    for (start, len, _) in &regions {
        out.write_all(&program_header(PT_LOAD, offset, *start, *len, PAGE))?;
        offset += len;
    }
    out.write_all(&notes)?;
    out.write_all(&vec![0u8; (first_load - headers_end) as usize])?;
    let mut chunk = vec![0u8; 1 << 20];
    for (start, len, _) in regions {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            ram.read(start + done, &mut chunk[..n])
                .map_err(std::io::Error::other)?;
            out.write_all(&chunk[..n])?;
            done += n as u64;
        }
    }
    out.flush()
}
