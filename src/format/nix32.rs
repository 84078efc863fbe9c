//! Nix's base-32 ("nix32") encoding.
//!
//! Alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `u`, `t`). Unlike RFC 4648,
//! Nix emits the *last* 5-bit group first: character `n` of the output (counting from
//! the end) holds bits `5n .. 5n+5` of the input read as a little-endian number. An input
//! of `len` bytes encodes to `ceil(8 * len / 5)` characters.

use thiserror::Error;

pub const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a nix32 string could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Nix32Error {
    #[error("invalid nix32 character {0:?} (allowed: 0-9 and a-z without e, o, u, t)")]
    InvalidChar(char),
    #[error("nix32 string has {got} characters, expected {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("nix32 string has non-zero padding bits")]
    NonZeroPadding,
}

/// Number of nix32 characters needed for `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    (len * 8).div_ceil(5)
}

/// Encodes bytes as nix32.
pub fn encode(input: &[u8]) -> String {
    let len = encoded_len(input.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        let low = input[i] as u16 >> j;
        let high = if i + 1 < input.len() {
            (input[i + 1] as u16) << (8 - j)
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Option<u8> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8)
}

/// Decodes a nix32 string into exactly `N` bytes.
pub fn decode_exact<const N: usize>(s: &str) -> Result<[u8; N], Nix32Error> {
    let expected = encoded_len(N);
    if s.len() != expected {
        return Err(Nix32Error::WrongLength {
            got: s.chars().count(),
            expected,
        });
    }
    let mut out = [0u8; N];
    for (n, c) in s.bytes().rev().enumerate() {
        let d = digit(c).ok_or(Nix32Error::InvalidChar(c as char))? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (d << j) as u8;
        let carry = d >> (8 - j);
        if i + 1 < N {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Nix32Error::NonZeroPadding);
        }
    }
    Ok(out)
}

/// True when every character of `s` is in the nix32 alphabet.
pub fn is_nix32(s: &str) -> bool {
    s.bytes().all(|c| digit(c).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_from_nix() {
        // `nix-hash --type sha256 --to-base32` of SHA-256("") as printed by Nix 2.8.
        let empty = [
            0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f,
            0xb9, 0x24, 0x27, 0xae, 0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b,
            0x78, 0x52, 0xb8, 0x55,
        ];
        assert_eq!(
            encode(&empty),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(decode_exact::<32>(&encode(&empty)).unwrap(), empty);
    }

    #[test]
    fn encoded_lengths_for_every_input_length() {
        for len in 0..70usize {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(encode(&bytes).len(), encoded_len(len), "{len}");
        }
    }

    /// Every width Nix decodes (store-path hashes, SHA-256, signatures' 64 bytes), on
    /// several byte patterns each.
    #[test]
    fn round_trip_every_decoded_width() {
        fn check<const N: usize>() {
            for seed in [0usize, 1, 37, 255] {
                let bytes: [u8; N] = std::array::from_fn(|i| (i * 37 + seed) as u8);
                assert_eq!(
                    decode_exact::<N>(&encode(&bytes)).unwrap(),
                    bytes,
                    "{N}/{seed}"
                );
            }
            assert_eq!(decode_exact::<N>(&encode(&[0xff; N])).unwrap(), [0xff; N]);
        }
        check::<20>();
        check::<32>();
        check::<64>();
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            decode_exact::<20>("e0000000000000000000000000000000"),
            Err(Nix32Error::InvalidChar('e'))
        );
        assert!(matches!(
            decode_exact::<20>("000"),
            Err(Nix32Error::WrongLength { .. })
        ));
        // 52 chars carry 260 bits; the top 4 must be zero for 32 bytes.
        assert_eq!(
            decode_exact::<32>("z000000000000000000000000000000000000000000000000000"),
            Err(Nix32Error::NonZeroPadding)
        );
    }
}
