//! mcchatd's command line. Every flag that shadows a `[daemon]` key overrides the file, and
//! its value is checked by the same function as the key's ([`crate::config`]).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::builder::TypedValueParser as _;
use clap::{Parser, ValueEnum};

use crate::config::{self, Allow};

const EXAMPLES: &str = "\
Examples:
  mcchatd                                  relay with the rooms file on the search path
  mcchatd --rooms /etc/mcchat/rooms.toml --check-config
  mcchatd --listen 0.0.0.0:5554 --allow connected --allow 192.0.2.0/24
  systemctl reload mcchatd                 (SIGHUP) re-read rooms.toml

Exit status: 0 on success (also after SIGTERM/SIGINT), 1 on an error, 2 on a usage error.";

/// Relay mcchat rooms between unicast clients and their multicast groups.
#[derive(Debug, Clone, Parser)]
#[command(name = "mcchatd", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Rooms file (with an optional [daemon] table) instead of the search path
    #[arg(long, value_name = "FILE")]
    pub rooms: Option<PathBuf>,

    /// Load and check the configuration, print a summary, and exit
    #[arg(long)]
    pub check_config: bool,

    /// Relay address (UDP; TCP for status on the same port); repeat for several; overrides
    /// `listen` in the file [default: 0.0.0.0:5554 and [::]:5554]
    #[arg(long, value_name = "ADDR:PORT", value_parser = config::parse_listen)]
    pub listen: Vec<SocketAddr>,

    /// Who may use the relay: `loopback`, `connected` or a network; repeat for several;
    /// overrides `allow` in the file [default: loopback and connected]
    #[arg(long, value_name = "NET", value_parser = config::parse_allow)]
    pub allow: Vec<Allow>,

    /// Serve the chat page and its WebSocket on this address (repeatable; overrides
    /// `[web] listen`). Off unless set.
    #[arg(long, value_name = "ADDR:PORT", value_parser = config::parse_listen)]
    pub web: Vec<SocketAddr>,

    /// This daemon's site name, for bridging rooms to other sites over NATS; overrides
    /// `[sites] site`
    #[arg(long, value_name = "NAME")]
    pub site: Option<String>,

    /// A NATS server to bridge rooms to other sites through (repeatable; overrides
    /// `[sites] nats`). Off unless set.
    #[arg(long, value_name = "URL")]
    pub nats: Vec<String>,

    /// Subscription lease in seconds, 5-3600; overrides `lease_secs` in the file
    /// [default: 60]
    #[arg(long, value_name = "SECS", value_parser = config::LEASE_SECS.flag::<u32>())]
    pub lease_secs: Option<u32>,

    /// Most subscribers at once, 1-1000000; overrides `max_subscribers` in the file
    /// [default: 10000]
    #[arg(long, value_name = "N", value_parser = config::MAX_SUBSCRIBERS.flag::<usize>())]
    pub max_subscribers: Option<usize>,

    /// Relay only the rooms in the file; overrides `adhoc_rooms` in the file
    #[arg(long)]
    pub no_adhoc_rooms: bool,

    /// Local status socket, "" to disable; overrides `status_socket` in the file
    /// [default: /run/mcchat/mcchatd.sock]
    #[arg(long, value_name = "PATH", value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from))]
    pub status_socket: Option<PathBuf>,

    /// TTL / hop limit for datagrams sent to groups, 1-255; overrides `ttl` in the file
    /// [default: 1]
    #[arg(long, value_parser = config::TTL.flag::<u32>())]
    pub ttl: Option<u32>,

    /// Interface (name or address) for group membership and sending, "" for the system's
    /// choice; overrides `iface` in the file [default: the system's choice]
    #[arg(long, value_name = "NAME|ADDR")]
    pub iface: Option<String>,

    /// Directory for the history database, "" for no history; overrides `state_dir` in the
    /// file [default: $STATE_DIRECTORY, else $XDG_STATE_HOME/mcchat or
    /// ~/.local/state/mcchat]
    #[arg(long, value_name = "DIR", value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from))]
    pub state_dir: Option<PathBuf>,

    /// Keep no room history (the same as --state-dir "")
    #[arg(long, conflicts_with = "state_dir")]
    pub no_history: bool,

    /// Log line format on stderr
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// More log detail (-v debug, -vv trace); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only warnings and errors
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, one event per line.
    Text,
    /// One JSON object per line.
    Json,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
