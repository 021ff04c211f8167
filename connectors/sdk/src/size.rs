//! Sizes in configs: a number of bytes, or a string with a unit (`"32MiB"`,
//! `"512 KiB"`, `"1GiB"`, `"64MB"`, `"100kB"`, `"4096B"`), so that the
//! daemon's settings (`max_in_flight_bytes`) and the connectors' (the
//! Postgres source's `snapshot_range_size`) read alike.

use serde::{Deserialize, Deserializer};

/// Parses a size written as above.
pub fn parse_byte_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim());
    let n: f64 = num.parse().map_err(|_| {
        format!("`{text}` is not a size: write a number of bytes or e.g. \"32MiB\"")
    })?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (B, kB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    Ok((n * mult) as usize)
}

/// `#[serde(deserialize_with = "walcast_sdk::size::deserialize")]`: a
/// number of bytes or a string with a unit.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n as usize),
        Size::Text(t) => parse_byte_size(&t).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_byte_size;

    #[test]
    fn sizes_read_with_and_without_units() {
        assert_eq!(parse_byte_size("4096").unwrap(), 4096);
        assert_eq!(parse_byte_size("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_byte_size("512 KiB").unwrap(), 512 << 10);
        assert_eq!(parse_byte_size("64MB").unwrap(), 64_000_000);
        assert!(parse_byte_size("32 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_byte_size("lots").is_err());
    }
}
