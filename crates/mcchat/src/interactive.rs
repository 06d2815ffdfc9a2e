//! `mcchat join` on a terminal: a line editor (rustyline) on its own thread, with arriving
//! messages printed above the line being typed through rustyline's external printer, so they
//! never garble it.
//!
//! The editor thread hands each finished line to the async loop and waits for an answer
//! before prompting again, so `/quit` stops it without a stray prompt, and it is joined before
//! `run` returns. Only a signal (SIGTERM, SIGHUP) can end the loop while the thread waits in
//! `readline`; then the terminal settings saved at start are restored before exit.

use std::io::Write as _;

use anyhow::{Context as _, Result};
use mcchat_core::wire::Kind;
use rustyline::error::ReadlineError;
use rustyline::{DefaultEditor, ExternalPrinter as _};
use tokio::sync::{mpsc, oneshot};
use unicode_width::UnicodeWidthStr as _;

use crate::display;
use crate::session::{Event, Received, Session, is_fatal, now_ms};
use crate::shutdown_signal;

const HELP: &str = "\
commands: /who (who is here), /me TEXT (an action), /stats (dropped datagrams), /help, /quit
          //text sends a line starting with '/'; Ctrl-C or Ctrl-D also leaves";

/// What the editor thread reports.
enum Input {
    /// A finished line; answer `true` to keep reading.
    Line(String, oneshot::Sender<bool>),
    /// Ctrl-C, Ctrl-D or a terminal error: leave.
    End(Option<String>),
}

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
pub(crate) async fn run(mut session: Session) -> Result<()> {
    let saved_termios = nix::sys::termios::tcgetattr(std::io::stdin()).ok();
    let mut editor = DefaultEditor::new().context("failed to set up the line editor")?;
    let mut printer = editor
        .create_external_printer()
        .context("failed to set up terminal output")?;
    let color = std::env::var_os("NO_COLOR").is_none();
    let prompt = format!("[{}] ", session.room().name);

    let shutdown = shutdown_signal()?;
    if let Ok(log_printer) = editor.create_external_printer() {
        crate::log::to_printer(log_printer);
    }
    session.enter().await?;
    let (tx, mut rx) = mpsc::channel(1);
    let thread = std::thread::Builder::new()
        .name("line-editor".into())
        .spawn(move || edit_lines(editor, &prompt, &tx))
        .context("failed to start the line editor thread")?;
    // Every line ends in '\n': between two readline calls the printer writes straight to the
    // terminal without adding one, and the next prompt would overwrite the line.
    let mut print = |mut line: String| {
        line.push('\n');
        printer
            .print(line)
            .context("failed to write to the terminal")
    };
    // Before the loop, a failed write has nothing to clean up but the leave below.
    let greeted = print(format!(
        "joined {} — /help for commands",
        session.describe()
    ));

    tokio::pin!(shutdown);
    let mut editor_done = false;
    let result: Result<()> = loop {
        if let Err(e) = &greeted {
            break Err(anyhow::anyhow!("{e:#}"));
        }
        let due = session.heartbeat_due();
        tokio::select! {
            r = &mut shutdown => break r,
            input = rx.recv() => match input {
                None => { editor_done = true; break Ok(()); }
                Some(Input::End(err)) => {
                    editor_done = true;
                    break match err {
                        Some(e) => Err(anyhow::anyhow!("terminal input failed: {e}")),
                        None => Ok(()),
                    };
                }
                Some(Input::Line(line, ack)) => {
                    let keep = handle_line(&mut session, &line, color, &mut print).await;
                    let go_on = matches!(keep, Ok(true));
                    let _ = ack.send(go_on);
                    if !go_on {
                        editor_done = true;
                        break keep.map(|_| ());
                    }
                }
            },
            event = session.recv() => {
                if let Err(e) = event.and_then(|ev| print(display::event_line(&ev, now_ms(), color))) {
                    break Err(e);
                }
            }
            () = tokio::time::sleep_until(due) => {
                let shown = session.tick().await.and_then(|events| {
                    events
                        .iter()
                        .try_for_each(|ev| print(display::event_line(ev, now_ms(), color)))
                });
                if let Err(e) = shown {
                    break Err(e);
                }
            }
        }
    };
    let left = session.leave().await;
    if editor_done {
        // The thread has returned from readline (it got its answer or ended by itself).
        let _ = thread.join();
    } else if let Some(t) = saved_termios {
        // The thread is blocked in readline with the terminal in raw mode; the process is
        // about to exit, which ends the thread, but the terminal must be usable again.
        let _ =
            nix::sys::termios::tcsetattr(std::io::stdin(), nix::sys::termios::SetArg::TCSANOW, &t);
        let _ = writeln!(std::io::stdout());
    }
    crate::log::to_stderr();
    session.log_drops();
    result?;
    left.context("failed to send the leave message")?;
    Ok(())
}

