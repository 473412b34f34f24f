//! Peer ids and `user@platform` addresses (SPEC.md section 3).
//!
//! Both are ASCII so that every platform's database and every language compares them the
//! same way byte for byte; there is no case folding or normalisation to get wrong.

/// Longest peer id, in bytes.
pub const MAX_PEER_ID_LEN: usize = 32;
/// Longest user part of an address, in bytes.
pub const MAX_USER_LEN: usize = 64;
/// Longest address, in bytes: user, `@`, peer id.
pub const MAX_ADDRESS_LEN: usize = MAX_USER_LEN + 1 + MAX_PEER_ID_LEN;

/// Why an address or peer id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty where a value is required.
    #[error("empty")]
    Empty,
    /// Longer than allowed.
    #[error("{len} bytes is longer than the limit of {max}")]
    TooLong {
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// No `@`, or more than one.
    #[error("an address is user@platform with exactly one @")]
    NotOneAt,
    /// A byte outside the allowed set.
    #[error("byte {byte:#04x} at {at} is not allowed in {part}")]
    BadChar {
        /// Offending byte.
        byte: u8,
        /// Its offset in the part.
        at: usize,
        /// "user" or "peer id".
        part: &'static str,
    },
    /// A peer id must not start with a hyphen.
    #[error("a peer id starts with a letter or digit")]
    LeadingHyphen,
}

/// A parsed `user@platform` address, borrowing from its text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address<'a> {
    /// The user part, as the platform names its user.
    pub user: &'a str,
    /// The platform's peer id.
    pub platform: &'a str,
}

/// Checks a peer id: 1 to 32 bytes of `[a-z0-9-]`, not starting with `-`.
pub fn check_peer_id(id: &str) -> Result<(), AddressError> {
    check_len(id, MAX_PEER_ID_LEN)?;
    for (at, byte) in id.bytes().enumerate() {
        if !(byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-') {
            return Err(AddressError::BadChar {
                byte,
                at,
                part: "peer id",
            });
        }
    }
    if id.starts_with('-') {
        return Err(AddressError::LeadingHyphen);
    }
    Ok(())
}

/// Checks a user part: 1 to 64 bytes of `[A-Za-z0-9._+=~-]`.
pub fn check_user(user: &str) -> Result<(), AddressError> {
    check_len(user, MAX_USER_LEN)?;
    for (at, byte) in user.bytes().enumerate() {
        if !(byte.is_ascii_alphanumeric()
            || matches!(byte, b'.' | b'_' | b'+' | b'=' | b'~' | b'-'))
        {
            return Err(AddressError::BadChar {
                byte,
                at,
                part: "user",
            });
        }
    }
    Ok(())
}

/// Parses and checks `user@platform`.
pub fn parse(text: &str) -> Result<Address<'_>, AddressError> {
    check_len(text, MAX_ADDRESS_LEN)?;
    let (user, platform) = text.split_once('@').ok_or(AddressError::NotOneAt)?;
    if platform.contains('@') {
        return Err(AddressError::NotOneAt);
    }
    check_user(user)?;
    check_peer_id(platform)?;
    Ok(Address { user, platform })
}

fn check_len(text: &str, max: usize) -> Result<(), AddressError> {
    match text.len() {
        0 => Err(AddressError::Empty),
        len if len > max => Err(AddressError::TooLong { len, max }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_grammar() {
        let a = parse("Aisha.K+966@alpha-2").unwrap();
        assert_eq!(a.user, "Aisha.K+966");
        assert_eq!(a.platform, "alpha-2");
        let longest = format!(
            "{}@{}",
            "u".repeat(MAX_USER_LEN),
            "p".repeat(MAX_PEER_ID_LEN)
        );
        assert!(parse(&longest).is_ok());
    }

    #[test]
    fn refuses_what_is_outside_it() {
        assert_eq!(parse(""), Err(AddressError::Empty));
        assert_eq!(parse("alice"), Err(AddressError::NotOneAt));
        assert_eq!(parse("a@b@c"), Err(AddressError::NotOneAt));
        assert_eq!(parse("@alpha"), Err(AddressError::Empty));
        assert_eq!(parse("alice@"), Err(AddressError::Empty));
        assert!(matches!(
            parse("al ice@alpha"),
            Err(AddressError::BadChar { byte: b' ', .. })
        ));
        assert!(matches!(
            parse("alice@Alpha"),
            Err(AddressError::BadChar { byte: b'A', .. })
        ));
        assert_eq!(parse("alice@-alpha"), Err(AddressError::LeadingHyphen));
        assert!(matches!(
            parse("алиса@alpha"),
            Err(AddressError::BadChar { .. })
        ));
        let long_user = format!("{}@alpha", "u".repeat(MAX_USER_LEN + 1));
        assert!(matches!(
            parse(&long_user),
            Err(AddressError::TooLong { .. })
        ));
        let long_peer = format!("u@{}", "p".repeat(MAX_PEER_ID_LEN + 1));
        assert!(matches!(
            parse(&long_peer),
            Err(AddressError::TooLong { .. })
        ));
    }
}
