//! `sendmmsg(2)`: several datagrams, each to its own destination, in one system call, through
//! rustix (whose wrapper is safe, so this crate stays free of `unsafe`).
//!
//! Why: a send to a group that has a receiver on this host (another program, or the
//! daemon's own group socket) delivers it within the call and wakes that receiver, and the
//! scheduler preempts the sender as the call returns. One `sendto` per datagram pays a system
//! call and, under load, a context switch for each. The relay sends a wake-up's worth of
//! group datagrams in one call instead: the wake-ups still happen, but the sender is preempted
//! once per batch. What it bought is modest (docs/PERFORMANCE.md, 2026-12-04): at 40,000
//! messages a second a wake-up holds about two, and the CPU per message moved within noise;
//! at saturation, where batches are larger, throughput rose from 0.49 to 0.52 of the kernel
//! path (one run each).
//!
//! Only for sends whose source the kernel chooses (multicast): rustix has no `IP_PKTINFO`
//! control message, and the replies that need one go out through quinn-udp one at a time.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::AsFd;

use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};

/// Datagrams one call carries at most (Linux takes up to `UIO_MAXIOV`, 1,024; a wake-up of
/// the relay loop reads at most quinn-udp's receive batch, so more would seldom be used).
pub(crate) const MAX: usize = 64;

/// Sends the first [`MAX`] of `items` (destination, bytes) in one `sendmmsg(2)`, with no
/// control messages and no flags. Returns how many the kernel took, at least one; an error
/// means the first one failed (`WouldBlock` when the send buffer is full), and the caller
/// decides whether to skip it. A later failure ends the call early, and the next call
/// starting from there reports it.
pub(crate) fn send<B: AsRef<[u8]>>(
    sock: &impl AsFd,
    items: &[(SocketAddr, B)],
) -> io::Result<usize> {
    let items = &items[..items.len().min(MAX)];
    if items.is_empty() {
        return Ok(0);
    }
    let addrs: Vec<SocketAddrAny> = items
        .iter()
        .map(|(to, _)| SocketAddrAny::from(*to))
        .collect();
    let iovs: Vec<[IoSlice<'_>; 1]> = items
        .iter()
        .map(|(_, data)| [IoSlice::new(data.as_ref())])
        .collect();
    let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = items
        .iter()
        .map(|_| SendAncillaryBuffer::default())
        .collect();
    let mut msgs: Vec<MMsgHdr<'_>> = addrs
        .iter()
        .zip(&iovs)
        .zip(controls.iter_mut())
        .map(|((addr, iov), control)| MMsgHdr::new_with_addr(addr, iov, control))
        .collect();
    rustix::net::sendmmsg(sock, &mut msgs, SendFlags::empty()).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    #[test]
    fn each_datagram_reaches_its_own_destination_whole() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx: Vec<UdpSocket> = (0..3)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let items: Vec<(SocketAddr, Vec<u8>)> = rx
            .iter()
            .enumerate()
            .map(|(i, r)| (r.local_addr().unwrap(), vec![b'a' + i as u8; 10 + i * 100]))
            .collect();
        assert_eq!(send(&tx, &items).unwrap(), 3);
        for (r, (_, data)) in rx.iter().zip(&items) {
            let mut buf = [0u8; 512];
            let (n, from) = r.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], data.as_slice());
            assert_eq!(from, tx.local_addr().unwrap());
        }
    }

    #[test]
    fn one_call_takes_at_most_max() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let items: Vec<(SocketAddr, [u8; 4])> = (0..MAX + 5).map(|_| (to, [1; 4])).collect();
        assert_eq!(send(&tx, &items).unwrap(), MAX);
        assert_eq!(send(&tx, &items[MAX..]).unwrap(), 5);
        assert_eq!(send(&tx, &items[..0]).unwrap(), 0);
    }

    #[test]
    fn a_first_datagram_the_kernel_refuses_is_the_error() {
        // An IPv6 destination on an IPv4 socket: refused before anything is sent.
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let items = [("[::1]:9".parse::<SocketAddr>().unwrap(), [0u8; 4])];
        assert!(send(&tx, &items).is_err());
    }
}
