//! `mcchat join` on a terminal: a line editor (rustyline) on its own thread, with arriving
//! messages printed above the line being typed through rustyline's external printer, so they
//! never garble it.
//!
//! The editor thread parses each finished line and hands what it asks for to the driver loop
//! (`crate::driver`); `/quit`, Ctrl-C and Ctrl-D end the thread, which closes the channel and
//! so ends the loop. Output goes through the bounded writer (`crate::writer`), whose sink is
//! the external printer. Only a signal (SIGTERM, SIGHUP) can end the loop while the thread
//! waits in `readline`; then the terminal settings saved at start are restored before exit.

use std::io::Write as _;

use anyhow::{Context as _, Result};
use mcchat_core::wire::{Kind, now_ms};
use rustyline::error::ReadlineError;
use rustyline::{DefaultEditor, ExternalPrinter as _};
use tokio::sync::mpsc;
use unicode_width::UnicodeWidthStr as _;

use crate::display;
use crate::driver::{Input, Peer};
use crate::writer::{self, Line, Output};

const HELP: &str = "\
commands: /who (who is here), /me TEXT (an action), /stats (dropped datagrams), /help, /quit
          //text sends a line starting with '/'; Ctrl-C or Ctrl-D also leaves";

/// What a typed line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    Say(&'a str),
    Me(&'a str),
    Who,
    Stats,
    Help,
    Quit,
    Nothing,
    Usage(&'static str),
    Unknown(&'a str),
}

fn parse_command(line: &str) -> Command<'_> {
    if line.starts_with("//") {
        return Command::Say(&line[1..]);
    }
    let Some(cmd) = line.strip_prefix('/') else {
        return if line.trim().is_empty() {
            Command::Nothing
        } else {
            Command::Say(line)
        };
    };
    let (word, arg) = cmd.split_once(' ').unwrap_or((cmd, ""));
    match word {
        "me" if !arg.trim().is_empty() => Command::Me(arg),
        "me" => Command::Usage("/me TEXT"),
        "who" | "names" => Command::Who,
        "stats" => Command::Stats,
        "help" | "?" => Command::Help,
        "quit" | "exit" | "q" => Command::Quit,
        _ => Command::Unknown(word),
    }
}

/// Runs the room on the terminal until the user leaves.
pub(crate) async fn run(mut peer: Peer, shutdown: impl Future<Output = Result<()>>) -> Result<()> {
    let saved_termios = nix::sys::termios::tcgetattr(std::io::stdin()).ok();
    let mut editor = DefaultEditor::new().context("failed to set up the line editor")?;
    let mut printer = editor
        .create_external_printer()
        .context("failed to set up terminal output")?;
    let color = std::env::var_os("NO_COLOR").is_none();
    let prompt = format!("[{}] ", peer.room().name());

    if let Ok(log_printer) = editor.create_external_printer() {
        crate::log::to_printer(log_printer);
    }
    peer.enter().await?;
    // Every line ends in '\n': between two readline calls the printer writes straight to the
    // terminal without adding one, and the next prompt would overwrite the line.
    let mut out = Output::spawn(writer::QUEUE_BYTES, writer::QUEUE_LINES, move |line| {
        let mut text = display::text_line(line, now_ms(), color);
        text.push('\n');
        printer
            .print(text)
            .context("failed to write to the terminal")
    })?;
    out.show(Line::Text(format!(
        "joined {} — /help for commands",
        peer.describe()
    )));
    let (tx, rx) = mpsc::channel(16);
    let thread = std::thread::Builder::new()
        .name("line-editor".into())
        .spawn(move || edit_lines(editor, &prompt, &tx))
        .context("failed to start the line editor thread")?;
    let result = peer.run(Some(rx), &mut out, shutdown, false).await;
    if thread.is_finished() {
        let _ = thread.join();
    } else if let Some(t) = saved_termios {
        // The thread is blocked in readline with the terminal in raw mode (a signal ended
        // the loop); the process is about to exit, which ends the thread, but the terminal
        // must be usable again.
        let _ =
            nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &t);
        let _ = writeln!(std::io::stdout());
    }
    crate::log::to_stderr();
    crate::finish(result, out)
}

/// What a typed line asks of the loop; `None`: nothing, `Some(None)`: leave.
fn to_input(line: &str) -> Option<Option<Input>> {
    Some(Some(match parse_command(line) {
        Command::Nothing => return None,
        Command::Say(text) => Input::Say(Kind::Message, text.to_owned()),
        Command::Me(text) => Input::Say(Kind::Action, text.to_owned()),
        Command::Who => Input::Who,
        Command::Stats => Input::Stats,
        Command::Help => Input::Note(HELP.to_owned()),
        Command::Usage(usage) => Input::Note(format!("usage: {usage}")),
        Command::Quit => return Some(None),
        Command::Unknown(word) => Input::Note(format!(
            "unknown command /{}; /help lists them (//text sends a line starting with '/')",
            mcchat_core::sanitize::for_terminal(word)
        )),
    }))
}

/// The editor thread: reads lines until the user leaves (`/quit`, Ctrl-C, Ctrl-D: the
/// channel closes) or the loop is gone.
fn edit_lines(mut editor: DefaultEditor, prompt: &str, tx: &mpsc::Sender<Input>) {
    loop {
        match editor.readline(prompt) {
            Ok(line) => {
                erase_echo(&mut editor, prompt, &line);
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                let sent = match to_input(&line) {
                    None => true,
                    Some(Some(input)) => tx.blocking_send(input).is_ok(),
                    Some(None) => false, // `/quit`
                };
                if !sent {
                    return;
                }
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => return,
            Err(e) => {
                let _ = tx.blocking_send(Input::Failed(e.to_string()));
                return;
            }
        }
    }
}

/// Removes the just-entered line from the screen: the sent message is shown once, formatted
/// like everyone else's, instead of twice.
fn erase_echo(editor: &mut DefaultEditor, prompt: &str, line: &str) {
    let Some((cols, _)) = editor.dimensions() else {
        return;
    };
    let cols = cols.max(1);
    let width = prompt.width() + line.width();
    let rows = width.div_ceil(usize::from(cols)).max(1);
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "\x1b[{rows}A\r\x1b[J");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(parse_command("hello"), Command::Say("hello"));
        assert_eq!(parse_command("//etc/passwd"), Command::Say("/etc/passwd"));
        assert_eq!(parse_command("/me waves"), Command::Me("waves"));
        assert_eq!(parse_command("/me"), Command::Usage("/me TEXT"));
        assert_eq!(parse_command("/who"), Command::Who);
        assert_eq!(parse_command("/quit"), Command::Quit);
        assert_eq!(parse_command("/nope x"), Command::Unknown("nope"));
        assert_eq!(parse_command("   "), Command::Nothing);
    }
}
