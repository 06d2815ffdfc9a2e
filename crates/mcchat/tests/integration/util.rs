//! Test harness: real `mcchat` processes over real sockets, inside the network namespace that
//! `scripts/test.sh` creates. Waiting is always on an observable event (a line of output);
//! the timeouts here are only caps that turn a hang into a failure with the output dumped.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The cap on any single wait; generous, since CI machines can be slow.
pub const WAIT: Duration = Duration::from_secs(15);

/// Refuses to run unless inside the hermetic namespace: `MCCHAT_TEST_NETNS` set by
/// scripts/test.sh, and no interface but `lo` in this process's network namespace
/// (`/proc/self/net/dev` is per namespace; `/sys/class/net` may show the host's).
pub fn require_netns() {
    let flag = std::env::var_os("MCCHAT_TEST_NETNS").is_some();
    let ifaces = mcchat_core::socket::namespace_interfaces().unwrap_or_default();
    assert!(
        flag && ifaces == ["lo"],
        "refusing to open sockets outside the test network namespace (interfaces: {ifaces:?}); \
         run scripts/test.sh"
    );
}

/// A name unique to this test process and call, for rooms and LAN prefixes.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mcchat")
}

/// The `mcchatd` binary, built beside `mcchat` (scripts/test.sh builds every binary first).
pub fn daemon_bin() -> PathBuf {
    let p = Path::new(bin()).with_file_name("mcchatd");
    assert!(
        p.exists(),
        "{} missing: run scripts/test.sh (it builds all binaries)",
        p.display()
    );
    p
}

/// The rooms file shipped in the repository: spawned processes use it rather than whatever
/// a developer has in ~/.config or /etc, so tests are hermetic.
pub fn shipped_rooms() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../rooms.toml")
        .display()
        .to_string()
}

/// Lines a child wrote, shared with the thread reading them.
#[derive(Default)]
struct Lines {
    /// The lines so far, and whether the stream has ended.
    state: Mutex<(Vec<String>, bool)>,
    changed: Condvar,
}

fn collect(stream: impl Read + Send + 'static) -> Arc<Lines> {
    let lines = Arc::new(Lines::default());
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            sink.state.lock().unwrap().0.push(line);
            sink.changed.notify_all();
        }
        sink.state.lock().unwrap().1 = true;
        sink.changed.notify_all();
    });
    lines
}

impl Lines {
    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> Result<String, Vec<String>> {
        self.wait_for_within(what, WAIT, pred)
    }

