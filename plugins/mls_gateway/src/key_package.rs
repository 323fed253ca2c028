//! Reading the one thing the gateway needs from the MLS bytes of a
//! KeyPackage: its `Lifetime` (RFC 9420 §7.2, carried in the LeafNode of a
//! KeyPackage). The Marmot spec (`foundation/key-packages.md`) makes the
//! lifetime part of validity: "MUST be current at validation time (the
//! validation time is not before `not_before` and not after `not_after`)".
//! A KeyPackage past `not_after` is useless to every inviter, so the gateway
//! stops serving it then.
//!
//! Both publication shapes are read: the framed `MLSMessage` with
//! `wire_format = mls_key_package` that the current spec requires, and the
//! bare `KeyPackage` struct earlier clients publish. Only the framing is
//! checked, never signatures or keys: the gateway learns a date, and clients
//! still validate the KeyPackage themselves before using it.
//!
//! The reading is by hand: `tls_codec` (what openmls uses) debug-asserts on
//! truncated vectors, so a hostile KeyPackage would panic a debug build, and
//! four primitives are all this needs.

/// The MLS KeyPackage's own validity window, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub not_before: u64,
    pub not_after: u64,
}

/// `ProtocolVersion mls10`.
const MLS10: u16 = 1;
/// `WireFormat mls_key_package`.
const WIRE_FORMAT_KEY_PACKAGE: u16 = 5;
/// `LeafNodeSource key_package`: the only source that carries a lifetime.
const LEAF_NODE_SOURCE_KEY_PACKAGE: u8 = 1;
/// `capabilities` has five vectors: versions, cipher suites, extensions,
/// proposals, credentials.
const CAPABILITY_VECTORS: usize = 5;

/// The lifetime of the KeyPackage in `bytes` (framed or bare), or `None`
/// when the bytes are not a KeyPackage this reader can walk to the end.
pub fn lifetime(bytes: &[u8]) -> Option<Lifetime> {
    framed(bytes).and_then(bare).or_else(|| bare(bytes))
}

/// The KeyPackage inside an `MLSMessage` frame, if `bytes` is one.
fn framed(bytes: &[u8]) -> Option<&[u8]> {
    let (version, rest) = read_u16(bytes)?;
    let (wire_format, rest) = read_u16(rest)?;
    (version == MLS10 && wire_format == WIRE_FORMAT_KEY_PACKAGE).then_some(rest)
}

fn read_u8(bytes: &[u8]) -> Option<(u8, &[u8])> {
    let (first, rest) = bytes.split_first()?;
    Some((*first, rest))
}

fn read_u16(bytes: &[u8]) -> Option<(u16, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<2>()?;
    Some((u16::from_be_bytes(*head), rest))
}

fn read_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*head), rest))
}

/// Skips an `opaque<V>` vector: a variable-size length (RFC 9420 §2.1.2:
/// the top two bits of the first byte give 1, 2 or 4 length bytes) and that
/// many bytes.
fn skip_vector(bytes: &[u8]) -> Option<&[u8]> {
    let (first, mut rest) = read_u8(bytes)?;
    let size = match first >> 6 {
        0 => 1,
        1 => 2,
        2 => 4,
        _ => return None,
    };
    let mut length = usize::from(first & 0x3f);
    for _ in 1..size {
        let (next, after) = read_u8(rest)?;
        length = (length << 8) | usize::from(next);
        rest = after;
    }
    rest.get(length..)
}

/// Walks a bare `KeyPackage` struct; every byte must be accounted for.
fn bare(bytes: &[u8]) -> Option<Lifetime> {
    let (version, rest) = read_u16(bytes)?;
    if version != MLS10 {
        return None;
    }
    let (_cipher_suite, rest) = read_u16(rest)?;
    let rest = skip_vector(rest)?; // init_key
    // LeafNode
    let rest = skip_vector(rest)?; // encryption_key
    let rest = skip_vector(rest)?; // signature_key
    let (_credential_type, rest) = read_u16(rest)?;
    // Basic (identity) and X.509 (certificates) are both one vector.
    let mut rest = skip_vector(rest)?;
    for _ in 0..CAPABILITY_VECTORS {
        rest = skip_vector(rest)?;
    }
    let (source, rest) = read_u8(rest)?;
    if source != LEAF_NODE_SOURCE_KEY_PACKAGE {
        return None;
    }
    let (not_before, rest) = read_u64(rest)?;
    let (not_after, rest) = read_u64(rest)?;
    let rest = skip_vector(rest)?; // leaf extensions
    let rest = skip_vector(rest)?; // leaf signature
    let rest = skip_vector(rest)?; // KeyPackage extensions
    let rest = skip_vector(rest)?; // KeyPackage signature
    (rest.is_empty() && not_before <= not_after).then_some(Lifetime { not_before, not_after })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(data: &[u8]) -> Vec<u8> {
        assert!(data.len() < 64, "one-byte length prefix only");
        let mut v = vec![data.len() as u8];
        v.extend_from_slice(data);
        v
    }

    /// A structurally valid KeyPackage (contents are placeholders).
    fn key_package(not_before: u64, not_after: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&MLS10.to_be_bytes());
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend(vector(&[7; 32])); // init_key
        b.extend(vector(&[8; 32])); // encryption_key
        b.extend(vector(&[9; 32])); // signature_key
        b.extend_from_slice(&1u16.to_be_bytes()); // basic credential
        b.extend(vector(&[1; 32]));
        for _ in 0..CAPABILITY_VECTORS {
            b.extend(vector(&[0, 1]));
        }
        b.push(LEAF_NODE_SOURCE_KEY_PACKAGE);
        b.extend_from_slice(&not_before.to_be_bytes());
        b.extend_from_slice(&not_after.to_be_bytes());
        b.extend(vector(&[]));
        b.extend(vector(&[5; 16]));
        b.extend(vector(&[0, 10, 0])); // last_resort, empty data
        b.extend(vector(&[6; 16]));
        b
    }

    #[test]
    fn reads_bare_and_framed_key_packages() {
        let kp = key_package(100, 200);
        assert_eq!(lifetime(&kp), Some(Lifetime { not_before: 100, not_after: 200 }));
        let mut framed = vec![0, 1, 0, 5];
        framed.extend_from_slice(&kp);
        assert_eq!(lifetime(&framed), Some(Lifetime { not_before: 100, not_after: 200 }));
    }

    #[test]
    fn refuses_what_it_cannot_walk_to_the_end() {
        let mut kp = key_package(100, 200);
        kp.push(0);
        assert_eq!(lifetime(&kp), None, "trailing bytes");
        let kp = key_package(100, 200);
        assert_eq!(lifetime(&kp[..kp.len() - 3]), None, "truncated");
        assert_eq!(lifetime(&key_package(300, 200)), None, "window ends before it starts");
        assert_eq!(lifetime(b"not a key package at all"), None);
        assert_eq!(lifetime(&[]), None);
        // A vector length that claims more bytes than there are.
        assert_eq!(lifetime(&[0, 1, 0, 1, 0xbf, 0xff, 0xff, 0xff]), None);
    }
}
