//! The process's `SIGSYS` handler: a thread that made a call its filter forbids writes, with
//! system calls alone (no allocation, no lock), one line naming itself and the call (with
//! the request, for an `ioctl`) to standard error, then kills the process with `SIGSYS`. It runs on the offending thread.

use std::sync::OnceLock;

/// Installs the handler, once per process; later calls return the first one's result.
pub fn install() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is valid (empty mask, no flags) before it is filled in.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action` is a valid sigaction whose handler is async-signal-safe (below).
        if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

/// Offset of `si_syscall` in a `SIGSYS` `siginfo_t` on x86-64: after `si_signo`, `si_errno`,
/// `si_code`, padding and `si_call_addr`.
const SI_SYSCALL_OFFSET: usize = 24;

/// The handler. Only system calls the filters let every thread make (`prctl`, `write`,
/// `rt_sigaction`, `rt_sigprocmask`, `getpid`, `gettid`, `tgkill`) and stack buffers.
extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `name`.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr(), 0, 0, 0) };
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    // SAFETY: the kernel hands a SIGSYS handler a full siginfo_t, si_syscall at this offset.
    let syscall = unsafe { *(info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>() };
    // A trapped call's arguments are still in the registers the kernel saved: the request
    // of an `ioctl` is its second, in RSI.
    let mut request_text = [0u8; 32];
    let request: &[u8] = if i64::from(syscall) == libc::SYS_ioctl && !context.is_null() {
        // SAFETY: an SA_SIGINFO handler's third argument is the interrupted ucontext_t.
        let rsi = unsafe {
            (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize]
        };
        ioctl_request(rsi as u64 & u64::from(u32::MAX), &mut request_text)
    } else {
        b""
    };

    let mut line = [0u8; 160];
    let mut len = 0;
    for part in [
        b"understudy: thread ".as_slice(),
        &name[..name_len],
        b" made system call ",
        decimal(syscall, &mut [0u8; 12]),
        request,
        b", which its seccomp filter forbids; killing the process\n",
    ] {
        let take = part.len().min(line.len() - len);
        line[len..len + take].copy_from_slice(&part[..take]);
        len += take;
    }
    // SAFETY: plain system calls on valid buffers. With the default action restored and
    // SIGSYS unblocked, tgkill ends the whole process with SIGSYS (it dumps core by default).
    unsafe {
        libc::write(libc::STDERR_FILENO, line.as_ptr().cast(), len);
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &default, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::gettid(),
            libc::SIGSYS,
        );
        // Not reached; should the signal be held somehow, end anyway.
        libc::_exit(128 + libc::SIGSYS);
    }
}

/// ` (ioctl request 0x…)`, the request in hexadecimal, in `buffer`.
fn ioctl_request(request: u64, buffer: &mut [u8; 32]) -> &[u8] {
    const PREFIX: &[u8] = b" (ioctl request 0x";
    buffer[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut len = PREFIX.len();
    let digits = (64 - request.leading_zeros()).div_ceil(4).max(1);
    for shift in (0..digits).rev() {
        buffer[len] = b"0123456789abcdef"[((request >> (shift * 4)) & 0xf) as usize];
        len += 1;
    }
    buffer[len] = b')';
    &buffer[..len + 1]
}

/// `value` in decimal, in `buffer`.
fn decimal(value: i32, buffer: &mut [u8; 12]) -> &[u8] {
    let negative = value < 0;
    let mut rest = value.unsigned_abs();
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if negative {
        start -= 1;
        buffer[start] = b'-';
    }
    &buffer[start..]
}

#[cfg(test)]
mod tests {
    use super::{decimal, ioctl_request};

    #[test]
    fn decimal_writes_numbers_as_text() {
        assert_eq!(decimal(0, &mut [0; 12]), b"0");
        assert_eq!(decimal(59, &mut [0; 12]), b"59");
        assert_eq!(decimal(i32::MIN, &mut [0; 12]), b"-2147483648");
    }

    #[test]
    fn ioctl_request_writes_the_request_in_hexadecimal() {
        assert_eq!(
            ioctl_request(0xc008_ae88, &mut [0; 32]),
            b" (ioctl request 0xc008ae88)"
        );
        assert_eq!(ioctl_request(0, &mut [0; 32]), b" (ioctl request 0x0)");
    }
}
