//! Finding and reading `rooms.toml`: the one lookup order every mcchat binary uses.
//!
//! [`locate`] decides which file to read from the flag, the environment and which files
//! exist, all passed in, so the order is unit-tested without touching the disk. [`load`] does
//! the reading and hands the text to [`Registry::from_toml`].

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::room::{ConfigError, Registry};

/// The shipped `rooms.toml`, built in so `mcchat join room1` works with no file anywhere.
pub const BUILTIN_ROOMS: &str = include_str!("../../../rooms.toml");

/// System-wide location, the one the systemd unit uses.
pub const SYSTEM_PATH: &str = "/etc/mcchat/rooms.toml";

/// How the rooms file was chosen.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// `--rooms FILE`.
    Flag,
    /// `$MCCHAT_ROOMS`.
    Env,
    /// `./rooms.toml`.
    WorkingDir,
    /// `$XDG_CONFIG_HOME/mcchat/rooms.toml` (or `~/.config/...`).
    UserConfig,
    /// `/etc/mcchat/rooms.toml`.
    System,
    /// No file: the built-in copy.
    BuiltIn,
}

/// Where the rooms came from, for messages and `mcchat rooms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The file read, or `None` for the built-in copy.
    pub path: Option<PathBuf>,
    /// Which step of the lookup found it.
    pub found: Found,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.found {
            Found::Flag => "from --rooms",
            Found::Env => "from $MCCHAT_ROOMS",
            Found::WorkingDir => "in the working directory",
            Found::UserConfig => "user config",
            Found::System => "system config",
            Found::BuiltIn => return f.write_str("built-in rooms"),
        };
        match &self.path {
            Some(p) => write!(f, "{} ({how})", p.display()),
            None => f.write_str(how),
        }
    }
}

/// Reading the rooms file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read rooms file {path} ({how}): {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Which lookup step named it.
        how: &'static str,
        /// The I/O error (in the message, so the error is one line).
        cause: std::io::Error,
    },
    /// The file was read but is not valid.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// The loaded registry and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The validated rooms.
    pub registry: Registry,
    /// Where they came from.
    pub origin: Origin,
}

/// Picks the rooms file. `env` reads an environment variable; `exists` tells whether a path
/// is a file. An explicit choice (flag or `$MCCHAT_ROOMS`) is returned even if it does not
/// exist, so that a typo is an error rather than a silent fallback.
pub fn locate(
    flag: Option<&Path>,
    env: impl Fn(&str) -> Option<OsString>,
    exists: impl Fn(&Path) -> bool,
) -> Origin {
    let pick = |path: PathBuf, found| Origin {
        path: Some(path),
        found,
    };
    if let Some(path) = flag {
        return pick(path.to_owned(), Found::Flag);
    }
    if let Some(path) = env("MCCHAT_ROOMS").filter(|p| !p.is_empty()) {
        return pick(path.into(), Found::Env);
    }
    let user_dir = env("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|p| !p.is_empty())
                .map(|h| PathBuf::from(h).join(".config"))
        });
    let candidates = [
        Some((PathBuf::from("rooms.toml"), Found::WorkingDir)),
        user_dir.map(|d| (d.join("mcchat").join("rooms.toml"), Found::UserConfig)),
        Some((PathBuf::from(SYSTEM_PATH), Found::System)),
    ];
    for (path, found) in candidates.into_iter().flatten() {
        if exists(&path) {
            return pick(path, found);
        }
    }
    Origin {
        path: None,
        found: Found::BuiltIn,
    }
}

/// Finds, reads and validates the rooms file, from the real environment and disk.
pub fn load(flag: Option<&Path>) -> Result<Loaded, LoadError> {
    let origin = locate(flag, |k| std::env::var_os(k), Path::is_file);
    load_from(origin)
}

/// Reads and validates the file `origin` names.
pub fn load_from(origin: Origin) -> Result<Loaded, LoadError> {
    let registry = match &origin.path {
        None => Registry::from_toml(BUILTIN_ROOMS, "built-in rooms.toml")?,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|cause| LoadError::Read {
                path: path.clone(),
                how: match origin.found {
                    Found::Flag => "given with --rooms",
                    Found::Env => "named by $MCCHAT_ROOMS",
                    _ => "found on the search path",
                },
                cause,
            })?;
            Registry::from_toml(&text, &path.display().to_string())?
        }
    };
    Ok(Loaded { registry, origin })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn run(flag: Option<&str>, env: &[(&str, &str)], files: &[&str]) -> Origin {
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).into()))
            .collect();
        locate(
            flag.map(Path::new),
            |k| env.get(k).cloned(),
            |p| files.iter().any(|f| Path::new(f) == p),
        )
    }

    #[test]
    fn lookup_order() {
        let all = [
            "rooms.toml",
            "/x/mcchat/rooms.toml",
            "/h/.config/mcchat/rooms.toml",
            SYSTEM_PATH,
        ];
        let env = [
            ("MCCHAT_ROOMS", "/e.toml"),
            ("XDG_CONFIG_HOME", "/x"),
            ("HOME", "/h"),
        ];
        assert_eq!(run(Some("/f.toml"), &env, &all).found, Found::Flag);
        assert_eq!(run(None, &env, &all).path, Some("/e.toml".into()));
        assert_eq!(run(None, &env[1..], &all).found, Found::WorkingDir);
        let o = run(None, &env[1..], &all[1..]);
        assert_eq!(o.path, Some("/x/mcchat/rooms.toml".into()));
        let o = run(None, &env[2..], &all[1..]);
        assert_eq!(o.path, Some("/h/.config/mcchat/rooms.toml".into()));
        assert_eq!(run(None, &env[1..], &all[3..]).found, Found::System);
        assert_eq!(
            run(None, &env, &[]).found,
            Found::Env,
            "explicit even if missing"
        );
        assert_eq!(run(None, &[], &[]).found, Found::BuiltIn);
        assert_eq!(
            run(None, &[("MCCHAT_ROOMS", "")], &[]).found,
            Found::BuiltIn
        );
    }

    #[test]
    fn missing_explicit_file_is_an_error_naming_it() {
        let origin = run(Some("/nonexistent/rooms.toml"), &[], &[]);
        let e = load_from(origin).unwrap_err().to_string();
        assert!(
            e.starts_with("cannot read rooms file /nonexistent/rooms.toml (given with --rooms): "),
            "{e}"
        );
    }

    #[test]
    fn builtin_loads() {
        let l = load_from(run(None, &[], &[])).unwrap();
        assert!(l.registry.rooms().count() >= 3);
        assert_eq!(l.origin.to_string(), "built-in rooms");
    }
}
