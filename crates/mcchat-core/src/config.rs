//! Finding and reading `rooms.toml`: the one lookup order every mcchat binary uses.
//!
//! [`locate`] decides which file to read from the flag, the environment and which files
//! exist, all passed in, so the order is unit-tested without touching the disk. [`load`] does
//! the reading and hands the text to [`Registry::from_toml`]. [`from_table`] turns one TOML
//! table into its serde struct with errors that name the key, for the rooms here and for
//! mcchatd's `[daemon]` table.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::room::{ConfigError, Registry};

/// The shipped `rooms.toml`, built in so `mcchat join room1` works with no file anywhere.
pub const BUILTIN_ROOMS: &str = include_str!("../../../rooms.toml");

/// System-wide location, the one the systemd unit uses.
pub const SYSTEM_PATH: &str = "/etc/mcchat/rooms.toml";

/// The longest rooms file read (the built-in one is about 3 KiB; a thousand rooms fit in
/// a tenth of this).
pub const MAX_ROOMS_FILE: u64 = 1 << 20;

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

impl Origin {
    /// The file as errors name it: its path, or `built-in rooms.toml`.
    pub fn label(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "built-in rooms.toml".to_owned(),
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
        None => Registry::from_toml(BUILTIN_ROOMS, &origin.label())?,
        Some(path) => {
            let text = read_bounded(path).map_err(|cause| LoadError::Read {
                path: path.clone(),
                how: match origin.found {
                    Found::Flag => "given with --rooms",
                    Found::Env => "named by $MCCHAT_ROOMS",
                    _ => "found on the search path",
                },
                cause,
            })?;
            Registry::from_toml(&text, &origin.label())?
        }
    };
    Ok(Loaded { registry, origin })
}

/// Reads a rooms file, which must be a regular file of at most [`MAX_ROOMS_FILE`] bytes in
/// UTF-8. Opened without blocking, so a FIFO (or a device) named by mistake is refused at
/// once rather than wait for a writer; `/dev/zero` is not read without end.
fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read as _};
    use std::os::unix::fs::OpenOptionsExt as _;

    let file = std::fs::OpenOptions::new()
        .read(true)
        // Not a controlling terminal either, should a tty be named by mistake.
        .custom_flags((nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_NOCTTY).bits())
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a FIFO, a device or a directory); name the TOML file itself",
        ));
    }
    if meta.len() > MAX_ROOMS_FILE {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} bytes, more than the {MAX_ROOMS_FILE} a rooms file may have",
                meta.len()
            ),
        ));
    }
    let mut bytes = Vec::new();
    // It may grow while read: never more than the bound.
    file.take(MAX_ROOMS_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_ROOMS_FILE {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("grew past the {MAX_ROOMS_FILE} bytes a rooms file may have while read"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| Error::new(ErrorKind::InvalidData, format!("not UTF-8 text: {e}")))
}

/// A TOML table that does not fit its serde struct, said for the person who wrote the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
pub struct TableError {
    /// The key at fault (`listen[0]` inside an array), when the problem is one key's value;
    /// `None` when the message names the key itself (unknown or missing keys).
    pub key: Option<String>,
    /// What is wrong, and the remedy when there is one.
    pub problem: String,
}

/// Deserialises a table into `T` (a raw struct with `deny_unknown_fields`), so the keys and
/// their types come from the struct alone. Errors name the key and say what type it wants
/// and found, in TOML's words ("expected an integer, found a string"), or which keys exist.
pub fn from_table<T: DeserializeOwned>(table: &toml::Table) -> Result<T, TableError> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let path = e.path().clone();
        describe(&value, &path, e.into_inner().message().trim())
    })
}

/// Rewrites serde's message for what went wrong at `path` in `value`.
fn describe(value: &toml::Value, path: &serde_path_to_error::Path, message: &str) -> TableError {
    use serde_path_to_error::Segment;
    let mut found = Some(value);
    let mut key = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Map { key: k } => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
                found = found.and_then(|v| v.get(k.as_str()));
            }
            Segment::Seq { index } => {
                key.push_str(&format!("[{index}]"));
                found = found.and_then(|v| v.get(*index));
            }
            _ => found = None,
        }
    }
    let key = (!key.is_empty()).then_some(key);
    if message.starts_with("unknown field") {
        return TableError {
            key: None,
            problem: format!("{message}; remove or correct the key"),
        };
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((unexpected, expected)) = rest.rsplit_once(", expected ")
    {
        let found = found.map_or_else(|| unexpected.to_owned(), |v| with_article(v.type_str()));
        return TableError {
            key,
            problem: format!("expected {}, found {found}", toml_type(expected)),
        };
    }
    TableError {
        key,
        problem: message.to_owned(),
    }
}

