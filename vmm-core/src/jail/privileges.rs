//! What root may still do: the capabilities each [`ThreadKind`] keeps. A thread gives up
//! every other one when it enters its kind ([`super::enter`]); the supervisor thread, which
//! enters first, also empties the capability bounding set of all but its own, clears the
//! ambient set and sets `no_new_privs`, so that nothing the process could still run would
//! gain a capability back. Capabilities belong to a thread in Linux and a new thread starts
//! with its parent's, so a kind keeps what the kinds it starts need ([`ThreadKind::starts`]).
//!
//! A process that does not run as root has nothing to give up: each thread keeps what it
//! has of its kind's set, usually nothing. The supervisor keeps `CAP_NET_ADMIN` only until
//! the guests' TAPs are open ([`taps_opened`]): a standby process opens them when it takes
//! its guest over, later than start-up. docs/security.md says why each capability is kept.
//! This module runs on whichever thread enters or calls it.

use caps::errors::CapsError;
use caps::{CapSet, Capability, CapsHashSet};

use super::ThreadKind;

/// Why a thread's capabilities could not be narrowed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// Reading or writing one of the thread's capability sets failed.
    #[error("cannot narrow the {set:?} capability set")]
    Set {
        set: CapSet,
        #[source]
        source: CapsError,
    },
    /// `PR_SET_NO_NEW_PRIVS` was refused.
    #[error("cannot set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
}

/// The capabilities a thread of `kind` needs itself, with why (docs/security.md lists them).
pub fn own(kind: ThreadKind) -> Vec<Capability> {
    // Files named at run time (snapshots, dumps, journals, restore sources, images and
    // journals re-opened by a restarted guest) may belong to another user.
    const FILES: [Capability; 2] = [
        Capability::CAP_DAC_OVERRIDE,
        Capability::CAP_DAC_READ_SEARCH,
    ];
    let mut own = match kind {
        // A parked vCPU thread raises its priority to answer its owner at once.
        ThreadKind::Vcpu => vec![Capability::CAP_SYS_NICE],
        ThreadKind::DeviceIo | ThreadKind::Control => Vec::new(),
        // The peer port of a remote guest is bound when the guest is armed, and its address
        // may be a privileged port.
        ThreadKind::Link => [&FILES[..], &[Capability::CAP_NET_BIND_SERVICE]].concat(),
        ThreadKind::Background => FILES.to_vec(),
        // The guest loop raises its own priority too.
        ThreadKind::GuestLoop => [&FILES[..], &[Capability::CAP_SYS_NICE]].concat(),
        // The TAPs, until they are open.
        ThreadKind::Supervisor => [&FILES[..], &[Capability::CAP_NET_ADMIN]].concat(),
    };
    // Without /dev/userfaultfd, a write trap is opened by the system call, which may need
    // CAP_SYS_PTRACE to see the faults KVM takes.
    if matches!(
        kind,
        ThreadKind::Background | ThreadKind::GuestLoop | ThreadKind::Supervisor
    ) && !std::path::Path::new("/dev/userfaultfd").exists()
    {
        own.push(Capability::CAP_SYS_PTRACE);
    }
    own
}

/// Every capability a thread of `kind` keeps: its own and those of the threads it starts.
pub fn kept(kind: ThreadKind) -> CapsHashSet {
    let mut caps: CapsHashSet = own(kind).into_iter().collect();
    for &child in kind.starts() {
        if child != kind {
            caps.extend(kept(child));
        }
    }
    caps
}

