//! The command line, as clap derive types. Help texts, completions and the man page are all
//! generated from these definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueHint};
use clap_complete::Shell;
use mcchat_core::control;
use mcchat_core::room::RoomName;
use mcchat_core::wire::{MAX_SENDER_CHARS, is_valid_sender};

const TOP_EXAMPLES: &str = "\
Examples:
  mcchat join room1 --name alice        chat in room1
  mcchat send room1 --name ci build ok  send one message and exit
  mcchat listen room1 --json            print the room as JSON lines
  mcchat rooms                          list the configured rooms
  mcchat join room1 --via relay.lan     chat through mcchatd where multicast does not work
  tail -f build.log | mcchat join ci --name bot

Exit status: 0 on success, 1 on an error (one line on stderr), 2 on a usage error.";

/// Chat on the local network over UDP multicast, with no server.
#[derive(Debug, Parser)]
#[command(name = "mcchat", version, after_help = TOP_EXAMPLES, propagate_version = true)]
pub struct Cli {
    /// Rooms file to use instead of the search path
    /// ($MCCHAT_ROOMS, ./rooms.toml, ~/.config/mcchat/rooms.toml, /etc/mcchat/rooms.toml,
    /// built-in)
    #[arg(long, global = true, value_name = "FILE", value_hint = ValueHint::FilePath)]
    pub rooms: Option<PathBuf>,

    /// More diagnostics on stderr (-v info, -vv debug); RUST_LOG overrides
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// What to do
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Chat in a room: type to send, see what others say
    #[command(after_help = "\
Examples:
  mcchat join room1 --name alice
  mcchat join lunch                      a room not in rooms.toml meets on a derived group
  mcchat join room1 --iface eth0 --ttl 2
  tail -f build.log | mcchat join ci --name bot

On a terminal: /who, /me TEXT, /stats, /help, /quit; Ctrl-C or Ctrl-D leaves.
Not on a terminal: each stdin line is sent, received messages go to stdout, EOF leaves.")]
    Join(JoinArgs),

    /// Send one message and exit
    #[command(after_help = "\
Examples:
  mcchat send room1 --name ci 'deploy finished'
  mcchat send room1 build 42 is green     (the words are joined with spaces)")]
    Send(SendArgs),

    /// Print what a room says, without joining the conversation
    #[command(after_help = "\
Examples:
  mcchat listen room1
  mcchat listen room1 --json | jq -r .text

JSON lines have the keys room, sender, text, ts (RFC 3339), from (source address), kind
(message, action, join, leave, lost), id and seq (null for bare datagrams), and repair (true
when the message arrived as a retransmission after a loss).")]
    Listen(ListenArgs),

    /// List the configured rooms and where they come from
    #[command(after_help = "\
Examples:
  mcchat rooms
  mcchat --rooms ./my-rooms.toml rooms")]
    Rooms,

    /// Show what an mcchatd relays: rooms, subscribers, joined groups and counters
    #[command(after_help = "\
Examples:
  mcchat status                      ask the local daemon (/run/mcchat/mcchatd.sock)
  mcchat status --via relay.lan      ask a daemon over TCP (port 5554)
  mcchat status --json | jq .counters")]
    Status(StatusArgs),

    /// Print a room's history, as kept by mcchatd
    #[command(after_help = "\
Examples:
  mcchat history room1                       the last 100 messages (local daemon)
  mcchat history room1 --since 2h --grep deploy
  mcchat history room1 --via relay.lan --limit 1000 --json

JSON lines have the keys of `mcchat listen --json`; `from` is null. Messages are shown in the
order mcchatd received them, with the time it received them.")]
    History(HistoryArgs),

    /// Print a shell completion script
    #[command(after_help = "\
Examples:
  mcchat completions bash > ~/.local/share/bash-completion/completions/mcchat
  mcchat completions zsh > ~/.zfunc/_mcchat")]
    Completions {
        /// The shell
        shell: Shell,
    },

    /// Print the man page (roff)
    #[command(after_help = "\
Examples:
  mcchat man > mcchat.1 && man ./mcchat.1")]
    Man,
}

/// Where to join and send.
#[derive(Debug, Clone, Args)]
pub struct NetArgs {
    /// Interface (name or address) to join and send on [default: the system's choice]
    #[arg(long, value_name = "NAME|ADDR", conflicts_with = "via")]
    pub iface: Option<String>,

