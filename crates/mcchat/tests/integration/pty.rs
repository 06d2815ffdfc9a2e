//! The terminal front end, driven through a pseudo-terminal and read back through a terminal
//! emulator (vt100), as a person would see it.

use std::io::{Read as _, Write};
use std::num::NonZeroU16;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use portable_pty::{CommandBuilder, PtySize, native_pty_system};

use crate::util::{Proc, WAIT, bin, require_netns, unique};

struct Screen {
    state: Mutex<(vt100::Parser, bool)>,
    changed: Condvar,
}

struct Terminal {
    screen: Arc<Screen>,
    writer: Box<dyn Write + Send>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
}

impl Terminal {
    fn spawn(args: &[&str]) -> Self {
        let pty = native_pty_system()
            .openpty(PtySize {
                rows: 24,
                cols: 80,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut cmd = CommandBuilder::new(bin());
        cmd.args(args);
        cmd.env("TERM", "xterm");
        cmd.env("NO_COLOR", "1");
        cmd.env_remove("MCCHAT_NAME");
        let child = pty.slave.spawn_command(cmd).unwrap();
        drop(pty.slave);
        let mut reader = pty.master.try_clone_reader().unwrap();
        let writer = pty.master.take_writer().unwrap();
        let screen = Arc::new(Screen {
            state: Mutex::new((
                vt100::Parser::new(
                    NonZeroU16::new(24).unwrap(),
                    NonZeroU16::new(80).unwrap(),
                    0,
                ),
                false,
            )),
            changed: Condvar::new(),
        });
        let sink = Arc::clone(&screen);
        std::thread::spawn(move || {
            // Keep the master alive for as long as the reader runs.
            let _master = pty.master;
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        sink.state.lock().unwrap().0.process(&buf[..n]);
                        sink.changed.notify_all();
                    }
                }
            }
            sink.state.lock().unwrap().1 = true;
            sink.changed.notify_all();
        });
        Self {
            screen,
            writer,
            child,
        }
    }

    /// Waits until the screen's text satisfies `pred`; returns the text.
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_screen(what, |screen| pred(&screen.contents()))
    }

    /// Waits until the screen satisfies `pred`; returns its text.
    fn wait_screen(&self, what: &str, pred: impl Fn(&vt100::Screen) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let mut state = self.screen.state.lock().unwrap();
        loop {
            if pred(state.0.screen()) {
                return state.0.screen().contents();
            }
            let now = Instant::now();
            assert!(
                now < deadline && !state.1,
                "screen never showed {what}:\n{}",
                state.0.screen().contents()
            );
            state = self
                .screen
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap()
                .0;
        }
    }

    fn type_keys(&mut self, keys: &str) {
        self.writer.write_all(keys.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    /// Waits until the row the cursor is on reads `want` (trailing blanks ignored).
    fn wait_cursor_row(&self, want: &str) -> String {
        self.wait_screen(&format!("the cursor row {want:?}"), |screen| {
            let (row, _) = screen.cursor_position();
            screen
                .rows(0, 80)
                .nth(usize::from(row))
                .is_some_and(|r| r.trim_end() == want)
        })
    }

    /// Waits (capped) for the program to exit: the pty reader seeing the end is the signal.
    fn wait_exit(&mut self) -> bool {
        let deadline = Instant::now() + WAIT;
        let mut state = self.screen.state.lock().unwrap();
        while !state.1 {
            let now = Instant::now();
            assert!(
                now < deadline,
                "the program did not exit:\n{}",
                state.0.screen().contents()
            );
            state = self
                .screen
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap()
                .0;
        }
        drop(state);
        self.child.wait().unwrap().success()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        // A failed test must not leave the peer running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn typed_line_stays_intact_while_messages_arrive() {
    require_netns();
    let room = unique("tty");
    let mut bob = Proc::mcchat("bob", None, &["join", &room, "--name", "bob"], &[]).ready();
    let mut term = Terminal::spawn(&["join", &room, "--name", "alice"]);
    let prompt = format!("[{room}] ");
    term.wait_for("the joined line", |s| s.contains(&format!("joined {room}")));
    bob.expect_out("-- alice joined");

    term.type_keys("hello wor");
    term.wait_for("the typed text", |s| {
        s.contains(&format!("{prompt}hello wor"))
    });
    bob.say("interrupting one");
    bob.say("interrupting two");
    term.wait_for("bob's messages", |s| s.contains("bob: interrupting two"));
    // The redraw after the last message puts the typed line back under the cursor.
    let screen = term.wait_cursor_row(&format!("{prompt}hello wor"));
    assert!(screen.contains("bob: interrupting one"), "{screen}");
    assert_eq!(screen.matches("hello wor").count(), 1, "{screen}");
    let rows: Vec<&str> = screen.lines().collect();
    let pos = |needle: &str| rows.iter().position(|r| r.contains(needle)).unwrap();
    assert!(pos("interrupting one") < pos("interrupting two"));
    assert!(pos("interrupting two") < pos("hello wor"), "{screen}");

    // Finishing the line sends it; it is shown once, formatted, not also as typed.
    term.type_keys("ld\r");
    bob.expect_out("alice: hello world");
    let screen = term.wait_for("own message", |s| s.contains("alice: hello world"));
    assert_eq!(screen.matches("hello world").count(), 1, "{screen}");
    assert!(
        !screen.contains(&format!("{prompt}hello world")),
        "{screen}"
    );

    term.type_keys("/who\r");
    term.wait_for("/who output", |s| {
        s.contains(&format!("in {room} (2): alice, bob"))
    });
    term.type_keys("/me waves\r");
    bob.expect_out("* alice waves");
    term.type_keys("/bogus\r");
    term.wait_for("unknown command", |s| s.contains("unknown command /bogus"));

    // Hostile text from the network is shown escaped, not interpreted.
    bob.say("\x1b[2J\x1b[H cleared?");
    let screen = term.wait_for("escaped text", |s| s.contains("cleared?"));
    assert!(screen.contains(r"bob: \x1b[2J\x1b[H cleared?"), "{screen}");
    assert!(
        screen.contains("alice: hello world"),
        "screen was not cleared:\n{screen}"
    );

    term.type_keys("\x04"); // Ctrl-D on an empty line
    assert!(term.wait_exit());
    bob.expect_out("-- alice left");
}

#[test]
fn ctrl_c_leaves_cleanly() {
    require_netns();
    let room = unique("ttyc");
    let bob = Proc::mcchat("bob", None, &["join", &room, "--name", "bob"], &[]).ready();
    let mut term = Terminal::spawn(&["join", &room, "--name", "carol"]);
    term.wait_for("the joined line", |s| s.contains(&format!("joined {room}")));
    bob.expect_out("-- carol joined");
    term.type_keys("half a line\x03");
    assert!(term.wait_exit());
    bob.expect_out("-- carol left");
}

/// Issue 9: the terminal front end runs the one driver loop too; `/quit` and SIGTERM (while
/// the editor thread waits in readline) each send the leave and exit 0.
#[test]
fn issue_9_quit_and_sigterm_leave_cleanly() {
    require_netns();
    let room = unique("ttyq");
    let bob = Proc::mcchat("bob", None, &["join", &room, "--name", "bob"], &[]).ready();
    let mut term = Terminal::spawn(&["join", &room, "--name", "dave"]);
    term.wait_for("the joined line", |s| s.contains(&format!("joined {room}")));
    bob.expect_out("-- dave joined");
    term.type_keys("/quit\r");
    assert!(term.wait_exit());
    bob.expect_out("-- dave left");

    let mut term = Terminal::spawn(&["join", &room, "--name", "erin"]);
    term.wait_for("the joined line", |s| s.contains(&format!("joined {room}")));
    bob.expect_out("-- erin joined");
    term.type_keys("half typed");
    term.wait_for("the typed text", |s| s.contains("half typed"));
    let pid = term.child.process_id().expect("a pid");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(term.wait_exit(), "exit 0 on SIGTERM");
    bob.expect_out("-- erin left");
}