/// Acts on one typed line; `Ok(false)` means leave.
async fn handle_line(
    session: &mut Session,
    line: &str,
    color: bool,
    print: &mut impl FnMut(String) -> Result<()>,
) -> Result<bool> {
    let show_sent = |sent: Vec<Received>, print: &mut dyn FnMut(String) -> Result<()>| {
        sent.into_iter()
            .try_for_each(|m| print(display::event_line(&Event::Message(m), now_ms(), color)))
    };
    match parse_command(line) {
        Command::Nothing => {}
        Command::Say(text) => match session.send(Kind::Message, text).await {
            Ok(sent) => show_sent(sent, print)?,
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => print(format!("mcchat: not sent: {e:#}"))?,
        },
        Command::Me(text) => match session.send(Kind::Action, text).await {
            Ok(sent) => show_sent(sent, print)?,
            Err(e) if is_fatal(&e) => return Err(e),
            Err(e) => print(format!("mcchat: not sent: {e:#}"))?,
        },
        Command::Who => {
            let names = session.members();
            let list: Vec<String> = names
                .iter()
                .map(|n| mcchat_core::sanitize::for_terminal(n).into_owned())
                .collect();
            print(format!(
                "in {} ({}): {}",
                session.room().name,
                list.len(),
                list.join(", ")
            ))?;
        }
        Command::Stats => {
            let d = session.drops();
            let detail: Vec<String> = d.nonzero().map(|(r, n)| format!("{r}={n}")).collect();
            print(format!(
                "dropped datagrams: {} {}",
                d.total(),
                detail.join(" ")
            ))?;
        }
        Command::Help => print(HELP.to_owned())?,
        Command::Usage(usage) => print(format!("usage: {usage}"))?,
        Command::Quit => return Ok(false),
        Command::Unknown(word) => print(format!(
            "unknown command /{}; /help lists them (//text sends a line starting with '/')",
            mcchat_core::sanitize::for_terminal(word)
        ))?,
    }
    Ok(true)
}

/// The editor thread: reads lines until told to stop or the user leaves.
fn edit_lines(mut editor: DefaultEditor, prompt: &str, tx: &mpsc::Sender<Input>) {
    loop {
        match editor.readline(prompt) {
            Ok(line) => {
                erase_echo(&mut editor, prompt, &line);
                if !line.trim().is_empty() {
                    let _ = editor.add_history_entry(line.as_str());
                }
                let (ack_tx, ack_rx) = oneshot::channel();
                if tx.blocking_send(Input::Line(line, ack_tx)).is_err() {
                    return;
                }
                if !ack_rx.blocking_recv().unwrap_or(false) {
                    return;
                }
            }
            Err(ReadlineError::Interrupted | ReadlineError::Eof) => {
                let _ = tx.blocking_send(Input::End(None));
                return;
            }
            Err(e) => {
                let _ = tx.blocking_send(Input::End(Some(e.to_string())));
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
