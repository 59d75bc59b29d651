//! Byte sizes written the way people write them: `"16GiB"`, `"7.5 GB"`, `"512MiB"`, `"1024"`.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, parsed from and shown as a human size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A size that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid byte size {0:?}: expected a number with an optional unit B, KB, KiB, MB, MiB, GB, GiB, TB or TiB"
)]
pub struct ParseByteSizeError(String);

const UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1_000),
    ("kb", 1_000),
    ("kib", 1 << 10),
    ("m", 1_000_000),
    ("mb", 1_000_000),
    ("mib", 1 << 20),
    ("g", 1_000_000_000),
    ("gb", 1_000_000_000),
    ("gib", 1 << 30),
    ("t", 1_000_000_000_000),
    ("tb", 1_000_000_000_000),
    ("tib", 1 << 40),
];

impl FromStr for ByteSize {
    type Err = ParseByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseByteSizeError(s.to_owned());
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let mult = UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, m)| *m)
            .ok_or_else(err)?;
        if num.contains('.') {
            let value: f64 = num.parse().map_err(|_| err())?;
            let bytes = (value * mult as f64).round();
            if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
                return Err(err());
            }
            Ok(ByteSize(bytes as u64))
        } else {
            let value: u64 = num.parse().map_err(|_| err())?;
            value.checked_mul(mult).map(ByteSize).ok_or_else(err)
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const BIN: &[(&str, u64)] = &[
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (unit, size) in BIN {
            if self.0 >= *size && self.0.is_multiple_of(*size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_rejects_garbage() {
        let cases: &[(&str, Option<u64>)] = &[
            ("0", Some(0)),
            ("1024", Some(1024)),
            ("16GiB", Some(16 << 30)),
            ("16 gib", Some(16 << 30)),
            ("7.5GB", Some(7_500_000_000)),
            ("512MiB", Some(512 << 20)),
            ("2k", Some(2000)),
            ("1.5KiB", Some(1536)),
            ("", None),
            ("GiB", None),
            ("-1", None),
            ("12 parsecs", None),
            ("99999999999999999999", None),
            ("20000000TiB", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                text.parse::<ByteSize>().ok().map(|b| b.0),
                *want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn displays_the_largest_exact_binary_unit() {
        assert_eq!(ByteSize(16 << 30).to_string(), "16GiB");
        assert_eq!(ByteSize(1536).to_string(), "1536");
        assert_eq!(ByteSize(3 << 20).to_string(), "3MiB");
        assert_eq!("3MiB".parse::<ByteSize>().unwrap(), ByteSize(3 << 20));
    }
}
