//! systemd notifications (`sd_notify(3)`): READY=1 once every socket is bound, RELOADING=1 and
//! READY=1 around a reload, STOPPING=1 on the way out, and watchdog pings. Without
//! `$NOTIFY_SOCKET` (not under systemd) these do nothing. Failures are logged and ignored: the
//! relay works without systemd.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::debug!(%error, "sd_notify failed");
    }
}

/// Start-up is complete.
pub(crate) fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload begins (`Type=notify-reload` needs the monotonic time with it).
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutting down.
pub(crate) fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Still alive.
pub(crate) fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

/// How often to ping the watchdog: half of `WatchdogSec`, or `None` if it is off.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