    /// Reach the room through mcchatd at HOST[:PORT] (port 5554 by default) instead of
    /// joining its multicast group: for networks that drop multicast
    #[arg(long, value_name = "HOST[:PORT]")]
    pub via: Option<String>,

    /// Multicast TTL / hop limit; 1 keeps messages on the local network
    /// [default: the room's `ttl`, else 1]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=255), conflicts_with = "via")]
    pub ttl: Option<u32>,
}

/// `mcchat join`.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Room name (from rooms.toml, or any name: it gets a derived group)
    #[arg(value_parser = parse_room)]
    pub room: RoomName,

    /// Your name [default: $MCCHAT_NAME, else your login name]
    #[arg(short, long, env = "MCCHAT_NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// How long your messages can still be repaired for others who lost them, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub repair_window: u64,

    /// Show the room's last N messages from mcchatd's history first, 0 for none
    /// [default: 20 when a daemon answers]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub history: Option<u32>,

    /// The local mcchatd's socket, for history (with --via, the daemon there is asked)
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_STATUS_SOCKET)]
    pub socket: PathBuf,

    #[command(flatten)]
    pub net: NetArgs,
}

/// `mcchat send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// Room name
    #[arg(value_parser = parse_room)]
    pub room: RoomName,

    /// Your name [default: $MCCHAT_NAME, else your login name]
    #[arg(short, long, env = "MCCHAT_NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// The message; several words are joined with spaces
    #[arg(required = true, num_args = 1.., trailing_var_arg = true)]
    pub text: Vec<String>,

    #[command(flatten)]
    pub net: NetArgs,
}

/// `mcchat listen`.
#[derive(Debug, Args)]
pub struct ListenArgs {
    /// Room name
    #[arg(value_parser = parse_room)]
    pub room: RoomName,

    /// One JSON object per line instead of text
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub net: NetArgs,
}

/// `mcchat status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Ask the daemon at HOST[:PORT] over TCP
    #[arg(long, value_name = "HOST[:PORT]", conflicts_with = "socket")]
    pub via: Option<String>,

    /// Ask the daemon on this Unix socket
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_STATUS_SOCKET)]
    pub socket: PathBuf,

    /// Print the daemon's JSON document as is
    #[arg(long)]
    pub json: bool,
}

/// `mcchat history`.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Room name
    #[arg(value_parser = parse_room)]
    pub room: RoomName,

    /// Only messages from the last DURATION, e.g. 90s, 15m, 2h, 7d
    #[arg(long, value_name = "DURATION", value_parser = parse_since)]
    pub since: Option<std::time::Duration>,

    /// Only messages whose text contains TEXT (ignoring ASCII case)
    #[arg(long, value_name = "TEXT")]
    pub grep: Option<String>,

    /// The last N messages at most
    #[arg(long, value_name = "N", default_value_t = control::DEFAULT_QUERY_LIMIT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(control::MAX_QUERY)))]
    pub limit: u32,

    /// One JSON object per line instead of text
    #[arg(long)]
    pub json: bool,

    /// Ask the daemon at HOST[:PORT] over TCP
    #[arg(long, value_name = "HOST[:PORT]", conflicts_with = "socket")]
    pub via: Option<String>,

    /// Ask the daemon on this Unix socket
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_STATUS_SOCKET)]
    pub socket: PathBuf,
}

fn parse_since(s: &str) -> Result<std::time::Duration, String> {
    mcchat_core::room::parse_age(s)
}

fn parse_room(s: &str) -> Result<RoomName, String> {
    RoomName::new(s).map_err(|e| e.to_string())
}

/// Checks a sender name against the wire rules.
pub fn parse_name(s: &str) -> Result<String, String> {
    if is_valid_sender(s) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a valid name: use 1-{MAX_SENDER_CHARS} characters, no '|' or control \
             characters"
        ))
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bad_names_and_rooms_are_usage_errors() {
        for args in [
            &["mcchat", "join", "room 1"][..],
            &["mcchat", "join", "room1", "--name", "a|b"],
            &["mcchat", "join", "room1", "--ttl", "0"],
            &["mcchat", "send", "room1"],
            &["mcchat", "history", "room1", "--since", "yesterday"],
            &["mcchat", "history", "room1", "--limit", "0"],
            &["mcchat", "join", "room1", "--history", "10001"],
        ] {
            let e = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
