//! The chat page in a real browser: tests/browser/chat.mjs drives Debian's chromium with
//! Playwright against the real mcchatd, beside real `mcchat` peers, in the test namespace.
//! The script holds the scenario (two pages and a CLI peer chatting, room isolation, markup
//! shown as text, a reload, a restart of mcchatd while a peer keeps sending, screenshots);
//! this test gives it the binaries and a rooms file of its own, and checks it passed.

use std::path::Path;
use std::process::Command;

use crate::util::{TempDir, bin, daemon_bin, output, require_netns};

#[test]
fn the_page_chats_with_the_cli_survives_a_restart_and_fits_a_phone() {
    require_netns();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/browser");
    assert!(
        root.join("node_modules/playwright-core").exists(),
        "playwright-core missing in {}: run scripts/test.sh (scripts/deps.sh installs it)",
        root.display()
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} missing: run scripts/test.sh (scripts/deps.sh installs chromium)"
    );
    let dir = TempDir::new();
    // Groups of its own: other tests use the shipped rooms at the same time.
    let rooms = dir.write(
        "rooms.toml",
        "[rooms.room1]\ngroup = \"239.255.97.1\"\nport = 25971\n\n\
         [rooms.room2]\ngroup = \"239.255.97.2\"\nport = 25972\n",
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let state = dir.path().join("state");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&shots).expect("screenshot directory");
    let mut cmd = Command::new("node");
    cmd.arg(root.join("chat.mjs"))
        .current_dir(&root)
        .env("MCCHATD_BIN", daemon_bin())
        .env("MCCHAT_BIN", bin())
        .env("MCCHAT_ROOMS", &rooms)
        .env("WEB_PORT", port.to_string())
        .env("STATE_DIR", &state)
        .env("SHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .env("HOME", dir.path());
    let (status, out, err) = output(cmd);
    assert!(
        status.success() && out.contains("browser: ok"),
        "the browser scenario failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    for width in [375, 1280] {
        let shot = shots.join(format!("page-{width}.png"));
        let len = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
        assert!(len > 1000, "{} missing or empty", shot.display());
    }
}
