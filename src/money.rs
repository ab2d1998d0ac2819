//! Exact money: the ledger currency in millionths (micros), integer only.
//!
//! 1 EUR = 1_000_000 micros, 1 cent = 10_000 micros. Cents exist only at the
//! Stripe edge and in the seed's `balance` field; everything else is micros.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Micros in one cent.
pub const MICROS_PER_CENT: i64 = 10_000;
/// Micros in one unit of the ledger currency (one euro).
pub const MICROS_PER_UNIT: i64 = 1_000_000;

/// An amount of the ledger currency in micros. May be negative (debt).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Micros(i64);

/// Arithmetic left the range of `i64` micros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("amount overflows the range of micros")]
pub struct Overflow;

impl Micros {
    pub const ZERO: Micros = Micros(0);

    pub const fn new(micros: i64) -> Self {
        Micros(micros)
    }

    pub const fn get(self) -> i64 {
        self.0
    }

    pub fn from_cents(cents: i64) -> Result<Self, Overflow> {
        cents
            .checked_mul(MICROS_PER_CENT)
            .map(Micros)
            .ok_or(Overflow)
    }

    /// Whole cents, rounded toward negative infinity (a balance never shows
    /// a cent it does not have).
    pub fn floor_cents(self) -> i64 {
        self.0.div_euclid(MICROS_PER_CENT)
    }

    /// Whole cents, rounded up (an estimate or a cost never shows less than it is).
    pub fn ceil_cents(self) -> i64 {
        let floor = self.0.div_euclid(MICROS_PER_CENT);
        if self.0.rem_euclid(MICROS_PER_CENT) == 0 {
            floor
        } else {
            floor + 1
        }
    }

    pub fn checked_add(self, other: Micros) -> Result<Micros, Overflow> {
        self.0.checked_add(other.0).map(Micros).ok_or(Overflow)
    }

    pub fn checked_sub(self, other: Micros) -> Result<Micros, Overflow> {
        self.0.checked_sub(other.0).map(Micros).ok_or(Overflow)
    }

    pub fn is_positive(self) -> bool {
        self.0 > 0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Parses a decimal amount of the ledger currency ("12.5", "-3", "0.000001").
    /// More than six decimals is refused rather than rounded.
    pub fn parse_decimal(text: &str) -> Result<Micros, String> {
        let ratio = Decimal::parse(text)?;
        let scaled = ratio
            .numerator
            .checked_mul(i128::from(MICROS_PER_UNIT))
            .ok_or_else(|| format!("`{text}` is too large"))?;
        if scaled % ratio.denominator != 0 {
            return Err(format!("`{text}` has more than 6 decimals"));
        }
        i64::try_from(scaled / ratio.denominator)
            .map(Micros)
            .map_err(|_| format!("`{text}` is too large"))
    }
}

/// Formats like the seed: two decimals and the euro sign, `12.34€`.
/// Sub-cent micros are truncated toward zero for display only.
impl fmt::Display for Micros {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let cents = (self.0 / MICROS_PER_CENT).unsigned_abs();
        write!(f, "{sign}{}.{:02}€", cents / 100, cents % 100)
    }
}

/// An exact non-negative-denominator decimal read from text: `numerator / denominator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub numerator: i128,
    pub denominator: i128,
}

impl Decimal {
    /// Reads `[-]digits[.digits]` exactly, with at most 12 decimals.
    pub fn parse(text: &str) -> Result<Decimal, String> {
        let trimmed = text.trim();
        let (negative, unsigned) = match trimmed.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let (whole, fraction) = unsigned.split_once('.').unwrap_or((unsigned, ""));
        let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() || !digits_ok(whole) || !digits_ok(fraction) {
            return Err(format!("`{text}` is not a decimal number"));
        }
        if fraction.len() > 12 || whole.len() > 18 {
            return Err(format!("`{text}` has too many digits"));
        }
        let mut numerator: i128 = 0;
        for b in whole.bytes().chain(fraction.bytes()) {
            numerator = numerator * 10 + i128::from(b - b'0');
        }
        let denominator = 10_i128.pow(fraction.len() as u32);
        Ok(Decimal {
            numerator: if negative { -numerator } else { numerator },
            denominator,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cents_convert_to_micros_exactly() {
        assert_eq!(Micros::from_cents(1234).unwrap(), Micros::new(12_340_000));
        assert_eq!(Micros::from_cents(-1).unwrap(), Micros::new(-10_000));
        assert_eq!(Micros::from_cents(i64::MAX), Err(Overflow));
    }

    #[test]
    fn floor_and_ceil_cents_round_in_the_stated_direction() {
        assert_eq!(Micros::new(19_999).floor_cents(), 1);
        assert_eq!(Micros::new(19_999).ceil_cents(), 2);
        assert_eq!(Micros::new(20_000).ceil_cents(), 2);
        assert_eq!(Micros::new(-1).floor_cents(), -1);
        assert_eq!(Micros::new(-1).ceil_cents(), 0);
    }

    #[test]
    fn formatting_matches_the_seed() {
        assert_eq!(Micros::new(12_340_000).to_string(), "12.34€");
        assert_eq!(Micros::new(10_000_000).to_string(), "10.00€");
        assert_eq!(Micros::new(5_000).to_string(), "0.00€");
        assert_eq!(Micros::new(-1_230_000).to_string(), "-1.23€");
    }

    #[test]
    fn checked_arithmetic_reports_overflow() {
        assert_eq!(
            Micros::new(i64::MAX).checked_add(Micros::new(1)),
            Err(Overflow)
        );
        assert_eq!(
            Micros::new(i64::MIN).checked_sub(Micros::new(1)),
            Err(Overflow)
        );
        assert_eq!(
            Micros::new(5).checked_sub(Micros::new(7)),
            Ok(Micros::new(-2))
        );
    }

    #[test]
    fn decimal_amounts_parse_exactly_or_are_refused() {
        assert_eq!(Micros::parse_decimal("12.5"), Ok(Micros::new(12_500_000)));
        assert_eq!(Micros::parse_decimal("-3"), Ok(Micros::new(-3_000_000)));
        assert_eq!(Micros::parse_decimal("0.000001"), Ok(Micros::new(1)));
        assert!(Micros::parse_decimal("0.0000001").is_err());
        assert!(Micros::parse_decimal("1e3").is_err());
        assert!(Micros::parse_decimal("").is_err());
        assert!(Micros::parse_decimal("99999999999999999").is_err());
    }
}
