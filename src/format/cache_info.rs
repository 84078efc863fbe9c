//! `nix-cache-info`: the cache's store directory, mass-query hint and priority.

use std::fmt;

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("nix-cache-info line {line}: {why}")]
pub struct CacheInfoError {
    pub line: usize,
    pub why: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: String,
    pub want_mass_query: bool,
    pub priority: u32,
}

impl Default for CacheInfo {
    fn default() -> Self {
        CacheInfo {
            store_dir: "/nix/store".to_owned(),
            want_mass_query: true,
            priority: 40,
        }
    }
}

impl CacheInfo {
    /// Parses the file; unknown keys are ignored, as Nix does.
    pub fn parse(text: &str) -> Result<Self, CacheInfoError> {
        let mut info = CacheInfo {
            store_dir: String::new(),
            ..CacheInfo::default()
        };
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |why: String| CacheInfoError { line: i + 1, why };
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| err(format!("expected 'Key: value', got {line:?}")))?;
            let v = v.trim();
            match k {
                "StoreDir" => info.store_dir = v.to_owned(),
                "WantMassQuery" => info.want_mass_query = v == "1",
                "Priority" => {
                    info.priority = v
                        .parse()
                        .map_err(|_| err(format!("Priority {v:?} is not a number")))?
                }
                _ => {}
            }
        }
        if info.store_dir.is_empty() {
            return Err(CacheInfoError {
                line: 0,
                why: "no StoreDir".to_owned(),
            });
        }
        Ok(info)
    }
}

impl fmt::Display for CacheInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StoreDir: {}", self.store_dir)?;
        writeln!(f, "WantMassQuery: {}", u8::from(self.want_mass_query))?;
        writeln!(f, "Priority: {}", self.priority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let text = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n";
        let info = CacheInfo::parse(text).unwrap();
        assert_eq!(info, CacheInfo::default());
        assert_eq!(info.to_string(), text);
        assert!(CacheInfo::parse("WantMassQuery: 1\n").is_err());
        assert_eq!(
            CacheInfo::parse("StoreDir: /s\nPriority: x\n")
                .unwrap_err()
                .line,
            2
        );
    }
}
