//! The web port's own threads. Writing one chat line to 100 browsers is 100 TCP sends, and on
//! loopback or a LAN each send carries the kernel's delivery with it (about 70% of the relay
//! thread's time in the WebSocket benchmark was `send(2)`). On the relay loop's one thread those
//! sends queue behind each other and behind the loop's own work, so the last browser's
//! latency grows with the room. The web connections (accepting, reading, writing) therefore
//! run on a small multi-threaded runtime of their own; the driver reaches them only through
//! their queues ([`super::ToConn`]), as before, and they reach it through [`super::WebEvent`]s.

use std::io;

use tokio::runtime::{Builder, Handle, Runtime};

/// Worker threads at most: the sends scale with cores until the relay loop wants its own.
const MAX_THREADS: usize = 4;

/// The web runtime; dropped (even during a panic, or inside another runtime) without blocking.
#[derive(Debug)]
pub(crate) struct WebRuntime(Option<Runtime>);

impl WebRuntime {
    /// One worker per core, at most [`MAX_THREADS`].
    pub(crate) fn start() -> io::Result<Self> {
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(MAX_THREADS);
        let rt = Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("web")
            .enable_all()
            .build()?;
        Ok(Self(Some(rt)))
    }

    pub(crate) fn handle(&self) -> Option<Handle> {
        self.0.as_ref().map(|rt| rt.handle().clone())
    }
}

impl Drop for WebRuntime {
    /// The driver has already waited (bounded) for the web tasks; whatever is left is dropped
    /// here without waiting, which is also the only way a runtime may be dropped from inside
    /// another.
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}
