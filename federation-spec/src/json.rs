//! Serde helpers used by the generated types: bytes as lowercase hex and enums by their
//! protobuf names, so that test vectors read the same in any language.

use serde::{Deserialize, Deserializer, Serializer};

/// `bytes` fields as lowercase hex strings.
pub mod hex {
    use super::*;
    use bytes::Bytes;

    /// Serializes bytes as hex.
    pub fn serialize<S: Serializer>(value: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&::hex::encode(value))
    }

    /// Parses hex into bytes.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        ::hex::decode(text)
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// `repeated bytes` fields as lists of hex strings.
pub mod hex_vec {
    use super::*;
    use bytes::Bytes;
    use serde::ser::SerializeSeq;

    /// Serializes a list of byte strings as hex.
    pub fn serialize<S: Serializer>(value: &[Bytes], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(value.len()))?;
        for item in value {
            seq.serialize_element(&::hex::encode(item))?;
        }
        seq.end()
    }

    /// Parses a list of hex strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Bytes>, D::Error> {
        let items = Vec::<String>::deserialize(d)?;
        items
            .into_iter()
            .map(|t| {
                ::hex::decode(t)
                    .map(Bytes::from)
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

/// Defines a serde module for an `i32` field holding a protobuf enum, using the enum's names.
/// Unknown numbers (from a newer peer) are written as numbers and read back unchanged.
macro_rules! enum_by_name {
    ($module:ident, $ty:ty) => {
        #[doc = concat!("`", stringify!($ty), "` fields by name.")]
        pub mod $module {
            use super::*;

            /// Serializes the enum value by name.
            pub fn serialize<S: Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
                match <$ty>::try_from(*value) {
                    Ok(known) => s.serialize_str(known.as_str_name()),
                    Err(_) => s.serialize_i32(*value),
                }
            }

            /// Reads the enum value from its name or number.
            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum NameOrNumber {
                    Name(String),
                    Number(i32),
                }
                match NameOrNumber::deserialize(d)? {
                    NameOrNumber::Number(n) => Ok(n),
                    NameOrNumber::Name(name) => <$ty>::from_str_name(&name)
                        .map(|v| v as i32)
                        .ok_or_else(|| serde::de::Error::custom(format!("unknown name {name}"))),
                }
            }
        }
    };
}

enum_by_name!(lane, crate::proto::Lane);
enum_by_name!(role, crate::proto::Role);
enum_by_name!(binding, crate::proto::Binding);
enum_by_name!(error_code, crate::proto::ErrorCode);
enum_by_name!(receipt_kind, crate::proto::ReceiptKind);
enum_by_name!(campaign_state, crate::proto::CampaignState);
