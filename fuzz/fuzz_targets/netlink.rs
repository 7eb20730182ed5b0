//! The firewall's netlink code. The input is read twice: as a datagram from the kernel, which
//! the acknowledgement and notification parsers must take whatever it holds; and as a set of
//! bans to lift and make, whose batch is built and then read back here, independently of the
//! builder, to check that it says exactly what was asked.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sentinel_user::{
    firewall::IpNet,
    fuzzing::{
        SET_V4, SET_V6, TABLE, netlink_abi::*, netlink_batch, netlink_error_codes,
        netlink_removes_from_our_table,
    },
};

#[derive(Arbitrary, Debug)]
struct Change {
    remove: bool,
    v6: bool,
    address: u128,
    prefix_len: u8,
    timeout_ms: Option<u64>,
    /// Copies beyond the first (up to 63), so that inputs of a few hundred bytes make batches
    /// too large for one message per set; more would slow every run down.
    copies: u8,
}

#[derive(Arbitrary, Debug)]
struct Transaction {
    first_sequence: u32,
    changes: Vec<Change>,
}

fuzz_target!(|data: &[u8]| {
    netlink_error_codes(data);
    netlink_removes_from_our_table(data);
    if let Ok(transaction) = Transaction::arbitrary_take_rest(Unstructured::new(data)) {
        check_batch(&transaction);
    }
});

/// One start element and, unless the network reaches the top of the address space, one end
/// element holding the address after it.
#[derive(Debug, PartialEq)]
struct Interval {
    start: IpAddr,
    end: Option<IpAddr>,
    timeout_ms: Option<u64>,
}

fn check_batch(transaction: &Transaction) {
    let mut removed = Vec::new();
    let mut added = Vec::new();
    for change in &transaction.changes {
        let net = if change.v6 {
            let address = Ipv6Addr::from_bits(change.address);
            IpNet::new(address.into(), change.prefix_len % 129)
        } else {
            let address = Ipv4Addr::from_bits(change.address as u32);
            IpNet::new(address.into(), change.prefix_len % 33)
        }
        .expect("the prefix length fits the family");
        let count = usize::from(change.copies % 64) + 1;
        if change.remove {
            removed.extend(std::iter::repeat_n(net, count));
        } else {
            added.extend(std::iter::repeat_n((net, change.timeout_ms), count));
        }
    }
    let batch = netlink_batch(transaction.first_sequence, &removed, &added);

    // Deletions first, each set's networks in the order given, the IPv4 set before the IPv6 set.
    let removals: Vec<_> = removed.iter().map(|net| (*net, None)).collect();
    let mut expected = Vec::new();
    for (operation, elements) in [
        (NFT_MSG_DELSETELEM, &removals),
        (NFT_MSG_NEWSETELEM, &added),
    ] {
        for (set, v4) in [(SET_V4, true), (SET_V6, false)] {
            let intervals: Vec<_> = elements
                .iter()
                .filter(|(net, _)| net.is_ipv4() == v4)
                .map(|(net, timeout_ms)| interval(*net, *timeout_ms))
                .collect();
            if !intervals.is_empty() {
                expected.push((operation, set.to_owned(), intervals));
            }
        }
    }

    let messages = messages(&batch);
    let (first, rest) = messages.split_first().expect("a batch begins");
    let (last, elements) = rest.split_last().expect("a batch ends");
    assert_eq!(
        (first.kind, last.kind),
        (NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END)
    );
    for delimiter in [first, last] {
        assert_eq!(delimiter.resource_id, NFNL_SUBSYS_NFTABLES);
        assert!(delimiter.payload.is_empty());
    }
    for (offset, message) in messages.iter().enumerate() {
        let sequence = transaction.first_sequence.wrapping_add(offset as u32);
        assert_eq!(message.sequence, sequence, "sequence numbers count up");
    }
    // Only the last element message asks for an acknowledgement.
    for (index, message) in messages.iter().enumerate() {
        let acknowledged = !elements.is_empty() && index == elements.len();
        assert_eq!(message.flags & NLM_F_ACK != 0, acknowledged);
    }

    // Consecutive messages for the same set are one list split to keep attributes short.
    let mut found: Vec<(u16, String, Vec<Interval>)> = Vec::new();
    for message in elements {
        assert_eq!(message.kind >> 8, NFNL_SUBSYS_NFTABLES);
        assert_eq!(message.family, NFPROTO_INET);
        let operation = message.kind & 0xff;
        let (set, intervals) = element_list(message.payload);
        match found.last_mut() {
            Some((last_operation, last_set, list))
                if *last_operation == operation && *last_set == set =>
            {
                list.extend(intervals);
            }
            _ => found.push((operation, set, intervals)),
        }
    }
    assert_eq!(found, expected);

    // The batch is no answer, and holds a removal from Sentinel's table exactly when it lifts bans.
    assert!(netlink_error_codes(&batch).is_empty());
    assert_eq!(netlink_removes_from_our_table(&batch), !removed.is_empty());
}