    fn wait_for_within(
        &self,
        what: &str,
        cap: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, Vec<String>> {
        self.wait_lines(what, cap, |lines| lines.iter().any(|l| pred(l)))
            .map(|lines| lines.into_iter().find(|l| pred(l)).unwrap_or_default())
    }

    /// Waits until `pred` holds for all lines so far; Err(lines) if the stream ended or the
    /// cap passed first.
    fn wait_lines(
        &self,
        what: &str,
        cap: Duration,
        pred: impl Fn(&[String]) -> bool,
    ) -> Result<Vec<String>, Vec<String>> {
        let deadline = Instant::now() + cap;
        let mut state = self.state.lock().unwrap();
        loop {
            if pred(&state.0) {
                return Ok(state.0.clone());
            }
            if state.1 {
                return Err(state.0.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                if cap == WAIT {
                    eprintln!("timed out waiting for {what}");
                }
                return Err(state.0.clone());
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap().0;
        }
    }

    /// Waits (capped) until the stream ends; false if it did not.
    fn wait_closed(&self) -> bool {
        self.wait_for("end of stream", |_| false).is_err() && self.state.lock().unwrap().1
    }

    fn snapshot(&self) -> Vec<String> {
        self.state.lock().unwrap().0.clone()
    }
}

/// A running `mcchat` (or any command), killed on drop, with its output dumped if the test
/// failed.
pub struct Proc {
    pub label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Lines>,
    stderr: Arc<Lines>,
    /// A stdout nobody reads yet (see [`Proc::spawn_unread`]).
    unread: Option<ChildStdout>,
    /// A daemon's own state directory (history), removed with it.
    state: Option<TempDir>,
}

impl Proc {
    /// Runs `mcchat ARGS` (optionally inside network namespace `ns`) with piped stdio.
    pub fn mcchat(label: &str, ns: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin()]);
                c
            }
            None => Command::new(bin()),
        };
        cmd.args(args)
            .env_remove("MCCHAT_NAME")
            .env("MCCHAT_ROOMS", shipped_rooms())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(label, cmd)
    }

    /// Runs `mcchatd ARGS` (optionally in namespace `ns`) and waits until it is ready. Its
    /// history goes to a fresh directory of its own unless ARGS name one (`--state-dir`).
    pub fn daemon(ns: Option<&str>, args: &[&str]) -> Self {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(daemon_bin());
                c
            }
            None => Command::new(daemon_bin()),
        };
        let state = TempDir::new();
        cmd.args(args)
            .env("MCCHAT_ROOMS", shipped_rooms())
            .env("STATE_DIRECTORY", state.path())
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET");
        let mut p = Self::spawn("mcchatd", cmd);
        p.state = Some(state);
        p.expect_err("mcchatd ready");
        p
    }

    pub fn spawn(label: &str, cmd: Command) -> Self {
        let mut p = Self::spawn_unread(label, cmd);
        p.read_stdout();
        p
    }

    /// Like [`Proc::spawn`], but nobody reads stdout (a reader that has stopped: the pipe
    /// fills and the child's writes block) until [`Proc::read_stdout`]. stderr is read.
    pub fn spawn_unread(label: &str, mut cmd: Command) -> Self {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {label}: {e}"));
        let unread = child.stdout.take();
        let stderr = collect(child.stderr.take().unwrap());
        Self {
            label: label.to_owned(),
            stdin: child.stdin.take(),
            child,
            stdout: Arc::default(),
            stderr,
            unread,
            state: None,
        }
    }

    /// Starts reading stdout (at once for [`Proc::spawn`]); what waited in the pipe comes
    /// first.
    pub fn read_stdout(&mut self) {
        if let Some(out) = self.unread.take() {
            self.stdout = collect(out);
        }
    }

    fn fail(&self, what: &str, stream: &str, lines: &[String]) -> ! {
        panic!(
            "{}: no {stream} line matching {what}\n--- {stream} ---\n{}\n--- stderr ---\n{}",
            self.label,
            lines.join("\n"),
            self.stderr.snapshot().join("\n")
        )
    }

    /// Waits for a stdout line containing `needle`; returns it.
    pub fn expect_out(&self, needle: &str) -> String {
        self.stdout
            .wait_for(needle, |l| l.contains(needle))
            .unwrap_or_else(|lines| self.fail(needle, "stdout", &lines))
    }

    /// Like [`Proc::expect_out`], but gives up quietly after `cap`.
    pub fn out_within(&self, needle: &str, cap: Duration) -> Option<String> {
        self.stdout
            .wait_for_within(needle, cap, |l| l.contains(needle))
            .ok()
    }

    /// Waits for a stderr line containing `needle`; returns it.
    pub fn expect_err(&self, needle: &str) -> String {
        self.stderr
            .wait_for(needle, |l| l.contains(needle))
            .unwrap_or_else(|lines| self.fail(needle, "stderr", &lines))
    }

    /// Waits until the peer has joined (its readiness line).
    pub fn ready(self) -> Self {
        self.expect_err("mcchat: joined");
        self
    }

    /// Waits until a listener is listening.
    pub fn listening(self) -> Self {
        self.expect_err("mcchat: listening to");
        self
    }

    pub fn stdout(&self) -> Vec<String> {
        self.stdout.snapshot()
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.snapshot()
    }

    pub fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).unwrap();
    }

    /// Waits for exit (capped: the child closing its stdout and stderr is the signal) and
    /// returns the status.
    pub fn wait(&mut self) -> ExitStatus {
        let closed = self.stdout.wait_closed() && self.stderr.wait_closed();
        assert!(closed, "{} did not exit", self.label);
        self.child.wait().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
                self.label,
                self.stdout.snapshot().join("\n"),
                self.label,
                self.stderr.snapshot().join("\n")
            );
        }
    }
}

/// Runs `mcchat ARGS` to completion; returns (status, stdout, stderr).
pub fn run(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("MCCHAT_NAME")
        .env("MCCHAT_ROOMS", shipped_rooms())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    output(cmd)
}

/// Runs `cmd` to completion; returns (status, stdout, stderr).
pub fn output(mut cmd: Command) -> (ExitStatus, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain UDP socket that sends raw datagrams to a group over `lo`, as `socat` would.
pub fn raw_sender() -> UdpSocket {
    let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    s.set_multicast_ttl_v4(1).unwrap();
    s
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let p = std::env::temp_dir().join(unique("mcchat-test-"));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The group of a derived room, as `mcchat` computes it (checked against the output).
pub fn group_of(stderr_line: &str) -> SocketAddr {
    stderr_line
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no group in {stderr_line:?}"))
}

/// A LAN of network namespaces from scripts/lan.sh, torn down on drop.
pub struct Lan {
    pub prefix: String,
}

impl Lan {
    pub fn up() -> Self {
        let prefix = unique("l");
        let prefix: String = prefix.chars().filter(char::is_ascii_alphanumeric).collect();
        let script = lan_script();
        let out = Command::new("bash")
            .arg(&script)
            .args(["up", &prefix])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lan.sh up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { prefix }
    }

    /// The namespace of host `h1`..`h4` or router `r`.
    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }
}

fn lan_script() -> PathBuf {
    std::env::var_os("MCCHAT_LAN_SCRIPT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/lan.sh"),
        PathBuf::from,
    )
}