/// serde's name for what a field wants, as the TOML type a file writer knows.
fn toml_type(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" | "isize"
        | "usize" => "an integer".to_owned(),
        "f32" | "f64" => "a float".to_owned(),
        "a sequence" => "an array".to_owned(),
        "a map" => "a table".to_owned(),
        other if other.starts_with("struct ") => "a table".to_owned(),
        other => other.to_owned(),
    }
}

fn with_article(word: &str) -> String {
    let article = if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {word}")
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

    /// A rooms file that is not a small regular file is refused at once with a clear error:
    /// a FIFO (no writer: reading would block), a device that never ends, a directory, a
    /// file past the bound. Nothing here waits or reads more than the bound.
    #[test]
    fn only_a_small_regular_file_is_read() {
        let dir = std::env::temp_dir().join(format!("mcchat-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let err = |path: &Path| {
            let e = load_from(Origin {
                path: Some(path.to_owned()),
                found: Found::Flag,
            })
            .unwrap_err();
            assert!(matches!(e, LoadError::Read { .. }), "{e}");
            e.to_string()
        };
        let fifo = dir.join("fifo.toml");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(err(&fifo).contains("not a regular file"));
        assert!(err(Path::new("/dev/zero")).contains("not a regular file"));
        assert!(err(&dir).contains("not a regular file"));
        let big = dir.join("big.toml");
        std::fs::write(&big, vec![b'#'; MAX_ROOMS_FILE as usize + 1]).unwrap();
        let e = err(&big);
        assert!(e.contains("more than the 1048576"), "{e}");
        let latin1 = dir.join("latin1.toml");
        std::fs::write(&latin1, b"# caf\xe9\n").unwrap();
        assert!(err(&latin1).contains("not UTF-8"));
        let ok = dir.join("rooms.toml");
        std::fs::write(&ok, BUILTIN_ROOMS).unwrap();
        assert!(load(Some(&ok)).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
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

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        name: String,
        #[serde(default)]
        count: Option<i64>,
        #[serde(default)]
        on: Option<bool>,
        #[serde(default)]
        list: Option<Vec<String>>,
    }

    fn table_err(text: &str) -> String {
        let table: toml::Table = text.parse().unwrap();
        from_table::<Raw>(&table).unwrap_err().to_string()
    }

    #[test]
    fn table_errors_name_the_key_and_the_types() {
        let cases = [
            (
                "name = 1",
                "key `name`: expected a string, found an integer",
            ),
            (
                "name = \"a\"\ncount = \"3\"",
                "key `count`: expected an integer, found a string",
            ),
            (
                "name = \"a\"\ncount = 1.5",
                "key `count`: expected an integer, found a float",
            ),
            (
                "name = \"a\"\non = 1",
                "key `on`: expected a boolean, found an integer",
            ),
            (
                "name = \"a\"\nlist = \"x\"",
                "key `list`: expected an array, found a string",
            ),
            (
                "name = \"a\"\nlist = [\"x\", 2]",
                "key `list[1]`: expected a string, found an integer",
            ),
            ("name = {}", "key `name`: expected a string, found a table"),
            (
                "name = \"a\"\nbogus = 1",
                "unknown field `bogus`, expected one of `name`, `count`, `on`, `list`; remove or \
                 correct the key",
            ),
            ("count = 1", "missing field `name`"),
        ];
        for (text, want) in cases {
            assert_eq!(table_err(text), want, "for {text:?}");
        }
        let table: toml::Table = "name = \"a\"\ncount = 3".parse().unwrap();
        let raw: Raw = from_table(&table).unwrap();
        assert_eq!((raw.name.as_str(), raw.count), ("a", Some(3)));
    }

    #[test]
    fn builtin_loads() {
        let l = load_from(run(None, &[], &[])).unwrap();
        assert!(l.registry.rooms().count() >= 3);
        assert_eq!(l.origin.to_string(), "built-in rooms");
    }
}
