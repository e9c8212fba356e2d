//! `--restore`: which guests start from a snapshot instead of booting their kernel. Each
//! snapshot is named on the command line, matched to its guest, read and checked against the
//! guest's machine before any guest starts, so a snapshot that cannot be loaded stops the
//! run with nothing started. The format and the loading are `vmm_core::snapshot`'s.

use std::path::PathBuf;

use vmm_core::{Snapshot, SnapshotError};

use crate::config::{Environment, GuestConfig};

/// One `--restore [GUEST=]DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreArg {
    /// The guest, when named.
    pub guest: Option<String>,
    /// The snapshot's directory.
    pub dir: PathBuf,
}

impl std::fmt::Display for RestoreArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.guest {
            Some(guest) => write!(f, "{guest}={}", self.dir.display()),
            None => write!(f, "{}", self.dir.display()),
        }
    }
}

/// Whether `text` can be a guest's name (the environment file's rule).
fn is_guest_name(text: &str) -> bool {
    !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl std::str::FromStr for RestoreArg {
    type Err = String;

    /// `GUEST=DIR` when what comes before the first `=` can be a guest's name, else `DIR`
    /// (so a directory whose name has an `=` in it is written `./a=b`).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (guest, dir) = match text.split_once('=') {
            Some((guest, dir)) if is_guest_name(guest) => (Some(guest.to_owned()), dir),
            _ => (None, text),
        };
        if dir.is_empty() {
            return Err(format!("{text:?}: expected DIR or GUEST=DIR"));
        }
        Ok(RestoreArg {
            guest,
            dir: PathBuf::from(dir),
        })
    }
}

/// A `--restore` that cannot be carried out. Nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A bare directory, with more than one guest to restore it into.
    #[error("--restore {dir}: the environment has {guests} guests; say which: --restore GUEST={dir}", dir = .dir.display())]
    GuestNotNamed {
        /// The directory given.
        dir: PathBuf,
        /// How many guests there are.
        guests: usize,
    },
    /// A guest the environment does not have.
    #[error("--restore {arg}: no such guest; the guests are {known:?}")]
    UnknownGuest {
        /// The option as given.
        arg: RestoreArg,
        /// The guests there are.
        known: Vec<String>,
    },
    /// Two snapshots for one guest.
    #[error("--restore: guest {guest} is given more than one snapshot")]
    Twice {
        /// The guest.
        guest: String,
    },
    /// The snapshot is refused: missing, not a snapshot, corrupt, of another version, or
    /// not of the guest's shape.
    #[error("guest {guest}: cannot restore: {source}")]
    Refused {
        /// The guest.
        guest: String,
        /// Why.
        source: SnapshotError,
    },
}

/// For each guest of `env`, in order, the snapshot it starts from, if any: each of `args`
/// matched to its guest, then read and checked against the guest's machine.
pub fn load_snapshots(
    env: &Environment,
    args: &[RestoreArg],
) -> Result<Vec<Option<Snapshot>>, RestoreError> {
    // Every option is matched to its guest before any snapshot is read.
    let mut chosen: Vec<Option<&RestoreArg>> = vec![None; env.guest.len()];
    for arg in args {
        let index = match &arg.guest {
            Some(name) => env
                .guest
                .iter()
                .position(|g| &g.name == name)
                .ok_or_else(|| RestoreError::UnknownGuest {
                    arg: arg.clone(),
                    known: env.guest.iter().map(|g| g.name.clone()).collect(),
                })?,
            None if env.guest.len() == 1 => 0,
            None => {
                return Err(RestoreError::GuestNotNamed {
                    dir: arg.dir.clone(),
                    guests: env.guest.len(),
                })
            }
        };
        if chosen[index].replace(arg).is_some() {
            return Err(RestoreError::Twice {
                guest: env.guest[index].name.clone(),
            });
        }
    }
    env.guest
        .iter()
        .zip(chosen)
        .map(|(config, arg)| arg.map(|arg| load_for(config, arg)).transpose())
        .collect()
}

/// The snapshot of `arg`, read and checked against `config`'s machine.
fn load_for(config: &GuestConfig, arg: &RestoreArg) -> Result<Snapshot, RestoreError> {
    let refused = |source| RestoreError::Refused {
        guest: config.name.clone(),
        source,
    };
    let snapshot = Snapshot::load(&arg.dir).map_err(refused)?;
    snapshot
        .check_fits(
            &config.machine_spec(),
            config.disks.len(),
            config.nets.len(),
        )
        .map_err(refused)?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_name_before_the_equals_sign_names_the_guest() {
        let arg: RestoreArg = "web=/var/snap".parse().unwrap();
        assert_eq!(arg.guest.as_deref(), Some("web"));
        assert_eq!(arg.dir, PathBuf::from("/var/snap"));
        let arg: RestoreArg = "/var/snap".parse().unwrap();
        assert_eq!((arg.guest, arg.dir), (None, PathBuf::from("/var/snap")));
        let arg: RestoreArg = "./a=b".parse().unwrap();
        assert_eq!((arg.guest, arg.dir), (None, PathBuf::from("./a=b")));
        assert!("web=".parse::<RestoreArg>().is_err());
        assert!("".parse::<RestoreArg>().is_err());
    }

    fn env(guests: &[&str]) -> Environment {
        let exe = std::env::current_exe().unwrap();
        let text: String = guests
            .iter()
            .map(|name| {
                format!(
                    "[[guest]]\nname = \"{name}\"\nkernel = \"{}\"\n",
                    exe.display()
                )
            })
            .collect();
        Environment::parse(
            &text,
            std::path::Path::new("env.toml"),
            exe.parent().unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn a_bare_directory_needs_a_single_guest_and_a_named_guest_must_exist() {
        let two = env(&["a", "b"]);
        let bare: RestoreArg = "/nowhere".parse().unwrap();
        let err = load_snapshots(&two, &[bare]).unwrap_err();
        assert!(
            err.to_string()
                .contains("say which: --restore GUEST=/nowhere"),
            "{err}"
        );
        let unknown: RestoreArg = "c=/nowhere".parse().unwrap();
        let err = load_snapshots(&two, &[unknown]).unwrap_err();
        assert!(matches!(err, RestoreError::UnknownGuest { .. }), "{err}");
        assert!(load_snapshots(&two, &[])
            .unwrap()
            .iter()
            .all(Option::is_none));

        let twice: Vec<RestoreArg> = vec!["b=/x".parse().unwrap(), "b=/y".parse().unwrap()];
        let err = load_snapshots(&two, &twice).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--restore: guest b is given more than one snapshot"
        );

        let one = env(&["a"]);
        let bare: RestoreArg = "/nowhere/at/all".parse().unwrap();
        let err = load_snapshots(&one, &[bare]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "guest a: cannot restore: /nowhere/at/all: missing"
        );
    }
}