impl Drop for Lan {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(lan_script())
            .args(["down", &self.prefix])
            .output();
    }
}

/// A load's schedule: step `i` is due `interval * i` after the start. It shapes the load
/// (a rate); it is not synchronisation.
pub struct Pace {
    start: Instant,
    interval: Duration,
}

impl Pace {
    pub fn new(interval: Duration) -> Self {
        Self {
            start: Instant::now(),
            interval,
        }
    }

    /// Sleeps until step `i` is due (at once if it is late).
    pub fn until(&self, i: u64) {
        let due = self.start
            + self
                .interval
                .saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// The relay address a daemon logged when it bound ("relaying on UDP ... bound=ADDR").
pub fn relay_addr(d: &Proc) -> SocketAddr {
    logged_addr(d, "relaying on UDP")
}

/// The address in the `bound=` field of the first stderr line containing `needle`.
pub fn logged_addr(d: &Proc, needle: &str) -> SocketAddr {
    let line = d.expect_err(needle);
    line.rsplit("bound=")
        .next()
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .parse()
        .unwrap_or_else(|_| panic!("no address in {line:?}"))
}

/// An mcchatd on 127.0.0.1, any port, no status socket, with `extra` flags; and its relay
/// address.
pub fn local_daemon(extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--status-socket", ""];
    args.extend_from_slice(extra);
    let d = Proc::daemon(None, &args);
    let addr = relay_addr(&d);
    (d, addr)
}

impl Lan {
    /// Adds addresses (`ADDR/LEN`) to `host`'s eth0 with `scripts/lan.sh addr`: IPv6 ones
    /// without duplicate address detection, so every one is usable when this returns.
    pub fn add_addrs(&self, host: &str, addrs: &[&str]) {
        let out = Command::new("bash")
            .arg(lan_script())
            .args(["addr", &self.prefix, host])
            .args(addrs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "lan.sh addr {} {host} {addrs:?} failed: {}{}",
            self.prefix,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Proc {
    /// Waits for a stderr line containing any of `needles` and returns it: a readiness line
    /// and the known failure line for it are told apart at once, not after the cap.
    pub fn expect_err_any(&self, needles: &[&str]) -> String {
        let what = needles.join(" or ");
        self.stderr
            .wait_for(&what, |l| needles.iter().any(|n| l.contains(n)))
            .unwrap_or_else(|lines| self.fail(&what, "stderr", &lines))
    }

    /// Waits for a stderr line that satisfies `pred` (`what` names it in a failure).
    pub fn expect_err_where(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.stderr
            .wait_for(what, pred)
            .unwrap_or_else(|lines| self.fail(what, "stderr", &lines))
    }

    /// How many stdout lines so far contain `needle`.
    pub fn count_out(&self, needle: &str) -> usize {
        self.stdout().iter().filter(|l| l.contains(needle)).count()
    }
}

/// The `(sender, text)` of every `kind: message` line a `listen --json` printed so far, in
/// order.
pub fn json_messages(p: &Proc) -> Vec<(String, String)> {
    p.stdout()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "message")
        .map(|v| {
            let field = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
            (field("sender"), field("text"))
        })
        .collect()
}

/// The cookie mcchatd at `daemon` issues to `sock`'s address and port: a padded `sub`
/// without one, answered with a challenge (nothing is subscribed), as `mcchat send --via`
/// proves its address. Datagrams with it in front are relayed as a proven source's.
pub fn cookie_for(sock: &UdpSocket, room: &str, daemon: SocketAddr) -> String {
    let mut sub = String::new();
    mcchat_core::wire::relay_request(
        mcchat_core::wire::Kind::Subscribe,
        room,
        "tester",
        None,
        None,
        mcchat_core::wire::MIN_RELAY_REQUEST,
        &mut sub,
    )
    .unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    sock.send_to(sub.as_bytes(), daemon).unwrap();
    let mut buf = [0u8; 2048];
    let n = sock.recv(&mut buf).expect("a challenge from mcchatd");
    let f = mcchat_core::wire::decode(&buf[..n]).unwrap();
    f.tags.get("cookie").expect("a cookie").into_owned()
}

/// `data` with `cookie` as its first (hop-by-hop) tag.
pub fn with_cookie(data: &[u8], cookie: &str) -> Vec<u8> {
    let mut out = Vec::new();
    mcchat_core::tags::add_hop_tag(data, "cookie", cookie, &mut out).unwrap();
    out
}
