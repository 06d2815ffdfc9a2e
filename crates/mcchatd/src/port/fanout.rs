//! A second sender for large fan-outs. One datagram to thousands of subscribers is as many
//! `sendto(2)` calls, each 3-4 µs on loopback (most of it the kernel's delivery), and on the
//! relay loop's one thread 10,000 of them took 35-40 ms. Above [`SPLIT_AT`] destinations the
//! relay socket gives the second half to this thread, which sends it through a duplicate of
//! the same socket while the loop sends the first half; the loop waits for both halves before
//! its next output, so no subscriber's datagrams are reordered.
//!
//! The thread is started on the first large fan-out (a daemon that never has one has no
//! thread) and ends when its relay socket is dropped: the job channel closes, and the drop
//! waits for the job in hand, which is bounded (a send buffer that stays full for
//! [`STALL_MS`] fails the rest of the job, counted, rather than waiting on).

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use quinn_udp::UdpSocketState;
use tokio::sync::oneshot;

use super::udp::{STALL_MS, SendReport, send_once, stalled, transmit};

/// Fan-outs to at least this many destinations are shared with the second thread. Below it
/// the hand-over (a channel, a wake-up, the answer) costs more than half the sends save.
pub(crate) const SPLIT_AT: usize = 256;

/// One half of a fan-out, for the thread.
struct Job {
    data: Vec<u8>,
    dests: Vec<(SocketAddr, Option<IpAddr>)>,
    done: oneshot::Sender<SendReport>,
}

/// The second sender of one relay socket.
#[derive(Debug)]
pub(crate) struct FanOut {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Datagrams the thread has sent, for tests and benchmarks to see the work split.
    sent: Arc<AtomicU64>,
}

impl FanOut {
    /// Starts the thread, sending through `sock` (a duplicate of the relay socket, bound to
    /// `bound`) with the relay socket's quinn-udp `state`.
    pub(crate) fn start(
        sock: UdpSocket,
        bound: SocketAddr,
        state: Arc<UdpSocketState>,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel::<Job>(1);
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let thread = std::thread::Builder::new()
            .name("fan-out".into())
            .spawn(move || {
                for job in rx {
                    let report = send_all(&sock, bound, &state, &job.dests, &job.data);
                    counter.fetch_add(report.sent as u64, Ordering::Relaxed);
                    let _ = job.done.send(report);
                }
            })?;
        Ok(Self {
            jobs: Some(tx),
            thread: Some(thread),
            sent,
        })
    }

    /// Hands `dests` to the thread; the answer comes when it has sent them. `None` if the
    /// thread has gone (the caller then sends them itself).
    pub(crate) fn submit(
        &self,
        dests: &[(SocketAddr, Option<IpAddr>)],
        data: &[u8],
    ) -> Option<oneshot::Receiver<SendReport>> {
        let (done, answer) = oneshot::channel();
        let job = Job {
            data: data.to_vec(),
            dests: dests.to_vec(),
            done,
        };
        self.jobs.as_ref()?.send(job).ok()?;
        Some(answer)
    }

    /// Datagrams the thread has sent so far.
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

impl Drop for FanOut {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the job in hand (bounded, module doc).
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends `data` to each destination in turn, waiting while the send buffer is full (at most
/// [`STALL_MS`] each time, after which the rest fail).
fn send_all(
    sock: &UdpSocket,
    bound: SocketAddr,
    state: &UdpSocketState,
    dests: &[(SocketAddr, Option<IpAddr>)],
    data: &[u8],
) -> SendReport {
    let mut report = SendReport::default();
    for (i, &(to, src)) in dests.iter().enumerate() {
        let t = match transmit(bound, to, src, data) {
            Ok(t) => t,
            Err(e) => {
                report.fail(to, e);
                continue;
            }
        };
        loop {
            match send_once(sock, state, &t) {
                Ok(()) => report.sent += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLOUT)];
                    match poll(&mut fds, PollTimeout::from(STALL_MS)) {
                        Ok(n) if n > 0 => continue,
                        Ok(_) => {
                            report.fail(to, stalled());
                            report.failed += dests.len() - i - 1;
                            return report;
                        }
                        Err(nix::errno::Errno::EINTR) => continue,
                        Err(errno) => report.fail(to, errno.into()),
                    }
                }
                Err(e) => report.fail(to, e),
            }
            break;
        }
    }
    report
}
