//! The settled configuration: the rooms file, with flags layered over its `[daemon]` table.
//! `--check-config`, start-up and SIGHUP reload all go through [`load`].

use std::path::PathBuf;

use anyhow::Result;
use mcchat_core::config::Origin;
use mcchat_core::room::Registry;

use crate::cli::Cli;
use crate::config::{self, Allow, DaemonSettings};

/// Everything the relay runs with.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The rooms (and the raw `[daemon]` table, which `daemon` is made from).
    pub(crate) registry: Registry,
    /// The daemon settings after flags.
    pub(crate) daemon: DaemonSettings,
    /// Where the rooms came from.
    pub(crate) origin: Origin,
    /// The web gateway (`[web]` and `--web`).
    pub(crate) web: crate::web::config::WebSettings,
    /// The bridge to other sites (`[sites]`, `--site` and `--nats`).
    pub(crate) sites: crate::sites::config::SitesSettings,
}

/// Loads the rooms file the flags or search path name, and applies the flags.
pub(crate) fn load(cli: &Cli) -> Result<Settings> {
    let loaded = mcchat_core::config::load(cli.rooms.as_deref())?;
    let file = DaemonSettings::from_registry(&loaded.registry, &loaded.origin.label())?;
    let daemon = apply_flags(file, cli);
    let mut web =
        crate::web::config::WebSettings::from_registry(&loaded.registry, &loaded.origin.label())?;
    if !cli.web.is_empty() {
        web.listen.clone_from(&cli.web);
    }
    let label = loaded.origin.label();
    let sites = crate::sites::config::SitesSettings::from_registry(&loaded.registry, &label)?
        .with_flags(cli.site.as_deref(), &cli.nats, &label)?;
    Ok(Settings {
        registry: loaded.registry,
        daemon,
        origin: loaded.origin,
        web,
        sites,
    })
}

fn apply_flags(mut d: DaemonSettings, cli: &Cli) -> DaemonSettings {
    if !cli.listen.is_empty() {
        d.listen.clone_from(&cli.listen);
    }
    if !cli.allow.is_empty() {
        d.allow.clone_from(&cli.allow);
    }
    if let Some(v) = cli.lease_secs {
        d.lease_secs = v;
    }
    if let Some(v) = cli.max_subscribers {
        d.max_subscribers = v;
    }
    if cli.no_adhoc_rooms {
        d.adhoc_rooms = false;
    }
    if let Some(p) = &cli.status_socket {
        d.status_socket = config::path_or_off(p.clone());
    }
    if let Some(v) = cli.ttl {
        d.ttl = v;
    }
    if let Some(v) = &cli.iface {
        d.iface = config::iface(v);
    }
    if let Some(p) = &cli.state_dir {
        d.state_dir = Some(p.clone());
    }
    if cli.no_history {
        d.state_dir = Some(PathBuf::new());
    }
    d
}

/// Where history lives, and whether the operator chose it (then failing to open it is an
/// error; the default location failing only turns history off). `None`: history is off.
pub(crate) fn state_dir(d: &DaemonSettings) -> Option<(PathBuf, bool)> {
    if let Some(p) = &d.state_dir {
        return (!p.as_os_str().is_empty()).then(|| (p.clone(), true));
    }
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    // systemd's StateDirectory= may list several, separated by colons: the first is ours.
    if let Some(dirs) = std::env::var_os("STATE_DIRECTORY").filter(|v| !v.is_empty()) {
        let first = dirs.to_string_lossy().split(':').next().map(PathBuf::from);
        return first.map(|p| (p, false));
    }
    env("XDG_STATE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".local/state")))
        .map(|base| (base.join("mcchat"), false))
}

/// `--check-config`: a summary of what would run.
pub fn check_config(cli: &Cli) -> Result<String> {
    let s = load(cli)?;
    let d = &s.daemon;
    let rooms: Vec<String> = s
        .registry
        .rooms()
        .map(|r| {
            format!(
                "{} {}{}",
                r.name(),
                r.group(),
                if r.keep() { " keep" } else { "" }
            )
        })
        .collect();
    let history = match state_dir(d) {
        None => "off".to_owned(),
        Some((dir, _)) => format!(
            "{} (default: last {} messages, at most {} old, per room)",
            dir.join(crate::history::FILE_NAME).display(),
            d.history_count,
            humantime::format_duration(d.history_age),
        ),
    };
    let sites = &s.sites;
    let sites = if sites.enabled() {
        format!(
            "site {} through {}, rooms: {}",
            sites.site,
            sites.nats.join(" "),
            match &sites.rooms {
                crate::sites::config::Bridged::All { adhoc: false } =>
                    "every configured room".to_owned(),
                crate::sites::config::Bridged::All { adhoc: true } => "every room".to_owned(),
                crate::sites::config::Bridged::Only(list) => list.join(" "),
            }
        )
    } else {
        "off".to_owned()
    };
    Ok(format!(
        "{}: ok\nrooms: {}\nlisten: {}\nallow: {}\nadhoc rooms: {}, lease {} s, max {} subscribers in {} rooms, ttl {}\nstatus socket: {}\nrepair cache: {} bytes, {} s\nhistory: {}\nsites: {}",
        s.origin,
        if rooms.is_empty() {
            "(none)".to_owned()
        } else {
            rooms.join(", ")
        },
        d.listen
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        d.allow
            .iter()
            .map(|a| match a {
                Allow::Loopback => "loopback".to_owned(),
                Allow::Connected => "connected".to_owned(),
                Allow::Net(n) => n.to_string(),
            })
            .collect::<Vec<_>>()
            .join(" "),
        if d.adhoc_rooms { "on" } else { "off" },
        d.lease_secs,
        d.max_subscribers,
        d.max_rooms,
        d.ttl,
        d.status_socket
            .as_ref()
            .map_or_else(|| "off".to_owned(), |p| p.display().to_string()),
        d.repair_cache_bytes,
        d.repair_window.as_secs(),
        history,
        sites,
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[test]
    fn flags_override_the_file() {
        let file = DaemonSettings {
            lease_secs: 30,
            ttl: 3,
            ..DaemonSettings::default()
        };
        let file = DaemonSettings {
            iface: Some("eth0".into()),
            ..file
        };
        let cli = Cli::parse_from([
            "mcchatd",
            "--lease-secs",
            "90",
            "--listen",
            "127.0.0.1:7000",
            "--no-adhoc-rooms",
            "--status-socket",
            "",
            "--iface",
            "",
        ]);
        assert_ne!(file.lease_secs, 90);
        let d = apply_flags(file, &cli);
        assert_eq!(d.lease_secs, 90);
        assert_eq!(d.ttl, 3, "not given: the file's value stays");
        assert_eq!(d.listen, vec!["127.0.0.1:7000".parse().unwrap()]);
        assert!(!d.adhoc_rooms);
        assert_eq!(d.status_socket, None);
        assert_eq!(d.iface, None, "\"\" is the system's choice, as in the file");
    }
}