fn interval(net: IpNet, timeout_ms: Option<u64>) -> Interval {
    let end = match net.last() {
        IpAddr::V4(last) => last
            .to_bits()
            .checked_add(1)
            .map(|bits| Ipv4Addr::from_bits(bits).into()),
        IpAddr::V6(last) => last
            .to_bits()
            .checked_add(1)
            .map(|bits| Ipv6Addr::from_bits(bits).into()),
    };
    Interval {
        start: net.network(),
        end,
        timeout_ms,
    }
}

struct Message<'a> {
    kind: u16,
    flags: u16,
    sequence: u32,
    family: u8,
    resource_id: u16,
    payload: &'a [u8],
}

/// The messages of a datagram, which must fill it exactly.
fn messages(mut datagram: &[u8]) -> Vec<Message<'_>> {
    let mut messages = Vec::new();
    while !datagram.is_empty() {
        let length = u32::from_ne_bytes(datagram[..4].try_into().unwrap()) as usize;
        assert!(
            length >= 20 && length % 4 == 0 && length <= datagram.len(),
            "length {length}"
        );
        let message = &datagram[..length];
        messages.push(Message {
            kind: u16::from_ne_bytes(message[4..6].try_into().unwrap()),
            flags: u16::from_ne_bytes(message[6..8].try_into().unwrap()),
            sequence: u32::from_ne_bytes(message[8..12].try_into().unwrap()),
            family: message[16],
            resource_id: u16::from_be_bytes(message[18..20].try_into().unwrap()),
            payload: &message[20..],
        });
        datagram = &datagram[length..];
    }
    messages
}

/// The attributes in `bytes` as (type, payload), each padded to 4 bytes and filling it exactly.
fn attributes(mut bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut attributes = Vec::new();
    while !bytes.is_empty() {
        let length = u16::from_ne_bytes(bytes[..2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(bytes[2..4].try_into().unwrap());
        let padded = length.div_ceil(4) * 4;
        assert!(
            length >= 4 && padded <= bytes.len(),
            "attribute length {length}"
        );
        attributes.push((kind, &bytes[4..length]));
        bytes = &bytes[padded..];
    }
    attributes
}

fn nested(kind: u16) -> u16 {
    kind | NLA_F_NESTED
}

/// A set element message's set name and intervals; the table must be Sentinel's.
fn element_list(payload: &[u8]) -> (String, Vec<Interval>) {
    let [(1, table), (2, set), (list_type, list)] = attributes(payload)[..] else {
        panic!("not table, set, elements");
    };
    assert_eq!(table, nul_terminated(TABLE));
    assert_eq!(list_type, nested(3));
    let set = std::str::from_utf8(set.strip_suffix(b"\0").expect("a C string"))
        .expect("UTF-8")
        .to_owned();
    let mut intervals: Vec<Interval> = Vec::new();
    for (kind, element) in attributes(list) {
        assert_eq!(kind, nested(1), "a list element");
        match attributes(element)[..] {
            [(key, data)] if key == nested(1) => intervals.push(Interval {
                start: address(data),
                end: None,
                timeout_ms: None,
            }),
            [(key, data), (4, timeout)] if key == nested(1) => intervals.push(Interval {
                start: address(data),
                end: None,
                timeout_ms: Some(u64::from_be_bytes(timeout.try_into().expect("8 bytes"))),
            }),
            [(3, flags), (key, data)] if key == nested(1) => {
                assert_eq!(flags, NFT_SET_ELEM_INTERVAL_END.to_be_bytes());
                let start = intervals.last_mut().expect("an end follows its start");
                assert_eq!(start.end.replace(address(data)), None, "one end per start");
            }
            _ => panic!("not a start or end element"),
        }
    }
    (set, intervals)
}

/// The address in a key's data attribute.
fn address(key: &[u8]) -> IpAddr {
    match attributes(key)[..] {
        [(1, octets)] => match octets.len() {
            4 => Ipv4Addr::from(<[u8; 4]>::try_from(octets).unwrap()).into(),
            16 => Ipv6Addr::from(<[u8; 16]>::try_from(octets).unwrap()).into(),
            other => panic!("a {other}-byte address"),
        },
        _ => panic!("not a data value"),
    }
}

fn nul_terminated(name: &str) -> Vec<u8> {
    [name.as_bytes(), b"\0"].concat()
}
