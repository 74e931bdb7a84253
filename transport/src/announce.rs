//! Network identity after switchover: the destination announces each guest MAC on a host interface, so that switches
//! learn the MAC's new port at once, as QEMU's announce-self does.
//!
//! Each announcement is a RARP "reverse request" (ethertype 0x8035) from the guest's MAC to the broadcast address,
//! with the MAC as sender and target hardware address and zero protocol addresses: the frame QEMU sends. A RARP
//! frame is chosen over gratuitous ARP because it needs no guest IP address. Rounds are spaced by growing gaps
//! ([`Schedule`]), because a switch or a link may still be settling when the first one leaves. Frames go out through
//! an `AF_PACKET` socket bound to the interface.

use crate::link::socklen_of;
use std::time::Duration;

/// The RARP ethertype.
pub const ETH_P_RARP: u16 = 0x8035;

/// When to send: `rounds` rounds, the first gap `initial`, each next one `step` longer, never more than `max`
/// (QEMU's defaults: 5 rounds, 50 ms, +100 ms, at most 550 ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Rounds; each sends one frame per MAC.
    pub rounds: u32,
    /// Gap after the first round.
    pub initial: Duration,
    /// How much each gap grows.
    pub step: Duration,
    /// The longest gap.
    pub max: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            rounds: 5,
            initial: Duration::from_millis(50),
            step: Duration::from_millis(100),
            max: Duration::from_millis(550),
        }
    }
}

impl Schedule {
    /// The gap after round `i` (0-based).
    pub fn gap(&self, i: u32) -> Duration {
        (self.initial + self.step * i).min(self.max)
    }
}

/// Why announcing failed.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The interface does not exist.
    #[error("no interface named {0}")]
    NoInterface(String),
    /// The packet socket failed (opening it needs CAP_NET_RAW).
    #[error("packet socket on {iface}: {source}")]
    Socket {
        /// The interface.
        iface: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The announcement frame for `mac`: 60 bytes (the Ethernet minimum, without FCS).
pub fn rarp_frame(mac: [u8; 6]) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]); // broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    f[18] = 6; // hardware address length
    f[19] = 4; // protocol address length
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac); // sender hardware address
    f[32..38].copy_from_slice(&mac); // target hardware address; both protocol addresses stay 0.0.0.0
    f
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    parts.try_into().ok()
}

/// Announces every MAC in `macs` on `iface`, `schedule.rounds` times with growing gaps. Returns the frames sent.
pub fn announce(iface: &str, macs: &[[u8; 6]], schedule: Schedule) -> Result<usize, AnnounceError> {
    let name = std::ffi::CString::new(iface).map_err(|_| AnnounceError::NoInterface(iface.into()))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(AnnounceError::NoInterface(iface.into()));
    }
    let err = |source| AnnounceError::Socket { iface: iface.into(), source };
    // SAFETY: plain socket(2); the descriptor is owned by `fd` below and closed when it drops.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_RARP.to_be())) };
    if raw < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
    // SAFETY: an all-zero sockaddr_ll is a valid value to fill in.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::sa_family_t::try_from(libc::AF_PACKET).expect("AF_PACKET is a small constant");
    addr.sll_protocol = ETH_P_RARP.to_be();
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    let mut sent = 0;
    for round in 0..schedule.rounds {
        for &mac in macs {
            let frame = rarp_frame(mac);
            // SAFETY: sends `frame` (60 bytes, alive across the call) to the address above, sized as a sockaddr_ll.
            let n = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    socklen_of::<libc::sockaddr_ll>(),
                )
            };
            if n < 0 {
                return Err(err(std::io::Error::last_os_error()));
            }
            sent += 1;
        }
        if round + 1 < schedule.rounds {
            std::thread::sleep(schedule.gap(round));
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_and_schedule() {
        let mac = parse_mac("52:54:00:12:34:56").unwrap();
        let f = rarp_frame(mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[20..22], &[0, 3]);
        let s = Schedule::default();
        let gaps: Vec<u128> = (0..4).map(|i| s.gap(i).as_millis()).collect();
        assert_eq!(gaps, [50, 150, 250, 350]);
        assert!(parse_mac("52:54:00:12:34").is_none() && parse_mac("zz:54:00:12:34:56").is_none());
        assert!(matches!(announce("no-such-if0", &[mac], s), Err(AnnounceError::NoInterface(_))));
    }
}
