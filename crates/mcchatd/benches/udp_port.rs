//! Fan-out through the relay's UDP port: one 200-byte datagram to 1,000 loopback receivers
//! (127.0.0.1, each its own socket and port), per delivery, against a plain tokio
//! `send_to(...).await` loop on the same kind of socket (today's relay).
//!
//! Only the sends are timed. The receivers are drained, untimed, every few iterations, so
//! datagrams are queued (the kernel's usual path) rather than dropped at a full buffer.
//!
//! It opens sockets, so it runs only in a network namespace that has nothing but lo:
//! `cargo bench -p mcchatd --bench udp_port --no-run`, then run the binary it names under
//! `unshare --net sh -c 'ip link set lo up && exec BINARY --bench'` (as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

use mcchat_core::socket::{self, MulticastConfig};
use mcchatd::port::udp::RelaySocket;

const RECEIVERS: usize = 1000;
/// Iterations between drains: 10 queued datagrams per receiver at most (a few MB in all).
const DRAIN_EVERY: u64 = 10;

fn require_netns() {
    let ifaces = socket::namespace_interfaces().unwrap_or_default();
    assert!(
        ifaces == ["lo"],
        "refusing to open sockets outside a network namespace with only lo ({ifaces:?}); \
         see the header of benches/udp_port.rs"
    );
}

fn drain(receivers: &[UdpSocket]) {
    let mut buf = [0u8; 512];
    for r in receivers {
        while r.recv(&mut buf).is_ok() {}
    }
}

/// Times `iters` fan-outs with `send`, draining between them untimed.
fn timed(iters: u64, receivers: &[UdpSocket], mut send: impl FnMut()) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        if i % DRAIN_EVERY == 0 {
            drain(receivers);
        }
        let start = Instant::now();
        send();
        total += start.elapsed();
    }
    total
}

fn fan_out(c: &mut Criterion) {
    require_netns();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mcast = MulticastConfig::default();
    let port = RelaySocket::open(any, &mcast, false).unwrap();
    let plain =
        tokio::net::UdpSocket::from_std(socket::open_relay(any, &mcast, false).unwrap()).unwrap();
    let receivers: Vec<UdpSocket> = (0..RECEIVERS)
        .map(|_| {
            let s = UdpSocket::bind(any).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let dests: Vec<SocketAddr> = receivers.iter().map(|r| r.local_addr().unwrap()).collect();
    let data = [b'x'; 200];
    let src = Some(IpAddr::from([127, 0, 0, 1]));

    let mut group = c.benchmark_group("udp_port");
    group.throughput(Throughput::Elements(RECEIVERS as u64));
    group.bench_function("tokio_send_to_1000", |b| {
        b.iter_custom(|iters| {
            timed(iters, &receivers, || {
                rt.block_on(async {
                    for d in &dests {
                        plain.send_to(&data, d).await.unwrap();
                    }
                });
            })
        });
    });
    for (name, src) in [("send_many_1000_src", src), ("send_many_1000_nosrc", None)] {
        let items: Vec<_> = dests.iter().map(|d| (*d, src)).collect();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                timed(iters, &receivers, || {
                    let report = rt.block_on(port.send_many(&items, &data));
                    assert_eq!(report.sent, RECEIVERS, "{:?}", report.first_error);
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, fan_out);
criterion_main!(benches);