/// Narrows the calling thread's capabilities to what `kind` keeps (of what it has), and,
/// for the supervisor, the process's bounding and ambient sets and `no_new_privs` too.
pub fn restrict(kind: ThreadKind) -> Result<(), PrivilegeError> {
    let keep = kept(kind);
    if kind == ThreadKind::Supervisor {
        // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integers and touches no memory.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(PrivilegeError::NoNewPrivs(std::io::Error::last_os_error()));
        }
        // Dropping from the bounding set needs CAP_SETPCAP, so it goes first.
        if current(CapSet::Effective)?.contains(&Capability::CAP_SETPCAP) {
            for cap in current(CapSet::Bounding)?.difference(&keep) {
                caps::drop(None, CapSet::Bounding, *cap).map_err(|source| PrivilegeError::Set {
                    set: CapSet::Bounding,
                    source,
                })?;
            }
        }
        // Kernels before 4.3 have no ambient set, and so nothing to clear.
        let _ = caps::clear(None, CapSet::Ambient);
    }
    narrow(&keep)
}

/// Gives up `CAP_NET_ADMIN` on the calling (supervisor) thread once the guests' TAPs are
/// open: no later step creates or attaches one.
pub fn taps_opened() -> Result<(), PrivilegeError> {
    let mut keep = current(CapSet::Permitted)?;
    keep.remove(&Capability::CAP_NET_ADMIN);
    narrow(&keep)
}

/// Sets the calling thread's effective and permitted sets to `keep` (as far as it has
/// them), and empties its inheritable set.
fn narrow(keep: &CapsHashSet) -> Result<(), PrivilegeError> {
    let permitted = current(CapSet::Permitted)?;
    let keep: CapsHashSet = permitted.intersection(keep).copied().collect();
    if keep == permitted && current(CapSet::Inheritable)?.is_empty() {
        return Ok(());
    }
    let nothing = CapsHashSet::new();
    // Effective first: it may never hold more than the permitted set.
    for (set, value) in [
        (CapSet::Effective, &keep),
        (CapSet::Permitted, &keep),
        (CapSet::Inheritable, &nothing),
    ] {
        caps::set(None, set, value).map_err(|source| PrivilegeError::Set { set, source })?;
    }
    Ok(())
}

/// The calling thread's `set`.
fn current(set: CapSet) -> Result<CapsHashSet, PrivilegeError> {
    caps::read(None, set).map_err(|source| PrivilegeError::Set { set, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_a_guest_or_client_reaches_keep_no_file_or_network_power() {
        for kind in [ThreadKind::Vcpu, ThreadKind::DeviceIo, ThreadKind::Control] {
            let kept = kept(kind);
            assert!(
                kept.iter().all(|&c| c == Capability::CAP_SYS_NICE),
                "{kind:?} keeps {kept:?}"
            );
        }
    }

    #[test]
    fn no_kind_keeps_what_would_escape_the_jail() {
        for kind in ThreadKind::ALL {
            let kept = kept(kind);
            for cap in [
                Capability::CAP_SYS_ADMIN,
                Capability::CAP_SYS_MODULE,
                Capability::CAP_SYS_RAWIO,
                Capability::CAP_SETUID,
                Capability::CAP_SETGID,
                Capability::CAP_SETPCAP,
                Capability::CAP_SYS_BOOT,
                Capability::CAP_BPF,
                Capability::CAP_MKNOD,
                Capability::CAP_KILL,
            ] {
                assert!(!kept.contains(&cap), "{kind:?} keeps {cap}");
            }
        }
    }

    #[test]
    fn a_kind_keeps_what_the_threads_it_starts_need() {
        for kind in ThreadKind::ALL {
            for &child in kind.starts() {
                assert!(kept(child).is_subset(&kept(kind)), "{kind:?} / {child:?}");
            }
        }
    }

    #[test]
    fn a_narrowed_thread_has_no_more_than_its_kind_keeps() {
        let left = std::thread::spawn(|| {
            restrict(ThreadKind::Control).expect("narrowing is allowed to any thread");
            (current(CapSet::Effective), current(CapSet::Permitted))
        })
        .join()
        .expect("thread ends normally");
        assert!(left.0.expect("readable").is_empty());
        assert!(left.1.expect("readable").is_empty());
    }
}
