//! Netstring framing (<https://cr.yp.to/proto/netstrings.txt>) as Postfix's socketmap
//! client speaks it: `LEN ":" DATA ","` with `LEN` in decimal.
//!
//! The decoder is sans-I/O: it looks at a buffer and says "one frame here, this long",
//! "need more bytes" or "this connection is broken". It never reads past
//! [`MAX_REQUEST`] bytes of payload and rejects an oversize length as soon as its digits
//! say so, before any payload arrives.

use std::ops::Range;

/// Largest request payload accepted (as PMSR: 1024 bytes).
pub const MAX_REQUEST: usize = 1024;

/// Most length digits accepted (`01024` is five; more can only be oversize or silly).
const MAX_DIGITS: usize = 5;

/// Why a byte stream is not a valid sequence of netstrings. The connection that sent it
/// is closed; no other connection is affected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix has a byte other than a digit before `:`, no digit at all, or
    /// more than five digits.
    #[error("netstring length is not a decimal number")]
    BadLength,
    /// The announced length is over the limit.
    #[error("netstring of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Announced length (or a lower bound of it).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is not followed by `,`.
    #[error("netstring is not terminated by ','")]
    BadTerminator,
}

/// One complete frame found at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Where the payload is in the buffer.
    pub payload: Range<usize>,
    /// How many bytes of the buffer the whole frame takes (prefix, payload, `,`).
    pub consumed: usize,
}

/// Look for one netstring at the start of `buf` with a payload of at most `max` bytes.
///
/// `Ok(None)` means the bytes so far are a valid beginning and more are needed.
///
/// ```
/// use stsrelay::socketmap::netstring::{decode, FrameError};
/// let buf = b"11:postfix a.b,5:x";
/// let f = decode(buf, 1024).unwrap().unwrap();
/// assert_eq!(&buf[f.payload.clone()], b"postfix a.b");
/// assert_eq!(decode(&buf[f.consumed..], 1024), Ok(None)); // "5:x" is incomplete
/// assert_eq!(decode(b"2000:", 1024), Err(FrameError::TooLong { len: 2000, max: 1024 }));
/// assert_eq!(decode(b"3:abc;", 1024), Err(FrameError::BadTerminator));
/// ```
pub fn decode(buf: &[u8], max: usize) -> Result<Option<Frame>, FrameError> {
    let mut len: usize = 0;
    let mut digits = 0;
    for (i, &b) in buf.iter().enumerate() {
        match b {
            b'0'..=b'9' => {
                digits += 1;
                len = len * 10 + usize::from(b - b'0');
                if len > max {
                    return Err(FrameError::TooLong { len, max });
                }
                if digits > MAX_DIGITS {
                    return Err(FrameError::BadLength);
                }
            }
            b':' if digits > 0 => {
                let start = i + 1;
                let end = start + len;
                return match buf.get(end) {
                    None => Ok(None),
                    Some(b',') => Ok(Some(Frame {
                        payload: start..end,
                        consumed: end + 1,
                    })),
                    Some(_) => Err(FrameError::BadTerminator),
                };
            }
            _ => return Err(FrameError::BadLength),
        }
    }
    Ok(None)
}

/// Append `payload` as one netstring to `out`.
///
/// ```
/// let mut out = Vec::new();
/// stsrelay::socketmap::netstring::encode(b"NOTFOUND ", &mut out);
/// assert_eq!(out, b"9:NOTFOUND ,");
/// ```
pub fn encode(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(payload);
    out.push(b',');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(mut buf: &[u8]) -> Result<(Vec<Vec<u8>>, usize), FrameError> {
        let mut out = vec![];
        while let Some(f) = decode(buf, MAX_REQUEST)? {
            out.push(buf[f.payload.clone()].to_vec());
            buf = &buf[f.consumed..];
        }
        Ok((out, buf.len()))
    }

    #[test]
    fn several_frames_and_a_partial_one() {
        let (f, rest) = frames(b"5:hello,0:,3:abc,4:ab").unwrap();
        assert_eq!(f, vec![b"hello".to_vec(), vec![], b"abc".to_vec()]);
        assert_eq!(rest, 4);
    }

    #[test]
    fn every_prefix_of_a_valid_frame_asks_for_more() {
        let whole = b"11:postfix x.y,";
        for n in 0..whole.len() {
            assert_eq!(decode(&whole[..n], MAX_REQUEST), Ok(None), "prefix {n}");
        }
        assert!(decode(whole, MAX_REQUEST).unwrap().is_some());
    }

    #[test]
    fn limits_and_malformed_input() {
        assert!(decode(b"1024:", MAX_REQUEST).unwrap().is_none());
        assert_eq!(
            decode(b"1025:", MAX_REQUEST),
            Err(FrameError::TooLong {
                len: 1025,
                max: 1024
            })
        );
        // Rejected from the digits alone, before any payload.
        assert!(matches!(
            decode(b"99999999", MAX_REQUEST),
            Err(FrameError::TooLong { .. })
        ));
        assert_eq!(decode(b"0000001:", MAX_REQUEST), Err(FrameError::BadLength));
        assert_eq!(decode(b":abc,", MAX_REQUEST), Err(FrameError::BadLength));
        assert_eq!(decode(b"-1:", MAX_REQUEST), Err(FrameError::BadLength));
        assert_eq!(decode(b"1 :a,", MAX_REQUEST), Err(FrameError::BadLength));
        assert_eq!(
            decode(b"GET / HTTP/1.0", MAX_REQUEST),
            Err(FrameError::BadLength)
        );
        assert_eq!(decode(b"1:ab", MAX_REQUEST), Err(FrameError::BadTerminator));
        assert_eq!(decode(b"01:a,", MAX_REQUEST).unwrap().unwrap().consumed, 5);
    }

    #[test]
    fn encode_round_trips() {
        for payload in [
            &b""[..],
            b"OK secure match=a.b",
            &[0u8, 255, b',', b':'][..],
        ] {
            let mut out = vec![];
            encode(payload, &mut out);
            let f = decode(&out, usize::MAX).unwrap().unwrap();
            assert_eq!(&out[f.payload], payload);
            assert_eq!(f.consumed, out.len());
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics_and_stays_in_bounds(buf in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            if let Ok(Some(f)) = decode(&buf, 16) {
                proptest::prop_assert!(f.payload.end < f.consumed && f.consumed <= buf.len());
                proptest::prop_assert!(f.payload.len() <= 16);
            }
        }
    }
}
