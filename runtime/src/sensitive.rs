//! A wrapper that keeps a secret out of every `Debug` and `Display`, so passwords, tokens and
//! connection strings can be carried in structs that are logged or returned in errors.

use std::fmt;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Sensitive<T>(T);

impl<T> Sensitive<T> {
    pub fn new(value: T) -> Self {
        Self(value)
    }

    /// The secret itself: call it only where the value leaves for its one rightful recipient.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<T> fmt::Display for Sensitive<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Sensitive<String> {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_never_shows_the_value() {
        let secret: Sensitive<String> = "postgres://admin:s3cret@db/x".parse().unwrap();
        assert_eq!(
            format!("{secret:?} {secret} {secret:#?}"),
            "[redacted] [redacted] [redacted]"
        );
        assert_eq!(secret.expose(), "postgres://admin:s3cret@db/x");
    }
}
