//! An IP network (address plus prefix length), the unit of a ban.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use crate::Error;

/// An IPv4 or IPv6 network with its host bits cleared; a single address is a /32 or /128.
///
/// Ordered by family, then network address, then prefix length, so a wider network sorts
/// just before the narrower ones that share its first address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IpNet {
    network: IpAddr,
    prefix_len: u8,
}

impl IpNet {
    /// The network of `addr` with `prefix_len` leading bits; the host bits are cleared.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, Error> {
        if prefix_len > address_bits(addr) {
            return Err(Error::InvalidPrefixLength { addr, prefix_len });
        }
        let network = from_bits(addr, to_bits(addr) & network_mask(addr, prefix_len));
        Ok(Self {
            network,
            prefix_len,
        })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn is_ipv4(&self) -> bool {
        self.network.is_ipv4()
    }

    /// The highest address inside the network.
    pub fn last(&self) -> IpAddr {
        let host_bits = !network_mask(self.network, self.prefix_len);
        from_bits(self.network, to_bits(self.network) | host_bits)
    }

    /// Whether `other` lies entirely inside this network (a network contains itself).
    pub fn contains(&self, other: &IpNet) -> bool {
        self.network.is_ipv4() == other.network.is_ipv4()
            && self.prefix_len <= other.prefix_len
            && to_bits(other.network) & network_mask(self.network, self.prefix_len)
                == to_bits(self.network)
    }

    /// This network widened to at most `prefix_len` bits; wider networks are returned as they are.
    pub fn widened_to(self, prefix_len: u8) -> Self {
        if prefix_len >= self.prefix_len {
            return self;
        }
        Self::new(self.network, prefix_len).expect("a shorter prefix is always valid")
    }
}

impl From<IpAddr> for IpNet {
    fn from(addr: IpAddr) -> Self {
        Self {
            network: addr,
            prefix_len: address_bits(addr),
        }
    }
}

impl From<Ipv4Addr> for IpNet {
    fn from(addr: Ipv4Addr) -> Self {
        IpAddr::V4(addr).into()
    }
}

impl From<Ipv6Addr> for IpNet {
    fn from(addr: Ipv6Addr) -> Self {
        IpAddr::V6(addr).into()
    }
}

/// Prints a single address without a prefix length, like `nft` does.
impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix_len == address_bits(self.network) {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.prefix_len)
        }
    }
}

/// Accepts `192.0.2.7`, `192.0.2.0/24`, `2001:db8::1` and `2001:db8::/64`.
impl FromStr for IpNet {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || Error::InvalidNet(text.to_owned());
        match text.split_once('/') {
            None => text
                .parse::<IpAddr>()
                .map(Self::from)
                .map_err(|_| invalid()),
            Some((addr, prefix_len)) => {
                let addr = addr.parse().map_err(|_| invalid())?;
                let prefix_len = prefix_len.parse().map_err(|_| invalid())?;
                Self::new(addr, prefix_len)
            }
        }
    }
}

/// As text (`198.51.100.7`, `2001:db8::/64`), the way operators write it.
impl serde::Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn address_bits(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn to_bits(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => u32::from(v4).into(),
        IpAddr::V6(v6) => v6.into(),
    }
}

/// `bits` as an address of the same family as `family`; IPv4 keeps the low 32 bits.
fn from_bits(family: IpAddr, bits: u128) -> IpAddr {
    match family {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(bits as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(bits)),
    }
}

/// The leading `prefix_len` bits set, within the address width of `family`.
fn network_mask(family: IpAddr, prefix_len: u8) -> u128 {
    let width = u32::from(address_bits(family));
    let all = u128::MAX >> (128 - width);
    let host_bits = width - u32::from(prefix_len);
    all.checked_shl(host_bits).unwrap_or(0) & all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn clears_host_bits_and_prints_like_nft() {
        assert_eq!(net("192.0.2.77/24").to_string(), "192.0.2.0/24");
        assert_eq!(net("2001:db8:1:2:3::9/64").to_string(), "2001:db8:1:2::/64");
        assert_eq!(net("192.0.2.7/32").to_string(), "192.0.2.7");
        assert_eq!(net("0.0.0.0/0").last().to_string(), "255.255.255.255");
        assert_eq!(net("192.0.2.0/25").last().to_string(), "192.0.2.127");
    }

    #[test]
    fn rejects_bad_input() {
        assert!("192.0.2.1/33".parse::<IpNet>().is_err());
        assert!("2001:db8::/129".parse::<IpNet>().is_err());
        assert!("example".parse::<IpNet>().is_err());
    }

    #[test]
    fn containment_respects_family_and_width() {
        assert!(net("192.0.2.0/24").contains(&net("192.0.2.9")));
        assert!(net("192.0.2.0/24").contains(&net("192.0.2.0/24")));
        assert!(!net("192.0.2.9").contains(&net("192.0.2.0/24")));
        assert!(!net("192.0.3.0/24").contains(&net("192.0.2.9")));
        assert!(!net("::/0").contains(&net("192.0.2.9")));
        assert!(net("0.0.0.0/0").contains(&net("192.0.2.9")));
    }

    #[test]
    fn widening_only_shortens_the_prefix() {
        assert_eq!(net("2001:db8::5").widened_to(64), net("2001:db8::/64"));
        assert_eq!(net("2001:db8::/48").widened_to(64), net("2001:db8::/48"));
    }
}
